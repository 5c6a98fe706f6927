//! `kubectl gpumarket`: the buyer's and supplier's tool (the `kubectl-gpumarket` binary is a
//! thin `main` around [`run`]). It reads the market through the same kubeconfig rules as
//! kubectl and answers with the controller's own code: the matching engine for quotes, the
//! settlement's deposit rule and meter for money, its chain code for transfers.
//!
//! What each command computes is pure (`quote`, `status`, `earnings`), so it is tested without
//! a server; this module is the wiring: arguments, the API server, the chain, output.

pub mod earnings;
pub mod quote;
pub mod status;
pub mod wallet;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gpumarket_crds::common::parse_duration;
use gpumarket_crds::policy::POLICY_NAME;
use gpumarket_crds::{ClusterPhase, GpuCluster, GpuLease, GpuOffer, GpuTier, MarketPolicy};
use jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde::{Deserialize as _, Serialize};
use solana_pubkey::Pubkey;
use solana_signer::Signer;

use crate::fleet::offer_fleet;
use crate::market::supply::{
    gang_fleets, market_request, matchable_supply, placed_workers, waiting_requests,
};
use crate::matching::{self, Outcome};
use crate::runtime::context::Settings;
use crate::settlement::escrow::{DepositStatus, required_deposit};
use crate::settlement::pricing::{self, Conversion};
use crate::settlement::stake::{StakePolicy, parse_min_per_gpu};
use crate::settlement::{chain, memo};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-gpumarket",
    bin_name = "kubectl gpumarket",
    version,
    about = "gpumarket for buyers and suppliers: quotes, deposits, status, earnings, the Ray dashboard, stake"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// What every command shares: where the API server is, how to answer, and the controller's
/// market settings (the same flags and environment variables as `gpumarket-controller`, so a
/// quote is what the controller will do).
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Kubeconfig file (else $KUBECONFIG, ~/.kube/config, or in-cluster, as kubectl).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace (else the context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Output format for data: text for people, json or yaml for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Solana RPC endpoint of the market.
    #[arg(long, global = true, env = "SOLANA_RPC_URL")]
    pub rpc_url: Option<String>,
    /// The controller's --deposit-margin (percent above the cost a deposit must cover), where
    /// the MarketPolicy sets none.
    #[arg(long, global = true, env = "GPUMARKET_DEPOSIT_MARGIN", default_value_t = 0)]
    pub deposit_margin: u32,
    /// The controller's --min-stake-per-gpu (offers staked less are not matched), where the
    /// MarketPolicy sets none.
    #[arg(long, global = true, env = "GPUMARKET_MIN_STAKE_PER_GPU", default_value = "", value_parser = parse_min_per_gpu)]
    pub min_stake_per_gpu: BTreeMap<GpuTier, u64>,
    /// The controller's --heartbeat-timeout (offers silent for longer are not matched), where
    /// the MarketPolicy sets none.
    #[arg(long, global = true, env = "GPUMARKET_HEARTBEAT_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub heartbeat_timeout: Duration,
    #[command(flatten)]
    pub pricing: crate::settlement::pricing::PricingArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Price per hour and in total, the offers that would be matched (or why none, and what
    /// would change that) and the deposit needed, for GpuClusters not applied yet. Writes
    /// nothing.
    Quote {
        /// GpuCluster manifest (YAML or JSON; several documents are quoted one by one).
        #[arg(short = 'f', long)]
        filename: PathBuf,
    },
    /// Phase, leases (node, GPUs, served time, paid), cost so far, deposit left, refund, and
    /// why the cluster waits.
    Status { name: String },
    /// Send the deposit the cluster still needs from the buyer's keypair to its escrow, and wait
    /// for confirmation. Sends nothing when the escrow already covers it.
    Deposit {
        name: String,
        /// The buyer's keypair file (JSON byte array, as solana-keygen writes it).
        #[arg(long, env = "GPUMARKET_BUYER_KEYPAIR")]
        keypair: PathBuf,
        /// How long to wait for the controller to open the cluster's escrow.
        #[arg(long, default_value = "60s", value_parser = duration)]
        wait: Duration,
    },
    /// GPU-hours served, paid and pending, by GPU model and node, with reputation and stake.
    Earnings {
        /// The supplier's payout wallet (base-58); every wallet when absent.
        #[arg(long)]
        wallet: Option<String>,
    },
    /// Forward the cluster's Ray dashboard (and job submission API) to this machine until
    /// interrupted.
    Dashboard {
        name: String,
        /// Local port.
        #[arg(long, default_value_t = 8265)]
        port: u16,
    },
    /// Bond stake for a node from its offer's wallet.
    Stake {
        /// The node (its GpuOffer's name).
        node: String,
        /// Base units to bond.
        #[arg(long)]
        amount: u64,
        /// The offer wallet's keypair file.
        #[arg(long)]
        keypair: PathBuf,
    },
    /// Ask for a node's stake back: it returns to the wallet once the controller's unbonding
    /// cooldown has passed and no lease is active on the node.
    Unstake {
        node: String,
        /// The offer wallet's keypair file.
        #[arg(long)]
        keypair: PathBuf,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Run one command, writing what it answers to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let global = &cli.global;
    let (client, namespace) = connect(global).await?;
    let now = Timestamp::now();
    match &cli.command {
        Command::Quote { filename } => {
            let text = std::fs::read_to_string(filename)
                .with_context(|| format!("reading {}", filename.display()))?;
            let clusters = parse_clusters(&text, &namespace)
                .with_context(|| format!("{} is not a GpuCluster manifest", filename.display()))?;
            let market = Market::read(&client, global).await?;
            let quotes: Vec<quote::Quote> =
                clusters.iter().map(|c| market.quote_new(c, now)).collect::<anyhow::Result<_>>()?;
            emit(out, global.output, &quotes, |q| quote::render(q))
        }
        Command::Status { name } => {
            let cluster = get_cluster(&client, &namespace, name).await?;
            let leases = leases_of(&client, &cluster).await?;
            let conversion = escrow_conversion(global, &cluster, now).await?;
            let summary = status::summarize(&cluster, &leases, &conversion, now);
            emit(out, global.output, &summary, status::render)
        }
        Command::Deposit { name, keypair, wait } => {
            let report = deposit(&client, global, &namespace, name, keypair, *wait, now).await?;
            emit(out, global.output, &report, wallet::render_deposit)
        }
        Command::Earnings { wallet } => {
            let leases = Api::<GpuLease>::all(client.clone()).list(&ListParams::default()).await?;
            let offers = Api::<GpuOffer>::all(client.clone()).list(&ListParams::default()).await?;
            let report = crate::settlement::earnings::tally(
                &leases.items,
                &offers.items,
                wallet.as_deref(),
                now,
            );
            emit(out, global.output, &report, earnings::render)
        }
        Command::Dashboard { name, port } => {
            let cluster = get_cluster(&client, &namespace, name).await?;
            dashboard(&client, &namespace, &cluster, *port, out).await
        }
        Command::Stake { node, amount, keypair } => {
            let report = stake(&client, global, node, Some(*amount), keypair).await?;
            emit(out, global.output, &report, wallet::render_transfer)
        }
        Command::Unstake { node, keypair } => {
            let report = stake(&client, global, node, None, keypair).await?;
            emit(out, global.output, &report, wallet::render_transfer)
        }
    }
}

/// A client and the namespace to use, by kubectl's rules.
async fn connect(global: &Global) -> anyhow::Result<(Client, String)> {
    let options = KubeConfigOptions { context: global.context.clone(), ..Default::default() };
    let config = match &global.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None if global.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer().await.context("no kubeconfig found and not in a cluster")?,
    };
    let namespace = global.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

/// Write `value` as JSON, YAML or the text `render` makes of it.
fn emit<T: Serialize + ?Sized>(
    out: &mut (dyn Write + Send),
    format: Output,
    value: &T,
    render: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        Output::Text => out.write_all(render(value).as_bytes())?,
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        Output::Yaml => out.write_all(serde_yaml::to_string(value)?.as_bytes())?,
    }
    Ok(())
}

/// The GpuClusters of a manifest (every YAML document), in `namespace` unless they name one.
pub fn parse_clusters(text: &str, namespace: &str) -> anyhow::Result<Vec<GpuCluster>> {
    let mut clusters = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str).unwrap_or_default();
        if kind != "GpuCluster" {
            bail!("found a document of kind {kind:?}: quote reads GpuCluster manifests only");
        }
        let mut cluster: GpuCluster = serde_yaml::from_value(value)?;
        if cluster.metadata.namespace.is_none() {
            cluster.metadata.namespace = Some(namespace.to_owned());
        }
        clusters.push(cluster);
    }
    if clusters.is_empty() {
        bail!("no GpuCluster in it");
    }
    Ok(clusters)
}

/// The market as the controller sees it: offers, clusters, leases, and the rules in force (the
/// controller's flags as given here, with the live MarketPolicy on top, as the controller has
/// them).
struct Market {
    offers: Vec<GpuOffer>,
    clusters: Vec<GpuCluster>,
    leases: Vec<GpuLease>,
    settings: Settings,
    stake: StakePolicy,
    deposit_margin_percent: u32,
}

impl Market {
    async fn read(client: &Client, global: &Global) -> anyhow::Result<Market> {
        let all = ListParams::default();
        let policy = Api::<MarketPolicy>::all(client.clone()).get_opt(POLICY_NAME).await?;
        let policy = policy.as_ref().map(|p| &p.spec);
        let flags = Settings { heartbeat_timeout: global.heartbeat_timeout, ..Settings::default() };
        let stake =
            StakePolicy { min_per_gpu: global.min_stake_per_gpu.clone(), ..StakePolicy::default() };
        Ok(Market {
            offers: Api::<GpuOffer>::all(client.clone()).list(&all).await?.items,
            clusters: Api::<GpuCluster>::all(client.clone()).list(&all).await?.items,
            leases: Api::<GpuLease>::all(client.clone()).list(&all).await?.items,
            settings: crate::policy::effective(&flags, policy),
            stake: crate::policy::effective_stake(&stake, policy),
            deposit_margin_percent: policy
                .and_then(|p| p.deposit_margin_percent)
                .unwrap_or(global.deposit_margin),
        })
    }

    /// Free supply, as `Context::supply` has it: the offers the controller verified (their
    /// `Verified` condition), staked enough.
    fn supply(&self, now: Timestamp) -> Vec<matching::Offer> {
        let admitted = crate::verification::admitted;
        matchable_supply(&self.offers, admitted, &self.settings, Some(&self.stake), now)
    }

    /// The offers the controller's verification refuses that would otherwise be supply, and why.
    fn refused(&self, now: Timestamp) -> Vec<quote::Refused> {
        let refused = |o: &GpuOffer| !crate::verification::admitted(o);
        let supply =
            matchable_supply(&self.offers, refused, &self.settings, Some(&self.stake), now);
        let why = |node: &str| {
            let offer = self.offers.iter().find(|o| o.spec.node_name == node);
            let condition = offer.and_then(crate::verification::condition);
            condition.map_or_else(
                || "the controller has not verified it yet".to_owned(),
                |c| format!("{}: {}", c.reason, c.message),
            )
        };
        supply.into_iter().map(|offer| quote::Refused { why: why(&offer.node), offer }).collect()
    }

    /// The quote for a cluster applied now: it waits its turn behind every cluster already
    /// looking for GPUs, as the controller's bind does.
    fn quote_new(&self, cluster: &GpuCluster, now: Timestamp) -> anyhow::Result<quote::Quote> {
        let placed = placed_workers(&self.leases);
        let offers: HashMap<String, &GpuOffer> =
            self.offers.iter().map(|o| (o.name_any(), o)).collect();
        let fleets = gang_fleets(&self.leases, |name| {
            offers.get(name).map(|o| offer_fleet(o).map(str::to_owned))
        });
        let key = |c: &GpuCluster| (c.metadata.namespace.clone(), c.metadata.name.clone());
        let others = self.clusters.iter().filter(|c| key(c) != key(cluster));
        let queue = waiting_requests(others, &placed, &fleets);
        let mut request = market_request(cluster, cluster.spec.workers);
        request.created = now.as_second();
        let supply = self.supply(now);
        let hold = matching::HoldPolicy::at(now.as_second());
        let answer = |supply: &[matching::Offer], r: &matching::Request| {
            matching::match_in_turn(supply, &queue, r, hold)
        };
        let refused = self.refused(now);
        quote::quote(cluster, &request, &supply, &refused, answer, self.deposit_margin_percent)
    }
}

async fn get_cluster(client: &Client, namespace: &str, name: &str) -> anyhow::Result<GpuCluster> {
    Api::<GpuCluster>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?
        .with_context(|| format!("no GpuCluster {name} in namespace {namespace}"))
}

async fn leases_of(client: &Client, cluster: &GpuCluster) -> anyhow::Result<Vec<GpuLease>> {
    let uid = cluster.uid().unwrap_or_default();
    let selector = format!("{}={uid}", crate::market::binding::CLUSTER_UID_LABEL);
    let mut leases = Api::<GpuLease>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    leases.sort_by_key(ResourceExt::name_any);
    Ok(leases)
}

fn rpc(global: &Global) -> anyhow::Result<solana_client::nonblocking::rpc_client::RpcClient> {
    let url = global
        .rpc_url
        .clone()
        .context("--rpc-url (or SOLANA_RPC_URL) is needed: the market's Solana RPC endpoint")?;
    Ok(solana_client::nonblocking::rpc_client::RpcClient::new_with_commitment(
        url,
        solana_commitment_config::CommitmentConfig::confirmed(),
    ))
}

/// `deposit NAME`: exactly what the controller's funding check will ask for, once.
async fn deposit(
    client: &Client,
    global: &Global,
    namespace: &str,
    name: &str,
    keypair: &std::path::Path,
    wait: Duration,
    now: Timestamp,
) -> anyhow::Result<wallet::DepositReport> {
    let buyer = wallet::read_keypair(keypair)?;
    let cluster = get_cluster(client, namespace, name).await?;
    if let Some(why) = needs_no_deposit(&cluster) {
        bail!("GpuCluster {namespace}/{name} needs no deposit: {why}; nothing sent");
    }
    let duration = cluster.spec.duration().map_err(|e| anyhow::anyhow!("spec.duration: {e}"))?;
    let escrow = escrow_of(client, namespace, name, wait).await?;
    let market = Market::read(client, global).await?;
    // The controller's funding check: the cluster's quote on the free supply, then the deposit
    // rule of settlement.
    let request = market_request(&cluster, cluster.spec.workers);
    let hourly = match matching::quote(&market.supply(now), &request) {
        Outcome::Matched(assignment) => assignment.hourly_cost(),
        Outcome::Unmatched(why) => bail!(
            "GpuCluster {namespace}/{name} matches no supply now, so no deposit is asked yet \
             (nothing sent): {why}"
        ),
    };
    let cost = required_deposit(hourly, duration, market.deposit_margin_percent);
    let rpc = rpc(global)?;
    let held = wallet::token_balance(&rpc, &escrow).await?;
    let conversion = conversion_of(&rpc, global, &held, now).await?;
    let Some(required) = conversion.tokens(cost) else {
        bail!(
            "the market pays at a price feed that cannot be paid at now, so no deposit can be \
             worked out (nothing sent): {}",
            conversion.paused().unwrap_or_default()
        );
    };
    let sent = match DepositStatus::new(held.amount, required) {
        DepositStatus::Covered { .. } => None,
        DepositStatus::Short { missing, .. } => {
            let memo = format!("gpumarket deposit {namespace}/{name}");
            Some(wallet::transfer(&rpc, &buyer, &escrow, missing, &memo).await?)
        }
    };
    let after = wallet::token_balance(&rpc, &escrow).await?;
    Ok(wallet::DepositReport {
        cluster: format!("{namespace}/{name}"),
        escrow: escrow.to_string(),
        hourly_rate: hourly,
        required,
        held_before: held.amount,
        sent: sent.as_ref().map_or(0, |s| s.amount),
        signature: sent.map(|s| s.signature),
        balance: after.amount,
        decimals: after.decimals,
    })
}

/// How price units become the tokens `held` is of, as the controller converts: the escrow is an
/// account of the mint the cluster pays in, a stablecoin 1:1, the market's own at its feed's
/// rate.
async fn conversion_of(
    rpc: &solana_client::nonblocking::rpc_client::RpcClient,
    global: &Global,
    held: &wallet::Balance,
    now: Timestamp,
) -> anyhow::Result<Conversion> {
    let stablecoins = global.pricing.stablecoins().map_err(anyhow::Error::msg)?;
    Ok(match global.pricing.feed().map_err(anyhow::Error::msg)? {
        _ if stablecoins.contains(&held.mint) => pricing::stablecoin(&held.mint, held.decimals),
        None => Conversion::OneToOne,
        Some(feed) => chain::read_conversion(rpc, &feed, held.decimals, now).await?,
    })
}

/// How `cluster`'s escrow converts now: 1:1 in a market without a price feed (no RPC call),
/// else as [`conversion_of`] its escrow account.
async fn escrow_conversion(
    global: &Global,
    cluster: &GpuCluster,
    now: Timestamp,
) -> anyhow::Result<Conversion> {
    let escrow = cluster.status.as_ref().and_then(|s| s.escrow.as_ref());
    let Some(account) = escrow.and_then(|e| e.account.parse::<Pubkey>().ok()) else {
        return Ok(Conversion::OneToOne); // nothing held yet
    };
    if global.pricing.price_feed.is_none() {
        return Ok(Conversion::OneToOne);
    }
    let rpc = rpc(global)?;
    match wallet::token_balance(&rpc, &account).await {
        Ok(held) => conversion_of(&rpc, global, &held, now).await,
        // Closed by its refund, or unreadable now: its worth is not known.
        Err(e) => Ok(Conversion::Paused(format!("escrow {account}: {e:#}"))),
    }
}

/// Why a cluster takes no deposit now, if it does not: it ended, is going, or was funded and
/// bound already.
fn needs_no_deposit(cluster: &GpuCluster) -> Option<String> {
    if cluster.metadata.deletion_timestamp.is_some() {
        return Some("it is being deleted".into());
    }
    let status = cluster.status.as_ref()?;
    match status.phase.unwrap_or_default() {
        ClusterPhase::Completed | ClusterPhase::Failed | ClusterPhase::Expiring => {
            Some(format!("it has ended ({:?})", status.phase.unwrap_or_default()))
        }
        _ if status.start_time.is_some() => {
            Some("its GPUs are bound; the deposit was checked at the bind".into())
        }
        _ => None,
    }
}

/// The cluster's escrow account, once the controller has opened it (`status.escrow.account`).
async fn escrow_of(
    client: &Client,
    namespace: &str,
    name: &str,
    wait: Duration,
) -> anyhow::Result<Pubkey> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let cluster = get_cluster(client, namespace, name).await?;
        if let Some(escrow) = cluster.status.and_then(|s| s.escrow) {
            return escrow
                .account
                .parse()
                .with_context(|| format!("status.escrow.account {:?}", escrow.account));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "GpuCluster {namespace}/{name} has no escrow account after {wait:?}: settlement \
                 opens it once the cluster matches (is the controller running with --rpc-url?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `stake` (an amount) or `unstake` (none): a transfer from the offer's own wallet to the node's
/// stake account; only the offer's wallet can bond, anything else is returned to its sender.
async fn stake(
    client: &Client,
    global: &Global,
    node: &str,
    amount: Option<u64>,
    keypair: &std::path::Path,
) -> anyhow::Result<wallet::TransferReport> {
    let owner = wallet::read_keypair(keypair)?;
    let offer = Api::<GpuOffer>::all(client.clone())
        .get_opt(node)
        .await?
        .with_context(|| format!("no GpuOffer {node}"))?;
    if owner.pubkey().to_string() != offer.spec.wallet {
        bail!(
            "{} is not the wallet of GpuOffer {node} ({}): stake from any other wallet is sent \
             back; use the offer wallet's keypair",
            owner.pubkey(),
            offer.spec.wallet
        );
    }
    let account = offer
        .status
        .as_ref()
        .and_then(|s| s.stake.as_ref())
        .with_context(|| {
            format!("GpuOffer {node} has no stake account yet (settlement opens it; is the controller running with --rpc-url?)")
        })?
        .account
        .parse::<Pubkey>()?;
    // Unbonding is asked for with one base unit and the unbond memo (it is returned with the
    // stake).
    let (amount, memo) = match amount {
        Some(0) => bail!("--amount must be more than 0"),
        Some(amount) => (amount, format!("gpumarket stake {node}")),
        None => (1, memo::UNBOND.to_owned()),
    };
    let rpc = rpc(global)?;
    let sent = wallet::transfer(&rpc, &owner, &account, amount, &memo).await?;
    let after = wallet::token_balance(&rpc, &account).await?;
    Ok(wallet::TransferReport {
        to: account.to_string(),
        what: if memo == memo::UNBOND { "unbond request".into() } else { "stake".into() },
        amount: sent.amount,
        signature: sent.signature,
        balance: after.amount,
        decimals: after.decimals,
    })
}

/// Why `dashboard` cannot forward to the cluster's head, and where it is reached instead: the
/// head runs in a fleet's own cluster.
fn not_forwarded_here(cluster: &GpuCluster) -> Option<String> {
    let status = cluster.status.clone().unwrap_or_default();
    let fleet = status.fleet?;
    let at = status.dashboard.unwrap_or_else(|| "not reported yet".into());
    let reached = status::reached_in_fleet(&fleet, status.through_hub == Some(true));
    Some(format!(
        "{} runs in fleet {fleet}'s own cluster, not forwarded from here: its dashboard is {at} ({reached})",
        cluster.name_any()
    ))
}

/// Forward local `port` to the Ray head's dashboard port until interrupted.
async fn dashboard(
    client: &Client,
    namespace: &str,
    cluster: &GpuCluster,
    port: u16,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    if let Some(why) = not_forwarded_here(cluster) {
        anyhow::bail!(why);
    }
    let ray = crate::raycluster::ray_cluster_name(cluster);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("ray.io/cluster={ray},ray.io/node-type=head");
    let head = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .next()
        .with_context(|| {
            format!(
                "no Ray head pod of RayCluster {ray} yet (see `kubectl gpumarket status {}`)",
                cluster.name_any()
            )
        })?
        .name_any();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{port} (choose another with --port)"))?;
    let local = listener.local_addr()?;
    writeln!(out, "Ray dashboard:        http://{local}")?;
    writeln!(
        out,
        "Ray job submission:   ray job submit --address http://{local} -- python job.py"
    )?;
    writeln!(
        out,
        "(forwarding to pod {namespace}/{head}:{}; Ctrl-C to stop)",
        crate::raycluster::DASHBOARD_PORT
    )?;
    out.flush()?;
    loop {
        let (mut socket, _) = listener.accept().await?;
        let (pods, head) = (pods.clone(), head.clone());
        tokio::spawn(async move {
            let forwarded = async {
                let mut forwarder =
                    pods.portforward(&head, &[crate::raycluster::DASHBOARD_PORT]).await?;
                let mut upstream = forwarder
                    .take_stream(crate::raycluster::DASHBOARD_PORT)
                    .context("no stream for the dashboard port")?;
                tokio::io::copy_bidirectional(&mut socket, &mut upstream).await?;
                anyhow::Ok(())
            };
            if let Err(e) = forwarded.await {
                eprintln!("forwarding a connection: {e:#}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleets_dashboard_is_refused_with_where_it_is_reached() {
        let mut cluster = crate::testing::mk_cluster("c", 1, 1);
        assert_eq!(not_forwarded_here(&cluster), None, "on the hub's nodes: forwarded");
        cluster.status = Some(gpumarket_crds::GpuClusterStatus {
            dashboard: Some("http://ray-head-u.ray.svc:8265".into()),
            fleet: Some("fleet-a".into()),
            ..Default::default()
        });
        let why = not_forwarded_here(&cluster).expect("in a fleet");
        assert!(why.contains(
            "dashboard is http://ray-head-u.ray.svc:8265 (in fleet fleet-a's cluster: ask its operator"
        ));
        let status = cluster.status.as_mut().expect("set above");
        status.dashboard = Some("http://10.0.0.5:31000".into());
        status.through_hub = Some(true);
        let why = not_forwarded_here(&cluster).expect("in a fleet");
        assert!(
            why.contains("dashboard is http://10.0.0.5:31000 (the hub's gateway to fleet fleet-a")
        );
    }
}
