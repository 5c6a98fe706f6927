//! GitOps: a buyer's GpuCluster synced by Argo CD (server-side apply under Argo CD's field
//! manager, `ServerSideApply=true`, no force) never drifts. At each phase of its life (Pending
//! waiting for the deposit, Running on KWOK nodes with KubeRay's pods, Completed and refunded)
//! a re-sync of the same manifest conflicts with nothing and changes nothing: the dry run that
//! `kubectl diff --server-side` does equals the live object, the real `kubectl diff` is empty,
//! and the apply writes nothing. Only Argo CD owns the buyer's fields; the controller owns the
//! status and its finalizers. Pruned as Argo CD prunes (background or its default foreground
//! deletion), after it completed or while it runs, the cluster ends and goes, its supplier paid
//! the served time and the rest of its escrow refunded to the buyer, to the base unit.
//!
//! The controller runs in-process with settlement on the real validator, as in controller.rs.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gpumarket_controller::settlement::{SettlementConfig, Settler};
use gpumarket_controller::{Config, Settings};
use gpumarket_crds::{ClusterPhase, GpuCluster, GpuLease, LeasePhase};
use gpumarket_tests::solana::read_keypair;
use gpumarket_tests::supplier::Supplier;
use gpumarket_tests::{Env, Solana, eventually};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::config::Kubeconfig;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signer};

/// The field manager Argo CD applies with (`ServerSideApply=true`).
const ARGOCD: &str = "argocd-controller";
/// The field manager of the controller's writes.
const CONTROLLER: &str = "gpumarket-controller";
/// 1000 base units per GPU-second.
const PRICE_PER_GPU_HOUR: u64 = 3_600_000;
const WAIT: Duration = Duration::from_secs(60);

/// The buyer's manifest in Git, as Argo CD applies it: its own labels and annotations, Argo
/// CD's tracking annotation, and a spec that leaves some fields to the schema's defaults.
fn manifest(ns: &str, region: &str, buyer: &Pubkey) -> Value {
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuCluster",
        "metadata": {
            "name": "synced",
            "namespace": ns,
            "labels": {"team": "ml", "app.kubernetes.io/part-of": "llm"},
            "annotations": {
                "argocd.argoproj.io/tracking-id": format!("llm:gpumarket.io/GpuCluster:{ns}/synced"),
                "example.com/owner": "ml-platform",
            },
        },
        "spec": {
            "gpu": {"models": ["H100"]},
            "workers": 1,
            "gpusPerWorker": 2,
            "duration": "10m",
            "maxPricePerGpuHour": PRICE_PER_GPU_HOUR,
            "location": {"region": region},
            "placement": "Pack",
            "ray": {"worker": {"env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}},
            "payment": {"buyerWallet": buyer.to_string()},
        },
    })
}

/// A sync as Argo CD does it with `ServerSideApply=true`: its field manager, no force.
fn argocd_apply() -> PatchParams {
    PatchParams::apply(ARGOCD)
}

/// `object` without what changes on every write or read (managed-field times, resourceVersion).
fn comparable(object: &GpuCluster) -> Value {
    let mut value = serde_json::to_value(object).unwrap();
    let metadata = value["metadata"].as_object_mut().unwrap();
    metadata.remove("resourceVersion");
    for entry in metadata.get_mut("managedFields").and_then(Value::as_array_mut).unwrap() {
        entry.as_object_mut().unwrap().remove("time");
    }
    value
}

/// Whether `fields` (a managedFields `fieldsV1` tree) names any field of the spec, or any of
/// the manifest's labels or annotations.
fn owns_buyer_fields(fields: &Value, manifest: &Value) -> bool {
    if fields.get("f:spec").is_some() {
        return true;
    }
    ["labels", "annotations"].iter().any(|kind| {
        let owned = &fields["f:metadata"][format!("f:{kind}")];
        let written = manifest["metadata"][kind].as_object().unwrap();
        written.keys().any(|key| owned.get(format!("f:{key}")).is_some())
    })
}

/// Argo CD re-syncs the unchanged manifest: no conflict, no drift, nothing written. `phase`
/// names the moment in failure messages. Retried while the controller writes the status
/// between the reads (a different resourceVersion), which is not drift.
async fn resync_changes_nothing(
    env: &Env,
    api: &Api<GpuCluster>,
    manifest: &Value,
    phase: &str,
) -> GpuCluster {
    let name = manifest["metadata"]["name"].as_str().unwrap();
    // `kubectl diff --server-side`, with Argo CD's manager, as an operator checks a sync.
    let mut diff = None;
    for _ in 0..10 {
        let out = kubectl_diff(env, manifest);
        if out.0 == Some(0) {
            diff = None;
            break;
        }
        diff = Some(out);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(diff, None, "{phase}: kubectl diff --server-side (exit code, output)");

    for _ in 0..20 {
        let live = api.get(name).await.unwrap();
        let dry = api
            .patch(name, &argocd_apply().dry_run(), &Patch::Apply(manifest))
            .await
            .unwrap_or_else(|e| panic!("{phase}: a dry-run sync failed (conflict?): {e}"));
        let applied = api
            .patch(name, &argocd_apply(), &Patch::Apply(manifest))
            .await
            .unwrap_or_else(|e| panic!("{phase}: a sync failed (conflict?): {e}"));
        let (rv, dry_rv, applied_rv) =
            (live.resource_version(), dry.resource_version(), applied.resource_version());
        if dry_rv != rv || applied_rv != rv {
            // The controller wrote in between; unless the sync itself wrote, read again.
            let after = api.get(name).await.unwrap();
            let argocd_time = |o: &GpuCluster| {
                o.managed_fields()
                    .iter()
                    .find(|m| m.manager.as_deref() == Some(ARGOCD))
                    .and_then(|m| m.time.clone())
            };
            assert_eq!(argocd_time(&after), argocd_time(&live), "{phase}: the sync wrote");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(comparable(&dry), comparable(&live), "{phase}: the dry-run sync differs");
        check_ownership(&live, manifest, phase);
        return live;
    }
    panic!("{phase}: the object never held still for a sync");
}

/// The buyer's fields are Argo CD's alone and as written; the controller owns its status and
/// finalizers and nothing the manifest says.
fn check_ownership(live: &GpuCluster, manifest: &Value, phase: &str) {
    let value = serde_json::to_value(live).unwrap();
    for kind in ["labels", "annotations"] {
        assert_eq!(value["metadata"][kind], manifest["metadata"][kind], "{phase}: {kind}");
    }
    // Every field the manifest sets, as set (the rest of the spec is the schema's defaults).
    fn contains(live: &Value, written: &Value) -> bool {
        match (live, written) {
            (Value::Object(l), Value::Object(w)) => {
                w.iter().all(|(k, v)| l.get(k).is_some_and(|lv| contains(lv, v)))
            }
            _ => live == written,
        }
    }
    assert!(contains(&value["spec"], &manifest["spec"]), "{phase}: spec {}", value["spec"]);
    let mut argocd = 0;
    for entry in live.managed_fields() {
        let manager = entry.manager.as_deref().unwrap_or_default();
        let fields = &entry.fields_v1.as_ref().unwrap().0;
        if manager == ARGOCD {
            assert_eq!(entry.operation.as_deref(), Some("Apply"));
            assert!(fields.get("f:spec").is_some(), "{phase}: Argo CD owns the spec");
            argocd += 1;
        } else {
            assert!(
                !owns_buyer_fields(fields, manifest),
                "{phase}: {manager} took buyer fields: {fields}"
            );
        }
    }
    assert_eq!(argocd, 1, "{phase}: one Argo CD entry");
    let finalizers_owner = live.managed_fields().iter().find(|entry| {
        entry.fields_v1.as_ref().unwrap().0["f:metadata"].get("f:finalizers").is_some()
    });
    assert_eq!(
        finalizers_owner.and_then(|entry| entry.manager.as_deref()),
        Some(CONTROLLER),
        "{phase}: the controller owns its finalizers"
    );
}

/// The real `kubectl diff --server-side --field-manager=argocd-controller`: (exit code, output).
fn kubectl_diff(env: &Env, manifest: &Value) -> (Option<i32>, String) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_string(manifest).unwrap()).unwrap();
    let mut kubectl: Command = env.tools().command("kubectl").unwrap();
    let out = kubectl
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .args(["diff", "--server-side", "--field-manager", ARGOCD, "-f"])
        .arg(file.path())
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

async fn wait_phase(api: &Api<GpuCluster>, name: &str, phase: ClusterPhase) -> GpuCluster {
    eventually(&format!("{name} to be {phase:?}"), WAIT, || async {
        let cluster = api.get(name).await.ok()?;
        (cluster.status.as_ref()?.phase == Some(phase)).then_some(cluster)
    })
    .await
}

async fn leases_of(client: &Client, uid: &str) -> Vec<GpuLease> {
    let leases = Api::<GpuLease>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    leases.items.into_iter().filter(|l| l.spec.cluster.uid == uid).collect()
}

/// Tests take turns: each runs a controller, which watches the whole API server.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A test's world: its namespace, a supplier node heartbeating in its own region, KubeRay's
/// operator, and the controller settling through its own authority on the validator.
struct Fixture {
    env: &'static Env,
    client: Client,
    ns: String,
    sol: &'static Solana,
    settler: Arc<Settler>,
    supplier: Pubkey,
    buyer: Keypair,
    clusters: Api<GpuCluster>,
    manifest: Value,
    controller: tokio::task::JoinHandle<()>,
    _node: Supplier,
    _keys: tempfile::TempDir,
}

impl Fixture {
    async fn start(region: &str) -> Fixture {
        let env = Env::shared().await;
        let client = env.client().await.unwrap();
        let ns = env.namespace(region).await.unwrap();
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
        let settler = Arc::new(Settler::new(config).unwrap());
        let supplier = read_keypair(&sol.suppliers[0]).unwrap();
        let node = Supplier::start_paid_to(
            env,
            &client,
            &format!("{region}-a"),
            region,
            2,
            PRICE_PER_GPU_HOUR,
            &supplier,
        )
        .await;
        env.start_kuberay(&ns).unwrap();
        let controller = {
            let settler = settler.clone();
            // As the controller's binary builds its client: named in every request.
            let kubeconfig = Kubeconfig::read_from(env.kubeconfig()).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .unwrap();
            let client = gpumarket_controller::client(config).unwrap();
            let config = Config { settings: Settings::default(), ..Config::default() };
            tokio::spawn(async move {
                gpumarket_controller::run_settling(client, config, settler).await.unwrap();
            })
        };
        let buyer = read_keypair(&sol.buyer).unwrap();
        let manifest = manifest(&ns, region, &buyer.pubkey());
        let clusters = Api::namespaced(client.clone(), &ns);
        Fixture {
            env,
            client,
            ns,
            sol,
            settler,
            supplier: supplier.pubkey(),
            buyer,
            clusters,
            manifest,
            controller,
            _node: node,
            _keys: keys,
        }
    }

    /// Argo CD creates the cluster from Git; it waits for its deposit, Pending.
    async fn sync_pending(&self) -> (GpuCluster, Pubkey) {
        self.clusters
            .patch("synced", &argocd_apply(), &Patch::Apply(&self.manifest))
            .await
            .unwrap();
        let escrow = eventually("the escrow asked for", WAIT, || async {
            let cluster = self.clusters.get("synced").await.ok()?;
            let status = cluster.status.as_ref()?;
            let funded = status.conditions.iter().find(|c| c.type_ == "Funded")?;
            (status.phase == Some(ClusterPhase::Pending) && funded.status == "False")
                .then_some(())?;
            status.escrow.as_ref()?.account.parse::<Pubkey>().ok()
        })
        .await;
        let pending =
            resync_changes_nothing(self.env, &self.clusters, &self.manifest, "Pending").await;
        (pending, escrow)
    }

    /// The buyer deposits what the match needs; KubeRay's pods get Ready on the KWOK node and
    /// the cluster runs, its lease paid for a first period.
    async fn fund_until_running(&self, escrow: &Pubkey) -> GpuCluster {
        let deposit =
            self.settler.required_deposit(2 * PRICE_PER_GPU_HOUR, Duration::from_secs(600));
        self.sol.transfer(&self.buyer, escrow, deposit, Some("deposit")).await.unwrap();
        wait_phase(&self.clusters, "synced", ClusterPhase::Running).await;
        let running =
            resync_changes_nothing(self.env, &self.clusters, &self.manifest, "Running").await;
        let uid = running.uid().unwrap();
        eventually("the lease paid for a period", WAIT, || async {
            let lease = leases_of(&self.client, &uid).await.into_iter().next()?;
            (lease.status?.amount_settled? > 0).then_some(())
        })
        .await;
        running
    }

    /// (buyer, supplier) balances.
    async fn balances(&self) -> (u64, u64) {
        (
            self.sol.balance(&self.buyer.pubkey()).await.unwrap(),
            self.sol.balance(&self.supplier).await.unwrap(),
        )
    }

    /// The cluster's one lease is settled: the supplier was paid its served time to the base
    /// unit and the buyer got the rest of the escrow back (balances from before the deposit),
    /// and the escrow is closed.
    async fn assert_settled_and_refunded(&self, uid: &str, escrow: &Pubkey, before: (u64, u64)) {
        let leases = leases_of(&self.client, uid).await;
        assert_eq!(leases.len(), 1, "{leases:?}");
        let lease = leases[0].status.clone().unwrap();
        assert_eq!(lease.phase, Some(LeasePhase::Settled), "{lease:?}");
        let paid = lease.amount_settled.unwrap();
        assert!(paid > 0);
        assert_eq!(paid, lease.served_gpu_seconds.unwrap() * 1000, "served time, to the base unit");
        let (buyer, supplier) = self.balances().await;
        assert_eq!(supplier - before.1, paid);
        assert_eq!(before.0 - buyer, paid, "the rest refunded");
        assert_eq!(self.sol.account_balance(escrow).await.unwrap(), None, "the escrow is closed");
    }

    /// Argo CD prunes the cluster with `policy`; the finalizers let go and it is gone.
    async fn prune(&self, policy: PropagationPolicy) {
        let prune = DeleteParams { propagation_policy: Some(policy), ..DeleteParams::default() };
        self.clusters.delete("synced", &prune).await.unwrap();
        eventually("the pruned GpuCluster gone", Duration::from_secs(90), || async {
            self.clusters.get_opt("synced").await.unwrap().is_none().then_some(())
        })
        .await;
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

#[tokio::test]
async fn argocd_resyncs_change_nothing_from_pending_to_completed_and_a_prune_lets_it_go() {
    let _turn = TURN.lock().await;
    let fx = Fixture::start("gitops-done").await;
    let (pending, escrow) = fx.sync_pending().await;
    assert!(pending.finalizers().len() >= 2, "{:?}", pending.finalizers());
    let before = fx.balances().await;
    let running = fx.fund_until_running(&escrow).await;
    assert_eq!(running.finalizers(), pending.finalizers(), "finalizers untouched by syncs");

    // Its duration runs out. Ten minutes (the shortest the schema allows) are too long to wait:
    // the start the controller recorded is moved back by them, as if they had passed.
    let started = running.status.as_ref().unwrap().start_time.clone().unwrap();
    let moved = Time(started.0 - jiff::SignedDuration::from_mins(10));
    let warp = Patch::Merge(json!({"status": {"startTime": moved}}));
    fx.clusters.patch_status("synced", &PatchParams::default(), &warp).await.unwrap();
    let refunded = eventually("the cluster completed and refunded", WAIT, || async {
        let cluster = fx.clusters.get("synced").await.ok()?;
        let status = cluster.status.as_ref()?;
        (status.phase == Some(ClusterPhase::Completed) && status.amount_refunded.is_some())
            .then_some(cluster)
    })
    .await;
    let completed = resync_changes_nothing(fx.env, &fx.clusters, &fx.manifest, "Completed").await;
    assert_eq!(completed.status, refunded.status, "a sync never touches the status");
    let uid = running.uid().unwrap();
    fx.assert_settled_and_refunded(&uid, &escrow, before).await;

    fx.prune(PropagationPolicy::Background).await;
    fx.assert_settled_and_refunded(&uid, &escrow, before).await;
}

/// Argo CD prunes a cluster while it runs (the manifest left Git), with its default foreground
/// propagation: the RayCluster (a dependent that blocks its owner's deletion) goes, the lease
/// ends and is paid, the escrow is refunded, and only then the GpuCluster goes.
#[tokio::test]
async fn argocd_pruning_a_running_cluster_pays_the_served_time_refunds_the_rest_and_lets_it_go() {
    let _turn = TURN.lock().await;
    let fx = Fixture::start("gitops-prune").await;
    let (_, escrow) = fx.sync_pending().await;
    let before = fx.balances().await;
    let running = fx.fund_until_running(&escrow).await;
    fx.prune(PropagationPolicy::Foreground).await;
    fx.assert_settled_and_refunded(&running.uid().unwrap(), &escrow, before).await;
    let rays = Api::<kube::api::DynamicObject>::namespaced_with(
        fx.client.clone(),
        &fx.ns,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("ray.io", "v1", "RayCluster"),
            "rayclusters",
        ),
    );
    assert!(rays.list(&ListParams::default()).await.unwrap().items.is_empty(), "RayCluster gone");
}
