//! A supplier as the integration tests run one: a KWOK GPU node and its GpuOffer, heartbeating
//! like the agent (GPU health and the time) until dropped.

// A test fixture: a supplier that cannot start fails the test that asked for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gpumarket_crds::{GpuHealth, GpuOffer, HostResources};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::{Env, GpuNode};

/// The payout wallet of [`Supplier::start`] (a valid public key nobody settles to).
pub const SUPPLIER_WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";

/// A supplier node with its offer, heartbeating until dropped (or `stop`ped).
pub struct Supplier {
    pub name: String,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Supplier {
    pub async fn start(
        env: &Env,
        client: &Client,
        name: &str,
        region: &str,
        gpus: usize,
        price: u64,
    ) -> Self {
        Supplier::start_paid_to(env, client, name, region, gpus, price, SUPPLIER_WALLET).await
    }

    /// [`Supplier::start`], paid to `wallet`. Like `start`, its offer publishes no CPU or memory
    /// (as an agent from before offers did).
    pub async fn start_paid_to(
        env: &Env,
        client: &Client,
        name: &str,
        region: &str,
        gpus: usize,
        price: u64,
        wallet: &str,
    ) -> Self {
        Supplier::launch(env, client, name, region, gpus, price, wallet, false).await
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
        Supplier::launch(env, client, name, region, gpus, price, SUPPLIER_WALLET, true).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn launch(
        env: &Env,
        client: &Client,
        name: &str,
        region: &str,
        gpus: usize,
        price: u64,
        wallet: &str,
        publish_allocatable: bool,
    ) -> Self {
        env.add_gpu_nodes(&[GpuNode::new(name, "H100", gpus as u32)
            .region(region)
            .zone(&format!("{region}-a"))])
            .await
            .expect("KWOK node");
        let offers: Api<GpuOffer> = Api::all(client.clone());
        let uuids: Vec<String> = (0..gpus).map(|i| format!("GPU-{name}-{i}")).collect();
        let allocatable = if publish_allocatable {
            let node = Api::<Node>::all(client.clone()).get(name).await.expect("the node");
            let allocatable = node.status.and_then(|s| s.allocatable).unwrap_or_default();
            Some(HostResources::from_allocatable(&allocatable).expect("KWOK allocatable"))
        } else {
            None
        };
        let offer: GpuOffer = serde_json::from_value(json!({
            "apiVersion": "gpumarket.io/v1alpha1",
            "kind": "GpuOffer",
            "metadata": {"name": name},
            "spec": {
                "nodeName": name,
                "wallet": wallet,
                "gpus": uuids.iter().map(|u| json!({"uuid": u, "model": "H100", "memoryMib": 81920})).collect::<Vec<_>>(),
                "pricePerGpuHour": price,
                "region": region,
                "zone": format!("{region}-a"),
                "allocatable": allocatable,
            },
        }))
        .unwrap();
        offers.create(&PostParams::default(), &offer).await.expect("create offer");
        beat(&offers, name, &uuids, None).await;
        let heartbeat = {
            let (offers, name) = (offers.clone(), name.to_string());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    beat(&offers, &name, &uuids, None).await;
                }
            })
        };
        Supplier { name: name.into(), heartbeat: Some(heartbeat) }
    }

    /// The agent goes silent: no more heartbeats.
    pub fn stop(&mut self) {
        if let Some(task) = self.heartbeat.take() {
            task.abort();
        }
    }
}

impl Drop for Supplier {
    fn drop(&mut self) {
        self.stop();
    }
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
