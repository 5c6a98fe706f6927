//! `GpuOffer`: what one supplier node puts on the market.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{GpuTier, HostResources, Interconnect, OfferMode};

/// The GPUs of one supplier node, offered at one price. Cluster-scoped, one per node, named after
/// the node. The supplier agent writes the spec and the health/heartbeat part of the status; the
/// controller writes allocation, availability, reputation and stake.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpumarket.io",
    version = "v1alpha1",
    kind = "GpuOffer",
    status = "GpuOfferStatus",
    shortname = "gpuo",
    shortname = "offers",
    category = "gpumarket",
    doc = "GPUs of one supplier node offered on the gpumarket",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.gpus[0].model"),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.freeGpus"),
    printcolumn(
        name = "Price/h",
        type_ = "integer",
        description = "price per GPU-hour in base units of the settlement mint",
        json_path = ".spec.pricePerGpuHour"
    ),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(
        name = "Verified",
        type_ = "string",
        description = "whether the market believes the offer (signature, no GPU offered twice)",
        json_path = ".status.conditions[?(@.type==\"Verified\")].reason"
    ),
    printcolumn(name = "Score", type_ = "integer", json_path = ".status.reputation.score"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name == self.spec.nodeName").message("a GpuOffer is named after its node: set metadata.name to spec.nodeName")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.signedAt) || (has(self.signedAt) && self.signedAt >= oldSelf.signedAt)").message("spec.signedAt cannot go back: a spec signed before the one it replaces is an old signed offer re-applied; let the node's agent sign the offer again"))]
pub struct GpuOfferSpec {
    /// Name of the Kubernetes node whose GPUs are offered. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.nodeName is immutable: delete the offer and create one for the other node"))]
    #[schemars(length(max = 253))]
    pub node_name: String,

    /// Supplier's Solana wallet (base-58 public key) that receives payouts.
    #[x_kube(validation = Rule::new("self.matches('^[1-9A-HJ-NP-Za-km-z]{32,44}$')").message("spec.wallet must be a base-58 Solana public key (32 to 44 characters, no 0, O, I or l)"))]
    #[schemars(length(max = 44))]
    pub wallet: String,

    /// The GPUs of the node, one entry per device. May be empty while a node has lost its GPUs.
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["uuid".into()]))]
    pub gpus: Vec<OfferedGpu>,

    /// Price per GPU-hour, in base units of the settlement mint (1000000 = 1 token with 6 decimals).
    #[x_kube(validation = Rule::new("self > 0 && self <= 100000000000").message("spec.pricePerGpuHour must be greater than 0 and at most 100000000000 base units of the settlement mint per GPU-hour (100000 tokens of 6 decimals)"))]
    pub price_per_gpu_hour: u64,

    /// Region the node runs in, e.g. `eu-west`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$')").message("spec.region must be lower-case letters, digits and '-', e.g. eu-west"))]
    #[schemars(length(max = 63))]
    pub region: String,

    /// Zone within the region, e.g. `eu-west-1a`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$')").message("spec.zone must be lower-case letters, digits and '-', e.g. eu-west-1a"))]
    #[schemars(length(max = 63))]
    pub zone: Option<String>,

    /// How the node's GPUs are connected to each other.
    #[serde(default)]
    pub interconnect: Interconnect,

    /// NVIDIA driver version reported by NVML, e.g. `560.35.03`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub driver_version: Option<String>,

    /// Highest CUDA version the driver supports, e.g. `12.6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub cuda_version: Option<String>,

    /// Whether the gpumarket agent is the node's device plugin or only publishes this offer.
    #[serde(default)]
    pub mode: OfferMode,

    /// CPU and memory of the node that pods may request (the Node's allocatable): each lease
    /// gets the share that comes with its GPUs. Absent from agents that predate it: their
    /// workers get no CPU or memory requests, and requests that ask for CPU or memory per
    /// worker are not matched to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<HostResources>,

    /// When the agent signed this spec (whole seconds; part of what is signed). A spec signed
    /// before one the controller has seen for this offer is an old signed offer re-applied (to
    /// restore an old price or old GPUs, say): it is not matched, and the API server refuses to
    /// move this time back. Absent from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub signed_at: Option<Time>,

    /// Ed25519 signature (base-58) by `wallet`'s key of the rest of this spec, written by the
    /// agent ([`crate::signature`]): it proves the offer is the wallet holder's, unchanged. The
    /// controller matches only offers whose signature verifies (unsigned ones only where the
    /// market does not require signatures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[1-9A-HJ-NP-Za-km-z]{64,88}$')").message("spec.signature must be a base-58 ed25519 signature (64 bytes) of the offer by spec.wallet's key, as the gpumarket agent writes it"))]
    #[schemars(length(max = 88))]
    pub signature: Option<String>,
}

/// One GPU of an offer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OfferedGpu {
    /// NVML uuid of the device, e.g. `GPU-5d2f...`.
    #[x_kube(validation = Rule::new("self.matches('^(GPU|MIG)-[A-Za-z0-9-]+$')").message("gpus[].uuid must be the device's NVML uuid: GPU- or MIG- followed by letters, digits and '-', at most 128 characters (e.g. GPU-5f3a9c1e-0b7d-4e2a-9c41-1d2e3f4a5b60)"))]
    #[schemars(length(max = 128))]
    pub uuid: String,

    /// Canonical model name, e.g. `H100`, `A100`, `A6000`, `RTX4090`, `RTX3090`.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$')").message("gpus[].model must be a model name such as H100, A100 or RTX4090"))]
    #[schemars(length(max = 63))]
    pub model: String,

    /// Device memory in MiB (at most 1 TiB).
    #[x_kube(validation = Rule::new("self > 0 && self <= 1048576").message("gpus[].memoryMib must be greater than 0 and at most 1048576 (1 TiB): the device memory in MiB, e.g. 81559"))]
    pub memory_mib: u64,
}

impl OfferedGpu {
    pub fn tier(&self) -> GpuTier {
        GpuTier::of_model(&self.model)
    }
}

/// Observed state of an offer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuOfferStatus {
    /// `Available` (offer can be matched: fresh heartbeat, healthy GPUs) and `Healthy`.
    #[serde(default)]
    #[schemars(transform = crate::common::bounds::conditions)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Per-GPU health (written by the agent) and allocation (written by the controller).
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["uuid".into()]))]
    pub gpus: Vec<GpuState>,

    /// GPUs that are healthy and not leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 64))]
    pub free_gpus: Option<u32>,

    /// When the agent last reported that the node is alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub last_heartbeat: Option<Time>,

    /// Supplier reputation, computed by the controller from uptime and lease outcomes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<Reputation>,

    /// Stake bonded for this node, as read from its stake account on chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stake: Option<StakeStatus>,

    /// Proof of compute: the challenge in flight and the tally, written by the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_of_compute: Option<crate::proof::ProofOfCompute>,

    /// The agent's answer to the proof-of-compute challenge, written by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_answer: Option<crate::proof::ComputeAnswer>,

    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A node's stake: an SPL token account of its own, at an address anyone can derive from the
/// settlement authority and the node name. Only transfers from the offer's wallet bond; anything
/// else sent there is returned to its sender.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StakeStatus {
    /// Address of the stake token account (base-58).
    #[schemars(length(max = 44))]
    pub account: String,
    /// Bonded from the offer's wallet, less slashes and what was returned: what matching counts.
    pub bonded: u64,
    /// When the offer's wallet asked to unbond (a transfer to the stake account with the memo
    /// `gpumarket unbond`): the offer is no longer matched and the stake is returned once the
    /// cooldown has passed and no lease is active on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub unbond_requested: Option<Time>,
    /// Payments out of the stake account other than slashes: deposits returned to senders
    /// that are not the offer's wallet, and the unbonded stake. Written before they are sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub returns: Vec<crate::lease::SettlementRecord>,
}

/// Health and allocation of one offered GPU.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuState {
    /// NVML uuid of the device.
    #[x_kube(validation = Rule::new("self.matches('^(GPU|MIG)-[A-Za-z0-9-]+$')").message("status.gpus[].uuid must be the device's NVML uuid: GPU- or MIG- followed by letters, digits and '-', as in spec.gpus"))]
    #[schemars(length(max = 128))]
    pub uuid: String,

    /// Health reported by the agent; absent means not reported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<GpuHealth>,

    /// Why the GPU is unhealthy, e.g. `XID 79: GPU has fallen off the bus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,

    /// Name of the GpuLease this GPU is allocated to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub lease: Option<String>,
}

/// Health of a GPU as the device plugin API knows it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuHealth {
    Healthy,
    Unhealthy,
}

/// Supplier reputation. Integers so that matching is exact and reproducible.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Reputation {
    /// Share of the observed time the node heartbeated, in per-mille (0–1000).
    #[schemars(range(max = 1000))]
    pub uptime_permille: u32,
    /// Leases that ran to their end without a supplier failure.
    pub leases_completed: u64,
    /// Leases ended by a supplier failure.
    pub leases_failed: u64,
    /// Proof-of-compute challenges answered late, wrong or not at all; each counts as a failed
    /// lease in the score.
    #[serde(default)]
    pub challenges_failed: u64,
    /// Reputation score, 0–1000; requests set a minimum (spec.minReputation).
    #[schemars(range(max = 1000))]
    pub score: u32,
}

impl GpuOffer {
    /// Stake bonded for the node, as settlement last read it (0 when none).
    pub fn bonded_stake(&self) -> u64 {
        self.status.as_ref().and_then(|s| s.stake.as_ref()).map_or(0, |s| s.bonded)
    }

    /// Whether the supplier has asked to unbond its stake (the offer is then not matched).
    pub fn unbonding(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.stake.as_ref())
            .is_some_and(|s| s.unbond_requested.is_some())
    }

    /// Whether the offer's `Available` condition is `True`.
    pub fn is_available(&self) -> bool {
        self.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True")
        })
    }
}
