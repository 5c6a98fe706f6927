//! What settlement writes into (and reads from) SPL memos.
//!
//! - A buyer's deposit carries the GpuCluster uid as its memo, nothing else.
//! - A supplier's stake carries `stake:<node>`.
//! - A payout transaction carries `gpumarket pay` and one short idempotency key per payout in it:
//!   the first 8 bytes of `sha256("<lease uid>/<period>")`, base-58. Anyone holding the lease
//!   can recompute the key and find its payment; eight bytes keep 60 keys within one
//!   transaction.
//! - A refund carries `gpumarket refund <cluster uid>`; a slash `gpumarket slash <key>`;
//!   the reputation anchor `gpumarket reputation <sha256 hex of the table>`.

use sha2::{Digest, Sha256};

pub const PAY_PREFIX: &str = "gpumarket pay";
pub const STAKE_PREFIX: &str = "stake:";

/// Idempotency key of one payout: lease uid and period.
pub fn payout_key(lease_uid: &str, period: &str) -> String {
    let digest = Sha256::digest(format!("{lease_uid}/{period}").as_bytes());
    bs58::encode(&digest[..8]).into_string()
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

/// The keys of a payout memo; `None` for any other memo.
pub fn payout_keys(memo: &str) -> Option<Vec<&str>> {
    let rest = memo.strip_prefix(PAY_PREFIX)?;
    Some(rest.split_whitespace().collect())
}

pub fn refund_memo(cluster_uid: &str) -> String {
    format!("gpumarket refund {cluster_uid}")
}

pub fn slash_memo(key: &str) -> String {
    format!("gpumarket slash {key}")
}

pub fn reputation_memo(table_hash_hex: &str) -> String {
    format!("gpumarket reputation {table_hash_hex}")
}

/// Node a stake memo bonds for.
pub fn staked_node(memo: &str) -> Option<&str> {
    memo.trim().strip_prefix(STAKE_PREFIX).filter(|n| !n.is_empty())
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
    }

    #[test]
    fn payout_memo_round_trips_its_keys() {
        let memo = payout_memo(["abc", "def"]);
        assert_eq!(memo, "gpumarket pay abc def");
        assert_eq!(payout_keys(&memo), Some(vec!["abc", "def"]));
        assert_eq!(payout_keys("6f1c4a0e-1b7e"), None);
    }

    #[test]
    fn stake_memos_name_their_node() {
        assert_eq!(staked_node("stake:gpu-node-1"), Some("gpu-node-1"));
        assert_eq!(staked_node("stake:"), None);
        assert_eq!(staked_node("6f1c4a0e"), None);
    }
}
