//! The node's `GpuOffer`, written with server-side apply as field manager
//! `gpumarket-device-plugin`: the spec (discovery plus the supplier's settings) and, in the
//! status, only what the agent owns: per-GPU health and the heartbeat. Allocation, availability,
//! reputation and stake belong to the controller and are never sent.

use std::sync::Arc;
use std::time::Duration;

use gpumarket_crds::common::{REGION_LABEL, ZONE_LABEL};
use gpumarket_crds::{
    GpuOffer, GpuOfferSpec, GpuState, HostResources, Interconnect, OfferMode, OfferedGpu,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::{ConfigError, Supplier, check_location};
use crate::health::DeviceHealth;
use crate::node::{MODEL_LABEL, mark_node, primary_model};
use crate::source::Inventory;

pub const FIELD_MANAGER: &str = "gpumarket-device-plugin";
/// Retry delay while the API server cannot be reached at start.
const START_RETRY: Duration = Duration::from_secs(2);

/// What the agent offers, from discovery and the supplier's validated settings.
#[derive(Clone, Debug)]
pub struct OfferSettings {
    pub node_name: String,
    pub supplier: Supplier,
    pub price_per_gpu_hour: u64,
    pub mode: OfferMode,
    pub reserve: Reserve,
}

/// CPU and memory of the node kept out of the offer, for the pods the node runs besides
/// workers: without it the shares of a fully leased node would add up to all of its
/// allocatable, and its last worker would not be admitted next to those pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reserve {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
}

/// Region and zone: the supplier's, else the node's topology labels.
pub fn resolve_location(
    supplier: &Supplier,
    node: &Node,
) -> Result<(String, Option<String>), ConfigError> {
    let label = |key: &str| node.labels().get(key).cloned();
    let region = supplier
        .region
        .clone()
        .or_else(|| label(REGION_LABEL))
        .ok_or_else(|| ConfigError::MissingRegion { node: node.name_any() })?;
    let zone = supplier.zone.clone().or_else(|| label(ZONE_LABEL));
    check_location("region", Some(&region))?;
    check_location("zone", zone.as_deref())?;
    Ok((region, zone))
}

/// CPU and memory the node lets workers request: its allocatable (what the kubelet admits pods
/// against) less `reserve`, at least a millicore and a byte; `None` if the node does not report
/// it.
pub fn node_allocatable(node: &Node, reserve: Reserve) -> Option<HostResources> {
    let allocatable = HostResources::from_allocatable(node.status.as_ref()?.allocatable.as_ref()?)?;
    Some(HostResources {
        cpu_millicores: allocatable.cpu_millicores.saturating_sub(reserve.cpu_millicores).max(1),
        memory_bytes: allocatable.memory_bytes.saturating_sub(reserve.memory_bytes).max(1),
    })
}

/// The offer's spec and labels, as applied.
pub fn offer_manifest(
    settings: &OfferSettings,
    inventory: &Inventory,
    node: &Node,
    region: &str,
    zone: Option<&str>,
) -> Value {
    let spec = GpuOfferSpec {
        node_name: settings.node_name.clone(),
        wallet: settings.supplier.wallet.clone(),
        gpus: inventory
            .gpus
            .iter()
            .map(|g| OfferedGpu {
                uuid: g.uuid.clone(),
                model: g.model(),
                memory_mib: g.memory_mib,
            })
            .collect(),
        price_per_gpu_hour: settings.price_per_gpu_hour,
        region: region.to_owned(),
        zone: zone.map(str::to_owned),
        interconnect: if inventory.has_nvlink() {
            Interconnect::NvLink
        } else {
            Interconnect::Pcie
        },
        driver_version: inventory.driver_version.clone(),
        cuda_version: inventory.cuda_version.clone(),
        mode: settings.mode,
        allocatable: node_allocatable(node, settings.reserve),
        signed_at: None,
        signature: None,
    };
    // Signed now, so that this spec supersedes any earlier one of the node's.
    let spec = match &settings.supplier.wallet_key {
        Some(key) => gpumarket_crds::signature::sign_now(&spec, key.0.as_ref()),
        None => spec,
    };
    let mut labels = json!({ REGION_LABEL: region });
    if let Some(zone) = zone {
        labels[ZONE_LABEL] = json!(zone);
    }
    if let Some(model) = primary_model(inventory) {
        labels[MODEL_LABEL] = json!(model);
    }
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "metadata": {"name": settings.node_name, "labels": labels},
        "spec": spec,
    })
}

/// The agent's part of the status: each GPU's health and the heartbeat.
pub fn status_manifest(devices: &[DeviceHealth], now: jiff::Timestamp) -> Value {
    let gpus: Vec<GpuState> = devices
        .iter()
        .map(|d| GpuState {
            uuid: d.uuid.clone(),
            health: Some(d.health),
            reason: d.reason.clone(),
            lease: None,
        })
        .collect();
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "status": {"gpus": gpus, "lastHeartbeat": Time(now)},
    })
}

/// Publishes the offer, marks the node and heartbeats (at once on a health change) until the
/// future is dropped. API errors are logged and retried (the kubelet keeps being served
/// meanwhile); only settings that cannot work (no region anywhere) end it.
pub async fn publish(
    client: Client,
    settings: OfferSettings,
    inventory: Arc<Inventory>,
    mut health: watch::Receiver<Vec<DeviceHealth>>,
    heartbeat: Duration,
) -> Result<(), ConfigError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let offers: Api<GpuOffer> = Api::all(client);
    let node = loop {
        match nodes.get(&settings.node_name).await {
            Ok(node) => break node,
            Err(e) => {
                tracing::warn!(error = %e, node = %settings.node_name, "reading the node; retrying")
            }
        }
        tokio::time::sleep(START_RETRY).await;
    };
    let (region, zone) = resolve_location(&settings.supplier, &node)?;
    let offer = offer_manifest(&settings, &inventory, &node, &region, zone.as_deref());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let mut node_marked = false;
    let mut spec_applied = false;
    let mut ticks = tokio::time::interval(heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // If the health source ever stops, the last known health keeps being heartbeated.
    let mut health_open = true;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = health.changed(), if health_open => health_open = changed.is_ok(),
        }
        if !node_marked {
            match mark_node(&nodes, &settings.node_name, primary_model(&inventory).as_deref()).await
            {
                Ok(()) => node_marked = true,
                Err(e) => tracing::warn!(error = %e, "tainting and labelling the node; retrying"),
            }
        }
        if !spec_applied {
            match offers.patch(&settings.node_name, &apply, &Patch::Apply(&offer)).await {
                Ok(_) => {
                    tracing::info!(offer = %settings.node_name, "offer published");
                    spec_applied = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "publishing the offer; retrying");
                    continue;
                }
            }
        }
        let status = status_manifest(&health.borrow_and_update(), jiff::Timestamp::now());
        if let Err(e) =
            offers.patch_status(&settings.node_name, &apply, &Patch::Apply(&status)).await
        {
            tracing::warn!(error = %e, "heartbeat; retrying");
            // The offer may have been deleted: publish it again next time.
            spec_applied = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use gpumarket_crds::GpuHealth;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;
    use crate::source::Gpu;

    fn settings(region: Option<&str>) -> OfferSettings {
        OfferSettings {
            node_name: "node-a".into(),
            supplier: Supplier {
                wallet: "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV".into(),
                wallet_key: None,
                prices: BTreeMap::from([("H100".into(), 5)]),
                region: region.map(str::to_owned),
                zone: None,
            },
            price_per_gpu_hour: 5,
            mode: OfferMode::Plugin,
            reserve: Reserve { cpu_millicores: 300, memory_bytes: 1 << 30 },
        }
    }

    fn node(labels: &[(&str, &str)]) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some("node-a".into());
        node.metadata.labels =
            Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        node
    }

    fn two_linked_h100() -> Inventory {
        let gpu = |uuid: &str, peer: &str| Gpu {
            uuid: uuid.into(),
            product_name: "NVIDIA H100 80GB HBM3".into(),
            memory_mib: 81_559,
            pci_bus_id: String::new(),
            nvlink_peers: BTreeSet::from([peer.to_string()]),
            numa_node: None,
            device_node: None,
        };
        Inventory {
            gpus: vec![gpu("GPU-0", "GPU-1"), gpu("GPU-1", "GPU-0")],
            driver_version: Some("560.35.03".into()),
            cuda_version: None,
        }
    }

    #[test]
    fn the_offer_is_discovery_plus_supplier_settings() {
        let mut sized = node(&[]);
        sized.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            allocatable: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("31800m".into())),
                ("memory".to_string(), Quantity("256Gi".into())),
            ])),
            ..Default::default()
        });
        let offer = offer_manifest(
            &settings(None),
            &two_linked_h100(),
            &sized,
            "eu-west",
            Some("eu-west-1a"),
        );
        let parsed: GpuOffer = serde_json::from_value(offer.clone()).expect("a GpuOffer");
        assert_eq!(parsed.name_any(), parsed.spec.node_name);
        assert_eq!(
            parsed.spec.gpus[1],
            OfferedGpu { uuid: "GPU-1".into(), model: "H100".into(), memory_mib: 81_559 }
        );
        assert_eq!(parsed.spec.interconnect, Interconnect::NvLink);
        assert_eq!(
            (parsed.spec.region.as_str(), parsed.spec.zone.as_deref()),
            ("eu-west", Some("eu-west-1a"))
        );
        assert_eq!(parsed.spec.price_per_gpu_hour, 5);
        assert_eq!(
            parsed.spec.allocatable,
            Some(HostResources { cpu_millicores: 31_500, memory_bytes: 255 << 30 }),
            "the node's allocatable less the reserve"
        );
        assert_eq!(offer["metadata"]["labels"][MODEL_LABEL], "H100");
        // A node that reports no allocatable offers its GPUs without CPU or memory.
        let bare = offer_manifest(&settings(None), &two_linked_h100(), &node(&[]), "eu-west", None);
        assert!(bare["spec"].get("allocatable").is_none(), "{bare}");
        // A reserve larger than the node leaves a millicore and a byte, not an offer that
        // looks like an older agent's.
        let all = Reserve { cpu_millicores: u64::MAX, memory_bytes: u64::MAX };
        assert_eq!(
            node_allocatable(&sized, all),
            Some(HostResources { cpu_millicores: 1, memory_bytes: 1 })
        );
        assert!(offer.get("status").is_none());
        assert!(parsed.spec.signature.is_none(), "no keypair, no signature");
    }

    #[test]
    fn with_the_wallet_keypair_the_offer_is_signed() {
        let key = crate::config::WalletKey(std::sync::Arc::new(solana_keypair::Keypair::new()));
        let mut signing = settings(None);
        signing.supplier.wallet = key.public_key();
        signing.supplier.wallet_key = Some(key);
        let offer = offer_manifest(&signing, &two_linked_h100(), &node(&[]), "eu-west", None);
        let parsed: GpuOffer = serde_json::from_value(offer).expect("a GpuOffer");
        assert!(parsed.spec.signature.is_some());
        assert_eq!(gpumarket_crds::signature::verify(&parsed.spec), Ok(()));
    }

    #[test]
    fn the_status_carries_only_health_and_heartbeat() {
        let devices = vec![DeviceHealth {
            uuid: "GPU-0".into(),
            health: GpuHealth::Unhealthy,
            reason: Some("XID 79".into()),
        }];
        let status = status_manifest(&devices, jiff::Timestamp::UNIX_EPOCH);
        let fields: BTreeSet<&str> =
            status["status"].as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(fields, BTreeSet::from(["gpus", "lastHeartbeat"]));
        assert_eq!(
            status["status"]["gpus"][0],
            json!({"uuid": "GPU-0", "health": "Unhealthy", "reason": "XID 79"})
        );
        assert_eq!(status["status"]["lastHeartbeat"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn location_comes_from_flags_then_node_labels() {
        let labelled = node(&[(REGION_LABEL, "us-east"), (ZONE_LABEL, "us-east-1b")]);
        assert_eq!(
            resolve_location(&settings(None).supplier, &labelled),
            Ok(("us-east".into(), Some("us-east-1b".into())))
        );
        assert_eq!(
            resolve_location(&settings(Some("eu-west")).supplier, &labelled),
            Ok(("eu-west".into(), Some("us-east-1b".into())))
        );
        let error = resolve_location(&settings(None).supplier, &node(&[])).expect_err("no region");
        assert!(error.to_string().contains("pass --region"), "{error}");
    }
}
