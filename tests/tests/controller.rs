//! The controller against the real API server and KWOK nodes: a GpuCluster is matched, bound
//! through leases, provisioned as a RayCluster on the right nodes, runs, expires; unmatched
//! requests wait with a reason and match when supply appears; racing clusters and racing
//! replicas never share a GPU; a silent supplier's workers are replaced (on its own GPUs again
//! when it comes back); deletion ends the leases first; a restarted controller converges
//! without duplicates; with settlement on the real validator, a cluster is bound only once
//! funded, only to offers staked as the MarketPolicy asks, and deleting it pays the supplier
//! and refunds the buyer to the base unit. Only offers signed by their wallet are matched: forged, replayed (even after a controller restart) and re-walleted
//! offers, and two offers claiming one GPU, are refused with the reason in their `Verified`
//! condition and an Event; the record of signing times drops offers gone for a day for a floor,
//! never over a concurrent write. A MarketPolicy change applies to the next lease and leaves running
//! ones alone; offers of a model it stops accepting are not matched until it accepts it again.
//!
//! The controller runs in-process (`gpumarket_controller::run`). Offers are published by the
//! test itself, heartbeating like an agent. KubeRay's operator is not running, so the test marks
//! RayClusters ready. Tests run one at a time (each starts its own controllers, which watch the
//! whole API server); each uses its own region so no test matches another's GPUs.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use gpumarket_controller::settlement::{SettlementConfig, Settler};
use gpumarket_controller::{Config, Settings};
use gpumarket_crds::common::quantity_scaled;
use gpumarket_crds::{
    ClusterPhase, EndReason, GpuCluster, GpuLease, GpuOffer, HostResources, LeasePhase,
    MarketPolicy, PerWorker,
};
use gpumarket_tests::solana::read_keypair;
use gpumarket_tests::supplier::{Supplier, add_node, signed_offer};
use gpumarket_tests::{Env, eventually};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::json;
use solana_sdk::signature::{Keypair, Signer};
use support::InProcessController;
use tokio::sync::{Mutex, MutexGuard};

const WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(30);

/// Tests take turns: every controller watches the whole API server.
static TURN: Mutex<()> = Mutex::const_new(());

/// What every test starts with: its turn, the environment, a client and its own namespace.
async fn setup(namespace: &str) -> (MutexGuard<'static, ()>, &'static Env, Client, String) {
    let turn = TURN.lock().await;
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace(namespace).await.unwrap();
    (turn, env, client, ns)
}

/// A controller replica running in this test's runtime; stopped when dropped.
struct Controller {
    _replica: InProcessController,
}

impl Controller {
    fn start(client: &Client) -> Self {
        Controller::start_with(client, None)
    }

    /// A replica that settles through `settler` (and provisions only funded clusters).
    fn start_with(client: &Client, settler: Option<Arc<Settler>>) -> Self {
        Controller::start_with_timeout(client, settler, Duration::from_secs(600))
    }

    /// A replica whose leases must serve within `provisioning_timeout` of their bind.
    fn start_with_timeout(
        client: &Client,
        settler: Option<Arc<Settler>>,
        provisioning_timeout: Duration,
    ) -> Self {
        let config = Config {
            settings: Settings {
                heartbeat_timeout: HEARTBEAT_TIMEOUT,
                orphan_grace: Duration::from_secs(2),
                provisioning_timeout,
                ..Settings::default()
            },
            ..Config::default()
        };
        Controller { _replica: InProcessController::start(client, config, settler) }
    }
}

fn gpu_cluster(name: &str, region: &str, workers: u32, gpus_per_worker: u32) -> GpuCluster {
    serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuCluster",
        "metadata": {"name": name},
        "spec": {
            "gpu": {"models": ["H100"]},
            "workers": workers,
            "gpusPerWorker": gpus_per_worker,
            "duration": "1h",
            "maxPricePerGpuHour": 5_000_000,
            "location": {"region": region},
            "payment": {"buyerWallet": WALLET},
        },
    }))
    .unwrap()
}

fn ray_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("ray.io", "v1", "RayCluster"),
        "rayclusters",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

async fn phase_of(api: &Api<GpuCluster>, name: &str) -> Option<ClusterPhase> {
    api.get_opt(name).await.ok().flatten()?.status?.phase
}

/// Apply `gpu_cluster(name, region, workers, gpus)` and wait until it is Provisioning.
async fn provision(
    clusters: &Api<GpuCluster>,
    name: &str,
    region: &str,
    workers: u32,
    gpus: u32,
) -> GpuCluster {
    let cluster = gpu_cluster(name, region, workers, gpus);
    clusters.create(&PostParams::default(), &cluster).await.unwrap();
    wait_phase(clusters, name, ClusterPhase::Provisioning).await
}

async fn wait_phase(api: &Api<GpuCluster>, name: &str, phase: ClusterPhase) -> GpuCluster {
    eventually(&format!("{name} to be {phase:?}"), WAIT, || async {
        let cluster = api.get(name).await.ok()?;
        (cluster.status.as_ref()?.phase == Some(phase)).then_some(cluster)
    })
    .await
}

async fn leases_of(client: &Client, cluster: &GpuCluster) -> Vec<GpuLease> {
    let uid = cluster.uid().unwrap();
    Api::<GpuLease>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|l| l.spec.cluster.uid == uid)
        .collect()
}

fn active(leases: &[GpuLease]) -> Vec<&GpuLease> {
    leases
        .iter()
        .filter(|l| l.status.as_ref().and_then(|s| s.phase) == Some(LeasePhase::Active))
        .collect()
}

/// Nodes the RayCluster's worker groups are pinned to.
fn pinned_nodes(ray: &DynamicObject) -> BTreeSet<String> {
    let value = serde_json::to_value(ray).unwrap();
    value["spec"]["workerGroupSpecs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            g["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// What KubeRay's operator would do once the pods run.
async fn mark_ray_ready(client: &Client, ns: &str, name: &str) {
    let patch = json!({"status": {"state": "ready"}});
    ray_api(client, ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("ray status");
}

/// Every GPU named by at most one active lease, and each allocated on its offer to that lease.
async fn assert_no_gpu_shared(client: &Client) {
    let leases =
        Api::<GpuLease>::all(client.clone()).list(&Default::default()).await.unwrap().items;
    let mut seen = BTreeSet::new();
    for lease in active(&leases) {
        for gpu in &lease.spec.gpus {
            assert!(
                seen.insert((lease.spec.offer.clone(), gpu.clone())),
                "GPU {gpu} is in two active leases"
            );
        }
    }
}

#[tokio::test]
async fn cluster_runs_on_the_matched_nodes_then_expires() {
    let (_turn, env, client, ns) = setup("ctl-lifecycle").await;
    let _a = Supplier::start(env, &client, "ctl-life-a", "life", 4, 1_000_000).await;
    let _b = Supplier::start(env, &client, "ctl-life-b", "life", 4, 2_000_000).await;
    let _controller = Controller::start(&client);

    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let provisioning = provision(&clusters, "train", "life", 2, 4).await;
    let leases = leases_of(&client, &provisioning).await;
    assert_eq!(active(&leases).len(), 2, "one lease per node: {leases:?}");
    let ray = ray_api(&client, &ns).get("train").await.unwrap();
    assert_eq!(
        pinned_nodes(&ray),
        BTreeSet::from(["ctl-life-a".to_string(), "ctl-life-b".to_string()])
    );
    let value = serde_json::to_value(&ray).unwrap();
    assert_eq!(
        value["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
            ["nvidia.com/gpu"],
        "4"
    );
    assert_eq!(
        value["metadata"]["ownerReferences"][0]["uid"].as_str(),
        provisioning.uid().as_deref()
    );
    let offer = Api::<GpuOffer>::all(client.clone()).get("ctl-life-a").await.unwrap();
    assert_eq!(offer.status.unwrap().free_gpus, Some(0));

    mark_ray_ready(&client, &ns, "train").await;
    let running = wait_phase(&clusters, "train", ClusterPhase::Running).await;
    let status = running.status.unwrap();
    assert_eq!(status.gpus, Some(8));
    assert_eq!(status.hourly_rate, Some(4 * 1_000_000 + 4 * 2_000_000));
    assert_eq!(
        status.dashboard.as_deref(),
        Some(format!("http://train-head-svc.{ns}.svc:8265").as_str())
    );

    // Travel in time: the cluster started 1h ago, less three seconds. Patched again if an
    // in-flight reconcile wrote the old start back.
    let started = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600 - 3);
    let completed = eventually("expiry", WAIT, || async {
        let cluster = clusters.get("train").await.ok()?;
        let status = cluster.status.clone()?;
        if status.phase == Some(ClusterPhase::Completed) {
            return Some(cluster);
        }
        if status.start_time.map(|t| t.0) != Some(started) {
            let patch = json!({"status": {"startTime": started}});
            clusters
                .patch_status("train", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .ok()?;
        }
        None
    })
    .await;
    let leases = leases_of(&client, &completed).await;
    assert!(
        leases.iter().all(|l| {
            let s = l.status.as_ref().unwrap();
            s.phase == Some(LeasePhase::Ended)
                && s.end_reason == Some(EndReason::Expired)
                && s.end_time.is_some()
        }),
        "{leases:?}"
    );
    eventually("RayCluster deleted", WAIT, || async {
        ray_api(&client, &ns).get_opt("train").await.unwrap().is_none().then_some(())
    })
    .await;
    eventually("GPUs returned", WAIT, || async {
        let offer = Api::<GpuOffer>::all(client.clone()).get("ctl-life-a").await.ok()?;
        (offer.status?.free_gpus == Some(4)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn unmatched_request_waits_with_a_reason_and_matches_when_supply_appears() {
    let (_turn, env, client, ns) = setup("ctl-pending").await;
    let _small = Supplier::start(env, &client, "ctl-pend-a", "pend", 2, 1_000_000).await;
    let _controller = Controller::start(&client);

    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    clusters.create(&PostParams::default(), &gpu_cluster("big", "pend", 1, 4)).await.unwrap();
    let pending =
        eventually("a Matched=False condition with the engine's explanation", WAIT, || async {
            let cluster = clusters.get("big").await.ok()?;
            let status = cluster.status.clone()?;
            let matched = status.conditions.iter().find(|c| c.type_ == "Matched")?;
            (status.phase == Some(ClusterPhase::Pending) && matched.reason == "NoMatchingSupply")
                .then(|| matched.message.clone())
        })
        .await;
    assert!(!pending.is_empty());

    // New supply alone (no edit of the GpuCluster, well within the 60 s recheck) triggers the match.
    let _big = Supplier::start(env, &client, "ctl-pend-b", "pend", 4, 1_000_000).await;
    let matched = eventually("the match after the offer appears", WAIT, || async {
        let phase = phase_of(&clusters, "big").await?;
        (phase != ClusterPhase::Pending).then_some(phase)
    })
    .await;
    assert!(matches!(matched, ClusterPhase::Matched | ClusterPhase::Provisioning), "{matched:?}");
    let ray = ray_api(&client, &ns).get("big").await.unwrap();
    assert_eq!(pinned_nodes(&ray), BTreeSet::from(["ctl-pend-b".to_string()]));
}

#[tokio::test]
async fn racing_clusters_and_replicas_never_share_a_gpu() {
    let (_turn, env, client, ns) = setup("ctl-race").await;
    let _a = Supplier::start(env, &client, "ctl-race-a", "race", 4, 1_000_000).await;
    // Two replicas without leader election: only the API server arbitrates.
    let _one = Controller::start(&client);
    let _two = Controller::start(&client);

    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let names = ["r1", "r2", "r3"];
    for name in names {
        clusters.create(&PostParams::default(), &gpu_cluster(name, "race", 1, 4)).await.unwrap();
    }
    let winner = eventually("one winner", WAIT, || async {
        for name in names {
            if matches!(phase_of(&clusters, name).await, Some(ClusterPhase::Provisioning)) {
                return Some(name);
            }
        }
        None
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for name in names.iter().filter(|n| **n != winner) {
        assert_eq!(
            phase_of(&clusters, name).await,
            Some(ClusterPhase::Pending),
            "{name} must wait"
        );
    }
    assert_no_gpu_shared(&client).await;
    for name in names {
        let cluster = clusters.get(name).await.unwrap();
        assert!(
            active(&leases_of(&client, &cluster).await).len() <= 1,
            "{name} has duplicate leases"
        );
    }

    // The next supply goes to a loser.
    let _b = Supplier::start(env, &client, "ctl-race-b", "race", 4, 1_000_000).await;
    eventually("a loser matched on the new node", WAIT, || async {
        let provisioned =
            futures::future::join_all(names.iter().map(|n| phase_of(&clusters, n))).await;
        (provisioned.iter().filter(|p| **p == Some(ClusterPhase::Provisioning)).count() == 2)
            .then_some(())
    })
    .await;
    assert_no_gpu_shared(&client).await;
}

#[tokio::test]
async fn silent_supplier_is_replaced_even_with_a_heartbeat_from_the_future_and_the_head_stays() {
    let (_turn, env, client, ns) = setup("ctl-failure").await;
    let mut suppliers = [
        Supplier::start(env, &client, "ctl-fail-a", "fail", 4, 1_000_000).await,
        Supplier::start(env, &client, "ctl-fail-b", "fail", 4, 1_000_000).await,
        Supplier::start(env, &client, "ctl-fail-c", "fail", 4, 3_000_000).await,
    ];
    let _controller = Controller::start(&client);
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    provision(&clusters, "resilient", "fail", 2, 4).await;
    mark_ray_ready(&client, &ns, "resilient").await;
    let running = wait_phase(&clusters, "resilient", ClusterPhase::Running).await;
    let before = ray_api(&client, &ns).get("resilient").await.unwrap();
    let used = pinned_nodes(&before);
    assert_eq!(used.len(), 2);

    // The victim's agent goes silent, its last heartbeat dated an hour ahead (a lying or badly
    // skewed clock): that must not keep the dead offer fresh.
    let victim = used.iter().next().unwrap().clone();
    suppliers.iter_mut().find(|s| s.name == victim).unwrap().stop();
    let ahead = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let lie = json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "status": {"lastHeartbeat": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ahead)},
    });
    Api::<GpuOffer>::all(client.clone())
        .patch_status(&victim, &PatchParams::apply("test-agent").force(), &Patch::Apply(&lie))
        .await
        .unwrap();
    let spare: BTreeSet<String> =
        suppliers.iter().map(|s| s.name.clone()).filter(|n| !used.contains(n)).collect();

    let after = eventually("a replacement worker group", WAIT, || async {
        let ray = ray_api(&client, &ns).get("resilient").await.ok()?;
        let nodes = pinned_nodes(&ray);
        (!nodes.contains(&victim) && nodes.len() == 2).then_some(ray)
    })
    .await;
    let nodes = pinned_nodes(&after);
    assert!(nodes.is_superset(&spare), "replacement on the spare node: {nodes:?}");
    let head =
        |ray: &DynamicObject| serde_json::to_value(ray).unwrap()["spec"]["headGroupSpec"].clone();
    assert_eq!(head(&before), head(&after), "the head is untouched");

    let leases = leases_of(&client, &running).await;
    let failed: Vec<&GpuLease> = leases
        .iter()
        .filter(|l| {
            l.status.as_ref().and_then(|s| s.end_reason) == Some(EndReason::SupplierFailure)
        })
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].spec.offer, victim);
    assert_eq!(active(&leases).len(), 2);
}

/// A supplier back from silence serves the cluster again on the same GPUs, through a lease of
/// its own: the ended one stays ended (seen in the chaos test: the re-placement reused the
/// ended lease's name, found it, and the cluster stayed a worker short).
#[tokio::test]
async fn a_supplier_back_from_silence_serves_the_cluster_again_on_the_same_gpus() {
    let (_turn, env, client, ns) = setup("ctl-comeback").await;
    let mut supplier = Supplier::start(env, &client, "ctl-back-a", "comeback", 2, 1_000_000).await;
    let _controller = Controller::start(&client);
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let cluster = provision(&clusters, "comeback", "comeback", 1, 2).await;
    mark_ray_ready(&client, &ns, "comeback").await;
    wait_phase(&clusters, "comeback", ClusterPhase::Running).await;
    let first = leases_of(&client, &cluster).await.remove(0);

    supplier.stop();
    let leases: Api<GpuLease> = Api::all(client.clone());
    eventually("the lease ended by the supplier's failure", WAIT, || async {
        let status = leases.get(&first.name_any()).await.ok()?.status?;
        (status.end_reason == Some(EndReason::SupplierFailure)).then_some(())
    })
    .await;
    let offers: Api<GpuOffer> = Api::all(client.clone());
    // Lease times are written to the second.
    let second = |t: Option<Time>| t.map(|t| t.0.as_second());
    let last_heartbeat =
        second(offers.get(&first.spec.offer).await.unwrap().status.unwrap().last_heartbeat);
    let ended = leases.get(&first.name_any()).await.unwrap().status.unwrap();
    assert!(last_heartbeat.is_some());
    assert_eq!(
        second(ended.end_time),
        last_heartbeat,
        "billed through its last heartbeat, not the silence"
    );
    supplier.resume().await;
    let again = eventually("a new lease on the node back", WAIT, || async {
        let all = leases_of(&client, &cluster).await;
        active(&all).into_iter().find(|l| l.name_any() != first.name_any()).cloned()
    })
    .await;
    assert_eq!((&again.spec.offer, &again.spec.gpus), (&first.spec.offer, &first.spec.gpus));
    let ended = leases.get(&first.name_any()).await.unwrap().status.unwrap();
    assert_eq!(ended.phase, Some(LeasePhase::Ended), "the first lease stays ended");
    assert_eq!(second(ended.end_time), last_heartbeat, "its end never moves");
    eventually("the cluster whole again", WAIT, || async {
        let status = clusters.get("comeback").await.ok()?.status?;
        let degraded =
            status.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True");
        (status.phase == Some(ClusterPhase::Running) && !degraded).then_some(())
    })
    .await;
    assert_no_gpu_shared(&client).await;
}

#[tokio::test]
async fn deletion_ends_the_leases_first() {
    let (_turn, env, client, ns) = setup("ctl-delete").await;
    let _a = Supplier::start(env, &client, "ctl-del-a", "del", 2, 1_000_000).await;
    let _controller = Controller::start(&client);
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let provisioning = provision(&clusters, "short", "del", 1, 2).await;

    clusters.delete("short", &DeleteParams::default()).await.unwrap();
    eventually("the GpuCluster gone", WAIT, || async {
        clusters.get_opt("short").await.unwrap().is_none().then_some(())
    })
    .await;
    let leases = leases_of(&client, &provisioning).await;
    assert_eq!(leases.len(), 1);
    let status = leases[0].status.as_ref().unwrap();
    assert_eq!(status.phase, Some(LeasePhase::Ended));
    assert_eq!(status.end_reason, Some(EndReason::Deleted));
    eventually("GPUs returned", WAIT, || async {
        let offer = Api::<GpuOffer>::all(client.clone()).get("ctl-del-a").await.ok()?;
        (offer.status?.free_gpus == Some(2)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn restarted_controller_converges_without_duplicates_and_survives_bad_objects() {
    let (_turn, env, client, ns) = setup("ctl-restart").await;
    let _a = Supplier::start(env, &client, "ctl-rest-a", "rest", 4, 1_000_000).await;
    let _b = Supplier::start(env, &client, "ctl-rest-b", "rest", 4, 1_000_000).await;
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);

    let first = Controller::start(&client);
    provision(&clusters, "steady", "rest", 2, 2).await;
    drop(first);

    // While no controller runs: the RayCluster is deleted by hand, an offer with no GPUs appears.
    ray_api(&client, &ns).delete("steady", &DeleteParams::default()).await.unwrap();
    let empty: GpuOffer = serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuOffer", "metadata": {"name": "ctl-rest-empty"},
        "spec": {"nodeName": "ctl-rest-empty", "wallet": WALLET, "gpus": [], "pricePerGpuHour": 1, "region": "rest"},
    }))
    .unwrap();
    Api::<GpuOffer>::all(client.clone()).create(&PostParams::default(), &empty).await.unwrap();

    let _second = Controller::start(&client);
    eventually("the RayCluster re-created", WAIT, || async {
        ray_api(&client, &ns).get_opt("steady").await.unwrap()
    })
    .await;
    mark_ray_ready(&client, &ns, "steady").await;
    let running = wait_phase(&clusters, "steady", ClusterPhase::Running).await;
    assert_eq!(
        leases_of(&client, &running).await.len(),
        active(&leases_of(&client, &running).await).len()
    );
    let leased: u32 =
        active(&leases_of(&client, &running).await).iter().map(|l| l.spec.workers).sum();
    assert_eq!(leased, 2, "no duplicate leases after the restart");
    assert_no_gpu_shared(&client).await;

    let reported = eventually("the empty offer reported unavailable", WAIT, || async {
        let offer = Api::<GpuOffer>::all(client.clone()).get("ctl-rest-empty").await.ok()?;
        let condition = offer.status?.conditions.into_iter().find(|c| c.type_ == "Available")?;
        Some(condition)
    })
    .await;
    assert_eq!((reported.status.as_str(), reported.reason.as_str()), ("False", "NoGpus"));
}

#[tokio::test]
async fn a_settled_cluster_pays_its_staked_supplier_for_served_time_and_refunds_the_rest() {
    let (_turn, env, client, ns) = setup("ctl-settled").await;
    let sol = env.solana().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let keypair = keys.path().join("settlement.json");
    sol.settlement_authority(&keypair).await.unwrap();
    let mut config = SettlementConfig::new(
        sol.rpc_url.clone(),
        keypair,
        sol.mint.to_string(),
        Duration::from_secs(3),
    );
    config.poll_interval = Duration::from_secs(1);
    config.heartbeat_timeout = HEARTBEAT_TIMEOUT;
    let settler = Arc::new(Settler::new(config).unwrap());
    // The minimum stake comes from the MarketPolicy, read live (no flag sets one here).
    let policies: Api<MarketPolicy> = Api::all(client.clone());
    let policy = json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "MarketPolicy",
        "metadata": {"name": "default"},
        "spec": {"minStakePerGpu": [{"tier": "H100", "amount": 500_000}]},
    });
    policies
        .patch("default", &PatchParams::apply("market-admin"), &Patch::Apply(&policy))
        .await
        .unwrap();

    // 1000 base units per GPU-second; the cheaper supplier never bonded stake.
    let price = 3_600_000;
    let supplier_key = read_keypair(&sol.suppliers[0]).unwrap();
    let supplier = supplier_key.pubkey();
    let unstaked = read_keypair(&sol.suppliers[1]).unwrap();
    let _a =
        Supplier::start_paid_to(env, &client, "ctl-pay-a", "pay", 2, price, &supplier_key).await;
    let _b =
        Supplier::start_paid_to(env, &client, "ctl-pay-b", "pay", 2, price / 2, &unstaked).await;
    env.start_kuberay(&ns).unwrap();
    let _controller = Controller::start_with(&client, Some(settler));

    // The supplier bonds stake from its own wallet into the node's stake account.
    let offers: Api<GpuOffer> = Api::all(client.clone());
    let stake_account = eventually("the stake account opened", WAIT, || async {
        let stake = offers.get("ctl-pay-a").await.ok()?.status?.stake?;
        stake.account.parse::<solana_sdk::pubkey::Pubkey>().ok()
    })
    .await;
    let buyer = read_keypair(&sol.buyer).unwrap();
    let stake = 1_000_000;
    sol.transfer(&buyer, &sol.token_account(&supplier), stake, None).await.unwrap();
    sol.transfer(&supplier_key, &stake_account, stake, Some("bond")).await.unwrap();

    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let mut spec = gpu_cluster("paid", "pay", 1, 2);
    spec.spec.payment.buyer_wallet = buyer.pubkey().to_string();
    let created = clusters.create(&PostParams::default(), &spec).await.unwrap();
    let asked = eventually("the deposit asked for", WAIT, || async {
        let status = clusters.get("paid").await.ok()?.status?;
        let funded = status.conditions.into_iter().find(|c| c.type_ == "Funded")?;
        (funded.status == "False" && funded.message.contains("escrow account"))
            .then_some(funded.message)
    })
    .await;
    let escrow = eventually("the escrow recorded", WAIT, || async {
        clusters
            .get("paid")
            .await
            .ok()?
            .status?
            .escrow?
            .account
            .parse::<solana_sdk::pubkey::Pubkey>()
            .ok()
    })
    .await;
    assert!(
        asked.contains("7.200000 more") && asked.contains(&escrow.to_string()),
        "says how much and where: {asked}"
    );
    assert!(leases_of(&client, &created).await.is_empty(), "nothing bound before the deposit");

    let (buyer_before, supplier_before) =
        (sol.balance(&buyer.pubkey()).await.unwrap(), sol.balance(&supplier).await.unwrap());
    let deposit = 2 * price; // two GPUs for the one hour of the spec
    sol.transfer(&buyer, &escrow, deposit, Some("deposit")).await.unwrap();
    wait_phase(&clusters, "paid", ClusterPhase::Provisioning).await;
    let leases = leases_of(&client, &created).await;
    assert_eq!(active(&leases).len(), 1);
    assert_eq!(leases[0].spec.offer, "ctl-pay-a", "the unstaked offer is never matched");
    // KubeRay starts the pods, KWOK makes them Ready: the lease serves and the cluster runs.
    wait_phase(&clusters, "paid", ClusterPhase::Running).await;
    let serving = eventually("the lease serving", WAIT, || async {
        let lease = leases_of(&client, &created).await.into_iter().next()?;
        lease.status?.serving_since
    })
    .await;
    assert!(serving.0 >= leases[0].spec.start_time.0, "billing starts at service, not before");
    tokio::time::sleep(Duration::from_secs(4)).await;

    clusters.delete("paid", &DeleteParams::default()).await.unwrap();
    eventually("the GpuCluster refunded and gone", Duration::from_secs(90), || async {
        clusters.get_opt("paid").await.unwrap().is_none().then_some(())
    })
    .await;
    let leases = leases_of(&client, &created).await;
    let status = leases[0].status.clone().unwrap();
    assert_eq!(status.phase, Some(LeasePhase::Settled), "{status:?}");
    assert_eq!(status.end_reason, Some(EndReason::Deleted));
    let paid = status.amount_settled.unwrap();
    let served = status.served_gpu_seconds.unwrap();
    assert!(paid > 0);
    assert_eq!(paid, served * 1000, "served time, to the base unit");
    assert!(served <= status.hired_gpu_seconds.unwrap(), "never more than the hire");
    assert_eq!(sol.balance(&supplier).await.unwrap() - supplier_before, paid);
    assert_eq!(buyer_before - sol.balance(&buyer.pubkey()).await.unwrap(), paid, "rest refunded");
    assert_eq!(sol.account_balance(&escrow).await.unwrap(), None, "the escrow is closed");
    assert_eq!(sol.account_balance(&stake_account).await.unwrap(), Some(stake), "stake intact");
    policies.delete("default", &DeleteParams::default()).await.unwrap();
}

/// Issue 13, 5: a lease whose workers never get Ready is ended within the provisioning timeout
/// as the supplier's failure, never billed, and the worker is placed on another offer.
#[tokio::test]
async fn a_lease_that_never_serves_ends_unbilled_and_its_worker_moves() {
    let (_turn, env, client, ns) = setup("ctl-serve").await;
    let _a = Supplier::start(env, &client, "ctl-serve-a", "serve", 2, 1_000_000).await;
    let _controller = Controller::start_with_timeout(&client, None, Duration::from_secs(3));
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let provisioning = provision(&clusters, "serve", "serve", 1, 2).await;
    let first = leases_of(&client, &provisioning).await.remove(0);
    // No KubeRay runs here: no worker ever gets Ready.
    let _b = Supplier::start(env, &client, "ctl-serve-b", "serve", 2, 1_000_000).await;
    let ended = eventually("the lease ended, not serving", WAIT, || async {
        let lease = Api::<GpuLease>::all(client.clone()).get(&first.name_any()).await.ok()?;
        let status = lease.status?;
        (status.end_reason == Some(EndReason::NotServing)).then_some(status)
    })
    .await;
    assert_eq!(ended.served_gpu_seconds, Some(0), "nothing billed");
    assert!(ended.hired_gpu_seconds.unwrap() >= 2 * 3, "hired for the timeout");
    assert!(ended.serving_since.is_none());
    let moved = eventually("a replacement lease", WAIT, || async {
        let leases = leases_of(&client, &provisioning).await;
        leases.into_iter().find(|l| l.name_any() != first.name_any())
    })
    .await;
    assert_ne!(moved.spec.offer, first.spec.offer, "placed on the other supplier");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually("an Event saying why the lease ended", WAIT, || async {
        let events = events.list(&Default::default()).await.ok()?.items;
        events
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("NotServing"))
            .filter_map(|e| e.note)
            .any(|n| n.contains("not Ready within 3s"))
            .then_some(())
    })
    .await;
}

/// Issue 13, 12: errors shown to buyers never carry the RPC URL (API keys live in it).
#[tokio::test]
async fn a_buyer_never_sees_the_rpc_url() {
    let (_turn, env, client, ns) = setup("ctl-secret").await;
    let sol = env.solana().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let keypair = keys.path().join("settlement.json");
    sol.settlement_authority(&keypair).await.unwrap();
    let unreachable = "http://127.0.0.1:9/rpc?api-key=SECRET-KEY".to_string();
    let config =
        SettlementConfig::new(unreachable, keypair, sol.mint.to_string(), Duration::from_secs(3));
    let settler = Arc::new(Settler::new(config).unwrap());
    let _a = Supplier::start(env, &client, "ctl-secret-a", "secret", 1, 1_000_000).await;
    let _controller = Controller::start_with(&client, Some(settler));
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    clusters.create(&PostParams::default(), &gpu_cluster("secret", "secret", 1, 1)).await.unwrap();
    let funded = eventually("the Funded condition", WAIT, || async {
        let status = clusters.get("secret").await.ok()?.status?;
        status.conditions.into_iter().find(|c| c.type_ == "Funded")
    })
    .await;
    assert_eq!(funded.status, "False");
    assert!(funded.message.contains("RPC endpoint did not answer"), "{}", funded.message);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let events = events.list(&Default::default()).await.unwrap().items;
    for text in std::iter::once(funded.message).chain(events.into_iter().filter_map(|e| e.note)) {
        assert!(!text.contains("SECRET") && !text.contains("127.0.0.1:9"), "leaked: {text}");
    }
}

#[tokio::test]
async fn a_cluster_out_of_funds_ends_instead_of_replacing_its_workers() {
    let (_turn, env, client, ns) = setup("ctl-dry").await;
    let _a = Supplier::start(env, &client, "ctl-dry-a", "dry", 2, 1_000_000).await;
    let _b = Supplier::start(env, &client, "ctl-dry-b", "dry", 2, 1_000_000).await;
    let _controller = Controller::start(&client);
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let provisioning = provision(&clusters, "dry", "dry", 1, 2).await;
    let leases = leases_of(&client, &provisioning).await;

    // What settlement does when the escrow runs dry.
    let patch = json!({"status": {
        "phase": "Ended", "endTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        "endReason": "OutOfFunds",
    }});
    Api::<GpuLease>::all(client.clone())
        .patch_status(&leases[0].name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    let failed = wait_phase(&clusters, "dry", ClusterPhase::Failed).await;
    let ready = failed.status.unwrap().conditions.into_iter().find(|c| c.type_ == "RayReady");
    assert_eq!(ready.map(|c| c.reason), Some("OutOfFunds".to_string()));
    let leases = leases_of(&client, &provisioning).await;
    assert_eq!(leases.len(), 1, "no replacement lease: {leases:?}");
    eventually("RayCluster deleted", WAIT, || async {
        ray_api(&client, &ns).get_opt("dry").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn new_supply_goes_to_the_oldest_waiting_request() {
    let (_turn, env, client, ns) = setup("ctl-fifo").await;
    let _controller = Controller::start(&client);
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    // The younger one sorts first by name: only age can put the older first.
    clusters.create(&PostParams::default(), &gpu_cluster("z-old", "fifo", 1, 4)).await.unwrap();
    wait_phase(&clusters, "z-old", ClusterPhase::Pending).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    clusters.create(&PostParams::default(), &gpu_cluster("a-young", "fifo", 1, 4)).await.unwrap();
    wait_phase(&clusters, "a-young", ClusterPhase::Pending).await;

    // Room for one of them; both are woken by the same offer.
    let _a = Supplier::start(env, &client, "ctl-fifo-a", "fifo", 4, 1_000_000).await;
    wait_phase(&clusters, "z-old", ClusterPhase::Provisioning).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase_of(&clusters, "a-young").await, Some(ClusterPhase::Pending));

    // The next supply is the younger one's.
    let _b = Supplier::start(env, &client, "ctl-fifo-b", "fifo", 4, 1_000_000).await;
    wait_phase(&clusters, "a-young", ClusterPhase::Provisioning).await;
}

#[tokio::test]
async fn workers_get_the_cpu_and_memory_that_come_with_their_gpus() {
    let (_turn, env, client, ns) = setup("ctl-cpu").await;
    // KWOK's node of 4 GPUs has 64 cores and 512 GiB allocatable: 16 cores and 128 GiB per GPU.
    let _a = Supplier::start_with_allocatable(env, &client, "ctl-cpu-a", "cpu", 4, 1_000_000).await;
    env.start_kuberay(&ns).unwrap();
    let _controller = Controller::start(&client);
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);

    // More CPU than comes with one GPU anywhere: unmatched, saying what to change.
    let mut greedy = gpu_cluster("greedy", "cpu", 1, 1);
    greedy.spec.per_worker = Some(PerWorker { cpu_millicores: Some(17_000), memory_mib: None });
    clusters.create(&PostParams::default(), &greedy).await.unwrap();
    let why = eventually("greedy explained", WAIT, || async {
        let status = clusters.get("greedy").await.ok()?.status?;
        let matched = status.conditions.into_iter().find(|c| c.type_ == "Matched")?;
        (matched.reason == "NoMatchingSupply").then_some(matched.message)
    })
    .await;
    assert!(why.contains("lower spec.perWorker.cpuMillicores"), "{why}");
    clusters.delete("greedy", &DeleteParams::default()).await.unwrap();

    // One worker of 2 GPUs asking 20 of its 32 cores; its memory is the share, 256 GiB.
    let mut train = gpu_cluster("train", "cpu", 1, 2);
    train.spec.per_worker = Some(PerWorker { cpu_millicores: Some(20_000), memory_mib: None });
    let created = clusters.create(&PostParams::default(), &train).await.unwrap();
    // KubeRay makes the worker pod, the scheduler admits it on the node, KWOK makes it Ready.
    wait_phase(&clusters, "train", ClusterPhase::Running).await;
    let leases = leases_of(&client, &created).await;
    let given = HostResources { cpu_millicores: 20_000, memory_bytes: 256 << 30 };
    assert_eq!(leases[0].spec.worker_resources, Some(given), "frozen on the lease");

    let ray = serde_json::to_value(ray_api(&client, &ns).get("train").await.unwrap()).unwrap();
    let params = &ray["spec"]["workerGroupSpecs"][0]["rayStartParams"];
    assert_eq!(params["num-cpus"], "20");
    assert_eq!(params["memory"], (256u64 << 30).to_string());
    assert_eq!(params["num-gpus"], "2");

    let workers = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("ray.io/node-type=worker"))
        .await
        .unwrap()
        .items;
    assert_eq!(workers.len(), 1, "{workers:?}");
    let worker = &workers[0];
    assert_eq!(worker.spec.as_ref().unwrap().node_name.as_deref(), Some("ctl-cpu-a"));
    let resources = worker.spec.as_ref().unwrap().containers[0].resources.clone().unwrap();
    for list in [resources.requests.unwrap(), resources.limits.unwrap()] {
        let read = |name: &str, scale| quantity_scaled(&list[name].0, scale);
        assert_eq!(read("cpu", 3), Some(given.cpu_millicores), "{list:?}");
        assert_eq!(read("memory", 0), Some(given.memory_bytes), "{list:?}");
        assert_eq!(read("nvidia.com/gpu", 0), Some(2), "{list:?}");
    }
    let qos = worker.status.as_ref().and_then(|s| s.qos_class.clone());
    assert_eq!(qos.as_deref(), Some("Guaranteed"));
}

/// The reason of the offer's `Verified` condition once it has `status`.
async fn verified(client: &Client, offer: &str, status: &str) -> String {
    eventually(&format!("{offer} Verified={status}"), WAIT, || async {
        let offer = Api::<GpuOffer>::all(client.clone()).get(offer).await.ok()?;
        let condition = offer.status?.conditions.into_iter().find(|c| c.type_ == "Verified")?;
        (condition.status == status).then_some(condition.reason)
    })
    .await
}

/// The notes of the controller's Events about the cluster-scoped object `name` (an offer, the
/// policy) with `reason` (such objects' Events go to the default namespace).
async fn events_about(client: &Client, name: &str, reason: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

/// The offers of a cluster's active leases.
async fn leased_offers(client: &Client, cluster: &GpuCluster) -> BTreeSet<String> {
    active(&leases_of(client, cluster).await).iter().map(|l| l.spec.offer.clone()).collect()
}

#[tokio::test]
async fn only_offers_signed_by_their_wallet_are_matched() {
    let (_turn, env, client, ns) = setup("ctl-verify").await;
    let region = "verify";
    let offers: Api<GpuOffer> = Api::all(client.clone());
    let (honest_wallet, thief) = (Keypair::new(), Keypair::new());
    // The honest supplier asks more than every impostor: a market that believed them would
    // match them first.
    let honest = "ctl-ver-honest";
    add_node(env, honest, region, 2).await;
    let honest_spec = signed_offer(honest, region, 2, 3_000_000, None, &honest_wallet);
    let _honest = Supplier::publish(&client, honest_spec.clone()).await;

    // Forged: signed by a key that is not the wallet's.
    let forged = "ctl-ver-forged";
    add_node(env, forged, region, 2).await;
    let mut spec = signed_offer(forged, region, 2, 1_000_000, None, &thief);
    spec.wallet = honest_wallet.pubkey().to_string();
    let _forged = Supplier::publish(&client, spec).await;

    // Replayed: the honest offer's signature on another node's offer of the same wallet.
    let replayed = "ctl-ver-replayed";
    add_node(env, replayed, region, 2).await;
    let mut spec = signed_offer(replayed, region, 2, 1_000_000, None, &honest_wallet);
    spec.signature = honest_spec.signature.clone();
    let _replayed = Supplier::publish(&client, spec).await;

    // Unsigned, where the market requires signatures.
    let unsigned = "ctl-ver-unsigned";
    add_node(env, unsigned, region, 2).await;
    let mut spec = signed_offer(unsigned, region, 2, 1_000_000, None, &thief);
    spec.signature = None;
    let _unsigned = Supplier::publish(&client, spec).await;

    // Signed anew (a later signing time, another price) after an earlier signed spec.
    let rolled_back = "ctl-ver-rollback";
    add_node(env, rolled_back, region, 2).await;
    let signed_at = |price, seconds: i64| {
        let mut spec = signed_offer(rolled_back, region, 2, price, None, &honest_wallet);
        let at = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + seconds);
        spec.signed_at = Some(Time(at.unwrap()));
        gpumarket_crds::signature::sign(&spec, &honest_wallet)
    };
    let (earlier, later) = (signed_at(6_000_000, -60), signed_at(7_000_000, 0));
    let _rolled_back = Supplier::publish(&client, later).await;

    // Rightly signed, then the payout wallet is swapped by someone who can edit the object.
    let swapped = "ctl-ver-swapped";
    add_node(env, swapped, region, 2).await;
    let _swapped = Supplier::publish(
        &client,
        signed_offer(swapped, region, 2, 1_000_000, None, &honest_wallet),
    )
    .await;

    let controller = Controller::start(&client);
    assert_eq!(verified(&client, swapped, "True").await, "Signed");
    let swap = json!({"spec": {"wallet": thief.pubkey().to_string()}});
    offers.patch(swapped, &PatchParams::default(), &Patch::Merge(&swap)).await.unwrap();

    assert_eq!(verified(&client, honest, "True").await, "Signed");
    for (offer, reason) in [
        (forged, "BadSignature"),
        (replayed, "BadSignature"),
        (swapped, "BadSignature"),
        (unsigned, "Unsigned"),
    ] {
        assert_eq!(verified(&client, offer, "False").await, reason, "{offer}");
        let notes = eventually(&format!("a {reason} Event on {offer}"), WAIT, || async {
            let notes = events_about(&client, offer, reason).await;
            (!notes.is_empty()).then_some(notes)
        })
        .await;
        println!("{offer}: {reason}: {}", notes[0]);
    }

    // The earlier signed spec re-applied by someone who can edit the offer: the API server
    // refuses to move the signing time back; deleted and re-created with it, the controller
    // refuses it as a replay.
    assert_eq!(verified(&client, rolled_back, "True").await, "Signed");
    let replay = json!({"spec": earlier});
    let refused = offers
        .patch(rolled_back, &PatchParams::default(), &Patch::Merge(&replay))
        .await
        .expect_err("an earlier signed spec");
    assert!(refused.to_string().contains("spec.signedAt cannot go back"), "{refused}");
    let recreate = |spec: gpumarket_crds::GpuOfferSpec| {
        let offers = offers.clone();
        async move {
            offers.delete(rolled_back, &DeleteParams::default()).await.unwrap();
            eventually("the offer gone", WAIT, || async {
                offers.get_opt(rolled_back).await.unwrap().is_none().then_some(())
            })
            .await;
            offers.create(&PostParams::default(), &GpuOffer::new(rolled_back, spec)).await.unwrap();
        }
    };
    recreate(earlier.clone()).await;
    assert_eq!(verified(&client, rolled_back, "False").await, "ReplayedSignature");
    // The controller restarts, and the offer is re-created with the earlier spec once more:
    // the newest signing time outlived the replica that saw it.
    drop(controller);
    recreate(earlier).await;
    let _controller = Controller::start(&client);
    assert_eq!(verified(&client, rolled_back, "False").await, "ReplayedSignature");

    // Only the honest node's two GPUs are supply: a cluster of one worker of two GPUs is bound
    // there, and a second such cluster waits.
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    clusters.create(&PostParams::default(), &gpu_cluster("signed", region, 1, 2)).await.unwrap();
    let first = wait_phase(&clusters, "signed", ClusterPhase::Provisioning).await;
    assert_eq!(leased_offers(&client, &first).await, BTreeSet::from([honest.to_string()]));
    clusters.create(&PostParams::default(), &gpu_cluster("second", region, 1, 2)).await.unwrap();
    let waiting = eventually("the second cluster waiting for verified supply", WAIT, || async {
        let status = clusters.get("second").await.ok()?.status?;
        let matched = status.conditions.iter().find(|c| c.type_ == "Matched")?;
        (status.phase == Some(ClusterPhase::Pending) && matched.reason == "NoMatchingSupply")
            .then_some(matched.message.clone())
    })
    .await;
    println!("second cluster: {waiting}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase_of(&clusters, "second").await, Some(ClusterPhase::Pending));
    let leases = Api::<GpuLease>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    let on_impostors: Vec<&str> = leases
        .items
        .iter()
        .map(|l| l.spec.offer.as_str())
        .filter(|o| [forged, replayed, unsigned, swapped].contains(o))
        .collect();
    assert!(on_impostors.is_empty(), "leases on unverified offers: {on_impostors:?}");
}

/// The record of signing times against the real API server: the times of offers gone for a
/// day are dropped for a floor, and a prune that raced another write changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn signing_times_of_offers_gone_give_way_to_a_floor_and_a_raced_prune_writes_nothing() {
    use gpumarket_controller::verification::signing_times::{self, Pruned};
    let (_turn, _env, client, ns) = setup("ctl-signing-times").await;
    let now = jiff::Timestamp::now();
    let ago = |hours: i64| now - jiff::SignedDuration::from_hours(hours);
    assert_eq!(signing_times::load(&client, &ns).await.unwrap(), Default::default());
    let times = [("gone-a", ago(48)), ("gone-b", ago(72)), ("here", ago(48)), ("recent", ago(1))];
    let times: Vec<(String, jiff::Timestamp)> =
        times.iter().map(|(offer, at)| (offer.to_string(), *at)).collect();
    signing_times::record(&client, &ns, &times).await.unwrap();
    let before = now - signing_times::RETENTION;
    let exists = |offer: &str| offer == "here";

    // Another replica records a time between this prune's read and its write.
    let handle = tokio::runtime::Handle::current();
    let raced = std::sync::atomic::AtomicBool::new(false);
    let racing = |offer: &str| {
        if !raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let late = [("late".to_string(), ago(2))];
            tokio::task::block_in_place(|| {
                handle.block_on(signing_times::record(&client, &ns, &late)).unwrap();
            });
        }
        exists(offer)
    };
    assert_eq!(signing_times::prune(&client, &ns, racing, before).await.unwrap(), None);
    let after_race = signing_times::load(&client, &ns).await.unwrap();
    assert_eq!(after_race.times.len(), 5, "nothing dropped: {after_race:?}");
    assert_eq!(after_race.floor, None);

    let pruned = signing_times::prune(&client, &ns, exists, before).await.unwrap();
    let expected = Pruned { offers: vec!["gone-a".into(), "gone-b".into()], floor: ago(48) };
    assert_eq!(pruned, Some(expected));
    let recorded = signing_times::load(&client, &ns).await.unwrap();
    let kept: BTreeSet<&str> = recorded.times.keys().map(String::as_str).collect();
    assert_eq!(kept, BTreeSet::from(["here", "recent", "late"]));
    assert_eq!(recorded.floor, Some(ago(48)));
    assert_eq!(signing_times::prune(&client, &ns, exists, before).await.unwrap(), None);
}

#[tokio::test]
async fn a_gpu_offered_by_two_nodes_quarantines_both_until_one_lets_go() {
    let (_turn, env, client, ns) = setup("ctl-dup").await;
    let region = "dup";
    let (first, second) = ("ctl-dup-a", "ctl-dup-b");
    add_node(env, first, region, 2).await;
    let _first = Supplier::publish(
        &client,
        signed_offer(first, region, 2, 1_000_000, None, &Keypair::new()),
    )
    .await;
    // Another agent, with a wallet of its own, claims the first node's second GPU.
    add_node(env, second, region, 2).await;
    let claimer = Keypair::new();
    let mut spec = signed_offer(second, region, 2, 1_000_000, None, &claimer);
    spec.gpus[0].uuid = format!("GPU-{first}-1");
    let mut second_supplier =
        Supplier::publish(&client, gpumarket_crds::signature::sign(&spec, &claimer)).await;
    let _controller = Controller::start(&client);

    for offer in [first, second] {
        assert_eq!(verified(&client, offer, "False").await, "DuplicateGpu", "{offer}");
        let notes = eventually(&format!("a DuplicateGpu Event on {offer}"), WAIT, || async {
            let notes = events_about(&client, offer, "DuplicateGpu").await;
            (!notes.is_empty()).then_some(notes)
        })
        .await;
        assert!(notes[0].contains(&format!("GPU-{first}-1")), "{notes:?}");
        println!("{offer}: {}", notes[0]);
    }
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    clusters.create(&PostParams::default(), &gpu_cluster("one-gpu", region, 1, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(phase_of(&clusters, "one-gpu").await, Some(ClusterPhase::Pending), "quarantined");

    // Resolved: the claimer's offer goes away; the first node is believed again and matched.
    second_supplier.stop();
    Api::<GpuOffer>::all(client.clone()).delete(second, &DeleteParams::default()).await.unwrap();
    assert_eq!(verified(&client, first, "True").await, "Signed");
    let bound = wait_phase(&clusters, "one-gpu", ClusterPhase::Provisioning).await;
    assert_eq!(leased_offers(&client, &bound).await, BTreeSet::from([first.to_string()]));
}

#[tokio::test]
async fn a_policy_change_applies_to_new_leases_and_leaves_running_ones_alone() {
    let (_turn, env, client, ns) = setup("ctl-policy").await;
    let region = "policy";
    let _signed = Supplier::start(env, &client, "ctl-pol-signed", region, 2, 1_000_000).await;
    let unsigned = "ctl-pol-unsigned";
    add_node(env, unsigned, region, 2).await;
    let mut spec = signed_offer(unsigned, region, 2, 1_000_000, None, &Keypair::new());
    spec.signature = None;
    let _unsigned = Supplier::publish(&client, spec).await;
    let _controller = Controller::start(&client);
    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let first = provision(&clusters, "before", region, 1, 2).await;
    let before = leases_of(&client, &first).await;
    assert_eq!(leased_offers(&client, &first).await, BTreeSet::from(["ctl-pol-signed".into()]));
    assert_eq!(verified(&client, unsigned, "False").await, "Unsigned");

    // The market stops requiring signatures: the unsigned offer is supply for the next cluster.
    let policies: Api<MarketPolicy> = Api::all(client.clone());
    let policy = json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "MarketPolicy",
        "metadata": {"name": "default"},
        "spec": {"requireSignedOffers": false, "provisioningTimeout": "20m"},
    });
    policies
        .patch("default", &PatchParams::apply("market-admin"), &Patch::Apply(&policy))
        .await
        .unwrap();
    let note = eventually("a PolicyChanged Event", WAIT, || async {
        events_about(&client, "default", "PolicyChanged").await.into_iter().next()
    })
    .await;
    println!("policy: {note}");
    assert!(note.contains("market-admin") && note.contains("requireSignedOffers: - → false"));
    assert_eq!(verified(&client, unsigned, "True").await, "Unsigned");
    let second = provision(&clusters, "after", region, 1, 2).await;
    assert_eq!(leased_offers(&client, &second).await, BTreeSet::from([unsigned.to_string()]));

    // The running lease kept its terms and runs on; the new one has the policy's.
    let after = leases_of(&client, &first).await;
    assert_eq!(
        before.iter().map(|l| &l.spec).collect::<Vec<_>>(),
        after.iter().map(|l| &l.spec).collect::<Vec<_>>()
    );
    assert_eq!(active(&after).len(), 1);
    let terms = |lease: &GpuLease| lease.spec.terms.clone().expect("terms frozen at binding");
    let (old, new) = (terms(&after[0]), terms(&leases_of(&client, &second).await[0]));
    assert_eq!((old.provisioning_timeout_seconds, old.heartbeat_timeout_seconds), (600, 4));
    assert_eq!((new.provisioning_timeout_seconds, new.heartbeat_timeout_seconds), (1200, 4));
    // Terms are the controller's: a lease spec does not change, not even its terms.
    let leases: Api<GpuLease> = Api::all(client.clone());
    let loosen = json!({"spec": {"terms": {"provisioningTimeoutSeconds": 86400}}});
    let refused = leases
        .patch(&after[0].name_any(), &PatchParams::default(), &Patch::Merge(&loosen))
        .await
        .expect_err("a lease's terms are frozen");
    assert!(refused.to_string().contains("immutable"), "{refused}");
    policies.delete("default", &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn offers_of_a_model_the_policy_stops_accepting_are_not_matched() {
    let (_turn, env, client, ns) = setup("ctl-models").await;
    let (region, offer) = ("models", "ctl-mod-h100");
    let _h100 = Supplier::start(env, &client, offer, region, 2, 1_000_000).await;
    let _controller = Controller::start(&client);
    assert_eq!(verified(&client, offer, "True").await, "Signed");

    let policies: Api<MarketPolicy> = Api::all(client.clone());
    let accept = |models: &[&str]| {
        let models: Vec<_> = models
            .iter()
            .map(|m| json!({"model": m, "tier": m, "relativeThroughputPermille": 1000}))
            .collect();
        json!({
            "apiVersion": "gpumarket.io/v1alpha1", "kind": "MarketPolicy",
            "metadata": {"name": "default"},
            "spec": {"acceptedModels": models},
        })
    };
    let apply = PatchParams::apply("market-admin");
    policies.patch("default", &apply, &Patch::Apply(&accept(&["A100"]))).await.unwrap();
    assert_eq!(verified(&client, offer, "False").await, "ModelNotAccepted");
    let message = Api::<GpuOffer>::all(client.clone())
        .get(offer)
        .await
        .unwrap()
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Verified"))
        .map(|c| c.message)
        .unwrap_or_default();
    println!("{offer}: {message}");
    assert!(message.contains("model H100 (MarketPolicy spec.acceptedModels lists A100)"));

    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    clusters.create(&PostParams::default(), &gpu_cluster("h100s", region, 1, 2)).await.unwrap();
    eventually("the cluster waiting for an accepted model", WAIT, || async {
        let status = clusters.get("h100s").await.ok()?.status?;
        let matched = status.conditions.iter().find(|c| c.type_ == "Matched")?;
        (status.phase == Some(ClusterPhase::Pending) && matched.reason == "NoMatchingSupply")
            .then_some(())
    })
    .await;

    policies.patch("default", &apply, &Patch::Apply(&accept(&["A100", "H100"]))).await.unwrap();
    assert_eq!(verified(&client, offer, "True").await, "Signed");
    let bound = wait_phase(&clusters, "h100s", ClusterPhase::Provisioning).await;
    assert_eq!(leased_offers(&client, &bound).await, BTreeSet::from([offer.to_string()]));
    policies.delete("default", &DeleteParams::default()).await.unwrap();
}
