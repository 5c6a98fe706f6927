//! The validate step of the GpuCluster reconcile: pure checks of what the schema cannot check
//! (a buyer wallet must decode to 32 bytes; CEL has no base-58), and of what it checks only
//! for objects written after its rules were installed (the API server keeps an object stored
//! under older rules as it is). Meant to run before any GPU is leased: an error here is shown
//! as a status condition and nothing is bound.

use gpumarket_crds::GpuCluster;
use gpumarket_crds::common::{
    MAX_CPU_MILLICORES, MAX_GPU_MEMORY_MIB, MAX_MEMORY_MIB, MAX_PRICE_PER_GPU_HOUR,
    MAX_RAY_CLUSTER_NAME_LENGTH, is_valid_env_name, is_valid_quantity, is_valid_ray_cluster_name,
    is_valid_wallet,
};
use k8s_openapi::api::core::v1::ResourceRequirements;

/// Longest and shortest duration a cluster may run.
const DURATIONS: std::ops::RangeInclusive<u64> = 600..=2160 * 3600;

/// Whether the cluster can be served as written; the error names the field and says what to
/// change.
pub fn validate(cluster: &GpuCluster) -> Result<(), String> {
    let spec = &cluster.spec;
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    if !is_valid_ray_cluster_name(name) {
        return Err(format!(
            "metadata.name {name:?} is also the name of the cluster's RayCluster, which KubeRay \
             accepts only as a DNS-1035 label of at most {MAX_RAY_CLUSTER_NAME_LENGTH} \
             characters: apply the cluster again under a name of lower-case letters, digits \
             and '-' that starts with a letter and has no dots"
        ));
    }
    let wallet = &spec.payment.buyer_wallet;
    if !is_valid_wallet(wallet) {
        return Err(format!(
            "spec.payment.buyerWallet {wallet:?} is not a Solana public key (it does not decode \
             to 32 bytes): copy the wallet address again, e.g. from `solana address`"
        ));
    }
    if !(1..=1024).contains(&spec.workers) {
        return Err("spec.workers must be between 1 and 1024".into());
    }
    if !(1..=16).contains(&spec.gpus_per_worker) {
        return Err("spec.gpusPerWorker must be between 1 and 16 (all of a worker's GPUs sit on \
                    one node)"
            .into());
    }
    match spec.duration() {
        Ok(d) if DURATIONS.contains(&d.as_secs()) => {}
        Ok(_) => {
            return Err("spec.duration must be between 10m and 2160h (90 days)".into());
        }
        Err(e) => return Err(format!("spec.duration: {e}")),
    }
    if !(1..=MAX_PRICE_PER_GPU_HOUR).contains(&spec.max_price_per_gpu_hour) {
        return Err(format!(
            "spec.maxPricePerGpuHour must be greater than 0 and at most {MAX_PRICE_PER_GPU_HOUR} \
             base units of the settlement mint per GPU-hour"
        ));
    }
    if spec.gpu.min_memory_mib > MAX_GPU_MEMORY_MIB {
        return Err(format!(
            "spec.gpu.minMemoryMib is in MiB and at most {MAX_GPU_MEMORY_MIB} (1 TiB), e.g. 81920 \
             for 80 GiB GPUs"
        ));
    }
    let per_worker = spec.per_worker.unwrap_or_default();
    if per_worker.cpu_millicores.is_some_and(|cpu| !(1..=MAX_CPU_MILLICORES).contains(&cpu)) {
        return Err(format!(
            "spec.perWorker.cpuMillicores must be between 1 and {MAX_CPU_MILLICORES} (4096 \
             cores): CPU per worker in millicores, e.g. 8000 for 8 cores"
        ));
    }
    if per_worker.memory_mib.is_some_and(|mib| !(1..=MAX_MEMORY_MIB).contains(&mib)) {
        return Err(format!(
            "spec.perWorker.memoryMib must be between 1 and {MAX_MEMORY_MIB} (64 TiB): memory \
             per worker in MiB, e.g. 65536 for 64 GiB"
        ));
    }
    let ray = &spec.ray;
    if ray.head_gpus != 0 {
        return Err("spec.ray.headGpus must be 0: the Ray head runs on CPU, and GPUs on market \
                    nodes are leased to workers only; put GPU work on the workers"
            .into());
    }
    check_quantities("spec.ray.headResources", ray.head_resources.as_ref())?;
    if let Some(worker) = &ray.worker {
        check_quantities("spec.ray.worker.resources", worker.resources.as_ref())?;
        for env in &worker.env {
            if !is_valid_env_name(&env.name) {
                return Err(format!(
                    "spec.ray.worker.env name {:?} is not a valid environment variable name: use \
                     letters, digits, '_', '-' and '.', not starting with a digit",
                    env.name
                ));
            }
            if env.value_from.as_ref().is_some_and(|v| v.secret_key_ref.is_some()) {
                return Err(format!(
                    "spec.ray.worker.env {:?} uses valueFrom.secretKeyRef: workers run on \
                     supplier machines whose owner has root and could read the secret; pass only \
                     what you accept sharing with the supplier as a plain value",
                    env.name
                ));
            }
        }
    }
    Ok(())
}

/// Every limit and request is a quantity that is not negative.
fn check_quantities(field: &str, resources: Option<&ResourceRequirements>) -> Result<(), String> {
    let Some(resources) = resources else { return Ok(()) };
    for (list, map) in [("limits", &resources.limits), ("requests", &resources.requests)] {
        for (resource, quantity) in map.iter().flatten() {
            if !is_valid_quantity(&quantity.0) {
                return Err(format!(
                    "{field}.{list}.{resource} is {:?}, not a Kubernetes quantity: write a \
                     non-negative amount such as 500m, 4 or 16Gi",
                    quantity.0
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::mk_cluster;
    use gpumarket_crds::{PerWorker, WorkerOverrides};
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn refusal(cluster: &GpuCluster) -> String {
        match validate(cluster) {
            Err(message) => message,
            Ok(()) => panic!("expected {:?} to be refused", cluster.spec),
        }
    }

    fn with_worker(mut cluster: GpuCluster, worker: WorkerOverrides) -> GpuCluster {
        cluster.spec.ray.worker = Some(worker);
        cluster
    }

    fn env(name: &str) -> EnvVar {
        EnvVar { name: name.into(), value: Some("1".into()), ..EnvVar::default() }
    }

    #[test]
    fn a_well_formed_cluster_is_valid() {
        let cluster = with_worker(
            mk_cluster("llm-finetune", 2, 4),
            WorkerOverrides {
                env: vec![env("NCCL_DEBUG")],
                resources: Some(ResourceRequirements {
                    limits: Some([("cpu".into(), Quantity("8".into()))].into()),
                    requests: Some([("memory".into(), Quantity("16Gi".into()))].into()),
                    ..ResourceRequirements::default()
                }),
                ..WorkerOverrides::default()
            },
        );
        assert_eq!(validate(&cluster), Ok(()));
    }

    #[test]
    fn a_wallet_that_does_not_decode_to_32_bytes_is_refused() {
        let mut cluster = mk_cluster("c", 1, 1);
        // Passes the schema's character pattern, but is 33 bytes once decoded.
        cluster.spec.payment.buyer_wallet = "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz".into();
        let message = refusal(&cluster);
        assert!(message.starts_with("spec.payment.buyerWallet"), "{message}");
        assert!(message.contains("32 bytes"), "{message}");
    }

    #[test]
    fn names_kuberay_refuses_are_refused() {
        for name in ["llm.finetune", &"a".repeat(54), "1llm"] {
            let message = refusal(&mk_cluster(name, 1, 1));
            assert!(message.starts_with("metadata.name"), "{message}");
        }
        assert_eq!(validate(&mk_cluster(&"a".repeat(53), 1, 1)), Ok(()));
    }

    #[test]
    fn numbers_out_of_range_are_refused() {
        let mut cluster = mk_cluster("c", 1, 1);
        cluster.spec.max_price_per_gpu_hour = i64::MAX as u64;
        assert!(refusal(&cluster).starts_with("spec.maxPricePerGpuHour"));

        let mut cluster = mk_cluster("c", 1, 1);
        cluster.spec.gpu.min_memory_mib = MAX_GPU_MEMORY_MIB + 1;
        assert!(refusal(&cluster).starts_with("spec.gpu.minMemoryMib"));

        assert!(refusal(&mk_cluster("c", 1025, 1)).starts_with("spec.workers"));
        assert!(refusal(&mk_cluster("c", 1, 17)).starts_with("spec.gpusPerWorker"));

        for (cpu_millicores, memory_mib, field) in [
            (Some(0), None, "spec.perWorker.cpuMillicores"),
            (Some(MAX_CPU_MILLICORES + 1), None, "spec.perWorker.cpuMillicores"),
            (None, Some(MAX_MEMORY_MIB + 1), "spec.perWorker.memoryMib"),
        ] {
            let mut cluster = mk_cluster("c", 1, 1);
            cluster.spec.per_worker = Some(PerWorker { cpu_millicores, memory_mib });
            assert!(refusal(&cluster).starts_with(field), "{field}");
        }
        let mut cluster = mk_cluster("c", 1, 1);
        cluster.spec.per_worker = Some(PerWorker {
            cpu_millicores: Some(MAX_CPU_MILLICORES),
            memory_mib: Some(MAX_MEMORY_MIB),
        });
        assert_eq!(validate(&cluster), Ok(()));

        let mut cluster = mk_cluster("c", 1, 1);
        cluster.spec.duration = "2161h".into();
        assert!(refusal(&cluster).starts_with("spec.duration"));
        cluster.spec.duration = "2d".into();
        assert!(refusal(&cluster).starts_with("spec.duration"));
    }

    #[test]
    fn gpu_heads_are_refused() {
        let mut cluster = mk_cluster("c", 1, 1);
        cluster.spec.ray.head_gpus = 1;
        let message = refusal(&cluster);
        assert!(message.starts_with("spec.ray.headGpus must be 0"), "{message}");
        assert!(message.contains("put GPU work on the workers"), "{message}");
    }

    #[test]
    fn bad_env_names_and_secret_references_are_refused() {
        let cluster = with_worker(
            mk_cluster("c", 1, 1),
            WorkerOverrides { env: vec![env("9LIVES")], ..WorkerOverrides::default() },
        );
        assert!(refusal(&cluster).contains("\"9LIVES\" is not a valid environment variable"));

        let secret = EnvVar {
            name: "TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "creds".into(),
                    key: "token".into(),
                    optional: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        };
        let cluster = with_worker(
            mk_cluster("c", 1, 1),
            WorkerOverrides { env: vec![secret], ..WorkerOverrides::default() },
        );
        let message = refusal(&cluster);
        assert!(message.contains("secretKeyRef"), "{message}");
        assert!(message.contains("owner has root"), "{message}");
    }

    #[test]
    fn bad_quantities_are_refused() {
        for (bad, field) in [("2Gx", "spec.ray.headResources"), ("-1", "spec.ray.headResources")] {
            let mut cluster = mk_cluster("c", 1, 1);
            cluster.spec.ray.head_resources = Some(ResourceRequirements {
                requests: Some([("memory".into(), Quantity(bad.into()))].into()),
                ..ResourceRequirements::default()
            });
            let message = refusal(&cluster);
            assert!(message.starts_with(&format!("{field}.requests.memory")), "{message}");
        }
        let cluster = with_worker(
            mk_cluster("c", 1, 1),
            WorkerOverrides {
                resources: Some(ResourceRequirements {
                    limits: Some([("cpu".into(), Quantity("lots".into()))].into()),
                    ..ResourceRequirements::default()
                }),
                ..WorkerOverrides::default()
            },
        );
        assert!(refusal(&cluster).starts_with("spec.ray.worker.resources.limits.cpu"));
    }
}
