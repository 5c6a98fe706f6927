//! The main path for real, on the real node: the chart installed as real pods from the local
//! images (the controller, and the supplier agent as the kubelet's device plugin with the fake
//! GPUs' CDI spec); a buyer's GpuCluster matched to the node's offer and funded on chain;
//! KubeRay's head and worker pods running the Ray image; a Ray job submitted through the
//! dashboard's job API whose `num_gpus=1` tasks see the GPUs the agent's Allocate gave their
//! worker (uuids in the environment, device nodes by CDI); then the cluster deleted, the lease
//! metered from the worker's Ready time and paid on chain to the base unit, the rest refunded.
//!
//! Prints what it took (apply to job succeeded) and the memory of the environment with the
//! Ray cluster up. Needs root, like every real-node test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use gpumarket_crds::{ClusterPhase, GpuCluster, GpuLease, GpuOffer, LeasePhase};
use gpumarket_tests::dns::resolve_a;
use gpumarket_tests::real_node::{
    CLUSTER_DOMAIN, FAKE_DRIVER_LIBRARY, FAKE_GPUS, NODE_NAME, fake_gpu_uuid,
};
use gpumarket_tests::solana::read_keypair;
use gpumarket_tests::{Env, EnvOptions, RealNode, chart, eventually};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use solana_sdk::signature::Signer;

/// 1,000 base units per GPU-second: amounts read as served seconds.
const PRICE_PER_GPU_HOUR: u64 = 3_600_000;
const RAY_IMAGE: &str = "ghcr.io/gpumarket/ray:2.41.0";
/// Ray on a shared two-core machine: pods and the job take minutes, not seconds.
const WAIT: Duration = Duration::from_secs(600);

/// Every GPU of the node for one worker: in a `num_gpus=1` task per GPU, Ray hands each its own.
const JOB: &str = r#"import json, os, ray
ray.init()
@ray.remote(num_gpus=1)
def gpu():
    return {"rayGpuIds": [str(i) for i in ray.get_gpu_ids()],
            "uuids": os.environ.get("GPUMARKET_GPU_UUIDS", ""),
            "deviceNodes": sorted(d for d in os.listdir("/dev") if d.startswith("nvidia")),
            "driverLibrary": os.path.exists(DRIVER_LIBRARY)}
print("GPUS " + json.dumps(ray.get([gpu.remote() for _ in range(int(ray.cluster_resources()["GPU"]))])))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyers_ray_job_runs_on_market_gpus_and_is_paid_on_chain() {
    let keep_dir = std::env::var_os("GPUMARKET_KEEP_ENV").is_some_and(|v| v == "1");
    let options = EnvOptions { keep_dir, real_node: true, solana: true, ..EnvOptions::default() };
    let env = Env::start(options).await.expect("environment with a real node");
    let node = env.real_node().unwrap();
    let client = env.client().await.unwrap();
    let sol = env.solana().await.unwrap();

    let started = Instant::now();
    let keys = tempfile::tempdir().unwrap();
    let authority = keys.path().join("settlement.json");
    sol.settlement_authority(&authority).await.unwrap();
    let supplier = read_keypair(&sol.suppliers[0]).unwrap().pubkey();
    chart::install_on_real_node(&env, &sol.suppliers[0], &authority).await.unwrap();
    println!("chart installed on the real node (images cached): {:.1?}", started.elapsed());

    let ns = env.namespace("ray-job").await.unwrap();
    env.start_kuberay(&ns).unwrap();
    let offers: Api<GpuOffer> = Api::all(client.clone());
    eventually("the agent pod's offer for the real node's GPUs", WAIT, || async {
        let offer = offers.get_opt(NODE_NAME).await.ok()??;
        (offer.spec.gpus.len() == FAKE_GPUS).then_some(())
    })
    .await;

    let buyer = read_keypair(&sol.buyer).unwrap();
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let applied = Instant::now();
    clusters
        .create(&PostParams::default(), &gpu_cluster(&buyer.pubkey().to_string()))
        .await
        .unwrap();
    let escrow = eventually("the escrow asked for", WAIT, || async {
        clusters.get("train").await.ok()?.status?.escrow?.account.parse().ok()
    })
    .await;
    let (buyer_before, supplier_before) =
        (sol.balance(&buyer.pubkey()).await.unwrap(), sol.balance(&supplier).await.unwrap());
    // price × GPUs × one hour, no margin.
    let deposit = PRICE_PER_GPU_HOUR * FAKE_GPUS as u64;
    sol.transfer(&buyer, &escrow, deposit, Some("deposit")).await.unwrap();
    eventually("the GpuCluster Running", WAIT, || async {
        let cluster = clusters.get("train").await.ok()?;
        (cluster.status?.phase == Some(ClusterPhase::Running)).then_some(())
    })
    .await;
    let running = applied.elapsed();

    let logs = run_job(node, &ns).await;
    let job_done = applied.elapsed();
    let uid = clusters.get("train").await.unwrap().uid().unwrap();
    let lease = leases_of(&client, &uid).await.pop().unwrap();
    check_gpus_seen(&logs, &lease, node.slot);
    check_metered_from_ready(&client, &ns, &lease).await;
    println!("GpuCluster apply → Running: {running:.1?}; → Ray job succeeded: {job_done:.1?}");
    println!("memory with the Ray cluster up: {}", memory_report(&env, node.slot));

    clusters.delete("train", &DeleteParams::default()).await.unwrap();
    eventually("the GpuCluster gone, its lease settled", WAIT, || async {
        clusters.get_opt("train").await.ok()?.is_none().then_some(())
    })
    .await;
    let lease = leases_of(&client, &uid).await.pop().unwrap().status.unwrap();
    assert_eq!(lease.phase, Some(LeasePhase::Settled), "{lease:?}");
    let paid = lease.amount_settled.unwrap();
    assert!(paid > 0, "{lease:?}");
    assert_eq!(paid, lease.served_gpu_seconds.unwrap() * 1000, "served time, to the base unit");
    assert_eq!(sol.balance(&supplier).await.unwrap() - supplier_before, paid, "paid on chain");
    assert_eq!(
        buyer_before - sol.balance(&buyer.pubkey()).await.unwrap(),
        paid,
        "the rest refunded"
    );
    assert_eq!(sol.account_balance(&escrow).await.unwrap(), None, "the escrow is closed");
}

/// One worker with every GPU of the real node, running the local Ray image.
fn gpu_cluster(buyer: &str) -> GpuCluster {
    serde_json::from_value(json!({
        "metadata": {"name": "train"},
        "spec": {
            "gpu": {"models": ["H100"]},
            "workers": 1,
            "gpusPerWorker": FAKE_GPUS,
            "duration": "1h",
            "maxPricePerGpuHour": PRICE_PER_GPU_HOUR,
            "ray": {
                "version": "2.41.0",
                "image": RAY_IMAGE,
                "headResources": {
                    "requests": {"cpu": "500m", "memory": "2Gi"},
                    "limits": {"cpu": "500m", "memory": "2Gi"},
                },
            },
            "payment": {"buyerWallet": buyer},
        },
    }))
    .unwrap()
}

/// Submits [`JOB`] through the head's dashboard, found as an in-cluster client finds it (its
/// Service's name, through the cluster's DNS; KubeRay's head Service is headless), and waits
/// for it to succeed; returns its logs. The submission id is ours, so a retried submission
/// whose first answer was lost cannot start the job twice.
async fn run_job(node: &RealNode, ns: &str) -> String {
    let name = format!("train-head-svc.{ns}.svc.{CLUSTER_DOMAIN}");
    let dns = node.dns();
    let head = eventually("the head Service's name resolved", WAIT, || {
        let name = name.clone();
        async move { resolve_a(dns, &name, Duration::from_secs(2)).ok()?.first().copied() }
    })
    .await;
    let jobs = format!("http://{head}:8265/api/jobs/");
    let job = JOB.replace("DRIVER_LIBRARY", &format!("{FAKE_DRIVER_LIBRARY:?}"));
    let entrypoint = format!("python -c '{}'", job.replace('\'', r"'\''"));
    let body = json!({"entrypoint": entrypoint, "submission_id": "gpus"}).to_string();
    let status = eventually("the job finished", WAIT, || async {
        // Submitting again is refused once it exists: then only its status matters.
        curl(&["-X", "POST", "-H", "Content-Type: application/json", "-d", &body, &jobs]);
        let status = curl(&[&format!("{jobs}gpus")])?;
        let state = status["status"].as_str()?.to_owned();
        ["SUCCEEDED", "FAILED", "STOPPED"].contains(&state.as_str()).then_some(status)
    })
    .await;
    let logs = curl(&[&format!("{jobs}gpus/logs")]).unwrap()["logs"].as_str().unwrap().to_owned();
    assert_eq!(status["status"], "SUCCEEDED", "{status}\n{logs}");
    logs
}

/// A JSON answer from `curl -fsS <args>`; `None` until the server answers with success.
fn curl(args: &[&str]) -> Option<Value> {
    let output =
        Command::new("curl").args(["-fsS", "--max-time", "10"]).args(args).output().ok()?;
    output.status.success().then(|| serde_json::from_slice(&output.stdout).ok()).flatten()
}

/// Each task saw one GPU of Ray's own and, from the container, the uuids Allocate gave the
/// worker (the lease's GPUs: the whole node) and their device nodes, placed by CDI.
fn check_gpus_seen(logs: &str, lease: &GpuLease, slot: u8) {
    let line =
        logs.lines().find_map(|l| l.strip_prefix("GPUS ")).unwrap_or_else(|| panic!("{logs}"));
    let tasks: Vec<Value> = serde_json::from_str(line).unwrap();
    assert_eq!(tasks.len(), FAKE_GPUS, "{line}");
    let mut leased: Vec<String> = lease.spec.gpus.clone();
    leased.sort();
    let mut node_gpus: Vec<String> = (0..FAKE_GPUS).map(|i| fake_gpu_uuid(slot, i)).collect();
    node_gpus.sort();
    assert_eq!(leased, node_gpus);
    let mut ray_ids = Vec::new();
    for task in &tasks {
        let mut uuids: Vec<String> =
            task["uuids"].as_str().unwrap().split(',').map(str::to_owned).collect();
        uuids.sort();
        assert_eq!(uuids, leased, "GPUMARKET_GPU_UUIDS from Allocate: {line}");
        let nodes: Vec<&str> =
            task["deviceNodes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(nodes, ["nvidia0", "nvidia1", "nvidiactl"], "device nodes by CDI: {line}");
        assert_eq!(task["driverLibrary"], true, "the driver library mounted by CDI: {line}");
        let ids = task["rayGpuIds"].as_array().unwrap();
        assert_eq!(ids.len(), 1, "one GPU per task: {line}");
        ray_ids.push(ids[0].as_str().unwrap().to_owned());
    }
    ray_ids.sort();
    ray_ids.dedup();
    assert_eq!(ray_ids.len(), FAKE_GPUS, "each task its own GPU: {line}");
}

/// The lease serves from the moment its worker pod became Ready, not from the bind.
async fn check_metered_from_ready(client: &Client, ns: &str, lease: &GpuLease) {
    let status = lease.status.clone().unwrap();
    let since = status.serving_since.clone().unwrap().0;
    assert!(since > lease.spec.start_time.0, "{status:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let workers =
        pods.list(&ListParams::default().labels("ray.io/node-type=worker")).await.unwrap();
    let [worker] = &workers.items[..] else { panic!("one worker pod: {workers:?}") };
    assert_eq!(worker.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE_NAME));
    let ready = worker.status.as_ref().unwrap().conditions.iter().flatten();
    let ready = ready.into_iter().find(|c| c.type_ == "Ready" && c.status == "True").unwrap();
    let ready_at = ready.last_transition_time.as_ref().unwrap().0;
    let gap = since.as_second() - ready_at.as_second();
    assert!((0..=30).contains(&gap), "serving since {since}, worker Ready at {ready_at}");
}

async fn leases_of(client: &Client, uid: &str) -> Vec<GpuLease> {
    let leases: Api<GpuLease> = Api::all(client.clone());
    let all = leases.list(&ListParams::default()).await.unwrap().items;
    all.into_iter().filter(|l| l.spec.cluster.uid == uid).collect()
}

/// The environment's processes (resident memory) and the real node's pods (their cgroup).
fn memory_report(env: &Env, slot: u8) -> String {
    let dir = env.dir().display().to_string();
    let mut processes_kib = 0u64;
    for process in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(process.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&dir) {
            let status = std::fs::read_to_string(process.path().join("status")).unwrap_or_default();
            let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"));
            processes_kib +=
                rss.and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap_or(0);
        }
    }
    let cgroup = format!("/sys/fs/cgroup/memory/gpumarket-real-{slot}/memory.usage_in_bytes");
    let pods_bytes: u64 =
        std::fs::read_to_string(cgroup).ok().and_then(|b| b.trim().parse().ok()).unwrap_or(0);
    format!(
        "environment processes {} MiB RSS, real node's pods {} MiB (cgroup)",
        processes_kib / 1024,
        pods_bytes / (1 << 20)
    )
}
