//! Metering and pricing: GPU-seconds of a lease from its record, what they cost, and which
//! payment is due next.
//!
//! Rounding rule: a lease's cost through time `t` is `floor(gpu_seconds(t) × price / 3600)`
//! base units, always computed on the *cumulative* meter, and each payment is that cost minus
//! what was already paid. Payments therefore never add up to more than the exact cost (escrow is
//! never overdrawn by rounding) and the final total is short of the exact cost by less than one
//! base unit per lease, however many periods it was paid in.

use std::time::Duration;

use gpumarket_crds::{GpuLease, SettlementRecord, SettlementState};
use jiff::Timestamp;

pub const SECONDS_PER_HOUR: u64 = 3600;

/// What a lease's record says about its meter: never anything the controller remembers, so a
/// restart never changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meter {
    pub start: Timestamp,
    /// When metering stopped; `None` while the lease is active.
    pub end: Option<Timestamp>,
    pub gpus: u64,
    pub price_per_gpu_hour: u64,
}

impl Meter {
    pub fn of(lease: &GpuLease) -> Meter {
        Meter {
            start: lease.spec.start_time.0,
            end: lease.status.as_ref().and_then(|s| s.end_time.as_ref()).map(|t| t.0),
            gpus: lease.spec.gpus.len() as u64,
            price_per_gpu_hour: lease.spec.price_per_gpu_hour,
        }
    }

    /// GPU-seconds from the start to `t` (or to the end, if earlier); whole seconds.
    pub fn gpu_seconds_through(&self, t: Timestamp) -> u64 {
        let until = self.end.map_or(t, |end| end.min(t));
        let seconds = until.as_second().saturating_sub(self.start.as_second()).max(0);
        (seconds as u64).saturating_mul(self.gpus)
    }

    /// Cost of the meter through `t`, rounded down (see the module's rounding rule).
    pub fn cost_through(&self, t: Timestamp) -> u64 {
        cost(self.gpu_seconds_through(t), self.price_per_gpu_hour)
    }

    /// Base units per hour while active.
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

/// Base units confirmed paid to the supplier by these records.
pub fn confirmed_paid(records: &[SettlementRecord]) -> u64 {
    records
        .iter()
        .filter(|r| r.state == SettlementState::Confirmed && is_payout_period(&r.period))
        .map(|r| r.amount)
        .sum()
}

/// Payout periods are numbered; other records on a lease (such as a slash) are not payouts.
pub fn is_payout_period(period: &str) -> bool {
    !period.is_empty() && period.bytes().all(|b| b.is_ascii_digit())
}

/// Usage confirmed paid up to this time (the lease start when nothing is).
pub fn settled_through(meter: &Meter, records: &[SettlementRecord]) -> Timestamp {
    records
        .iter()
        .filter(|r| r.state == SettlementState::Confirmed && is_payout_period(&r.period))
        .map(|r| r.through.0)
        .max()
        .unwrap_or(meter.start)
        .max(meter.start)
}

/// Whether every second of an ended lease is confirmed paid.
pub fn fully_settled(meter: &Meter, records: &[SettlementRecord]) -> bool {
    meter.end.is_some_and(|end| settled_through(meter, records) >= end)
        && !records.iter().any(|r| r.state != SettlementState::Confirmed)
}

/// The payout due now, if any. Periods are `period` long from the lease start; an active lease
/// pays through the last whole period boundary that has passed, an ended lease through its end.
/// Several overdue periods (the controller was down) are paid in one payment keyed by the last
/// of them. A lease whose payout is in flight (`Signed`) has nothing new due; an `Expired`
/// payout is due again unchanged (same key, same amount), to be re-signed.
pub fn next_due(
    meter: &Meter,
    records: &[SettlementRecord],
    period: Duration,
    now: Timestamp,
) -> Option<Due> {
    let payouts = || records.iter().filter(|r| is_payout_period(&r.period));
    if payouts().any(|r| r.state == SettlementState::Signed) {
        return None;
    }
    if let Some(expired) = payouts().find(|r| r.state == SettlementState::Expired) {
        return Some(Due {
            period: expired.period.clone(),
            through: expired.through.0,
            amount: expired.amount,
        });
    }
    let period_s = period.as_secs().max(1) as i64;
    let start = meter.start.as_second();
    let through_s = match meter.end {
        Some(end) if end.as_second() <= now.as_second() => end.as_second(),
        _ => start + (now.as_second() - start).max(0) / period_s * period_s,
    };
    let through = Timestamp::from_second(through_s).ok()?;
    if through <= settled_through(meter, records) {
        return None;
    }
    let index = ((through_s - start).max(0) as u64).div_ceil(period_s as u64);
    let last_index = payouts().filter_map(|r| r.period.parse::<u64>().ok()).max().unwrap_or(0);
    let amount = meter.cost_through(through).saturating_sub(confirmed_paid(records));
    Some(Due { period: period_key(index.max(last_index + 1)), through, amount })
}

/// Period key as written in records and memos: zero-padded so keys sort in time order.
pub fn period_key(index: u64) -> String {
    format!("{index:04}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use proptest::prelude::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("valid test time")
    }

    fn meter(gpus: u64, price: u64, end: Option<i64>) -> Meter {
        Meter { start: ts(0), end: end.map(ts), gpus, price_per_gpu_hour: price }
    }

    fn confirmed(due: &Due) -> SettlementRecord {
        SettlementRecord {
            period: due.period.clone(),
            through: Time(due.through),
            amount: due.amount,
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
            if let Some(due) = next_due(meter, &records, Duration::from_secs(period), ts(t)) {
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
        assert_eq!(next_due(&m, &[], period, ts(59)), None);
        let due = next_due(&m, &[], period, ts(61)).expect("first period due");
        assert_eq!((due.period.as_str(), due.through, due.amount), ("0001", ts(60), 120));
        let records = vec![confirmed(&due)];
        assert_eq!(next_due(&m, &records, period, ts(119)), None);
        // The controller was down for three periods: one catch-up payment, keyed by the last.
        let due = next_due(&m, &records, period, ts(250)).expect("catch-up due");
        assert_eq!((due.period.as_str(), due.through, due.amount), ("0004", ts(240), 360));
    }

    #[test]
    fn ended_lease_pays_through_its_end_then_nothing() {
        let m = meter(1, 7200, Some(90));
        let period = Duration::from_secs(60);
        let first = next_due(&m, &[], period, ts(70)).expect("first period");
        assert_eq!(first.through, ts(60));
        let records = vec![confirmed(&first)];
        let last = next_due(&m, &records, period, ts(200)).expect("final payment");
        assert_eq!((last.period.as_str(), last.through, last.amount), ("0002", ts(90), 60));
        let records = vec![confirmed(&first), confirmed(&last)];
        assert!(fully_settled(&m, &records));
        assert_eq!(next_due(&m, &records, period, ts(500)), None);
    }

    #[test]
    fn in_flight_blocks_and_expired_is_due_again_unchanged() {
        let m = meter(1, 3600, None);
        let period = Duration::from_secs(10);
        let due = next_due(&m, &[], period, ts(15)).expect("due");
        let mut record = confirmed(&due);
        record.state = SettlementState::Signed;
        assert_eq!(next_due(&m, std::slice::from_ref(&record), period, ts(100)), None);
        record.state = SettlementState::Expired;
        assert_eq!(next_due(&m, &[record], period, ts(100)), Some(due));
    }

    #[test]
    fn keys_stay_increasing_when_the_period_changes() {
        let m = meter(1, 3600, None);
        let records = pay_at(&m, &[100], 50);
        assert_eq!(records[0].period, "0002");
        // With a 100 s period, 200 s is boundary 2 again: the key moves on regardless.
        let due = next_due(&m, &records, Duration::from_secs(100), ts(250)).expect("due");
        assert_eq!((due.period.as_str(), due.through, due.amount), ("0003", ts(200), 100));
    }

    proptest! {
        /// However the payments fall, they add up to the cumulative rounded-down cost: never
        /// more than the exact cost, never a whole base unit less.
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
            let records = pay_at(&m, &times, period);
            let paid: u64 = records.iter().map(|r| r.amount).sum();
            let exact_numerator = u128::from(gpus) * duration as u128 * u128::from(price);
            prop_assert!(u128::from(paid) * 3600 <= exact_numerator);
            prop_assert!(exact_numerator - u128::from(paid) * 3600 < 3600);
            prop_assert!(fully_settled(&m, &records));
            // Keys are numbers (zero-padded to four digits, longer past 9999).
            let keys: Vec<u64> = records.iter().map(|r| r.period.parse().expect("numeric")).collect();
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
