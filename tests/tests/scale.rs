//! Figures for the notes (a benchmark, not a timed test): the same GPU demand placed two ways
//! on the same 1,000 KWOK GPU nodes, in one run. First the default kube-scheduler binds plain
//! GPU pods (one pod per worker, the same GPU counts, models and regions as node selectors);
//! then the controller binary matches 200 GpuClusters to simulated offers of those nodes and
//! creates their RayClusters. Prints, for each: the time until all are placed, GPUs placed per
//! second, p50/p99 per request (create→every worker bound; apply→RayCluster), API requests per
//! placed GPU, CPU seconds and peak RSS; and the ratio of the rates.
//!
//! ```text
//! cargo build --release -p gpumarket-controller
//! cargo test -p gpumarket-tests --test scale -- --ignored --nocapture
//! ```
//! (the release controller is used when it exists, whatever profile the test is built with).
//! `SCALE_NODES` and `SCALE_CLUSTERS` change the sizes.
//!
//! `bench_controller_memory_with_offers` (run the same way) measures the controller's memory
//! with `SCALE_OFFERS` (10,000) offers on the market.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use gpumarket_controller::simulate::{self, Simulation};
use gpumarket_crds::common::{GPU_RESOURCE, REGION_LABEL};
use gpumarket_crds::{GpuCluster, GpuOffer};
use gpumarket_tests::kwok::MODEL_LABEL;
use gpumarket_tests::metrics::{sample, scrape};
use gpumarket_tests::{Env, GpuNode, eventually};
use k8s_openapi::api::core::v1::Pod;
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

/// Resident memory of process `pid`, at its peak (`VmHWM`) or now (`VmRSS`).
fn rss_mib(pid: u32, which: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(which)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds (user and system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state is field 3, utime and stime 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

/// Requests the API server has served, by verb and resource (`"PATCH gpuoffers/status"`),
/// leaving out what runs beside either placer whatever it does: KWOK's node heartbeats (nodes,
/// leases) and its pod status updates (a kubelet's work).
async fn api_requests(client: &kube::Client) -> BTreeMap<String, f64> {
    let metrics = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(metrics).await.unwrap();
    let mut served = BTreeMap::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("apiserver_request_total{")) {
        let Some((labels, count)) = line.rsplit_once("} ") else { continue };
        let label = |name: &str| {
            let start = labels.find(&format!("{name}=\"")).map(|at| at + name.len() + 2)?;
            labels[start..].split('"').next()
        };
        let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else { continue };
        let subresource = label("subresource").unwrap_or_default();
        if resource == "nodes"
            || resource == "leases"
            || (resource, subresource) == ("pods", "status")
        {
            continue;
        }
        let kind = match subresource {
            "" => format!("{verb} {resource}"),
            sub => format!("{verb} {resource}/{sub}"),
        };
        *served.entry(kind).or_default() += count.parse::<f64>().unwrap_or(0.0);
    }
    served
}

/// The requests served between two readings of [`api_requests`], by kind, most first, less
/// the bench's own (`count` of kind `own`: its creates are not the placer's).
fn served_since(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    (own, count): (&str, usize),
) -> Vec<(String, f64)> {
    let mut since: Vec<(String, f64)> = after
        .iter()
        .map(|(kind, n)| {
            let bench = if kind == own { count as f64 } else { 0.0 };
            (kind.clone(), n - before.get(kind).copied().unwrap_or(0.0) - bench)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    since.sort_by(|a, b| b.1.total_cmp(&a.1));
    since
}

fn total(served: &[(String, f64)]) -> f64 {
    served.iter().map(|(_, n)| n).sum()
}

/// One buyer's demand: `workers` workers of `gpus` GPUs, H100 only or H100 or A100, in a
/// region or anywhere.
struct Demand {
    name: String,
    workers: usize,
    gpus: usize,
    h100_only: bool,
    region: Option<&'static str>,
}

impl Demand {
    /// `count` requests of 1-4 workers × 2-8 GPUs, half H100 only, a third in a region.
    fn mix(count: usize) -> Vec<Demand> {
        (0..count)
            .map(|i| Demand {
                name: format!("c{i:03}"),
                workers: 1 + i % 4,
                gpus: [2, 4, 8][i % 3],
                h100_only: i % 2 == 0,
                region: (i % 3 == 0).then_some(["eu-west", "us-east"][i % 2]),
            })
            .collect()
    }

    fn total_gpus(&self) -> u64 {
        (self.workers * self.gpus) as u64
    }

    fn gpu_cluster(&self) -> GpuCluster {
        let models = if self.h100_only { json!(["H100"]) } else { json!(["H100", "A100"]) };
        let mut spec = json!({
            "gpu": {"models": models}, "workers": self.workers, "gpusPerWorker": self.gpus,
            "duration": "1h", "maxPricePerGpuHour": 5_000_000,
            "payment": {"buyerWallet": WALLET},
        });
        if let Some(region) = self.region {
            spec["location"] = json!({"region": region});
        }
        serde_json::from_value(json!({
            "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuCluster",
            "metadata": {"name": self.name}, "spec": spec,
        }))
        .unwrap()
    }

    /// The same demand as plain pods for kube-scheduler: one per worker.
    fn worker_pods(&self) -> Vec<Pod> {
        let mut selector = json!({"type": "kwok"});
        if self.h100_only {
            selector[MODEL_LABEL] = json!("H100");
        }
        if let Some(region) = self.region {
            selector[REGION_LABEL] = json!(region);
        }
        (0..self.workers)
            .map(|w| {
                serde_json::from_value(json!({
                    "metadata": {"name": format!("{}-w{w}", self.name)},
                    "spec": {
                        "containers": [{"name": "worker", "image": "registry.k8s.io/pause:3.10",
                            "resources": {"limits": {GPU_RESOURCE: self.gpus.to_string()}}}],
                        "nodeSelector": selector,
                        "terminationGracePeriodSeconds": 0,
                    },
                }))
                .unwrap()
            })
            .collect()
    }
}

/// What one way of placing the demand measured.
struct Placed {
    total: Duration,
    latencies: Vec<Duration>,
    requests_per_gpu: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

impl Placed {
    fn print(&self, who: &str, gpus: u64, per_request: &str) {
        println!(
            "{who}: all placed in {:.1} s, {:.0} GPUs placed/s; {per_request} p50 {:.2} s, \
             p99 {:.2} s; {:.2} API requests per placed GPU; {:.1} CPU s, peak RSS {:.0} MiB",
            self.total.as_secs_f64(),
            self.rate(gpus),
            percentile(&self.latencies, 0.50).as_secs_f64(),
            percentile(&self.latencies, 0.99).as_secs_f64(),
            self.requests_per_gpu,
            self.cpu_seconds,
            self.peak_rss_mib,
        );
    }

    fn rate(&self, gpus: u64) -> f64 {
        gpus as f64 / self.total.as_secs_f64()
    }
}

/// Watch `api`'s objects from now on: the first time each is seen satisfying `placed`.
fn first_placed<K>(
    api: Api<K>,
    placed: fn(&K) -> bool,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
        while let Ok(Some(object)) = events.try_next().await {
            if placed(&object) {
                let _ = seen_tx.send((object.name_any(), Instant::now()));
            }
        }
    });
    seen_rx
}

/// Receive sightings until `count` distinct names were seen: the first sighting of each.
async fn collect_first(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    count: usize,
    what: &str,
) -> HashMap<String, Instant> {
    let mut first: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while first.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((name, at))) = tokio::time::timeout(left, seen.recv()).await else {
            panic!("only {} of {count} {what} after 600 s", first.len());
        };
        first.entry(name).or_insert(at);
    }
    first
}

/// kube-scheduler binds the demand as plain pods in namespace `ns`.
async fn place_with_kube_scheduler(
    env: &Env,
    client: &kube::Client,
    ns: &str,
    demand: &[Demand],
) -> Placed {
    let pid = env.pid("kube-scheduler").unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let bound = |pod: &Pod| pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    let mut seen = first_placed(pods.clone(), bound);
    let (requests, cpu) = (api_requests(client).await, cpu_seconds(pid));
    let created_at: HashMap<&str, Instant> = futures::stream::iter(demand)
        .map(|d| {
            let pods = pods.clone();
            async move {
                let at = Instant::now();
                for pod in d.worker_pods() {
                    pods.create(&PostParams::default(), &pod).await.unwrap();
                }
                (d.name.as_str(), at)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let workers: usize = demand.iter().map(|d| d.workers).sum();
    let bound_at = collect_first(&mut seen, workers, "pods bound").await;
    let gpus: u64 = demand.iter().map(Demand::total_gpus).sum();
    // A request is placed when its last worker is bound.
    let mut latencies: Vec<Duration> = demand
        .iter()
        .map(|d| {
            let last = (0..d.workers).map(|w| bound_at[&format!("{}-w{w}", d.name)]).max();
            last.unwrap().saturating_duration_since(created_at[d.name.as_str()])
        })
        .collect();
    latencies.sort();
    let first = created_at.values().min().copied().unwrap();
    let last = bound_at.values().max().copied().unwrap();
    Placed {
        total: last - first,
        latencies,
        requests_per_gpu: total(&served_since(
            &requests,
            &api_requests(client).await,
            ("POST pods", workers),
        )) / gpus as f64,
        cpu_seconds: cpu_seconds(pid) - cpu,
        peak_rss_mib: rss_mib(pid, "VmHWM"),
    }
}

#[tokio::test]
#[ignore = "benchmark: run explicitly"]
async fn bench_gpumarket_against_kube_scheduler() {
    let (node_count, cluster_count) = (size("SCALE_NODES", 1_000), size("SCALE_CLUSTERS", 200));
    let env = Env::shared().await;
    let client = env.client().await.unwrap();

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
    let demand = Demand::mix(cluster_count);
    let gpus: u64 = demand.iter().map(Demand::total_gpus).sum();
    let workers: usize = demand.iter().map(|d| d.workers).sum();

    // kube-scheduler first, alone on the machine. Its pods stay (the simulated offers do not
    // count pods: the nodes are whole for gpumarket) and nothing binds pods after it.
    let pods_ns = env.namespace("scale-pods").await.unwrap();
    let scheduled = place_with_kube_scheduler(env, &client, &pods_ns, &demand).await;
    // Printed now: a run in which gpumarket does not finish still tells kube-scheduler's figures.
    println!("{cluster_count} requests ({workers} workers, {gpus} GPUs) on {node_count} nodes:");
    scheduled.print("kube-scheduler, plain pods", gpus, "create→all workers bound");

    let simulation = Simulation {
        price_per_gpu_hour: 2_000_000,
        wallet: std::sync::Arc::new(solana_sdk::signature::Keypair::new()),
        heartbeat: Duration::from_secs(15),
    };
    let suppliers = tokio::spawn(simulate::run(client.clone(), simulation));
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
        .args(["--heartbeat-timeout", "600s"])
        .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"));
    let pid = env.spawn("scale-controller", controller).unwrap();
    // Measured from a warm controller: its caches filled, every offer marked Available.
    eventually("every offer available", Duration::from_secs(300), || count_offers(true)).await;
    println!("controller ready, offers available, after {:.1} s", started.elapsed().as_secs_f64());
    // The suppliers' heartbeats stop while gpumarket places (the heartbeat timeout is longer
    // than the bench), so that the API requests counted are the controller's.
    suppliers.abort();

    let ns = env.namespace("scale").await.unwrap();
    let rays = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("ray.io", "v1", "RayCluster"),
            "rayclusters",
        ),
    );
    let mut seen = first_placed(rays, |_| true);
    let (requests, cpu) = (api_requests(&client).await, cpu_seconds(pid));
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let applied_at: HashMap<String, Instant> = futures::stream::iter(&demand)
        .map(|d| {
            let clusters = clusters.clone();
            async move {
                let at = Instant::now();
                clusters.create(&PostParams::default(), &d.gpu_cluster()).await.unwrap();
                (d.name.clone(), at)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let first_seen = collect_first(&mut seen, cluster_count, "RayClusters").await;
    let mut latencies: Vec<Duration> = first_seen
        .iter()
        .map(|(name, at)| at.saturating_duration_since(applied_at[name]))
        .collect();
    latencies.sort();
    let first_apply = applied_at.values().min().copied().unwrap();
    let own = ("POST gpuclusters", cluster_count);
    let served = served_since(&requests, &api_requests(&client).await, own);
    let matched = Placed {
        total: first_seen.values().max().copied().unwrap() - first_apply,
        latencies,
        requests_per_gpu: total(&served) / gpus as f64,
        cpu_seconds: cpu_seconds(pid) - cpu,
        peak_rss_mib: rss_mib(pid, "VmHWM"),
    };

    matched.print("gpumarket, GpuClusters", gpus, "apply→RayCluster");
    let per_cluster: Vec<String> =
        served.iter().map(|(kind, n)| format!("{:.2} {kind}", n / cluster_count as f64)).collect();
    println!("gpumarket's API requests per GpuCluster: {}", per_cluster.join(", "));
    println!(
        "gpumarket places GPUs at {:.2}× kube-scheduler's rate",
        matched.rate(gpus) / scheduled.rate(gpus)
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

/// The controller's memory with `SCALE_OFFERS` (10,000) offers of 8 GPUs on the market: the
/// offers published straight to the API as agents publish them (no nodes: the controller
/// caches offers, leases, clusters and Ray pods, not nodes), then the controller started and
/// left until it has marked every one Available. Prints its peak and current RSS.
#[tokio::test]
#[ignore = "benchmark: run explicitly"]
async fn bench_controller_memory_with_offers() {
    let count = size("SCALE_OFFERS", 10_000);
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let simulation = Simulation {
        price_per_gpu_hour: 2_000_000,
        wallet: std::sync::Arc::new(solana_sdk::signature::Keypair::new()),
        heartbeat: Duration::from_secs(15),
    };
    let offers: Api<GpuOffer> = Api::all(client.clone());
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let region = ["eu-west", "eu-north", "us-east", "us-west"][i % 4];
            let name = format!("memory-{i:05}");
            let node = GpuNode::new(&name, ["H100", "A100"][(i / 4) % 2], 8)
                .region(region)
                .zone(&format!("{region}-a"))
                .to_node()
                .unwrap();
            let spec = simulate::offer_for(&node, &simulation, None).unwrap();
            let offers = offers.clone();
            async move { simulate::publish(&offers, &name, &spec).await.unwrap() }
        })
        .buffer_unordered(32)
        .for_each(|_| async {})
        .await;
    println!("{count} offers published in {:.1} s", started.elapsed().as_secs_f64());

    let mut controller = Command::new(controller_binary());
    controller
        .env("KUBECONFIG", env.kubeconfig())
        .env("RUST_LOG", "warn")
        .args(["--heartbeat-timeout", "600s"]);
    let pid = env.spawn("memory-controller", controller).unwrap();
    let started = Instant::now();
    eventually("every offer available", Duration::from_secs(600), || {
        let offers = offers.clone();
        async move {
            let listed = offers.list(&Default::default()).await.ok()?.items;
            (listed.iter().filter(|o| o.is_available()).count() >= count).then_some(())
        }
    })
    .await;
    println!(
        "controller with {count} offers, every one Available after {:.1} s: peak RSS {:.0} MiB, \
         RSS now {:.0} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib(pid, "VmHWM"),
        rss_mib(pid, "VmRSS")
    );
}
