//! What a settlement round does, decided from the leases, clusters and deposits alone: which
//! leases run out of funds, which payouts and slashes are due (capped by each cluster's share of
//! the escrow, and by each node's stake), and which clusters get their refund.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use gpumarket_crds::{
    ClusterPhase, EndReason, GpuCluster, GpuLease, LeasePhase, SettlementRecord, SettlementState,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use solana_pubkey::Pubkey;

use super::escrow::{Accrual, Ledger, exhausted};
use super::memo::{STAKE_PREFIX, payout_key};
use super::meter::{Meter, fully_settled, is_payout_period, next_due};
use super::stake::{SLASH_PERIOD, StakePolicy};
use super::transaction::Payment;

/// Annotation on a GpuCluster holding its refund's settlement record (JSON), written before
/// the refund is sent, like a payout's record in the lease status.
pub const REFUND_ANNOTATION: &str = "gpumarket.io/refund";
/// Record period of a refund.
pub const REFUND_PERIOD: &str = "refund";

/// Everything a round decides from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub leases: &'a [GpuLease],
    pub clusters: &'a [GpuCluster],
    /// Confirmed deposits into the escrow, by memo.
    pub deposits: &'a HashMap<String, u64>,
    pub period: Duration,
    /// Time until the next round: an escrow must cover at least this much more usage.
    pub lookahead: Duration,
    pub stake: &'a StakePolicy,
    pub now: Timestamp,
}

/// A payout (or slash) to record and send: the lease, its record (state `Signed`, signature
/// still to fill in) and the payment.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub lease: String,
    pub record: SettlementRecord,
    pub payment: Payment,
}

/// The payouts of a round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Payouts {
    pub to_send: Vec<Planned>,
    /// Records that move no tokens (nothing to pay): confirmed as they are written.
    pub without_transfer: Vec<(String, SettlementRecord)>,
}

/// A refund to record and send.
#[derive(Clone, Debug, PartialEq)]
pub struct Refund {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub buyer: Pubkey,
    pub amount: u64,
}

fn cluster_uid(cluster: &GpuCluster) -> &str {
    cluster.metadata.uid.as_deref().unwrap_or_default()
}

fn records(lease: &GpuLease) -> &[SettlementRecord] {
    lease.status.as_ref().map_or(&[][..], |s| s.settlements.as_slice())
}

fn is_active(lease: &GpuLease) -> bool {
    lease.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == LeasePhase::Active
        && lease.status.as_ref().and_then(|s| s.end_time.as_ref()).is_none()
}

/// Whether a record holds money: confirmed, or signed and possibly landing.
fn holds_funds(record: &SettlementRecord) -> bool {
    matches!(record.state, SettlementState::Confirmed | SettlementState::Signed)
}

/// Base units of a lease's payouts that hold escrow funds.
fn committed(lease: &GpuLease) -> u64 {
    records(lease)
        .iter()
        .filter(|r| is_payout_period(&r.period) && holds_funds(r))
        .map(|r| r.amount)
        .sum()
}

/// The refund record of a cluster, from its annotation.
pub fn refund_record(cluster: &GpuCluster) -> Option<SettlementRecord> {
    serde_json::from_str(cluster.annotations().get(REFUND_ANNOTATION)?).ok()
}

/// Each cluster's share of the escrow, by uid (clusters that only their leases still name
/// included).
pub fn ledgers(inputs: &Inputs<'_>) -> HashMap<String, Ledger> {
    let mut ledgers: HashMap<String, Ledger> = HashMap::new();
    for lease in inputs.leases {
        let ledger = ledgers.entry(lease.spec.cluster.uid.clone()).or_default();
        ledger.committed = ledger.committed.saturating_add(committed(lease));
    }
    for cluster in inputs.clusters {
        let ledger = ledgers.entry(cluster_uid(cluster).to_owned()).or_default();
        ledger.refunded = refund_record(cluster).filter(holds_funds).map_or(0, |r| r.amount);
    }
    for (uid, ledger) in &mut ledgers {
        ledger.deposited = inputs.deposits.get(uid).copied().unwrap_or(0);
    }
    ledgers
}

/// Active leases whose cluster's escrow is exhausted: they end now (OutOfFunds).
pub fn out_of_funds(inputs: &Inputs<'_>) -> Vec<String> {
    let ledgers = ledgers(inputs);
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
                    unpaid: meter.cost_through(inputs.now).saturating_sub(committed(l)),
                    hourly_rate: meter.hourly_rate(),
                }
            })
            .collect();
        let available = ledgers.get(uid).map_or(0, Ledger::available);
        if exhausted(available, &accruals, lookahead) {
            ending.extend(leases.iter().map(|l| l.name_any()));
        }
    }
    ending.sort();
    ending
}

/// Payouts due now, capped by each cluster's share of the escrow; slashes of leases ended by a
/// supplier failure, capped by the node's stake.
pub fn payouts(inputs: &Inputs<'_>) -> Payouts {
    let mut available: HashMap<String, u64> =
        ledgers(inputs).into_iter().map(|(uid, l)| (uid, l.available())).collect();
    let mut out = Payouts::default();
    let mut leases: Vec<&GpuLease> = inputs.leases.iter().collect();
    leases.sort_by_key(|l| (l.spec.start_time.0, l.name_any()));
    for lease in &leases {
        let Some(due) = next_due(&Meter::of(lease), records(lease), inputs.period, inputs.now)
        else {
            continue;
        };
        let Ok(wallet) = Pubkey::from_str(&lease.spec.supplier_wallet) else {
            tracing::warn!(lease = %lease.name_any(), "supplier wallet is not a public key; not paid");
            continue;
        };
        let left = available.entry(lease.spec.cluster.uid.clone()).or_default();
        let amount = due.amount.min(*left);
        if amount < due.amount {
            tracing::warn!(lease = %lease.name_any(), due = due.amount, amount, "escrow short: paying what is left");
        }
        if amount == 0 && due.amount > 0 {
            continue; // nothing left: wait for a deposit
        }
        *left -= amount;
        let record = SettlementRecord {
            period: due.period.clone(),
            through: Time(due.through),
            amount,
            signature: None,
            last_valid_block_height: None,
            signed_slot: None,
            transaction: None,
            state: SettlementState::Signed,
        };
        push(&mut out, lease, record, wallet);
    }
    plan_slashes(inputs, &leases, &mut out);
    out
}

fn push(out: &mut Payouts, lease: &GpuLease, mut record: SettlementRecord, wallet: Pubkey) {
    if record.amount == 0 {
        record.state = SettlementState::Confirmed;
        out.without_transfer.push((lease.name_any(), record));
        return;
    }
    let key = payout_key(lease.uid().as_deref().unwrap_or_default(), &record.period);
    let payment = Payment { key, wallet, amount: record.amount };
    out.to_send.push(Planned { lease: lease.name_any(), record, payment });
}

fn plan_slashes(inputs: &Inputs<'_>, leases: &[&GpuLease], out: &mut Payouts) {
    if inputs.stake.slash_permille == 0 {
        return;
    }
    let buyers: HashMap<&str, &str> = inputs
        .clusters
        .iter()
        .map(|c| (cluster_uid(c), c.spec.payment.buyer_wallet.as_str()))
        .collect();
    let mut remaining: HashMap<&str, u64> = HashMap::new();
    for lease in leases {
        let slashed: u64 = records(lease)
            .iter()
            .filter(|r| r.period == SLASH_PERIOD && holds_funds(r))
            .map(|r| r.amount)
            .sum();
        let stake = remaining.entry(lease.spec.offer.as_str()).or_insert_with(|| {
            let memo = format!("{STAKE_PREFIX}{}", lease.spec.offer);
            inputs.deposits.get(&memo).copied().unwrap_or(0)
        });
        *stake = stake.saturating_sub(slashed);
    }
    for lease in leases {
        let failed =
            lease.status.as_ref().and_then(|s| s.end_reason) == Some(EndReason::SupplierFailure);
        let slash = records(lease).iter().find(|r| r.period == SLASH_PERIOD);
        if !failed || slash.is_some_and(|r| r.state != SettlementState::Expired) {
            continue;
        }
        let Some(buyer) =
            buyers.get(lease.spec.cluster.uid.as_str()).and_then(|w| Pubkey::from_str(w).ok())
        else {
            continue;
        };
        let stake = remaining.entry(lease.spec.offer.as_str()).or_default();
        let amount = match slash {
            Some(expired) => expired.amount.min(*stake),
            None => inputs.stake.slash(*stake),
        };
        *stake -= amount;
        let end = lease.status.as_ref().and_then(|s| s.end_time.clone());
        let record = SettlementRecord {
            period: SLASH_PERIOD.into(),
            through: end.unwrap_or(Time(inputs.now)),
            amount,
            signature: None,
            last_valid_block_height: None,
            signed_slot: None,
            transaction: None,
            state: SettlementState::Signed,
        };
        push(out, lease, record, buyer);
    }
}

/// Whether a cluster has ended: completed, failed or being deleted.
fn has_ended(cluster: &GpuCluster) -> bool {
    cluster.metadata.deletion_timestamp.is_some()
        || matches!(
            cluster.status.as_ref().and_then(|s| s.phase),
            Some(ClusterPhase::Completed | ClusterPhase::Failed)
        )
}

/// Clusters that have ended with every lease settled, and whose refund is not recorded yet
/// (or expired unsent): refund what is left of their deposits.
pub fn refunds(inputs: &Inputs<'_>) -> Vec<Refund> {
    let ledgers = ledgers(inputs);
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
                .all(|l| !is_active(l) && fully_settled(&Meter::of(l), records(l)))
        })
        .filter_map(|c| {
            let buyer = Pubkey::from_str(&c.spec.payment.buyer_wallet).ok()?;
            Some(Refund {
                namespace: c.namespace().unwrap_or_default(),
                name: c.name_any(),
                uid: cluster_uid(c).to_owned(),
                buyer,
                amount: ledgers.get(cluster_uid(c)).map_or(0, Ledger::available),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease, now};
    use gpumarket_crds::GpuLeaseStatus;
    use std::collections::HashSet;

    const SUPPLIER: &str = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA";

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(now().as_second() + seconds).expect("valid")
    }

    /// A lease of `gpus` GPUs at 3600 base units per GPU-hour (one per GPU-second), started at
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
            end_time: end.map(|(s, _)| Time(at(s))),
            end_reason: end.map(|(_, r)| r),
            ..GpuLeaseStatus::default()
        });
        lease
    }

    fn confirmed(lease: &mut GpuLease, period: &str, through: i64, amount: u64) {
        lease.status.get_or_insert_default().settlements.push(SettlementRecord {
            period: period.into(),
            through: Time(at(through)),
            amount,
            signature: Some("sig".into()),
            last_valid_block_height: Some(10),
            signed_slot: None,
            transaction: None,
            state: SettlementState::Confirmed,
        });
        lease.status.get_or_insert_default().phase = Some(LeasePhase::Settled);
    }

    fn inputs<'a>(
        leases: &'a [GpuLease],
        clusters: &'a [GpuCluster],
        deposits: &'a HashMap<String, u64>,
        stake: &'a StakePolicy,
        now_s: i64,
    ) -> Inputs<'a> {
        Inputs {
            leases,
            clusters,
            deposits,
            period: Duration::from_secs(60),
            lookahead: Duration::from_secs(10),
            stake,
            now: at(now_s),
        }
    }

    fn deposits(entries: &[(&str, u64)]) -> HashMap<String, u64> {
        entries.iter().map(|(m, a)| (m.to_string(), *a)).collect()
    }

    #[test]
    fn leases_end_when_the_escrow_cannot_cover_the_next_round() {
        let cluster = mk_cluster("c", 2, 1);
        let leases = [lease(&cluster, "n1", 1, None), lease(&cluster, "n2", 1, None)];
        let policy = StakePolicy::default();
        // At 100 s: 200 unpaid + 2 × 10 s ahead = 220 needed.
        let enough = deposits(&[("c-0000-uid", 220)]);
        let clusters = [cluster];
        assert!(out_of_funds(&inputs(&leases, &clusters, &enough, &policy, 100)).is_empty());
        let short = deposits(&[("c-0000-uid", 219)]);
        let ending = out_of_funds(&inputs(&leases, &clusters, &short, &policy, 100));
        assert_eq!(ending.len(), 2, "every active lease of the cluster ends: {ending:?}");
    }

    #[test]
    fn payouts_are_capped_by_the_cluster_share() {
        let cluster = mk_cluster("c", 2, 1);
        let mut paid = lease(&cluster, "n1", 1, None);
        confirmed(&mut paid, "0001", 60, 60);
        paid.status.get_or_insert_default().phase = Some(LeasePhase::Active);
        let leases = [paid, lease(&cluster, "n2", 1, None)];
        let policy = StakePolicy::default();
        // Deposit 150: 60 already paid, 90 left for 60 (n1, period 2) + 120 (n2, periods 1-2).
        let funds = deposits(&[("c-0000-uid", 150)]);
        let clusters = [cluster];
        let plan = payouts(&inputs(&leases, &clusters, &funds, &policy, 125));
        let amounts: Vec<(&str, u64)> =
            plan.to_send.iter().map(|p| (p.record.period.as_str(), p.payment.amount)).collect();
        assert_eq!(amounts, [("0002", 60), ("0002", 30)]);
        assert!(plan.to_send.iter().all(|p| p.record.state == SettlementState::Signed));
        let keys: HashSet<&str> = plan.to_send.iter().map(|p| p.payment.key.as_str()).collect();
        assert_eq!(keys.len(), 2, "one idempotency key per lease and period");
    }

    #[test]
    fn nothing_to_pay_is_confirmed_without_a_transfer() {
        let cluster = mk_cluster("c", 1, 1);
        let mut free = lease(&cluster, "n1", 1, Some((30, EndReason::Expired)));
        free.spec.price_per_gpu_hour = 1; // 30 GPU-seconds cost 0 base units
        let leases = [free];
        let policy = StakePolicy::default();
        let funds = deposits(&[("c-0000-uid", 5)]);
        let clusters = [cluster];
        let plan = payouts(&inputs(&leases, &clusters, &funds, &policy, 40));
        assert!(plan.to_send.is_empty());
        assert_eq!(plan.without_transfer.len(), 1);
        assert_eq!(plan.without_transfer[0].1.state, SettlementState::Confirmed);
    }

    #[test]
    fn supplier_failures_slash_a_share_of_the_remaining_stake_to_the_buyer() {
        let cluster = mk_cluster("c", 2, 1);
        let mut first = lease(&cluster, "n1", 1, Some((30, EndReason::SupplierFailure)));
        confirmed(&mut first, "0001", 30, 30);
        let mut second = lease(&cluster, "n1", 2, Some((30, EndReason::SupplierFailure)));
        second.metadata.uid = Some("second-uid".into());
        second.metadata.name = Some("second".into());
        confirmed(&mut second, "0001", 30, 60);
        let leases = [first, second];
        let policy = StakePolicy { slash_permille: 250, ..StakePolicy::default() };
        let funds = deposits(&[("c-0000-uid", 1000), ("stake:n1", 1000)]);
        let clusters = [cluster];
        let plan = payouts(&inputs(&leases, &clusters, &funds, &policy, 40));
        let slashes: Vec<u64> = plan
            .to_send
            .iter()
            .filter(|p| p.record.period == SLASH_PERIOD)
            .map(|p| p.payment.amount)
            .collect();
        assert_eq!(slashes, [250, 187]);
        let buyer = Pubkey::from_str("11111111111111111111111111111111").expect("valid");
        assert!(plan.to_send.iter().all(|p| p.payment.wallet == buyer));
    }

    #[test]
    fn refund_once_every_lease_is_settled() {
        let mut cluster = mk_cluster("c", 1, 1);
        cluster.status = Some(gpumarket_crds::GpuClusterStatus {
            phase: Some(ClusterPhase::Completed),
            ..Default::default()
        });
        let mut settled = lease(&cluster, "n1", 1, Some((90, EndReason::Expired)));
        confirmed(&mut settled, "0001", 60, 60);
        let policy = StakePolicy::default();
        let funds = deposits(&[("c-0000-uid", 1000)]);
        let clusters = [cluster.clone()];

        let unsettled = [settled.clone()];
        assert!(refunds(&inputs(&unsettled, &clusters, &funds, &policy, 100)).is_empty());

        confirmed(&mut settled, "0002", 90, 30);
        let leases = [settled];
        let refund = refunds(&inputs(&leases, &clusters, &funds, &policy, 100));
        assert_eq!(refund.iter().map(|r| r.amount).collect::<Vec<_>>(), [910]);

        let mut recorded = cluster;
        let record = SettlementRecord {
            period: REFUND_PERIOD.into(),
            through: Time(at(100)),
            amount: 910,
            signature: Some("sig".into()),
            last_valid_block_height: Some(1),
            signed_slot: None,
            transaction: None,
            state: SettlementState::Signed,
        };
        recorded.metadata.annotations = Some(
            [(REFUND_ANNOTATION.to_string(), serde_json::to_string(&record).expect("json"))].into(),
        );
        let clusters = [recorded];
        assert!(refunds(&inputs(&leases, &clusters, &funds, &policy, 100)).is_empty());
        assert_eq!(
            ledgers(&inputs(&leases, &clusters, &funds, &policy, 100))["c-0000-uid"].available(),
            0
        );
    }
}
