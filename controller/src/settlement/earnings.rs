//! Supplier earnings: what nodes served and were paid, from the leases' meters and their
//! confirmed payout records (each one a transfer on chain to the lease's supplier wallet). Pure;
//! `kubectl gpumarket earnings` prints it and the controller exports it as metrics.

use std::collections::{BTreeMap, HashMap};

use gpumarket_crds::{GpuLease, GpuOffer, LeasePhase, SettlementState};
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use super::meter::{Meter, Paid, is_payout_period};
use super::stake::SLASH_PERIOD;

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
    /// Confirmed paid to the wallet, in price units.
    pub paid: u64,
    /// The same payouts in base units of each mint they moved, as on chain, by mint (the
    /// same as `paid` for a stablecoin; converted at a price feed's rate for the market's own
    /// token).
    pub paid_tokens: BTreeMap<String, u64>,
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

/// Key in `paidTokens` of payouts of leases bound before their terms named the mint.
pub const UNRECORDED_MINT: &str = "unrecorded";

/// The earnings of `wallet` (every supplier when `None`) at `now`.
pub fn tally<'a>(
    leases: impl IntoIterator<Item = &'a GpuLease>,
    offers: impl IntoIterator<Item = &'a GpuOffer>,
    wallet: Option<&str>,
    now: Timestamp,
) -> Earnings {
    let offers: HashMap<String, &GpuOffer> =
        offers.into_iter().map(|o| (o.name_any(), o)).collect();
    let mut nodes: BTreeMap<String, NodeEarnings> = BTreeMap::new();
    let mut by_day: BTreeMap<String, Day> = BTreeMap::new();
    for lease in leases.into_iter().filter(|l| wallet.is_none_or(|w| l.spec.supplier_wallet == w)) {
        let offer = offers.get(&lease.spec.offer).copied();
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
        let tokens = Paid::of(lease).confirmed_tokens();
        if tokens > 0 {
            let mint = lease.spec.terms.as_ref().and_then(|t| t.mint.clone());
            *t.paid_tokens.entry(mint.unwrap_or_else(|| UNRECORDED_MINT.into())).or_default() +=
                tokens;
        }
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

/// Seconds since the oldest served GPU-second of `leases` that is not confirmed paid on chain (0
/// when every one is): how far payouts are behind usage. It stays below the settlement period
/// plus a round while settlement keeps up; leases settled for good (paid what their escrow
/// could) are left out.
pub fn settlement_lag<'a>(leases: impl IntoIterator<Item = &'a GpuLease>, now: Timestamp) -> u64 {
    leases
        .into_iter()
        .filter(|l| l.status.as_ref().and_then(|s| s.phase) != Some(LeasePhase::Settled))
        .filter_map(|lease| {
            let meter = Meter::of(lease);
            let through = Paid::of(lease).through(&meter)?;
            let served_until = meter.end.map_or(now, |end| end.min(now));
            (served_until > through).then(|| now.duration_since(through).as_secs())
        })
        .max()
        .map_or(0, |lag| u64::try_from(lag).unwrap_or(0))
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
    for (mint, tokens) in &t.paid_tokens {
        *sum.paid_tokens.entry(mint.clone()).or_default() += tokens;
    }
    sum.pending += t.pending;
    sum.slashed += t.slashed;
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpumarket_crds::{ClusterRef, GpuLeaseSpec, GpuLeaseStatus, SettlementRecord};
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
                    conversion: None,
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

    #[test]
    fn the_lag_is_the_age_of_the_oldest_served_second_not_confirmed_paid() {
        let now = Timestamp::from_second(1_000_500).expect("time");
        let at = |second| Time(Timestamp::from_second(second).expect("time"));
        // Served 100 s from second 1_000_000, paid through its start only: 500 s behind.
        let behind = lease("a", "W", 1, 100, 0);
        assert_eq!(settlement_lag([&behind], now), 500);
        // Paid through its end: nothing behind.
        let mut paid = lease("b", "W", 1, 100, 100_000);
        paid.status.as_mut().expect("status").settlements[0].through = at(1_000_100);
        assert_eq!(settlement_lag([&paid], now), 0);
        assert_eq!(settlement_lag([&paid, &behind], now), 500);
        // Settled for good (paid what its escrow held): not behind.
        let mut settled = behind.clone();
        settled.status.as_mut().expect("status").phase = Some(LeasePhase::Settled);
        assert_eq!(settlement_lag([&paid, &settled], now), 0);
        // Not serving yet: nothing to pay.
        let mut waiting = behind.clone();
        waiting.status.as_mut().expect("status").serving_since = None;
        assert_eq!(settlement_lag([&waiting], now), 0);
    }
}
