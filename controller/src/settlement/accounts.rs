//! Where money sits on chain. Every GpuCluster has an escrow token account of its own and every
//! supplier node a stake token account of its own, at addresses anyone can derive from the
//! settlement authority and the cluster uid or node name (`Pubkey::create_with_seed`, owned by
//! the SPL Token program, the authority as token owner). A transfer can only move what its own
//! account holds, so no mistake in one cluster's or node's books can reach another's funds.

use sha2::{Digest, Sha256};
use solana_pubkey::Pubkey;

/// Size of an SPL Token account.
pub const TOKEN_ACCOUNT_LEN: usize = 165;

/// Seed of a cluster's escrow: its uid without dashes (32 hex digits, the most a seed holds).
pub fn escrow_seed(cluster_uid: &str) -> String {
    cluster_uid.chars().filter(|c| *c != '-').take(32).collect()
}

/// Seed of a node's stake account: `stake` and the first 27 hex digits of sha256(node name)
/// (a node name can be 253 characters long). Never all hex, so never a cluster's seed.
pub fn stake_seed(node: &str) -> String {
    let digest = Sha256::digest(node.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("stake{}", &hex[..27])
}

/// The account at `seed` of `authority`, owned by the SPL Token program.
pub fn derived(authority: &Pubkey, seed: &str) -> Option<Pubkey> {
    Pubkey::create_with_seed(authority, seed, &spl_token_interface::id()).ok()
}

/// A cluster's escrow account.
pub fn escrow_address(authority: &Pubkey, cluster_uid: &str) -> Option<Pubkey> {
    derived(authority, &escrow_seed(cluster_uid))
}

/// A node's stake account.
pub fn stake_address(authority: &Pubkey, node: &str) -> Option<Pubkey> {
    derived(authority, &stake_seed(node))
}

/// What settlement reads of a token account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenAccount {
    pub mint: Pubkey,
    pub owner: Pubkey,
    pub amount: u64,
}

/// Parse an SPL Token account's data (mint, owner, amount are its first 72 bytes).
pub fn parse_token_account(data: &[u8]) -> Option<TokenAccount> {
    if data.len() != TOKEN_ACCOUNT_LEN {
        return None;
    }
    let key = |range: std::ops::Range<usize>| {
        <[u8; 32]>::try_from(data.get(range)?).ok().map(Pubkey::new_from_array)
    };
    let amount = u64::from_le_bytes(data.get(64..72)?.try_into().ok()?);
    Some(TokenAccount { mint: key(0..32)?, owner: key(32..64)?, amount })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_fit_and_never_collide_between_clusters_and_nodes() {
        let seed = escrow_seed("6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c");
        assert_eq!(seed, "6f1c4a0e1b7e4c559a1e0c8a7f1d2b3c");
        let long_node = "n".repeat(253);
        for s in [stake_seed("gpu-node-1"), stake_seed(&long_node)] {
            assert_eq!(s.len(), 32);
            assert!(!s.chars().all(|c| c.is_ascii_hexdigit()), "{s} could be a cluster's seed");
        }
        assert_ne!(stake_seed("a"), stake_seed("b"));
    }

    #[test]
    fn addresses_are_derived_from_the_authority() {
        let (a, b) = (Pubkey::new_unique(), Pubkey::new_unique());
        let uid = "6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c";
        assert_eq!(escrow_address(&a, uid), escrow_address(&a, uid));
        assert_ne!(escrow_address(&a, uid), escrow_address(&b, uid));
        assert_ne!(escrow_address(&a, uid), stake_address(&a, uid));
    }

    #[test]
    fn token_accounts_parse_their_mint_owner_and_amount() {
        let (mint, owner) = (Pubkey::new_unique(), Pubkey::new_unique());
        let mut data = vec![0u8; TOKEN_ACCOUNT_LEN];
        data[..32].copy_from_slice(mint.as_ref());
        data[32..64].copy_from_slice(owner.as_ref());
        data[64..72].copy_from_slice(&1_234_567u64.to_le_bytes());
        assert_eq!(
            parse_token_account(&data),
            Some(TokenAccount { mint, owner, amount: 1_234_567 })
        );
        assert_eq!(parse_token_account(&data[..100]), None);
    }
}
