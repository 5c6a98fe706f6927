//! `earnings`: what a supplier's nodes served and were paid, from the leases' meters and their
//! confirmed payout records (each one a transfer on chain to the lease's supplier wallet).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use gpumarket_crds::{Amount, GpuLease, GpuOffer, SettlementState};
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use crate::settlement::meter::{Meter, Paid, is_payout_period};
use crate::settlement::stake::SLASH_PERIOD;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Earnings {
    /// The wallet asked about; every wallet when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wallet: Option<String>,
    pub total: Totals,
    pub by_model: BTreeMap<String, Totals>,
    pub nodes: Vec<NodeEarnings>,
    /// By UTC day (`YYYY-MM-DD`): GPU-seconds served that day, and payouts confirmed for usage
    /// through that day.
    pub by_day: BTreeMap<String, Day>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Day {
    pub served_gpu_seconds: u64,
    pub paid: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub leases: u64,
    pub served_gpu_seconds: u64,
    /// Confirmed paid to the wallet.
    pub paid: u64,
    /// Metered and not paid yet.
    pub pending: u64,
    /// Slashed out of the node's stake to buyers.
    pub slashed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeEarnings {
    pub node: String,
    pub model: String,
    #[serde(flatten)]
    pub totals: Totals,
    /// Reputation score (0–1000) and uptime (per mille), as the controller last wrote them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reputation: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_permille: Option<u32>,
    pub stake_bonded: u64,
}

/// The earnings of `wallet` (every supplier when `None`) at `now`.
pub fn tally(
    leases: &[GpuLease],
    offers: &[GpuOffer],
    wallet: Option<&str>,
    now: Timestamp,
) -> Earnings {
    let mut nodes: BTreeMap<String, NodeEarnings> = BTreeMap::new();
    let mut by_day: BTreeMap<String, Day> = BTreeMap::new();
    for lease in leases.iter().filter(|l| wallet.is_none_or(|w| l.spec.supplier_wallet == w)) {
        let offer = offers.iter().find(|o| o.name_any() == lease.spec.offer);
        let node = nodes.entry(lease.spec.offer.clone()).or_insert_with(|| {
            let status = offer.and_then(|o| o.status.as_ref());
            let reputation = status.and_then(|s| s.reputation.as_ref());
            NodeEarnings {
                node: lease.spec.offer.clone(),
                model: offer
                    .and_then(|o| o.spec.gpus.first())
                    .map_or_else(|| "unknown".to_owned(), |g| g.model.clone()),
                totals: Totals::default(),
                reputation: reputation.map(|r| r.score),
                uptime_permille: reputation.map(|r| r.uptime_permille),
                stake_bonded: offer.map_or(0, GpuOffer::bonded_stake),
            }
        });
        let meter = Meter::of(lease);
        let paid = Paid::of(lease).confirmed();
        add_days(&mut by_day, &meter, &Paid::of(lease), now);
        let t = &mut node.totals;
        t.leases += 1;
        t.served_gpu_seconds += meter.gpu_seconds_through(now);
        t.paid += paid;
        t.pending += meter.cost_through(now).saturating_sub(paid);
        t.slashed += lease.status.as_ref().map_or(0, |s| {
            s.settlements.iter().filter(|r| r.period == SLASH_PERIOD).map(|r| r.amount).sum()
        });
    }
    let mut earnings =
        Earnings { wallet: wallet.map(str::to_owned), by_day, ..Earnings::default() };
    for node in nodes.into_values() {
        add(&mut earnings.total, &node.totals);
        add(earnings.by_model.entry(node.model.clone()).or_default(), &node.totals);
        earnings.nodes.push(node);
    }
    earnings
}

const DAY: i64 = 24 * 3600;

/// The UTC day of `second` (since the epoch) as `YYYY-MM-DD`.
fn day_of(second: i64) -> String {
    Timestamp::from_second(second)
        .map_or_else(|_| "invalid".to_owned(), |t| t.strftime("%Y-%m-%d").to_string())
}

/// The lease's served GPU-seconds split at UTC midnights, and its confirmed payouts by the day
/// they pay through.
fn add_days(days: &mut BTreeMap<String, Day>, meter: &Meter, paid: &Paid<'_>, now: Timestamp) {
    if let Some(start) = meter.start {
        let end = meter.end.map_or(now, |end| end.min(now)).as_second();
        let mut from = start.as_second();
        while from < end {
            let until = (from.div_euclid(DAY) + 1).saturating_mul(DAY).min(end);
            let seconds = u64::try_from(until - from).unwrap_or(0);
            days.entry(day_of(from)).or_default().served_gpu_seconds += seconds * meter.gpus;
            from = until;
        }
    }
    let confirmed = paid
        .records
        .iter()
        .filter(|r| is_payout_period(&r.period) && r.state == SettlementState::Confirmed)
        .map(|r| (r.through.0, r.amount))
        .chain(paid.compacted.map(|c| (c.through.0, c.amount)));
    for (through, amount) in confirmed {
        days.entry(day_of(through.as_second())).or_default().paid += amount;
    }
}

fn add(sum: &mut Totals, t: &Totals) {
    sum.leases += t.leases;
    sum.served_gpu_seconds += t.served_gpu_seconds;
    sum.paid += t.paid;
    sum.pending += t.pending;
    sum.slashed += t.slashed;
}

pub fn render(e: &Earnings) -> String {
    let mut s = String::new();
    let who = e.wallet.as_deref().unwrap_or("every wallet");
    let _ = writeln!(s, "Earnings of {who}:");
    let line = |s: &mut String, name: &str, t: &Totals, extra: &str| {
        let _ = writeln!(
            s,
            "  {name:<24} {:>6} leases {:>10.2} GPU-h  paid {:>14}  pending {:>14}{extra}",
            t.leases,
            t.served_gpu_seconds as f64 / 3600.0,
            Amount::new(t.paid).to_string(),
            Amount::new(t.pending).to_string(),
        );
    };
    line(&mut s, "total", &e.total, "");
    let _ = writeln!(s, " by GPU model:");
    for (model, t) in &e.by_model {
        line(&mut s, model, t, "");
    }
    let _ = writeln!(s, " by node:");
    for n in &e.nodes {
        let reputation =
            n.reputation.map_or("reputation -".to_owned(), |r| format!("reputation {r}"));
        let uptime =
            n.uptime_permille.map_or(String::new(), |u| format!(", uptime {}.{}%", u / 10, u % 10));
        let extra = format!(
            "  {reputation}{uptime}, stake {}, slashed {}",
            Amount::new(n.stake_bonded),
            Amount::new(n.totals.slashed)
        );
        line(&mut s, &n.node, &n.totals, &extra);
    }
    let _ = writeln!(s, " by day (UTC):");
    for (day, d) in &e.by_day {
        let _ = writeln!(
            s,
            "  {day:<24} {:>10.2} GPU-h  paid {:>14}",
            d.served_gpu_seconds as f64 / 3600.0,
            Amount::new(d.paid).to_string()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpumarket_crds::{
        ClusterRef, GpuLeaseSpec, GpuLeaseStatus, LeasePhase, SettlementRecord, SettlementState,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    fn lease(name: &str, wallet: &str, gpus: usize, served: i64, paid: u64) -> GpuLease {
        let start = Timestamp::from_second(1_000_000).expect("time");
        GpuLease {
            metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
            spec: GpuLeaseSpec {
                cluster: ClusterRef { namespace: "ns".into(), name: "c".into(), uid: "u".into() },
                offer: "node-a".into(),
                supplier_wallet: wallet.into(),
                gpus: (0..gpus).map(|i| format!("GPU-{i}")).collect(),
                workers: 1,
                price_per_gpu_hour: 3_600_000,
                worker_resources: None,
                start_time: Time(start),
                terms: None,
            },
            status: Some(GpuLeaseStatus {
                phase: Some(LeasePhase::Ended),
                serving_since: Some(Time(start)),
                end_time: Some(Time(Timestamp::from_second(1_000_000 + served).expect("time"))),
                settlements: vec![SettlementRecord {
                    period: "0001".into(),
                    through: Time(start),
                    amount: paid,
                    signature: None,
                    last_valid_block_height: None,
                    signed_slot: None,
                    transaction: None,
                    state: SettlementState::Confirmed,
                }],
                ..GpuLeaseStatus::default()
            }),
        }
    }

    #[test]
    fn served_paid_and_pending_are_counted_for_the_wallet_only() {
        let leases = [lease("a", "W1", 2, 10, 15_000), lease("b", "W2", 1, 100, 0)];
        let now = Timestamp::from_second(2_000_000).expect("time");
        let e = tally(&leases, &[], Some("W1"), now);
        // 2 GPUs × 10 s at 1000 per GPU-second: 20000, of which 15000 paid.
        assert_eq!(e.total.served_gpu_seconds, 20);
        assert_eq!((e.total.paid, e.total.pending), (15_000, 5_000));
        assert_eq!(e.by_model["unknown"], e.total, "no offer: the model is not known");
        assert_eq!(e.nodes.len(), 1);
        let all = tally(&leases, &[], None, now);
        assert_eq!(all.total.served_gpu_seconds, 120);
        // 1_000_000 s after the epoch is 1970-01-12 13:46:40 UTC: all on one day.
        assert_eq!(e.by_day["1970-01-12"], Day { served_gpu_seconds: 20, paid: 15_000 });
    }

    #[test]
    fn served_time_is_split_at_utc_midnight() {
        // Served from 10 s before midnight for 30 s, on one GPU.
        let mut across = lease("m", "W", 1, 30, 0);
        let status = across.status.as_mut().expect("status");
        let start = Timestamp::from_second(86_400 - 10).expect("time");
        status.serving_since = Some(Time(start));
        status.end_time = Some(Time(Timestamp::from_second(86_400 + 20).expect("time")));
        let e = tally(&[across], &[], None, Timestamp::from_second(200_000).expect("time"));
        assert_eq!(e.by_day["1970-01-01"].served_gpu_seconds, 10);
        assert_eq!(e.by_day["1970-01-02"].served_gpu_seconds, 20);
    }
}
