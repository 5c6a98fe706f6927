//! `GpuFleet`: a supplier's whole Kubernetes cluster joined to the market (the hub) from outside.
//!
//! The hub admin creates the GpuFleet (its name and wallet) and hands the fleet a join credential
//! (a ServiceAccount token of the hub, confined to this fleet by RBAC and admission policy). The
//! fleet's agent dials out with it: it publishes its nodes as GpuOffers labelled
//! [`FLEET_LABEL`], heartbeats here, reads the work placed on it (`status.assignments`, written by
//! the controller) and reports how that work runs in its own cluster (`status.workloads`). The hub
//! never holds a credential to the fleet.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::HostResources;
use crate::lease::ClusterRef;

/// Label on each GpuOffer a fleet publishes, naming its GpuFleet.
pub const FLEET_LABEL: &str = "gpumarket.io/fleet";
/// Namespace of the hub whose ServiceAccounts are fleet credentials, one named after each fleet.
pub const FLEET_NAMESPACE: &str = "gpumarket-fleets";

/// The name of the GpuOffer a fleet publishes for one of its nodes: `<fleet>.<node>`, so that
/// no two fleets (nor a fleet and a hub node) share an offer, and the admission policy can tell
/// a fleet's offers by their name.
pub fn fleet_offer_name(fleet: &str, node: &str) -> String {
    format!("{fleet}.{node}")
}

/// A supplier cluster joined to the market. Cluster-scoped; the admin writes the spec, the fleet
/// its heartbeat and workloads, the controller the conditions and assignments.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpumarket.io",
    version = "v1alpha1",
    kind = "GpuFleet",
    status = "GpuFleetStatus",
    shortname = "gpuf",
    shortname = "fleets",
    category = "gpumarket",
    doc = "A supplier's Kubernetes cluster joined to the gpumarket hub",
    printcolumn(name = "Wallet", type_ = "string", json_path = ".spec.wallet"),
    printcolumn(
        name = "Joined",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Joined\")].status"
    ),
    printcolumn(name = "Heartbeat", type_ = "date", json_path = ".status.lastHeartbeat"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$')").message("a GpuFleet name must be lower-case letters, digits and '-', at most 40 characters (it prefixes the fleet's offers and names its ServiceAccount)")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuFleetSpec {
    /// Fleet operator's Solana wallet (base-58 public key) that receives payouts.
    #[x_kube(validation = Rule::new("self.matches('^[1-9A-HJ-NP-Za-km-z]{32,44}$')").message("spec.wallet must be a base-58 Solana public key (32 to 44 characters, no 0, O, I or l)"))]
    #[schemars(length(max = 44))]
    pub wallet: String,
}

/// Observed state of a fleet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuFleetStatus {
    /// `Joined`: the fleet heartbeats (controller).
    #[serde(default)]
    #[schemars(transform = crate::common::bounds::conditions)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// When the fleet's agent last reported (fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub last_heartbeat: Option<Time>,

    /// Names of the GpuOffers the fleet publishes (fleet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub offers: Vec<String>,

    /// The active leases placed on the fleet's offers, with what running them needs
    /// (controller). The fleet reads its work here, never the leases or clusters themselves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["lease".into()]))]
    pub assignments: Vec<FleetAssignment>,

    /// How each assignment runs in the fleet (fleet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["lease".into()]))]
    pub workloads: Vec<FleetWorkload>,
}

/// One lease placed on a fleet, as the fleet needs it to start the workers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FleetAssignment {
    /// Name of the GpuLease.
    #[schemars(length(max = 253))]
    pub lease: String,
    /// The fleet's offer the lease is on.
    #[schemars(length(max = 253))]
    pub offer: String,
    /// The GpuCluster served (namespace and name on the hub, and uid).
    pub cluster: ClusterRef,
    /// Ray workers to run, each with `gpusPerWorker` GPUs.
    #[schemars(range(max = 64))]
    pub workers: u32,
    #[schemars(range(max = 64))]
    pub gpus_per_worker: u32,
    /// CPU and memory of each worker (requests equal limits), when the lease fixes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_resources: Option<HostResources>,
    /// Container image of the workers.
    #[schemars(length(max = 512))]
    pub image: String,
}

/// How one assignment runs in the fleet.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FleetWorkload {
    /// Name of the GpuLease.
    #[schemars(length(max = 253))]
    pub lease: String,
    /// Workers created in the fleet.
    #[schemars(range(max = 64))]
    pub workers: u32,
    /// Of those, how many are Ready.
    #[schemars(range(max = 64))]
    pub ready_workers: u32,
    /// Why the workload is not running, when it is not (e.g. the node is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    /// Whether the Ray head of the lease's cluster is Ready in the fleet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub head_ready: bool,
    /// Where the buyer reaches the cluster's Ray head, as the fleet sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<RayAccess>,
}

/// Where a Ray head is reached: its dashboard (and job API) and its Ray client address.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RayAccess {
    /// `http://<host>:<port>` of the dashboard and job submission API.
    #[x_kube(validation = Rule::new("self.matches('^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$')").message("access.dashboard must be http(s)://<host>[:<port>]"))]
    #[schemars(length(max = 512))]
    pub dashboard: String,
    /// `ray://<host>:<port>` of the Ray client server.
    #[x_kube(validation = Rule::new("self.matches('^ray://[A-Za-z0-9.-]+(:[0-9]{1,5})?$')").message("access.rayClient must be ray://<host>[:<port>]"))]
    #[schemars(length(max = 512))]
    pub ray_client: String,
}

impl GpuFleet {
    /// The workload the fleet reports for `lease`, if any.
    pub fn workload(&self, lease: &str) -> Option<&FleetWorkload> {
        self.status.as_ref()?.workloads.iter().find(|w| w.lease == lease)
    }
}
