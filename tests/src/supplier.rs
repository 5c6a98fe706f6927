//! A supplier as the integration tests run one: a KWOK GPU node and its GpuOffer, heartbeating
//! like the agent (GPU health and the time) until dropped.

// A test fixture: a supplier that cannot start fails the test that asked for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gpumarket_crds::{GpuHealth, GpuOffer, GpuOfferSpec, HostResources, signature};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use solana_sdk::signature::{Keypair, Signer};

use crate::{Env, GpuNode};

/// A supplier node with its offer, heartbeating until dropped (or `stop`ped).
pub struct Supplier {
    pub name: String,
    offers: Api<GpuOffer>,
    uuids: Vec<String>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Supplier {
    /// A supplier of `gpus` H100s, its offer signed by a wallet of its own (a new key nobody
    /// settles to).
    pub async fn start(
        env: &Env,
        client: &Client,
        name: &str,
        region: &str,
        gpus: usize,
        price: u64,
    ) -> Self {
        Supplier::start_paid_to(env, client, name, region, gpus, price, &Keypair::new()).await
    }

    /// [`Supplier::start`], paid to `wallet` and signed with its key. Like `start`, its offer
    /// publishes no CPU or memory (as an agent from before offers did).
    pub async fn start_paid_to(
        env: &Env,
        client: &Client,
        name: &str,
        region: &str,
        gpus: usize,
        price: u64,
        wallet: &Keypair,
    ) -> Self {
        add_node(env, name, region, gpus).await;
        Supplier::publish(client, signed_offer(name, region, gpus, price, None, wallet)).await
    }

    /// [`Supplier::start`] with an offer that publishes the node's allocatable CPU and memory,
    /// as the agent reads them from the Node.
    pub async fn start_with_allocatable(
        env: &Env,
        client: &Client,
        name: &str,
        region: &str,
        gpus: usize,
        price: u64,
    ) -> Self {
        add_node(env, name, region, gpus).await;
        let node = Api::<Node>::all(client.clone()).get(name).await.expect("the node");
        let allocatable = node.status.and_then(|s| s.allocatable).unwrap_or_default();
        let allocatable = HostResources::from_allocatable(&allocatable).expect("KWOK allocatable");
        let spec = signed_offer(name, region, gpus, price, Some(allocatable), &Keypair::new());
        Supplier::publish(client, spec).await
    }

    /// Publishes `spec` as it is (signed or not, as the test made it) for the node it names,
    /// which must exist ([`add_node`]), and heartbeats every GPU it lists as healthy.
    pub async fn publish(client: &Client, spec: GpuOfferSpec) -> Self {
        let offers: Api<GpuOffer> = Api::all(client.clone());
        let name = spec.node_name.clone();
        let uuids: Vec<String> = spec.gpus.iter().map(|g| g.uuid.clone()).collect();
        let offer = GpuOffer::new(&name, spec);
        offers.create(&PostParams::default(), &offer).await.expect("create offer");
        let mut supplier = Supplier { name, offers, uuids, heartbeat: None };
        supplier.resume().await;
        supplier
    }

    /// The agent goes silent: no more heartbeats.
    pub fn stop(&mut self) {
        if let Some(task) = self.heartbeat.take() {
            task.abort();
        }
    }

    /// The agent heartbeats (again, after [`Supplier::stop`]).
    pub async fn resume(&mut self) {
        self.stop();
        beat(&self.offers, &self.name, &self.uuids, None).await;
        let (offers, name, uuids) = (self.offers.clone(), self.name.clone(), self.uuids.clone());
        self.heartbeat = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(700)).await;
                beat(&offers, &name, &uuids, None).await;
            }
        }));
    }
}

impl Drop for Supplier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A KWOK node of `gpus` H100s in `region` (zone `<region>-a`), for a supplier's offer.
pub async fn add_node(env: &Env, name: &str, region: &str, gpus: usize) {
    env.add_gpu_nodes(&[GpuNode::new(name, "H100", gpus as u32)
        .region(region)
        .zone(&format!("{region}-a"))])
        .await
        .expect("KWOK node");
}

/// The offer of `gpus` H100s (uuids `GPU-<name>-<i>`) of the node `name`, paid to and signed
/// by `wallet` now, as the agent publishes it.
pub fn signed_offer(
    name: &str,
    region: &str,
    gpus: usize,
    price: u64,
    allocatable: Option<HostResources>,
    wallet: &Keypair,
) -> GpuOfferSpec {
    let spec: GpuOfferSpec = serde_json::from_value(json!({
        "nodeName": name,
        "wallet": wallet.pubkey().to_string(),
        "gpus": (0..gpus).map(|i| json!({"uuid": format!("GPU-{name}-{i}"), "model": "H100", "memoryMib": 81920})).collect::<Vec<_>>(),
        "pricePerGpuHour": price,
        "region": region,
        "zone": format!("{region}-a"),
        "allocatable": allocatable,
    }))
    .unwrap();
    signature::sign_now(&spec, wallet)
}

/// One agent heartbeat: health of every GPU (one optionally unhealthy) and the time.
async fn beat(offers: &Api<GpuOffer>, name: &str, uuids: &[String], unhealthy: Option<&str>) {
    let gpus: Vec<Value> = uuids
        .iter()
        .map(|u| {
            let health = if Some(u.as_str()) == unhealthy {
                GpuHealth::Unhealthy
            } else {
                GpuHealth::Healthy
            };
            json!({"uuid": u, "health": health})
        })
        .collect();
    let patch = json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "status": {"gpus": gpus, "lastHeartbeat": jiff::Timestamp::now()},
    });
    if let Err(e) = offers
        .patch_status(name, &PatchParams::apply("test-agent").force(), &Patch::Apply(&patch))
        .await
    {
        eprintln!("heartbeat of {name}: {e}");
    }
}
