//! Token transfers signed by the user's own keypair (deposits, stake, unbond requests), built
//! and sent with settlement's chain code, and what the commands report about them.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use gpumarket_crds::Amount;
use serde::Serialize;
use solana_client::nonblocking::rpc_client::RpcClient;
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signer::Signer;
use spl_associated_token_account_interface::address::get_associated_token_address;

use crate::settlement::{chain, transaction};

/// Read a keypair file without ever quoting its content.
pub fn read_keypair(path: &Path) -> anyhow::Result<Keypair> {
    solana_keypair::read_keypair_file(path).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a readable Solana keypair file (a JSON array of 64 bytes, as solana-keygen writes it)",
            path.display()
        )
    })
}

/// A token account's balance, with its mint's decimals.
#[derive(Clone, Copy, Debug)]
pub struct Balance {
    pub mint: Pubkey,
    pub amount: u64,
    pub decimals: u8,
}

/// What the token account `account` holds (an error when it is not a token account).
pub async fn token_balance(rpc: &RpcClient, account: &Pubkey) -> anyhow::Result<Balance> {
    let found = chain::token_accounts(rpc, &[*account]).await?;
    let held = found
        .get(account)
        .copied()
        .flatten()
        .with_context(|| format!("{account} is not an open token account"))?;
    let decimals = chain::mint_decimals(rpc, &held.mint)
        .await?
        .with_context(|| format!("the mint {} is not an SPL Token mint", held.mint))?;
    Ok(Balance { mint: held.mint, amount: held.amount, decimals })
}

/// A confirmed transfer.
#[derive(Clone, Debug)]
pub struct Sent {
    pub amount: u64,
    pub signature: String,
}

/// Transfer `amount` of `to`'s mint from `from`'s associated token account to the token account
/// `to`, with `memo` (the receipt in both accounts' histories); returns once confirmed.
pub async fn transfer(
    rpc: &RpcClient,
    from: &Keypair,
    to: &Pubkey,
    amount: u64,
    memo: &str,
) -> anyhow::Result<Sent> {
    let target = token_balance(rpc, to).await?;
    let source = get_associated_token_address(&from.pubkey(), &target.mint);
    let held = chain::token_accounts(rpc, &[source]).await?;
    let available = held.get(&source).copied().flatten().map_or(0, |a| a.amount);
    if available < amount {
        bail!(
            "the wallet {} holds {} of the mint {} (in {source}), {} is needed: nothing sent",
            from.pubkey(),
            Amount { base_units: available, decimals: target.decimals },
            target.mint,
            Amount { base_units: amount, decimals: target.decimals },
        );
    }
    let instructions = [
        spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &source,
            &target.mint,
            to,
            &from.pubkey(),
            &[],
            amount,
            target.decimals,
        )?,
        spl_memo_interface::instruction::build_memo(
            &spl_memo_interface::v3::id(),
            memo.as_bytes(),
            &[&from.pubkey()],
        ),
    ];
    let (blockhash, _) = chain::latest_blockhash(rpc).await?;
    let tx = transaction::sign(&instructions, from, blockhash)?;
    let signature = rpc.send_and_confirm_transaction(&tx).await.context("sending the transfer")?;
    Ok(Sent { amount, signature: signature.to_string() })
}

/// What `deposit` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DepositReport {
    pub cluster: String,
    pub escrow: String,
    /// The price per hour of the cluster's match now.
    pub hourly_rate: u64,
    /// What the escrow must hold before the cluster is bound.
    pub required: u64,
    pub held_before: u64,
    /// Sent by this run (0 when the escrow already covered the deposit).
    pub sent: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// What the escrow holds now.
    pub balance: u64,
    pub decimals: u8,
}

pub fn render_deposit(r: &DepositReport) -> String {
    let amount = |base_units| Amount { base_units, decimals: r.decimals };
    let mut s = String::new();
    match &r.signature {
        Some(signature) => {
            let _ = writeln!(
                s,
                "sent {} to the escrow {} of GpuCluster {} (transaction {signature}, confirmed)",
                amount(r.sent),
                r.escrow,
                r.cluster
            );
        }
        None => {
            let _ = writeln!(
                s,
                "nothing sent: the escrow {} of GpuCluster {} already covers the deposit",
                r.escrow, r.cluster
            );
        }
    }
    let _ = writeln!(
        s,
        "escrow balance {}, deposit needed {} ({} per hour)",
        amount(r.balance),
        amount(r.required),
        amount(r.hourly_rate)
    );
    s
}

/// What `stake` or `unstake` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferReport {
    pub what: String,
    pub to: String,
    pub amount: u64,
    pub signature: String,
    /// What the stake account holds now.
    pub balance: u64,
    pub decimals: u8,
}

pub fn render_transfer(r: &TransferReport) -> String {
    let amount = |base_units| Amount { base_units, decimals: r.decimals };
    format!(
        "sent {} ({}) to the stake account {} (transaction {}, confirmed); it holds {}\n",
        amount(r.amount),
        r.what,
        r.to,
        r.signature,
        amount(r.balance)
    )
}
