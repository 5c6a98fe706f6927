//! What a settlement round does, decided from the leases, clusters and offers and from what each
//! account holds on chain: which leases run out of funds, which payouts are due (each capped by
//! its cluster's own escrow), which slashes (capped by the node's own stake), which clusters get
//! their refund, and which stake goes back to whom.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use gpumarket_crds::{
    ClusterPhase, ConvertedPayout, EndReason, GpuCluster, GpuLease, GpuOffer, LeasePhase,
    SettlementRecord, SettlementState,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use solana_pubkey::Pubkey;

use super::accounts;
use super::escrow::{Accrual, EscrowAccount, exhausted};
use super::memo::payout_key;
use super::meter::{Meter, Paid, fully_settled, is_payout_period, next_due, tokens_moved};
use super::pricing::Conversion;
use super::stake::{SLASH_PERIOD, StakeBook, StakePolicy, slashed};
use super::transaction::Payment;
use crate::policy::terms::market_fee;

/// Everything a round decides from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub leases: &'a [GpuLease],
    pub clusters: &'a [GpuCluster],
    pub offers: &'a [GpuOffer],
    /// What each cluster's escrow holds, and of which mint, by cluster uid (escrows that
    /// exist).
    pub escrows: &'a HashMap<String, EscrowAccount>,
    /// Each node's stake account, read, by node name.
    pub stakes: &'a HashMap<String, StakeBook>,
    /// The settlement authority (the escrows' and stake accounts' addresses derive from it).
    pub authority: Pubkey,
    /// The settlement period in force, for leases without one in their terms.
    pub period: Duration,
    /// Time until the next round: an escrow must cover at least this much more usage.
    pub lookahead: Duration,
    pub stake: &'a StakePolicy,
    /// How price units become each accepted mint's tokens this round (paused: no payout in
    /// that mint, no lease paying in it runs out).
    pub conversions: &'a HashMap<Pubkey, Conversion>,
    /// The market's mint, which stake (and so slashes) is in.
    pub market_mint: Pubkey,
    pub now: Timestamp,
}

/// The conversion of a mint the market no longer accepts: nothing in it is paid or ended.
static NOT_ACCEPTED: Conversion = Conversion::Paused(String::new());

impl Inputs<'_> {
    /// How price units become the tokens of cluster `uid`'s escrow this round (a cluster
    /// without one holds nothing: 1:1 of nothing).
    fn conversion_of(&self, uid: &str) -> &Conversion {
        match self.escrows.get(uid) {
            Some(escrow) => self.conversions.get(&escrow.mint).unwrap_or(&NOT_ACCEPTED),
            None => &Conversion::OneToOne,
        }
    }
}

/// Where a payment's record is kept.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    /// In the lease's `status.settlements` (payouts and slashes).
    Lease { name: String, period: String },
    /// In the offer's `status.stake.returns` (stake returned or unbonded).
    Stake { offer: String, period: String },
    /// In the cluster's `status.escrow.refund`.
    Refund { namespace: String, name: String },
}

/// A payment to record and send: its holder, its record (state `Signed`, signature still to
/// fill in), the payment and the mint it moves.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub holder: Holder,
    pub record: SettlementRecord,
    pub payment: Payment,
    pub mint: Pubkey,
}

/// The payments of a round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Payouts {
    pub to_send: Vec<Planned>,
    /// Lease records that move no tokens (nothing to pay): confirmed as they are written.
    pub without_transfer: Vec<(String, SettlementRecord)>,
}

/// A refund to record and send: the whole escrow back to the buyer, the account closed.
#[derive(Clone, Debug, PartialEq)]
pub struct Refund {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub buyer: Pubkey,
    pub escrow: Pubkey,
    pub mint: Pubkey,
    pub balance: u64,
}

fn cluster_uid(cluster: &GpuCluster) -> &str {
    cluster.metadata.uid.as_deref().unwrap_or_default()
}

fn records(lease: &GpuLease) -> &[SettlementRecord] {
    lease.status.as_ref().map_or(&[], |s| &s.settlements)
}

fn is_active(lease: &GpuLease) -> bool {
    lease.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == LeasePhase::Active
        && lease.status.as_ref().and_then(|s| s.end_time.as_ref()).is_none()
}

fn signed(record: &SettlementRecord) -> bool {
    record.state == SettlementState::Signed
}

/// The refund record of a cluster.
pub fn refund_record(cluster: &GpuCluster) -> Option<&SettlementRecord> {
    cluster.status.as_ref()?.escrow.as_ref()?.refund.as_ref()
}

/// A new `Signed` record (its transaction still to sign).
pub fn new_record(period: String, through: Timestamp, amount: u64) -> SettlementRecord {
    SettlementRecord {
        period,
        through: Time(through),
        amount,
        conversion: None,
        signature: None,
        last_valid_block_height: None,
        signed_slot: None,
        transaction: None,
        state: SettlementState::Signed,
    }
}

/// What each cluster's escrow can still pay, in base units: its balance less its payouts in
/// flight.
pub fn escrow_available(inputs: &Inputs<'_>) -> HashMap<String, u64> {
    let mut available: HashMap<String, u64> =
        inputs.escrows.iter().map(|(uid, e)| (uid.clone(), e.balance)).collect();
    for lease in inputs.leases {
        let in_flight: u64 = records(lease)
            .iter()
            .filter(|r| is_payout_period(&r.period) && signed(r))
            .map(tokens_moved)
            .sum();
        if let Some(left) = available.get_mut(&lease.spec.cluster.uid) {
            *left = left.saturating_sub(in_flight);
        }
    }
    available
}

/// Amount in flight out of each node's stake account that its book does not already owe:
/// slashes and unbonds (returns of others' tokens are owed until paid, see [`StakeBook`]).
pub fn stake_in_flight(leases: &[GpuLease], offers: &[GpuOffer]) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for lease in leases {
        for r in records(lease).iter().filter(|r| r.period == SLASH_PERIOD && signed(r)) {
            *out.entry(lease.spec.offer.clone()).or_default() += r.amount;
        }
    }
    for offer in offers {
        let returns = offer.status.as_ref().and_then(|s| s.stake.as_ref()).map(|s| &s.returns);
        for r in
            returns.into_iter().flatten().filter(|r| r.period.starts_with("unbond:") && signed(r))
        {
            *out.entry(offer.name_any()).or_default() += r.amount;
        }
    }
    out
}

/// Active leases whose cluster's escrow is exhausted: they end now (OutOfFunds).
pub fn out_of_funds(inputs: &Inputs<'_>) -> Vec<String> {
    let available = escrow_available(inputs);
    let clusters: HashMap<&str, &GpuCluster> =
        inputs.clusters.iter().map(|c| (cluster_uid(c), c)).collect();
    let mut active: HashMap<&str, Vec<&GpuLease>> = HashMap::new();
    for lease in inputs.leases.iter().filter(|l| is_active(l)) {
        active.entry(lease.spec.cluster.uid.as_str()).or_default().push(lease);
    }
    let mut ending = Vec::new();
    for (uid, leases) in active {
        // Near the cluster's expiry only the time left needs covering.
        let lookahead = clusters
            .get(uid)
            .and_then(|c| crate::cluster::status::expires_at(c))
            .and_then(|at| at.duration_since(inputs.now).try_into().ok())
            .map_or(inputs.lookahead, |left: Duration| left.min(inputs.lookahead));
        let accruals: Vec<Accrual> = leases
            .iter()
            .map(|l| {
                let meter = Meter::of(l);
                Accrual {
                    unpaid: meter.cost_through(inputs.now).saturating_sub(Paid::of(l).committed()),
                    hourly_rate: meter.hourly_rate(),
                }
            })
            .collect();
        let held = available.get(uid).copied().unwrap_or(0);
        let Some(left) = inputs.conversion_of(uid).price_units(held) else {
            continue; // no rate to judge by: nobody runs out while their payouts wait
        };
        if exhausted(left, &accruals, lookahead) {
            ending.extend(leases.iter().map(|l| l.name_any()));
        }
    }
    ending.sort();
    ending
}

/// Payouts due now, each capped by what its cluster's escrow holds; slashes of leases ended by
/// a supplier failure, capped by the node's bonded stake; stake owed back to its senders and
/// unbonded stake.
pub fn payouts(inputs: &Inputs<'_>) -> Payouts {
    let mut available = escrow_available(inputs);
    let mut out = Payouts::default();
    let mut leases: Vec<&GpuLease> = inputs.leases.iter().collect();
    leases.sort_by_key(|l| (l.spec.start_time.0, l.name_any()));
    for lease in &leases {
        let period = crate::policy::terms::settlement_period(lease, inputs.period);
        let Some(due) = next_due(&Meter::of(lease), &Paid::of(lease), period, inputs.now) else {
            continue;
        };
        let Ok(wallet) = Pubkey::from_str(&lease.spec.supplier_wallet) else {
            tracing::warn!(lease = %lease.name_any(), "supplier wallet is not a public key; not paid");
            continue;
        };
        let Some(source) = accounts::escrow_address(&inputs.authority, &lease.spec.cluster.uid)
        else {
            continue;
        };
        let uid = lease.spec.cluster.uid.as_str();
        let conversion = inputs.conversion_of(uid);
        let Some(due_tokens) = conversion.tokens(due.amount) else {
            continue; // no rate to pay at: wait for the feed
        };
        let left = available.entry(lease.spec.cluster.uid.clone()).or_default();
        let (amount, tokens) = if due_tokens <= *left {
            (due.amount, due_tokens)
        } else {
            tracing::warn!(lease = %lease.name_any(), due = due.amount, left = *left, "escrow short: paying what is left");
            let worth = conversion.price_units(*left).unwrap_or(0).min(due.amount);
            (worth, *left)
        };
        if amount == 0 && due.amount > 0 {
            continue; // nothing left: wait for a deposit
        }
        *left -= tokens;
        let record = SettlementRecord {
            conversion: conversion.record(amount).map(|c| ConvertedPayout { tokens, ..c }),
            ..new_record(due.period.clone(), due.through, amount)
        };
        if tokens == 0 {
            let confirmed = SettlementRecord { state: SettlementState::Confirmed, ..record };
            out.without_transfer.push((lease.name_any(), confirmed));
            continue;
        }
        let key = payout_key(lease.uid().as_deref().unwrap_or_default(), &record.period);
        let holder = Holder::Lease { name: lease.name_any(), period: record.period.clone() };
        out.to_send.push(Planned {
            holder,
            record,
            payment: Payment {
                key,
                source,
                wallet,
                amount: tokens,
                fee: market_fee(lease, tokens),
            },
            mint: inputs.escrows.get(uid).map_or(inputs.market_mint, |e| e.mint),
        });
    }
    plan_slashes(inputs, &leases, &mut out);
    plan_stake_payments(inputs, &mut out);
    out
}

/// The slash rate of `lease`: the one in its terms, else the policy's in force.
fn slash_permille(inputs: &Inputs<'_>, lease: &GpuLease) -> u32 {
    crate::policy::terms::slash_permille(lease, inputs.stake.slash_permille)
}

fn plan_slashes(inputs: &Inputs<'_>, leases: &[&GpuLease], out: &mut Payouts) {
    let buyers: HashMap<&str, &str> = inputs
        .clusters
        .iter()
        .map(|c| (cluster_uid(c), c.spec.payment.buyer_wallet.as_str()))
        .collect();
    let mut remaining: HashMap<&str, u64> =
        inputs.stakes.iter().map(|(node, book)| (node.as_str(), book.bonded)).collect();
    for lease in leases {
        let failed = lease
            .status
            .as_ref()
            .and_then(|s| s.end_reason)
            .is_some_and(EndReason::is_supplier_failure);
        let slash = records(lease).iter().find(|r| r.period == SLASH_PERIOD);
        let permille = slash_permille(inputs, lease);
        if !failed || permille == 0 || slash.is_some_and(|r| r.state != SettlementState::Expired) {
            continue;
        }
        let Some(buyer) =
            buyers.get(lease.spec.cluster.uid.as_str()).and_then(|w| Pubkey::from_str(w).ok())
        else {
            continue;
        };
        let (Some(book), Some(stake)) =
            (inputs.stakes.get(&lease.spec.offer), remaining.get_mut(lease.spec.offer.as_str()))
        else {
            continue;
        };
        let amount = match slash {
            Some(expired) => expired.amount.min(*stake),
            None => slashed(*stake, permille),
        };
        *stake -= amount;
        let end = lease.status.as_ref().and_then(|s| s.end_time.as_ref()).map(|t| t.0);
        let record = new_record(SLASH_PERIOD.into(), end.unwrap_or(inputs.now), amount);
        if amount == 0 {
            let confirmed = SettlementRecord { state: SettlementState::Confirmed, ..record };
            out.without_transfer.push((lease.name_any(), confirmed));
            continue;
        }
        let key = payout_key(lease.uid().as_deref().unwrap_or_default(), SLASH_PERIOD);
        let payment = Payment { key, source: book.account, wallet: buyer, amount, fee: 0 };
        let holder = Holder::Lease { name: lease.name_any(), period: SLASH_PERIOD.into() };
        out.to_send.push(Planned { holder, record, payment, mint: inputs.market_mint });
    }
}

/// The stake records of an offer.
fn stake_records(offer: &GpuOffer) -> &[SettlementRecord] {
    offer.status.as_ref().and_then(|s| s.stake.as_ref()).map_or(&[], |s| &s.returns)
}

/// Tokens sent to a stake account by anyone but the offer's wallet go back to their sender;
/// an unbond is paid once its cooldown has passed and nothing can still be slashed.
fn plan_stake_payments(inputs: &Inputs<'_>, out: &mut Payouts) {
    for offer in inputs.offers {
        let node = offer.name_any();
        let Some(book) = inputs.stakes.get(&node) else { continue };
        let recorded = |what: &str| {
            stake_records(offer)
                .iter()
                .any(|r| r.period == what && r.state != SettlementState::Expired)
        };
        for foreign in book.foreign.iter().filter(|f| !recorded(&f.what)) {
            let record = new_record(foreign.what.clone(), inputs.now, foreign.amount);
            let payment = Payment {
                key: foreign.key.clone(),
                source: book.account,
                wallet: foreign.to,
                amount: foreign.amount,
                fee: 0,
            };
            let holder = Holder::Stake { offer: node.clone(), period: foreign.what.clone() };
            out.to_send.push(Planned { holder, record, payment, mint: inputs.market_mint });
        }
        let Some(unbond) = &book.unbond else { continue };
        let Ok(wallet) = Pubkey::from_str(&offer.spec.wallet) else { continue };
        if recorded(&unbond.what) || book.bonded == 0 || !unbond_due(inputs, offer, unbond.at) {
            continue;
        }
        let record = new_record(unbond.what.clone(), inputs.now, book.bonded);
        let payment = Payment {
            key: unbond.key.clone(),
            source: book.account,
            wallet,
            amount: book.bonded,
            fee: 0,
        };
        let holder = Holder::Stake { offer: node.clone(), period: unbond.what.clone() };
        out.to_send.push(Planned { holder, record, payment, mint: inputs.market_mint });
    }
}

/// Whether an unbond asked at `asked` (block time) can be paid now: the cooldown (counted from
/// when settlement first recorded the request) has passed, no lease is active on the node and
/// no failed lease of it still waits for its slash.
fn unbond_due(inputs: &Inputs<'_>, offer: &GpuOffer, asked: Option<i64>) -> bool {
    let recorded = offer
        .status
        .as_ref()
        .and_then(|s| s.stake.as_ref())
        .and_then(|s| s.unbond_requested.as_ref())
        .map(|t| t.0.as_second());
    let Some(since) = recorded.or(asked) else { return false };
    let cooldown = i64::try_from(inputs.stake.unbond_cooldown.as_secs()).unwrap_or(i64::MAX);
    if inputs.now.as_second() < since.saturating_add(cooldown) {
        return false;
    }
    let node = offer.name_any();
    inputs.leases.iter().filter(|l| l.spec.offer == node).all(|lease| {
        let failed = lease
            .status
            .as_ref()
            .and_then(|s| s.end_reason)
            .is_some_and(EndReason::is_supplier_failure);
        let slashed = records(lease)
            .iter()
            .any(|r| r.period == SLASH_PERIOD && r.state == SettlementState::Confirmed);
        !is_active(lease) && (!failed || slashed || slash_permille(inputs, lease) == 0)
    })
}

/// Ended leases with nothing left to pay or slash whose record does not say so yet (a lease
/// that never served has no payout to confirm): they are Settled now.
pub fn closed(inputs: &Inputs<'_>) -> Vec<String> {
    inputs
        .leases
        .iter()
        .filter(|l| l.status.as_ref().and_then(|s| s.phase) == Some(LeasePhase::Ended))
        .filter(|l| fully_settled(&Meter::of(l), &Paid::of(l)))
        .filter(|l| {
            let failed = l
                .status
                .as_ref()
                .and_then(|s| s.end_reason)
                .is_some_and(EndReason::is_supplier_failure);
            let slashable =
                slash_permille(inputs, l) > 0 && inputs.stakes.contains_key(&l.spec.offer);
            let slashed = records(l).iter().any(|r| r.period == SLASH_PERIOD);
            !failed || !slashable || slashed
        })
        .map(|l| l.name_any())
        .collect()
}

/// Whether a cluster has ended: completed, failed or being deleted.
pub fn has_ended(cluster: &GpuCluster) -> bool {
    cluster.metadata.deletion_timestamp.is_some()
        || matches!(
            cluster.status.as_ref().and_then(|s| s.phase),
            Some(ClusterPhase::Completed | ClusterPhase::Failed)
        )
}

/// Clusters that have ended with every lease settled, whose escrow exists and whose refund is
/// not recorded yet (or provably never landed): their whole escrow goes back to the buyer.
pub fn refunds(inputs: &Inputs<'_>) -> Vec<Refund> {
    inputs
        .clusters
        .iter()
        .filter(|c| has_ended(c))
        .filter(|c| refund_record(c).is_none_or(|r| r.state == SettlementState::Expired))
        .filter(|c| {
            inputs
                .leases
                .iter()
                .filter(|l| l.spec.cluster.uid == cluster_uid(c))
                .all(|l| !is_active(l) && fully_settled(&Meter::of(l), &Paid::of(l)))
        })
        .filter_map(|c| {
            let uid = cluster_uid(c);
            let held = inputs.escrows.get(uid)?;
            Some(Refund {
                namespace: c.namespace().unwrap_or_default(),
                name: c.name_any(),
                uid: uid.to_owned(),
                buyer: Pubkey::from_str(&c.spec.payment.buyer_wallet).ok()?,
                escrow: accounts::escrow_address(&inputs.authority, uid)?,
                mint: held.mint,
                balance: held.balance,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settlement::stake::{Foreign, UnbondRequest};
    use crate::testing::{mk_cluster, mk_lease, mk_offer, now};
    use gpumarket_crds::{EscrowStatus, GpuClusterStatus, GpuLeaseStatus, LeaseTerms, StakeStatus};
    use std::collections::HashSet;

    const SUPPLIER: &str = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA";

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(now().as_second() + seconds).expect("valid")
    }

    /// A lease of `gpus` GPUs at 3600 base units per GPU-hour (one per GPU-second), serving from
    /// `now()`, ended at `end` seconds if given.
    fn lease(
        cluster: &GpuCluster,
        node: &str,
        gpus: usize,
        end: Option<(i64, EndReason)>,
    ) -> GpuLease {
        let names: Vec<String> = (0..gpus).map(|i| format!("{node}-gpu-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut lease = mk_lease(cluster, node, &refs, 1);
        lease.metadata.uid = Some(format!("{}-uid", lease.name_any()));
        lease.spec.price_per_gpu_hour = 3600;
        lease.spec.supplier_wallet = SUPPLIER.into();
        lease.status = Some(GpuLeaseStatus {
            phase: Some(if end.is_some() { LeasePhase::Ended } else { LeasePhase::Active }),
            serving_since: Some(Time(now())),
            end_time: end.map(|(s, _)| Time(at(s))),
            end_reason: end.map(|(_, r)| r),
            ..GpuLeaseStatus::default()
        });
        lease
    }

    fn record(
        lease: &mut GpuLease,
        period: &str,
        through: i64,
        amount: u64,
        state: SettlementState,
    ) {
        let status = lease.status.get_or_insert_default();
        status.settlements.push(SettlementRecord {
            state,
            signature: Some("sig".into()),
            ..new_record(period.into(), at(through), amount)
        });
    }

    struct World {
        authority: Pubkey,
        /// The market's mint, which the escrows are of unless [`World::paying_in`] says.
        mint: Pubkey,
        escrows: HashMap<String, EscrowAccount>,
        stakes: HashMap<String, StakeBook>,
        policy: StakePolicy,
        conversions: HashMap<Pubkey, Conversion>,
    }

    impl World {
        fn new(escrows: &[(&str, u64)]) -> World {
            let mint = Pubkey::new_unique();
            let held = |balance: u64| EscrowAccount { mint, balance };
            World {
                authority: Pubkey::new_unique(),
                mint,
                escrows: escrows.iter().map(|(u, a)| (u.to_string(), held(*a))).collect(),
                stakes: HashMap::new(),
                policy: StakePolicy::default(),
                conversions: HashMap::from([(mint, Conversion::OneToOne)]),
            }
        }

        /// The market's mint converts so.
        fn converting(mut self, conversion: Conversion) -> World {
            self.conversions.insert(self.mint, conversion);
            self
        }

        /// Cluster `uid`'s escrow is of `mint`, which converts so.
        fn paying_in(mut self, uid: &str, mint: Pubkey, conversion: Conversion) -> World {
            if let Some(escrow) = self.escrows.get_mut(uid) {
                escrow.mint = mint;
            }
            self.conversions.insert(mint, conversion);
            self
        }

        fn inputs<'a>(
            &'a self,
            leases: &'a [GpuLease],
            clusters: &'a [GpuCluster],
            offers: &'a [GpuOffer],
            now_s: i64,
        ) -> Inputs<'a> {
            Inputs {
                leases,
                clusters,
                offers,
                escrows: &self.escrows,
                stakes: &self.stakes,
                authority: self.authority,
                period: Duration::from_secs(60),
                lookahead: Duration::from_secs(10),
                stake: &self.policy,
                conversions: &self.conversions,
                market_mint: self.mint,
                now: at(now_s),
            }
        }
    }

    fn ended(mut cluster: GpuCluster) -> GpuCluster {
        cluster.status =
            Some(GpuClusterStatus { phase: Some(ClusterPhase::Completed), ..Default::default() });
        cluster
    }

    #[test]
    fn leases_end_when_the_escrow_cannot_cover_the_next_round() {
        let cluster = mk_cluster("c", 2, 1);
        let leases = [lease(&cluster, "n1", 1, None), lease(&cluster, "n2", 1, None)];
        let clusters = [cluster];
        // At 100 s: 200 unpaid + 2 × 10 s ahead = 220 needed.
        let enough = World::new(&[("c-0000-uid", 220)]);
        assert!(out_of_funds(&enough.inputs(&leases, &clusters, &[], 100)).is_empty());
        let short = World::new(&[("c-0000-uid", 219)]);
        let ending = out_of_funds(&short.inputs(&leases, &clusters, &[], 100));
        assert_eq!(ending.len(), 2, "every active lease of the cluster ends: {ending:?}");
    }

    #[test]
    fn a_running_lease_is_paid_on_its_own_terms_whatever_is_in_force_now() {
        let cluster = mk_cluster("c", 2, 1);
        let then = LeaseTerms {
            heartbeat_timeout_seconds: 60,
            provisioning_timeout_seconds: 600,
            settlement_period_seconds: Some(60),
            deposit_margin_percent: Some(0),
            market_fee_permille: Some(20),
            slash_permille: Some(0),
            mint: None,
        };
        let later = LeaseTerms {
            settlement_period_seconds: Some(30),
            market_fee_permille: Some(100),
            ..then.clone()
        };
        let (mut running, mut new) =
            (lease(&cluster, "n1", 1, None), lease(&cluster, "n2", 1, None));
        running.spec.terms = Some(then);
        new.spec.terms = Some(later);
        let legacy = lease(&cluster, "n3", 1, None);
        let leases = [running, new, legacy];
        let clusters = [cluster];
        let world = World::new(&[("c-0000-uid", 1_000_000)]);
        // The policy now in force pays every 30 s; each lease at 1 base unit a second.
        let inputs = Inputs {
            period: Duration::from_secs(30),
            ..world.inputs(&leases, &clusters, &[], 100)
        };
        let plan = payouts(&inputs);
        let paid = |lease: &GpuLease| {
            let p = plan.to_send.iter().find(|p| p.record.period != SLASH_PERIOD && matches!(&p.holder, Holder::Lease { name, .. } if *name == lease.name_any())).expect("a payout");
            (p.record.through.0, p.payment.amount, p.payment.fee)
        };
        assert_eq!(paid(&leases[0]), (at(60), 60, 1), "its own 60 s period and 2 % fee");
        assert_eq!(paid(&leases[1]), (at(90), 90, 9), "the new terms: 30 s, 10 %");
        assert_eq!(paid(&leases[2]), (at(90), 90, 0), "no terms: the period in force, no fee");
    }

    #[test]
    fn payouts_draw_only_on_their_own_clusters_escrow() {
        let (rich, poor) = (mk_cluster("rich", 1, 1), mk_cluster("poor", 2, 1));
        let mut paid = lease(&poor, "n1", 1, None);
        record(&mut paid, "0001", 60, 60, SettlementState::Confirmed);
        paid.spec.start_time = Time(at(-1)); // bound first, so paid first
        let leases = [paid, lease(&poor, "n2", 1, None), lease(&rich, "n3", 1, None)];
        let clusters = [rich, poor];
        // The poor cluster's escrow holds 90 after its first payout: 60 (n1, period 2) and 30
        // of n2's 120; the rich cluster's escrow pays its own lease in full and nothing else.
        let world = World::new(&[("poor-0000-uid", 90), ("rich-0000-uid", 1_000_000)]);
        let plan = payouts(&world.inputs(&leases, &clusters, &[], 125));
        assert_eq!(plan.to_send.len(), 3);
        let by_source = |uid: &str| {
            let escrow = accounts::escrow_address(&world.authority, uid).expect("address");
            plan.to_send
                .iter()
                .filter(|p| p.payment.source == escrow)
                .map(|p| p.payment.amount)
                .collect::<Vec<_>>()
        };
        assert_eq!(by_source("poor-0000-uid"), [60, 30]);
        assert_eq!(by_source("rich-0000-uid"), [120]);
        assert!(plan.to_send.iter().all(|p| p.record.state == SettlementState::Signed));
        let keys: HashSet<&str> = plan.to_send.iter().map(|p| p.payment.key.as_str()).collect();
        assert_eq!(keys.len(), 3, "one idempotency key per lease and period");
    }

    /// $2.50 per token of 9 decimals: one micro-USD is 400 base units.
    fn at_two_fifty() -> Conversion {
        let rate = super::super::pricing::Rate { price: 250, exponent: -2, publish_time: 0 };
        Conversion::At { rate, decimals: 9 }
    }

    #[test]
    fn usd_payouts_move_tokens_at_the_rate_and_record_it() {
        let cluster = mk_cluster("c", 2, 1);
        let mut flying = lease(&cluster, "n1", 1, None);
        record(&mut flying, "0001", 60, 60, SettlementState::Signed);
        flying.status.as_mut().expect("status").settlements[0].conversion =
            at_two_fifty().record(60);
        let leases = [flying, lease(&cluster, "n2", 1, None)];
        let clusters = [cluster];
        // n2 owes 120 micro-USD at 120 s (1 per second), 48,000 base units; n1 waits for its
        // payout in flight (24,000 base units).
        let paid = |escrow: u64| {
            let world = World::new(&[("c-0000-uid", escrow)]).converting(at_two_fifty());
            let plan = payouts(&world.inputs(&leases, &clusters, &[], 120));
            assert_eq!(plan.to_send.len(), 1, "n1 is in flight");
            let p = &plan.to_send[0];
            (p.record.amount, p.payment.amount, p.record.conversion.clone().expect("converted"))
        };
        let (usd, tokens, recorded) = paid(72_000);
        assert_eq!((usd, tokens, recorded.tokens), (120, 48_000, 48_000));
        assert_eq!((recorded.price, recorded.exponent), (250, -2), "the rate is recorded");
        // 30,000 left after the flight: n2 is paid what they are worth, 75 micro-USD.
        let (usd, tokens, recorded) = paid(54_000);
        assert_eq!((usd, tokens, recorded.tokens), (75, 30_000, 30_000));
        // With 10 s ahead n1 needs 60 + 10 micro-USD, n2 120 + 10: 80,000 base units beside
        // the flight cover both, one less does not.
        let ending = |escrow: u64| {
            let world = World::new(&[("c-0000-uid", escrow)]).converting(at_two_fifty());
            out_of_funds(&world.inputs(&leases, &clusters, &[], 120)).len()
        };
        assert_eq!(ending(24_000 + 80_000), 0);
        assert_eq!(ending(24_000 + 79_999), 2);
    }

    #[test]
    fn a_paused_feed_pays_nothing_and_ends_nothing() {
        let cluster = mk_cluster("c", 1, 1);
        let leases = [lease(&cluster, "n1", 1, None)];
        let clusters = [cluster];
        let world = World::new(&[("c-0000-uid", 1)]).converting(Conversion::Paused("stale".into()));
        let inputs = world.inputs(&leases, &clusters, &[], 120);
        assert!(payouts(&inputs).to_send.is_empty());
        assert!(payouts(&inputs).without_transfer.is_empty());
        assert!(out_of_funds(&inputs).is_empty(), "no rate to judge the escrow by");
    }

    #[test]
    fn each_cluster_pays_in_its_escrows_mint_at_that_mints_rate() {
        // Two clusters: "a" pays in the market's token, whose feed is stale; "b" in a
        // stablecoin, 1:1. Both escrows are short of what their leases owe.
        let (a, b) = (mk_cluster("a", 1, 1), mk_cluster("b", 1, 1));
        let leases = [lease(&a, "n1", 1, None), lease(&b, "n2", 1, None)];
        let (a_uid, b_uid) = (cluster_uid(&a).to_owned(), cluster_uid(&b).to_owned());
        let stablecoin = Pubkey::new_unique();
        let world = World::new(&[(&a_uid, 100), (&b_uid, 100)])
            .converting(Conversion::Paused("stale".into()))
            .paying_in(&b_uid, stablecoin, Conversion::OneToOne);
        let clusters = [a, b];
        let inputs = world.inputs(&leases, &clusters, &[], 120);
        let plan = payouts(&inputs);
        assert_eq!(plan.to_send.len(), 1, "only the stablecoin has a rate to pay at");
        let paid = &plan.to_send[0];
        assert_eq!((paid.mint, paid.payment.amount, paid.record.amount), (stablecoin, 100, 100));
        assert!(paid.record.conversion.is_none(), "1:1 records no conversion");
        assert_eq!(
            out_of_funds(&inputs),
            [leases[1].name_any()],
            "a waits for its rate, b ran out"
        );
    }

    #[test]
    fn a_refund_goes_back_in_the_escrows_mint() {
        let cluster = ended(mk_cluster("c", 1, 1));
        let uid = cluster_uid(&cluster).to_owned();
        let stablecoin = Pubkey::new_unique();
        let world = World::new(&[(&uid, 70)]).paying_in(&uid, stablecoin, Conversion::OneToOne);
        let clusters = [cluster];
        let refunds = refunds(&world.inputs(&[], &clusters, &[], 120));
        assert_eq!(
            refunds.iter().map(|r| (r.mint, r.balance)).collect::<Vec<_>>(),
            [(stablecoin, 70)]
        );
    }

    #[test]
    fn payouts_in_flight_are_held_back_from_the_escrow() {
        let cluster = mk_cluster("c", 2, 1);
        let mut flying = lease(&cluster, "n1", 1, None);
        record(&mut flying, "0001", 60, 60, SettlementState::Signed);
        let leases = [flying, lease(&cluster, "n2", 1, None)];
        let clusters = [cluster];
        let world = World::new(&[("c-0000-uid", 100)]);
        let inputs = world.inputs(&leases, &clusters, &[], 61);
        assert_eq!(escrow_available(&inputs)["c-0000-uid"], 40);
        let plan = payouts(&inputs);
        assert_eq!(plan.to_send.iter().map(|p| p.payment.amount).collect::<Vec<_>>(), [40]);
    }

    #[test]
    fn an_unserved_lease_costs_nothing_and_is_settled_as_it_is() {
        let cluster = mk_cluster("c", 1, 1);
        let mut never = lease(&cluster, "n1", 1, Some((600, EndReason::NotServing)));
        never.status.get_or_insert_default().serving_since = None;
        let leases = [never];
        let clusters = [ended(cluster)];
        let world = World::new(&[("c-0000-uid", 5000)]);
        let inputs = world.inputs(&leases, &clusters, &[], 700);
        assert_eq!(payouts(&inputs), Payouts::default());
        assert_eq!(refunds(&inputs).iter().map(|r| r.balance).collect::<Vec<_>>(), [5000]);
        assert_eq!(closed(&inputs), [leases[0].name_any()]);

        // With slashing on and stake to slash, it is settled only once the slash is recorded.
        let mut slashing = World::new(&[("c-0000-uid", 5000)]);
        slashing.policy.slash_permille = 100;
        slashing.stakes.insert("n1".into(), StakeBook { bonded: 10, ..Default::default() });
        let inputs = slashing.inputs(&leases, &clusters, &[], 700);
        assert!(closed(&inputs).is_empty());
        assert_eq!(payouts(&inputs).to_send.len(), 1, "the slash");
    }

    #[test]
    fn supplier_failures_slash_a_share_of_the_bonded_stake_to_the_buyer() {
        let cluster = mk_cluster("c", 2, 1);
        let mut first = lease(&cluster, "n1", 1, Some((30, EndReason::SupplierFailure)));
        record(&mut first, "0001", 30, 30, SettlementState::Confirmed);
        let mut second = lease(&cluster, "n1", 2, Some((30, EndReason::NotServing)));
        second.metadata.uid = Some("second-uid".into());
        second.metadata.name = Some("second".into());
        second.status.get_or_insert_default().serving_since = None;
        let leases = [first, second];
        let clusters = [cluster];
        let mut world = World::new(&[("c-0000-uid", 1000)]);
        world.policy.slash_permille = 250;
        let stake_account = Pubkey::new_unique();
        world.stakes.insert(
            "n1".into(),
            StakeBook { account: stake_account, balance: 1000, bonded: 1000, ..Default::default() },
        );
        let plan = payouts(&world.inputs(&leases, &clusters, &[], 40));
        let slashes: Vec<(u64, Pubkey)> = plan
            .to_send
            .iter()
            .filter(|p| p.record.period == SLASH_PERIOD)
            .map(|p| (p.payment.amount, p.payment.source))
            .collect();
        assert_eq!(slashes, [(250, stake_account), (187, stake_account)]);

        // A lease keeps the slash rate of its bind, whatever the policy says now (none too).
        let mut frozen = leases.clone();
        for lease in &mut frozen {
            lease.spec.terms = Some(gpumarket_crds::LeaseTerms {
                slash_permille: Some(100),
                ..Default::default()
            });
        }
        for now_in_force in [250, 0] {
            world.policy.slash_permille = now_in_force;
            let plan = payouts(&world.inputs(&frozen, &clusters, &[], 40));
            let amounts: Vec<u64> = plan
                .to_send
                .iter()
                .filter(|p| p.record.period == SLASH_PERIOD)
                .map(|p| p.payment.amount)
                .collect();
            assert_eq!(amounts, [100, 90], "at the bind's 10 %, {now_in_force} ‰ in force");
        }
        world.policy.slash_permille = 250;
        let buyer = Pubkey::from_str("11111111111111111111111111111111").expect("valid");
        assert!(
            plan.to_send
                .iter()
                .filter(|p| p.record.period == SLASH_PERIOD)
                .all(|p| p.payment.wallet == buyer)
        );
    }

    #[test]
    fn refund_once_every_lease_is_settled_and_never_while_recorded() {
        let cluster = ended(mk_cluster("c", 1, 1));
        let mut settled = lease(&cluster, "n1", 1, Some((90, EndReason::Expired)));
        record(&mut settled, "0001", 60, 60, SettlementState::Confirmed);
        let world = World::new(&[("c-0000-uid", 940)]);
        let clusters = [cluster.clone()];

        let unsettled = [settled.clone()];
        assert!(refunds(&world.inputs(&unsettled, &clusters, &[], 100)).is_empty());

        record(&mut settled, "0002", 90, 30, SettlementState::Confirmed);
        let leases = [settled];
        let refund = refunds(&world.inputs(&leases, &clusters, &[], 100));
        assert_eq!(refund.iter().map(|r| r.balance).collect::<Vec<_>>(), [940], "the whole escrow");
        assert_eq!(
            Some(refund[0].escrow),
            accounts::escrow_address(&world.authority, "c-0000-uid")
        );

        let mut recorded = cluster;
        recorded.status.get_or_insert_default().escrow = Some(EscrowStatus {
            account: refund[0].escrow.to_string(),
            balance: Some(940),
            refund: Some(SettlementRecord {
                signature: Some("sig".into()),
                ..new_record("refund".into(), at(100), 940)
            }),
        });
        let clusters = [recorded];
        assert!(refunds(&world.inputs(&leases, &clusters, &[], 100)).is_empty());
        let gone = World::new(&[]);
        let unrecorded = [ended(mk_cluster("c", 1, 1))];
        assert!(
            refunds(&gone.inputs(&leases, &unrecorded, &[], 100)).is_empty(),
            "no escrow account (closed, or never opened), nothing to refund"
        );
    }

    #[test]
    fn foreign_stake_goes_back_and_an_unbond_waits_for_its_cooldown_and_the_leases() {
        let cluster = mk_cluster("c", 1, 1);
        let mut offer = mk_offer("n1", "H100", 1, now());
        offer.spec.wallet = SUPPLIER.into();
        let wallet = Pubkey::from_str(SUPPLIER).expect("valid");
        let stranger = Pubkey::new_unique();
        let account = Pubkey::new_unique();
        let mut world = World::new(&[]);
        world.policy.unbond_cooldown = Duration::from_secs(100);
        world.stakes.insert(
            "n1".into(),
            StakeBook {
                account,
                balance: 1000,
                bonded: 700,
                foreign: vec![Foreign {
                    what: "return:s2".into(),
                    key: "k2".into(),
                    to: stranger,
                    amount: 300,
                }],
                unbond: Some(UnbondRequest {
                    what: "unbond:s3".into(),
                    key: "k3".into(),
                    at: Some(at(0).as_second()),
                }),
            },
        );
        let active = [lease(&cluster, "n1", 1, None)];
        let offers = [offer.clone()];
        let sent = |plan: Payouts| -> Vec<(String, Pubkey, u64)> {
            plan.to_send
                .into_iter()
                .map(|p| (p.payment.key, p.payment.wallet, p.payment.amount))
                .collect()
        };
        let early = payouts(&world.inputs(&[], &[], &offers, 50));
        assert_eq!(sent(early), [("k2".to_owned(), stranger, 300)], "the cooldown runs");
        let busy = payouts(&world.inputs(&active, &[], &offers, 150));
        assert!(sent(busy).iter().all(|(k, _, _)| k != "k3"), "a lease is active on the node");
        let due = payouts(&world.inputs(&[], &[], &offers, 150));
        assert_eq!(sent(due), [("k2".to_owned(), stranger, 300), ("k3".to_owned(), wallet, 700)]);

        // A return already recorded is not planned again.
        offer.status.get_or_insert_default().stake = Some(StakeStatus {
            account: account.to_string(),
            bonded: 700,
            unbond_requested: None,
            returns: vec![new_record("return:s2".into(), at(10), 300)],
        });
        let offers = [offer];
        let again = payouts(&world.inputs(&[], &[], &offers, 50));
        assert!(again.to_send.is_empty());
    }
}
