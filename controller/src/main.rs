//! `gpumarket-controller`: flags (with environment fallbacks) parsed once, then the library's
//! `run`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Identity;

use gpumarket_controller::fleet::tunnel::TunnelConfig;
use gpumarket_controller::market::proof::ProofSettings;
use gpumarket_controller::raycluster::HeadPlacement;
use gpumarket_controller::runtime::leader::Fence;
use gpumarket_controller::settlement::stake::parse_min_per_gpu;
use gpumarket_controller::settlement::{SettlementConfig, Settler, StakePolicy};
use gpumarket_controller::simulate::Simulation;
use gpumarket_controller::{Config, LeaderElection, Settings};
use gpumarket_crds::GpuTier;
use gpumarket_crds::common::parse_duration;

#[derive(Parser, Debug)]
#[command(
    name = "gpumarket-controller",
    version,
    about = "gpumarket controller: GpuCluster lifecycle on KubeRay"
)]
struct Args {
    /// Kubeconfig file; in-cluster configuration (or ~/.kube/config) when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,

    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "GPUMARKET_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// A supplier node that has not heartbeated for this long is treated as failed (e.g. 60s, 2m).
    #[arg(long, env = "GPUMARKET_HEARTBEAT_TIMEOUT", default_value = "60s", value_parser = duration)]
    heartbeat_timeout: Duration,

    /// A lease whose workers are not all Ready this long after the bind ends as a supplier
    /// failure, unbilled, and its workers are placed elsewhere (e.g. 10m).
    #[arg(long, env = "GPUMARKET_PROVISIONING_TIMEOUT", default_value = "10m", value_parser = duration)]
    provisioning_timeout: Duration,

    /// Ray heads run only on nodes with this label (KEY=VALUE, repeatable); by default on any
    /// node without a taint.
    #[arg(long = "head-node-selector", env = "GPUMARKET_HEAD_NODE_SELECTOR", value_delimiter = ',', value_parser = parse_label)]
    head_node_selector: Vec<(String, String)>,

    /// Ray heads tolerate taints with this key (repeatable), e.g. gpumarket.io/supplier where the
    /// only nodes are suppliers' (an all-in-one cluster).
    #[arg(long = "head-toleration", env = "GPUMARKET_HEAD_TOLERATIONS", value_delimiter = ',')]
    head_tolerations: Vec<String>,
    /// Match only offers signed by their wallet's key (the agent's --wallet-keypair); with
    /// `--require-signed-offers=false` unsigned offers are matched too. An offer whose
    /// signature does not verify is never matched.
    #[arg(long, env = "GPUMARKET_REQUIRE_SIGNED_OFFERS", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    require_signed_offers: bool,

    /// Elect a leader through a coordination.k8s.io Lease before reconciling and settling, so
    /// that two replicas (a rolling update's surge pod among them) never pay at once; turn off
    /// with `--leader-election=false` only where one process can ever run.
    #[arg(long, env = "GPUMARKET_LEADER_ELECTION", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    leader_election: bool,

    /// The controller's own namespace: where its leader-election Lease and its records (the
    /// offers' signing times) are.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "GPUMARKET_LEADER_ELECTION_LEASE", default_value = "gpumarket-controller")]
    leader_election_lease: String,

    /// This replica's identity in the election (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,

    /// How long a leader holds the Lease without renewing it (e.g. 15s).
    #[arg(long, env = "GPUMARKET_LEADER_ELECTION_DURATION", default_value = "15s", value_parser = duration)]
    leader_election_duration: Duration,

    /// Solana RPC endpoint; settlement (and the deposit check before provisioning) is off
    /// without it.
    #[arg(long, env = "GPUMARKET_RPC_URL")]
    rpc_url: Option<String>,

    /// Keypair file (JSON byte array) of the settlement authority; required with --rpc-url.
    #[arg(long, env = "GPUMARKET_SETTLEMENT_KEYPAIR")]
    settlement_keypair: Option<std::path::PathBuf>,

    /// Settlement mint (base-58); required with --rpc-url.
    #[arg(long, env = "GPUMARKET_MINT")]
    mint: Option<String>,

    #[command(flatten)]
    pricing: gpumarket_controller::settlement::pricing::PricingArgs,

    /// Leases are paid every period (e.g. 10m, 1h).
    #[arg(long, env = "GPUMARKET_SETTLEMENT_PERIOD", default_value = "1h", value_parser = duration)]
    settlement_period: Duration,

    /// Deposits must cover the cluster's cost plus this many percent.
    #[arg(long, env = "GPUMARKET_DEPOSIT_MARGIN", default_value_t = 0)]
    deposit_margin: u32,

    /// The market's fee, per mille of each payout, frozen in each lease's terms at binding.
    #[arg(long, env = "GPUMARKET_MARKET_FEE_PERMILLE", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=500))]
    market_fee_permille: u32,

    /// Minimum stake per GPU by tier, in base units (e.g. H100=5000000,A100=2000000): with
    /// settlement on, offers staked less are not matched.
    #[arg(long, env = "GPUMARKET_MIN_STAKE_PER_GPU", default_value = "", value_parser = parse_min_per_gpu)]
    min_stake_per_gpu: BTreeMap<GpuTier, u64>,

    /// Share of a node's remaining stake slashed to the buyer per supplier failure, per mille.
    #[arg(long, env = "GPUMARKET_SLASH_PERMILLE", default_value_t = 0)]
    slash_permille: u32,

    /// How long a node's stake stays bonded (and slashable) after its wallet asks to unbond.
    #[arg(long, env = "GPUMARKET_UNBOND_COOLDOWN", default_value = "24h", value_parser = duration)]
    unbond_cooldown: Duration,

    /// Challenge idle offers this often to prove their GPUs compute what they claim (e.g. 1h);
    /// off when absent. An offer that answers late or wrong is not matched until it passes.
    #[arg(long, env = "GPUMARKET_COMPUTE_CHALLENGE_INTERVAL", value_parser = duration)]
    compute_challenge_interval: Option<Duration>,

    /// Serve fleets' tunnels here (gRPC, e.g. 0.0.0.0:9444), through which buyers reach the Ray
    /// heads of clusters running in fleets; off when absent (their status then shows the heads'
    /// addresses inside the fleet).
    #[arg(long, env = "GPUMARKET_TUNNEL_LISTEN")]
    tunnel_listen: Option<SocketAddr>,

    /// TLS certificate (PEM) of the tunnel; required unless it listens on loopback.
    #[arg(long, env = "GPUMARKET_TUNNEL_TLS_CERT", requires = "tunnel_tls_key")]
    tunnel_tls_cert: Option<std::path::PathBuf>,

    /// TLS private key (PEM) of the tunnel.
    #[arg(long, env = "GPUMARKET_TUNNEL_TLS_KEY", requires = "tunnel_tls_cert")]
    tunnel_tls_key: Option<std::path::PathBuf>,

    /// The hub address (IPv4) buyers reach the tunnel's gateways on: the pod's IP in a cluster.
    #[arg(long, env = "GPUMARKET_TUNNEL_GATEWAY_ADDRESS", default_value = "127.0.0.1")]
    tunnel_gateway_address: std::net::Ipv4Addr,

    /// The ports the tunnel's gateways take theirs from, two per cluster in a fleet, e.g.
    /// `30000-30999` (what a NetworkPolicy opens); any free port when absent.
    #[arg(long, env = "GPUMARKET_TUNNEL_GATEWAY_PORTS", value_parser = port_range)]
    tunnel_gateway_ports: Option<std::ops::RangeInclusive<u16>>,

    /// The selector-less Service (of --namespace) fleets reach the tunnel through: the leader
    /// points its EndpointSlice at --tunnel-gateway-address, so that no fleet reaches a standby.
    #[arg(long, env = "GPUMARKET_TUNNEL_SERVICE", requires = "tunnel_listen")]
    tunnel_service: Option<String>,

    /// Also act as the agent of every node labelled gpumarket.io/gpu-model (KWOK nodes in the
    /// local environment): publish and heartbeat its GpuOffer.
    #[arg(long, env = "GPUMARKET_SIMULATE_SUPPLIERS")]
    simulate_suppliers: bool,

    /// Price per GPU-hour of simulated suppliers, in base units of the mint.
    #[arg(long, default_value_t = 2_000_000)]
    simulated_price: u64,

    /// Keypair file of the wallet simulated suppliers are paid to and sign their offers with;
    /// a new wallet, known to this process only, when absent.
    #[arg(long)]
    simulated_wallet_keypair: Option<std::path::PathBuf>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let parsed =
        s.split_once('-').and_then(|(low, high)| Some((low.parse().ok()?, high.parse().ok()?)));
    match parsed {
        Some((low, high)) if low > 0 && low <= high => Ok(low..=high),
        _ => Err(format!("expected FIRST-LAST ports, e.g. 30000-30999, got {s:?}")),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// The tunnel's settings from the flags, its TLS identity read.
fn tunnel_config(args: &Args) -> anyhow::Result<Option<TunnelConfig>> {
    let Some(listen) = args.tunnel_listen else { return Ok(None) };
    let tls = match (&args.tunnel_tls_cert, &args.tunnel_tls_key) {
        (Some(cert), Some(key)) => {
            let read = |path: &std::path::Path| {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            };
            Some(Identity::from_pem(read(cert)?, read(key)?))
        }
        _ if listen.ip().is_loopback() => None,
        _ => anyhow::bail!(
            "--tunnel-listen {listen} is not loopback: give --tunnel-tls-cert and --tunnel-tls-key (the fleets send their credentials)"
        ),
    };
    Ok(Some(TunnelConfig {
        listen,
        tls,
        gateway_address: args.tunnel_gateway_address,
        gateway_ports: args.tunnel_gateway_ports.clone(),
        service: args.tunnel_service.clone(),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();

    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig and not in a cluster")?,
    };
    let client = gpumarket_controller::client(config)?;

    let leader_election = args.leader_election.then(|| LeaderElection {
        namespace: args.namespace.clone(),
        lease_name: args.leader_election_lease.clone(),
        identity: args.leader_election_identity.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "gpumarket".into()),
                std::process::id()
            )
        }),
        lease_duration: args.leader_election_duration,
    });
    let config = Config {
        settings: Settings {
            heartbeat_timeout: args.heartbeat_timeout,
            provisioning_timeout: args.provisioning_timeout,
            head_placement: HeadPlacement {
                node_selector: args.head_node_selector.iter().cloned().collect(),
                tolerated_taints: args.head_tolerations.clone(),
            },
            proof_of_compute: args
                .compute_challenge_interval
                .map(|interval| ProofSettings { interval, ..ProofSettings::default() }),
            require_signed_offers: args.require_signed_offers,
            ..Settings::default()
        },
        namespace: args.namespace.clone(),
        metrics_addr: Some(args.metrics_addr),
        leader_election,
        shutdown: CancellationToken::new(),
        tunnel: tunnel_config(&args)?,
    };
    let shutdown = config.shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });

    if args.simulate_suppliers {
        let wallet = match &args.simulated_wallet_keypair {
            Some(path) => solana_keypair::read_keypair_file(path).map_err(|e| {
                anyhow::anyhow!("--simulated-wallet-keypair {}: {e}", path.display())
            })?,
            None => solana_keypair::Keypair::new(),
        };
        let simulation = Simulation {
            price_per_gpu_hour: args.simulated_price,
            wallet: Arc::new(wallet),
            heartbeat: args.heartbeat_timeout / 4,
        };
        tracing::info!(
            "simulating suppliers for nodes labelled {}",
            gpumarket_controller::simulate::MODEL_LABEL
        );
        tokio::spawn(gpumarket_controller::simulate::run(client.clone(), simulation));
    }

    let settler = match &args.rpc_url {
        None => None,
        Some(rpc_url) => {
            let keypair = args.settlement_keypair.clone().context(
                "--rpc-url needs --settlement-keypair (the settlement authority's keypair file)",
            )?;
            let mint = args
                .mint
                .clone()
                .context("--rpc-url needs --mint (the settlement mint, base-58)")?;
            let mut settlement =
                SettlementConfig::new(rpc_url.clone(), keypair, mint, args.settlement_period);
            settlement.deposit_margin_percent = args.deposit_margin;
            settlement.market_fee_permille = args.market_fee_permille;
            settlement.price_feed = args.pricing.feed().map_err(anyhow::Error::msg)?;
            settlement.stablecoins = args.pricing.stablecoins().map_err(anyhow::Error::msg)?;
            settlement.heartbeat_timeout = args.heartbeat_timeout;
            settlement.stake = StakePolicy {
                min_per_gpu: args.min_stake_per_gpu.clone(),
                slash_permille: args.slash_permille,
                unbond_cooldown: args.unbond_cooldown,
            };
            let settler = Settler::new(settlement).context("settlement")?;
            // The leader alone pays, and only while it provably still leads.
            let settler = match &config.leader_election {
                Some(election) => settler.fence_with(Fence::new(client.clone(), election)),
                None => settler,
            };
            Some(Arc::new(settler))
        }
    };

    let stopped = match settler {
        Some(settler) => gpumarket_controller::run_settling(client, config, settler).await,
        None => {
            tracing::info!("no --rpc-url: settlement is off");
            gpumarket_controller::run(client, config).await
        }
    };
    stopped.context("controller stopped")
}

/// SIGINT or SIGTERM (what the kubelet sends).
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the controller");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
