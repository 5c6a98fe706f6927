//! Plain input and output types of the matching engine. They carry only what matching needs,
//! so the engine is pure and can be tested and benchmarked without any server; the controller
//! converts GpuOffer / GpuCluster objects into them.

use gpumarket_crds::{GpuTier, Interconnect, Placement};

/// Free supply on one supplier node, as matching sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Node name (also the GpuOffer name); the stable key for ties.
    pub node: String,
    /// UUIDs of the GPUs that are healthy and not leased, in a stable order.
    pub free_gpus: Vec<String>,
    pub model: String,
    pub tier: GpuTier,
    pub memory_mib: u64,
    /// Base units of the settlement mint per GPU-hour.
    pub price_per_gpu_hour: u64,
    pub region: String,
    pub zone: String,
    pub interconnect: Interconnect,
    /// 0–1000, higher is better.
    pub reputation: u32,
    pub stake: u64,
}

/// What a request accepts, mirroring `GpuClusterSpec.gpu`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFilter {
    /// Any of these model names (ASCII case ignored).
    Models(Vec<String>),
    /// Any model of this tier or better.
    MinTier(GpuTier),
}

/// One pending request (a GpuCluster, or the lost workers of one during replacement).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Stable key, `namespace/name`.
    pub key: String,
    pub models: ModelFilter,
    pub min_memory_mib: u64,
    pub workers: u32,
    pub gpus_per_worker: u32,
    pub max_price_per_gpu_hour: u64,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub min_reputation: u32,
    pub placement: Placement,
    /// Creation time in seconds since the epoch: oldest requests are served first.
    pub created: i64,
}

/// One worker's GPUs: all on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSlot {
    pub node: String,
    pub gpus: Vec<String>,
    pub price_per_gpu_hour: u64,
}

/// A complete gang assignment for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub workers: Vec<WorkerSlot>,
}

impl Assignment {
    /// Total price per hour of all GPUs in the assignment, in base units.
    pub fn hourly_cost(&self) -> u64 {
        self.workers.iter().map(|w| w.price_per_gpu_hour * w.gpus.len() as u64).sum()
    }
}
