//! Supplier stake and slashing.
//!
//! Each node has a stake account of its own (see [`super::accounts`]). A supplier bonds stake by
//! transferring tokens from the offer's wallet into it; anything else sent there is returned to
//! its sender. An offer whose bonded stake is below the configured minimum per GPU of its tier
//! is not matched; a lease ended by a supplier failure slashes a configured fraction of the
//! node's bonded stake to the buyer. The offer's wallet asks to unbond with a transfer carrying
//! the memo `gpumarket unbond`; after the cooldown, with no lease active on the node, the stake
//! goes back to the wallet.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use gpumarket_crds::{GpuOffer, GpuTier};
use solana_pubkey::Pubkey;

use super::memo;

/// Record period of a slash on the failed lease (payout periods are numbers).
pub const SLASH_PERIOD: &str = "slash";

/// Minimum stake per GPU, by tier; tiers not listed need none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StakePolicy {
    pub min_per_gpu: BTreeMap<GpuTier, u64>,
    /// Share of the remaining stake slashed per supplier failure, in per-mille.
    pub slash_permille: u32,
    /// How long after asking to unbond the stake stays bonded (slashable).
    pub unbond_cooldown: Duration,
}

impl Default for StakePolicy {
    fn default() -> Self {
        StakePolicy {
            min_per_gpu: BTreeMap::new(),
            slash_permille: 0,
            unbond_cooldown: Duration::from_secs(24 * 3600),
        }
    }
}

impl StakePolicy {
    /// Stake an offer of `gpus` GPUs of `tier` must have bonded to be matched.
    pub fn minimum(&self, tier: GpuTier, gpus: u32) -> u64 {
        self.min_per_gpu.get(&tier).copied().unwrap_or(0).saturating_mul(u64::from(gpus))
    }

    /// Whether the offer's bonded stake (as settlement last wrote it in its status) covers the
    /// minimum for every GPU it offers (each of the tier `tier_of` its model), and is not being
    /// unbonded; only such offers are matched while settlement is on.
    pub fn admits(&self, offer: &GpuOffer, tier_of: impl Fn(&str) -> GpuTier) -> bool {
        if offer.unbonding() {
            return false;
        }
        let stake = offer.bonded_stake();
        let minimum = offer
            .spec
            .gpus
            .iter()
            .fold(0u64, |sum, gpu| sum.saturating_add(self.minimum(tier_of(&gpu.model), 1)));
        stake >= minimum
    }

    /// Amount slashed from a node with `remaining` stake at this policy's rate.
    pub fn slash(&self, remaining: u64) -> u64 {
        slashed(remaining, self.slash_permille)
    }
}

/// Amount slashed from a node with `remaining` stake at `permille`: rounded down, never more
/// than is left.
pub fn slashed(remaining: u64, permille: u32) -> u64 {
    let amount = u128::from(remaining) * u128::from(permille.min(1000)) / 1000;
    u64::try_from(amount).unwrap_or(remaining)
}

/// A transaction that moved tokens into (or asked something of) a node's stake account, as its
/// history shows it. Settlement's own payments out are not entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StakeEntry {
    pub signature: String,
    /// Block time, seconds since the epoch.
    pub block_time: Option<i64>,
    /// Change of the stake account's balance (positive: into it).
    pub delta: i128,
    /// Owner of the token account the tokens came from (whose balance fell the most).
    pub sender: Option<Pubkey>,
    pub signers: Vec<Pubkey>,
    pub memos: Vec<String>,
}

/// Tokens in a stake account that are not the offer wallet's bond: returned to their sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// What the return pays (its record's period): `return:<start of the deposit's signature>`.
    pub what: String,
    pub key: String,
    pub to: Pubkey,
    pub amount: u64,
}

/// An unbond the offer's wallet asked for and that is not paid yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnbondRequest {
    /// `unbond:<start of the request's signature>`.
    pub what: String,
    pub key: String,
    /// When it was asked (block time, seconds since the epoch).
    pub at: Option<i64>,
}

/// A node's stake account, read: what is bonded, what is owed back to others, whether an
/// unbond is pending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StakeBook {
    pub account: Pubkey,
    /// What the account holds.
    pub balance: u64,
    pub bonded: u64,
    pub foreign: Vec<Foreign>,
    pub unbond: Option<UnbondRequest>,
}

/// The stake book of `node` from its account's `balance`, its history `entries` (oldest
/// first), the settlement keys already paid from it, and the amount of its payments in flight.
/// Only transfers whose sender is the offer's `wallet` bond; the others are owed back.
pub fn book(
    node: &str,
    account: Pubkey,
    wallet: Option<Pubkey>,
    balance: u64,
    entries: &[StakeEntry],
    paid: &HashMap<String, String>,
    in_flight: u64,
) -> StakeBook {
    let foreign: Vec<Foreign> = entries
        .iter()
        .filter(|e| e.delta > 0 && (wallet.is_none() || e.sender != wallet))
        .filter_map(|e| {
            let what = format!("return:{}", short(&e.signature));
            let key = memo::stake_key(node, &what);
            let to = e.sender?;
            let amount = u64::try_from(e.delta).unwrap_or(u64::MAX);
            (!paid.contains_key(&key)).then_some(Foreign { what, key, to, amount })
        })
        .collect();
    let owed: u64 = foreign.iter().fold(0, |sum, f| sum.saturating_add(f.amount));
    let unbond = wallet.and_then(|wallet| {
        let asked = entries
            .iter()
            .rev()
            .find(|e| e.signers.contains(&wallet) && e.memos.iter().any(|m| memo::is_unbond(m)))?;
        let what = format!("unbond:{}", short(&asked.signature));
        let key = memo::stake_key(node, &what);
        (!paid.contains_key(&key)).then_some(UnbondRequest { what, key, at: asked.block_time })
    });
    StakeBook {
        account,
        balance,
        bonded: balance.saturating_sub(owed).saturating_sub(in_flight),
        foreign,
        unbond,
    }
}

/// The first 24 characters of a signature: unique among a node's transactions, short enough for
/// a record's period.
fn short(signature: &str) -> &str {
    signature.get(..24).unwrap_or(signature)
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
            ..StakePolicy::default()
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
        assert!(!policy().admits(&offer, GpuTier::of_model), "unstaked H100s are not matched");
        let bond = |bonded| Some(gpumarket_crds::StakeStatus { bonded, ..Default::default() });
        offer.status.get_or_insert_default().stake = bond(1999);
        assert!(!policy().admits(&offer, GpuTier::of_model));
        offer.status.get_or_insert_default().stake = bond(2000);
        assert!(policy().admits(&offer, GpuTier::of_model));
        offer.status.get_or_insert_default().stake = None;
        assert!(
            StakePolicy::default().admits(&offer, GpuTier::of_model),
            "no minimum, no stake needed"
        );
        let unbonding = gpumarket_crds::StakeStatus {
            bonded: 5000,
            unbond_requested: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                crate::testing::now(),
            )),
            ..Default::default()
        };
        offer.status.get_or_insert_default().stake = Some(unbonding);
        assert!(
            !policy().admits(&offer, GpuTier::of_model),
            "an offer being unbonded is not matched"
        );
        offer.status.get_or_insert_default().stake = bond(2000);
        assert!(policy().admits(&offer, GpuTier::of_model));
        let as_rtx = |_: &str| GpuTier::Rtx4090;
        assert!(policy().admits(&offer, as_rtx), "the tier the market's policy gives the model");
    }

    fn entry(signature: &str, delta: i128, sender: Pubkey, memos: &[&str]) -> StakeEntry {
        StakeEntry {
            signature: signature.into(),
            block_time: Some(1000),
            delta,
            sender: Some(sender),
            signers: vec![sender],
            memos: memos.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    #[test]
    fn only_the_offer_wallet_bonds_and_the_rest_is_owed_back() {
        let (wallet, stranger, account) =
            (Pubkey::new_unique(), Pubkey::new_unique(), Pubkey::new_unique());
        let entries = [
            entry("s1", 700, wallet, &[]),
            entry("s2", 300, stranger, &["stake:n1"]),
            entry("s3", 50, wallet, &[]),
        ];
        let book = book("n1", account, Some(wallet), 1050, &entries, &HashMap::new(), 0);
        assert_eq!(book.bonded, 750);
        assert_eq!(book.foreign.len(), 1);
        assert_eq!((book.foreign[0].to, book.foreign[0].amount), (stranger, 300));
        assert_eq!(book.foreign[0].key, memo::stake_key("n1", "return:s2"));
        assert_eq!(book.foreign[0].what, "return:s2");

        // Once the return is paid, it is no longer owed; payments in flight are not counted.
        let paid = HashMap::from([(book.foreign[0].key.clone(), "sig".to_owned())]);
        let after = super::book("n1", account, Some(wallet), 750, &entries, &paid, 100);
        assert!(after.foreign.is_empty());
        assert_eq!(after.bonded, 650);
        assert!(after.unbond.is_none());
    }

    #[test]
    fn an_unbond_counts_only_from_the_offer_wallet_and_until_paid() {
        let (wallet, stranger, account) =
            (Pubkey::new_unique(), Pubkey::new_unique(), Pubkey::new_unique());
        let asked_by_other =
            [entry("s1", 500, wallet, &[]), entry("s2", 0, stranger, &[memo::UNBOND])];
        let none = book("n1", account, Some(wallet), 500, &asked_by_other, &HashMap::new(), 0);
        assert_eq!(none.unbond, None, "a stranger cannot unbond a node's stake");
        let asked = [entry("s1", 500, wallet, &[]), entry("s2", 0, wallet, &[memo::UNBOND])];
        let pending = book("n1", account, Some(wallet), 500, &asked, &HashMap::new(), 0);
        let request = pending.unbond.expect("unbond pending");
        assert_eq!(request.at, Some(1000));
        let paid = HashMap::from([(request.key, "sig".to_owned())]);
        assert_eq!(book("n1", account, Some(wallet), 0, &asked, &paid, 0).unbond, None);
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
