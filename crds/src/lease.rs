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
    selectable = ".spec.offer",
    doc = "GPUs of one offer bound to one GpuCluster, with meter and settlement record",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.endReason"),
    printcolumn(
        name = "Cluster-Namespace",
        type_ = "string",
        json_path = ".spec.cluster.namespace"
    ),
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster.name"),
    printcolumn(name = "Offer", type_ = "string", json_path = ".spec.offer"),
    printcolumn(name = "Price/h", type_ = "integer", json_path = ".spec.pricePerGpuHour"),
    printcolumn(
        name = "Fee",
        type_ = "integer",
        description = "market fee frozen at binding, per mille of each payout",
        json_path = ".spec.terms.marketFeePermille",
        priority = 1
    ),
    printcolumn(name = "Served GPU-s", type_ = "integer", json_path = ".status.servedGpuSeconds"),
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
    #[schemars(length(max = 64), inner(length(max = 128)))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("spec.gpus must name at least one GPU"))]
    #[x_kube(validation = Rule::new("self.all(u, u.matches('^(GPU|MIG)-[A-Za-z0-9-]+$'))").message("spec.gpus[] must be NVML uuids of the offer's GPUs: GPU- or MIG- followed by letters, digits and '-'"))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub gpus: Vec<String>,

    /// Ray workers this lease hosts (each uses `gpus / workers` GPUs).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("spec.workers must be at least 1 and at most 64 (each worker holds at least one of the lease's at most 64 GPUs)"))]
    pub workers: u32,

    /// Agreed price per GPU-hour, in base units of the settlement mint.
    #[x_kube(validation = Rule::new("self > 0 && self <= 100000000000").message("spec.pricePerGpuHour must be greater than 0 and at most 100000000000 base units of the settlement mint per GPU-hour"))]
    pub price_per_gpu_hour: u64,

    /// CPU and memory each worker gets (requested and limited), fixed at binding: what the
    /// buyer asked per worker, else the share of the node's allocatable that comes with the
    /// worker's GPUs. Absent when the offer published no allocatable (an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_resources: Option<crate::common::HostResources>,

    /// When the GPUs were bound (hired); billing starts only once the lease serves
    /// (`status.servingSince`).
    #[schemars(length(max = 64))]
    pub start_time: Time,

    /// The market's rules for this lease, frozen at binding from the MarketPolicy (or the
    /// controller's flags where the policy is silent): a later change of the policy applies to
    /// leases bound after it, never to this one. Absent on leases bound before terms were
    /// recorded; the rules in force apply to those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<LeaseTerms>,
}

/// Rules of the market that apply to one lease for its whole life (see `GpuLeaseSpec::terms`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LeaseTerms {
    /// The lease ends as a supplier failure when its node's agent has not heartbeated for
    /// this many seconds.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("terms.heartbeatTimeoutSeconds must be between 1 and 86400"))]
    pub heartbeat_timeout_seconds: u64,

    /// The lease ends as a supplier failure, unbilled, when its workers are not all Ready this
    /// many seconds after the bind.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("terms.provisioningTimeoutSeconds must be between 1 and 86400"))]
    pub provisioning_timeout_seconds: u64,

    /// Served time is paid out every this many seconds (and at the end). Absent when the lease
    /// is not settled on chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 2592000").message("terms.settlementPeriodSeconds must be between 1 and 2592000 (30 days)"))]
    pub settlement_period_seconds: Option<u64>,

    /// Share beyond the cluster's cost its deposit was checked against, in percent. Absent
    /// when the lease is not settled on chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 1000").message("terms.depositMarginPercent must be between 0 and 1000"))]
    pub deposit_margin_percent: Option<u32>,

    /// The market's fee, per mille of each payout. Absent when the lease is not settled on
    /// chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 500").message("terms.marketFeePermille must be between 0 and 500"))]
    pub market_fee_permille: Option<u32>,

    /// Share of the node's remaining stake slashed to the buyer if the lease ends by a supplier
    /// failure, per mille. Absent when the lease is not settled on chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 1000").message("terms.slashPermille must be between 0 and 1000"))]
    pub slash_permille: Option<u32>,

    /// The mint its payouts move (its cluster's, base-58). Absent when the lease is not settled
    /// on chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 44))]
    pub mint: Option<String>,
}

/// Reference to the GpuCluster a lease belongs to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRef {
    #[schemars(length(max = 63))]
    pub namespace: String,
    #[schemars(length(max = 253))]
    pub name: String,
    /// uid of the GpuCluster, so that a re-created cluster of the same name never inherits leases.
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')").message("spec.cluster.uid must be the GpuCluster's metadata.uid, a lower-case UUID such as 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"))]
    #[schemars(length(max = 36))]
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
    /// Its workers were not Ready on the supplier's node within the provisioning timeout: a
    /// supplier failure, never billed.
    NotServing,
    /// The buyer's Ray pods could not start before serving (an image the head cannot get, an
    /// image without the spec's Ray version): the buyer's to fix, never billed.
    WorkloadFailed,
}

impl EndReason {
    /// Whether the supplier is to blame (reputation, slashing).
    pub fn is_supplier_failure(self) -> bool {
        matches!(self, EndReason::SupplierFailure | EndReason::NotServing)
    }
}

/// Meter and settlement record of a lease. Written by the controller alone; the end and the
/// start of service are written once.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.endTime) || (has(self.endTime) && self.endTime == oldSelf.endTime)").message("status.endTime of a GpuLease is written once: an ended meter never moves"))]
#[x_kube(validation = Rule::new("!has(oldSelf.endReason) || (has(self.endReason) && self.endReason == oldSelf.endReason)").message("status.endReason of a GpuLease is written once: why a lease ended never changes"))]
#[x_kube(validation = Rule::new("!has(oldSelf.servingSince) || (has(self.servingSince) && self.servingSince == oldSelf.servingSince)").message("status.servingSince of a GpuLease is written once: billing starts when the workers were first Ready"))]
pub struct GpuLeaseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LeasePhase>,

    /// When every worker of the lease was first Ready on the supplier's node: billing starts
    /// here. Absent while the lease has not served yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub serving_since: Option<Time>,

    /// The worker pods running under this lease (at most `spec.workers`), as the controller
    /// last saw them; the supplier agent hands the lease's GPUs to these pods only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub pods: Vec<LeasePod>,

    /// When metering stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub end_time: Option<Time>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,

    /// GPU-seconds the GPUs were bound for, from the bind (final once ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("status.hiredGpuSeconds cannot be negative"))]
    pub hired_gpu_seconds: Option<u64>,

    /// GPU-seconds served, from `servingSince`: what is billed (final once ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("status.servedGpuSeconds cannot be negative"))]
    pub served_gpu_seconds: Option<u64>,

    /// Usage up to this time has been paid for (or is in a recorded payout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub settled_through: Option<Time>,

    /// Paid out of the escrow for this lease so far, in base units (confirmed payouts only):
    /// the supplier's part and the market's fee at `spec.terms.marketFeePermille`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_settled: Option<u64>,

    /// Confirmed payouts folded out of `settlements`, so that a lease of many periods keeps a
    /// bounded record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compacted: Option<CompactedSettlements>,

    /// Every payout for this lease not yet compacted, keyed by period. Written before a
    /// transaction is sent.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["period".into()]))]
    pub settlements: Vec<SettlementRecord>,
}

/// A worker pod serving a lease.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeasePod {
    #[schemars(length(max = 63))]
    pub namespace: String,
    #[schemars(length(max = 253))]
    pub name: String,
    #[schemars(length(max = 64))]
    pub uid: String,
    /// Whether the pod is Ready.
    pub ready: bool,
}

/// Confirmed payouts of a lease that no longer have a record of their own.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompactedSettlements {
    /// How many payout records were folded in.
    pub records: u64,
    /// The newest folded period (payout keys keep increasing past it).
    #[schemars(length(max = 32))]
    pub last_period: String,
    /// Usage paid through this time.
    #[schemars(length(max = 64))]
    pub through: Time,
    /// Their total, in base units (micro-USD when the market prices in USD).
    pub amount: u64,
    /// Base units of the mint they moved, when that differs from `amount` (payouts converted
    /// at a price feed's rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
}

/// One payout of one lease for one period.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SettlementRecord {
    /// Idempotency key of the period within the lease, e.g. `0001` (also in the memo).
    #[schemars(length(max = 64))]
    pub period: String,
    /// Usage covered, from the previous period's end to this time.
    #[schemars(length(max = 64))]
    pub through: Time,
    /// Amount paid out of the source account, in base units (of a payout, the market's fee at
    /// the lease's `spec.terms.marketFeePermille` goes to the market, the rest to the supplier).
    /// A payout of a market that prices in USD through a price feed records here the micro-USD
    /// it covers, and in `conversion` the tokens that moved for them.
    pub amount: u64,
    /// The rate a USD-priced payout was converted at, and the tokens it moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversion: Option<ConvertedPayout>,
    /// Signature of the signed transaction (base-58).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 88))]
    pub signature: Option<String>,
    /// Last block height at which the transaction's blockhash is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_valid_block_height: Option<u64>,
    /// Slot at which the transaction was signed: the source account's history back past this
    /// slot is what proves that an expired transaction never landed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_slot: Option<u64>,
    /// The signed transaction (base64 wire bytes) while it is in flight, so that it is
    /// rebroadcast unchanged; dropped once it is confirmed or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub transaction: Option<String>,
    pub state: SettlementState,
}

/// A payout converted from USD at a price feed's rate: `tokens` = USD amount / (`price` ×
/// 10^`exponent` USD per token), rounded down, in base units of the settlement mint.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConvertedPayout {
    pub tokens: u64,
    /// The feed's price of one token in USD: `price` × 10^`exponent`.
    pub price: i64,
    pub exponent: i32,
    /// When the feed published that price.
    #[schemars(length(max = 64))]
    pub publish_time: Time,
}

/// Where a payout is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SettlementState {
    /// Signed and recorded, maybe sent: look its signature up before doing anything else.
    Signed,
    /// Confirmed on chain.
    Confirmed,
    /// Its blockhash expired and the source account's history proves it never landed (or it
    /// failed on chain): a new record with a fresh signature follows.
    Expired,
}
