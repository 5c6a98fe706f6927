//! The thin Solana wiring: every RPC call settlement makes, and the pure parsing of what comes
//! back. Commitment is `confirmed` throughout, except expiry and the proof that an expired
//! transaction never landed, which are judged at `finalized`.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};
use solana_client::client_error::{ClientError, ClientErrorKind};
use solana_client::nonblocking::rpc_client::RpcClient;
use solana_client::rpc_client::GetConfirmedSignaturesForAddress2Config;
use solana_client::rpc_request::RpcRequest;
use solana_client::rpc_response::RpcConfirmedTransactionStatusWithSignature;
use solana_commitment_config::CommitmentConfig;
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_transaction::{Hash, Signature};
use spl_associated_token_account_interface::address::get_associated_token_address;

use super::accounts::{self, TOKEN_ACCOUNT_LEN, TokenAccount};
use super::memo;
use super::pricing::{Conversion, PYTH_RECEIVER, PriceFeed, parse_price_update};
use super::protocol::{History, Observed};
use super::stake::StakeEntry;
use super::transaction::{self, Custody};

pub type RpcError = Box<ClientError>;

/// Most signatures `getSignatureStatuses` takes per call.
const STATUS_CHUNK: usize = 256;
/// Most accounts `getMultipleAccounts` takes per call.
const ACCOUNTS_CHUNK: usize = 100;
/// Page size of `getSignaturesForAddress`.
const HISTORY_PAGE: usize = 1000;

fn rpc_error(message: String) -> RpcError {
    Box::new(ClientError::from(ClientErrorKind::Custom(message)))
}

/// What settlement has read of one account's history, built up incrementally (confirmed
/// transactions are final, so what was read once is never read again).
#[derive(Clone, Debug, Default)]
pub struct AccountHistory {
    newest: Option<Signature>,
    /// The account's balance when its history was last read: a history needs reading again
    /// only once the balance has moved.
    pub scanned_balance: Option<u64>,
    /// Settlement keys carried by successful transactions, with the signature that paid them.
    pub paid: HashMap<String, String>,
    /// Transfers that are not settlement's own (deposits, unbond requests), oldest first; read
    /// for stake accounts only.
    pub transfers: Vec<StakeEntry>,
}

/// Read the account's history newer than what `history` holds and add it. All or nothing: an
/// RPC error (or a transaction the node cannot return yet) part-way leaves `history` as it
/// was, so a retry reads the same entries again and nothing is counted twice or skipped.
pub async fn scan(
    rpc: &RpcClient,
    account: &Pubkey,
    mint: &Pubkey,
    history: &mut AccountHistory,
    read_transfers: bool,
) -> Result<(), RpcError> {
    let mut fresh: Vec<RpcConfirmedTransactionStatusWithSignature> = Vec::new();
    let mut before = None;
    loop {
        let config = GetConfirmedSignaturesForAddress2Config {
            before,
            until: history.newest,
            limit: Some(HISTORY_PAGE),
            commitment: Some(CommitmentConfig::confirmed()),
        };
        let page = rpc.get_signatures_for_address_with_config(account, config).await?;
        let full = page.len() >= HISTORY_PAGE;
        before = page.last().and_then(|e| e.signature.parse().ok());
        fresh.extend(page);
        if !full || before.is_none() {
            break;
        }
    }
    let mut paid = HashMap::new();
    let mut transfers = Vec::new();
    for entry in fresh.iter().rev().filter(|e| e.err.is_none()) {
        let memos = entry.memo.as_deref().map(memo::listed_memos).unwrap_or_default();
        for key in memos.iter().filter_map(|m| memo::settlement_keys(m)).flatten() {
            paid.insert(key.to_owned(), entry.signature.clone());
        }
        if read_transfers && !memos.iter().any(|m| memo::is_settlements_own(m)) {
            let tx = get_transaction(rpc, &entry.signature).await?;
            let memos = memos.iter().map(|m| (*m).to_owned()).collect();
            transfers.push(stake_entry(
                &tx,
                account,
                mint,
                &entry.signature,
                entry.block_time,
                memos,
            ));
        }
    }
    history.paid.extend(paid);
    history.transfers.extend(transfers);
    if let Some(newest) = fresh.first().and_then(|e| e.signature.parse().ok()) {
        history.newest = Some(newest);
    }
    Ok(())
}

/// A transaction, `jsonParsed`; an error (to retry) when the node cannot return it yet.
async fn get_transaction(rpc: &RpcClient, signature: &str) -> Result<Value, RpcError> {
    let tx: Value = rpc
        .send(
            RpcRequest::GetTransaction,
            json!([signature, {
                "encoding": "jsonParsed",
                "commitment": "confirmed",
                "maxSupportedTransactionVersion": 0,
            }]),
        )
        .await?;
    if tx.is_null() {
        return Err(rpc_error(format!("transaction {signature} is listed but not yet returned")));
    }
    Ok(tx)
}

/// What a `jsonParsed` transaction did to `account`: its balance change (by the token balances
/// before and after, however the transfer was made), who sent the tokens (the owner whose
/// balance of the mint fell the most) and who signed.
pub fn stake_entry(
    tx: &Value,
    account: &Pubkey,
    mint: &Pubkey,
    signature: &str,
    block_time: Option<i64>,
    memos: Vec<String>,
) -> StakeEntry {
    let keys: Vec<&Value> = tx
        .pointer("/transaction/message/accountKeys")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let key_of = |k: &Value| {
        k.get("pubkey").and_then(Value::as_str).or_else(|| k.as_str()).map(str::to_owned)
    };
    let signers: Vec<Pubkey> = keys
        .iter()
        .filter(|k| k.get("signer").and_then(Value::as_bool) == Some(true))
        .filter_map(|k| key_of(k)?.parse().ok())
        .collect();
    let index_of_account =
        keys.iter().position(|k| key_of(k).as_deref() == Some(&account.to_string()));
    let mint = mint.to_string();
    // Balance change and owner of every token account of the mint, by account index.
    let mut changes: HashMap<u64, (i128, Option<String>)> = HashMap::new();
    for (list, sign) in [("preTokenBalances", -1i128), ("postTokenBalances", 1)] {
        let balances = tx.pointer(&format!("/meta/{list}")).and_then(Value::as_array);
        for balance in balances.into_iter().flatten() {
            if balance.get("mint").and_then(Value::as_str) != Some(mint.as_str()) {
                continue;
            }
            let Some(index) = balance.get("accountIndex").and_then(Value::as_u64) else { continue };
            let amount = balance
                .pointer("/uiTokenAmount/amount")
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<i128>().ok())
                .unwrap_or(0);
            let entry = changes.entry(index).or_default();
            entry.0 += sign * amount;
            if let Some(owner) = balance.get("owner").and_then(Value::as_str) {
                entry.1 = Some(owner.to_owned());
            }
        }
    }
    let own_index = index_of_account.map(|i| i as u64);
    let delta = own_index.and_then(|i| changes.get(&i)).map_or(0, |c| c.0);
    let sender = changes
        .iter()
        .filter(|(i, (change, _))| Some(**i) != own_index && *change < 0)
        .min_by_key(|(i, (change, _))| (*change, **i))
        .and_then(|(_, (_, owner))| owner.as_deref()?.parse().ok())
        .or_else(|| signers.first().copied());
    StakeEntry { signature: signature.to_owned(), block_time, delta, sender, signers, memos }
}

/// Whether a successful transaction carrying `key` is in the account's history at `finalized`,
/// read back past `signed_slot` (see [`super::protocol`]).
pub async fn prove(
    rpc: &RpcClient,
    account: &Pubkey,
    key: &str,
    signed_slot: u64,
) -> Result<History, RpcError> {
    let mut before = None;
    loop {
        let config = GetConfirmedSignaturesForAddress2Config {
            before,
            until: None,
            limit: Some(HISTORY_PAGE),
            commitment: Some(CommitmentConfig::finalized()),
        };
        let page = rpc.get_signatures_for_address_with_config(account, config).await?;
        for entry in &page {
            let memos = entry.memo.as_deref().map(memo::listed_memos).unwrap_or_default();
            let carries =
                memos.iter().filter_map(|m| memo::settlement_keys(m)).flatten().any(|k| k == key);
            if entry.err.is_none() && carries {
                return Ok(History::Paid { signature: entry.signature.clone() });
            }
            if entry.slot < signed_slot {
                return Ok(History::Absent);
            }
        }
        before = page.last().and_then(|e| e.signature.parse().ok());
        if page.len() < HISTORY_PAGE || before.is_none() {
            return Ok(History::Incomplete);
        }
    }
}

/// Token accounts, read at `confirmed`: `None` for those that do not exist (never opened, or
/// closed) or are not token accounts.
pub async fn token_accounts(
    rpc: &RpcClient,
    addresses: &[Pubkey],
) -> Result<HashMap<Pubkey, Option<TokenAccount>>, RpcError> {
    let mut out = HashMap::new();
    for chunk in addresses.chunks(ACCOUNTS_CHUNK) {
        let accounts = rpc
            .get_multiple_accounts_with_commitment(chunk, CommitmentConfig::confirmed())
            .await?
            .value;
        for (address, account) in chunk.iter().zip(accounts) {
            let parsed = account
                .filter(|a| a.owner == spl_token_interface::id())
                .and_then(|a| accounts::parse_token_account(&a.data));
            out.insert(*address, parsed);
        }
    }
    Ok(out)
}

/// Open the token account at `seed` of the authority (an escrow or a stake account) unless it
/// exists; waits until it is confirmed.
pub async fn open_account(
    rpc: &RpcClient,
    authority: &Keypair,
    custody: &Custody,
    seed: &str,
) -> Result<Pubkey, super::Error> {
    let address = accounts::derived(&custody.authority, seed)
        .ok_or_else(|| super::Error::Config(format!("no account address for seed {seed:?}")))?;
    if token_accounts(rpc, &[address]).await?.get(&address).is_some_and(Option::is_some) {
        return Ok(address);
    }
    let rent =
        rpc.get_minimum_balance_for_rent_exemption(TOKEN_ACCOUNT_LEN).await.map_err(Box::new)?;
    let ixs = transaction::open_account_instructions(custody, seed, &address, rent)?;
    let (blockhash, _) = latest_blockhash(rpc).await?;
    let tx = transaction::sign(&ixs, authority, blockhash)?;
    if let Err(e) = rpc.send_and_confirm_transaction(&tx).await {
        // Another replica (or an earlier attempt) may have opened it meanwhile.
        if token_accounts(rpc, &[address]).await?.get(&address).is_some_and(Option::is_some) {
            return Ok(address);
        }
        return Err(Box::new(e).into());
    }
    Ok(address)
}

/// What the chain says about each signature (searching the node's whole history).
pub async fn observe(rpc: &RpcClient, signatures: &[Signature]) -> Result<Vec<Observed>, RpcError> {
    let mut out = Vec::with_capacity(signatures.len());
    for chunk in signatures.chunks(STATUS_CHUNK) {
        let statuses = rpc.get_signature_statuses_with_history(chunk).await?.value;
        out.extend(statuses.into_iter().map(|status| match status {
            None => Observed::NotFound,
            Some(s) if !s.satisfies_commitment(CommitmentConfig::confirmed()) => {
                Observed::Processed
            }
            Some(s) => Observed::Landed { error: s.err.map(|e| e.to_string()) },
        }));
    }
    Ok(out)
}

/// A blockhash to sign with, its last valid block height, and a slot no later than the
/// blockhash's (the transaction can only land after it: see [`prove`]).
pub async fn latest_blockhash_and_slot(rpc: &RpcClient) -> Result<(Hash, u64, u64), RpcError> {
    let slot = rpc.get_slot_with_commitment(CommitmentConfig::confirmed()).await?;
    let (hash, last_valid) = latest_blockhash(rpc).await?;
    Ok((hash, last_valid, slot))
}

pub async fn latest_blockhash(rpc: &RpcClient) -> Result<(Hash, u64), RpcError> {
    Ok(rpc.get_latest_blockhash_with_commitment(CommitmentConfig::confirmed()).await?)
}

pub async fn finalized_block_height(rpc: &RpcClient) -> Result<u64, RpcError> {
    Ok(rpc.get_block_height_with_commitment(CommitmentConfig::finalized()).await?)
}

/// Send recorded wire bytes as they are. Preflight is skipped: a node that is behind would
/// refuse a fresh blockhash, and the record, not the send, decides what happens next.
pub async fn send_wire(rpc: &RpcClient, wire_base64: &str) -> Result<(), RpcError> {
    let _signature: String = rpc
        .send(
            RpcRequest::SendTransaction,
            json!([wire_base64, {"encoding": "base64", "skipPreflight": true}]),
        )
        .await?;
    Ok(())
}

/// Wallets whose associated token account of `mint` does not exist yet.
pub async fn wallets_without_token_account(
    rpc: &RpcClient,
    wallets: &[Pubkey],
    mint: &Pubkey,
) -> Result<HashSet<Pubkey>, RpcError> {
    let atas: Vec<Pubkey> = wallets.iter().map(|w| get_associated_token_address(w, mint)).collect();
    let found = token_accounts(rpc, &atas).await?;
    Ok(wallets
        .iter()
        .zip(&atas)
        .filter(|(_, ata)| found.get(ata).is_none_or(Option::is_none))
        .map(|(w, _)| *w)
        .collect())
}

/// The conversion a price feed's account gives at `now`: paused when the account is missing,
/// not the Pyth receiver's, or not a price settlement may pay at.
pub async fn read_conversion(
    rpc: &RpcClient,
    feed: &PriceFeed,
    decimals: u8,
    now: jiff::Timestamp,
) -> Result<Conversion, RpcError> {
    let found = rpc.get_account_with_commitment(&feed.account, rpc.commitment()).await?.value;
    let paused = |why: &str| Conversion::Paused(format!("price feed {}: {why}", feed.account));
    Ok(match found {
        None => paused("no such account"),
        Some(account) if account.owner != PYTH_RECEIVER => {
            paused("not owned by the Pyth receiver program")
        }
        Some(account) => match parse_price_update(&account.data) {
            Ok(update) => Conversion::from_update(&update, feed, decimals, now.as_second()),
            Err(why) => paused(&why),
        },
    })
}

/// Decimals of the mint (byte 44 of an SPL Token mint account).
pub async fn mint_decimals(rpc: &RpcClient, mint: &Pubkey) -> Result<Option<u8>, RpcError> {
    let account = rpc.get_account(mint).await?;
    Ok(account.data.get(44).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_counted_by_the_balance_change_and_its_sender_found() {
        let (stake, mint, sender, other) = (
            Pubkey::new_unique(),
            Pubkey::new_unique(),
            Pubkey::new_unique(),
            Pubkey::new_unique(),
        );
        // A program moved the tokens (no top-level transfer instruction): balances tell.
        let tx = json!({
            "meta": {"err": null,
                "preTokenBalances": [
                    {"accountIndex": 1, "mint": mint.to_string(), "owner": sender.to_string(), "uiTokenAmount": {"amount": "1000"}},
                    {"accountIndex": 2, "mint": mint.to_string(), "owner": "auth", "uiTokenAmount": {"amount": "5"}},
                    {"accountIndex": 3, "mint": Pubkey::new_unique().to_string(), "owner": other.to_string(), "uiTokenAmount": {"amount": "900"}},
                ],
                "postTokenBalances": [
                    {"accountIndex": 1, "mint": mint.to_string(), "owner": sender.to_string(), "uiTokenAmount": {"amount": "300"}},
                    {"accountIndex": 2, "mint": mint.to_string(), "owner": "auth", "uiTokenAmount": {"amount": "705"}},
                    {"accountIndex": 3, "mint": Pubkey::new_unique().to_string(), "owner": other.to_string(), "uiTokenAmount": {"amount": "0"}},
                ]},
            "transaction": {"message": {"accountKeys": [
                {"pubkey": other.to_string(), "signer": true},
                {"pubkey": Pubkey::new_unique().to_string(), "signer": false},
                {"pubkey": stake.to_string(), "signer": false},
                {"pubkey": Pubkey::new_unique().to_string(), "signer": false},
            ]}},
        });
        let entry = stake_entry(&tx, &stake, &mint, "sig", Some(7), vec!["m".into()]);
        assert_eq!(entry.delta, 700);
        assert_eq!(entry.sender, Some(sender), "the owner whose balance of the mint fell");
        assert_eq!(entry.signers, [other]);
        assert_eq!(entry.block_time, Some(7));
    }

    #[test]
    fn an_account_opened_in_the_same_transaction_counts_from_zero() {
        let (stake, mint, payer) =
            (Pubkey::new_unique(), Pubkey::new_unique(), Pubkey::new_unique());
        let tx = json!({
            "meta": {"err": null, "preTokenBalances": [],
                "postTokenBalances": [
                    {"accountIndex": 0, "mint": mint.to_string(), "owner": "auth", "uiTokenAmount": {"amount": "0"}},
                ]},
            "transaction": {"message": {"accountKeys": [
                {"pubkey": stake.to_string(), "signer": false},
                {"pubkey": payer.to_string(), "signer": true},
            ]}},
        });
        let entry = stake_entry(&tx, &stake, &mint, "sig", None, vec![]);
        assert_eq!((entry.delta, entry.sender), (0, Some(payer)));
    }

    /// Issue 13, 3: a scan that fails part-way (an RPC error, a rate limit, a transaction the
    /// node lists but cannot return yet) counts nothing; the retry counts every deposit once.
    #[tokio::test]
    async fn a_scan_is_all_or_nothing_and_a_null_transaction_is_retried() {
        use solana_client::rpc_request::RpcRequest;
        use solana_rpc_client::mock_sender::MocksMap;

        let (stake, mint, sender) =
            (Pubkey::new_unique(), Pubkey::new_unique(), Pubkey::new_unique());
        let signatures: Vec<String> =
            (0..3u8).map(|i| Signature::from([i + 1; 64]).to_string()).collect();
        let listed = json!(
            signatures
                .iter()
                .rev()
                .enumerate()
                .map(|(i, s)| json!({
                    "signature": s, "slot": 10 - i, "err": null, "memo": "[4] mine",
                    "blockTime": 1_800_000_000, "confirmationStatus": "confirmed",
                }))
                .collect::<Vec<_>>()
        );
        let deposit = |amount: u64| {
            json!({
                "meta": {"err": null,
                    "preTokenBalances": [{"accountIndex": 1, "mint": mint.to_string(), "owner": sender.to_string(), "uiTokenAmount": {"amount": "1000"}},
                                         {"accountIndex": 0, "mint": mint.to_string(), "owner": "auth", "uiTokenAmount": {"amount": "0"}}],
                    "postTokenBalances": [{"accountIndex": 1, "mint": mint.to_string(), "owner": sender.to_string(), "uiTokenAmount": {"amount": (1000 - amount).to_string()}},
                                          {"accountIndex": 0, "mint": mint.to_string(), "owner": "auth", "uiTokenAmount": {"amount": amount.to_string()}}]},
                "transaction": {"message": {"accountKeys": [
                    {"pubkey": stake.to_string(), "signer": false},
                    {"pubkey": Pubkey::new_unique().to_string(), "signer": false},
                    {"pubkey": sender.to_string(), "signer": true}]}},
            })
        };
        let mut history = AccountHistory::default();

        // The third transaction is listed but not returned yet (null): nothing is counted.
        let mut mocks = MocksMap::default();
        mocks.insert(RpcRequest::GetSignaturesForAddress, listed.clone());
        for tx in [deposit(1), deposit(2), Value::Null] {
            mocks.insert(RpcRequest::GetTransaction, tx);
        }
        let rpc = RpcClient::new_mock_with_mocks_map("succeeds", mocks);
        assert!(scan(&rpc, &stake, &mint, &mut history, true).await.is_err());
        assert!(history.transfers.is_empty() && history.newest.is_none(), "all or nothing");

        // Retried: every deposit once, in order.
        let mut mocks = MocksMap::default();
        mocks.insert(RpcRequest::GetSignaturesForAddress, listed);
        for tx in [deposit(1), deposit(2), deposit(3)] {
            mocks.insert(RpcRequest::GetTransaction, tx);
        }
        let rpc = RpcClient::new_mock_with_mocks_map("succeeds", mocks);
        scan(&rpc, &stake, &mint, &mut history, true).await.expect("scanned");
        let deltas: Vec<i128> = history.transfers.iter().map(|t| t.delta).collect();
        assert_eq!(deltas, [1, 2, 3]);
        assert!(history.transfers.iter().all(|t| t.sender == Some(sender)));
        assert_eq!(history.newest.map(|s| s.to_string()).as_ref(), signatures.last());
    }
}
