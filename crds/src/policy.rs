//! `MarketPolicy`: the market's rules as one object instead of controller flags. Cluster-scoped,
//! one per market (named `default`); the controller reads it live, its flags only seed the
//! values a policy leaves out. A change applies to leases bound after it: a running lease keeps
//! the terms frozen in its spec (price, wallet, GPUs, worker resources).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::GpuTier;

/// The only name a MarketPolicy may have: one per market.
pub const POLICY_NAME: &str = "default";

/// Rules of the market. Every field is optional: what a policy leaves out, the controller's
/// flags decide.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "gpumarket.io",
    version = "v1alpha1",
    kind = "MarketPolicy",
    status = "MarketPolicyStatus",
    shortname = "mpol",
    category = "gpumarket",
    doc = "Rules of the gpumarket: accepted GPUs, stake, slashing, deposits, settlement, timeouts, verification, fee",
    printcolumn(name = "Signed", type_ = "boolean", description = "only signed offers are matched", json_path = ".spec.requireSignedOffers"),
    printcolumn(name = "Fee", type_ = "integer", description = "market fee, per mille of each payout", json_path = ".spec.marketFeePermille"),
    printcolumn(name = "Slash", type_ = "integer", description = "stake slashed per supplier failure, per mille", json_path = ".spec.slashPermille"),
    printcolumn(name = "Settle", type_ = "string", json_path = ".spec.settlementPeriod"),
    printcolumn(name = "Heartbeat", type_ = "string", json_path = ".spec.heartbeatTimeout"),
    printcolumn(name = "Verify", type_ = "string", description = "how often idle offers are challenged", json_path = ".spec.verificationInterval"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name == 'default'").message("a market has one MarketPolicy, named default: set metadata.name to default")
)]
#[serde(rename_all = "camelCase")]
pub struct MarketPolicySpec {
    /// GPU models the market accepts, with their tier and throughput; offers of other models
    /// are not matched. Absent: every model, at the tier its name gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(o, o.model == m.model))").message("spec.acceptedModels lists a model twice: give each model once"))]
    pub accepted_models: Option<Vec<AcceptedModel>>,

    /// Minimum stake bonded per offered GPU, by tier, in base units of the settlement mint:
    /// offers staked less are not matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 6))]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(o, o.tier == m.tier))").message("spec.minStakePerGpu lists a tier twice: give each tier once"))]
    pub min_stake_per_gpu: Option<Vec<TierStake>>,

    /// Share of a node's remaining stake slashed to the buyer per supplier failure, per mille.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 1000").message("spec.slashPermille is a share per mille: between 0 and 1000"))]
    pub slash_permille: Option<u32>,

    /// Extra share a deposit must cover beyond price × GPUs × duration, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 1000").message("spec.depositMarginPercent must be between 0 and 1000 (percent of the cluster's cost)"))]
    pub deposit_margin_percent: Option<u32>,

    /// How often accrued GPU time is paid out, e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$') && duration(self) >= duration('10s') && duration(self) <= duration('720h')").message("spec.settlementPeriod must be between 10s and 720h, written like 10m or 1h"))]
    pub settlement_period: Option<String>,

    /// A supplier that has not heartbeated for this long is treated as failed, e.g. `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$') && duration(self) >= duration('2s') && duration(self) <= duration('1h')").message("spec.heartbeatTimeout must be between 2s and 1h, written like 60s or 2m"))]
    pub heartbeat_timeout: Option<String>,

    /// A lease whose workers are not all Ready this long after the bind ends as a supplier
    /// failure, unbilled, e.g. `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$') && duration(self) >= duration('10s') && duration(self) <= duration('24h')").message("spec.provisioningTimeout must be between 10s and 24h, written like 10m"))]
    pub provisioning_timeout: Option<String>,

    /// Match only offers signed by their payout wallet's key; offers whose signature does not
    /// verify are never matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_signed_offers: Option<bool>,

    /// How often an idle offer is challenged to prove its GPUs compute what they claim, e.g.
    /// `1h`. Set, it turns proof of compute on whatever the controller's flags say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$') && duration(self) >= duration('10s') && duration(self) <= duration('720h')").message("spec.verificationInterval must be between 10s and 720h, written like 30m or 1h"))]
    pub verification_interval: Option<String>,

    /// Challenges an offer may fail in a row before it is unverified (not matched): 1 refuses
    /// it at the first failure. Every failure lowers its reputation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("spec.failedChallengesBeforeUnverified must be between 1 and 100"))]
    pub failed_challenges_before_unverified: Option<u32>,

    /// The market's fee, per mille of each payout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 500").message("spec.marketFeePermille must be between 0 and 500 (at most half of each payout)"))]
    pub market_fee_permille: Option<u32>,
}

/// What the controller made of the policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MarketPolicyStatus {
    /// Generation of the spec the controller acts on (new leases get its terms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A GPU model the market accepts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedModel {
    /// Canonical model name, as offers write it, e.g. `H100`.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$')").message("acceptedModels[].model must be a model name such as H100, A100 or RTX4090"))]
    #[schemars(length(max = 63))]
    pub model: String,
    /// Tier the model is matched as.
    pub tier: GpuTier,
    /// Throughput relative to an H100, per mille (an H100 is 1000), for deadlines of
    /// verification workloads.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("acceptedModels[].relativeThroughputPermille must be between 1 and 100000 (an H100 is 1000)"))]
    pub relative_throughput_permille: u32,
}

/// Minimum stake per GPU of one tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TierStake {
    pub tier: GpuTier,
    /// Base units of the settlement mint per offered GPU.
    pub amount: u64,
}
