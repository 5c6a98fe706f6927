//! What settlement writes into SPL memos, and reads back from an account's history.
//!
//! Memos are receipts, not the ledger (balances are; see [`super::accounts`]), with one
//! exception that makes payments exactly-once: every payment carries an idempotency key, and
//! a key found in its source account's history is never paid again.
//!
//! - A payout transaction carries `gpumarket pay` and one short key per payment in it: the
//!   first 8 bytes of `sha256("<owner>/<what>")`, base-58, where the owner is the lease uid
//!   (payouts, slashes) or `stake:<node>` (stake returned). Anyone holding the lease can
//!   recompute its keys; eight bytes keep 60 keys within one transaction.
//! - A refund carries `gpumarket refund <cluster uid>`: the uid is its key.
//! - A supplier asks to unbond its stake with `gpumarket unbond` in a transfer (of any amount,
//!   zero included) from the offer's wallet to the node's stake account.
//! - The reputation anchor carries `gpumarket reputation <sha256 hex of the table>`.
//! - A buyer's deposit needs no memo; one is kept as the buyer's receipt if present.

use sha2::{Digest, Sha256};

pub const PAY_PREFIX: &str = "gpumarket pay";
pub const REFUND_PREFIX: &str = "gpumarket refund";
pub const UNBOND: &str = "gpumarket unbond";

/// Idempotency key of one payment: its owner (a lease uid, or `stake:<node>`) and what it pays
/// (a period, `slash`, `return:<signature>`, `unbond:<signature>`).
pub fn payout_key(owner: &str, what: &str) -> String {
    let digest = Sha256::digest(format!("{owner}/{what}").as_bytes());
    bs58::encode(&digest[..8]).into_string()
}

/// Key of a payment out of a node's stake account.
pub fn stake_key(node: &str, what: &str) -> String {
    payout_key(&format!("stake:{node}"), what)
}

/// Memo of a payout transaction holding these keys.
pub fn payout_memo<'a>(keys: impl IntoIterator<Item = &'a str>) -> String {
    let mut memo = String::from(PAY_PREFIX);
    for key in keys {
        memo.push(' ');
        memo.push_str(key);
    }
    memo
}

pub fn refund_memo(cluster_uid: &str) -> String {
    format!("{REFUND_PREFIX} {cluster_uid}")
}

pub fn reputation_memo(table_hash_hex: &str) -> String {
    format!("gpumarket reputation {table_hash_hex}")
}

/// The idempotency keys a settlement memo pays (a refund's is the cluster uid); `None` for any
/// other memo.
pub fn settlement_keys(memo: &str) -> Option<Vec<&str>> {
    let memo = memo.trim();
    let rest = memo.strip_prefix(PAY_PREFIX).or_else(|| memo.strip_prefix(REFUND_PREFIX))?;
    (rest.is_empty() || rest.starts_with(' ')).then(|| rest.split_whitespace().collect())
}

/// Whether a memo is settlement's own (its payments out, its anchors), not a deposit's receipt.
pub fn is_settlements_own(memo: &str) -> bool {
    memo.trim().starts_with("gpumarket ") && !is_unbond(memo)
}

/// Whether a memo asks to unbond a node's stake.
pub fn is_unbond(memo: &str) -> bool {
    memo.trim() == UNBOND
}

/// The memo texts of a `getSignaturesForAddress` entry: the node lists them as `[len] text`,
/// joined by `; `.
pub fn listed_memos(listed: &str) -> Vec<&str> {
    listed
        .split("; [")
        .map(|part| {
            let part = part.strip_prefix('[').unwrap_or(part);
            part.split_once("] ").map_or(part, |(_, text)| text).trim()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_stable_and_distinct() {
        let a = payout_key("6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c", "0001");
        assert_eq!(a, payout_key("6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c", "0001"));
        assert_ne!(a, payout_key("6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c", "0002"));
        assert!(a.len() <= 11, "8 bytes in base-58 fit 11 characters: {a}");
        assert_ne!(stake_key("n1", "unbond:x"), stake_key("n2", "unbond:x"));
    }

    #[test]
    fn settlement_memos_give_back_their_keys() {
        let memo = payout_memo(["abc", "def"]);
        assert_eq!(memo, "gpumarket pay abc def");
        assert_eq!(settlement_keys(&memo), Some(vec!["abc", "def"]));
        assert_eq!(settlement_keys(&refund_memo("uid-1")), Some(vec!["uid-1"]));
        assert_eq!(settlement_keys("6f1c4a0e-1b7e"), None);
        assert_eq!(settlement_keys("gpumarket payday"), None);
        assert!(is_settlements_own(&memo) && is_settlements_own(&reputation_memo("ab")));
        assert!(!is_settlements_own(UNBOND) && is_unbond(" gpumarket unbond "));
    }

    #[test]
    fn listed_memos_lose_their_length_prefixes() {
        assert_eq!(
            listed_memos("[36] 6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c"),
            ["6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c"]
        );
        assert_eq!(listed_memos("[1] a; [16] gpumarket unbond"), ["a", "gpumarket unbond"]);
        assert!(listed_memos("").is_empty());
    }
}
