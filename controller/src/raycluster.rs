//! The KubeRay `RayCluster` of a GpuCluster, built by a pure function of the GpuCluster and its
//! active leases (like KubeRay's own pod builders), and read back for readiness.
//!
//! The RayCluster is handled as JSON (`DynamicObject`) rather than through a KubeRay crate: only
//! a handful of fields matter here and the CRD stays the operator's business.

use std::collections::BTreeMap;

use gpumarket_crds::common::{GPU_RESOURCE, SUPPLIER_TAINT};
use gpumarket_crds::{GpuCluster, GpuLease, HostResources, RayAccess};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Resource;
use kube::api::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Label on every object the controller creates for a GpuCluster, naming it.
pub const CLUSTER_LABEL: &str = "gpumarket.io/cluster";
/// Pod annotation naming the lease a worker runs under (the supplier agent can check it).
pub const LEASE_ANNOTATION: &str = "gpumarket.io/lease";
/// Port of the Ray dashboard on the head service.
pub const DASHBOARD_PORT: u16 = 8265;
/// Port of the Ray client server on the head service.
pub const CLIENT_PORT: u16 = 10001;
/// Init container of every Ray pod that fails, saying so, when the image's Ray is not
/// `spec.ray.version`: before the pod serves, so before its GPUs are billed.
pub const VERSION_CHECK: &str = "ray-version-check";
/// Reads the installed package's metadata (without importing Ray: fast) and exits with a
/// message for the buyer; the version asked comes as an argument, never as code.
const VERSION_CHECK_SCRIPT: &str = r#"import importlib.metadata as m, sys
want = sys.argv[1]
try:
    have = m.version("ray")
except m.PackageNotFoundError:
    sys.exit(f"the image has no Ray; spec.ray.version asks {want}: set spec.ray.image to an image with Ray {want}")
if have != want:
    sys.exit(f"the image has Ray {have}; spec.ray.version asks {want}: set spec.ray.version to {have} or spec.ray.image to an image with Ray {want}")
"#;

/// `ray.io/v1` `RayCluster`.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("ray.io", "v1", "RayCluster"),
        "rayclusters",
    )
}

/// The RayCluster is named after its GpuCluster (same namespace).
pub fn ray_cluster_name(cluster: &GpuCluster) -> String {
    cluster.metadata.name.clone().unwrap_or_default()
}

/// Where the Ray head of the RayCluster `name` in `namespace` is reached: KubeRay's head
/// service's dashboard and Ray client ports.
pub fn head_access(name: &str, namespace: &str) -> RayAccess {
    let host = format!("{name}-head-svc.{namespace}.svc");
    RayAccess {
        dashboard: format!("http://{host}:{DASHBOARD_PORT}"),
        ray_client: format!("ray://{host}:{CLIENT_PORT}"),
    }
}

/// Name of the worker group serving `lease`: the node (what an operator looks for) plus the
/// lease's unique suffix, within the 63 characters of a label value (KubeRay labels pods with it).
pub fn worker_group_name(lease: &GpuLease) -> String {
    let lease_name = lease.metadata.name.as_deref().unwrap_or_default();
    let suffix = lease_name.rsplit('-').next().unwrap_or(lease_name);
    let node: String = lease.spec.offer.chars().take(50).collect();
    format!("{}-{suffix}", node.trim_end_matches(['-', '.']))
}

/// Where the market's operator runs Ray heads (the buyer has no say: a head tolerating the
/// supplier taint would run on a supplier's CPUs unpaid). Empty, the default: on any node
/// without a taint, so never on a market node. An all-in-one cluster whose only real node is a
/// supplier's (the local environment's) selects it and tolerates the taint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeadPlacement {
    pub node_selector: BTreeMap<String, String>,
    /// Keys of taints the head tolerates (any value and effect).
    pub tolerated_taints: Vec<String>,
}

/// Image of the cluster's head and workers: `spec.ray.image`, else `rayproject/ray:<version>-gpu`.
pub fn ray_image(cluster: &GpuCluster) -> String {
    let ray = &cluster.spec.ray;
    ray.image.clone().unwrap_or_else(|| format!("rayproject/ray:{}-gpu", ray.version))
}

/// The desired RayCluster: a head group (CPU only, placed as `head` says) and one worker
/// group per active lease, pinned to the lease's node and tolerating the supplier taint.
/// Leases are taken in name order so the output does not depend on list order.
pub fn build_ray_cluster(
    cluster: &GpuCluster,
    leases: &[&GpuLease],
    head: &HeadPlacement,
) -> Result<Value> {
    let ray = &cluster.spec.ray;
    let image = ray_image(cluster);
    let owner = cluster
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec("GpuCluster has no name or uid yet".into()))?;
    let name = ray_cluster_name(cluster);

    // The head runs on CPU in the buyer's namespace (the schema refuses GPU heads: market GPUs
    // go to leased workers only). No pod gets a service-account token: workers run on machines
    // whose owner has root, and Ray needs no Kubernetes API.
    let head_resources =
        with_gpus(ray.head_resources.clone().unwrap_or_else(default_head_resources), 0);
    let mut head_pod = json!({
        "automountServiceAccountToken": false,
        "initContainers": [version_check(&image, &ray.version, &head_resources)?],
        "containers": [{
            "name": "ray-head",
            "image": image,
            "resources": to_value(&head_resources, "head resources")?,
            "ports": [
                {"name": "gcs", "containerPort": 6379},
                {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                {"name": "client", "containerPort": CLIENT_PORT},
            ],
        }],
    });
    if !head.node_selector.is_empty() {
        head_pod["nodeSelector"] = json!(head.node_selector);
    }
    if !head.tolerated_taints.is_empty() {
        let tolerations: Vec<Value> = head
            .tolerated_taints
            .iter()
            .map(|key| json!({"key": key, "operator": "Exists"}))
            .collect();
        head_pod["tolerations"] = json!(tolerations);
    }

    let overrides = ray.worker.clone().unwrap_or_default();
    let mut sorted: Vec<&GpuLease> = leases.to_vec();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let worker_groups = sorted
        .iter()
        .map(|lease| {
            let mut start_params: BTreeMap<String, String> = overrides.ray_start_params.clone();
            start_params.insert("num-gpus".into(), cluster.spec.gpus_per_worker.to_string());
            let mut resources = with_gpus(
                overrides.resources.clone().unwrap_or_default(),
                cluster.spec.gpus_per_worker,
            );
            if let Some(leased) = lease.spec.worker_resources {
                resources = with_host_resources(resources, leased);
                start_params.extend(ray_host_params(leased));
            }
            Ok(json!({
                "groupName": worker_group_name(lease),
                "replicas": lease.spec.workers,
                "minReplicas": lease.spec.workers,
                "maxReplicas": lease.spec.workers,
                "rayStartParams": start_params,
                "template": {
                    "metadata": {
                        "labels": {CLUSTER_LABEL: name},
                        "annotations": {LEASE_ANNOTATION: lease.metadata.name},
                    },
                    "spec": {
                        "automountServiceAccountToken": false,
                        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{
                                "key": "kubernetes.io/hostname",
                                "operator": "In",
                                "values": [lease.spec.offer],
                            }]}],
                        }}},
                        "tolerations": [supplier_toleration()],
                        "initContainers": [version_check(&image, &ray.version, &resources)?],
                        "containers": [{
                            "name": "ray-worker",
                            "image": image,
                            "resources": to_value(&resources, "worker resources")?,
                            "env": to_value(&overrides.env, "worker env")?,
                        }],
                    },
                },
            }))
        })
        .collect::<Result<Vec<Value>>>()?;

    Ok(json!({
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": name,
            "namespace": cluster.metadata.namespace,
            "labels": {CLUSTER_LABEL: name},
            "ownerReferences": [to_value(&owner, "owner reference")?],
        },
        "spec": {
            "rayVersion": ray.version,
            "headGroupSpec": {
                "rayStartParams": {
                    "dashboard-host": "0.0.0.0",
                    "num-gpus": "0",
                },
                "template": {
                    "metadata": {"labels": {CLUSTER_LABEL: name}},
                    "spec": head_pod,
                },
            },
            "workerGroupSpecs": worker_groups,
        },
    }))
}

/// Whether KubeRay reports the RayCluster ready: `status.state: ready`, or (the newer API) both
/// `HeadPodReady` and `RayClusterProvisioned` conditions true.
pub fn is_ready(ray_cluster: &Value) -> bool {
    let status = &ray_cluster["status"];
    if status["state"].as_str() == Some("ready") {
        return true;
    }
    let condition_true = |type_: &str| {
        status["conditions"].as_array().is_some_and(|conds| {
            conds
                .iter()
                .any(|c| c["type"].as_str() == Some(type_) && c["status"].as_str() == Some("True"))
        })
    };
    condition_true("HeadPodReady") && condition_true("RayClusterProvisioned")
}

/// The [`VERSION_CHECK`] init container of a pod whose Ray container has `resources`: the same
/// CPU and memory (the pod's QoS class stays), never a GPU.
fn version_check(image: &str, version: &str, resources: &ResourceRequirements) -> Result<Value> {
    let resources = with_gpus(resources.clone(), 0);
    Ok(json!({
        "name": VERSION_CHECK,
        "image": image,
        "command": ["python", "-c", VERSION_CHECK_SCRIPT, version],
        "resources": to_value(&resources, "version check resources")?,
        // The script's exit message becomes the container's termination message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }))
}

fn supplier_toleration() -> Value {
    json!({"key": SUPPLIER_TAINT, "operator": "Exists", "effect": "NoSchedule"})
}

fn default_head_resources() -> ResourceRequirements {
    let quantities = BTreeMap::from([
        ("cpu".to_string(), Quantity("1".into())),
        ("memory".to_string(), Quantity("2Gi".into())),
    ]);
    ResourceRequirements {
        requests: Some(quantities.clone()),
        limits: Some(quantities),
        ..Default::default()
    }
}

/// `resources` with `nvidia.com/gpu` requested and limited to `gpus` (removed when 0): the GPU
/// count always comes from the spec, whatever the overrides say.
fn with_gpus(mut resources: ResourceRequirements, gpus: u32) -> ResourceRequirements {
    for list in [&mut resources.requests, &mut resources.limits] {
        let map = list.get_or_insert_with(BTreeMap::new);
        if gpus == 0 {
            map.remove(GPU_RESOURCE);
        } else {
            map.insert(GPU_RESOURCE.into(), Quantity(gpus.to_string()));
        }
    }
    resources
}

/// `resources` with CPU and memory requested and limited to what the lease gives each worker:
/// requests equal to limits (with the GPUs) make the pod Guaranteed, and the lease's share is
/// all it may use on the supplier's node, whatever the overrides say.
fn with_host_resources(
    mut resources: ResourceRequirements,
    leased: HostResources,
) -> ResourceRequirements {
    let cpu = Quantity(format!("{}m", leased.cpu_millicores));
    let memory = Quantity(leased.memory_bytes.to_string());
    for list in [&mut resources.requests, &mut resources.limits] {
        let map = list.get_or_insert_with(BTreeMap::new);
        map.insert("cpu".into(), cpu.clone());
        map.insert("memory".into(), memory.clone());
    }
    resources
}

/// What Ray is told the worker has, so that it schedules tasks within the pod's limits: whole
/// cores (at least one, or Ray would schedule no task at all) and the memory in bytes.
fn ray_host_params(leased: HostResources) -> [(String, String); 2] {
    [
        ("num-cpus".into(), (leased.cpu_millicores / 1000).max(1).to_string()),
        ("memory".into(), leased.memory_bytes.to_string()),
    ]
}

fn to_value<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Value> {
    serde_json::to_value(value).map_err(|source| Error::Serialize { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease};

    #[test]
    fn workers_are_pinned_to_their_lease_nodes_with_gpu_requests() {
        let cluster = mk_cluster("train", 3, 2);
        let a = mk_lease(&cluster, "node-a", &["g1", "g2", "g3", "g4"], 2);
        let b = mk_lease(&cluster, "node-b", &["g9", "g8"], 1);
        let rc = build_ray_cluster(&cluster, &[&b, &a], &HeadPlacement::default()).expect("builds");

        let groups = rc["spec"]["workerGroupSpecs"].as_array().expect("groups");
        assert_eq!(groups.len(), 2);
        let nodes: Vec<&str> = groups
            .iter()
            .map(|g| {
                g["template"]["spec"]["affinity"]["nodeAffinity"]
                    ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                    ["matchExpressions"][0]["values"][0]
                    .as_str()
                    .expect("node")
            })
            .collect();
        let mut sorted_nodes = nodes.clone();
        sorted_nodes.sort();
        assert_eq!(sorted_nodes, ["node-a", "node-b"]);
        for g in groups {
            let replicas = g["replicas"].as_u64().expect("replicas");
            let node = g["template"]["spec"]["affinity"]["nodeAffinity"]
                ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                ["matchExpressions"][0]["values"][0]
                .as_str();
            assert_eq!(replicas, if node == Some("node-a") { 2 } else { 1 });
            assert_eq!(g["rayStartParams"]["num-gpus"], "2");
            let res = &g["template"]["spec"]["containers"][0]["resources"];
            assert_eq!(res["limits"][GPU_RESOURCE], "2");
            assert_eq!(g["template"]["spec"]["tolerations"][0]["key"], SUPPLIER_TAINT);
            assert!(g["groupName"].as_str().expect("name").len() <= 63);
        }
        assert_eq!(rc["metadata"]["ownerReferences"][0]["kind"], "GpuCluster");
        assert_eq!(rc["metadata"]["ownerReferences"][0]["controller"], true);
    }

    /// Every Ray pod first checks that the image's Ray is the spec's, with its container's CPU
    /// and memory (the pod's QoS class stays) and never a GPU; the version is an argument.
    #[test]
    fn every_pod_checks_the_images_ray_version_first_without_a_gpu() {
        let mut cluster = mk_cluster("train", 1, 2);
        cluster.spec.ray.version = "2.9.3".into();
        let lease = mk_lease(&cluster, "node-a", &["g1", "g2"], 1);
        let rc = build_ray_cluster(&cluster, &[&lease], &HeadPlacement::default()).expect("builds");
        let head = &rc["spec"]["headGroupSpec"]["template"]["spec"];
        let worker = &rc["spec"]["workerGroupSpecs"][0]["template"]["spec"];
        for pod in [head, worker] {
            let check = &pod["initContainers"][0];
            assert_eq!(check["name"], VERSION_CHECK);
            assert_eq!(check["image"], pod["containers"][0]["image"]);
            assert_eq!(check["command"][3], "2.9.3");
            let mut main = pod["containers"][0]["resources"].clone();
            for list in ["requests", "limits"] {
                if let Some(map) = main[list].as_object_mut() {
                    map.remove(GPU_RESOURCE);
                }
            }
            assert_eq!(check["resources"], main, "{pod}");
        }
        assert_eq!(worker["containers"][0]["resources"]["limits"][GPU_RESOURCE], "2");
    }

    /// The operator's placement goes to the head only: workers stay pinned to their leases.
    #[test]
    fn head_goes_where_the_operator_places_it() {
        let cluster = mk_cluster("train", 1, 1);
        let lease = mk_lease(&cluster, "node-a", &["g1"], 1);
        let placement = HeadPlacement {
            node_selector: BTreeMap::from([("pool".into(), "heads".into())]),
            tolerated_taints: vec![SUPPLIER_TAINT.into()],
        };
        let rc = build_ray_cluster(&cluster, &[&lease], &placement).expect("builds");
        let head = &rc["spec"]["headGroupSpec"]["template"]["spec"];
        assert_eq!(head["nodeSelector"], json!({"pool": "heads"}));
        assert_eq!(head["tolerations"], json!([{"key": SUPPLIER_TAINT, "operator": "Exists"}]));
        let worker = &rc["spec"]["workerGroupSpecs"][0]["template"]["spec"];
        assert!(worker.get("nodeSelector").is_none());
        assert_eq!(worker["tolerations"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn head_is_cpu_only_off_market_nodes_and_no_pod_gets_a_token() {
        let mut cluster = mk_cluster("train", 1, 1);
        let rc = build_ray_cluster(&cluster, &[], &HeadPlacement::default()).expect("builds");
        let head = &rc["spec"]["headGroupSpec"]["template"]["spec"];
        assert!(head["containers"][0]["resources"]["limits"].get(GPU_RESOURCE).is_none());
        assert!(head.get("tolerations").is_none());
        assert_eq!(head["containers"][0]["image"], "rayproject/ray:2.41.0-gpu");
        assert_eq!(rc["spec"]["rayVersion"], "2.41.0");

        // Even a head asking for GPUs (the schema refuses it) gets none and no supplier node.
        cluster.spec.ray.head_gpus = 1;
        cluster.spec.ray.image = Some("my/ray:custom".into());
        let lease = mk_lease(&cluster, "node-a", &["g1"], 1);
        let rc = build_ray_cluster(&cluster, &[&lease], &HeadPlacement::default()).expect("builds");
        let head = &rc["spec"]["headGroupSpec"]["template"]["spec"];
        assert!(head["containers"][0]["resources"]["limits"].get(GPU_RESOURCE).is_none());
        assert!(head.get("tolerations").is_none());
        assert_eq!(head["containers"][0]["image"], "my/ray:custom");
        assert_eq!(rc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"], "0");
        let worker = &rc["spec"]["workerGroupSpecs"][0]["template"]["spec"];
        for pod in [head, worker] {
            assert_eq!(pod["automountServiceAccountToken"], false);
        }
    }

    #[test]
    fn worker_overrides_apply_but_cannot_change_the_gpu_count() {
        let mut cluster = mk_cluster("train", 1, 4);
        cluster.spec.ray.worker = Some(gpumarket_crds::WorkerOverrides {
            resources: Some(ResourceRequirements {
                limits: Some(BTreeMap::from([
                    ("cpu".into(), Quantity("8".into())),
                    (GPU_RESOURCE.into(), Quantity("1".into())),
                ])),
                ..Default::default()
            }),
            env: vec![k8s_openapi::api::core::v1::EnvVar {
                name: "NCCL_DEBUG".into(),
                value: Some("INFO".into()),
                ..Default::default()
            }],
            ray_start_params: BTreeMap::from([
                ("object-store-memory".into(), "1000".into()),
                ("num-gpus".into(), "1".into()),
            ]),
        });
        let lease = mk_lease(&cluster, "node-a", &["g1", "g2", "g3", "g4"], 1);
        let rc = build_ray_cluster(&cluster, &[&lease], &HeadPlacement::default()).expect("builds");
        let group = &rc["spec"]["workerGroupSpecs"][0];
        let container = &group["template"]["spec"]["containers"][0];
        assert_eq!(container["resources"]["limits"]["cpu"], "8");
        assert_eq!(container["resources"]["limits"][GPU_RESOURCE], "4");
        assert_eq!(container["env"][0]["name"], "NCCL_DEBUG");
        assert_eq!(group["rayStartParams"]["object-store-memory"], "1000");
        assert_eq!(group["rayStartParams"]["num-gpus"], "4");
    }

    #[test]
    fn workers_get_the_lease_cpu_and_memory_as_requests_and_limits_and_tell_ray() {
        let mut cluster = mk_cluster("train", 2, 1);
        // The buyer's overrides of CPU, memory and Ray's view of them give way to the lease.
        cluster.spec.ray.worker = Some(gpumarket_crds::WorkerOverrides {
            resources: Some(ResourceRequirements {
                limits: Some(BTreeMap::from([
                    ("cpu".into(), Quantity("64".into())),
                    ("ephemeral-storage".into(), Quantity("10Gi".into())),
                ])),
                ..Default::default()
            }),
            ray_start_params: BTreeMap::from([
                ("num-cpus".into(), "64".into()),
                ("object-store-memory".into(), "1000".into()),
            ]),
            ..Default::default()
        });
        let mut lease = mk_lease(&cluster, "node-a", &["g1", "g2"], 2);
        lease.spec.worker_resources =
            Some(HostResources { cpu_millicores: 12_500, memory_bytes: 68_719_476_736 });
        let mut small = mk_lease(&cluster, "node-b", &["g9"], 1);
        small.spec.worker_resources = Some(HostResources { cpu_millicores: 500, memory_bytes: 1 });
        let rc = build_ray_cluster(&cluster, &[&lease, &small], &HeadPlacement::default())
            .expect("builds");

        let group = |node: &str| {
            rc["spec"]["workerGroupSpecs"]
                .as_array()
                .and_then(|groups| {
                    groups
                        .iter()
                        .find(|g| g["groupName"].as_str().is_some_and(|n| n.starts_with(node)))
                })
                .expect("a group per lease")
        };
        let a = group("node-a");
        let res = &a["template"]["spec"]["containers"][0]["resources"];
        for list in ["requests", "limits"] {
            // Requests equal to limits for CPU, memory and GPUs: Guaranteed QoS.
            assert_eq!(res[list]["cpu"], "12500m", "{res}");
            assert_eq!(res[list]["memory"], "68719476736", "{res}");
            assert_eq!(res[list][GPU_RESOURCE], "1", "{res}");
        }
        assert_eq!(res["limits"]["ephemeral-storage"], "10Gi", "other overrides stay");
        assert_eq!(a["rayStartParams"]["num-cpus"], "12", "whole cores");
        assert_eq!(a["rayStartParams"]["memory"], "68719476736");
        assert_eq!(a["rayStartParams"]["object-store-memory"], "1000");
        // Less than a core is still one CPU to Ray, or it would schedule nothing there.
        assert_eq!(group("node-b")["rayStartParams"]["num-cpus"], "1");
    }

    #[test]
    fn a_lease_without_cpu_or_memory_leaves_the_worker_as_the_buyer_wrote_it() {
        let cluster = mk_cluster("train", 1, 1);
        let lease = mk_lease(&cluster, "node-a", &["g1"], 1);
        let rc = build_ray_cluster(&cluster, &[&lease], &HeadPlacement::default()).expect("builds");
        let group = &rc["spec"]["workerGroupSpecs"][0];
        let res = &group["template"]["spec"]["containers"][0]["resources"];
        assert_eq!(res["limits"], json!({GPU_RESOURCE: "1"}));
        assert_eq!(group["rayStartParams"], json!({"num-gpus": "1"}));
    }

    #[test]
    fn output_does_not_depend_on_lease_order() {
        let cluster = mk_cluster("train", 2, 1);
        let a = mk_lease(&cluster, "node-a", &["g1"], 1);
        let b = mk_lease(&cluster, "node-b", &["g2"], 1);
        assert_eq!(
            build_ray_cluster(&cluster, &[&a, &b], &HeadPlacement::default()).ok(),
            build_ray_cluster(&cluster, &[&b, &a], &HeadPlacement::default()).ok()
        );
    }

    #[test]
    fn readiness_reads_state_or_conditions() {
        assert!(is_ready(&json!({"status": {"state": "ready"}})));
        assert!(!is_ready(&json!({"status": {"state": "suspended"}})));
        assert!(!is_ready(&json!({})));
        assert!(is_ready(&json!({"status": {"conditions": [
            {"type": "HeadPodReady", "status": "True"},
            {"type": "RayClusterProvisioned", "status": "True"},
        ]}})));
        assert!(!is_ready(&json!({"status": {"conditions": [
            {"type": "HeadPodReady", "status": "True"},
        ]}})));
    }
}
