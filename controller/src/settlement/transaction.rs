//! Building settlement transactions: SPL `TransferChecked` out of a cluster's escrow or a node's
//! stake account, recipients' associated token accounts created where missing, a memo with the
//! idempotency keys, batches of payments that fit in one transaction, refunds that empty and
//! close an escrow, and the creation of escrow and stake accounts.

use std::collections::{BTreeMap, HashSet};

use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signer::Signer;
use solana_transaction::{Hash, Instruction, Message, Transaction};
use spl_associated_token_account_interface::address::get_associated_token_address;
use spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent;

use super::accounts::TOKEN_ACCOUNT_LEN;
use super::memo;

/// Largest serialised transaction the network accepts (an IPv6 packet less headers).
pub const MAX_TRANSACTION_BYTES: usize = 1232;

/// Who holds the settlement accounts, and of which mint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Custody {
    /// The settlement authority: token owner of every escrow and stake account, signs and pays
    /// fees and rent.
    pub authority: Pubkey,
    pub mint: Pubkey,
    pub decimals: u8,
}

/// One payment out of an escrow or stake account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// Idempotency key written in the memo.
    pub key: String,
    /// The escrow or stake account paid from.
    pub source: Pubkey,
    /// Wallet paid (its associated token account receives the tokens).
    pub wallet: Pubkey,
    /// What leaves `source`.
    pub amount: u64,
    /// The market's fee: the part of `amount` that goes to the settlement authority's own
    /// token account instead of `wallet`.
    pub fee: u64,
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

fn transfer(
    custody: &Custody,
    source: &Pubkey,
    wallet: &Pubkey,
    amount: u64,
) -> Result<Instruction, BuildError> {
    spl_token_interface::instruction::transfer_checked(
        &spl_token_interface::id(),
        source,
        &custody.mint,
        &get_associated_token_address(wallet, &custody.mint),
        &custody.authority,
        &[],
        amount,
        custody.decimals,
    )
    .map_err(|e| BuildError::Token(e.to_string()))
}

fn create_missing(
    custody: &Custody,
    wallets: &[Pubkey],
    missing: &HashSet<Pubkey>,
) -> Vec<Instruction> {
    let mut created: Vec<&Pubkey> = wallets.iter().filter(|w| missing.contains(w)).collect();
    created.sort();
    created.dedup();
    created
        .into_iter()
        .map(|wallet| {
            create_associated_token_account_idempotent(
                &custody.authority,
                wallet,
                &custody.mint,
                &spl_token_interface::id(),
            )
        })
        .collect()
}

fn memo_instruction(text: &str) -> Instruction {
    spl_memo_interface::instruction::build_memo(&spl_memo_interface::v3::id(), text.as_bytes(), &[])
}

/// Wallets a payment pays into: its recipient, and the authority where a fee is due.
pub fn recipients(authority: &Pubkey, payment: &Payment) -> Vec<Pubkey> {
    let fee = (payment.fee > 0).then_some(*authority);
    std::iter::once(payment.wallet).chain(fee).collect()
}

/// Instructions of a payout transaction: the recipients' associated token accounts listed in
/// `missing` created (idempotently), one `TransferChecked` per source and recipient (payments
/// between the same two merged; fees to the authority's own account), then a memo of every key.
pub fn payout_instructions(
    custody: &Custody,
    payments: &[Payment],
    missing: &HashSet<Pubkey>,
) -> Result<Vec<Instruction>, BuildError> {
    let mut merged: BTreeMap<(Pubkey, Pubkey), u64> = BTreeMap::new();
    let mut add = |source: Pubkey, wallet: Pubkey, amount: u64| {
        let total = merged.entry((source, wallet)).or_default();
        *total = total.saturating_add(amount);
    };
    for p in payments {
        let fee = p.fee.min(p.amount);
        add(p.source, p.wallet, p.amount - fee);
        add(p.source, custody.authority, fee);
    }
    let wallets: Vec<Pubkey> =
        payments.iter().flat_map(|p| recipients(&custody.authority, p)).collect();
    let mut ixs = create_missing(custody, &wallets, missing);
    for ((source, wallet), amount) in merged.iter().filter(|(_, amount)| **amount > 0) {
        ixs.push(transfer(custody, source, wallet, *amount)?);
    }
    ixs.push(memo_instruction(&memo::payout_memo(payments.iter().map(|p| p.key.as_str()))));
    Ok(ixs)
}

/// Instructions of a refund: the whole `balance` of the cluster's escrow to the buyer and the
/// escrow closed (its rent back to the authority), with the cluster uid as memo. Closing fails
/// unless the account is empty, so a deposit landing after the balance was read makes the whole
/// transaction fail: nothing is ever left behind in a closed escrow.
pub fn refund_instructions(
    custody: &Custody,
    escrow: &Pubkey,
    buyer: &Pubkey,
    balance: u64,
    buyer_has_account: bool,
    cluster_uid: &str,
) -> Result<Vec<Instruction>, BuildError> {
    let mut ixs = Vec::new();
    if balance > 0 {
        let missing: HashSet<Pubkey> =
            if buyer_has_account { HashSet::new() } else { HashSet::from([*buyer]) };
        ixs.extend(create_missing(custody, &[*buyer], &missing));
        ixs.push(transfer(custody, escrow, buyer, balance)?);
    }
    ixs.push(
        spl_token_interface::instruction::close_account(
            &spl_token_interface::id(),
            escrow,
            &custody.authority,
            &custody.authority,
            &[],
        )
        .map_err(|e| BuildError::Token(e.to_string()))?,
    );
    ixs.push(memo_instruction(&memo::refund_memo(cluster_uid)));
    Ok(ixs)
}

/// Instructions creating the token account at `seed` of the authority (an escrow or a stake
/// account), funded with `rent` lamports by the authority.
pub fn open_account_instructions(
    custody: &Custody,
    seed: &str,
    address: &Pubkey,
    rent: u64,
) -> Result<Vec<Instruction>, BuildError> {
    let token = spl_token_interface::id();
    Ok(vec![
        solana_system_interface::instruction::create_account_with_seed(
            &custody.authority,
            address,
            &custody.authority,
            seed,
            rent,
            TOKEN_ACCOUNT_LEN as u64,
            &token,
        ),
        spl_token_interface::instruction::initialize_account3(
            &token,
            address,
            &custody.mint,
            &custody.authority,
        )
        .map_err(|e| BuildError::Token(e.to_string()))?,
    ])
}

/// Serialised size of a transaction of these instructions, signatures included.
pub fn transaction_size(custody: &Custody, ixs: &[Instruction]) -> usize {
    let tx = Transaction::new_unsigned(Message::new(ixs, Some(&custody.authority)));
    bincode::serialized_size(&tx).map_or(usize::MAX, |n| n as usize)
}

/// Split payments into batches that each fit in one payout transaction, in order.
pub fn batches(
    custody: &Custody,
    payments: Vec<Payment>,
    missing: &HashSet<Pubkey>,
) -> Result<Vec<Vec<Payment>>, BuildError> {
    let mut out: Vec<Vec<Payment>> = Vec::new();
    let mut current: Vec<Payment> = Vec::new();
    for payment in payments {
        current.push(payment);
        let size = transaction_size(custody, &payout_instructions(custody, &current, missing)?);
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

    fn custody() -> (Keypair, Custody) {
        let authority = Keypair::new();
        let custody =
            Custody { authority: authority.pubkey(), mint: Keypair::new().pubkey(), decimals: 6 };
        (authority, custody)
    }

    fn payments(n: usize, sources: &[Pubkey], wallets: &[Pubkey]) -> Vec<Payment> {
        (0..n)
            .map(|i| Payment {
                key: memo::payout_key(&format!("lease-{i}"), "0001"),
                source: sources[i % sources.len()],
                wallet: wallets[i % wallets.len()],
                amount: 1000 + i as u64,
                fee: 0,
            })
            .collect()
    }

    #[test]
    fn batches_fit_the_size_limit_and_keep_every_payment_once() {
        let (authority, custody) = custody();
        let wallets: Vec<Pubkey> = (0..3).map(|_| Keypair::new().pubkey()).collect();
        let sources = [Pubkey::new_unique()];
        let missing: HashSet<Pubkey> = wallets.iter().take(1).copied().collect();
        let all = payments(500, &sources, &wallets);
        let batches = batches(&custody, all.clone(), &missing).expect("batches");
        assert_eq!(batches.concat(), all, "in order, none lost or repeated");
        for batch in &batches {
            let ixs = payout_instructions(&custody, batch, &missing).expect("ixs");
            let tx = sign(&ixs, &authority, Hash::default()).expect("signed");
            let wire = bincode::serialize(&tx).expect("serialise");
            assert!(wire.len() <= MAX_TRANSACTION_BYTES, "{} bytes", wire.len());
        }
        let per_tx = all.len() / batches.len();
        assert!(per_tx >= 20, "only {per_tx} payouts per transaction");
    }

    #[test]
    fn payments_between_the_same_accounts_are_one_transfer() {
        let (_, custody) = custody();
        let wallet = Keypair::new().pubkey();
        let (a, b) = (Pubkey::new_unique(), Pubkey::new_unique());
        let ixs = payout_instructions(&custody, &payments(3, &[a], &[wallet]), &HashSet::new())
            .expect("ixs");
        assert_eq!(ixs.len(), 2, "one merged transfer and the memo");
        let two_sources = payout_instructions(
            &custody,
            &payments(4, &[a, b], &[wallet]),
            &HashSet::from([wallet]),
        )
        .expect("ixs");
        assert_eq!(two_sources.len(), 4, "the missing account, a transfer per source, the memo");
        assert_eq!(
            two_sources[0].program_id,
            spl_associated_token_account_interface::program::id()
        );
        let sources: HashSet<Pubkey> =
            two_sources[1..3].iter().map(|ix| ix.accounts[0].pubkey).collect();
        assert_eq!(sources, HashSet::from([a, b]), "each transfer draws on its own account");
    }

    #[test]
    fn the_market_fee_goes_to_the_authority_and_the_rest_to_the_supplier() {
        let (_, custody) = custody();
        let (wallet, source) = (Keypair::new().pubkey(), Pubkey::new_unique());
        let payment = Payment { key: "k".into(), source, wallet, amount: 1000, fee: 20 };
        let missing = HashSet::from([custody.authority]);
        let ixs = payout_instructions(&custody, &[payment], &missing).expect("ixs");
        assert_eq!(ixs.len(), 4, "the authority's account, two transfers, the memo");
        let transfers: BTreeMap<Pubkey, u64> = ixs[1..3]
            .iter()
            .map(|ix| {
                let amount = u64::from_le_bytes(ix.data[1..9].try_into().expect("amount"));
                (ix.accounts[2].pubkey, amount)
            })
            .collect();
        let account = |w: &Pubkey| get_associated_token_address(w, &custody.mint);
        assert_eq!(
            transfers,
            BTreeMap::from([(account(&wallet), 980), (account(&custody.authority), 20)])
        );
    }

    #[test]
    fn a_refund_empties_and_closes_the_escrow() {
        let (_, custody) = custody();
        let (escrow, buyer) = (Pubkey::new_unique(), Pubkey::new_unique());
        let ixs = refund_instructions(&custody, &escrow, &buyer, 70, false, "uid").expect("ixs");
        let programs: Vec<Pubkey> = ixs.iter().map(|ix| ix.program_id).collect();
        let token = spl_token_interface::id();
        assert_eq!(
            programs,
            [
                spl_associated_token_account_interface::program::id(),
                token,
                token,
                spl_memo_interface::v3::id()
            ]
        );
        assert_eq!(ixs[2].accounts[1].pubkey, custody.authority, "rent back to the authority");
        let empty = refund_instructions(&custody, &escrow, &buyer, 0, true, "uid").expect("ixs");
        assert_eq!(empty.len(), 2, "an empty escrow is only closed");
    }

    #[test]
    fn recorded_bytes_give_back_their_memo() {
        let (authority, custody) = custody();
        let batch = payments(2, &[Pubkey::new_unique()], &[Keypair::new().pubkey()]);
        let tx = sign(
            &payout_instructions(&custody, &batch, &HashSet::new()).expect("ixs"),
            &authority,
            Hash::default(),
        )
        .expect("signed");
        let memo_text = memo_of_wire(&wire_base64(&tx).expect("wire")).expect("memo");
        assert_eq!(memo_text, memo::payout_memo(batch.iter().map(|p| p.key.as_str())));
        assert_eq!(memo_of_wire("not base64!"), None);
    }
}
