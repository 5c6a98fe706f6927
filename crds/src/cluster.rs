//! `GpuCluster`: a buyer's request for a Ray cluster on marketplace GPUs.

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{GpuTier, Placement, parse_duration};

/// A buyer's request: a gang of GPUs matching the selector, run as a KubeRay RayCluster for the
/// given duration, paid from the buyer's escrow. The fields the match depends on are immutable
/// once the request has been matched.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpumarket.io",
    version = "v1alpha1",
    kind = "GpuCluster",
    namespaced,
    status = "GpuClusterStatus",
    shortname = "gpuc",
    category = "gpumarket",
    doc = "A buyer's request for a Ray cluster on marketplace GPUs",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Workers", type_ = "integer", json_path = ".spec.workers"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.gpus"),
    printcolumn(
        name = "Rate/h",
        type_ = "integer",
        description = "what the whole cluster costs per hour, in base units of the settlement mint",
        json_path = ".status.hourlyRate"
    ),
    printcolumn(
        name = "Cost",
        type_ = "integer",
        description = "cost accrued so far, in base units of the settlement mint",
        json_path = ".status.costAccrued"
    ),
    printcolumn(name = "Dashboard", type_ = "string", priority = 1, json_path = ".status.dashboard"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // On create only (a name never changes): an object stored before this rule keeps its
    // status writable.
    validation = Rule::new("oldSelf.hasValue() || size(self.metadata.name) <= 53").optional_old_self(true).message("metadata.name of a GpuCluster is also the name of its RayCluster, which KubeRay limits to 53 characters: rename the GpuCluster to 53 characters or fewer"),
    validation = Rule::new("oldSelf.hasValue() || self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").optional_old_self(true).message("metadata.name of a GpuCluster is also the name of its RayCluster, which must be a DNS-1035 label: rename it to lower-case letters, digits and '-', starting with a letter and without dots (e.g. llm-finetune, not llm.finetune)"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.gpu == oldSelf.spec.gpu").message("spec.gpu cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.workers == oldSelf.spec.workers").message("spec.workers cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.gpusPerWorker == oldSelf.spec.gpusPerWorker").message("spec.gpusPerWorker cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.maxPricePerGpuHour == oldSelf.spec.maxPricePerGpuHour").message("spec.maxPricePerGpuHour cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.duration == oldSelf.spec.duration").message("spec.duration cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || (has(self.spec.location) == has(oldSelf.spec.location) && (!has(self.spec.location) || self.spec.location == oldSelf.spec.location))").message("spec.location cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.minReputation == oldSelf.spec.minReputation").message("spec.minReputation cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.placement == oldSelf.spec.placement").message("spec.placement cannot change once the cluster is matched (GPUs are leased for it): to change it, delete the GpuCluster and apply a new one; spec.ray may still change"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || (has(self.spec.perWorker) == has(oldSelf.spec.perWorker) && (!has(self.spec.perWorker) || self.spec.perWorker == oldSelf.spec.perWorker))").message("spec.perWorker cannot change once the cluster is matched (CPU and memory are leased with the GPUs): to change it, delete the GpuCluster and apply a new one; spec.ray may still change")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuClusterSpec {
    /// Which GPUs qualify.
    pub gpu: GpuSelector,

    /// Number of Ray workers; each gets `gpusPerWorker` GPUs on one node.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1024").message("spec.workers must be between 1 and 1024"))]
    pub workers: u32,

    /// GPUs per worker (all on the same node), 1–16.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("spec.gpusPerWorker must be between 1 and 16 (all of a worker's GPUs sit on one node)"))]
    pub gpus_per_worker: u32,

    /// How long the cluster runs once it is provisioned, e.g. `2h`, `90m`, `720h`; 10m to 90 days.
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$') && duration(self) >= duration('10m') && duration(self) <= duration('2160h')").message("spec.duration must be between 10m and 2160h (90 days), written like 90m, 2h30m or 720h"))]
    #[schemars(length(max = 32))]
    pub duration: String,

    /// Highest price per GPU-hour the buyer accepts, in base units of the settlement mint.
    #[x_kube(validation = Rule::new("self > 0 && self <= 100000000000").message("spec.maxPricePerGpuHour must be greater than 0 and at most 100000000000 base units of the settlement mint per GPU-hour (100000 tokens of 6 decimals)"))]
    pub max_price_per_gpu_hour: u64,

    /// Where the GPUs must be; anywhere when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<LocationConstraint>,

    /// Lowest supplier reputation score accepted, 0–1000 (0 accepts every supplier).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000").message("spec.minReputation is a score from 0 to 1000"))]
    pub min_reputation: u32,

    /// Pack workers on few nodes, or spread them over many.
    #[serde(default)]
    pub placement: Placement,

    /// CPU and memory each worker needs. Each worker gets the share of its node's CPU and
    /// memory that comes with its GPUs (node allocatable × its GPUs / the node's GPUs); a part
    /// set here is what the worker gets instead, and only nodes whose share holds it qualify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_worker: Option<PerWorker>,

    /// Ray version, image and pod settings.
    #[serde(default)]
    pub ray: RaySettings,

    /// Who pays, and how much they deposit into escrow.
    pub payment: Payment,
}

/// Which GPUs qualify: explicit models, or a minimum tier of the hierarchy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.models) != has(self.minTier)").message("set exactly one of spec.gpu.models (e.g. [H100, A100]) or spec.gpu.minTier (e.g. A100)"))]
pub struct GpuSelector {
    /// Accepted models, e.g. `[H100, A100]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) > 0 && size(self) <= 16 && self.all(m, m.matches('^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'))").message("spec.gpu.models must list 1 to 16 model names such as H100 or RTX4090"))]
    #[schemars(length(max = 16), inner(length(max = 63)))]
    pub models: Option<Vec<String>>,

    /// Lowest tier accepted: H100 > A100 > A6000 > RTX4090 > RTX3090 > Other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tier: Option<GpuTier>,

    /// Lowest device memory accepted, in MiB (at most 1 TiB).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self <= 1048576").message("spec.gpu.minMemoryMib is in MiB and at most 1048576 (1 TiB), e.g. 81920 for 80 GiB GPUs"))]
    pub min_memory_mib: u64,
}

impl GpuSelector {
    /// Whether a GPU of this model and memory qualifies.
    pub fn accepts(&self, model: &str, memory_mib: u64) -> bool {
        let model_ok = match (&self.models, self.min_tier) {
            (Some(models), _) => models.iter().any(|m| m.eq_ignore_ascii_case(model)),
            (None, Some(tier)) => GpuTier::of_model(model) >= tier,
            (None, None) => true,
        };
        model_ok && memory_mib >= self.min_memory_mib
    }
}

/// CPU and memory a buyer asks for each worker (requested and limited on the worker pod).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PerWorker {
    /// CPU in millicores (1000 = one core), e.g. `8000`; the node's share when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4096000").message("spec.perWorker.cpuMillicores must be between 1 and 4096000 (4096 cores): CPU per worker in millicores, e.g. 8000 for 8 cores"))]
    pub cpu_millicores: Option<u64>,

    /// Memory in MiB, e.g. `65536` for 64 GiB; the node's share when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 67108864").message("spec.perWorker.memoryMib must be between 1 and 67108864 (64 TiB): memory per worker in MiB, e.g. 65536 for 64 GiB"))]
    pub memory_mib: Option<u64>,
}

/// Region and optionally zone the GPUs must be in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocationConstraint {
    /// Region, e.g. `eu-west`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$')").message("spec.location.region must be lower-case letters, digits and '-', e.g. eu-west"))]
    #[schemars(length(max = 63))]
    pub region: String,

    /// Zone within the region, e.g. `eu-west-1a`; any zone of the region when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$')").message("spec.location.zone must be lower-case letters, digits and '-', e.g. eu-west-1a"))]
    #[schemars(length(max = 63))]
    pub zone: Option<String>,
}

/// Ray settings of the provisioned RayCluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.headResources) || ((!has(self.headResources.limits) || self.headResources.limits.all(k, type(self.headResources.limits[k]) == int ? self.headResources.limits[k] >= 0 : isQuantity(self.headResources.limits[k]) && !quantity(self.headResources.limits[k]).isLessThan(quantity('0')))) && (!has(self.headResources.requests) || self.headResources.requests.all(k, type(self.headResources.requests[k]) == int ? self.headResources.requests[k] >= 0 : isQuantity(self.headResources.requests[k]) && !quantity(self.headResources.requests[k]).isLessThan(quantity('0')))))").message("spec.ray.headResources limits and requests must be Kubernetes quantities that are not negative, such as 500m, 4 or 16Gi"))]
pub struct RaySettings {
    /// Ray version, e.g. `2.41.0`.
    #[serde(default = "default_ray_version")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+[.][0-9]+[.][0-9]+$')").message("spec.ray.version must be a Ray release such as 2.41.0"))]
    #[schemars(length(max = 32))]
    pub version: String,

    /// Container image for head and workers; `rayproject/ray:<version>-gpu` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._/:@-]*$')").message("spec.ray.image must be a container image reference such as rayproject/ray:2.41.0-gpu (letters, digits and . _ / : @ -, at most 512 characters)"))]
    #[schemars(length(max = 512))]
    pub image: Option<String>,

    /// Resources of the head pod (CPU and memory: the head never gets GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::common::bounds::resources)]
    pub head_resources: Option<ResourceRequirements>,

    /// GPUs for the head pod: always 0. The Ray head runs on CPU; GPUs on market nodes are
    /// leased to workers only.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == 0").message("spec.ray.headGpus must be 0: the Ray head runs on CPU, and GPUs on market nodes are leased to workers only (a GPU head would use a supplier's GPUs unleased and unpaid); put GPU work on the workers (spec.workers × spec.gpusPerWorker)"))]
    pub head_gpus: u32,

    /// Overrides for each worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerOverrides>,
}

fn default_ray_version() -> String {
    "2.41.0".into()
}

impl Default for RaySettings {
    fn default() -> Self {
        RaySettings {
            version: default_ray_version(),
            image: None,
            head_resources: None,
            head_gpus: 0,
            worker: None,
        }
    }
}

/// Settings applied to every worker pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.resources) || ((!has(self.resources.limits) || self.resources.limits.all(k, type(self.resources.limits[k]) == int ? self.resources.limits[k] >= 0 : isQuantity(self.resources.limits[k]) && !quantity(self.resources.limits[k]).isLessThan(quantity('0')))) && (!has(self.resources.requests) || self.resources.requests.all(k, type(self.resources.requests[k]) == int ? self.resources.requests[k] >= 0 : isQuantity(self.resources.requests[k]) && !quantity(self.resources.requests[k]).isLessThan(quantity('0')))))").message("spec.ray.worker.resources limits and requests must be Kubernetes quantities that are not negative, such as 500m, 4 or 16Gi"))]
pub struct WorkerOverrides {
    /// Resources of a worker. GPUs are always `gpusPerWorker`; CPU and memory are the lease's
    /// (`spec.perWorker`, else the node's share) wherever the node publishes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::common::bounds::resources)]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables, at most 64. No secret references: workers run on
    /// supplier machines, whose owner has root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), transform = crate::common::bounds::env)]
    #[x_kube(validation = Rule::new("self.all(e, e.name.matches('^[-._a-zA-Z][-._a-zA-Z0-9]*$'))").message("spec.ray.worker.env[].name must be letters, digits, '_', '-' and '.', not starting with a digit (e.g. NCCL_DEBUG)"))]
    #[x_kube(validation = Rule::new("self.all(e, !has(e.valueFrom) || !has(e.valueFrom.secretKeyRef))").message("spec.ray.worker.env cannot use valueFrom.secretKeyRef: workers run on supplier machines whose owner has root and could read the secret; pass only what you accept sharing with the supplier as a plain value (e.g. a short-lived, narrowly scoped token)"))]
    pub env: Vec<EnvVar>,

    /// Extra `ray start` parameters, e.g. `{"object-store-memory": "1000000000"}`; at most 32.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(transform = crate::common::bounds::settings)]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 64 && k.matches('^[a-z][-_a-z0-9]*$'))").message("spec.ray.worker.rayStartParams keys must be ray start options without the leading --, such as object-store-memory or num-cpus"))]
    pub ray_start_params: std::collections::BTreeMap<String, String>,
}

/// Who pays. The deposit itself is whatever the cluster's own escrow account holds (its address
/// is in the `Funded` condition and in `status.escrow`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.mint) == has(oldSelf.mint)").message("spec.payment.mint is immutable (the escrow is an account of that mint): to pay in another mint, delete the GpuCluster and apply a new one"))]
pub struct Payment {
    /// Buyer's Solana wallet (base-58 public key): the refund of the escrow goes to it.
    #[x_kube(validation = Rule::new("self.matches('^[1-9A-HJ-NP-Za-km-z]{32,44}$')").message("spec.payment.buyerWallet must be a base-58 Solana public key (32 to 44 characters, no 0, O, I or l)"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.payment.buyerWallet is immutable"))]
    #[schemars(length(max = 44))]
    pub buyer_wallet: String,
    /// The mint the cluster pays in (base-58): one the market accepts (its own, or a USD
    /// stablecoin it also takes 1:1); the market's own mint when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[1-9A-HJ-NP-Za-km-z]{32,44}$')").message("spec.payment.mint must be a base-58 Solana public key (32 to 44 characters, no 0, O, I or l)"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.payment.mint is immutable (the escrow is an account of that mint): to pay in another mint, delete the GpuCluster and apply a new one"))]
    #[schemars(length(max = 44))]
    pub mint: Option<String>,
}

impl GpuClusterSpec {
    pub fn total_gpus(&self) -> u32 {
        self.workers.saturating_mul(self.gpus_per_worker)
    }

    /// The requested duration; the schema guarantees it parses on objects the API server accepted.
    pub fn duration(&self) -> Result<std::time::Duration, crate::common::DurationError> {
        parse_duration(&self.duration)
    }
}

/// A cluster's escrow: an SPL token account of its own, at an address anyone can derive from
/// the settlement authority and the cluster uid, holding exactly this cluster's deposits.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EscrowStatus {
    /// Address of the escrow token account (base-58); deposits are plain token transfers to it.
    #[schemars(length(max = 44))]
    pub account: String,
    /// Base units it held when settlement last looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<u64>,
    /// The refund, once the cluster has ended: the whole balance back to the buyer and the
    /// account closed, in one transaction. Written before it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<crate::lease::SettlementRecord>,
}

/// Lifecycle of a GpuCluster.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ClusterPhase {
    /// Waiting for supply or for the deposit.
    #[default]
    Pending,
    /// GPUs bound (leases created), RayCluster not created yet.
    Matched,
    /// RayCluster created, not ready yet.
    Provisioning,
    /// RayCluster ready.
    Running,
    /// Duration is up: tearing down and settling.
    Expiring,
    /// Ran its duration and was settled.
    Completed,
    /// Cannot continue (see conditions).
    Failed,
}

/// Observed state of a GpuCluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClusterPhase>,

    /// `Matched`, `Funded`, `RayReady`, `Degraded`, with reasons and messages.
    #[serde(default)]
    #[schemars(transform = crate::common::bounds::conditions)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Names of the cluster's active GpuLeases (at most one per worker).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(max = 253)))]
    pub leases: Vec<String>,

    /// GPUs currently leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 16384))]
    pub gpus: Option<u32>,

    /// Name of the RayCluster in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub ray_cluster: Option<String>,

    /// Ray dashboard address (`http://<head service>:8265`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub dashboard: Option<String>,

    /// Ray client address (`ray://<head service>:10001`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub ray_client: Option<String>,

    /// The fleet whose cluster runs the Ray head and workers, when a fleet does: the dashboard
    /// and Ray client addresses are then those of the fleet's cluster network, unless
    /// `throughHub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub fleet: Option<String>,

    /// True when the dashboard and Ray client addresses are the hub's gateway to the head in
    /// `fleet` (the hub's tunnel forwards them), reachable in the hub's cluster network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through_hub: Option<bool>,

    /// Sum over leases of price × GPUs: what the cluster costs per hour, in base units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly_rate: Option<u64>,

    /// When the cluster started running (leases bound); it ends at start + duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub start_time: Option<Time>,

    /// Metered cost so far over all leases, in base units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_accrued: Option<u64>,

    /// Paid to suppliers so far, in base units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_settled: Option<u64>,

    /// Refunded to the buyer, in base units, once the cluster has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_refunded: Option<u64>,

    /// The cluster's own escrow on chain and its refund (written by settlement alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escrow: Option<EscrowStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
