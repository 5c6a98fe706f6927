//! The thin Solana wiring: every RPC call settlement makes, and the pure parsing of what comes
//! back. Commitment is `confirmed` throughout, except expiry, which is judged at `finalized`.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};
use solana_client::nonblocking::rpc_client::RpcClient;
use solana_client::rpc_client::GetConfirmedSignaturesForAddress2Config;
use solana_client::rpc_request::RpcRequest;
use solana_commitment_config::CommitmentConfig;
use solana_pubkey::Pubkey;
use solana_transaction::{Hash, Signature};
use spl_associated_token_account_interface::address::get_associated_token_address;

use super::protocol::Observed;

pub type RpcError = Box<solana_client::client_error::ClientError>;

/// Most signatures `getSignatureStatuses` takes per call.
const STATUS_CHUNK: usize = 256;
/// Most accounts `getMultipleAccounts` takes per call.
const ACCOUNTS_CHUNK: usize = 100;
/// Page size of `getSignaturesForAddress`.
const HISTORY_PAGE: usize = 1000;

/// Deposits into the escrow account, by memo (cluster uid, or `stake:<node>`), built up
/// incrementally from the account's history. Confirmed transfers are final, so what was read
/// once is never read again.
#[derive(Debug, Default)]
pub struct EscrowIndex {
    newest: Option<Signature>,
    by_memo: HashMap<String, u64>,
}

impl EscrowIndex {
    pub fn deposited(&self, memo: &str) -> u64 {
        self.by_memo.get(memo).copied().unwrap_or(0)
    }

    pub fn by_memo(&self) -> &HashMap<String, u64> {
        &self.by_memo
    }
}

/// The memo text of a `getSignaturesForAddress` entry (formatted `[length] text`), when the
/// transaction carries exactly one memo.
pub fn listed_memo(listed: &str) -> Option<&str> {
    if listed.contains("; [") {
        return None;
    }
    let text = match listed.strip_prefix('[') {
        Some(rest) => rest.split_once("] ").map_or(rest, |(_, text)| text),
        None => listed,
    };
    Some(text.trim())
}

/// Base units a `jsonParsed` transaction moved into `account` with top-level SPL Token
/// transfers; zero when it failed.
pub fn transferred_to(tx: &Value, account: &str) -> u64 {
    if !tx.pointer("/meta/err").is_none_or(Value::is_null) {
        return 0;
    }
    let Some(instructions) =
        tx.pointer("/transaction/message/instructions").and_then(Value::as_array)
    else {
        return 0;
    };
    instructions
        .iter()
        .filter(|ix| ix.get("program").and_then(Value::as_str) == Some("spl-token"))
        .filter_map(|ix| ix.get("parsed"))
        .filter(|p| {
            matches!(p.get("type").and_then(Value::as_str), Some("transfer" | "transferChecked"))
        })
        .filter_map(|p| p.get("info"))
        .filter(|info| info.get("destination").and_then(Value::as_str) == Some(account))
        .filter_map(|info| {
            info.get("amount")
                .or_else(|| info.pointer("/tokenAmount/amount"))
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<u64>().ok())
        })
        .fold(0u64, u64::saturating_add)
}

/// Read the escrow account's history newer than what the index holds, adding every successful
/// transfer into it whose memo is a deposit (anything but settlement's own memos).
pub async fn scan_deposits(
    rpc: &RpcClient,
    escrow_account: &Pubkey,
    index: &mut EscrowIndex,
) -> Result<(), RpcError> {
    let mut before = None;
    let mut newest = None;
    loop {
        let config = GetConfirmedSignaturesForAddress2Config {
            before,
            until: index.newest,
            limit: Some(HISTORY_PAGE),
            commitment: Some(CommitmentConfig::confirmed()),
        };
        let page = rpc.get_signatures_for_address_with_config(escrow_account, config).await?;
        for entry in &page {
            let Ok(signature) = entry.signature.parse::<Signature>() else { continue };
            newest.get_or_insert(signature);
            before = Some(signature);
            let memo = entry.memo.as_deref().and_then(listed_memo).unwrap_or_default();
            if entry.err.is_some() || memo.is_empty() || memo.starts_with("gpumarket ") {
                continue;
            }
            let tx: Value = rpc
                .send(
                    RpcRequest::GetTransaction,
                    json!([entry.signature, {
                        "encoding": "jsonParsed",
                        "commitment": "confirmed",
                        "maxSupportedTransactionVersion": 0,
                    }]),
                )
                .await?;
            let amount = transferred_to(&tx, &escrow_account.to_string());
            let total = index.by_memo.entry(memo.to_owned()).or_default();
            *total = total.saturating_add(amount);
        }
        if page.len() < HISTORY_PAGE {
            break;
        }
    }
    if newest.is_some() {
        index.newest = newest;
    }
    Ok(())
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
    let mut missing = HashSet::new();
    for chunk in wallets.chunks(ACCOUNTS_CHUNK) {
        let atas: Vec<Pubkey> =
            chunk.iter().map(|w| get_associated_token_address(w, mint)).collect();
        let accounts = rpc.get_multiple_accounts(&atas).await?;
        missing.extend(chunk.iter().zip(accounts).filter(|(_, a)| a.is_none()).map(|(w, _)| *w));
    }
    Ok(missing)
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
    fn listed_memos_lose_their_length_prefix() {
        assert_eq!(
            listed_memo("[36] 6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c"),
            Some("6f1c4a0e-1b7e-4c55-9a1e-0c8a7f1d2b3c")
        );
        assert_eq!(listed_memo("plain"), Some("plain"));
        assert_eq!(listed_memo("[1] a; [1] b"), None, "two memos: not a deposit");
    }

    #[test]
    fn transfers_into_the_escrow_are_summed() {
        let tx = json!({
            "meta": {"err": null},
            "transaction": {"message": {"instructions": [
                {"program": "spl-token", "parsed": {"type": "transferChecked", "info": {
                    "destination": "ESC", "tokenAmount": {"amount": "700"}}}},
                {"program": "spl-token", "parsed": {"type": "transfer", "info": {
                    "destination": "ESC", "amount": "300"}}},
                {"program": "spl-token", "parsed": {"type": "transfer", "info": {
                    "destination": "OTHER", "amount": "999"}}},
                {"program": "spl-memo", "parsed": "uid"},
            ]}},
        });
        assert_eq!(transferred_to(&tx, "ESC"), 1000);
        let mut failed = tx.clone();
        failed["meta"]["err"] = json!({"InstructionError": [0, "Custom"]});
        assert_eq!(transferred_to(&failed, "ESC"), 0);
    }
}
