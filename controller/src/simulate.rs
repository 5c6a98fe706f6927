//! Simulated suppliers for the local environment, until every node runs the real agent: a
//! GpuOffer for each node labelled with a GPU model (KWOK nodes), heartbeating like an agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use gpumarket_crds::common::{GPU_RESOURCE, REGION_LABEL, ZONE_LABEL};
use gpumarket_crds::{GpuOffer, GpuOfferSpec, HostResources, signature};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use solana_keypair::Keypair;
use solana_signer::Signer;

/// Label naming the GPU model of a node.
pub const MODEL_LABEL: &str = "gpumarket.io/gpu-model";
/// Label with the memory of each GPU, in MiB (80 GiB when absent).
pub const MEMORY_LABEL: &str = "gpumarket.io/gpu-memory-mib";
const FIELD_MANAGER: &str = "gpumarket-simulated-agent";
/// How many simulated agents publish at the same moment.
const PUBLISHING_AT_ONCE: usize = 32;

/// What every simulated supplier asks, and the wallet it is paid to and signs its offers with.
#[derive(Clone, Debug)]
pub struct Simulation {
    pub price_per_gpu_hour: u64,
    pub wallet: Arc<Keypair>,
    pub heartbeat: Duration,
}

/// The offer a simulated agent publishes for `node`, if it has GPUs and a model label, signed
/// like an agent's: `previous` (the spec published for the node before) again if nothing in
/// it changed, else signed now, so that the spec and its signing time change only with what
/// the node offers.
pub fn offer_for(
    node: &Node,
    sim: &Simulation,
    previous: Option<&GpuOfferSpec>,
) -> Option<GpuOfferSpec> {
    let labels = node.labels();
    let model = labels.get(MODEL_LABEL)?;
    let count: usize =
        node.status.as_ref()?.capacity.as_ref()?.get(GPU_RESOURCE)?.0.parse().ok()?;
    let memory: u64 = labels.get(MEMORY_LABEL).and_then(|m| m.parse().ok()).unwrap_or(81_920);
    let name = node.name_any();
    let gpus: Vec<_> = (0..count)
        .map(
            |i| json!({"uuid": format!("GPU-sim-{name}-{i}"), "model": model, "memoryMib": memory}),
        )
        .collect();
    let mut spec = json!({
        "nodeName": name,
        "wallet": sim.wallet.pubkey().to_string(),
        "gpus": gpus,
        "pricePerGpuHour": sim.price_per_gpu_hour,
        "region": labels.get(REGION_LABEL).map_or("local", String::as_str),
    });
    if let Some(zone) = labels.get(ZONE_LABEL) {
        spec["zone"] = json!(zone);
    }
    let allocatable = node.status.as_ref()?.allocatable.as_ref();
    if let Some(host) = allocatable.and_then(HostResources::from_allocatable) {
        spec["allocatable"] = json!(host);
    }
    let spec: GpuOfferSpec = serde_json::from_value(spec).ok()?;
    let unchanged = |p: &&GpuOfferSpec| {
        GpuOfferSpec { signed_at: None, signature: None, ..(*p).clone() } == spec
    };
    match previous.filter(unchanged) {
        Some(previous) => Some(previous.clone()),
        None => Some(signature::sign_now(&spec, sim.wallet.as_ref())),
    }
}

/// Publish and heartbeat offers for every GPU node, until the future is dropped.
pub async fn run(client: Client, sim: Simulation) {
    let nodes: Api<Node> = Api::all(client.clone());
    let offers: Api<GpuOffer> = Api::all(client);
    let mut ticks = tokio::time::interval(sim.heartbeat);
    let mut published: HashMap<String, GpuOfferSpec> = HashMap::new();
    loop {
        ticks.tick().await;
        let listed = match nodes.list(&ListParams::default().labels(MODEL_LABEL)).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(error = %e, "simulated suppliers: listing nodes");
                continue;
            }
        };
        let due: Vec<(String, GpuOfferSpec)> = listed
            .iter()
            .filter_map(|node| {
                let name = node.name_any();
                let spec = offer_for(node, &sim, published.get(&name))?;
                Some((name, spec))
            })
            .collect();
        // Every simulated node is its own agent: thousands of them heartbeat side by side, not
        // one after another.
        let mut heartbeats = stream::iter(due)
            .map(|(name, spec)| {
                let offers = &offers;
                async move {
                    let result = publish(offers, &name, &spec).await;
                    (name, spec, result)
                }
            })
            .buffer_unordered(PUBLISHING_AT_ONCE);
        while let Some((name, spec, result)) = heartbeats.next().await {
            match result {
                Ok(_) => {
                    published.insert(name, spec);
                }
                Err(e) => tracing::warn!(error = %e, node = %name, "simulated supplier heartbeat"),
            }
        }
    }
}

/// Publish offer `name` as an agent does: the spec, then every GPU healthy with a heartbeat
/// now.
pub async fn publish(
    offers: &Api<GpuOffer>,
    name: &str,
    spec: &GpuOfferSpec,
) -> Result<GpuOffer, kube::Error> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let gpus: Vec<_> =
        spec.gpus.iter().map(|g| json!({"uuid": g.uuid, "health": "Healthy"})).collect();
    let offer = json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "metadata": {"name": name},
        "spec": spec,
    });
    let status = json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "status": {"gpus": gpus, "lastHeartbeat": jiff::Timestamp::now()},
    });
    offers.patch(name, &apply, &Patch::Apply(&offer)).await?;
    offers.patch_status(name, &apply, &Patch::Apply(&status)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeStatus;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::collections::BTreeMap;

    fn sim() -> Simulation {
        Simulation {
            price_per_gpu_hour: 5,
            wallet: Arc::new(Keypair::new()),
            heartbeat: Duration::from_secs(1),
        }
    }

    #[test]
    fn gpu_nodes_get_an_offer_of_their_capacity() {
        let mut node = Node::default();
        node.metadata.name = Some("kwok-h100".into());
        node.metadata.labels = Some(BTreeMap::from([
            (MODEL_LABEL.to_string(), "H100".to_string()),
            (REGION_LABEL.to_string(), "eu-west".to_string()),
        ]));
        node.status = Some(NodeStatus {
            capacity: Some(BTreeMap::from([(GPU_RESOURCE.to_string(), Quantity("2".into()))])),
            ..Default::default()
        });
        let sim = sim();
        let spec = offer_for(&node, &sim, None).expect("a GPU node");
        assert_eq!(spec.gpus.len(), 2);
        assert_eq!(spec.region, "eu-west");
        assert_eq!(spec.gpus[1].model, "H100");
        assert!(spec.zone.is_none());
        assert!(spec.allocatable.is_none(), "none reported");
        assert_eq!(signature::verify(&spec), Ok(()), "signed like an agent's offer");
        let signed_at = spec.signed_at.as_ref().expect("a signing time, like an agent's").0;
        assert!(signed_at.duration_since(jiff::Timestamp::now()).abs().as_secs() < 5);

        let status = node.status.get_or_insert_default();
        status.allocatable = Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("32".into())),
            ("memory".to_string(), Quantity("256Gi".into())),
        ]));
        let resigned = offer_for(&node, &sim, Some(&spec)).expect("a GPU node");
        assert_eq!(
            serde_json::to_value(resigned.allocatable.as_ref()).expect("json"),
            json!({"cpuMillicores": 32_000, "memoryBytes": 274_877_906_944u64})
        );
        assert_eq!(signature::verify(&resigned), Ok(()), "what changed is signed anew");
        assert_eq!(
            offer_for(&node, &sim, Some(&resigned)),
            Some(resigned),
            "an unchanged offer is published as signed before"
        );

        node.metadata.labels = None;
        assert!(offer_for(&node, &sim, None).is_none(), "no model label, no offer");
    }
}
