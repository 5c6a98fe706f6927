//! The main path for real, on the real node: the chart installed as real pods from the local
//! images (the controller, and the supplier agent as the kubelet's device plugin with the fake
//! GPUs' CDI spec); a buyer's GpuCluster matched to the node's offer and funded on chain;
//! KubeRay's head and worker pods running the Ray image; a Ray job submitted through the
//! dashboard's job API whose `num_gpus=1` tasks see the GPUs the agent's Allocate gave their
//! worker (uuids in the environment, device nodes by CDI); then the cluster deleted, the lease
//! metered from the worker's Ready time and paid on chain to the base unit, the rest refunded.
//!
//! Faults on the way: the kubelet restarted under a running job (the agent registers again,
//! the job keeps its GPUs and succeeds); the worker pod deleted (the market says so, KubeRay
//! replaces it on the lease's node, the job runs again, submitted this time through the
//! dashboard `kubectl gpumarket dashboard` forwards to the buyer's machine). Bad input after it: an image nobody
//! can pull and an image without the spec's Ray version each fail their GpuCluster with a
//! condition that says so, before anything is billed, and the deposit comes back whole.
//!
//! Prints what it took (apply to job succeeded) and the memory of the environment with the
//! Ray cluster up. Needs root, like every real-node test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use gpumarket_controller::plugin::{self, Cli};

use gpumarket_crds::{ClusterPhase, EndReason, GpuCluster, GpuLease, GpuOffer, LeasePhase};
use gpumarket_tests::ports::free_tcp_ports;
use gpumarket_tests::process::RESTARTED;
use gpumarket_tests::ray::{Dashboard, python_entrypoint};
use gpumarket_tests::real_node::{FAKE_DRIVER_LIBRARY, FAKE_GPUS, NODE_NAME, fake_gpu_uuid};
use gpumarket_tests::solana::{Solana, read_keypair};
use gpumarket_tests::{Env, EnvOptions, chart, eventually};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use solana_sdk::signature::{Keypair, Signer};
use tokio::task::JoinHandle;

/// 1,000 base units per GPU-second: amounts read as served seconds.
const PRICE_PER_GPU_HOUR: u64 = 3_600_000;
const RAY_IMAGE: &str = "ghcr.io/gpumarket/ray:2.41.0";
const RAY_VERSION: &str = "2.41.0";
/// Ray on a shared two-core machine: pods and the job take minutes, not seconds.
const WAIT: Duration = Duration::from_secs(600);

/// Every GPU of the node for one worker: in a `num_gpus=1` task per GPU, Ray hands each its own.
/// The tasks wait for one another before they answer (and ask for no CPU, which the worker may
/// have one of): a task that ended before the next began would hand its GPU on, and both would
/// rightly report the same one.
const JOB: &str = r#"import json, os, time, ray
ray.init()
@ray.remote(num_cpus=0)
class Arrivals:
    def __init__(self): self.count = 0
    def arrive(self): self.count += 1
    def all(self, n): return self.count >= n
@ray.remote(num_gpus=1, num_cpus=0)
def gpu(arrivals, n):
    ray.get(arrivals.arrive.remote())
    while not ray.get(arrivals.all.remote(n)): time.sleep(0.1)
    return {"rayGpuIds": [str(i) for i in ray.get_gpu_ids()],
            "uuids": os.environ.get("GPUMARKET_GPU_UUIDS", ""),
            "deviceNodes": sorted(d for d in os.listdir("/dev") if d.startswith("nvidia")),
            "driverLibrary": os.path.exists(DRIVER_LIBRARY)}
n = int(ray.cluster_resources()["GPU"])
arrivals = Arrivals.remote()
print("GPUS " + json.dumps(ray.get([gpu.remote(arrivals, n) for _ in range(n)])))
"#;

/// Every GPU held by a task for a minute, all at once: long enough to restart the kubelet under
/// them.
const HOLD_JOB: &str = r#"import time, ray
ray.init()
@ray.remote(num_gpus=1, num_cpus=0)
def hold():
    time.sleep(60)
    return ray.get_gpu_ids()
print("HELD", ray.get([hold.remote() for _ in range(int(ray.cluster_resources()["GPU"]))]))
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
    let train = gpu_cluster("train", &buyer, FAKE_GPUS, RAY_IMAGE, RAY_VERSION);
    clusters.create(&PostParams::default(), &train).await.unwrap();
    let (buyer_before, supplier_before) =
        (sol.balance(&buyer.pubkey()).await.unwrap(), sol.balance(&supplier).await.unwrap());
    // price × GPUs × one hour, no margin.
    let escrow = deposit(sol, &clusters, "train", &buyer, FAKE_GPUS).await;
    eventually("the GpuCluster Running", WAIT, || async {
        let cluster = clusters.get("train").await.ok()?;
        (cluster.status?.phase == Some(ClusterPhase::Running)).then_some(())
    })
    .await;
    let running = applied.elapsed();

    let dashboard = Dashboard::find(node, "train", &ns, WAIT).await.unwrap();
    let job =
        python_entrypoint(&JOB.replace("DRIVER_LIBRARY", &format!("{FAKE_DRIVER_LIBRARY:?}")));
    let run = dashboard.run("gpus", &job, WAIT).await.unwrap();
    assert_eq!(run.status, "SUCCEEDED", "{}", run.logs);
    let job_done = applied.elapsed();
    let uid = clusters.get("train").await.unwrap().uid().unwrap();
    let lease = leases_of(&client, &uid).await.pop().unwrap();
    check_gpus_seen(&run.logs, &lease, node.slot);
    check_metered_from_ready(&client, &ns, &lease).await;
    println!("GpuCluster apply → Running: {running:.1?}; → Ray job succeeded: {job_done:.1?}");
    println!("memory with the Ray cluster up: {}", memory_report(&env, node.slot));

    kubelet_restart_keeps_the_jobs_gpus(&env, &client, &ns, &dashboard).await;
    lost_worker_is_replaced(&client, &ns, &lease).await;
    // This time from where a buyer stands, outside the pod network: through the dashboard that
    // `kubectl gpumarket dashboard` forwards (API server, kubelet, head pod).
    let (forwarded, forwarding) = forward_dashboard(&env, &ns, "train").await;
    let run = forwarded.run("gpus-again", &job, WAIT).await.unwrap();
    assert_eq!(run.status, "SUCCEEDED", "the job runs again on the new worker: {}", run.logs);
    check_gpus_seen(&run.logs, &lease, node.slot);
    forwarding.abort();

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

    broken_workloads_fail_before_billing(sol, &client, &ns, &buyer, supplier).await;
}

/// What `kubectl gpumarket` prints, shared with the task running it.
#[derive(Clone, Default)]
struct Printed(Arc<Mutex<Vec<u8>>>);

impl Write for Printed {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `kubectl gpumarket dashboard NAME --port P` running until the task is aborted, and the
/// dashboard at the local address it printed.
async fn forward_dashboard(env: &Env, ns: &str, name: &str) -> (Dashboard, JoinHandle<()>) {
    let port = free_tcp_ports(1).unwrap()[0].to_string();
    let kubeconfig = env.kubeconfig().display().to_string();
    let argv = ["kubectl-gpumarket", "--kubeconfig", &kubeconfig, "-n", ns];
    let cli =
        Cli::try_parse_from(argv.into_iter().chain(["dashboard", name, "--port", &port])).unwrap();
    let printed = Printed::default();
    let forwarding = tokio::spawn({
        let mut out = printed.clone();
        async move {
            if let Err(e) = plugin::run(cli, &mut out).await {
                eprintln!("kubectl gpumarket dashboard: {e:#}");
            }
        }
    });
    let address = format!("http://127.0.0.1:{port}");
    let text = eventually("the dashboard forwarded", Duration::from_secs(30), || async {
        let text = String::from_utf8_lossy(&printed.0.lock().unwrap()).into_owned();
        text.contains("Ray job submission").then_some(text)
    })
    .await;
    assert!(
        text.contains(&format!("Ray dashboard:        {address}"))
            && text.contains(&format!("ray job submit --address {address}")),
        "{text}"
    );
    (Dashboard { address }, forwarding)
}

/// The kubelet restarted while a job holds every GPU: the agent registers again (the kubelet
/// logs it, the GPUs are allocatable again), the worker keeps running untouched and the job
/// succeeds.
async fn kubelet_restart_keeps_the_jobs_gpus(
    env: &Env,
    client: &Client,
    ns: &str,
    dashboard: &Dashboard,
) {
    let hold = python_entrypoint(HOLD_JOB);
    dashboard.wait_for("hold", &hold, &["RUNNING"], WAIT).await.unwrap();
    let worker = only_worker(client, ns).await;
    // The tasks take their GPUs within moments of the driver starting.
    tokio::time::sleep(Duration::from_secs(10)).await;
    env.restart("kubelet").unwrap();
    let log = env.dir().join("logs/kubelet.log");
    eventually("the agent registered with the restarted kubelet", WAIT, || async {
        let text = std::fs::read_to_string(&log).ok()?;
        let (_, after) = text.rsplit_once(RESTARTED)?;
        after
            .lines()
            .any(|l| {
                l.contains("Got registration request from device plugin")
                    && l.contains("nvidia.com/gpu")
            })
            .then_some(())
    })
    .await;
    let nodes: Api<Node> = Api::all(client.clone());
    eventually("the GPUs allocatable again after the restart", WAIT, || async {
        let node = nodes.get(NODE_NAME).await.ok()?;
        let allocatable = node.status?.allocatable?;
        (allocatable.get("nvidia.com/gpu")?.0 == FAKE_GPUS.to_string()).then_some(())
    })
    .await;
    let run = dashboard.run("hold", &hold, WAIT).await.unwrap();
    assert_eq!(run.status, "SUCCEEDED", "{}", run.logs);
    assert!(run.logs.contains("HELD"), "{}", run.logs);
    let after = only_worker(client, ns).await;
    assert_eq!(after.uid(), worker.uid(), "the same worker pod");
    let restarts: i32 =
        after.status.unwrap().container_statuses.unwrap().iter().map(|c| c.restart_count).sum();
    assert_eq!(restarts, 0, "its containers never restarted");
}

/// The worker pod deleted: the GpuCluster's Events say it was lost, KubeRay starts another on
/// the lease's node with the same GPUs, and the lease records it.
async fn lost_worker_is_replaced(client: &Client, ns: &str, lease: &GpuLease) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lost = only_worker(client, ns).await;
    pods.delete(&lost.name_any(), &DeleteParams::default()).await.unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually("an Event saying the worker pod was lost", WAIT, || async {
        let list =
            events.list(&ListParams::default().fields("involvedObject.name=train")).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("WorkerPodLost")
                    && e.message.as_deref().unwrap_or_default().contains(&lost.name_any())
            })
            .then_some(())
    })
    .await;
    let leases: Api<GpuLease> = Api::all(client.clone());
    let replacement = eventually("a new worker pod Ready, recorded by the lease", WAIT, || async {
        let workers =
            pods.list(&ListParams::default().labels("ray.io/node-type=worker")).await.ok()?;
        let new = workers
            .items
            .into_iter()
            .find(|p| p.uid() != lost.uid() && p.metadata.deletion_timestamp.is_none())?;
        let status = leases.get(&lease.name_any()).await.ok()?.status?;
        let recorded = status.pods.iter().any(|p| Some(&p.uid) == new.uid().as_ref() && p.ready);
        recorded.then_some(new)
    })
    .await;
    assert_eq!(replacement.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE_NAME));
}

/// Two buyers' mistakes: an image no node can pull, and an image whose Ray is not the spec's
/// version. Each GpuCluster is matched and funded, then Failed with the reason in its RayReady
/// condition before any lease served: the lease ends WorkloadFailed (not the supplier's
/// failure), nothing is paid, and the whole deposit comes back.
async fn broken_workloads_fail_before_billing(
    sol: &Solana,
    client: &Client,
    ns: &str,
    buyer: &Keypair,
    supplier: solana_sdk::pubkey::Pubkey,
) {
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), ns);
    let broken = [
        (
            "missing-image",
            "ghcr.io/gpumarket/ray:missing",
            RAY_VERSION,
            "ImageUnavailable",
            "ghcr.io/gpumarket/ray:missing",
        ),
        (
            "old-ray",
            RAY_IMAGE,
            "2.9.3",
            "RayVersionMismatch",
            "the image has Ray 2.41.0; spec.ray.version asks 2.9.3",
        ),
    ];
    let (buyer_before, supplier_before) =
        (sol.balance(&buyer.pubkey()).await.unwrap(), sol.balance(&supplier).await.unwrap());
    for (name, image, version, _, _) in broken {
        let cluster = gpu_cluster(name, buyer, 1, image, version);
        clusters.create(&PostParams::default(), &cluster).await.unwrap();
        deposit(sol, &clusters, name, buyer, 1).await;
    }
    for (name, _, _, reason, says) in broken {
        let status = eventually(&format!("{name} Failed and refunded"), WAIT, || async {
            let status = clusters.get(name).await.ok()?.status?;
            (status.phase == Some(ClusterPhase::Failed) && status.amount_refunded.is_some())
                .then_some(status)
        })
        .await;
        let ray = status.conditions.iter().find(|c| c.type_ == "RayReady").unwrap();
        assert_eq!(ray.reason, reason, "{ray:?}");
        assert!(ray.message.contains(says), "{ray:?}");
        assert_eq!(status.amount_refunded, Some(PRICE_PER_GPU_HOUR), "the whole deposit back");
        let uid = clusters.get(name).await.unwrap().uid().unwrap();
        let lease = leases_of(client, &uid).await.pop().expect("it was matched").status.unwrap();
        assert_eq!(lease.end_reason, Some(EndReason::WorkloadFailed), "{lease:?}");
        assert_eq!(lease.serving_since, None, "{lease:?}");
        assert_eq!(lease.amount_settled.unwrap_or(0), 0, "{lease:?}");
        clusters.delete(name, &DeleteParams::default()).await.unwrap();
    }
    assert_eq!(sol.balance(&buyer.pubkey()).await.unwrap(), buyer_before, "nothing billed");
    assert_eq!(sol.balance(&supplier).await.unwrap(), supplier_before, "nothing paid");
}

/// One worker of `gpus` GPUs of the real node's model, running `image` as Ray `version`.
fn gpu_cluster(name: &str, buyer: &Keypair, gpus: usize, image: &str, version: &str) -> GpuCluster {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "gpu": {"models": ["H100"]},
            "workers": 1,
            "gpusPerWorker": gpus,
            "duration": "1h",
            "maxPricePerGpuHour": PRICE_PER_GPU_HOUR,
            "ray": {
                "version": version,
                "image": image,
                "headResources": {
                    "requests": {"cpu": "500m", "memory": "2Gi"},
                    "limits": {"cpu": "500m", "memory": "2Gi"},
                },
            },
            "payment": {"buyerWallet": buyer.pubkey().to_string()},
        },
    }))
    .unwrap()
}

/// Pay price × `gpus` × one hour (the cluster's duration, no margin) into the escrow the
/// controller opened for cluster `name`; returns the escrow account.
async fn deposit(
    sol: &Solana,
    clusters: &Api<GpuCluster>,
    name: &str,
    buyer: &Keypair,
    gpus: usize,
) -> solana_sdk::pubkey::Pubkey {
    let escrow = eventually(&format!("the escrow {name} asks for"), WAIT, || async {
        clusters.get(name).await.ok()?.status?.escrow?.account.parse().ok()
    })
    .await;
    let amount = PRICE_PER_GPU_HOUR * gpus as u64;
    sol.transfer(buyer, &escrow, amount, Some("deposit")).await.unwrap();
    escrow
}

/// The cluster's one worker pod (not being deleted).
async fn only_worker(client: &Client, ns: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let workers =
        pods.list(&ListParams::default().labels("ray.io/node-type=worker")).await.unwrap();
    let mut live = workers.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none());
    let worker = live.next().expect("a worker pod");
    assert!(live.next().is_none(), "one worker pod");
    worker
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
