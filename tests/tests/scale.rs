//! Figures for the notes (a benchmark, not a timed test): the controller binary against 1,000
//! KWOK GPU nodes with simulated offers, 200 GpuClusters applied at once. Prints the time until
//! every RayCluster exists, p50/p99 apply→RayCluster, GPUs placed per second and the
//! controller's peak RSS.
//!
//! ```text
//! cargo build --release -p gpumarket-controller
//! cargo test -p gpumarket-tests --test scale -- --ignored --nocapture
//! ```
//! (the release controller is used when it exists, whatever profile the test is built with).
//! `SCALE_NODES` and `SCALE_CLUSTERS` change the sizes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use gpumarket_controller::simulate::{self, Simulation};
use gpumarket_crds::{GpuCluster, GpuOffer};
use gpumarket_tests::metrics::{sample, scrape};
use gpumarket_tests::{Env, GpuNode, eventually};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";

fn size(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The release controller binary when built (the figures are about it), else the one of this
/// test's profile.
fn controller_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let release = profile.parent().unwrap().join("release/gpumarket-controller");
    let binary = if release.exists() { release } else { profile.join("gpumarket-controller") };
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo build --release -p gpumarket-controller)",
        binary.display()
    );
    println!("controller: {}", binary.display());
    binary
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
#[ignore = "benchmark: run explicitly"]
async fn bench_thousand_nodes_two_hundred_clusters() {
    let (node_count, cluster_count) = (size("SCALE_NODES", 1_000), size("SCALE_CLUSTERS", 200));
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("scale").await.unwrap();

    // Half H100, half A100, 8 GPUs each, over four regions.
    let nodes: Vec<GpuNode> = (0..node_count)
        .map(|i| {
            let region = ["eu-west", "eu-north", "us-east", "us-west"][i % 4];
            GpuNode::new(&format!("scale-{i:04}"), ["H100", "A100"][(i / 4) % 2], 8)
                .region(region)
                .zone(&format!("{region}-a"))
        })
        .collect();
    let started = Instant::now();
    for chunk in nodes.chunks(100) {
        env.add_gpu_nodes(chunk).await.unwrap();
    }
    println!("{node_count} KWOK GPU nodes Ready in {:.1} s", started.elapsed().as_secs_f64());
    let simulation = Simulation {
        price_per_gpu_hour: 2_000_000,
        wallet: std::sync::Arc::new(solana_sdk::signature::Keypair::new()),
        heartbeat: Duration::from_secs(15),
    };
    let _suppliers = tokio::spawn(simulate::run(client.clone(), simulation));
    let offers: Api<GpuOffer> = Api::all(client.clone());
    let count_offers = |available: bool| {
        let offers = offers.clone();
        async move {
            let listed = offers.list(&Default::default()).await.ok()?.items;
            let heartbeating =
                |o: &GpuOffer| o.status.as_ref().is_some_and(|s| s.last_heartbeat.is_some());
            let counted = listed
                .iter()
                .filter(|o| if available { o.is_available() } else { heartbeating(o) })
                .count();
            (counted >= node_count).then_some(())
        }
    };
    eventually("every offer published", Duration::from_secs(300), || count_offers(false)).await;

    let metrics_port =
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut controller = Command::new(controller_binary());
    controller
        .env("KUBECONFIG", env.kubeconfig())
        .env("RUST_LOG", "warn")
        .args(["--heartbeat-timeout", "60s"])
        .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"));
    let pid = env.spawn("scale-controller", controller).unwrap();
    // Measured from a warm controller: its caches filled, every offer marked Available.
    eventually("every offer available", Duration::from_secs(300), || count_offers(true)).await;
    println!("controller ready, offers available, after {:.1} s", started.elapsed().as_secs_f64());

    // Watch RayClusters appear from before the first apply.
    let rays = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("ray.io", "v1", "RayCluster"),
            "rayclusters",
        ),
    );
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let _watch = tokio::spawn(async move {
        let mut events =
            std::pin::pin!(watcher(rays, watcher::Config::default()).applied_objects());
        while let Ok(Some(ray)) = events.try_next().await {
            let _ = seen_tx.send((ray.name_any(), Instant::now()));
        }
    });

    // 200 clusters of 1-4 workers × 2-8 GPUs, H100 or either model, somewhere or anywhere.
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let wanted: Vec<(String, u64, GpuCluster)> = (0..cluster_count)
        .map(|i| {
            let (workers, gpus) = (1 + i % 4, [2, 4, 8][i % 3]);
            let models = if i % 2 == 0 { json!(["H100"]) } else { json!(["H100", "A100"]) };
            let mut spec = json!({
                "gpu": {"models": models}, "workers": workers, "gpusPerWorker": gpus,
                "duration": "1h", "maxPricePerGpuHour": 5_000_000,
                "payment": {"buyerWallet": WALLET},
            });
            if i % 3 == 0 {
                let region = ["eu-west", "us-east"][i % 2];
                spec["location"] = json!({"region": region});
            }
            let name = format!("c{i:03}");
            let cluster = serde_json::from_value(json!({
                "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuCluster",
                "metadata": {"name": name}, "spec": spec,
            }))
            .unwrap();
            (name, (workers * gpus) as u64, cluster)
        })
        .collect();
    let gpus_wanted: u64 = wanted.iter().map(|(_, g, _)| g).sum();
    let applied_at: HashMap<String, Instant> = futures::stream::iter(wanted)
        .map(|(name, _, cluster)| {
            let clusters = clusters.clone();
            async move {
                let at = Instant::now();
                clusters.create(&PostParams::default(), &cluster).await.unwrap();
                (name, at)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let first_apply = applied_at.values().min().copied().unwrap();

    // A RayCluster is seen again on every change: its first sighting counts.
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while first_seen.len() < cluster_count {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((name, at))) = tokio::time::timeout(left, seen_rx.recv()).await else {
            panic!("only {} of {cluster_count} RayClusters after 600 s", first_seen.len());
        };
        first_seen.entry(name).or_insert(at);
    }
    let mut latencies: Vec<Duration> = first_seen
        .iter()
        .map(|(name, at)| at.saturating_duration_since(applied_at[name]))
        .collect();
    let last = first_seen.values().max().copied().unwrap();
    let total = last - first_apply;
    latencies.sort();
    println!(
        "{cluster_count} GpuClusters ({gpus_wanted} GPUs) on {node_count} nodes: all RayClusters in {:.1} s; \
         apply→RayCluster p50 {:.2} s, p99 {:.2} s; {:.0} GPUs placed/s; controller peak RSS {:.0} MiB",
        total.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64(),
        percentile(&latencies, 0.99).as_secs_f64(),
        gpus_wanted as f64 / total.as_secs_f64(),
        peak_rss_mib(pid),
    );
    let metrics = scrape(metrics_port).await.unwrap();
    let stat = |base: &str, labels: &str, stat: &str| {
        let name = format!("{base}_{stat}{labels}");
        sample(&metrics, &name).unwrap_or_else(|| panic!("no sample {name}"))
    };
    let mean = |base: &str, labels: &str| stat(base, labels, "sum") / stat(base, labels, "count");
    let (matches, reconciles) =
        ("gpumarket_match_latency_seconds", "gpumarket_reconcile_duration_seconds");
    let gpucluster = "{controller=\"gpucluster\"}";
    println!(
        "mean match {:.1} ms over {} matches; mean GpuCluster reconcile {:.0} ms over {} reconciles",
        mean(matches, "") * 1e3,
        stat(matches, "", "count"),
        mean(reconciles, gpucluster) * 1e3,
        stat(reconciles, gpucluster, "count"),
    );
}
