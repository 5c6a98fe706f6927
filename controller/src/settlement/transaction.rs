//! Building settlement transactions: SPL `TransferChecked` from the escrow, associated token
//! accounts created where missing, a memo with the idempotency keys, and batches of payouts
//! that fit in one transaction.

use std::collections::{BTreeMap, HashSet};

use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signer::Signer;
use solana_transaction::{Hash, Instruction, Message, Transaction};
use spl_associated_token_account_interface::address::get_associated_token_address;
use spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent;

use super::memo;

/// Largest serialised transaction the network accepts (an IPv6 packet less headers).
pub const MAX_TRANSACTION_BYTES: usize = 1232;

/// The accounts every settlement transaction uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Escrow {
    /// The settlement authority: owns the escrow token account, signs and pays fees.
    pub authority: Pubkey,
    pub mint: Pubkey,
    pub decimals: u8,
}

impl Escrow {
    /// The escrow token account: the authority's associated token account of the mint.
    pub fn account(&self) -> Pubkey {
        get_associated_token_address(&self.authority, &self.mint)
    }
}

/// One payment out of escrow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// Idempotency key written in the memo.
    pub key: String,
    /// Wallet paid (its associated token account receives the tokens).
    pub wallet: Pubkey,
    pub amount: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("building a token instruction: {0}")]
    Token(String),
    #[error("a single payment does not fit in a transaction")]
    TooLarge,
    #[error("signing: {0}")]
    Sign(String),
}

/// Instructions paying `payments` with `memo`: create the recipients' associated token accounts
/// listed in `missing` (idempotently), one `TransferChecked` per recipient (payments to the same
/// wallet merged), then the memo.
pub fn instructions(
    escrow: &Escrow,
    payments: &[Payment],
    missing: &HashSet<Pubkey>,
    memo_text: &str,
) -> Result<Vec<Instruction>, BuildError> {
    let mut per_wallet: BTreeMap<Pubkey, u64> = BTreeMap::new();
    for p in payments {
        let total = per_wallet.entry(p.wallet).or_default();
        *total = total.saturating_add(p.amount);
    }
    let token_program = spl_token_interface::id();
    let mut ixs = Vec::new();
    for wallet in per_wallet.keys().filter(|w| missing.contains(w)) {
        ixs.push(create_associated_token_account_idempotent(
            &escrow.authority,
            wallet,
            &escrow.mint,
            &token_program,
        ));
    }
    for (wallet, amount) in per_wallet.iter().filter(|(_, amount)| **amount > 0) {
        ixs.push(
            spl_token_interface::instruction::transfer_checked(
                &token_program,
                &escrow.account(),
                &escrow.mint,
                &get_associated_token_address(wallet, &escrow.mint),
                &escrow.authority,
                &[],
                *amount,
                escrow.decimals,
            )
            .map_err(|e| BuildError::Token(e.to_string()))?,
        );
    }
    ixs.push(spl_memo_interface::instruction::build_memo(
        &spl_memo_interface::v3::id(),
        memo_text.as_bytes(),
        &[],
    ));
    Ok(ixs)
}

/// Instructions of a payout transaction: the payments and a memo of their keys.
pub fn payout_instructions(
    escrow: &Escrow,
    payments: &[Payment],
    missing: &HashSet<Pubkey>,
) -> Result<Vec<Instruction>, BuildError> {
    let memo_text = memo::payout_memo(payments.iter().map(|p| p.key.as_str()));
    instructions(escrow, payments, missing, &memo_text)
}

/// Serialised size of a transaction of these instructions, signatures included.
pub fn transaction_size(escrow: &Escrow, ixs: &[Instruction]) -> usize {
    let tx = Transaction::new_unsigned(Message::new(ixs, Some(&escrow.authority)));
    bincode::serialized_size(&tx).map_or(usize::MAX, |n| n as usize)
}

/// Split payments into batches that each fit in one payout transaction, in order.
pub fn batches(
    escrow: &Escrow,
    payments: Vec<Payment>,
    missing: &HashSet<Pubkey>,
) -> Result<Vec<Vec<Payment>>, BuildError> {
    let mut out: Vec<Vec<Payment>> = Vec::new();
    let mut current: Vec<Payment> = Vec::new();
    for payment in payments {
        current.push(payment);
        let size = transaction_size(escrow, &payout_instructions(escrow, &current, missing)?);
        if size > MAX_TRANSACTION_BYTES {
            let overflow = current.pop().ok_or(BuildError::TooLarge)?;
            if current.is_empty() {
                return Err(BuildError::TooLarge);
            }
            out.push(std::mem::take(&mut current));
            current.push(overflow);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

/// Sign instructions with the settlement authority against a blockhash.
pub fn sign(
    ixs: &[Instruction],
    authority: &Keypair,
    blockhash: Hash,
) -> Result<Transaction, BuildError> {
    let mut tx = Transaction::new_unsigned(Message::new(ixs, Some(&authority.pubkey())));
    tx.try_sign(&[authority], blockhash).map_err(|e| BuildError::Sign(e.to_string()))?;
    Ok(tx)
}

/// Wire bytes of a signed transaction, base64, as recorded and as sent.
pub fn wire_base64(tx: &Transaction) -> Result<String, BuildError> {
    use base64::Engine;
    let bytes = bincode::serialize(tx).map_err(|e| BuildError::Sign(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The memo text of recorded wire bytes, to check which keys a transaction pays.
pub fn memo_of_wire(base64_tx: &str) -> Option<String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(base64_tx).ok()?;
    let tx: Transaction = bincode::deserialize(&bytes).ok()?;
    let memo_program = spl_memo_interface::v3::id();
    tx.message.instructions.iter().find_map(|ix| {
        let program = tx.message.account_keys.get(usize::from(ix.program_id_index))?;
        (*program == memo_program).then(|| String::from_utf8(ix.data.clone()).ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escrow() -> (Keypair, Escrow) {
        let authority = Keypair::new();
        let escrow =
            Escrow { authority: authority.pubkey(), mint: Keypair::new().pubkey(), decimals: 6 };
        (authority, escrow)
    }

    fn payments(n: usize, wallets: &[Pubkey]) -> Vec<Payment> {
        (0..n)
            .map(|i| Payment {
                key: memo::payout_key(&format!("lease-{i}"), "0001"),
                wallet: wallets[i % wallets.len()],
                amount: 1000 + i as u64,
            })
            .collect()
    }

    #[test]
    fn batches_fit_the_size_limit_and_keep_every_payment_once() {
        let (authority, escrow) = escrow();
        let wallets: Vec<Pubkey> = (0..3).map(|_| Keypair::new().pubkey()).collect();
        let missing: HashSet<Pubkey> = wallets.iter().take(1).copied().collect();
        let all = payments(500, &wallets);
        let batches = batches(&escrow, all.clone(), &missing).expect("batches");
        assert_eq!(batches.concat(), all, "in order, none lost or repeated");
        for batch in &batches {
            let ixs = payout_instructions(&escrow, batch, &missing).expect("ixs");
            let tx = sign(&ixs, &authority, Hash::default()).expect("signed");
            let wire = bincode::serialize(&tx).expect("serialise");
            assert!(wire.len() <= MAX_TRANSACTION_BYTES, "{} bytes", wire.len());
        }
        let per_tx = all.len() / batches.len();
        assert!(per_tx >= 20, "only {per_tx} payouts per transaction");
    }

    #[test]
    fn payments_to_one_wallet_are_one_transfer() {
        let (_, escrow) = escrow();
        let wallet = Keypair::new().pubkey();
        let ixs =
            payout_instructions(&escrow, &payments(3, &[wallet]), &HashSet::new()).expect("ixs");
        assert_eq!(ixs.len(), 2, "one merged transfer and the memo");
        let with_ata =
            payout_instructions(&escrow, &payments(3, &[wallet]), &HashSet::from([wallet]))
                .expect("ixs");
        assert_eq!(with_ata.len(), 3, "the missing token account is created first");
        assert_eq!(with_ata[0].program_id, spl_associated_token_account_interface::program::id());
    }

    #[test]
    fn recorded_bytes_give_back_their_memo() {
        let (authority, escrow) = escrow();
        let batch = payments(2, &[Keypair::new().pubkey()]);
        let tx = sign(
            &payout_instructions(&escrow, &batch, &HashSet::new()).expect("ixs"),
            &authority,
            Hash::default(),
        )
        .expect("signed");
        let memo_text = memo_of_wire(&wire_base64(&tx).expect("wire")).expect("memo");
        assert_eq!(memo_text, memo::payout_memo(batch.iter().map(|p| p.key.as_str())));
        assert_eq!(memo_of_wire("not base64!"), None);
    }
}
