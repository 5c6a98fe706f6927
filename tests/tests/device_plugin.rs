//! The supplier agent against the real API server: for a KWOK GPU node it publishes the node's
//! GpuOffer (region and zone from the node's labels), taints the node, heartbeats, reports an
//! XID injected through the fake device source in the offer's status, and once it stops, the
//! controller marks the offer unavailable.
//!
//! The agent runs in-process in offer-only mode (the kubelet side is tested over unix sockets in
//! device-plugin/tests/kubelet.rs); the controller runs in-process with a short heartbeat timeout.
//! The plugin-mode agent's watch of its node's GpuLeases (selected by `spec.offer`, a selectable
//! field the API server must serve) picks up a lease's worker pods from its status and drops the
//! lease once it ends.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpumarket_crds::common::SUPPLIER_TAINT;
use gpumarket_crds::{GpuHealth, GpuLease, GpuOffer, HostResources, Interconnect, OfferMode};
use gpumarket_device_plugin::agent::{Agent, AgentConfig};
use gpumarket_device_plugin::allocation::{NodeLease, PodName};
use gpumarket_device_plugin::config::{Mode, Supplier, WalletKey};
use gpumarket_device_plugin::leases::follow_leases;
use gpumarket_device_plugin::offer::Reserve;
use gpumarket_device_plugin::registration::PluginSocket;
use gpumarket_device_plugin::source::fake::{FakeFault, FakeSource};
use gpumarket_tests::{Env, GpuNode};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use solana_sdk::signature::Keypair;
use tokio::sync::watch;

const WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
const NODE: &str = "dp-h100";
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(30);

const TWO_H100: &str = "
driverVersion: 560.35.03
cudaVersion: '12.6'
gpus:
  - {uuid: GPU-dp-0, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559, nvlinkPeers: [GPU-dp-1]}
  - {uuid: GPU-dp-1, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}
";

/// Polls `get` until `done` holds for its answer; the answer.
async fn wait_for<T, F, Fut>(what: &str, mut get: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = get().await.filter(|v| done(v)) {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn health_of(offer: &GpuOffer, uuid: &str) -> Option<(GpuHealth, Option<String>)> {
    let gpu = offer.status.as_ref()?.gpus.iter().find(|g| g.uuid == uuid)?;
    Some((gpu.health?, gpu.reason.clone()))
}

fn heartbeat(offer: &GpuOffer) -> Option<jiff::Timestamp> {
    offer.status.as_ref()?.last_heartbeat.as_ref().map(|t| t.0)
}

#[tokio::test]
async fn the_agent_publishes_heartbeats_and_reports_health_until_it_stops() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    env.add_gpu_nodes(&[GpuNode::new(NODE, "H100", 2).region("dp-west").zone("dp-west-1a")])
        .await
        .unwrap();

    let source = FakeSource::from_yaml(TWO_H100).unwrap();
    let injector = source.injector();
    let wallet = WalletKey(Arc::new(Keypair::new()));
    let config = AgentConfig {
        node_name: NODE.into(),
        // No region or zone given: the agent takes the node's topology labels.
        supplier: Supplier {
            wallet: wallet.public_key(),
            wallet_key: Some(wallet.clone()),
            prices: [("H100".to_string(), 2_200_000)].into(),
            region: None,
            zone: None,
        },
        mode: Mode::OfferOnly,
        socket: PluginSocket { dir: env.dir().to_owned(), resource_name: "nvidia.com/gpu".into() },
        cdi: false,
        cdi_spec_dir: env.dir().join("cdi"),
        heartbeat: Duration::from_secs(1),
        pod_resources_socket: env.dir().join("pod-resources.sock"),
        lease_wait: Duration::from_secs(1),
        // Kept out for the node's other pods: half a core and a GiB.
        reserve: Reserve { cpu_millicores: 500, memory_bytes: 1 << 30 },
    };
    let agent = Agent::prepare(config, Arc::new(source)).unwrap();
    let agent = tokio::spawn(agent.run(Some(client.clone())));

    let offers: Api<GpuOffer> = Api::all(client.clone());
    let get = || async { offers.get_opt(NODE).await.unwrap() };
    let offer =
        wait_for("the offer and its first heartbeat", get, |o| heartbeat(o).is_some()).await;
    assert_eq!(offer.spec.wallet, wallet.public_key());
    assert_eq!(gpumarket_crds::signature::verify(&offer.spec), Ok(()), "signed by the wallet");
    assert_eq!(offer.spec.price_per_gpu_hour, 2_200_000);
    assert_eq!(
        (offer.spec.region.as_str(), offer.spec.zone.as_deref()),
        ("dp-west", Some("dp-west-1a"))
    );
    assert_eq!(
        offer.spec.gpus.iter().map(|g| g.model.as_str()).collect::<Vec<_>>(),
        ["H100", "H100"]
    );
    assert_eq!(
        (offer.spec.interconnect, offer.spec.mode),
        (Interconnect::NvLink, OfferMode::OfferOnly)
    );
    assert_eq!(offer.spec.driver_version.as_deref(), Some("560.35.03"));
    // The KWOK node's allocatable (16 cores and 128 GiB per GPU) less the reserve, for leases
    // to share.
    assert_eq!(
        offer.spec.allocatable,
        Some(HostResources { cpu_millicores: 31_500, memory_bytes: 255 << 30 })
    );
    assert_eq!(health_of(&offer, "GPU-dp-1"), Some((GpuHealth::Healthy, None)));

    let first = heartbeat(&offer).unwrap();
    wait_for("a later heartbeat", get, |o| heartbeat(o).is_some_and(|t| t > first)).await;

    let node = Api::<Node>::all(client.clone()).get(NODE).await.unwrap();
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        taints.iter().any(|t| t.key == SUPPLIER_TAINT && t.effect == "NoSchedule"),
        "{taints:?}"
    );

    // An XID through the fake: the GPU is reported unhealthy in the offer's status.
    injector.inject("GPU-dp-1", FakeFault::Xid(79));
    let injected = Instant::now();
    let offer = wait_for("GPU-dp-1 unhealthy in the offer", get, |o| {
        health_of(o, "GPU-dp-1").is_some_and(|(h, _)| h == GpuHealth::Unhealthy)
    })
    .await;
    println!("XID 79 in the GpuOffer status after {:?}", injected.elapsed());
    assert_eq!(health_of(&offer, "GPU-dp-1"), Some((GpuHealth::Unhealthy, Some("XID 79".into()))));
    assert_eq!(health_of(&offer, "GPU-dp-0"), Some((GpuHealth::Healthy, None)));

    // The controller sees a live offer with one healthy GPU, and a dead one once the agent stops.
    let controller = tokio::spawn(gpumarket_controller::run(
        client.clone(),
        gpumarket_controller::Config {
            settings: gpumarket_controller::Settings {
                heartbeat_timeout: HEARTBEAT_TIMEOUT,
                ..Default::default()
            },
            ..Default::default()
        },
    ));
    wait_for("the offer available", get, GpuOffer::is_available).await;
    agent.abort();
    let stopped = Instant::now();
    wait_for("the offer unavailable", get, |o| !o.is_available()).await;
    println!("offer unavailable {:?} after the agent stopped", stopped.elapsed());
    assert!(stopped.elapsed() >= HEARTBEAT_TIMEOUT - Duration::from_secs(2));
    controller.abort();
}

const LEASE_NODE: &str = "dp-lease-h100";

/// A lease of `gpus` on `offer`, as the controller creates it (no status yet).
fn lease_manifest(name: &str, offer: &str, gpus: &[&str]) -> GpuLease {
    serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuLease",
        "metadata": {"name": name},
        "spec": {
            "cluster": {"namespace": "ml", "name": "llm", "uid": "0a1b2c3d-0000-4000-8000-000000000001"},
            "offer": offer,
            "supplierWallet": WALLET,
            "gpus": gpus,
            "workers": 1,
            "pricePerGpuHour": 2_200_000,
            "startTime": "2026-01-01T00:00:00Z",
        },
    }))
    .unwrap()
}

/// Waits until the agent's view of the leases satisfies `done`; that view.
async fn until_view(
    view: &mut watch::Receiver<Vec<NodeLease>>,
    what: &str,
    done: impl Fn(&[NodeLease]) -> bool,
) -> Vec<NodeLease> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = view.borrow_and_update().clone();
        if done(&seen) {
            return seen;
        }
        let changed = tokio::time::timeout_at(deadline, view.changed()).await;
        assert!(changed.is_ok(), "timed out waiting for {what}; the agent sees {seen:?}");
        changed.unwrap().unwrap();
    }
}

#[tokio::test]
async fn the_agent_follows_its_nodes_active_leases_and_their_worker_pods() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let leases: Api<GpuLease> = Api::all(client.clone());
    let (publish, mut view) = watch::channel(Vec::new());
    let follow = tokio::spawn(follow_leases(client.clone(), LEASE_NODE.into(), publish));

    let mine =
        ["GPU-5d2f0c0e-0000-4000-8000-000000000000", "GPU-5d2f0c0e-0000-4000-8000-000000000001"];
    let post = PostParams::default();
    leases.create(&post, &lease_manifest("dp-lease-mine", LEASE_NODE, &mine)).await.unwrap();
    let elsewhere = ["GPU-5d2f0c0e-0000-4000-8000-0000000000ff"];
    leases
        .create(&post, &lease_manifest("dp-lease-other", "dp-elsewhere", &elsewhere))
        .await
        .unwrap();
    let seen = until_view(&mut view, "the node's lease", |v| !v.is_empty()).await;
    assert_eq!(seen.len(), 1, "only the leases of its own node: {seen:?}");
    assert_eq!(
        (seen[0].name.as_str(), seen[0].gpus.as_slice()),
        ("dp-lease-mine", &mine.map(String::from)[..])
    );
    assert!(seen[0].pods.is_empty(), "no worker pods listed yet");

    // The controller lists the lease's worker pod: the agent learns it from the lease alone.
    let pods = json!({"status": {"phase": "Active", "pods": [
        {"namespace": "ml", "name": "llm-worker-0", "uid": "0a1b2c3d-0000-4000-8000-0000000000aa", "ready": false},
    ]}});
    let started = Instant::now();
    leases
        .patch_status("dp-lease-mine", &PatchParams::default(), &Patch::Merge(&pods))
        .await
        .unwrap();
    let seen =
        until_view(&mut view, "the lease's worker pod", |v| v.iter().any(|l| !l.pods.is_empty()))
            .await;
    println!("worker pod in the agent's view {:?} after the status write", started.elapsed());
    assert_eq!(seen[0].pods, [PodName::new("ml", "llm-worker-0")]);

    // Once the lease ends, its GPUs go to no pod.
    let ended = json!({"status": {"phase": "Ended", "endTime": "2026-01-01T01:00:00Z", "endReason": "Expired"}});
    leases
        .patch_status("dp-lease-mine", &PatchParams::default(), &Patch::Merge(&ended))
        .await
        .unwrap();
    until_view(&mut view, "the ended lease dropped", <[NodeLease]>::is_empty).await;
    follow.abort();
}
