//! Metering and pricing: GPU-seconds of a lease from its record, what they cost, and which
//! payment is due next.
//!
//! Rounding rule: a lease's cost through time `t` is `floor(gpu_seconds(t) × price / 3600)`
//! base units, always computed on the *cumulative* meter, and each payment is that cost minus
//! what was already paid. Payments therefore never add up to more than the exact cost (escrow is
//! never overdrawn by rounding) and the final total is short of the exact cost by less than one
//! base unit per lease, however many periods it was paid in.

use std::time::Duration;

use gpumarket_crds::{
    CompactedSettlements, GpuLease, GpuLeaseStatus, SettlementRecord, SettlementState,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

pub const SECONDS_PER_HOUR: u64 = 3600;

/// Payout records kept in full on a lease; older confirmed ones are compacted.
pub const RECORDS_KEPT: usize = 8;

/// What a lease's record says about its meter: never anything the controller remembers, so a
/// restart never changes it. Billing runs from the moment the lease serves (its workers Ready
/// on the supplier's node), not from the bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meter {
    /// When the GPUs were bound.
    pub hired: Timestamp,
    /// When billing started (`status.servingSince`); `None` while the lease has not served.
    pub start: Option<Timestamp>,
    /// When metering stopped; `None` while the lease is active.
    pub end: Option<Timestamp>,
    pub gpus: u64,
    pub price_per_gpu_hour: u64,
}

impl Meter {
    pub fn of(lease: &GpuLease) -> Meter {
        let status = lease.status.as_ref();
        Meter {
            hired: lease.spec.start_time.0,
            start: status.and_then(|s| s.serving_since.as_ref()).map(|t| t.0),
            end: status.and_then(|s| s.end_time.as_ref()).map(|t| t.0),
            gpus: lease.spec.gpus.len() as u64,
            price_per_gpu_hour: lease.spec.price_per_gpu_hour,
        }
    }

    /// GPU-seconds served from the start of service to `t` (or to the end, if earlier).
    pub fn gpu_seconds_through(&self, t: Timestamp) -> u64 {
        self.start.map_or(0, |start| self.gpu_seconds_between(start, t))
    }

    /// GPU-seconds the GPUs were bound for, to `t` (or to the end, if earlier).
    pub fn hired_gpu_seconds_through(&self, t: Timestamp) -> u64 {
        self.gpu_seconds_between(self.hired, t)
    }

    fn gpu_seconds_between(&self, from: Timestamp, t: Timestamp) -> u64 {
        let until = self.end.map_or(t, |end| end.min(t));
        let seconds = until.as_second().saturating_sub(from.as_second()).max(0);
        (seconds as u64).saturating_mul(self.gpus)
    }

    /// Cost of the meter through `t`, rounded down (see the module's rounding rule).
    pub fn cost_through(&self, t: Timestamp) -> u64 {
        cost(self.gpu_seconds_through(t), self.price_per_gpu_hour)
    }

    /// Base units per hour while serving.
    pub fn hourly_rate(&self) -> u64 {
        self.gpus.saturating_mul(self.price_per_gpu_hour)
    }
}

/// `floor(gpu_seconds × price_per_gpu_hour / 3600)`, exact (128-bit intermediate), saturating.
pub fn cost(gpu_seconds: u64, price_per_gpu_hour: u64) -> u64 {
    let exact =
        u128::from(gpu_seconds) * u128::from(price_per_gpu_hour) / u128::from(SECONDS_PER_HOUR);
    u64::try_from(exact).unwrap_or(u64::MAX)
}

/// `ceil(rate × seconds / 3600)`: what an hourly rate costs over a duration, rounded up, for
/// amounts that must be *covered* (deposits, funds held back).
pub fn cost_ceil(hourly_rate: u64, seconds: u64) -> u64 {
    let exact =
        (u128::from(hourly_rate) * u128::from(seconds)).div_ceil(u128::from(SECONDS_PER_HOUR));
    u64::try_from(exact).unwrap_or(u64::MAX)
}

/// The next payment of a lease: its idempotency period key, the time it pays through, and the
/// amount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub period: String,
    pub through: Timestamp,
    pub amount: u64,
}

/// Payout periods are numbered; other records on a lease (such as a slash) are not payouts.
pub fn is_payout_period(period: &str) -> bool {
    !period.is_empty() && period.bytes().all(|b| b.is_ascii_digit())
}

/// A lease's payouts so far: the compacted total and the records not folded into it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Paid<'a> {
    pub compacted: Option<&'a CompactedSettlements>,
    pub records: &'a [SettlementRecord],
}

impl<'a> Paid<'a> {
    pub fn of(lease: &'a GpuLease) -> Paid<'a> {
        lease.status.as_ref().map_or_else(Paid::default, Paid::of_status)
    }

    pub fn of_status(status: &'a GpuLeaseStatus) -> Paid<'a> {
        Paid { compacted: status.compacted.as_ref(), records: &status.settlements }
    }

    fn payouts(&self) -> impl Iterator<Item = &'a SettlementRecord> {
        self.records.iter().filter(|r| is_payout_period(&r.period))
    }

    /// Base units confirmed paid to the supplier.
    pub fn confirmed(&self) -> u64 {
        let records: u64 = self
            .payouts()
            .filter(|r| r.state == SettlementState::Confirmed)
            .map(|r| r.amount)
            .sum();
        records.saturating_add(self.compacted.map_or(0, |c| c.amount))
    }

    /// Base units of the mint confirmed paid (`confirmed` converted at each payout's rate).
    pub fn confirmed_tokens(&self) -> u64 {
        let records: u64 = self
            .payouts()
            .filter(|r| r.state == SettlementState::Confirmed)
            .map(tokens_moved)
            .sum();
        let compacted = self.compacted.map_or(0, |c| c.tokens.unwrap_or(c.amount));
        records.saturating_add(compacted)
    }

    /// The time confirmed payouts cover usage up to, if any is confirmed.
    pub fn confirmed_through(&self) -> Option<Timestamp> {
        let records =
            self.payouts().filter(|r| r.state == SettlementState::Confirmed).map(|r| r.through.0);
        records.chain(self.compacted.map(|c| c.through.0)).max()
    }

    /// The time payouts that landed or may still land (not expired) cover usage up to.
    pub fn committed_through(&self) -> Option<Timestamp> {
        let records =
            self.payouts().filter(|r| r.state != SettlementState::Expired).map(|r| r.through.0);
        records.chain(self.compacted.map(|c| c.through.0)).max()
    }

    /// Usage confirmed paid up to this time (the start of service when nothing is); `None`
    /// while the lease has not served.
    pub fn through(&self, meter: &Meter) -> Option<Timestamp> {
        let start = meter.start?;
        Some(self.confirmed_through().unwrap_or(start).max(start))
    }

    /// The highest period key used so far (compacted ones included).
    fn last_index(&self) -> u64 {
        self.payouts()
            .map(|r| r.period.as_str())
            .chain(self.compacted.map(|c| c.last_period.as_str()))
            .filter_map(|p| p.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    }

    /// Payouts and slashes that have landed or may still land (not expired).
    pub fn committed(&self) -> u64 {
        let records: u64 =
            self.payouts().filter(|r| r.state != SettlementState::Expired).map(|r| r.amount).sum();
        records.saturating_add(self.compacted.map_or(0, |c| c.amount))
    }
}

/// Whether every served second of an ended lease is confirmed paid, and nothing is in flight.
pub fn fully_settled(meter: &Meter, paid: &Paid<'_>) -> bool {
    let Some(end) = meter.end else { return false };
    let through_end = paid.through(meter).is_none_or(|through| through >= end);
    through_end && paid.records.iter().all(|r| r.state == SettlementState::Confirmed)
}

/// The payout due now, if any. Periods are `period` long from the start of service; an active
/// lease pays through the last whole period boundary that has passed, an ended lease through
/// its end. Several overdue periods (the controller was down) are paid in one payment keyed by
/// the last of them. A lease whose payout is in flight (`Signed`) has nothing new due; an
/// `Expired` payout is due again with the same key and through time (its amount is decided
/// again, as it provably never moved).
pub fn next_due(meter: &Meter, paid: &Paid<'_>, period: Duration, now: Timestamp) -> Option<Due> {
    let start = meter.start?;
    if paid.payouts().any(|r| r.state == SettlementState::Signed) {
        return None;
    }
    if let Some(expired) = paid.payouts().find(|r| r.state == SettlementState::Expired) {
        let amount = meter.cost_through(expired.through.0).saturating_sub(paid.confirmed());
        return Some(Due { period: expired.period.clone(), through: expired.through.0, amount });
    }
    let period_s = period.as_secs().max(1) as i64;
    let start_s = start.as_second();
    let through_s = match meter.end {
        Some(end) if end.as_second() <= now.as_second() => end.as_second().max(start_s),
        _ => start_s + (now.as_second() - start_s).max(0) / period_s * period_s,
    };
    let through = Timestamp::from_second(through_s).ok()?;
    if paid.through(meter).is_some_and(|t| through <= t) {
        return None;
    }
    let index = ((through_s - start_s).max(0) as u64).div_ceil(period_s as u64);
    let amount = meter.cost_through(through).saturating_sub(paid.confirmed());
    Some(Due { period: period_key(index.max(paid.last_index() + 1)), through, amount })
}

/// Period key as written in records and memos: zero-padded so keys sort in time order.
pub fn period_key(index: u64) -> String {
    format!("{index:04}")
}

/// Base units of the mint a record moves (a converted payout records the USD it covers).
pub fn tokens_moved(record: &SettlementRecord) -> u64 {
    record.conversion.as_ref().map_or(record.amount, |c| c.tokens)
}

/// Fold confirmed payout records beyond the newest [`RECORDS_KEPT`] into `status.compacted`, so
/// a lease paid over many periods keeps a bounded status.
pub fn compact(status: &mut GpuLeaseStatus) {
    let mut confirmed: Vec<usize> = status
        .settlements
        .iter()
        .enumerate()
        .filter(|(_, r)| is_payout_period(&r.period) && r.state == SettlementState::Confirmed)
        .map(|(i, _)| i)
        .collect();
    if confirmed.len() <= RECORDS_KEPT {
        return;
    }
    confirmed.sort_by_key(|i| status.settlements[*i].period.parse::<u64>().unwrap_or(0));
    let fold: Vec<usize> = confirmed[..confirmed.len() - RECORDS_KEPT].to_vec();
    let mut compacted = status.compacted.clone().unwrap_or_else(|| CompactedSettlements {
        records: 0,
        last_period: period_key(0),
        through: Time(Timestamp::UNIX_EPOCH),
        amount: 0,
        tokens: None,
    });
    for &i in &fold {
        let r = &status.settlements[i];
        compacted.records += 1;
        if r.conversion.is_some() || compacted.tokens.is_some() {
            let before = compacted.tokens.unwrap_or(compacted.amount);
            compacted.tokens = Some(before.saturating_add(tokens_moved(r)));
        }
        compacted.amount = compacted.amount.saturating_add(r.amount);
        if r.through.0 > compacted.through.0 {
            compacted.through = r.through.clone();
        }
        if r.period.parse::<u64>().unwrap_or(0) > compacted.last_period.parse::<u64>().unwrap_or(0)
        {
            compacted.last_period = r.period.clone();
        }
    }
    let mut index = 0;
    status.settlements.retain(|_| {
        let keep = !fold.contains(&index);
        index += 1;
        keep
    });
    status.compacted = Some(compacted);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("valid test time")
    }

    /// A meter serving from its bind at 0.
    fn meter(gpus: u64, price: u64, end: Option<i64>) -> Meter {
        Meter {
            hired: ts(0),
            start: Some(ts(0)),
            end: end.map(ts),
            gpus,
            price_per_gpu_hour: price,
        }
    }

    fn paid(records: &[SettlementRecord]) -> Paid<'_> {
        Paid { compacted: None, records }
    }

    fn confirmed(due: &Due) -> SettlementRecord {
        SettlementRecord {
            period: due.period.clone(),
            through: Time(due.through),
            amount: due.amount,
            conversion: None,
            signature: Some("sig".into()),
            last_valid_block_height: Some(1),
            signed_slot: None,
            transaction: None,
            state: SettlementState::Confirmed,
        }
    }

    /// Pay every due payment at each of the given times, confirming at once; the records.
    fn pay_at(meter: &Meter, times: &[i64], period: u64) -> Vec<SettlementRecord> {
        let mut records = Vec::new();
        for &t in times {
            if let Some(due) = next_due(meter, &paid(&records), Duration::from_secs(period), ts(t))
            {
                records.push(confirmed(&due));
            }
        }
        records
    }

    #[test]
    fn meter_counts_gpu_seconds_until_the_end() {
        let m = meter(4, 3600, Some(100));
        assert_eq!(m.gpu_seconds_through(ts(50)), 200);
        assert_eq!(m.gpu_seconds_through(ts(1000)), 400);
        assert_eq!(m.gpu_seconds_through(ts(-5)), 0);
        assert_eq!(m.cost_through(ts(1000)), 400);
    }

    #[test]
    fn billing_runs_from_service_not_from_the_bind() {
        let mut m = meter(2, 3600, Some(100));
        m.start = None;
        assert_eq!(m.gpu_seconds_through(ts(100)), 0, "never served, never billed");
        assert_eq!(m.hired_gpu_seconds_through(ts(100)), 200);
        assert_eq!(next_due(&m, &paid(&[]), Duration::from_secs(10), ts(200)), None);
        assert!(fully_settled(&m, &paid(&[])), "nothing to pay for an unserved lease");
        m.start = Some(ts(30));
        assert_eq!(m.gpu_seconds_through(ts(100)), 140);
        let due = next_due(&m, &paid(&[]), Duration::from_secs(60), ts(200)).expect("due");
        assert_eq!((due.through, due.amount), (ts(100), 140));
    }

    #[test]
    fn cost_rounds_down_and_never_overflows() {
        assert_eq!(cost(1, 3599), 0);
        assert_eq!(cost(1, 3600), 1);
        assert_eq!(cost(3601, 1000), 1000);
        assert_eq!(cost(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(cost_ceil(1, 1), 1);
        assert_eq!(cost_ceil(3600, 10), 10);
    }

    #[test]
    fn active_lease_pays_whole_periods_only() {
        let m = meter(2, 3600, None);
        let period = Duration::from_secs(60);
        assert_eq!(next_due(&m, &paid(&[]), period, ts(59)), None);
        let due = next_due(&m, &paid(&[]), period, ts(61)).expect("first period due");
        assert_eq!((due.period.as_str(), due.through, due.amount), ("0001", ts(60), 120));
        let records = vec![confirmed(&due)];
        assert_eq!(next_due(&m, &paid(&records), period, ts(119)), None);
        // The controller was down for three periods: one catch-up payment, keyed by the last.
        let due = next_due(&m, &paid(&records), period, ts(250)).expect("catch-up due");
        assert_eq!((due.period.as_str(), due.through, due.amount), ("0004", ts(240), 360));
    }

    #[test]
    fn ended_lease_pays_through_its_end_then_nothing() {
        let m = meter(1, 7200, Some(90));
        let period = Duration::from_secs(60);
        let first = next_due(&m, &paid(&[]), period, ts(70)).expect("first period");
        assert_eq!(first.through, ts(60));
        let records = vec![confirmed(&first)];
        let last = next_due(&m, &paid(&records), period, ts(200)).expect("final payment");
        assert_eq!((last.period.as_str(), last.through, last.amount), ("0002", ts(90), 60));
        let records = vec![confirmed(&first), confirmed(&last)];
        assert!(fully_settled(&m, &paid(&records)));
        assert_eq!(next_due(&m, &paid(&records), period, ts(500)), None);
    }

    #[test]
    fn in_flight_blocks_and_expired_is_due_again_under_its_key() {
        let m = meter(1, 3600, None);
        let period = Duration::from_secs(10);
        let due = next_due(&m, &paid(&[]), period, ts(15)).expect("due");
        let mut record = confirmed(&due);
        record.state = SettlementState::Signed;
        assert_eq!(next_due(&m, &paid(std::slice::from_ref(&record)), period, ts(100)), None);
        record.state = SettlementState::Expired;
        assert_eq!(next_due(&m, &paid(&[record]), period, ts(100)), Some(due));
    }

    #[test]
    fn keys_stay_increasing_when_the_period_changes() {
        let m = meter(1, 3600, None);
        let records = pay_at(&m, &[100], 50);
        assert_eq!(records[0].period, "0002");
        // With a 100 s period, 200 s is boundary 2 again: the key moves on regardless.
        let due = next_due(&m, &paid(&records), Duration::from_secs(100), ts(250)).expect("due");
        assert_eq!((due.period.as_str(), due.through, due.amount), ("0003", ts(200), 100));
    }

    #[test]
    fn compaction_keeps_totals_keys_and_a_bounded_record() {
        let m = meter(1, 3600, None);
        let times: Vec<i64> = (1..=30).map(|i| i * 10 + 1).collect();
        let mut status =
            GpuLeaseStatus { settlements: pay_at(&m, &times, 10), ..Default::default() };
        let before = (Paid::of_status(&status).confirmed(), Paid::of_status(&status).through(&m));
        compact(&mut status);
        assert_eq!(status.settlements.len(), RECORDS_KEPT);
        let after = Paid::of_status(&status);
        assert_eq!((after.confirmed(), after.through(&m)), before);
        assert_eq!(status.compacted.as_ref().map(|c| c.records), Some(22));
        let due = next_due(&m, &after, Duration::from_secs(10), ts(400)).expect("due");
        assert_eq!(due.period, "0040", "keys go on past the compacted ones");
        assert_eq!(due.amount, 100);
        assert_eq!(status.compacted.as_ref().and_then(|c| c.tokens), None, "nothing converted");
    }

    #[test]
    fn compaction_keeps_the_tokens_of_converted_payouts() {
        let m = meter(1, 3600, None);
        let times: Vec<i64> = (1..=12).map(|i| i * 10 + 1).collect();
        let mut settlements = pay_at(&m, &times, 10);
        for r in &mut settlements {
            r.conversion = Some(gpumarket_crds::ConvertedPayout {
                tokens: r.amount * 400,
                price: 250,
                exponent: -2,
                publish_time: r.through.clone(),
            });
        }
        let mut status = GpuLeaseStatus { settlements, ..Default::default() };
        let before = Paid::of_status(&status).confirmed_tokens();
        assert_eq!(before, Paid::of_status(&status).confirmed() * 400);
        compact(&mut status);
        assert_eq!(Paid::of_status(&status).confirmed_tokens(), before);
    }

    proptest! {
        /// However the payments fall (and however often they are compacted), they add up to the
        /// cumulative rounded-down cost: never more than the exact cost, never a whole base unit
        /// less.
        #[test]
        fn payments_add_up_to_the_exact_cost_less_under_one_unit(
            gpus in 1u64..16,
            price in 1u64..50_000_000,
            duration in 1i64..20_000,
            period in 1u64..4_000,
            mut times in proptest::collection::vec(0i64..25_000, 0..30),
        ) {
            let m = meter(gpus, price, Some(duration));
            times.sort_unstable();
            times.push(30_000);
            let mut status = GpuLeaseStatus::default();
            let mut keys = Vec::new();
            for &t in &times {
                if let Some(due) = next_due(&m, &Paid::of_status(&status), Duration::from_secs(period), ts(t)) {
                    keys.push(due.period.parse::<u64>().expect("numeric"));
                    status.settlements.push(confirmed(&due));
                    compact(&mut status);
                }
            }
            let paid_total = Paid::of_status(&status).confirmed();
            let exact_numerator = u128::from(gpus) * duration as u128 * u128::from(price);
            prop_assert!(u128::from(paid_total) * 3600 <= exact_numerator);
            prop_assert!(exact_numerator - u128::from(paid_total) * 3600 < 3600);
            prop_assert!(fully_settled(&m, &Paid::of_status(&status)));
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted, keys, "keys unique and increasing");
        }

        /// The meter depends only on the record: recomputing it (a restart) gives the same value,
        /// and it never runs backwards.
        #[test]
        fn meter_is_monotonic_and_capped_by_the_end(
            gpus in 1u64..16, end in 0i64..100_000, a in 0i64..200_000, b in 0i64..200_000,
        ) {
            let m = meter(gpus, 1, Some(end));
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(m.gpu_seconds_through(ts(lo)) <= m.gpu_seconds_through(ts(hi)));
            prop_assert!(m.gpu_seconds_through(ts(hi)) <= gpus * end as u64);
            prop_assert_eq!(m.gpu_seconds_through(ts(a)), m.gpu_seconds_through(ts(a)));
        }
    }
}
