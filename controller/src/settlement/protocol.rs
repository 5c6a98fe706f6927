//! The exactly-once protocol for a recorded transaction.
//!
//! A payout is recorded (state `Signed`, with signature, last valid block height and the wire
//! bytes) in the GpuLease status *before* it is sent. From then on, after a restart or an error,
//! the record alone decides what to do, together with what the chain says about the signature:
//!
//! | chain says                         | complete batch | decision |
//! |------------------------------------|----------------|----------|
//! | landed, succeeded, confirmed       | –              | [`Step::Confirm`] |
//! | landed, failed                     | –              | [`Step::Resign`] (nothing moved) |
//! | landed, only processed so far      | –              | [`Step::Wait`] |
//! | not found, blockhash still valid   | yes            | [`Step::Rebroadcast`] the same bytes |
//! | not found, blockhash still valid   | no             | [`Step::Wait`] for expiry |
//! | not found, finalized height > last valid | –        | [`Step::Resign`] (can never land) |
//!
//! "Complete" means every payout the transaction's memo names is recorded with this signature:
//! a crash while recording a batch leaves some payouts unrecorded, and those will be planned
//! again, so the partly recorded transaction must never be sent; it is left to expire.
//! Expiry is judged against the *finalized* block height, so a fork cannot bring it back.

/// What the chain says about a recorded signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Not known to the node (searching its whole history).
    NotFound,
    /// In a block that is only processed, not yet confirmed.
    Processed,
    /// In a confirmed (or finalized) block; `Some(error)` if the transaction failed.
    Landed { error: Option<String> },
}

/// What to do with a recorded transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// It paid: record every payout in it as confirmed.
    Confirm,
    /// Send the recorded bytes again, unchanged (same signature: it can land at most once).
    Rebroadcast,
    /// Nothing to do yet; look again next round.
    Wait,
    /// It can never land (expired) or it failed: mark its payouts expired, to be re-signed
    /// with a fresh blockhash.
    Resign,
}

pub fn decide(
    observed: &Observed,
    last_valid_block_height: u64,
    finalized_block_height: u64,
    complete: bool,
) -> Step {
    match observed {
        Observed::Landed { error: None } => Step::Confirm,
        Observed::Landed { error: Some(_) } => Step::Resign,
        Observed::Processed => Step::Wait,
        Observed::NotFound if finalized_block_height > last_valid_block_height => Step::Resign,
        Observed::NotFound if complete => Step::Rebroadcast,
        Observed::NotFound => Step::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table_of_decisions() {
        let landed = Observed::Landed { error: None };
        let failed = Observed::Landed { error: Some("InsufficientFunds".into()) };
        assert_eq!(decide(&landed, 100, 500, false), Step::Confirm);
        assert_eq!(decide(&failed, 100, 50, true), Step::Resign);
        assert_eq!(decide(&Observed::Processed, 100, 500, true), Step::Wait);
        assert_eq!(decide(&Observed::NotFound, 100, 100, true), Step::Rebroadcast);
        assert_eq!(decide(&Observed::NotFound, 100, 100, false), Step::Wait);
        assert_eq!(decide(&Observed::NotFound, 100, 101, true), Step::Resign);
    }

    proptest! {
        /// A transaction is re-signed only when it cannot pay any more: never while its
        /// blockhash is valid and it has not failed, never once it has paid.
        #[test]
        fn never_resigns_what_may_still_pay(
            lvbh in 0u64..1000, height in 0u64..1000, complete: bool, kind in 0u8..4,
        ) {
            let observed = match kind {
                0 => Observed::NotFound,
                1 => Observed::Processed,
                2 => Observed::Landed { error: None },
                _ => Observed::Landed { error: Some("failed".into()) },
            };
            let step = decide(&observed, lvbh, height, complete);
            if step == Step::Resign {
                let failed = matches!(observed, Observed::Landed { error: Some(_) });
                prop_assert!(failed || (observed == Observed::NotFound && height > lvbh));
            }
            if step == Step::Rebroadcast {
                prop_assert!(complete && height <= lvbh);
            }
        }
    }
}
