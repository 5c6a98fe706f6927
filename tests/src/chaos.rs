//! Helpers of the chaos run (`tests/tests/chaos.rs`): a seeded random source, processes killed
//! and checked by pid, the fake GPU source of a KWOK node's agent, a ledger of the transfers a
//! test makes (by signature, so that one whose confirmation was lost is still counted if it
//! landed), and an independent reading of the chain: an account's whole history, each
//! transaction's memos and token balance changes, from the RPC node's `jsonParsed` answers and
//! nothing the controller wrote.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use solana_client::nonblocking::rpc_client::RpcClient;
use solana_client::rpc_request::RpcRequest;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signature, Signer};
use solana_sdk::transaction::Transaction;
use spl_associated_token_account_interface::address::get_associated_token_address;

use crate::GpuNode;
use crate::solana::MINT_DECIMALS;

/// A small seeded generator (xorshift64*): a failing run can be replayed with its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// A seed from the clock.
    pub fn seed_from_time() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos());
        (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform between `low` and `high`.
    pub fn duration(&mut self, low: Duration, high: Duration) -> Duration {
        low + (high.saturating_sub(low)).mul_f64(self.unit())
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high.saturating_sub(low) + 1)
    }
}

/// Whether the process `pid` runs (a killed child stays a zombie until the environment reaps
/// it at the end, so its pid is not reused meanwhile).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or_default().trim().starts_with('Z'))
}

/// Send `signal` (`KILL`, `TERM`) to the process `pid` alone.
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}

/// The agent's fake GPU source for a KWOK node: its GPUs (uuids `GPU-<node>-<i>`), all
/// NVLink-connected, no scripted faults.
pub fn fake_source(node: &GpuNode) -> String {
    let uuids: Vec<String> = (0..node.gpus).map(|i| format!("GPU-{}-{i}", node.name)).collect();
    let gpus: Vec<Value> = uuids
        .iter()
        .map(|uuid| {
            let peers: Vec<&String> = uuids.iter().filter(|u| *u != uuid).collect();
            json!({
                "uuid": uuid,
                "productName": format!("NVIDIA {}", node.model),
                "memoryMib": node.memory_mib,
                "nvlinkPeers": peers,
            })
        })
        .collect();
    json!({"driverVersion": "560.35.03", "cudaVersion": "12.6", "gpus": gpus}).to_string()
}

/// One transfer a test signed: where to, how much, and a label of its own (a cluster name, a
/// node name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub signature: Signature,
    pub to: Pubkey,
    pub amount: u64,
    pub label: String,
}

/// Every transfer a test signed, sent or not; [`Ledger::landed`] keeps those the chain holds.
#[derive(Debug, Default)]
pub struct Ledger {
    signed: Mutex<Vec<Transfer>>,
}

impl Ledger {
    /// A `TransferChecked` of `amount` of `mint` from `from`'s associated token account into
    /// the token account `to`, with `memo` when given, signed, recorded, sent and confirmed. A
    /// blockhash the node does not know yet is retried with a fresh one (each signature is
    /// recorded: only one of them can land).
    #[allow(clippy::too_many_arguments)]
    pub async fn transfer(
        &self,
        rpc: &RpcClient,
        mint: &Pubkey,
        from: &Keypair,
        to: &Pubkey,
        amount: u64,
        memo: Option<&str>,
        label: &str,
    ) -> Result<Signature> {
        let mut instructions = vec![spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &get_associated_token_address(&from.pubkey(), mint),
            mint,
            to,
            &from.pubkey(),
            &[],
            amount,
            MINT_DECIMALS,
        )?];
        if let Some(memo) = memo {
            instructions.push(spl_memo_interface::instruction::build_memo(
                &spl_memo_interface::v3::id(),
                memo.as_bytes(),
                &[&from.pubkey()],
            ));
        }
        let mut attempts = 0;
        loop {
            let blockhash = rpc.get_latest_blockhash().await?;
            let tx = Transaction::new_signed_with_payer(
                &instructions,
                Some(&from.pubkey()),
                &[from],
                blockhash,
            );
            let signature = tx.signatures[0];
            self.lock().push(Transfer { signature, to: *to, amount, label: label.to_owned() });
            match rpc.send_and_confirm_transaction(&tx).await {
                Ok(signature) => return Ok(signature),
                Err(e) if attempts < 10 && format!("{e:?}").contains("BlockhashNotFound") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(anyhow!("transfer of {amount} to {to} ({label}): {e}")),
            }
        }
    }

    /// The transfers that landed and succeeded, each once, whatever their sender was told.
    pub async fn landed(&self, rpc: &RpcClient) -> Result<Vec<Transfer>> {
        let mut signed = self.lock().clone();
        signed.sort_by_key(|t| t.signature);
        signed.dedup_by_key(|t| t.signature);
        let mut landed = Vec::new();
        for chunk in signed.chunks(200) {
            let signatures: Vec<Signature> = chunk.iter().map(|t| t.signature).collect();
            let statuses = rpc.get_signature_statuses_with_history(&signatures).await?.value;
            for (transfer, status) in chunk.iter().zip(statuses) {
                if status.is_some_and(|s| s.err.is_none()) {
                    landed.push(transfer.clone());
                }
            }
        }
        Ok(landed)
    }

    /// How many transactions were signed (landed or not).
    pub fn signed(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Transfer>> {
        match self.signed.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// What one transaction did, as the RPC node reports it (`getTransaction`, `jsonParsed`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainTx {
    pub signature: String,
    pub slot: u64,
    /// It failed on chain (fees paid, nothing else changed).
    pub failed: bool,
    /// The texts of its memo instructions.
    pub memos: Vec<String>,
    /// Change of the balance of each token account of the mint it touched (after − before;
    /// an account opened or closed in it counts as 0 on that side).
    pub deltas: BTreeMap<Pubkey, i128>,
    /// Owner (wallet) of each of those token accounts.
    pub owners: BTreeMap<Pubkey, Pubkey>,
}

impl ChainTx {
    pub fn delta(&self, account: &Pubkey) -> i128 {
        self.deltas.get(account).copied().unwrap_or(0)
    }

    /// Whether a memo of it starts with `prefix` (`gpumarket pay`, `gpumarket refund`).
    pub fn has_memo(&self, prefix: &str) -> bool {
        self.memos.iter().any(|m| m.trim() == prefix || m.trim().starts_with(&format!("{prefix} ")))
    }
}

/// Reads accounts' histories and transactions of one mint, each transaction once.
pub struct ChainReader {
    rpc: RpcClient,
    mint: Pubkey,
    cache: HashMap<String, ChainTx>,
}

impl ChainReader {
    pub fn new(rpc: RpcClient, mint: Pubkey) -> ChainReader {
        ChainReader { rpc, mint, cache: HashMap::new() }
    }

    /// Every transaction that names `account`, oldest first (`getSignaturesForAddress`, page by
    /// page, at `confirmed`).
    pub async fn history(&mut self, account: &Pubkey) -> Result<Vec<ChainTx>> {
        let mut signatures: Vec<String> = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let mut config = json!({"limit": 1000, "commitment": "confirmed"});
            if let Some(before) = &before {
                config["before"] = json!(before);
            }
            let page: Vec<Value> = self
                .rpc
                .send(RpcRequest::GetSignaturesForAddress, json!([account.to_string(), config]))
                .await
                .with_context(|| format!("getSignaturesForAddress {account}"))?;
            let full = page.len() >= 1000;
            for entry in &page {
                let signature = entry["signature"].as_str().context("a listed signature")?;
                signatures.push(signature.to_owned());
            }
            before = signatures.last().cloned();
            if !full {
                break;
            }
        }
        signatures.reverse();
        let mut txs = Vec::with_capacity(signatures.len());
        for signature in signatures {
            txs.push(self.transaction(&signature).await?);
        }
        Ok(txs)
    }

    /// One transaction (from the cache when it was read before); retried while the node lists
    /// it but cannot return it yet.
    pub async fn transaction(&mut self, signature: &str) -> Result<ChainTx> {
        if let Some(tx) = self.cache.get(signature) {
            return Ok(tx.clone());
        }
        let params = json!([signature, {
            "encoding": "jsonParsed",
            "commitment": "confirmed",
            "maxSupportedTransactionVersion": 0,
        }]);
        let mut attempts = 0;
        let raw: Value = loop {
            let raw: Value = self
                .rpc
                .send(RpcRequest::GetTransaction, params.clone())
                .await
                .with_context(|| format!("getTransaction {signature}"))?;
            if !raw.is_null() {
                break raw;
            }
            attempts += 1;
            if attempts > 50 {
                bail!("transaction {signature} is listed but never returned");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let tx = parse_transaction(signature, &raw, &self.mint)?;
        self.cache.insert(signature.to_owned(), tx.clone());
        Ok(tx)
    }

    /// Every transaction read so far.
    pub fn read(&self) -> impl Iterator<Item = &ChainTx> {
        self.cache.values()
    }
}

/// A `jsonParsed` transaction's memos and the token balance changes of `mint`'s accounts.
pub fn parse_transaction(signature: &str, raw: &Value, mint: &Pubkey) -> Result<ChainTx> {
    let meta = &raw["meta"];
    if meta.is_null() {
        bail!("transaction {signature} has no meta");
    }
    let message = &raw["transaction"]["message"];
    let keys: Vec<Pubkey> = message["accountKeys"]
        .as_array()
        .context("accountKeys")?
        .iter()
        .map(|k| {
            k["pubkey"]
                .as_str()
                .or(k.as_str())
                .context("an account key")?
                .parse::<Pubkey>()
                .map_err(Into::into)
        })
        .collect::<Result<_>>()?;
    let mint = mint.to_string();
    let mut deltas: BTreeMap<Pubkey, i128> = BTreeMap::new();
    let mut owners = BTreeMap::new();
    for (side, sign) in [("preTokenBalances", -1i128), ("postTokenBalances", 1i128)] {
        for balance in meta[side].as_array().map(Vec::as_slice).unwrap_or_default() {
            if balance["mint"].as_str() != Some(mint.as_str()) {
                continue;
            }
            let index = balance["accountIndex"].as_u64().context("accountIndex")? as usize;
            let account = *keys.get(index).context("accountIndex out of range")?;
            let amount: i128 = balance["uiTokenAmount"]["amount"]
                .as_str()
                .context("uiTokenAmount.amount")?
                .parse()?;
            *deltas.entry(account).or_default() += sign * amount;
            if let Some(owner) = balance["owner"].as_str().and_then(|o| o.parse().ok()) {
                owners.insert(account, owner);
            }
        }
    }
    let memos = message["instructions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|ix| ix["program"].as_str() == Some("spl-memo"))
        .filter_map(|ix| ix["parsed"].as_str().map(str::to_owned))
        .collect();
    Ok(ChainTx {
        signature: signature.to_owned(),
        slot: raw["slot"].as_u64().unwrap_or_default(),
        failed: !meta["err"].is_null(),
        memos,
        deltas,
        owners,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn token_balance_changes_and_memos_are_read_from_a_parsed_transaction() {
        let (mint, escrow, wallet, authority) = (
            Pubkey::new_unique(),
            Pubkey::new_unique(),
            Pubkey::new_unique(),
            Pubkey::new_unique(),
        );
        let raw = json!({
            "slot": 42,
            "meta": {
                "err": null,
                "preTokenBalances": [
                    {"accountIndex": 1, "mint": mint.to_string(), "owner": authority.to_string(), "uiTokenAmount": {"amount": "500"}},
                    {"accountIndex": 2, "mint": mint.to_string(), "owner": wallet.to_string(), "uiTokenAmount": {"amount": "7"}},
                ],
                "postTokenBalances": [
                    {"accountIndex": 2, "mint": mint.to_string(), "owner": wallet.to_string(), "uiTokenAmount": {"amount": "507"}},
                ],
            },
            "transaction": {"message": {
                "accountKeys": [{"pubkey": authority.to_string()}, {"pubkey": escrow.to_string()}, {"pubkey": wallet.to_string()}],
                "instructions": [{"program": "spl-token", "parsed": {"type": "transferChecked"}},
                                 {"program": "spl-memo", "parsed": "gpumarket refund abc"}],
            }},
        });
        let tx = parse_transaction("sig", &raw, &mint).unwrap();
        assert_eq!((tx.slot, tx.failed), (42, false));
        assert_eq!(tx.delta(&escrow), -500, "closed in the transaction: its balance went to 0");
        assert_eq!(tx.delta(&wallet), 500);
        assert_eq!(tx.owners.get(&wallet), Some(&wallet));
        assert!(tx.has_memo("gpumarket refund") && !tx.has_memo("gpumarket pay"));
    }

    #[test]
    fn the_generator_is_seeded_and_stays_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = a.between(3, 9);
            assert_eq!(x, b.between(3, 9));
            assert!((3..=9).contains(&x));
            assert!(a.below(5) < 5 && (0.0..1.0).contains(&a.unit()));
            b.below(5);
            b.unit();
        }
    }
}
