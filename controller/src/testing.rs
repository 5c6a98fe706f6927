//! Small builders for unit tests (`mk_*`), so tests read as the situation they set up.

use gpumarket_crds::{
    ClusterRef, GpuCluster, GpuClusterSpec, GpuLease, GpuLeaseSpec, GpuOffer, GpuOfferSpec,
    GpuOfferStatus, GpuSelector, OfferedGpu, Payment,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ObjectMeta;

pub fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("valid")
}

pub fn mk_cluster(name: &str, workers: u32, gpus_per_worker: u32) -> GpuCluster {
    let mut cluster = GpuCluster::new(
        name,
        GpuClusterSpec {
            gpu: GpuSelector {
                models: Some(vec!["H100".into()]),
                min_tier: None,
                min_memory_mib: 0,
            },
            workers,
            gpus_per_worker,
            duration: "1h".into(),
            max_price_per_gpu_hour: 10_000_000,
            location: None,
            min_reputation: 0,
            placement: Default::default(),
            per_worker: None,
            ray: Default::default(),
            payment: Payment {
                buyer_wallet: "11111111111111111111111111111111".into(),
                mint: None,
            },
        },
    );
    cluster.metadata.namespace = Some("ns".into());
    cluster.metadata.uid = Some(format!("{name}-0000-uid"));
    cluster
}

pub fn mk_lease(cluster: &GpuCluster, node: &str, gpus: &[&str], workers: u32) -> GpuLease {
    let gpus: Vec<String> = gpus.iter().map(|g| g.to_string()).collect();
    GpuLease {
        metadata: ObjectMeta {
            name: Some(crate::market::binding::lease_name(cluster, node, &gpus, now())),
            ..Default::default()
        },
        spec: GpuLeaseSpec {
            cluster: ClusterRef {
                namespace: "ns".into(),
                name: cluster.metadata.name.clone().unwrap_or_default(),
                uid: cluster.metadata.uid.clone().unwrap_or_default(),
            },
            offer: node.into(),
            supplier_wallet: "11111111111111111111111111111111".into(),
            gpus,
            workers,
            price_per_gpu_hour: 1_000_000,
            worker_resources: None,
            start_time: Time(now()),
            terms: None,
        },
        status: None,
    }
}

/// An offer of `count` GPUs named `<node>-gpu-<i>`, heartbeating at `heartbeat`.
pub fn mk_offer(node: &str, model: &str, count: usize, heartbeat: Timestamp) -> GpuOffer {
    GpuOffer {
        metadata: ObjectMeta { name: Some(node.into()), ..Default::default() },
        spec: GpuOfferSpec {
            node_name: node.into(),
            wallet: "11111111111111111111111111111111".into(),
            gpus: (0..count)
                .map(|i| OfferedGpu {
                    uuid: format!("{node}-gpu-{i}"),
                    model: model.into(),
                    memory_mib: 81_920,
                })
                .collect(),
            price_per_gpu_hour: 1_000_000,
            region: "eu-west".into(),
            zone: Some("eu-west-1a".into()),
            interconnect: Default::default(),
            driver_version: None,
            cuda_version: None,
            mode: Default::default(),
            allocatable: None,
            signed_at: None,
            signature: None,
        },
        status: Some(GpuOfferStatus {
            last_heartbeat: Some(Time(heartbeat)),
            ..Default::default()
        }),
    }
}

/// A worker pod of `lease` as KubeRay makes it: owned by the RayCluster, annotated with the
/// lease, bound to the lease's node, created at `created` seconds, Ready since `ready` seconds.
pub fn mk_worker_pod(
    lease: &GpuLease,
    name: &str,
    created: i64,
    ready: Option<i64>,
) -> k8s_openapi::api::core::v1::Pod {
    let at = |s: i64| Time(now() + jiff::SignedDuration::from_secs(s));
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": lease.spec.cluster.namespace,
            "uid": format!("{name}-uid"),
            "creationTimestamp": at(created),
            "labels": {crate::raycluster::CLUSTER_LABEL: lease.spec.cluster.name},
            "annotations": {crate::raycluster::LEASE_ANNOTATION: lease.metadata.name},
            "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayCluster",
                "name": lease.spec.cluster.name, "uid": "rc-uid", "controller": true}],
        },
        "spec": {"nodeName": lease.spec.offer, "containers": []},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready.is_some() { "True" } else { "False" },
                "lastTransitionTime": at(ready.unwrap_or(created))}],
        },
    }))
    .expect("a valid pod")
}
