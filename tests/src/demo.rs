//! `gpumarket-env up --demo`: the market at work on the local environment. Every KWOK node gets
//! a simulated supplier (the real agent, offer-only, with a scripted fake GPU source); the
//! controller runs with settlement on the local validator, the KubeRay operator runs the Ray
//! pods, and a buyer applies a GpuCluster and deposits into escrow, as a user would.

use std::path::Path;
use std::process::Command;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use gpumarket_crds::{ClusterPhase, GpuCluster};
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use solana_sdk::signature::{Keypair, Signer};

use crate::solana::read_keypair;
use crate::{Coordinates, Env, GpuNode};

/// Price per GPU-hour each simulated supplier asks, in base units (6 decimals).
const PRICES: [(&str, u64); 3] = [("H100", 2_200_000), ("A100", 1_400_000), ("RTX4090", 350_000)];
const DEFAULT_PRICE: u64 = 1_000_000;

/// Start suppliers, the KubeRay operator and the controller, then place the buyer's order.
pub async fn run(env: &Env, coordinates: &Coordinates, nodes: &[GpuNode]) -> Result<GpuCluster> {
    let binaries = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("locating the gpumarket binaries")?;
    let wallets: Vec<Keypair> =
        coordinates.solana.suppliers.iter().map(|p| read_keypair(p)).collect::<Result<_>>()?;
    for (i, node) in nodes.iter().enumerate() {
        let source = env.dir().join(format!("gpus-{}.yaml", node.name));
        std::fs::write(&source, fake_source(node))?;
        let mut agent = Command::new(binaries.join("gpumarket-device-plugin"));
        agent
            .env("KUBECONFIG", &coordinates.kubeconfig)
            .args(["--node-name", &node.name, "--mode", "offer-only", "--heartbeat-interval", "5s"])
            .arg(format!("--wallet={}", wallets[i % wallets.len()].pubkey()))
            .arg(format!(
                "--wallet-keypair={}",
                coordinates.solana.suppliers[i % wallets.len()].display()
            ))
            .arg(format!("--price={}={}", node.model, price_of(&node.model)))
            .arg(format!("--source=fake:{}", source.display()));
        env.spawn(&format!("supplier-{}", node.name), agent)?;
    }

    // Ray heads need no GPU and do not tolerate the supplier taint: they run on a plain node, as
    // in a buyer's own cluster.
    env.add_gpu_nodes(&[GpuNode::new("cpu-0", "none", 0)]).await?;
    let mut operator = env.tools().command("kuberay-operator")?;
    operator.arg(format!("-kubeconfig={}", coordinates.kubeconfig.display())).args([
        "-enable-leader-election=false",
        "-metrics-addr=0",
        "-health-probe-bind-address=0",
    ]);
    env.spawn("kuberay-operator", operator)?;

    let authority = env.dir().join("settlement-keypair.json");
    coordinates.solana.settlement_authority(&authority).await?;
    let mut controller = Command::new(binaries.join("gpumarket-controller"));
    controller
        .env("KUBECONFIG", &coordinates.kubeconfig)
        .args(["--metrics-addr", "127.0.0.1:0", "--heartbeat-timeout", "30s"])
        .args(["--settlement-period", "2m"])
        .arg(format!("--rpc-url={}", coordinates.solana.rpc_url))
        .arg(format!("--settlement-keypair={}", authority.display()))
        .arg(format!("--mint={}", coordinates.solana.mint));
    env.spawn("controller", controller)?;

    order(env, coordinates).await
}

/// Print the cluster's progress (each phase, with why it waits) until it is Running; an error
/// if it fails or is not Running within `timeout`.
pub async fn follow(env: &Env, cluster: &GpuCluster, timeout: Duration) -> Result<()> {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let namespace = cluster.metadata.namespace.clone().unwrap_or_default();
    let api: Api<GpuCluster> = Api::namespaced(env.client().await?, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut updates = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    let started = std::time::Instant::now();
    let mut last = String::new();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        let cluster = tokio::select! {
            update = updates.try_next() => update?.context("the GpuCluster watch ended")?,
            () = &mut deadline => bail!("GpuCluster {namespace}/{name} not Running after {timeout:?} ({last})"),
        };
        let Some(status) = cluster.status else { continue };
        let phase = status.phase.unwrap_or_default();
        // What holds it up: conditions that do not hold, and Degraded when it does.
        let waiting: Vec<String> = status
            .conditions
            .iter()
            .filter(|c| c.status == if c.type_ == "Degraded" { "True" } else { "False" })
            .filter(|c| !c.message.is_empty())
            .map(|c| format!("{}: {}", c.type_, c.message))
            .collect();
        let line = format!(
            "{phase:?}{}",
            if waiting.is_empty() { String::new() } else { format!(" ({})", waiting.join("; ")) }
        );
        if line != last {
            println!(
                "[{:>5.1} s] GpuCluster {namespace}/{name}: {line}",
                started.elapsed().as_secs_f64()
            );
            last = line;
        }
        match phase {
            ClusterPhase::Running => {
                println!("demo: GpuCluster {namespace}/{name} is Running");
                return Ok(());
            }
            ClusterPhase::Failed => bail!("GpuCluster {namespace}/{name} failed: {last}"),
            _ => {}
        }
    }
}

/// The buyer's GpuCluster (two A100-or-better workers of 8 GPUs for 10 minutes), then, once
/// the controller has opened the cluster's escrow account, the deposit into it.
async fn order(env: &Env, coordinates: &Coordinates) -> Result<GpuCluster> {
    let buyer = read_keypair(&coordinates.solana.buyer)?;
    let deposit: u64 = 3_000_000 * 16 / 6; // max price × GPUs × 10 minutes
    let cluster: GpuCluster = serde_json::from_value(serde_json::json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuCluster",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {
            "gpu": {"minTier": "A100"},
            "workers": 2,
            "gpusPerWorker": 8,
            "duration": "10m",
            "maxPricePerGpuHour": 3_000_000,
            "payment": {"buyerWallet": buyer.pubkey().to_string()},
        }
    }))?;
    let clusters: Api<GpuCluster> = Api::namespaced(env.client().await?, "default");
    let cluster = clusters.create(&PostParams::default(), &cluster).await?;
    let escrow = escrow_account(&clusters, &cluster, Duration::from_secs(120)).await?;
    println!("demo: depositing {deposit} base units into the escrow account {escrow}");
    coordinates.solana.transfer(&buyer, &escrow, deposit, Some("demo deposit")).await?;
    Ok(cluster)
}

/// The cluster's escrow account, once settlement has opened it (`status.escrow.account`).
pub async fn escrow_account(
    api: &Api<GpuCluster>,
    cluster: &GpuCluster,
    timeout: Duration,
) -> Result<solana_sdk::pubkey::Pubkey> {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let current = api.get(&name).await?;
        if let Some(escrow) = current.status.and_then(|s| s.escrow) {
            return Ok(escrow.account.parse()?);
        }
        if std::time::Instant::now() > deadline {
            bail!("no escrow account opened for GpuCluster {name} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn price_of(model: &str) -> u64 {
    PRICES.iter().find(|(m, _)| m.eq_ignore_ascii_case(model)).map_or(DEFAULT_PRICE, |(_, p)| *p)
}

/// The supplier agent's fake GPU source for a KWOK node: its GPUs, all NVLink-connected, no
/// scripted faults (stop a supplier's agent to watch the controller replace its GPUs).
fn fake_source(node: &GpuNode) -> String {
    let uuids: Vec<String> = (0..node.gpus).map(|i| format!("GPU-{}-{i}", node.name)).collect();
    let gpus: Vec<serde_json::Value> = uuids
        .iter()
        .map(|uuid| {
            let peers: Vec<&String> = uuids.iter().filter(|u| *u != uuid).collect();
            serde_json::json!({
                "uuid": uuid,
                "productName": format!("NVIDIA {}", node.model),
                "memoryMib": node.memory_mib,
                "nvlinkPeers": peers,
            })
        })
        .collect();
    serde_json::json!({"driverVersion": "560.35.03", "cudaVersion": "12.6", "gpus": gpus})
        .to_string()
}
