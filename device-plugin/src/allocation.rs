//! What the plugin answers the kubelet at allocation time, as pure functions: which pod is being
//! admitted (a lease's worker pod that the kubelet knows and that holds no GPU yet), which GPUs
//! it prefers for it (its lease's, NVLink-connected sets first), whether an allocation may go
//! ahead (all GPUs of the one lease whose pod is waiting), and what a container gets.
//!
//! The kubelet never says which pod an `Allocate` is for. It admits pods one at a time and lists
//! the pod being admitted in its PodResources API, without devices, until the allocation is
//! done; the leases of this node list their worker pods. A pod both lists name, holding no GPU,
//! is the pod being admitted. Nothing else gets a GPU: not a pod of no lease, not a pod of one
//! lease on another lease's GPUs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::source::Inventory;

/// A pod by namespace and name (the PodResources API carries no uid).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl PodName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> PodName {
        PodName { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An active lease of this node, as the plugin needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLease {
    pub name: String,
    /// When its GPUs were bound: pods of older leases are served first.
    pub since: jiff::Timestamp,
    /// Uuids of its GPUs.
    pub gpus: Vec<String>,
    /// Its worker pods, as the controller lists them (`status.pods`).
    pub pods: Vec<PodName>,
}

impl NodeLease {
    fn holds(&self, device: &str) -> bool {
        self.gpus.iter().any(|g| g == device)
    }
}

/// The pods the kubelet has admitted or is admitting (its PodResources `List`), each with the
/// devices of the plugin's resource it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeletPods {
    pub pods: BTreeMap<PodName, Vec<String>>,
}

/// A lease's worker pod that the kubelet knows and that holds no device yet: the pod being
/// admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting<'a> {
    pub lease: &'a NodeLease,
    pub pod: &'a PodName,
}

/// The lease worker pods waiting for GPUs, oldest lease first (then by lease name, then in the
/// lease's order).
pub fn waiting_pods<'a>(leases: &'a [NodeLease], kubelet: &KubeletPods) -> Vec<Waiting<'a>> {
    let mut ordered: Vec<&NodeLease> = leases.iter().collect();
    ordered.sort_by(|a, b| (a.since, &a.name).cmp(&(b.since, &b.name)));
    ordered
        .into_iter()
        .flat_map(|lease| {
            lease
                .pods
                .iter()
                .filter(|pod| kubelet.pods.get(*pod).is_some_and(Vec::is_empty))
                .map(move |pod| Waiting { lease, pod })
        })
        .collect()
}

/// Why the plugin refuses to prefer or hand out devices.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no worker pod of an active GpuLease of this node is waiting for GPUs, so {devices} go to \
         no one: this node's GPUs are handed only to the worker pods its leases list \
         (GpuLease status.pods), and the pod being admitted is not one of them"
    )]
    NoLeasePodWaiting { devices: String },
    #[error(
        "{first} (lease {first_lease}) and {second} (lease {second_lease}) belong to different \
         GpuLeases: a pod gets GPUs of its own lease only"
    )]
    CrossesLeases { first: String, first_lease: String, second: String, second_lease: String },
    #[error(
        "{device} is in no active GpuLease of this node; the pod waiting for GPUs is {pod} of \
         lease {lease}, whose GPUs are {gpus}"
    )]
    NotLeased { device: String, pod: String, lease: String, gpus: String },
    #[error(
        "{device} belongs to lease {lease}, none of whose worker pods is waiting for GPUs here; \
         the pod waiting for GPUs is {pod} of lease {waiting_lease}, whose GPUs are {gpus}"
    )]
    WrongLease { device: String, lease: String, pod: String, waiting_lease: String, gpus: String },
    #[error(
        "{pod} of lease {lease} needs {size} GPUs but only {available} of its lease's GPUs are \
         free ({gpus})"
    )]
    TooFewFree { pod: String, lease: String, size: usize, available: usize, gpus: String },
}

impl Refusal {
    /// Whether a later view of the leases could lift it: a lease, or a pod in a lease's list,
    /// that the plugin has not seen yet. The GPUs of a lease never change, nor the devices free.
    pub fn may_lift(&self) -> bool {
        !matches!(self, Refusal::CrossesLeases { .. } | Refusal::TooFewFree { .. })
    }
}

/// The devices to prefer for the pod being admitted: `size` of its lease's GPUs out of
/// `available`, chosen by [`preferred_allocation`] within the lease. The first waiting pod
/// (oldest lease first) whose lease has `size` GPUs free (and all of `must_include`) is taken.
pub fn preferred_for_lease<'a>(
    inventory: &Inventory,
    leases: &'a [NodeLease],
    kubelet: &KubeletPods,
    available: &[String],
    must_include: &[String],
    size: usize,
) -> Result<(Waiting<'a>, Vec<String>), Refusal> {
    let waiting = waiting_pods(leases, kubelet);
    let free = |lease: &NodeLease| -> Vec<String> {
        available.iter().filter(|id| lease.holds(id)).cloned().collect()
    };
    for candidate in &waiting {
        let in_lease = free(candidate.lease);
        if in_lease.len() >= size && must_include.iter().all(|id| candidate.lease.holds(id)) {
            let devices = preferred_allocation(inventory, &in_lease, must_include, size);
            return Ok((*candidate, devices));
        }
    }
    match waiting.first() {
        None => Err(Refusal::NoLeasePodWaiting { devices: format!("{size} GPU(s)") }),
        Some(first) => Err(Refusal::TooFewFree {
            pod: first.pod.to_string(),
            lease: first.lease.name.clone(),
            size,
            available: free(first.lease).len(),
            gpus: first.lease.gpus.join(", "),
        }),
    }
}

/// Whether `devices` may be handed out: all of them GPUs of one active lease of this node that
/// has a worker pod waiting for GPUs. The pod they go to.
pub fn check_allocation<'a>(
    leases: &'a [NodeLease],
    kubelet: &KubeletPods,
    devices: &[String],
) -> Result<Waiting<'a>, Refusal> {
    let owners: Vec<(&String, Option<&NodeLease>)> =
        devices.iter().map(|d| (d, leases.iter().find(|l| l.holds(d)))).collect();
    let mut leased = owners.iter().filter_map(|(d, l)| l.map(|l| (*d, l)));
    if let Some((first, first_lease)) = leased.next()
        && let Some((second, second_lease)) = leased.find(|(_, l)| l.name != first_lease.name)
    {
        return Err(Refusal::CrossesLeases {
            first: first.clone(),
            first_lease: first_lease.name.clone(),
            second: second.clone(),
            second_lease: second_lease.name.clone(),
        });
    }
    let waiting = waiting_pods(leases, kubelet);
    let Some(first_waiting) = waiting.first() else {
        return Err(Refusal::NoLeasePodWaiting { devices: devices.join(", ") });
    };
    let elsewhere = |device: &String| Refusal::NotLeased {
        device: device.clone(),
        pod: first_waiting.pod.to_string(),
        lease: first_waiting.lease.name.clone(),
        gpus: first_waiting.lease.gpus.join(", "),
    };
    if let Some((device, _)) = owners.iter().find(|(_, lease)| lease.is_none()) {
        return Err(elsewhere(device));
    }
    let Some((device, Some(lease))) = owners.first() else {
        // Nothing asked for: nothing handed out, to the first pod waiting.
        return Ok(*first_waiting);
    };
    waiting.iter().find(|w| w.lease.name == lease.name).copied().ok_or_else(|| {
        Refusal::WrongLease {
            device: (*device).clone(),
            lease: lease.name.clone(),
            pod: first_waiting.pod.to_string(),
            waiting_lease: first_waiting.lease.name.clone(),
            gpus: first_waiting.lease.gpus.join(", "),
        }
    })
}

/// CDI vendor/class of NVIDIA GPUs (the NVIDIA container toolkit's CDI spec names them so).
pub const CDI_KIND: &str = "nvidia.com/gpu";

/// The container's GPUs, by uuid, for the workload itself (which GPUs it was given, whatever
/// the runtime does with `NVIDIA_VISIBLE_DEVICES`).
pub const GPU_UUIDS_ENV: &str = "GPUMARKET_GPU_UUIDS";

/// What a container receives for `device_ids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDevices {
    pub envs: HashMap<String, String>,
    /// Fully qualified CDI device names, when CDI is on.
    pub cdi_devices: Vec<String>,
}

/// `NVIDIA_VISIBLE_DEVICES` with the uuids (the NVIDIA container runtime's interface) and, with
/// CDI, `nvidia.com/gpu=<uuid>` devices; [`GPU_UUIDS_ENV`] with the uuids either way (a CDI
/// spec sets `NVIDIA_VISIBLE_DEVICES=void`). Unknown ids are refused: the kubelet may only hand
/// out devices this plugin listed.
pub fn container_devices(
    inventory: &Inventory,
    device_ids: &[String],
    cdi: bool,
) -> Result<ContainerDevices, String> {
    if let Some(unknown) = device_ids.iter().find(|id| inventory.gpu(id).is_none()) {
        return Err(format!(
            "unknown device {unknown}: this plugin serves {}",
            uuids(inventory).join(", ")
        ));
    }
    let uuids = device_ids.join(",");
    let envs = HashMap::from([
        ("NVIDIA_VISIBLE_DEVICES".to_string(), uuids.clone()),
        (GPU_UUIDS_ENV.to_string(), uuids),
    ]);
    let cdi_devices = if cdi {
        device_ids.iter().map(|id| format!("{CDI_KIND}={id}")).collect()
    } else {
        Vec::new()
    };
    Ok(ContainerDevices { envs, cdi_devices })
}

fn uuids(inventory: &Inventory) -> Vec<&str> {
    inventory.gpus.iter().map(|g| g.uuid.as_str()).collect()
}

/// The `size` devices to prefer out of `available`, containing `must_include`: grown one device
/// at a time by the one with the most NVLink links into the set so far (then the most devices
/// on its NUMA node), from the seed that ends with the most links (then NUMA-local pairs). Ties
/// go to the earlier device of `available`, so answers are stable.
pub fn preferred_allocation(
    inventory: &Inventory,
    available: &[String],
    must_include: &[String],
    size: usize,
) -> Vec<String> {
    let links = |a: &str, b: &str| inventory.gpu(a).is_some_and(|g| g.nvlink_peers.contains(b));
    let numa = |id: &str| inventory.gpu(id).and_then(|g| g.numa_node);
    let near = |a: &str, b: &str| numa(a).is_some() && numa(a) == numa(b);
    let grow = |mut chosen: Vec<String>| {
        while chosen.len() < size {
            let best = available.iter().filter(|id| !chosen.contains(id)).max_by_key(|id| {
                // max_by_key keeps the last maximum; rank earlier devices higher on ties.
                let linked = chosen.iter().filter(|c| links(c, id)).count();
                let local = chosen.iter().filter(|c| near(c, id)).count();
                (linked, local, std::cmp::Reverse(available.iter().position(|a| a == *id)))
            });
            match best {
                Some(id) => chosen.push(id.clone()),
                None => break,
            }
        }
        chosen
    };
    let pairs = |set: &[String], related: &dyn Fn(&str, &str) -> bool| {
        set.iter()
            .enumerate()
            .map(|(i, a)| set[i + 1..].iter().filter(|b| related(a, b)).count())
            .sum::<usize>()
    };
    let score = |set: &[String]| (pairs(set, &links), pairs(set, &near));
    let required: Vec<String> = dedup(must_include);
    if !required.is_empty() || size <= 1 {
        return grow(required);
    }
    let mut best: Option<((usize, usize), Vec<String>)> = None;
    for seed in available {
        let set = grow(vec![seed.clone()]);
        let set_score = score(&set);
        if best.as_ref().is_none_or(|(s, _)| set_score > *s) {
            best = Some((set_score, set));
        }
    }
    best.map(|(_, set)| set).unwrap_or_default()
}

fn dedup(ids: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    ids.iter().filter(|id| seen.insert(id.as_str())).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Gpu;

    /// GPUs 0..n; `links` pairs are NVLink-connected.
    fn inventory(n: usize, links: &[(usize, usize)]) -> Inventory {
        let mut gpus: Vec<Gpu> = (0..n)
            .map(|i| Gpu {
                uuid: format!("G{i}"),
                product_name: "NVIDIA H100".into(),
                memory_mib: 1,
                pci_bus_id: String::new(),
                nvlink_peers: BTreeSet::new(),
                numa_node: None,
                device_node: None,
            })
            .collect();
        for &(a, b) in links {
            gpus[a].nvlink_peers.insert(format!("G{b}"));
            gpus[b].nvlink_peers.insert(format!("G{a}"));
        }
        Inventory { gpus, ..Default::default() }
    }

    fn ids(names: &[usize]) -> Vec<String> {
        names.iter().map(|i| format!("G{i}")).collect()
    }

    #[test]
    fn prefers_an_nvlink_connected_set() {
        // G1-G2-G3 form a triangle; G0 is linked to nothing.
        let inv = inventory(4, &[(1, 2), (2, 3), (1, 3)]);
        assert_eq!(preferred_allocation(&inv, &ids(&[0, 1, 2, 3]), &[], 2), ids(&[1, 2]));
        assert_eq!(preferred_allocation(&inv, &ids(&[0, 1, 2, 3]), &[], 3), ids(&[1, 2, 3]));
        // Without links, the first devices in the kubelet's order.
        assert_eq!(
            preferred_allocation(&inventory(4, &[]), &ids(&[3, 1, 0, 2]), &[], 2),
            ids(&[3, 1])
        );
    }

    #[test]
    fn without_nvlink_a_set_stays_on_one_numa_node() {
        let mut inv = inventory(4, &[]);
        for (gpu, node) in inv.gpus.iter_mut().zip([0, 1, 0, 1]) {
            gpu.numa_node = Some(node);
        }
        let all = ids(&[0, 1, 2, 3]);
        assert_eq!(preferred_allocation(&inv, &all, &[], 2), ids(&[0, 2]));
        assert_eq!(preferred_allocation(&inv, &all, &ids(&[1]), 2), ids(&[1, 3]));
        // NVLink still comes first.
        let mut linked = inventory(4, &[(0, 1)]);
        for (gpu, node) in linked.gpus.iter_mut().zip([0, 1, 0, 1]) {
            gpu.numa_node = Some(node);
        }
        assert_eq!(preferred_allocation(&linked, &all, &[], 2), ids(&[0, 1]));
    }

    #[test]
    fn must_include_devices_are_kept_and_joined_by_their_peers() {
        let inv = inventory(4, &[(0, 3), (1, 2)]);
        let chosen = preferred_allocation(&inv, &ids(&[0, 1, 2, 3]), &ids(&[3]), 2);
        assert_eq!(chosen, ids(&[3, 0]));
        let chosen = preferred_allocation(&inv, &ids(&[0, 1, 2, 3]), &ids(&[2, 0]), 3);
        assert_eq!(&chosen[..2], &ids(&[2, 0]));
        assert_eq!(chosen.len(), 3);
    }

    fn lease(name: &str, since: i64, gpus: &[usize], pods: &[&str]) -> NodeLease {
        NodeLease {
            name: name.into(),
            since: jiff::Timestamp::from_second(since).expect("valid time"),
            gpus: ids(gpus),
            pods: pods.iter().map(|p| PodName::new("ml", *p)).collect(),
        }
    }

    /// The kubelet's pods and the GPUs each holds.
    fn kubelet(pods: &[(&str, &[usize])]) -> KubeletPods {
        KubeletPods {
            pods: pods.iter().map(|(name, gpus)| (PodName::new("ml", *name), ids(gpus))).collect(),
        }
    }

    fn waiting_names(leases: &[NodeLease], kubelet: &KubeletPods) -> Vec<(String, String)> {
        waiting_pods(leases, kubelet)
            .into_iter()
            .map(|w| (w.lease.name.clone(), w.pod.name.clone()))
            .collect()
    }

    #[test]
    fn the_pod_being_admitted_is_a_lease_pod_the_kubelet_knows_without_gpus() {
        let leases =
            [lease("young", 20, &[2, 3], &["y0"]), lease("old", 10, &[0, 1], &["o0", "o1"])];
        // Not on the kubelet yet, or holding GPUs already: not waiting.
        assert!(waiting_names(&leases, &kubelet(&[("o0", &[0])])).is_empty());
        // A pod of no lease never waits for GPUs, whatever the kubelet says.
        assert!(waiting_names(&leases, &kubelet(&[("rogue", &[])])).is_empty());
        let both = kubelet(&[("y0", &[]), ("o1", &[]), ("o0", &[0])]);
        let pair = |l: &str, p: &str| (l.to_string(), p.to_string());
        assert_eq!(waiting_names(&leases, &both), [pair("old", "o1"), pair("young", "y0")]);
        // The same namespace matters: ml/o1 is not other/o1.
        let other = KubeletPods { pods: [(PodName::new("other", "o1"), vec![])].into() };
        assert!(waiting_names(&leases, &other).is_empty());
    }

    #[test]
    fn two_leases_of_equal_size_each_get_their_own_gpus_in_turn() {
        // G2-G3 is the NVLink pair a lease-blind plugin would prefer for anyone.
        let inv = inventory(4, &[(2, 3)]);
        let leases = [lease("l1", 10, &[0, 1], &["a"]), lease("l2", 10, &[2, 3], &["b"])];
        let all = ids(&[0, 1, 2, 3]);

        let (waiting, devices) =
            preferred_for_lease(&inv, &leases, &kubelet(&[("a", &[])]), &all, &[], 2)
                .expect("a waits");
        assert_eq!((waiting.lease.name.as_str(), devices), ("l1", ids(&[0, 1])));
        let granted = check_allocation(&leases, &kubelet(&[("a", &[])]), &ids(&[0, 1]))
            .expect("l1's GPUs for l1's pod");
        assert_eq!(granted.pod, &PodName::new("ml", "a"));

        let after_a = kubelet(&[("a", &[0, 1]), ("b", &[])]);
        let (waiting, devices) =
            preferred_for_lease(&inv, &leases, &after_a, &ids(&[2, 3]), &[], 2).expect("b waits");
        assert_eq!((waiting.lease.name.as_str(), devices), ("l2", ids(&[2, 3])));
        assert!(check_allocation(&leases, &after_a, &ids(&[2, 3])).is_ok());
        // a holds its GPUs: l1's remaining devices go to no one.
        let refused = check_allocation(&leases, &after_a, &ids(&[0])).expect_err("a is served");
        assert!(matches!(refused, Refusal::WrongLease { .. }), "{refused}");
    }

    #[test]
    fn inside_a_lease_nvlink_sets_and_must_include_devices_still_win() {
        let inv = inventory(6, &[(3, 4)]);
        let leases = [lease("l", 1, &[1, 3, 4, 5], &["w0", "w1"])];
        let pods = kubelet(&[("w0", &[]), ("w1", &[])]);
        let all = ids(&[0, 1, 2, 3, 4, 5]);
        let (_, devices) = preferred_for_lease(&inv, &leases, &pods, &all, &[], 2).expect("fits");
        assert_eq!(devices, ids(&[3, 4]));
        let (_, devices) =
            preferred_for_lease(&inv, &leases, &pods, &all, &ids(&[5]), 2).expect("fits");
        assert_eq!(devices, ids(&[5, 1]));
    }

    #[test]
    fn without_room_in_the_waiting_pods_lease_nothing_is_preferred() {
        let inv = inventory(4, &[]);
        let leases = [lease("old", 1, &[0], &["o"]), lease("new", 2, &[1, 2], &["n"])];
        let pods = kubelet(&[("o", &[]), ("n", &[])]);
        // The older lease has one GPU: the newer lease's pod is the one asking for two.
        let (waiting, devices) =
            preferred_for_lease(&inv, &leases, &pods, &ids(&[0, 1, 2, 3]), &[], 2).expect("n");
        assert_eq!((waiting.pod.name.as_str(), devices), ("n", ids(&[1, 2])));
        let refused = preferred_for_lease(&inv, &leases, &pods, &ids(&[0, 1, 2, 3]), &[], 3)
            .expect_err("no lease has three");
        assert!(matches!(refused, Refusal::TooFewFree { size: 3, available: 1, .. }), "{refused}");
        assert!(!refused.may_lift());
        let refused = preferred_for_lease(&inv, &leases, &kubelet(&[]), &ids(&[0]), &[], 1)
            .expect_err("no one waits");
        assert!(refused.may_lift());
    }

    #[test]
    fn allocations_outside_the_waiting_pods_lease_are_refused() {
        let leases = [lease("l1", 1, &[0, 1], &["a"]), lease("l2", 2, &[2, 3], &["b"])];
        let a_waits = kubelet(&[("a", &[]), ("b", &[2, 3])]);

        let crossing = check_allocation(&leases, &a_waits, &ids(&[1, 2])).expect_err("crosses");
        assert_eq!(
            crossing,
            Refusal::CrossesLeases {
                first: "G1".into(),
                first_lease: "l1".into(),
                second: "G2".into(),
                second_lease: "l2".into()
            }
        );
        assert!(!crossing.may_lift(), "a lease's GPUs never change");
        let message = crossing.to_string();
        assert!(message.contains("l1") && message.contains("l2"), "{message}");

        // A pod of no lease (the kubelet lists it, no lease does), on free or leased GPUs.
        let rogue = kubelet(&[("rogue", &[]), ("a", &[0, 1]), ("b", &[2, 3])]);
        for devices in [ids(&[0]), ids(&[2, 3]), ids(&[4])] {
            let refused = check_allocation(&leases, &rogue, &devices).expect_err("no lease pod");
            assert!(matches!(refused, Refusal::NoLeasePodWaiting { .. }), "{refused}");
            assert!(refused.may_lift(), "its lease may not have been seen yet");
        }

        let unleased = check_allocation(&leases, &a_waits, &ids(&[0, 4])).expect_err("G4 free");
        assert!(matches!(&unleased, Refusal::NotLeased { device, .. } if device == "G4"));
        let wrong = check_allocation(&leases, &a_waits, &ids(&[3])).expect_err("b is served");
        let message = wrong.to_string();
        assert!(
            message.contains("G3 belongs to lease l2") && message.contains("ml/a"),
            "{message}"
        );
        assert_eq!(check_allocation(&leases, &a_waits, &ids(&[1])).expect("ok").lease.name, "l1");
    }

    #[test]
    fn containers_get_uuids_and_cdi_names() {
        let inv = inventory(2, &[]);
        let plain = container_devices(&inv, &ids(&[0, 1]), false).expect("known devices");
        assert_eq!(plain.envs.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str), Some("G0,G1"));
        assert_eq!(plain.envs.get(GPU_UUIDS_ENV).map(String::as_str), Some("G0,G1"));
        assert!(plain.cdi_devices.is_empty());
        let cdi = container_devices(&inv, &ids(&[1]), true).expect("known devices");
        assert_eq!(cdi.cdi_devices, vec!["nvidia.com/gpu=G1".to_string()]);
        assert_eq!(cdi.envs.get(GPU_UUIDS_ENV).map(String::as_str), Some("G1"));
        let error = container_devices(&inv, &ids(&[7]), false).expect_err("unknown device");
        assert!(error.contains("unknown device G7"), "{error}");
    }
}
