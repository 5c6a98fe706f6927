//! Supplier stake and slashing.
//!
//! Suppliers bond stake by transferring tokens to the escrow account with the memo
//! `stake:<node>`. An offer whose stake is below the configured minimum per GPU of its tier is
//! not matched; a lease ended by a supplier failure slashes a configured fraction of the node's
//! remaining stake to the buyer.

use std::collections::BTreeMap;

use gpumarket_crds::{GpuOffer, GpuTier};

/// Record period of a slash on the failed lease (payout periods are numbers).
pub const SLASH_PERIOD: &str = "slash";

/// Minimum stake per GPU, by tier; tiers not listed need none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StakePolicy {
    pub min_per_gpu: BTreeMap<GpuTier, u64>,
    /// Share of the remaining stake slashed per supplier failure, in per-mille.
    pub slash_permille: u32,
}

impl StakePolicy {
    /// Stake an offer of `gpus` GPUs of `tier` must have bonded to be matched.
    pub fn minimum(&self, tier: GpuTier, gpus: u32) -> u64 {
        self.min_per_gpu.get(&tier).copied().unwrap_or(0).saturating_mul(u64::from(gpus))
    }

    /// Whether the offer's bonded stake (as settlement last wrote it in its status) covers the
    /// minimum for every GPU it offers; only such offers are matched while settlement is on.
    pub fn admits(&self, offer: &GpuOffer) -> bool {
        let stake = offer.bonded_stake();
        let minimum = offer
            .spec
            .gpus
            .iter()
            .fold(0u64, |sum, gpu| sum.saturating_add(self.minimum(gpu.tier(), 1)));
        stake >= minimum
    }

    /// Amount slashed from a node with `remaining` stake: rounded down, never more than is left.
    pub fn slash(&self, remaining: u64) -> u64 {
        let amount = u128::from(remaining) * u128::from(self.slash_permille.min(1000)) / 1000;
        u64::try_from(amount).unwrap_or(remaining)
    }
}

/// Parse `TIER=AMOUNT,...` (e.g. `H100=5000000,A100=2000000`), the flag's format.
pub fn parse_min_per_gpu(s: &str) -> Result<BTreeMap<GpuTier, u64>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (tier, amount) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: write TIER=AMOUNT, e.g. H100=5000000"))?;
        let tier = GpuTier::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(tier.trim()))
            .ok_or_else(|| {
                format!("{tier:?} is not a tier (H100, A100, A6000, RTX4090, RTX3090, Other)")
            })?;
        let amount = amount
            .trim()
            .parse()
            .map_err(|_| format!("{amount:?} is not an amount in base units"))?;
        out.insert(tier, amount);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> StakePolicy {
        StakePolicy {
            min_per_gpu: parse_min_per_gpu("H100=1000, a100=400").expect("valid"),
            slash_permille: 250,
        }
    }

    #[test]
    fn minimum_stake_scales_with_gpus_of_the_tier() {
        let p = policy();
        assert_eq!(p.minimum(GpuTier::H100, 8), 8000);
        assert_eq!(p.minimum(GpuTier::A100, 2), 800);
        assert_eq!(p.minimum(GpuTier::Rtx4090, 8), 0);
    }

    #[test]
    fn an_offer_is_admitted_once_its_stake_covers_every_gpu() {
        let mut offer = crate::testing::mk_offer("n1", "H100", 2, crate::testing::now());
        assert!(!policy().admits(&offer), "unstaked H100s are not matched");
        let bond = |bonded| Some(gpumarket_crds::StakeStatus { bonded, ..Default::default() });
        offer.status.get_or_insert_default().stake = bond(1999);
        assert!(!policy().admits(&offer));
        offer.status.get_or_insert_default().stake = bond(2000);
        assert!(policy().admits(&offer));
        offer.status.get_or_insert_default().stake = None;
        assert!(StakePolicy::default().admits(&offer), "no minimum, no stake needed");
    }

    #[test]
    fn slash_is_the_fraction_rounded_down() {
        assert_eq!(policy().slash(1001), 250);
        assert_eq!(policy().slash(0), 0);
    }

    #[test]
    fn bad_policy_strings_say_what_to_write() {
        assert!(parse_min_per_gpu("H100").expect_err("refused").contains("TIER=AMOUNT"));
        assert!(parse_min_per_gpu("T4=5").expect_err("refused").contains("not a tier"));
        assert!(parse_min_per_gpu("H100=x").expect_err("refused").contains("base units"));
        assert_eq!(parse_min_per_gpu("").map(|m| m.len()), Ok(0));
    }

    proptest! {
        #[test]
        fn slash_never_exceeds_the_stake(stake: u64, permille in 0u32..5000) {
            let p = StakePolicy { slash_permille: permille, ..StakePolicy::default() };
            prop_assert!(p.slash(stake) <= stake);
        }
    }
}
