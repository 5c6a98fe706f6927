//! Settlement on Solana: buyers pay suppliers for every served GPU-second out of their cluster's
//! own escrow, exactly once, with what is left refunded; supplier reputation and stake.
//!
//! Money sits in accounts of its own ([`accounts`]): one escrow token account per GpuCluster,
//! one stake token account per node, at addresses anyone derives from the settlement authority.
//! What an escrow holds is its token balance; a payment can only move what its own account
//! holds; a refund empties and closes the escrow. The records of what was paid live where
//! settlement alone writes (GpuLease status, GpuCluster `status.escrow`, GpuOffer
//! `status.stake`), every write that moves money is conditional on the version read, and no
//! payment is ever signed whose idempotency key is already in its source account's history.
//!
//! The money logic is pure and tested without a chain: [`meter`] (GPU-seconds served, cost,
//! rounding, which period is due), [`escrow`] (deposit cover, exhaustion), [`stake`] (bonds,
//! returns, unbonding), [`protocol`] (the exactly-once decisions), [`transaction`]
//! (instructions, batching under the size limit), [`memo`] (idempotency keys), [`plan`] (what a
//! round pays, ends and refunds), [`earnings`] (what suppliers served and were paid, how far
//! payouts are behind) and [`reputation`]. [`chain`] is the thin RPC wiring, [`round`]
//! the Kubernetes wiring and [`events`] what the buyer is told; [`run`] repeats rounds.
//!
//! Usage: `Settler::new(config)` once, then `settler.deposit_status(uid, mint, required)` from the
//! GpuCluster reconcile (it opens the cluster's escrow), and `run(client, settler, metrics)`
//! beside the other controllers (on the leader only; a paused leader is fenced, see
//! [`Settler::fence_with`]).

pub mod accounts;
pub mod chain;
pub mod earnings;
pub mod escrow;
pub mod events;
pub mod memo;
pub mod meter;
pub mod plan;
pub mod pricing;
pub mod protocol;
pub mod reputation;
mod round;
pub mod stake;
pub mod transaction;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpumarket_crds::{GpuCluster, SettlementState};
use kube::api::{Api, Patch, PatchParams};
use solana_client::nonblocking::rpc_client::RpcClient;
use solana_commitment_config::CommitmentConfig;
use solana_keypair::Keypair;
use solana_pubkey::Pubkey;
use solana_signer::Signer;

use crate::runtime::leader::Fence;
use crate::runtime::metrics::Metrics;
pub use escrow::DepositStatus;
pub use round::RoundReport;
pub use stake::StakePolicy;

/// What settlement is configured with (the controller's `--rpc-url`, `--settlement-keypair`,
/// `--mint`, `--stablecoin`, `--settlement-period`, `--deposit-margin`, stake flags).
#[derive(Clone, Debug)]
pub struct SettlementConfig {
    pub rpc_url: String,
    /// File holding the settlement authority's keypair (JSON byte array, as `solana-keygen`
    /// writes it); mounted from a Secret in a cluster. Its content is never logged.
    pub keypair_path: PathBuf,
    /// The market's mint (base-58): stake is bonded in it; clusters that name no mint pay in it.
    pub mint: String,
    /// USD stablecoins (mints of 6 decimals) clusters may pay in instead, 1:1.
    pub stablecoins: Vec<Pubkey>,
    /// Leases are paid every period (and at their end).
    pub period: Duration,
    /// Deposits must cover the cluster's cost plus this many percent.
    pub deposit_margin_percent: u32,
    /// Time between settlement rounds.
    pub poll_interval: Duration,
    /// An offer whose heartbeat is older than this counts as down for its uptime.
    pub heartbeat_timeout: Duration,
    /// The market's fee, per mille of each payout (frozen in each lease's terms at binding).
    pub market_fee_permille: u32,
    pub stake: StakePolicy,
    /// Prices are in USD, converted at this feed's rate (see [`pricing`]); without it they are
    /// base units of the mint.
    pub price_feed: Option<pricing::PriceFeed>,
}

impl SettlementConfig {
    pub fn new(rpc_url: String, keypair_path: PathBuf, mint: String, period: Duration) -> Self {
        SettlementConfig {
            rpc_url,
            keypair_path,
            mint,
            stablecoins: Vec::new(),
            period,
            deposit_margin_percent: 0,
            poll_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(60),
            market_fee_permille: 0,
            stake: StakePolicy::default(),
            price_feed: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("settlement configuration: {0}")]
    Config(String),
    #[error("Solana RPC: {0}")]
    Rpc(#[from] chain::RpcError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building a settlement transaction: {0}")]
    Build(#[from] transaction::BuildError),
    #[error("the mint {0} is not an SPL Token mint on this cluster")]
    NotAMint(Pubkey),
    #[error("this replica no longer holds the leader election Lease; it pays nothing more")]
    Fenced,
    #[error("stopped at injected crash point {0:?}")]
    InjectedCrash(CrashPoint),
}

impl Error {
    /// Stable label for metrics and events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Rpc(_) => "rpc",
            Error::Kube(_) => "kube",
            Error::Build(_) => "build",
            Error::NotAMint(_) => "not_a_mint",
            Error::Fenced => "fenced",
            Error::InjectedCrash(_) => "injected_crash",
        }
    }

    /// What a buyer may be shown (conditions, Events): never the RPC URL, which often carries
    /// an API key; the full error is in the controller's log.
    pub fn public_message(&self) -> String {
        match self {
            Error::Rpc(_) => {
                "the Solana RPC endpoint did not answer; the controller's log has the details"
                    .into()
            }
            Error::Kube(_) => {
                "the Kubernetes API did not answer; the controller's log has the details".into()
            }
            other => other.to_string(),
        }
    }
}

/// Where a test may make a round stop dead, as if the controller crashed there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// A payout transaction is signed but not recorded.
    AfterSign,
    /// Recorded, not sent.
    AfterRecord,
    /// Sent, not yet confirmed.
    AfterSend,
}

/// Holds the RPC client, the settlement authority and what settlement has read of the chain.
pub struct Settler {
    rpc: RpcClient,
    authority: Keypair,
    mints: pricing::Mints,
    config: SettlementConfig,
    /// Each mint's decimals, read from the chain on first use.
    decimals: std::sync::Mutex<HashMap<Pubkey, u8>>,
    /// What was read of each escrow's and stake account's history (only to save work: losing
    /// it loses nothing).
    histories: tokio::sync::Mutex<HashMap<Pubkey, chain::AccountHistory>>,
    /// Held only while this replica leads; checked before anything is signed or sent.
    fence: Option<Fence>,
    state: Mutex<RoundState>,
}

/// What the settler remembers between rounds (only to save work: losing it loses nothing).
#[derive(Debug, Default)]
struct RoundState {
    crash_at: Option<CrashPoint>,
    last_reputation: Option<std::time::Instant>,
    anchored_hash: Option<String>,
    /// The configuration in force, as of the last round's start (see [`Settler::in_force`]).
    in_force: Option<SettlementConfig>,
}

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keypair (only its public half), never the RPC URL (it may carry a key).
        f.debug_struct("Settler")
            .field("authority", &self.authority.pubkey())
            .field("mints", &self.mints)
            .field("period", &self.config.period)
            .finish_non_exhaustive()
    }
}

impl Settler {
    /// Read the keypair and parse the configuration; no RPC call is made until first use.
    pub fn new(config: SettlementConfig) -> Result<Settler, Error> {
        let authority = solana_keypair::read_keypair_file(&config.keypair_path).map_err(|_| {
            // The error may quote the file: say only where and what is expected.
            Error::Config(format!(
                "{} is not a readable Solana keypair file (a JSON array of 64 bytes, as solana-keygen writes it)",
                config.keypair_path.display()
            ))
        })?;
        let market = config.mint.parse().map_err(|_| {
            Error::Config(format!("--mint {:?} is not a base-58 public key", config.mint))
        })?;
        let mints = pricing::Mints::new(market, &config.stablecoins);
        if config.period.is_zero() {
            return Err(Error::Config("--settlement-period must be longer than 0s".into()));
        }
        let rpc =
            RpcClient::new_with_commitment(config.rpc_url.clone(), CommitmentConfig::confirmed());
        Ok(Settler {
            rpc,
            authority,
            mints,
            config,
            decimals: std::sync::Mutex::new(HashMap::new()),
            histories: tokio::sync::Mutex::new(HashMap::new()),
            fence: None,
            state: Mutex::new(RoundState::default()),
        })
    }

    /// Sign and send only while `fence` holds (the leader election Lease of this replica), so
    /// that a leader paused past its Lease cannot resume a round beside the new leader.
    pub fn fence_with(mut self, fence: Fence) -> Settler {
        self.fence = Some(fence);
        self
    }

    pub fn authority(&self) -> Pubkey {
        self.authority.pubkey()
    }

    /// The configuration from the flags, before any MarketPolicy.
    pub fn config(&self) -> &SettlementConfig {
        &self.config
    }

    /// The configuration in force: the flags', with what the MarketPolicy sets on top, as read
    /// at the start of the last round. A lease's frozen terms take precedence over it.
    pub fn in_force(&self) -> SettlementConfig {
        self.lock_state().in_force.clone().unwrap_or_else(|| self.config.clone())
    }

    /// The mints this market accepts.
    pub fn mints(&self) -> &pricing::Mints {
        &self.mints
    }

    /// The authority, and `mint` with its decimals: what accounts of that mint are held with.
    pub async fn custody_of(&self, mint: Pubkey) -> Result<transaction::Custody, Error> {
        let known = crate::runtime::context::lock(&self.decimals).get(&mint).copied();
        let decimals = match known {
            Some(decimals) => decimals,
            None => {
                // Read without the lock: a slow RPC call holds up no other mint's custody.
                let read =
                    chain::mint_decimals(&self.rpc, &mint).await?.ok_or(Error::NotAMint(mint))?;
                *crate::runtime::context::lock(&self.decimals).entry(mint).or_insert(read)
            }
        };
        Ok(transaction::Custody { authority: self.authority.pubkey(), mint, decimals })
    }

    /// Custody of the market's own mint (stake accounts).
    pub async fn custody(&self) -> Result<transaction::Custody, Error> {
        self.custody_of(self.mints.market).await
    }

    /// How price units become `mint`'s tokens now: stablecoins and the market's mint without a
    /// price feed 1:1, the market's mint with one at the feed's price if it is fresh, certain
    /// and verified enough to pay at.
    pub async fn conversion_of(&self, mint: Pubkey) -> Result<pricing::Conversion, Error> {
        let decimals = self.custody_of(mint).await?.decimals;
        let feed = match &self.config.price_feed {
            Some(feed) if mint == self.mints.market => Some(
                chain::read_conversion(&self.rpc, feed, decimals, jiff::Timestamp::now()).await?,
            ),
            _ => None,
        };
        Ok(self.mints.conversion(&mint, decimals, feed))
    }

    /// Deposit a cluster of this hourly rate and duration must make, with the flags' margin
    /// (binding uses the margin in force, see `Context::lease_terms`).
    pub fn required_deposit(&self, hourly_rate: u64, duration: Duration) -> u64 {
        escrow::required_deposit(hourly_rate, duration, self.config.deposit_margin_percent)
    }

    /// The escrow account of the cluster with this uid (opened on chain, an account of `mint`,
    /// if it is not yet), and whether what it holds covers `required` (see
    /// [`Settler::required_deposit`]).
    pub async fn deposit_status(
        &self,
        cluster_uid: &str,
        mint: Pubkey,
        required: u64,
    ) -> Result<(Pubkey, DepositStatus), Error> {
        let custody = self.custody_of(mint).await?;
        let seed = accounts::escrow_seed(cluster_uid);
        let escrow = chain::open_account(&self.rpc, &self.authority, &custody, &seed).await?;
        let held = chain::token_accounts(&self.rpc, &[escrow]).await?;
        let balance = held.get(&escrow).copied().flatten().filter(|a| a.mint == mint);
        let balance = balance.map_or(0, |a| a.amount);
        Ok((escrow, DepositStatus::new(balance, required)))
    }

    /// Make the next rounds stop at `point` (tests of crash recovery); `None` to run normally.
    pub fn inject_crash(&self, point: Option<CrashPoint>) {
        self.lock_state().crash_at = point;
    }

    fn crash_if(&self, point: CrashPoint) -> Result<(), Error> {
        match self.lock_state().crash_at {
            Some(at) if at == point => Err(Error::InjectedCrash(point)),
            _ => Ok(()),
        }
    }

    /// Fail unless this replica still holds its fence (always, without leader election).
    async fn check_fence(&self) -> Result<(), Error> {
        match &self.fence {
            Some(fence) if !fence.holds().await => Err(Error::Fenced),
            _ => Ok(()),
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, RoundState> {
        crate::runtime::context::lock(&self.state)
    }
}

/// Held on every GpuCluster while settlement is on, so that a deleted cluster stays (with its
/// refund record) until its escrow is refunded and closed; released by the round that finds the
/// refund confirmed (or no escrow ever opened).
pub const FINALIZER: &str = "gpumarket.io/settlement";

/// Whether the cluster's refund is confirmed on chain (nothing more to settle for it).
pub fn refunded(cluster: &GpuCluster) -> bool {
    plan::refund_record(cluster).is_some_and(|r| r.state == SettlementState::Confirmed)
}

/// Add (`hold = true`) or remove the settlement finalizer. The patch carries the
/// resourceVersion it was computed from, so a concurrent change fails it with a conflict (the
/// caller retries) instead of being overwritten.
pub async fn set_finalizer(
    api: &Api<GpuCluster>,
    cluster: &GpuCluster,
    hold: bool,
) -> Result<(), kube::Error> {
    let current = cluster.metadata.finalizers.as_deref().unwrap_or_default();
    let Some(wanted) = finalizers_with(current, hold) else { return Ok(()) };
    let patch = serde_json::json!({"metadata": {
        "finalizers": wanted,
        "resourceVersion": cluster.metadata.resource_version,
    }});
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// `current` with the settlement finalizer held or not (others kept in order); `None` when it
/// already is.
fn finalizers_with(current: &[String], hold: bool) -> Option<Vec<String>> {
    if current.iter().any(|f| f == FINALIZER) == hold {
        return None;
    }
    let mut wanted: Vec<String> = current.iter().filter(|f| *f != FINALIZER).cloned().collect();
    if hold {
        wanted.push(FINALIZER.to_owned());
    }
    Some(wanted)
}

/// Most time between rounds while errors repeat.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Settle for as long as the future is polled: a round every poll interval; after an error
/// (validator unreachable, node behind, API conflict) the next round comes after a doubling
/// backoff. Every round starts from the records, so retrying is always safe.
///
/// Payouts of many leases share transactions, so a round looks at all leases at once rather
/// than reconciling one lease at a time.
pub async fn run(client: kube::Client, settler: Arc<Settler>, metrics: Arc<Metrics>) {
    let poll = settler.config.poll_interval;
    let mut wait = poll;
    loop {
        let round = settler.settle_round(&client).await;
        let actions = round.as_ref().map(RoundReport::actions);
        metrics.record_round(actions.as_ref().map(|a| a.as_slice()).map_err(|e| e.metric_label()));
        match round {
            Ok(report) => {
                if !report.is_idle() {
                    tracing::info!(?report, "settlement round");
                }
                wait = poll;
            }
            // Not leading (any more, or for a moment): look again soon, without backing off.
            Err(Error::Fenced) => {
                tracing::info!(
                    "settlement paused: this replica does not hold the leader election Lease"
                );
                wait = poll;
            }
            Err(e) => {
                tracing::warn!(error = %e, label = e.metric_label(), retry_in = ?wait, "settlement round failed");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalizer_is_added_or_removed_only_when_needed() {
        let list = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let other = "example.com/other";
        assert_eq!(finalizers_with(&[], true), Some(list(&[FINALIZER])));
        assert_eq!(finalizers_with(&list(&[FINALIZER, other]), true), None, "held, order kept");
        assert_eq!(finalizers_with(&list(&[other, FINALIZER]), false), Some(list(&[other])));
        assert_eq!(finalizers_with(&list(&[other]), false), None);
    }
}
