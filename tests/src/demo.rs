//! `gpumarket-env up --demo`: the market at work on the local environment. The chart runs the
//! controller (settling on the local validator) and the supplier agent of the real node as
//! real pods; every KWOK node gets a simulated supplier beside it (the real agent, offer-only,
//! with a scripted fake GPU source) for a market to quote from; the KubeRay operator runs the
//! Ray pods. A buyer applies `examples/gpucluster-local.yaml` and deposits into its escrow, as
//! a user would; its Ray cluster really runs on the real node, and a first job runs on it.

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

use crate::ray::{Dashboard, python_entrypoint};
use crate::solana::read_keypair;
use crate::{Coordinates, Env, GpuNode, chart};

/// Price per GPU-hour each simulated supplier asks, in base units (6 decimals).
const PRICES: [(&str, u64); 3] = [("H100", 2_200_000), ("A100", 1_400_000), ("RTX4090", 350_000)];
const DEFAULT_PRICE: u64 = 1_000_000;
/// The buyer's order, as a user copies it.
const ORDER: &str = include_str!("../../examples/gpucluster-local.yaml");
/// The first job: what Ray sees, and the GPUs the market gave each `num_gpus=1` task.
const FIRST_JOB: &str = r#"import os, ray
ray.init()
@ray.remote(num_gpus=1)
def gpu():
    return os.environ.get("GPUMARKET_GPU_UUIDS", "")
print("Ray resources:", ray.cluster_resources())
print("market GPUs seen by each task:", ray.get([gpu.remote() for _ in range(int(ray.cluster_resources()["GPU"]))]))
"#;
/// What the demo suggests to submit next.
const NEXT_JOB: &str = "import ray; ray.init(); print(ray.cluster_resources())";

/// Start the chart on the real node, simulated suppliers and the KubeRay operator, then place
/// the buyer's order.
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
        env.spawn_supervised(&format!("supplier-{}", node.name), agent)?;
    }

    let mut operator = env.tools().command("kuberay-operator")?;
    operator.arg(format!("-kubeconfig={}", coordinates.kubeconfig.display())).args([
        "-enable-leader-election=false",
        "-metrics-addr=0",
        "-health-probe-bind-address=0",
    ]);
    env.spawn_supervised("kuberay-operator", operator)?;

    println!("demo: installing the chart on the real node (controller and supplier agent pods)");
    let authority = env.dir().join("settlement-keypair.json");
    coordinates.solana.settlement_authority(&authority).await?;
    chart::install_on_real_node(env, &coordinates.solana.suppliers[0], &authority).await?;
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

/// The buyer's GpuCluster (`examples/gpucluster-local.yaml`, paid from the environment's buyer
/// wallet), then, once the controller has opened the cluster's escrow account, the deposit
/// into it: max price × GPUs × duration.
async fn order(env: &Env, coordinates: &Coordinates) -> Result<GpuCluster> {
    let buyer = read_keypair(&coordinates.solana.buyer)?;
    let mut cluster: GpuCluster = serde_yaml::from_str(ORDER)?;
    cluster.spec.payment.buyer_wallet = buyer.pubkey().to_string();
    let hours = cluster.spec.duration()?.as_secs().div_ceil(3600);
    let gpus = u64::from(cluster.spec.workers * cluster.spec.gpus_per_worker);
    let deposit = cluster.spec.max_price_per_gpu_hour * gpus * hours;
    let namespace = cluster.metadata.namespace.clone().unwrap_or_default();
    let clusters: Api<GpuCluster> = Api::namespaced(env.client().await?, &namespace);
    let cluster = clusters.create(&PostParams::default(), &cluster).await?;
    let escrow = escrow_account(&clusters, &cluster, Duration::from_secs(120)).await?;
    println!("demo: depositing {deposit} base units into the escrow account {escrow}");
    coordinates.solana.transfer(&buyer, &escrow, deposit, Some("demo deposit")).await?;
    Ok(cluster)
}

/// Run a first job on the cluster's Ray head and print it, then how to submit more.
pub async fn first_job(env: &Env, cluster: &GpuCluster) -> Result<()> {
    let node = env.real_node().context("the demo runs on the real node")?;
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let namespace = cluster.metadata.namespace.clone().unwrap_or_default();
    let dashboard = Dashboard::find(node, &name, &namespace, Duration::from_secs(300)).await?;
    let run = dashboard
        .run("demo-first-job", &python_entrypoint(FIRST_JOB), Duration::from_secs(600))
        .await?;
    println!("demo: Ray job demo-first-job on {namespace}/{name}: {}", run.status);
    for line in
        run.logs.lines().filter(|l| l.starts_with("Ray resources") || l.starts_with("market GPUs"))
    {
        println!("  {line}");
    }
    if run.status != "SUCCEEDED" {
        bail!("the first job ended {}:\n{}", run.status, run.logs);
    }
    let address = &dashboard.address;
    let body = serde_json::json!({"entrypoint": python_entrypoint(NEXT_JOB)}).to_string();
    println!(
        "\ndemo: submit your jobs to {namespace}/{name} (its head's job API, on the node's bridge):\n"
    );
    println!("  ray job submit --address {address} -- {}", python_entrypoint(NEXT_JOB));
    println!(
        "  curl -X POST {address}/api/jobs/ -H 'Content-Type: application/json' -d '{}'",
        body.replace('\'', r"'\''")
    );
    println!("  curl {address}/api/jobs/   # their states");
    Ok(())
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
