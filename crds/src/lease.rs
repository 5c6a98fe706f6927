//! `GpuLease`: one binding of some GPUs of one offer to one GpuCluster, with its meter and its
//! settlement record.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A binding of GPUs of one offer to one GpuCluster. Cluster-scoped (offers are), created by the
/// controller; the spec is immutable, the status carries the meter and every payout made.
// Clippy reads the repeated `type_ = "integer"` of the printer columns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpumarket.io",
    version = "v1alpha1",
    kind = "GpuLease",
    status = "GpuLeaseStatus",
    shortname = "gpul",
    category = "gpumarket",
    doc = "GPUs of one offer bound to one GpuCluster, with meter and settlement record",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.endReason"),
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.cluster.namespace"),
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster.name"),
    printcolumn(name = "Offer", type_ = "string", json_path = ".spec.offer"),
    printcolumn(name = "Price/h", type_ = "integer", json_path = ".spec.pricePerGpuHour"),
    printcolumn(name = "GPU-s", type_ = "integer", json_path = ".status.meteredGpuSeconds"),
    printcolumn(name = "Settled", type_ = "integer", json_path = ".status.amountSettled"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a GpuLease spec is immutable: the controller ends leases and creates new ones"))]
pub struct GpuLeaseSpec {
    /// The GpuCluster the GPUs are bound to.
    pub cluster: ClusterRef,

    /// Name of the GpuOffer (and node) the GPUs belong to.
    #[x_kube(validation = Rule::new("size(self) > 0").message("spec.offer must name a GpuOffer"))]
    #[schemars(length(max = 253))]
    pub offer: String,

    /// Supplier wallet that receives this lease's payouts, copied from the offer at binding.
    #[x_kube(validation = Rule::new("self.matches('^[1-9A-HJ-NP-Za-km-z]{32,44}$')").message("spec.supplierWallet must be a base-58 Solana public key"))]
    #[schemars(length(max = 44))]
    pub supplier_wallet: String,

    /// NVML uuids of the bound GPUs.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("spec.gpus must name at least one GPU"))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub gpus: Vec<String>,

    /// Ray workers this lease hosts (each uses `gpus / workers` GPUs).
    #[x_kube(validation = Rule::new("self >= 1").message("spec.workers must be at least 1"))]
    pub workers: u32,

    /// Agreed price per GPU-hour, in base units of the settlement mint.
    #[x_kube(validation = Rule::new("self > 0").message("spec.pricePerGpuHour must be greater than 0"))]
    pub price_per_gpu_hour: u64,

    /// When metering starts.
    pub start_time: Time,
}

/// Reference to the GpuCluster a lease belongs to.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRef {
    pub namespace: String,
    pub name: String,
    /// uid of the GpuCluster, so that a re-created cluster of the same name never inherits leases.
    pub uid: String,
}

/// Lifecycle of a lease.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LeasePhase {
    /// GPUs bound and metered.
    #[default]
    Active,
    /// Metering closed; payouts may still be in flight.
    Ended,
    /// Ended and every payout confirmed.
    Settled,
}

/// Why a lease ended.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The cluster's duration ran out.
    Expired,
    /// The GpuCluster was deleted.
    Deleted,
    /// The supplier's node or GPU failed (stale heartbeat, unhealthy GPU).
    SupplierFailure,
    /// The buyer's escrow could not pay for more time.
    OutOfFunds,
    /// Bound beyond what the cluster asks for (replicas raced without leader election) and ended
    /// before it served: metered zero, so not billed.
    Surplus,
}

/// Meter and settlement record of a lease.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuLeaseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LeasePhase>,

    /// When metering stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,

    /// GPU-seconds metered so far (final once ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metered_gpu_seconds: Option<u64>,

    /// Usage up to this time has been paid for (or is in a recorded payout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_through: Option<Time>,

    /// Paid to the supplier so far, in base units (confirmed payouts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_settled: Option<u64>,

    /// Every payout for this lease, keyed by period. Written before a transaction is sent.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["period".into()]))]
    pub settlements: Vec<SettlementRecord>,
}

/// One payout of one lease for one period.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SettlementRecord {
    /// Idempotency key of the period within the lease, e.g. `0001` (also in the memo).
    pub period: String,
    /// Usage covered, from the previous period's end to this time.
    pub through: Time,
    /// Amount paid, in base units.
    pub amount: u64,
    /// Signature of the signed transaction (base-58).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Last block height at which the transaction's blockhash is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_valid_block_height: Option<u64>,
    /// The signed transaction (base64 wire bytes) while it is in flight, so that it is
    /// rebroadcast unchanged; dropped once it is confirmed or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<String>,
    pub state: SettlementState,
}

/// Where a payout is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SettlementState {
    /// Signed and recorded, maybe sent: look its signature up before doing anything else.
    Signed,
    /// Confirmed on chain.
    Confirmed,
    /// Its blockhash expired without it landing; a new record with a fresh signature follows.
    Expired,
}
