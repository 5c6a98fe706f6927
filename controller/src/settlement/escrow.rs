//! The buyer's escrow, one token account per GpuCluster (see [`super::accounts`]): whether it
//! covers the cluster, when it has run dry. What it holds is simply its token balance: a
//! deposit is any transfer into it, however it was made, and a refund empties and closes it.

use std::time::Duration;

use super::meter::cost_ceil;

/// What a cluster's escrow account holds, and of which mint (the one the cluster pays in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscrowAccount {
    pub mint: solana_pubkey::Pubkey,
    pub balance: u64,
}

/// Whether a cluster's escrow covers what it needs before it is provisioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepositStatus {
    Covered { deposited: u64 },
    Short { deposited: u64, missing: u64 },
}

impl DepositStatus {
    pub fn new(deposited: u64, required: u64) -> DepositStatus {
        match required.checked_sub(deposited) {
            Some(missing) if missing > 0 => DepositStatus::Short { deposited, missing },
            _ => DepositStatus::Covered { deposited },
        }
    }

    pub fn is_covered(&self) -> bool {
        matches!(self, DepositStatus::Covered { .. })
    }
}

/// Deposit a cluster must have made: its hourly rate over its duration, rounded up, plus the
/// margin (percent, rounded up).
pub fn required_deposit(hourly_rate: u64, duration: Duration, margin_percent: u32) -> u64 {
    let cost = cost_ceil(hourly_rate, duration.as_secs());
    let with_margin = (u128::from(cost) * (100 + u128::from(margin_percent))).div_ceil(100);
    u64::try_from(with_margin).unwrap_or(u64::MAX)
}

/// An active lease's call on its cluster's escrow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accrual {
    /// Cost metered so far and not yet in a payout.
    pub unpaid: u64,
    pub hourly_rate: u64,
}

/// Whether a cluster's escrow is exhausted: what is left does not cover the unpaid usage of its
/// active leases plus their cost over `lookahead` (until the next check, or until the cluster
/// expires if sooner). Its leases end then, so that everything they metered can still be paid.
pub fn exhausted(available: u64, active: &[Accrual], lookahead: Duration) -> bool {
    let need = active.iter().fold(0u64, |sum, a| {
        sum.saturating_add(a.unpaid).saturating_add(cost_ceil(a.hourly_rate, lookahead.as_secs()))
    });
    !active.is_empty() && available < need
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_deposits_say_how_much_more() {
        assert_eq!(
            DepositStatus::new(70, 100),
            DepositStatus::Short { deposited: 70, missing: 30 }
        );
        assert!(DepositStatus::new(100, 100).is_covered());
        assert!(DepositStatus::new(150, 100).is_covered());
    }

    #[test]
    fn required_deposit_covers_the_duration_and_margin() {
        // Rounded up, then the margin on top, rounded up again.
        assert_eq!(required_deposit(3, Duration::from_secs(1800), 0), 2);
        assert_eq!(required_deposit(3_000_000, Duration::from_secs(7200), 10), 6_600_000);
        assert_eq!(required_deposit(1, Duration::from_secs(3600), 1), 2);
    }

    #[test]
    fn escrow_runs_dry_before_it_cannot_pay() {
        let lease = Accrual { unpaid: 50, hourly_rate: 3600 };
        let ten_s = Duration::from_secs(10);
        assert!(!exhausted(60, &[lease], ten_s));
        assert!(exhausted(59, &[lease], ten_s));
        assert!(!exhausted(0, &[], ten_s), "no active lease, nothing to end");
    }
}
