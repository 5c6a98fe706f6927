//! The market's MarketPolicy, read live: the settings the controllers act on are the flags'
//! with whatever the policy sets on top ([`effective`]), and every change of the policy is an
//! Event on it saying who changed what ([`changes`]). A lease keeps the rules in force when it
//! was bound ([`terms`]). Pure, but for [`run`].

pub mod terms;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gpumarket_crds::GpuTier;
use gpumarket_crds::common::parse_duration;
use gpumarket_crds::{MarketPolicy, MarketPolicySpec};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::EventType;
use kube::runtime::watcher;

use crate::market::proof::ProofSettings;
use crate::runtime::context::{Context, MANAGER, Settings};
use crate::settlement::SettlementConfig;
use crate::settlement::stake::StakePolicy;

fn policy_duration(value: &Option<String>, flag: Duration) -> Duration {
    value.as_deref().and_then(|v| parse_duration(v).ok()).unwrap_or(flag)
}

/// The settings the controllers act on: `flags`, overridden by what `policy` sets. A duration
/// the schema let through but that does not parse keeps the flag's value.
pub fn effective(flags: &Settings, policy: Option<&MarketPolicySpec>) -> Settings {
    let Some(policy) = policy else { return flags.clone() };
    Settings {
        heartbeat_timeout: policy_duration(&policy.heartbeat_timeout, flags.heartbeat_timeout),
        provisioning_timeout: policy_duration(
            &policy.provisioning_timeout,
            flags.provisioning_timeout,
        ),
        require_signed_offers: policy.require_signed_offers.unwrap_or(flags.require_signed_offers),
        proof_of_compute: effective_proof(flags.proof_of_compute.as_ref(), policy),
        accepted_models: policy
            .accepted_models
            .as_ref()
            .map(|models| models.iter().map(|m| (m.model.clone(), m.tier)).collect())
            .or_else(|| flags.accepted_models.clone()),
        ..flags.clone()
    }
}

/// The tier GPUs of `model` are matched and staked as: the market's (its accepted models),
/// else the one the model's name gives.
pub fn tier_of(settings: &Settings, model: &str) -> GpuTier {
    let accepted = settings.accepted_models.as_ref();
    accepted.and_then(|m| m.get(model).copied()).unwrap_or_else(|| GpuTier::of_model(model))
}

/// Proof of compute in force: the flags' (`flags`, off when `None`), turned on by a policy's
/// verification interval, with the interval, failures allowed in a row and the accepted
/// models' throughput the policy sets on top.
fn effective_proof(
    flags: Option<&ProofSettings>,
    policy: &MarketPolicySpec,
) -> Option<ProofSettings> {
    let interval = policy.verification_interval.as_deref().and_then(|v| parse_duration(v).ok());
    let flags = match (flags, interval) {
        (Some(flags), _) => flags.clone(),
        (None, Some(_)) => ProofSettings::default(),
        (None, None) => return None,
    };
    let throughput = policy.accepted_models.iter().flatten();
    Some(ProofSettings {
        interval: interval.unwrap_or(flags.interval),
        failures_before_unverified: policy
            .failed_challenges_before_unverified
            .unwrap_or(flags.failures_before_unverified),
        throughput_permille: throughput
            .map(|m| (m.model.clone(), m.relative_throughput_permille))
            .collect(),
        ..flags
    })
}

/// The settlement configuration in force: the flags' (`flags`), with the settlement period,
/// deposit margin, heartbeat timeout, market fee, stake minimums (all tiers, when it lists
/// any) and slash rate the policy sets on top.
pub fn effective_settlement(
    flags: &SettlementConfig,
    policy: Option<&MarketPolicySpec>,
) -> SettlementConfig {
    let Some(policy) = policy else { return flags.clone() };
    SettlementConfig {
        period: policy_duration(&policy.settlement_period, flags.period)
            .max(Duration::from_secs(1)),
        deposit_margin_percent: policy
            .deposit_margin_percent
            .unwrap_or(flags.deposit_margin_percent),
        heartbeat_timeout: policy_duration(&policy.heartbeat_timeout, flags.heartbeat_timeout),
        market_fee_permille: policy.market_fee_permille.unwrap_or(flags.market_fee_permille),
        stake: effective_stake(&flags.stake, Some(policy)),
        ..flags.clone()
    }
}

/// The stake policy in force: the flags' (`flags`), with the stake minimums (all tiers, when
/// the policy lists any) and slash rate the policy sets on top.
pub fn effective_stake(flags: &StakePolicy, policy: Option<&MarketPolicySpec>) -> StakePolicy {
    let Some(policy) = policy else { return flags.clone() };
    StakePolicy {
        min_per_gpu: policy.min_stake_per_gpu.as_ref().map_or_else(
            || flags.min_per_gpu.clone(),
            |tiers| tiers.iter().map(|t| (t.tier, t.amount)).collect(),
        ),
        slash_permille: policy.slash_permille.unwrap_or(flags.slash_permille),
        ..flags.clone()
    }
}

/// What changed from `old` to `new`, one `field: old → new` per changed field (`-` for unset).
pub fn changes(old: &MarketPolicySpec, new: &MarketPolicySpec) -> Vec<String> {
    let (old, new) = (fields(old), fields(new));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            let shown =
                |v: Option<&serde_json::Value>| v.map_or("-".to_string(), |v| v.to_string());
            format!("{k}: {} → {}", shown(old.get(k)), shown(new.get(k)))
        })
        .collect()
}

fn fields(spec: &MarketPolicySpec) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(spec) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

/// The field manager that wrote the policy last (from its managedFields), as "who".
fn last_writer(policy: &MarketPolicy) -> String {
    policy
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .max_by_key(|f| f.time.as_ref().map(|t| t.0))
        .and_then(|f| f.manager.clone())
        .unwrap_or_else(|| "unknown".into())
}

/// Publishes an Event on the policy for each change, until the future is dropped. The first
/// sight of a policy (at start) is an Event too, so the log shows which rules are in force.
pub async fn run(ctx: Arc<Context>) {
    let mut seen: Option<MarketPolicySpec> = None;
    let policies: Api<MarketPolicy> = Api::all(ctx.client.clone());
    let mut updates = std::pin::pin!(
        watcher(policies.clone(), watcher::Config::default()).default_backoff().applied_objects()
    );
    while let Some(update) = updates.next().await {
        let policy = match update {
            Ok(policy) => policy,
            Err(e) => {
                tracing::warn!(error = %e, "watching the MarketPolicy");
                continue;
            }
        };
        let changed = changes(seen.as_ref().unwrap_or(&MarketPolicySpec::default()), &policy.spec);
        if changed.is_empty() {
            continue;
        }
        let note = format!("by {}: {}", last_writer(&policy), changed.join("; "));
        tracing::info!(policy = %policy.name_any(), %note, "market policy changed");
        ctx.event(&policy, EventType::Normal, "PolicyChanged", "Apply", note).await;
        let status = serde_json::json!({
            "apiVersion": "gpumarket.io/v1alpha1",
            "kind": "MarketPolicy",
            "status": {"observedGeneration": policy.metadata.generation},
        });
        let apply = PatchParams::apply(MANAGER).force();
        if let Err(e) =
            policies.patch_status(&policy.name_any(), &apply, &Patch::Apply(&status)).await
        {
            tracing::warn!(error = %e, "writing the MarketPolicy status");
        }
        seen = Some(policy.spec.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_overrides_the_flags_it_sets() {
        let flags = Settings::default();
        assert_eq!(effective(&flags, None).heartbeat_timeout, flags.heartbeat_timeout);
        let policy = MarketPolicySpec {
            heartbeat_timeout: Some("2m".into()),
            require_signed_offers: Some(false),
            ..Default::default()
        };
        let settings = effective(&flags, Some(&policy));
        assert_eq!(settings.heartbeat_timeout, Duration::from_secs(120));
        assert!(!settings.require_signed_offers);
        assert_eq!(settings.provisioning_timeout, flags.provisioning_timeout, "left to the flag");
    }

    #[test]
    fn the_policy_sets_how_offers_are_challenged() {
        use gpumarket_crds::policy::AcceptedModel;
        let off = Settings::default();
        assert_eq!(effective(&off, Some(&MarketPolicySpec::default())).proof_of_compute, None);
        let policy = MarketPolicySpec {
            verification_interval: Some("30m".into()),
            failed_challenges_before_unverified: Some(3),
            accepted_models: Some(vec![AcceptedModel {
                model: "A100".into(),
                tier: GpuTier::A100,
                relative_throughput_permille: 400,
            }]),
            ..Default::default()
        };
        let proof = effective(&off, Some(&policy)).proof_of_compute.expect("turned on");
        assert_eq!(proof.interval, Duration::from_secs(1800));
        assert_eq!(proof.failures_before_unverified, 3);
        assert_eq!(proof.throughput_permille.get("A100"), Some(&400));
        let accepted = effective(&off, Some(&policy)).accepted_models;
        assert_eq!(accepted, Some([("A100".to_string(), GpuTier::A100)].into()));
        let flags = Settings {
            proof_of_compute: Some(ProofSettings {
                interval: Duration::from_secs(60),
                grace: Duration::from_secs(1),
                ..ProofSettings::default()
            }),
            ..Settings::default()
        };
        let proof = effective(&flags, Some(&policy)).proof_of_compute.expect("on");
        assert_eq!(
            (proof.interval, proof.grace),
            (Duration::from_secs(1800), Duration::from_secs(1))
        );
        let silent = effective(&flags, Some(&MarketPolicySpec::default())).proof_of_compute;
        assert_eq!(silent, flags.proof_of_compute, "the flags' own");
    }

    #[test]
    fn a_model_is_of_the_tier_the_policy_gives_it() {
        let settings = Settings {
            accepted_models: Some([("H200".to_string(), GpuTier::A100)].into()),
            ..Settings::default()
        };
        assert_eq!(tier_of(&settings, "H200"), GpuTier::A100, "the policy's");
        assert_eq!(tier_of(&Settings::default(), "H200"), GpuTier::H100, "its name's");
        assert_eq!(tier_of(&settings, "A6000"), GpuTier::A6000, "a model it does not list");
    }

    #[test]
    fn the_policy_overrides_the_settlement_flags_it_sets() {
        let mut flags = SettlementConfig::new(
            "http://rpc".into(),
            "k.json".into(),
            "mint".into(),
            Duration::from_secs(3600),
        );
        flags.deposit_margin_percent = 5;
        assert_eq!(effective_settlement(&flags, None).period, flags.period);
        let policy = MarketPolicySpec {
            settlement_period: Some("10m".into()),
            deposit_margin_percent: Some(25),
            market_fee_permille: Some(30),
            heartbeat_timeout: Some("2m".into()),
            ..Default::default()
        };
        let settlement = effective_settlement(&flags, Some(&policy));
        assert_eq!(settlement.period, Duration::from_secs(600));
        assert_eq!(settlement.deposit_margin_percent, 25);
        assert_eq!(settlement.market_fee_permille, 30);
        assert_eq!(settlement.heartbeat_timeout, Duration::from_secs(120));
        let silent = MarketPolicySpec::default();
        assert_eq!(effective_settlement(&flags, Some(&silent)).deposit_margin_percent, 5);
    }

    #[test]
    fn the_policy_sets_stake_minimums_and_the_slash_rate() {
        use gpumarket_crds::GpuTier;
        use gpumarket_crds::policy::TierStake;
        let mut flags = SettlementConfig::new(
            "http://rpc".into(),
            "k.json".into(),
            "mint".into(),
            Duration::from_secs(3600),
        );
        flags.stake.min_per_gpu = [(GpuTier::H100, 500), (GpuTier::Rtx4090, 50)].into();
        flags.stake.slash_permille = 100;
        let silent = effective_settlement(&flags, Some(&MarketPolicySpec::default()));
        assert_eq!(silent.stake, flags.stake);
        let policy = MarketPolicySpec {
            min_stake_per_gpu: Some(vec![TierStake { tier: GpuTier::H100, amount: 900 }]),
            slash_permille: Some(250),
            ..Default::default()
        };
        let stake = effective_settlement(&flags, Some(&policy)).stake;
        assert_eq!(stake.minimum(GpuTier::H100, 2), 1800);
        assert_eq!(stake.minimum(GpuTier::Rtx4090, 2), 0, "the policy's list replaces the flags'");
        assert_eq!(stake.slash_permille, 250);
        assert_eq!(stake.unbond_cooldown, flags.stake.unbond_cooldown, "left to the flag");
    }

    #[test]
    fn changes_name_each_field_with_its_old_and_new_value() {
        let old = MarketPolicySpec { slash_permille: Some(100), ..Default::default() };
        let new = MarketPolicySpec {
            slash_permille: Some(250),
            market_fee_permille: Some(20),
            ..Default::default()
        };
        assert_eq!(changes(&old, &new), ["marketFeePermille: - → 20", "slashPermille: 100 → 250"]);
        assert!(changes(&new, &new).is_empty());
    }
}
