//! `gpumarket-fleet`: a Kubernetes GPU cluster joins a gpumarket hub from outside (see the
//! library's `fleet` module). `run` in the fleet's cluster, with the hub's join kubeconfig;
//! `join` on the hub admin's side prints the objects that make the join credential.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpumarket_crds::common::{parse_duration, quantity_scaled};
use gpumarket_device_plugin::config::WalletKey;
use gpumarket_device_plugin::fleet::tunnel::TunnelSettings;
use gpumarket_device_plugin::fleet::{self, FleetConfig};
use gpumarket_device_plugin::offer::Reserve;
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use secrecy::ExposeSecret;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "gpumarket-fleet",
    version,
    about = "Join a Kubernetes GPU cluster to a gpumarket hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Offer this cluster's GPU nodes on the hub and run the work placed on them here.
    Run(Box<RunArgs>),
    /// Print (as YAML) what the hub admin applies on the hub for fleet NAME: its GpuFleet, the
    /// ServiceAccount whose token is the join credential, and its RBAC.
    Join {
        name: String,
        /// Wallet (base-58) that receives the fleet's payouts.
        #[arg(long)]
        wallet: String,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Name of this fleet's GpuFleet on the hub.
    #[arg(long, env = "GPUMARKET_FLEET")]
    fleet: String,
    /// Kubeconfig of the hub holding the join credential (the fleet's ServiceAccount token).
    #[arg(long, env = "GPUMARKET_HUB_KUBECONFIG")]
    hub_kubeconfig: PathBuf,
    /// Keypair file of the GpuFleet's wallet (a Solana keypair: JSON array of 64 bytes, as
    /// `solana-keygen new` writes it): it signs every offer the fleet publishes.
    #[arg(long, env = "GPUMARKET_WALLET_KEYPAIR")]
    wallet_keypair: PathBuf,
    /// Price per GPU-hour of a model in base units of the mint, e.g. `--price H100=2200000`.
    #[arg(
        long = "price",
        value_name = "MODEL=UNITS",
        env = "GPUMARKET_PRICES",
        value_delimiter = ','
    )]
    prices: Vec<String>,
    /// Region of the offers (default: each node's topology.kubernetes.io/region label).
    #[arg(long, env = "GPUMARKET_REGION")]
    region: Option<String>,
    /// Zone of the offers (default: each node's topology.kubernetes.io/zone label).
    #[arg(long, env = "GPUMARKET_ZONE")]
    zone: Option<String>,
    /// Namespace of this cluster that the workers run in.
    #[arg(long, default_value = "gpumarket-workloads", env = "GPUMARKET_WORKLOAD_NAMESPACE")]
    namespace: String,
    /// How often offers and the GpuFleet are heartbeated, e.g. `20s`.
    #[arg(long, default_value = "20s", value_parser = duration, env = "GPUMARKET_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Duration,
    /// How often the workers in this cluster are checked, e.g. `2s` (local reads only).
    #[arg(long, default_value = "2s", value_parser = duration, env = "GPUMARKET_WORKLOAD_CHECK")]
    workload_check: Duration,
    /// CPU of each node kept out of its offer, e.g. `500m`.
    #[arg(long, default_value = "0", env = "GPUMARKET_RESERVE_CPU")]
    reserve_cpu: String,
    /// Memory of each node kept out of its offer, e.g. `1Gi`.
    #[arg(long, default_value = "0", env = "GPUMARKET_RESERVE_MEMORY")]
    reserve_memory: String,
    /// The hub's tunnel endpoint (its controller's `--tunnel-listen`), e.g.
    /// `https://hub.example.net:9444`: buyers on the hub then reach the Ray heads run here
    /// through it. The fleet authenticates with the join credential's token.
    #[arg(long, env = "GPUMARKET_HUB_TUNNEL")]
    hub_tunnel: Option<String>,
    /// CA certificate (PEM) of the hub tunnel's certificate.
    #[arg(long, env = "GPUMARKET_HUB_TUNNEL_CA", requires = "hub_tunnel")]
    hub_tunnel_ca: Option<PathBuf>,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpumarket-fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let args = match cli.command {
        Command::Join { name, wallet } => {
            let mut yaml = String::new();
            for object in fleet::join::join_objects(&name, &wallet).map_err(anyhow::Error::msg)? {
                yaml.push_str(&format!("---\n{}", serde_yaml::to_string(&object)?));
            }
            // Written, not printed: a closed pipe (`| head`) is an error, not a panic.
            std::io::Write::write_all(&mut std::io::stdout().lock(), yaml.as_bytes())?;
            return Ok(());
        }
        Command::Run(args) => *args,
    };
    let reserve = Reserve {
        cpu_millicores: quantity_scaled(&args.reserve_cpu, 3)
            .context("--reserve-cpu: write a CPU quantity such as 500m")?,
        memory_bytes: quantity_scaled(&args.reserve_memory, 0)
            .context("--reserve-memory: write a memory quantity such as 1Gi")?,
    };
    let hub = Kubeconfig::read_from(&args.hub_kubeconfig)
        .with_context(|| format!("reading the hub kubeconfig {}", args.hub_kubeconfig.display()))?;
    let hub = kube::Config::from_custom_kubeconfig(hub, &KubeConfigOptions::default()).await?;
    let tunnel = match args.hub_tunnel {
        None => None,
        Some(endpoint) => Some(TunnelSettings {
            endpoint,
            ca_pem: match &args.hub_tunnel_ca {
                Some(path) => Some(
                    std::fs::read(path)
                        .with_context(|| format!("reading --hub-tunnel-ca {}", path.display()))?,
                ),
                None => None,
            },
            token: join_token(&hub.auth_info)?,
        }),
    };
    let hub = kube::Client::try_from(hub)?;
    let local = kube::Client::try_default()
        .await
        .context("no client for this cluster (in-cluster or kubeconfig)")?;
    let config = FleetConfig {
        name: args.fleet,
        wallet_key: WalletKey::read(&args.wallet_keypair)?,
        prices: args.prices,
        region: args.region,
        zone: args.zone,
        heartbeat: args.heartbeat_interval,
        workload_check: args.workload_check,
        namespace: args.namespace,
        reserve,
        tunnel,
    };
    tokio::select! {
        result = fleet::run(local, hub, config) => result?,
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    Ok(())
}

/// The join credential's token, from the hub kubeconfig's user: the tunnel authenticates with it.
fn join_token(user: &AuthInfo) -> anyhow::Result<String> {
    if let Some(token) = &user.token {
        return Ok(token.expose_secret().to_owned());
    }
    let file = user.token_file.as_ref().context(
        "--hub-tunnel: the hub kubeconfig's user has no token; the tunnel authenticates with the join credential's ServiceAccount token",
    )?;
    let token =
        std::fs::read_to_string(file).with_context(|| format!("reading token file {file}"))?;
    Ok(token.trim().to_owned())
}
