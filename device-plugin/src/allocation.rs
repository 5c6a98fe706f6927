//! What the plugin answers the kubelet at allocation time, as pure functions: which GPUs it
//! prefers (NVLink-connected sets) and what a container gets for the GPUs it was given.

use std::collections::{BTreeSet, HashMap};

use crate::source::Inventory;

/// CDI vendor/class of NVIDIA GPUs (the NVIDIA container toolkit's CDI spec names them so).
pub const CDI_KIND: &str = "nvidia.com/gpu";

/// What a container receives for `device_ids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDevices {
    pub envs: HashMap<String, String>,
    /// Fully qualified CDI device names, when CDI is on.
    pub cdi_devices: Vec<String>,
}

/// `NVIDIA_VISIBLE_DEVICES` with the uuids (the NVIDIA container runtime's interface) and, with
/// CDI, `nvidia.com/gpu=<uuid>` devices. Unknown ids are refused: the kubelet may only hand
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
    let envs = HashMap::from([("NVIDIA_VISIBLE_DEVICES".to_string(), device_ids.join(","))]);
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

    #[test]
    fn containers_get_uuids_and_cdi_names() {
        let inv = inventory(2, &[]);
        let plain = container_devices(&inv, &ids(&[0, 1]), false).expect("known devices");
        assert_eq!(plain.envs.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str), Some("G0,G1"));
        assert!(plain.cdi_devices.is_empty());
        let cdi = container_devices(&inv, &ids(&[1]), true).expect("known devices");
        assert_eq!(cdi.cdi_devices, vec!["nvidia.com/gpu=G1".to_string()]);
        let error = container_devices(&inv, &ids(&[7]), false).expect_err("unknown device");
        assert!(error.contains("unknown device G7"), "{error}");
    }
}
