//! Lease terms: the market's rules in force when a lease is bound, written into its spec
//! ([`at_binding`]), and read back from it for as long as the lease lives (the accessors below),
//! so that a MarketPolicy change applies to leases bound after it and never to a running one.
//! A lease bound before terms were recorded has none: the rules in force apply to it.

use std::time::Duration;

use gpumarket_crds::{GpuLease, LeaseTerms};

use crate::runtime::context::Settings;
use crate::settlement::SettlementConfig;

/// The terms a lease bound now gets: the settings and the settlement configuration in force
/// (both with the MarketPolicy applied, see [`super::effective`]); settlement's terms only when
/// settlement is on.
pub fn at_binding(settings: &Settings, settlement: Option<&SettlementConfig>) -> LeaseTerms {
    LeaseTerms {
        heartbeat_timeout_seconds: whole_seconds(settings.heartbeat_timeout),
        provisioning_timeout_seconds: whole_seconds(settings.provisioning_timeout),
        settlement_period_seconds: settlement.map(|s| whole_seconds(s.period)),
        deposit_margin_percent: settlement.map(|s| s.deposit_margin_percent),
        market_fee_permille: settlement.map(|s| s.market_fee_permille),
        slash_permille: settlement.map(|s| s.stake.slash_permille),
        mint: None, // the cluster's, set where it is bound
    }
}

/// Seconds, rounded up (a timeout never shrinks), at least 1.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_millis().div_ceil(1000).clamp(1, u128::from(u64::MAX)) as u64
}

fn terms(lease: &GpuLease) -> Option<&LeaseTerms> {
    lease.spec.terms.as_ref()
}

/// How long `lease`'s node may go without a heartbeat before the lease ends; `in_force` for a
/// lease without terms.
pub fn heartbeat_timeout(lease: &GpuLease, in_force: Duration) -> Duration {
    terms(lease).map_or(in_force, |t| Duration::from_secs(t.heartbeat_timeout_seconds))
}

/// How long `lease`'s workers may take to be Ready after the bind; `in_force` for a lease
/// without terms.
pub fn provisioning_timeout(lease: &GpuLease, in_force: Duration) -> Duration {
    terms(lease).map_or(in_force, |t| Duration::from_secs(t.provisioning_timeout_seconds))
}

/// How often `lease` is paid; `in_force` for a lease without a settlement period in its terms.
pub fn settlement_period(lease: &GpuLease, in_force: Duration) -> Duration {
    terms(lease).and_then(|t| t.settlement_period_seconds).map_or(in_force, Duration::from_secs)
}

/// The market's part of a payout of `amount` for `lease`, at the fee in its terms (none for a
/// lease bound without terms: it was agreed without a fee).
pub fn market_fee(lease: &GpuLease, amount: u64) -> u64 {
    let permille = terms(lease).and_then(|t| t.market_fee_permille).unwrap_or(0);
    (u128::from(amount) * u128::from(permille.min(1000)) / 1000) as u64
}

/// The share of its node's stake slashed if `lease` ends by a supplier failure, per mille;
/// `in_force` for a lease without a slash rate in its terms.
pub fn slash_permille(lease: &GpuLease, in_force: u32) -> u32 {
    terms(lease).and_then(|t| t.slash_permille).unwrap_or(in_force)
}

/// The deposit margin of a bind with these terms, in percent (0 without settlement).
pub fn deposit_margin_percent(terms: &LeaseTerms) -> u32 {
    terms.deposit_margin_percent.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease};

    fn settlement(period: Duration, margin: u32, fee: u32) -> SettlementConfig {
        let mut config =
            SettlementConfig::new("http://rpc".into(), "k.json".into(), "mint".into(), period);
        config.deposit_margin_percent = margin;
        config.market_fee_permille = fee;
        config.stake.slash_permille = 100;
        config
    }

    #[test]
    fn terms_at_binding_are_the_rules_in_force() {
        let settings = Settings {
            heartbeat_timeout: Duration::from_millis(1500),
            provisioning_timeout: Duration::from_secs(600),
            ..Settings::default()
        };
        let settled = at_binding(&settings, Some(&settlement(Duration::from_secs(3600), 10, 20)));
        assert_eq!(
            settled,
            LeaseTerms {
                heartbeat_timeout_seconds: 2,
                provisioning_timeout_seconds: 600,
                settlement_period_seconds: Some(3600),
                deposit_margin_percent: Some(10),
                market_fee_permille: Some(20),
                slash_permille: Some(100),
                mint: None,
            },
            "a timeout is rounded up to whole seconds"
        );
        let unsettled = at_binding(&settings, None);
        assert_eq!(unsettled.settlement_period_seconds, None);
        assert_eq!(unsettled.market_fee_permille, None);
        assert_eq!(deposit_margin_percent(&unsettled), 0);
    }

    #[test]
    fn a_lease_keeps_its_terms_whatever_is_in_force_now() {
        let cluster = mk_cluster("c", 1, 1);
        let bound_then = at_binding(
            &Settings { heartbeat_timeout: Duration::from_secs(60), ..Settings::default() },
            Some(&settlement(Duration::from_secs(3600), 10, 20)),
        );
        let mut lease = mk_lease(&cluster, "n", &["n-gpu-0"], 1);
        lease.spec.terms = Some(bound_then);
        let now_in_force = Duration::from_secs(5);
        assert_eq!(heartbeat_timeout(&lease, now_in_force), Duration::from_secs(60));
        assert_eq!(provisioning_timeout(&lease, now_in_force), Duration::from_secs(600));
        assert_eq!(settlement_period(&lease, now_in_force), Duration::from_secs(3600));

        assert_eq!(market_fee(&lease, 1000), 20, "2 % of each payout");
        assert_eq!(market_fee(&lease, 49), 0, "rounded down, in the supplier's favour");
        assert_eq!(slash_permille(&lease, 500), 100, "the slash rate agreed at the bind");

        lease.spec.terms = None;
        assert_eq!(heartbeat_timeout(&lease, now_in_force), now_in_force, "an older lease");
        assert_eq!(market_fee(&lease, 1000), 0, "agreed without a fee");
        assert_eq!(settlement_period(&lease, now_in_force), now_in_force);
        assert_eq!(slash_permille(&lease, 500), 500);
    }
}
