//! Supplier reputation: uptime (heartbeat coverage) and lease outcomes make a score from 0 to
//! 1000, written to the GpuOffer status for the matching engine; a hash of the whole table is
//! anchored on chain in a memo so that anyone can audit it.

use gpumarket_crds::{EndReason, GpuLease, Reputation};
use sha2::{Digest, Sha256};

/// How fast uptime follows the latest heartbeat sample: each sample moves it 1/64 of the way
/// (about an hour of memory at one sample a minute), rounded so that it always moves.
const UPTIME_SMOOTHING: u32 = 64;

/// Uptime after one more sample (was the heartbeat fresh?). A node seen for the first time
/// starts from its first sample.
pub fn next_uptime(previous_permille: Option<u32>, heartbeat_fresh: bool) -> u32 {
    let sample = if heartbeat_fresh { 1000 } else { 0 };
    let Some(prev) = previous_permille.map(|p| p.min(1000)) else {
        return sample;
    };
    if sample >= prev {
        prev + (sample - prev).div_ceil(UPTIME_SMOOTHING)
    } else {
        prev - (prev - sample).div_ceil(UPTIME_SMOOTHING)
    }
}

/// Score: uptime scaled by the share of leases completed, with one completed and one failed
/// lease assumed (so a new supplier starts at half its uptime and one outcome moves it little).
pub fn score(uptime_permille: u32, completed: u64, failed: u64) -> u32 {
    let outcomes = u128::from(completed) + 1;
    let total = u128::from(completed) + u128::from(failed) + 2;
    let score = u128::from(uptime_permille.min(1000)) * outcomes / total;
    u32::try_from(score).unwrap_or(1000)
}

/// Lease outcomes of one offer: (completed, failed). Only ended leases count; a lease ended by
/// the buyer running out of funds or deleting the cluster counts as completed by the supplier,
/// a surplus lease or one whose buyer's pods could not start (never served: a supplier buying
/// its own GPUs with a broken image would gain from it) not at all.
pub fn outcomes<'a>(offer: &str, leases: impl IntoIterator<Item = &'a GpuLease>) -> (u64, u64) {
    leases.into_iter().filter(|l| l.spec.offer == offer).fold((0, 0), |(ok, failed), lease| {
        match lease.status.as_ref().and_then(|s| s.end_reason) {
            Some(EndReason::SupplierFailure | EndReason::NotServing) => (ok, failed + 1),
            Some(EndReason::Surplus | EndReason::WorkloadFailed) | None => (ok, failed),
            Some(_) => (ok + 1, failed),
        }
    })
}

/// The reputation of an offer after one more uptime sample. A failed proof-of-compute
/// challenge weighs as much as a failed lease: either way the GPUs were not what was sold.
pub fn assess(
    previous: Option<&Reputation>,
    heartbeat_fresh: bool,
    (completed, failed): (u64, u64),
    challenges_failed: u64,
) -> Reputation {
    let uptime_permille = next_uptime(previous.map(|r| r.uptime_permille), heartbeat_fresh);
    Reputation {
        uptime_permille,
        leases_completed: completed,
        leases_failed: failed,
        challenges_failed,
        score: score(uptime_permille, completed, failed.saturating_add(challenges_failed)),
    }
}

/// sha256 (hex) of the reputation table: one line `node score uptime completed failed` per
/// offer, sorted by node, so the hash depends only on the table's content.
pub fn table_hash<'a>(table: impl IntoIterator<Item = (&'a str, &'a Reputation)>) -> String {
    let mut lines: Vec<String> = table
        .into_iter()
        .map(|(node, r)| {
            format!(
                "{node} {} {} {} {}\n",
                r.score, r.uptime_permille, r.leases_completed, r.leases_failed
            )
        })
        .collect();
    lines.sort();
    let digest = Sha256::digest(lines.concat().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uptime_follows_heartbeats_and_always_moves() {
        assert_eq!(next_uptime(None, true), 1000);
        assert_eq!(next_uptime(None, false), 0);
        assert_eq!(next_uptime(Some(1000), false), 984);
        assert_eq!(next_uptime(Some(999), true), 1000);
        assert_eq!(next_uptime(Some(1), false), 0);
    }

    #[test]
    fn failures_cost_more_than_completions_earn() {
        assert_eq!(score(1000, 0, 0), 500);
        assert_eq!(score(1000, 8, 0), 900);
        assert_eq!(score(1000, 8, 2), 750);
        assert_eq!(score(500, 8, 0), 450);
    }

    #[test]
    fn only_served_leases_count_as_outcomes() {
        let cluster = crate::testing::mk_cluster("c", 4, 1);
        let ended = |node: &str, reason: Option<EndReason>| {
            let mut lease = crate::testing::mk_lease(&cluster, node, &["g"], 1);
            lease.status =
                Some(gpumarket_crds::GpuLeaseStatus { end_reason: reason, ..Default::default() });
            lease
        };
        let leases = [
            ended("n1", Some(EndReason::Expired)),
            ended("n1", Some(EndReason::OutOfFunds)),
            ended("n1", Some(EndReason::SupplierFailure)),
            ended("n1", Some(EndReason::Surplus)),
            ended("n1", Some(EndReason::WorkloadFailed)),
            ended("n1", None),
            ended("n2", Some(EndReason::SupplierFailure)),
        ];
        assert_eq!(outcomes("n1", &leases), (2, 1));
    }

    #[test]
    fn failed_challenges_lower_the_score_like_failed_leases() {
        let honest = assess(None, true, (3, 0), 0);
        let caught = assess(None, true, (3, 0), 2);
        assert_eq!((honest.score, caught.score), (800, 571));
        assert_eq!(caught.challenges_failed, 2);
        assert_eq!(caught.score, assess(None, true, (3, 2), 0).score);
    }

    #[test]
    fn table_hash_ignores_order_but_not_content() {
        let a = Reputation {
            uptime_permille: 990,
            leases_completed: 3,
            score: 792,
            ..Default::default()
        };
        let b =
            Reputation { uptime_permille: 500, leases_failed: 1, score: 166, ..Default::default() };
        let h1 = table_hash([("n1", &a), ("n2", &b)]);
        assert_eq!(h1, table_hash([("n2", &b), ("n1", &a)]));
        assert_ne!(h1, table_hash([("n1", &b), ("n2", &a)]));
        assert_eq!(h1.len(), 64);
    }

    proptest! {
        #[test]
        fn scores_stay_in_range(uptime in 0u32..2000, ok in 0u64..1_000_000, failed in 0u64..1_000_000) {
            let s = score(uptime, ok, failed);
            prop_assert!(s <= 1000);
            prop_assert!(score(uptime, ok + 1, failed) >= s);
            prop_assert!(score(uptime, ok, failed + 1) <= s);
        }

        #[test]
        fn uptime_stays_in_range(prev in 0u32..1000, samples in proptest::collection::vec(any::<bool>(), 0..200)) {
            let mut u = prev;
            for fresh in samples {
                u = next_uptime(Some(u), fresh);
                prop_assert!(u <= 1000);
            }
        }
    }
}
