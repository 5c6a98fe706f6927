//! `gpumarket-env up`: the local environment (control plane, KWOK GPU nodes, KubeRay CRDs,
//! Solana validator with the settlement mint and wallets), until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gpumarket_tests::node_mix::NodeMix;
use gpumarket_tests::{Coordinates, Env, EnvOptions, tools};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "gpumarket's local environment")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the environment, write its kubeconfig and env file, run until Ctrl-C.
    Up(Up),
    /// Print the IPv4 addresses a DNS server answers for a name, one a line (none for
    /// NXDOMAIN); e.g. from a pod's network namespace with `nsenter --net=<netns>`.
    Resolve {
        /// The server, e.g. the real node's CoreDNS (`10.244.0.1:53`).
        #[arg(long)]
        server: std::net::SocketAddr,
        name: String,
    },
}

#[derive(clap::Args)]
struct Up {
    /// Fake GPU nodes as MODEL=NODESxGPUS, comma separated.
    #[arg(long, default_value = "h100=4x8,a100=4x8,rtx4090=8x1")]
    nodes: NodeMix,
    /// Regions the nodes are dealt over, round-robin.
    #[arg(long, value_delimiter = ',', default_value = "eu-west,us-east")]
    regions: Vec<String>,
    /// Zones per region (`<region>-a`, `<region>-b`, ...).
    #[arg(long, default_value_t = 2)]
    zones_per_region: u32,
    /// Directory of the environment (kubeconfig, env file, logs); removed when it stops.
    /// Default: ${GPUMARKET_CACHE:-~/.cache/gpumarket}/env.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the directory (logs, etcd data, ledger) after stopping.
    #[arg(long)]
    keep_dir: bool,
    /// Also run the market (with a real node): the chart's controller and supplier agent as
    /// pods on the real node, a simulated supplier agent per KWOK node, the KubeRay operator,
    /// and a buyer's GpuCluster with its deposit whose Ray cluster runs on the real node.
    #[arg(long)]
    demo: bool,
    /// Also start a real node (containerd, kubelet, a CNI bridge, CoreDNS) that runs pods;
    /// needs root.
    #[arg(long)]
    real_node: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Up(up) => run_up(up).await,
        Command::Resolve { server, name } => {
            for address in gpumarket_tests::dns::resolve_a(server, &name, Duration::from_secs(2))? {
                println!("{address}");
            }
            Ok(())
        }
    }
}

async fn run_up(up: Up) -> Result<()> {
    let nodes = up.nodes.nodes(&up.regions, up.zones_per_region)?;
    let dir = up.dir.unwrap_or_else(|| tools::cache_dir().join("env"));
    let mut terminate = signal(SignalKind::terminate())?;
    let started = Instant::now();
    eprintln!("starting the environment in {}", dir.display());
    let env = Env::start(EnvOptions {
        dir: Some(dir),
        keep_dir: up.keep_dir,
        solana: true,
        real_node: up.real_node || up.demo,
        kwok_pod_cidr: None,
    })
    .await?;
    // Serve until a signal; a failure while starting, or a process that dies and cannot be
    // restarted, ends it too. Processes that exit on their own are restarted meanwhile.
    let result = tokio::select! {
        failure = async {
            bring_up(&env, &nodes, started, up.demo).await?;
            std::future::pending().await
        } => failure,
        failure = watch(&env) => Err(failure),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    };
    eprintln!("stopping the environment");
    env.shutdown().context("stopping the environment")?;
    if !up.keep_dir {
        eprintln!("stopped; {} removed", env.dir().display());
    }
    result
}

/// The GPU nodes, then the coordinates written to the env file and printed; with `demo`, the
/// market running on them.
async fn bring_up(
    env: &Env,
    nodes: &[gpumarket_tests::GpuNode],
    started: Instant,
    demo: bool,
) -> Result<()> {
    env.add_gpu_nodes(nodes).await?;
    let coordinates: Coordinates = env.coordinates().await?;
    let env_file = env.dir().join("env");
    std::fs::write(&env_file, coordinates.env_file())
        .with_context(|| format!("writing {}", env_file.display()))?;
    for (step, elapsed) in env.timings() {
        eprintln!("  {step}: {:.1} s", elapsed.as_secs_f64());
    }
    let gpus: u32 = nodes.iter().map(|n| n.gpus).sum();
    println!(
        "\ngpumarket environment up in {:.1} s: {} KWOK nodes with {gpus} GPUs, validator at {}\n\
         \n  source {}    # PATH (kubectl), KUBECONFIG, SOLANA_RPC_URL, GPUMARKET_MINT, keypairs\
         \n  kubectl get nodes -L gpumarket.io/gpu-model,topology.kubernetes.io/region\
         \n  kubectl get gpuoffers,gpuclusters -A\n\
         \nlogs: {}\nA process that exits is restarted (shown here); Ctrl-C stops everything and removes {}",
        started.elapsed().as_secs_f64(),
        nodes.len(),
        coordinates.solana.rpc_url,
        env_file.display(),
        env.dir().join("logs").display(),
        env.dir().display(),
    );
    if let Some(node) = env.real_node() {
        println!(
            "\nreal node {}: pods on bridge {} ({}, nothing routed off the host), kube-proxy, \
             cluster DNS {} (kube-dns, CoreDNS at {}); containerd at {}",
            gpumarket_tests::real_node::NODE_NAME,
            node.bridge,
            node.pod_subnet,
            gpumarket_tests::real_node::DNS_SERVICE_IP,
            node.dns(),
            node.containerd_socket.display(),
        );
    }
    if demo {
        let cluster = gpumarket_tests::demo::run(env, &coordinates, nodes).await?;
        gpumarket_tests::demo::follow(env, &cluster, Duration::from_secs(900)).await?;
        gpumarket_tests::demo::first_job(env, &cluster).await?;
        println!(
            "\ndemo: suppliers publish offers, the controller and the KubeRay operator run, and the\n\
             buyer's GpuCluster {ns}/{name} runs on the real node, paid from its escrow deposit:\n\
             \n  kubectl get gpuclusters,gpuleases,gpuoffers,rayclusters -A\
             \n  kubectl gpumarket status {name}\n",
            ns = cluster.metadata.namespace.as_deref().unwrap_or_default(),
            name = cluster.metadata.name.as_deref().unwrap_or_default(),
        );
    }
    Ok(())
}

/// Print each exit of a process the environment restarts, as it happens; returns the first
/// failure: a process that is not restarted died, or one could not be restarted.
async fn watch(env: &Env) -> anyhow::Error {
    let mut printed = 0;
    loop {
        let exits = env.exits();
        for exit in &exits[printed.min(exits.len())..] {
            eprintln!("restarting: {exit}");
        }
        printed = exits.len();
        if let Err(e) = env.ensure_running() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
