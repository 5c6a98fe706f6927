//! Plain input and output types of the matching engine. They carry only what matching needs,
//! so the engine is pure and can be tested and benchmarked without any server; the controller
//! converts GpuOffer / GpuCluster objects into them.

use gpumarket_crds::{GpuTier, HostResources, Interconnect, Placement};

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
    /// CPU and memory of the node that pods may request; `None` from an agent that does not
    /// publish them.
    pub allocatable: Option<HostResources>,
    /// Every GPU of the node, leased or not: what the allocatable is shared among.
    pub node_gpus: u32,
    /// The fleet whose cluster the node is in (its GpuFleet's name); `None` for the hub's own
    /// nodes. A gang stays inside one fleet, or on the hub's own nodes: Ray workers in two
    /// clusters have no network between them.
    pub fleet: Option<String>,
    /// The GpuOffer's `metadata.generation` when it was read: a bind drops an offer whose spec
    /// changed since (its terms and signature were judged on the earlier spec).
    pub spec_generation: Option<i64>,
}

impl Offer {
    /// CPU and memory that come with each worker of `gpus_per_worker` GPUs here, if the node
    /// publishes them.
    pub fn worker_share(&self, gpus_per_worker: u32) -> Option<HostResources> {
        self.allocatable.map(|a| share(a, gpus_per_worker, self.node_gpus))
    }
}

/// The share of a node's `allocatable` that comes with `gpus` of its `node_gpus` GPUs:
/// allocatable × gpus / node_gpus, rounded down to whole millicores and bytes, so that the
/// shares of GPUs leased apart never add up to more than the node has.
pub fn share(allocatable: HostResources, gpus: u32, node_gpus: u32) -> HostResources {
    let part = |total: u64| {
        let gpus = u128::from(gpus.min(node_gpus));
        let exact = u128::from(total) * gpus / u128::from(node_gpus.max(1));
        u64::try_from(exact).unwrap_or(total)
    };
    HostResources {
        cpu_millicores: part(allocatable.cpu_millicores),
        memory_bytes: part(allocatable.memory_bytes),
    }
}

/// CPU and memory a request asks for each worker; a part left out is the node's share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerAsk {
    pub cpu_millicores: Option<u64>,
    pub memory_bytes: Option<u64>,
}

impl WorkerAsk {
    /// Whether the CPU asked fits in a worker's `share` (none when the node publishes no
    /// allocatable: then only asking for nothing fits).
    pub fn cpu_fits(&self, share: Option<HostResources>) -> bool {
        self.cpu_millicores.is_none_or(|cpu| share.is_some_and(|s| cpu <= s.cpu_millicores))
    }

    /// Whether the memory asked fits in a worker's `share` (see [`WorkerAsk::cpu_fits`]).
    pub fn memory_fits(&self, share: Option<HostResources>) -> bool {
        self.memory_bytes.is_none_or(|bytes| share.is_some_and(|s| bytes <= s.memory_bytes))
    }

    /// What a worker gets out of its `share`: what was asked, the share for the rest; nothing
    /// on a node that publishes no allocatable.
    pub fn grant(&self, share: Option<HostResources>) -> Option<HostResources> {
        share.map(|s| HostResources {
            cpu_millicores: self.cpu_millicores.unwrap_or(s.cpu_millicores),
            memory_bytes: self.memory_bytes.unwrap_or(s.memory_bytes),
        })
    }
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
    /// CPU and memory each worker needs.
    pub per_worker: WorkerAsk,
    /// Creation time in seconds since the epoch: oldest requests are served first.
    pub created: i64,
    /// The fleet the workers must be in (`Some(None)`: the hub's own nodes), when the rest of
    /// the gang runs there: lost workers are replaced beside the others. `None` for a whole
    /// gang, which goes to whichever one fleet (or the hub's own nodes) serves it cheapest.
    pub within: Option<Option<String>>,
}

/// One worker's GPUs: all on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSlot {
    pub node: String,
    pub gpus: Vec<String>,
    pub price_per_gpu_hour: u64,
    /// CPU and memory the worker gets (requested and limited); `None` on a node that
    /// publishes no allocatable.
    pub resources: Option<HostResources>,
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
