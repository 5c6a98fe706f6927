//! A real Solana test validator (`gpumarket-validator`, SPL programs in genesis), the
//! settlement mint (6 decimals), a funded buyer and supplier wallets with token accounts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use solana_client::nonblocking::rpc_client::RpcClient;
use solana_commitment_config::CommitmentConfig;
use solana_sdk::instruction::Instruction;
use solana_sdk::program_pack::Pack;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signature, Signer, read_keypair_file, write_keypair_file};
use solana_sdk::transaction::Transaction;
use spl_associated_token_account_interface::address::get_associated_token_address;
use spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent;

use crate::ports::free_port_block;
use crate::process::{Process, Reaper};
use crate::tools::Tools;

/// Decimals of the settlement mint (USDC-like).
pub const MINT_DECIMALS: u8 = 6;
/// Base units minted to the buyer: one million tokens.
pub const BUYER_TOKENS: u64 = 1_000_000 * 10u64.pow(MINT_DECIMALS as u32);
/// Lamports each wallet receives for fees and rent.
pub const WALLET_LAMPORTS: u64 = 10 * 1_000_000_000;
/// Secret of the buyer's keypair: the same in every local environment, so that the examples can
/// name its wallet (`examples/gpucluster.yaml`) and work as shipped. Its validator is local and
/// thrown away: this key holds nothing anywhere else.
pub const LOCAL_BUYER_SECRET: [u8; 32] = *b"gpumarket local env buyer (test)";
/// The buyer's wallet, the public half of [`LOCAL_BUYER_SECRET`].
pub const LOCAL_BUYER_WALLET: &str = "3u2K64yRh16TTAj7PT6gopzcL8w1D9omtof8r5UwgGcT";
/// Number of supplier wallets.
pub const SUPPLIERS: usize = 3;

/// The running validator and the wallets of the environment.
#[derive(Clone, Debug)]
pub struct Solana {
    pub rpc_url: String,
    /// The settlement mint (6 decimals, classic SPL Token program).
    pub mint: Pubkey,
    /// Keypair file of the mint authority (can mint more tokens).
    pub mint_authority: PathBuf,
    /// Keypair file of the buyer: SOL and `BUYER_TOKENS` in its associated token account.
    pub buyer: PathBuf,
    /// Keypair files of the suppliers: SOL and an (empty) associated token account each.
    pub suppliers: Vec<PathBuf>,
    /// Keypair file of the validator's faucet (holds almost all SOL).
    pub faucet: PathBuf,
    /// Where accounts are posted for the validator to store (see [`Solana::post_account`]).
    pub accounts: PathBuf,
}

impl Solana {
    /// An RPC client with `confirmed` commitment (a fresh one: clients belong to a runtime).
    pub fn rpc(&self) -> RpcClient {
        RpcClient::new_with_commitment(self.rpc_url.clone(), CommitmentConfig::confirmed())
    }

    /// The associated token account of `wallet` for the settlement mint.
    pub fn token_account(&self, wallet: &Pubkey) -> Pubkey {
        get_associated_token_address(wallet, &self.mint)
    }

    /// A transfer of `amount` from `from`'s token account into the token account `to` (a
    /// cluster's escrow, a node's stake account), with `memo` when given: how a buyer deposits
    /// and a supplier bonds stake.
    pub async fn transfer(
        &self,
        from: &Keypair,
        to: &Pubkey,
        amount: u64,
        memo: Option<&str>,
    ) -> Result<Signature> {
        let mut instructions = vec![spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &self.token_account(&from.pubkey()),
            &self.mint,
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
        send_with_retry(&self.rpc(), &instructions, from, &[from]).await.context("transferring")
    }
}

impl Solana {
    /// A new settlement authority with SOL for fees, its keypair written to `path` (what the
    /// controller's `--settlement-keypair` reads). Its escrow is its own: tests do not share
    /// one.
    pub async fn settlement_authority(&self, path: &Path) -> Result<Pubkey> {
        let authority = Keypair::new();
        write_keypair_file(&authority, path)
            .map_err(|e| anyhow!("writing keypair {}: {e}", path.display()))?;
        let faucet = read_keypair(&self.faucet)?;
        let fund = solana_system_interface::instruction::transfer(
            &faucet.pubkey(),
            &authority.pubkey(),
            WALLET_LAMPORTS,
        );
        send_with_retry(&self.rpc(), &[fund], &faucet, &[&faucet]).await?;
        Ok(authority.pubkey())
    }

    /// Base units held by the token account `account`; `None` when it does not exist (never
    /// opened, or closed).
    pub async fn account_balance(&self, account: &Pubkey) -> Result<Option<u64>> {
        let rpc = self.rpc();
        let found = rpc.get_account_with_commitment(account, CommitmentConfig::confirmed()).await?;
        match found.value {
            None => Ok(None),
            Some(_) => Ok(Some(rpc.get_token_account_balance(account).await?.amount.parse()?)),
        }
    }

    /// Base units held by `wallet`'s token account (0 when it has none yet).
    pub async fn balance(&self, wallet: &Pubkey) -> Result<u64> {
        self.balance_in(wallet, &self.mint).await
    }

    /// Base units of `mint` held by `wallet`'s associated token account (0 when it has none).
    pub async fn balance_in(&self, wallet: &Pubkey, mint: &Pubkey) -> Result<u64> {
        let account = get_associated_token_address(wallet, mint);
        Ok(self.account_balance(&account).await?.unwrap_or(0))
    }
}

impl Solana {
    /// Store `data` at `address`, owned by `owner`, as that program would write it (the
    /// validator's `--account-dir`: how the environment posts Pyth price updates); returns once
    /// the RPC node shows it.
    pub async fn post_account(&self, address: &Pubkey, owner: &Pubkey, data: &[u8]) -> Result<()> {
        let file = self.accounts.join(format!("{address}.account"));
        let partial = self.accounts.join(format!(".{address}.partial"));
        std::fs::write(&partial, [owner.as_ref(), data].concat())?;
        std::fs::rename(&partial, &file)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let rpc = self.rpc();
            let found = rpc.get_account_with_commitment(address, CommitmentConfig::confirmed());
            if let Some(account) = found.await?.value
                && account.owner == *owner
                && account.data == data
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the validator did not store {address} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A new mint of `decimals` (the environment's mint authority), with `amount` minted to
    /// each wallet's associated token account.
    pub async fn new_mint(&self, decimals: u8, holders: &[(Pubkey, u64)]) -> Result<Pubkey> {
        let (payer, authority, mint) =
            (read_keypair(&self.faucet)?, read_keypair(&self.mint_authority)?, Keypair::new());
        let token = spl_token_interface::id();
        let rpc = self.rpc();
        let mut instructions = create_mint(&rpc, &payer, &mint, &authority, decimals).await?;
        for (wallet, amount) in holders {
            let account = get_associated_token_address(wallet, &mint.pubkey());
            instructions.push(create_associated_token_account_idempotent(
                &payer.pubkey(),
                wallet,
                &mint.pubkey(),
                &token,
            ));
            instructions.push(spl_token_interface::instruction::mint_to_checked(
                &token,
                &mint.pubkey(),
                &account,
                &authority.pubkey(),
                &[],
                *amount,
                decimals,
            )?);
        }
        send_with_retry(&rpc, &instructions, &payer, &[&payer, &mint, &authority])
            .await
            .context("creating a mint")?;
        Ok(mint.pubkey())
    }
}

/// Instructions creating `mint` (rent paid by `payer`) with `decimals` and `authority`.
async fn create_mint(
    rpc: &RpcClient,
    payer: &Keypair,
    mint: &Keypair,
    authority: &Keypair,
    decimals: u8,
) -> Result<Vec<Instruction>> {
    let (token, len) = (spl_token_interface::id(), spl_token_interface::state::Mint::LEN);
    Ok(vec![
        solana_system_interface::instruction::create_account(
            &payer.pubkey(),
            &mint.pubkey(),
            rpc.get_minimum_balance_for_rent_exemption(len).await?,
            len as u64,
            &token,
        ),
        spl_token_interface::instruction::initialize_mint2(
            &token,
            &mint.pubkey(),
            &authority.pubkey(),
            None,
            decimals,
        )?,
    ])
}

/// Read a keypair file written by this module.
pub fn read_keypair(path: &Path) -> Result<Keypair> {
    read_keypair_file(path).map_err(|e| anyhow!("reading keypair {}: {e}", path.display()))
}

/// Start the validator (logs in `logs/`, ledger and keypairs in `dir/solana`), then create the
/// mint and the wallets.
pub async fn start(
    dir: &Path,
    tools: &Tools,
    reaper: &Reaper,
    processes: &mut Vec<Process>,
) -> Result<Solana> {
    let solana_dir = dir.join("solana");
    std::fs::create_dir_all(&solana_dir)?;
    // RPC on the first port, PubSub on the second, gossip/TPU/TVU/repair on the rest.
    let base = free_port_block(160)?;
    let accounts = solana_dir.join("accounts");
    std::fs::create_dir_all(&accounts)?;
    let mut validator = tools.command("gpumarket-validator")?;
    validator
        .arg("--ledger")
        .arg(solana_dir.join("ledger"))
        .arg("--account-dir")
        .arg(&accounts)
        .arg(format!("--rpc-port={base}"))
        .arg(format!("--port-range={}-{}", base + 2, base + 159));
    let process =
        Process::spawn(reaper, &dir.join("logs"), "solana-validator", validator)?.supervised();
    let ready = process.wait_for_line("READY ", Duration::from_secs(180)).await;
    processes.push(process);
    let ready = ready?;
    let rpc_url = ready
        .split_whitespace()
        .find_map(|field| field.strip_prefix("rpc="))
        .with_context(|| format!("no rpc= in the validator's line {ready:?}"))?
        .to_string();
    let faucet = solana_dir.join("ledger").join("faucet-keypair.json");
    setup_wallets(&solana_dir, rpc_url, faucet, accounts).await
}

async fn setup_wallets(
    dir: &Path,
    rpc_url: String,
    faucet: PathBuf,
    account_dir: PathBuf,
) -> Result<Solana> {
    let rpc = RpcClient::new_with_commitment(rpc_url.clone(), CommitmentConfig::confirmed());
    let payer = read_keypair(&faucet)?;
    let write_keypair = |name: &str, keypair: Keypair| -> Result<(Keypair, PathBuf)> {
        let path = dir.join(format!("{name}.json"));
        write_keypair_file(&keypair, &path)
            .map_err(|e| anyhow!("writing keypair {}: {e}", path.display()))?;
        Ok((keypair, path))
    };
    let new_keypair = |name: &str| write_keypair(name, Keypair::new());
    let (mint, _) = new_keypair("mint")?;
    let (authority, authority_path) = new_keypair("mint-authority")?;
    let (buyer, buyer_path) = write_keypair("buyer", Keypair::new_from_array(LOCAL_BUYER_SECRET))?;
    let suppliers = (0..SUPPLIERS)
        .map(|i| new_keypair(&format!("supplier-{i}")))
        .collect::<Result<Vec<_>>>()?;

    let token = spl_token_interface::id();
    let mut funding = create_mint(&rpc, &payer, &mint, &authority, MINT_DECIMALS).await?;
    for wallet in std::iter::once(&buyer).chain(suppliers.iter().map(|(k, _)| k)) {
        funding.push(solana_system_interface::instruction::transfer(
            &payer.pubkey(),
            &wallet.pubkey(),
            WALLET_LAMPORTS,
        ));
    }
    send_with_retry(&rpc, &funding, &payer, &[&payer, &mint]).await.context("creating the mint")?;

    let mut accounts: Vec<Instruction> = std::iter::once(&buyer)
        .chain(suppliers.iter().map(|(k, _)| k))
        .map(|wallet| {
            create_associated_token_account_idempotent(
                &payer.pubkey(),
                &wallet.pubkey(),
                &mint.pubkey(),
                &token,
            )
        })
        .collect();
    accounts.push(spl_token_interface::instruction::mint_to_checked(
        &token,
        &mint.pubkey(),
        &get_associated_token_address(&buyer.pubkey(), &mint.pubkey()),
        &authority.pubkey(),
        &[],
        BUYER_TOKENS,
        MINT_DECIMALS,
    )?);
    send_with_retry(&rpc, &accounts, &payer, &[&payer, &authority])
        .await
        .context("creating token accounts and funding the buyer")?;

    Ok(Solana {
        rpc_url,
        mint: mint.pubkey(),
        mint_authority: authority_path,
        buyer: buyer_path,
        suppliers: suppliers.into_iter().map(|(_, path)| path).collect(),
        faucet,
        accounts: account_dir,
    })
}

/// Sign with a fresh blockhash, send and confirm; a `BlockhashNotFound` (normal right after
/// the validator starts) is retried with a newer blockhash.
pub async fn send_with_retry(
    rpc: &RpcClient,
    instructions: &[Instruction],
    payer: &Keypair,
    signers: &[&Keypair],
) -> Result<Signature> {
    let mut attempts = 0;
    loop {
        let blockhash = rpc.get_latest_blockhash().await?;
        let tx = Transaction::new_signed_with_payer(
            instructions,
            Some(&payer.pubkey()),
            signers,
            blockhash,
        );
        match rpc.send_and_confirm_transaction(&tx).await {
            Ok(signature) => return Ok(signature),
            Err(e) if attempts < 20 && is_blockhash_not_found(&e) => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => bail!("transaction failed: {e}"),
        }
    }
}

fn is_blockhash_not_found(error: &solana_client::client_error::ClientError) -> bool {
    format!("{error:?}").contains("BlockhashNotFound")
        || error.to_string().contains("Blockhash not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_examples_are_paid_by_the_local_buyer() {
        let buyer = Keypair::new_from_array(LOCAL_BUYER_SECRET).pubkey().to_string();
        assert_eq!(buyer, LOCAL_BUYER_WALLET);
        let examples = include_str!("../../examples/gpucluster.yaml");
        let wallets: Vec<&str> = examples
            .lines()
            .filter_map(|l| l.trim().strip_prefix("buyerWallet:"))
            .map(str::trim)
            .collect();
        assert!(!wallets.is_empty());
        assert!(wallets.iter().all(|w| *w == buyer), "{wallets:?}");
    }
}
