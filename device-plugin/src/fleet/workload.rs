//! The work placed on a fleet, run in the fleet's own cluster: for each cluster placed on it,
//! a Ray head pod and its Service (a gang stays inside one fleet, so its head runs beside its
//! workers); one pod per Ray worker of each assignment, pinned to the assignment's node,
//! holding its GPUs through the fleet's own device plugin and joining the head; and what the
//! hub is told of them.

use std::collections::BTreeMap;

use gpumarket_crds::common::GPU_RESOURCE;
use gpumarket_crds::{FleetAssignment, FleetWorkload, RayAccess};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::{Value, json};

/// Label on every pod the fleet runs for a lease, naming it.
pub const LEASE_LABEL: &str = "gpumarket.io/lease";
/// Label on every pod and Service the fleet runs for the market (what it lists and cleans up).
pub const MANAGED_LABEL: &str = "gpumarket.io/fleet-workload";
/// Label on a cluster's Ray head pod and Service, naming the GpuCluster's uid on the hub.
pub const CLUSTER_UID_LABEL: &str = "gpumarket.io/cluster-uid";
/// Ports of the Ray head: the GCS workers join, the dashboard, the Ray client.
const HEAD_PORTS: [(&str, u16); 3] = [("gcs", 6379), ("dashboard", 8265), ("client", 10001)];
/// What the dashboard answers `success` to once the head's GCS serves (KubeRay's head probe).
const HEAD_HEALTH_PATH: &str = "/api/gcs_healthz";

/// Name of the Ray head pod and Service of the cluster with uid `cluster_uid` (a uid is 36
/// lower-case characters: a valid DNS label with the prefix).
pub fn head_name(cluster_uid: &str) -> String {
    format!("ray-head-{cluster_uid}")
}

/// Where the buyer reaches the Ray head of the cluster with uid `cluster_uid`, as the fleet sees
/// it: its Service in `namespace` of the fleet's cluster.
pub fn head_access(namespace: &str, cluster_uid: &str) -> RayAccess {
    let host = format!("{}.{namespace}.svc", head_name(cluster_uid));
    RayAccess {
        dashboard: format!("http://{host}:{}", HEAD_PORTS[1].1),
        ray_client: format!("ray://{host}:{}", HEAD_PORTS[2].1),
    }
}

/// The Ray head pod and Service of `assignment`'s cluster (the same for every assignment of
/// the cluster): CPU only, anywhere in the fleet, its image the workers'.
pub fn head_objects(namespace: &str, assignment: &FleetAssignment) -> [Value; 2] {
    let uid = &assignment.cluster.uid;
    let name = head_name(uid);
    let labels = json!({CLUSTER_UID_LABEL: uid, MANAGED_LABEL: "true"});
    let ports: Vec<Value> =
        HEAD_PORTS.iter().map(|(name, port)| json!({"name": name, "port": port})).collect();
    let container_ports: Vec<Value> = HEAD_PORTS
        .iter()
        .map(|(name, port)| json!({"name": name, "containerPort": port}))
        .collect();
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                "gpumarket.io/cluster": format!("{}/{}", assignment.cluster.namespace, assignment.cluster.name),
            },
        },
        "spec": {
            "restartPolicy": "Always",
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "ray-head",
                "image": assignment.image,
                "command": ["sh", "-c", "exec ray start --head --block --num-gpus=0 --dashboard-host=0.0.0.0"],
                "ports": container_ports,
                // Ready once its GCS serves: the hub reports the cluster Running from it.
                "readinessProbe": {
                    "httpGet": {"path": HEAD_HEALTH_PATH, "port": HEAD_PORTS[1].1},
                    "periodSeconds": 5,
                },
            }],
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"selector": labels, "ports": ports},
    });
    [pod, service]
}

/// The fleet node an offer of fleet `fleet` stands for (`<fleet>.<node>`), if it is the fleet's.
pub fn offer_node<'a>(fleet: &str, offer: &'a str) -> Option<&'a str> {
    offer.strip_prefix(fleet)?.strip_prefix('.')
}

/// Name of worker `index` of `lease`.
pub fn worker_name(lease: &str, index: u32) -> String {
    format!("{lease}-w{index}")
}

/// The worker pods of an assignment. `None` when the offer is not one of the fleet's.
pub fn worker_pods(
    fleet: &str,
    namespace: &str,
    assignment: &FleetAssignment,
) -> Option<Vec<Value>> {
    let node = offer_node(fleet, &assignment.offer)?;
    let mut limits = json!({GPU_RESOURCE: assignment.gpus_per_worker.to_string()});
    let head = head_name(&assignment.cluster.uid);
    let mut ray_args = format!("--address={head}:6379 --num-gpus={}", assignment.gpus_per_worker);
    if let Some(host) = assignment.worker_resources {
        limits["cpu"] = json!(format!("{}m", host.cpu_millicores));
        limits["memory"] = json!(host.memory_bytes.to_string());
        ray_args.push_str(&format!(" --num-cpus={}", (host.cpu_millicores / 1000).max(1)));
    }
    let pods = (0..assignment.workers)
        .map(|i| {
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": worker_name(&assignment.lease, i),
                    "namespace": namespace,
                    "labels": {LEASE_LABEL: assignment.lease, MANAGED_LABEL: "true"},
                    "annotations": {
                        "gpumarket.io/cluster": format!("{}/{}", assignment.cluster.namespace, assignment.cluster.name),
                    },
                },
                "spec": {
                    "nodeName": node,
                    "restartPolicy": "Always",
                    // Workers need no Kubernetes API, of the fleet or the hub.
                    "automountServiceAccountToken": false,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "ray-worker",
                        "image": assignment.image,
                        "command": ["sh", "-c", format!("exec ray start --block {ray_args}")],
                        "resources": {"limits": limits.clone(), "requests": limits},
                    }],
                },
            })
        })
        .collect();
    Some(pods)
}

/// What the hub is told: for each assignment, its workers and how many are Ready, whether its
/// cluster's Ray head is Ready and where it is reached, or why it cannot run.
pub fn workloads(
    fleet: &str,
    namespace: &str,
    assignments: &[FleetAssignment],
    pods: &[Pod],
) -> Vec<FleetWorkload> {
    let mut by_lease: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    let mut heads: BTreeMap<&str, &Pod> = BTreeMap::new();
    for pod in pods {
        let labels = pod.labels();
        match (labels.get(LEASE_LABEL), labels.get(CLUSTER_UID_LABEL)) {
            (Some(lease), _) => by_lease.entry(lease).or_default().push(pod),
            (None, Some(uid)) => {
                heads.insert(uid, pod);
            }
            (None, None) => {}
        }
    }
    assignments
        .iter()
        .map(|a| {
            let pods = by_lease.get(a.lease.as_str()).map(Vec::as_slice).unwrap_or_default();
            let head = heads.get(a.cluster.uid.as_str());
            FleetWorkload {
                lease: a.lease.clone(),
                workers: u32::try_from(pods.len()).unwrap_or(u32::MAX),
                ready_workers: u32::try_from(pods.iter().filter(|p| is_ready(p)).count())
                    .unwrap_or(u32::MAX),
                message: offer_node(fleet, &a.offer)
                    .is_none()
                    .then(|| format!("offer {} is not one of fleet {fleet}'s", a.offer)),
                head_ready: head.is_some_and(|h| is_ready(h)),
                access: head.map(|_| head_access(namespace, &a.cluster.uid)),
            }
        })
        .collect()
}

/// The pod IPs of the Ray heads the fleet runs for its assignments, by cluster uid: where the
/// hub's tunnel may connect.
pub fn head_addresses(assignments: &[FleetAssignment], pods: &[Pod]) -> super::tunnel::Heads {
    pods.iter()
        .filter(|pod| !pod.labels().contains_key(LEASE_LABEL))
        .filter_map(|pod| {
            let uid = pod.labels().get(CLUSTER_UID_LABEL)?;
            let ip = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            assignments.iter().any(|a| &a.cluster.uid == uid).then(|| (uid.clone(), ip))
        })
        .collect()
}

/// Objects (pods, Services) the fleet runs for leases no longer assigned to it, or for clusters
/// none of whose leases is: to delete.
pub fn stale<'a, K: ResourceExt>(assignments: &[FleetAssignment], objects: &'a [K]) -> Vec<&'a K> {
    objects
        .iter()
        .filter(|o| {
            let labels = o.labels();
            let lease = labels.get(LEASE_LABEL);
            let cluster = labels.get(CLUSTER_UID_LABEL);
            !assignments.iter().any(|a| {
                lease == Some(&a.lease) || lease.is_none() && cluster == Some(&a.cluster.uid)
            })
        })
        .collect()
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use gpumarket_crds::{ClusterRef, HostResources};

    use super::*;

    fn assignment(lease: &str, offer: &str) -> FleetAssignment {
        FleetAssignment {
            lease: lease.into(),
            offer: offer.into(),
            cluster: ClusterRef {
                namespace: "team".into(),
                name: "llm".into(),
                uid: "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d".into(),
            },
            workers: 2,
            gpus_per_worker: 4,
            worker_resources: Some(HostResources { cpu_millicores: 8500, memory_bytes: 1 << 34 }),
            image: "rayproject/ray:2.41.0-gpu".into(),
        }
    }

    fn pod(name: &str, lease: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {LEASE_LABEL: lease}},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("a pod")
    }

    #[test]
    fn each_worker_is_a_pod_on_the_offers_node_with_its_gpus_cpu_and_memory() {
        let pods = worker_pods("fleet-a", "market", &assignment("llm-x1", "fleet-a.gpu-7.dc1"))
            .expect("the fleet's offer");
        assert_eq!(pods.len(), 2);
        let spec = &pods[1]["spec"];
        assert_eq!(pods[1]["metadata"]["name"], "llm-x1-w1");
        assert_eq!(spec["nodeName"], "gpu-7.dc1");
        let command = spec["containers"][0]["command"][2].as_str().expect("a command");
        let head = "ray-head-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        assert!(command.contains(&format!("--address={head}:6379 --num-gpus=4")), "{command}");
        assert_eq!(spec["automountServiceAccountToken"], false);
        let limits = &spec["containers"][0]["resources"]["limits"];
        assert_eq!(
            limits,
            &json!({"nvidia.com/gpu": "4", "cpu": "8500m", "memory": "17179869184"})
        );
        assert_eq!(spec["containers"][0]["resources"]["requests"], *limits);
        assert!(worker_pods("fleet-a", "market", &assignment("l", "fleet-b.gpu-7")).is_none());
        assert!(worker_pods("fleet-a", "market", &assignment("l", "fleet-ab.gpu-7")).is_none());
    }

    #[test]
    fn each_cluster_has_a_head_and_a_service_in_the_fleet_that_its_workers_join() {
        let [pod, service] = head_objects("market", &assignment("llm-x1", "fleet-a.gpu-7"));
        let head = "ray-head-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        assert_eq!(
            (&pod["metadata"]["name"], &service["metadata"]["name"]),
            (&json!(head), &json!(head))
        );
        assert_eq!(service["spec"]["selector"], pod["metadata"]["labels"]);
        let spec = &pod["spec"];
        assert!(spec.get("nodeName").is_none(), "anywhere in the fleet");
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert!(spec["containers"][0]["resources"].get("limits").is_none(), "no GPU");
        let command = spec["containers"][0]["command"][2].as_str().expect("a command");
        assert!(command.contains("ray start --head"), "{command}");
        assert_eq!(service["spec"]["ports"][0], json!({"name": "gcs", "port": 6379}));
        let probe = &spec["containers"][0]["readinessProbe"]["httpGet"];
        assert_eq!(probe, &json!({"path": "/api/gcs_healthz", "port": 8265}));
    }

    #[test]
    fn the_hub_is_told_ready_workers_per_lease_and_stale_pods_go() {
        let assignments = [assignment("l1", "fleet-a.n1"), assignment("l2", "fleet-b.n1")];
        let mut pods =
            vec![pod("l1-w0", "l1", true), pod("l1-w1", "l1", false), pod("old-w0", "old", true)];
        let report = workloads("fleet-a", "market", &assignments, &pods);
        assert_eq!((report[0].workers, report[0].ready_workers, &report[0].message), (2, 1, &None));
        assert_eq!((report[0].head_ready, &report[0].access), (false, &None), "no head yet");
        assert_eq!((report[1].workers, report[1].ready_workers), (0, 0));
        assert!(
            report[1].message.as_deref().is_some_and(|m| m.contains("not one of fleet fleet-a"))
        );
        // Heads: of a cluster with a lease here, and of one without.
        let head = |uid: &str, ready: bool| -> Pod {
            let mut head = pod(&head_name(uid), "", ready);
            head.metadata.labels = Some([(CLUSTER_UID_LABEL.to_owned(), uid.to_owned())].into());
            head
        };
        let uid = assignments[0].cluster.uid.clone();
        pods.push(head(&uid, false));
        let report = workloads("fleet-a", "market", &assignments, &pods);
        let host = format!("ray-head-{uid}.market.svc");
        let access = RayAccess {
            dashboard: format!("http://{host}:8265"),
            ray_client: format!("ray://{host}:10001"),
        };
        assert_eq!((report[0].head_ready, &report[0].access), (false, &Some(access.clone())));
        pods.pop();
        pods.push(head(&uid, true));
        let report = workloads("fleet-a", "market", &assignments, &pods);
        assert_eq!((report[0].head_ready, report[0].access.as_ref()), (true, Some(&access)));
        pods.push(head("gone", true));
        let stale: Vec<String> = stale(&assignments, &pods).iter().map(|p| p.name_any()).collect();
        assert_eq!(stale, ["old-w0", "ray-head-gone"]);
    }

    #[test]
    fn the_tunnel_reaches_only_the_heads_of_assigned_clusters() {
        let assignments = [assignment("l1", "fleet-a.n1")];
        let uid = assignments[0].cluster.uid.clone();
        let at = |uid: &str, ip: Option<&str>, lease: Option<&str>| -> Pod {
            let mut labels = BTreeMap::from([(CLUSTER_UID_LABEL.to_owned(), uid.to_owned())]);
            if let Some(lease) = lease {
                labels.insert(LEASE_LABEL.to_owned(), lease.to_owned());
            }
            serde_json::from_value(json!({
                "metadata": {"name": "p", "labels": labels},
                "status": {"podIP": ip},
            }))
            .expect("a pod")
        };
        let pods = [
            at(&uid, Some("10.0.0.7"), None),
            at("other-cluster", Some("10.0.0.8"), None),
            at(&uid, Some("10.0.0.9"), Some("l1")),
        ];
        let heads = head_addresses(&assignments, &pods);
        assert_eq!(heads, BTreeMap::from([(uid.clone(), "10.0.0.7".parse().expect("an IP"))]));
        assert!(head_addresses(&assignments, &[at(&uid, None, None)]).is_empty(), "no IP yet");
    }
}
