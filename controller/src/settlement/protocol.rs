//! The exactly-once protocol for a recorded transaction.
//!
//! A payment is recorded (state `Signed`, with signature, last valid block height, the slot it
//! was signed at and the wire bytes) where settlement alone writes, *before* it is sent. From
//! then on, after a restart or an error, the record alone decides what to do, together with
//! what the chain says:
//!
//! | chain says                               | complete batch | decision |
//! |------------------------------------------|----------------|----------|
//! | landed, succeeded, confirmed             | –              | [`Step::Confirm`] |
//! | landed, failed                           | –              | [`Step::Resign`] (nothing moved) |
//! | landed, only processed so far            | –              | [`Step::Wait`] |
//! | not found, blockhash still valid         | yes            | [`Step::Rebroadcast`] the same bytes |
//! | not found, blockhash still valid         | no             | [`Step::Wait`] for expiry |
//! | not found, finalized height > last valid | –              | [`Step::CheckHistory`] |
//!
//! "Not found" is no proof that a transaction never landed: a lagging or pruned RPC node says
//! the same. Before a payment is signed again, the source account's own history, read at
//! `finalized` back past the slot the payment was signed at, must show no transaction carrying
//! its idempotency key ([`after_history`]): found, it is confirmed with the signature found;
//! a history that does not reach back that far proves nothing, and the record waits.
//!
//! "Complete" means every payment the transaction's memo names is recorded with this
//! signature: a crash (or a lost write race) while recording a batch leaves some payments
//! unrecorded, and those will be planned again, so the partly recorded transaction must never
//! be sent; it is left to expire. Expiry is judged against the *finalized* block height, so a
//! fork cannot bring it back.

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
    /// It paid: record every payment in it as confirmed.
    Confirm,
    /// Send the recorded bytes again, unchanged (same signature: it can land at most once).
    Rebroadcast,
    /// Nothing to do yet; look again next round.
    Wait,
    /// Its blockhash has expired unseen: read the source account's history to prove it never
    /// landed (see [`after_history`]).
    CheckHistory,
    /// It provably can never pay (failed, or expired and absent from the history): mark its
    /// payments expired, to be signed again with a fresh blockhash.
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
        Observed::NotFound if finalized_block_height > last_valid_block_height => {
            Step::CheckHistory
        }
        Observed::NotFound if complete => Step::Rebroadcast,
        Observed::NotFound => Step::Wait,
    }
}

/// What the source account's finalized history says about a payment's idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum History {
    /// A successful transaction carries the key: the payment was made (by this signature).
    Paid { signature: String },
    /// The history, read back past the slot the payment was signed at, has no such transaction.
    Absent,
    /// The node's history does not reach back far enough (pruned): nothing is proven.
    Incomplete,
}

/// The step after reading the history of an expired, unseen transaction.
pub fn after_history(history: &History) -> Step {
    match history {
        History::Paid { .. } => Step::Confirm,
        History::Absent => Step::Resign,
        History::Incomplete => Step::Wait,
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
        assert_eq!(decide(&Observed::NotFound, 100, 101, true), Step::CheckHistory);
        assert_eq!(after_history(&History::Paid { signature: "s".into() }), Step::Confirm);
        assert_eq!(after_history(&History::Absent), Step::Resign);
        assert_eq!(after_history(&History::Incomplete), Step::Wait);
    }

    proptest! {
        /// A transaction is re-signed only when it cannot pay any more: never while its
        /// blockhash is valid and it has not failed, never on "not found" alone, never once it
        /// has paid.
        #[test]
        fn never_resigns_what_may_still_pay(
            lvbh in 0u64..1000, height in 0u64..1000, complete: bool, kind in 0u8..4, proof in 0u8..3,
        ) {
            let observed = match kind {
                0 => Observed::NotFound,
                1 => Observed::Processed,
                2 => Observed::Landed { error: None },
                _ => Observed::Landed { error: Some("failed".into()) },
            };
            let history = match proof {
                0 => History::Absent,
                1 => History::Incomplete,
                _ => History::Paid { signature: "s".into() },
            };
            let mut step = decide(&observed, lvbh, height, complete);
            if step == Step::CheckHistory {
                prop_assert!(observed == Observed::NotFound && height > lvbh);
                step = after_history(&history);
            }
            if step == Step::Resign {
                let failed = matches!(observed, Observed::Landed { error: Some(_) });
                prop_assert!(failed || (observed == Observed::NotFound && height > lvbh && history == History::Absent));
            }
            if step == Step::Rebroadcast {
                prop_assert!(complete && height <= lvbh);
            }
        }
    }
}
