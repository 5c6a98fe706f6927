//! A fleet node as a GpuOffer on the hub: its GPUs from the node's allocatable `nvidia.com/gpu`
//! and its model and memory from labels (NVIDIA's GPU feature discovery, or gpumarket's own).
//! The fleet's device plugin (NVIDIA's, or a DRA driver) hands out the GPUs, so the offer is
//! offer-only and its GPUs are slots `GPU-<fleet>-<node>-<i>`: the fleet's scheduler picks the
//! devices. The fleet is in the name because node names repeat across fleets, and the market
//! quarantines a GPU that two offers list.

use gpumarket_crds::common::GPU_RESOURCE;
use gpumarket_crds::{FLEET_LABEL, GpuHealth, OfferMode, fleet_offer_name};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde_json::Value;

use crate::config::{ConfigError, Supplier};
use crate::health::DeviceHealth;
use crate::node::MODEL_LABEL;
use crate::offer::{OfferSettings, Reserve, offer_manifest, resolve_location};
use crate::source::{Gpu, Inventory, model_of_product};

/// GPU feature discovery's product label, e.g. `NVIDIA-H100-80GB-HBM3`.
pub const GFD_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// GPU feature discovery's memory label, in MiB.
pub const GFD_MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
/// gpumarket's memory label (in MiB), next to [`MODEL_LABEL`].
pub const MEMORY_LABEL: &str = "gpumarket.io/gpu-memory-mib";

/// Why a fleet node is not offered.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SkipReason {
    #[error("no allocatable {GPU_RESOURCE}")]
    NoGpus,
    #[error(
        "no GPU model: label the node {GFD_PRODUCT_LABEL} (GPU feature discovery) or {MODEL_LABEL}"
    )]
    NoModel,
    #[error(
        "no GPU memory: label the node {GFD_MEMORY_LABEL} (GPU feature discovery) or {MEMORY_LABEL} with the MiB of one GPU"
    )]
    NoMemory,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The node's GPUs as an inventory of slots of `fleet`.
pub fn node_inventory(fleet: &str, node: &Node) -> Result<Inventory, SkipReason> {
    let count = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(GPU_RESOURCE))
        .and_then(|q| q.0.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .ok_or(SkipReason::NoGpus)?
        .min(64);
    let labels = node.labels();
    // GFD writes the product name with '-' for spaces; the market model comes from the words.
    let product = labels
        .get(GFD_PRODUCT_LABEL)
        .map(|p| p.replace('-', " "))
        .or_else(|| labels.get(MODEL_LABEL).cloned())
        .filter(|p| model_of_product(p) != "Unknown")
        .ok_or(SkipReason::NoModel)?;
    let memory_mib = [GFD_MEMORY_LABEL, MEMORY_LABEL]
        .iter()
        .find_map(|key| labels.get(*key)?.parse::<u64>().ok())
        .filter(|m| *m > 0 && *m <= gpumarket_crds::common::MAX_GPU_MEMORY_MIB)
        .ok_or(SkipReason::NoMemory)?;
    let slot: String = fleet_offer_name(fleet, &node.name_any())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(100)
        .collect();
    let gpus = (0..count)
        .map(|i| Gpu {
            uuid: format!("GPU-{slot}-{i}"),
            product_name: product.clone(),
            memory_mib,
            pci_bus_id: String::new(),
            nvlink_peers: Default::default(),
            numa_node: None,
            device_node: None,
        })
        .collect();
    Ok(Inventory { gpus, driver_version: None, cuda_version: None })
}

/// The GpuOffer (spec and labels, as applied) of fleet node `node`, paid to `supplier.wallet`
/// and signed with its key.
pub fn fleet_offer(
    fleet: &str,
    supplier: &Supplier,
    node: &Node,
    reserve: Reserve,
) -> Result<(Value, Inventory), SkipReason> {
    let inventory = node_inventory(fleet, node)?;
    let (region, zone) = resolve_location(supplier, node)?;
    let settings = OfferSettings {
        node_name: fleet_offer_name(fleet, &node.name_any()),
        supplier: supplier.clone(),
        price_per_gpu_hour: supplier.node_price(&inventory)?,
        mode: OfferMode::OfferOnly,
        reserve,
    };
    let mut offer = offer_manifest(&settings, &inventory, node, &region, zone.as_deref());
    offer["metadata"]["labels"][FLEET_LABEL] = Value::from(fleet);
    Ok((offer, inventory))
}

/// Health of the node's GPU slots: all healthy while the node is Ready, all unhealthy (with
/// the reason) when it is not, so the market stops matching a failing node at once.
pub fn node_health(node: &Node, inventory: &Inventory) -> Vec<DeviceHealth> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    inventory
        .gpus
        .iter()
        .map(|g| DeviceHealth {
            uuid: g.uuid.clone(),
            health: if ready { GpuHealth::Healthy } else { GpuHealth::Unhealthy },
            reason: (!ready).then(|| "the fleet's node is not Ready".to_string()),
        })
        .collect()
}

/// Whether `offer` (freshly signed) says what `applied` said: the same but for when it was
/// signed. Applying it again would only re-sign an unchanged offer (a spec write, and a new
/// signing time the hub records) at every heartbeat.
pub fn unchanged(applied: Option<&Value>, offer: &Value) -> bool {
    let unsigned = |offer: &Value| {
        let mut offer = offer.clone();
        if let Some(spec) = offer["spec"].as_object_mut() {
            spec.remove("signedAt");
            spec.remove("signature");
        }
        offer
    };
    applied.is_some_and(|applied| unsigned(applied) == unsigned(offer))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use gpumarket_crds::signature::verify;
    use gpumarket_crds::{GpuOffer, OfferedGpu};
    use serde_json::json;
    use solana_keypair::Keypair;

    use super::*;
    use crate::config::WalletKey;

    fn supplier() -> Supplier {
        let key = WalletKey(Arc::new(Keypair::new()));
        Supplier::for_fleet(key, &["H100=3000000".into()], None, None).expect("valid")
    }

    fn mk_node(labels: Value, gpus: &str, ready: bool) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "gpu-7.dc1", "labels": labels},
            "status": {
                "allocatable": {"nvidia.com/gpu": gpus, "cpu": "64", "memory": "512Gi"},
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        }))
        .expect("a node")
    }

    #[test]
    fn an_offer_signed_anew_but_otherwise_the_same_is_not_applied_again() {
        let signed = |at: &str, signature: &str, price: u64| {
            json!({"metadata": {"name": "f.n"}, "spec": {
                "pricePerGpuHour": price, "signedAt": at, "signature": signature,
            }})
        };
        let applied = signed("2026-12-03T10:00:00Z", "sig-1", 5);
        assert!(unchanged(Some(&applied), &signed("2026-12-03T10:00:20Z", "sig-2", 5)));
        assert!(!unchanged(Some(&applied), &signed("2026-12-03T10:00:20Z", "sig-2", 6)));
        assert!(!unchanged(None, &applied), "never applied");
    }

    #[test]
    fn a_gfd_labelled_node_is_offered_under_its_fleets_name() {
        let node = mk_node(
            json!({
                GFD_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3",
                GFD_MEMORY_LABEL: "81559",
                "topology.kubernetes.io/region": "eu-west",
            }),
            "2",
            true,
        );
        let supplier = supplier();
        let (offer, inventory) =
            fleet_offer("fleet-a", &supplier, &node, Reserve::default()).expect("offered");
        let offer: GpuOffer = serde_json::from_value(offer).expect("a GpuOffer");
        // Signed with the fleet wallet's keypair, as the hub requires of any offer.
        assert_eq!(offer.spec.wallet, supplier.wallet);
        assert_eq!(verify(&offer.spec), Ok(()));
        assert_eq!(offer.name_any(), "fleet-a.gpu-7.dc1");
        assert_eq!(offer.spec.node_name, offer.name_any());
        assert_eq!(offer.labels().get(FLEET_LABEL).map(String::as_str), Some("fleet-a"));
        assert_eq!(offer.spec.mode, OfferMode::OfferOnly);
        assert_eq!(offer.spec.price_per_gpu_hour, 3_000_000);
        assert_eq!(offer.spec.region, "eu-west");
        assert_eq!(
            offer.spec.gpus,
            vec![
                OfferedGpu {
                    uuid: "GPU-fleet-a-gpu-7-dc1-0".into(),
                    model: "H100".into(),
                    memory_mib: 81_559
                },
                OfferedGpu {
                    uuid: "GPU-fleet-a-gpu-7-dc1-1".into(),
                    model: "H100".into(),
                    memory_mib: 81_559
                },
            ]
        );
        assert!(offer.spec.allocatable.is_some());
        assert!(node_health(&node, &inventory).iter().all(|d| d.health == GpuHealth::Healthy));
    }

    #[test]
    fn nodes_without_gpus_model_memory_region_or_price_are_skipped_with_the_fix() {
        let labels = |model: &str| json!({MODEL_LABEL: model, MEMORY_LABEL: "81920", "topology.kubernetes.io/region": "local"});
        let skip = |node: Node| fleet_offer("f", &supplier(), &node, Reserve::default()).err();
        assert_eq!(skip(mk_node(labels("H100"), "0", true)), Some(SkipReason::NoGpus));
        assert_eq!(skip(mk_node(json!({MEMORY_LABEL: "1"}), "1", true)), Some(SkipReason::NoModel));
        assert_eq!(
            skip(mk_node(json!({MODEL_LABEL: "H100"}), "1", true)),
            Some(SkipReason::NoMemory)
        );
        let no_region = json!({MODEL_LABEL: "H100", MEMORY_LABEL: "81920"});
        assert!(matches!(skip(mk_node(no_region, "1", true)), Some(SkipReason::Config(_))));
        let unpriced = skip(mk_node(labels("A100"), "1", true)).expect("skipped");
        assert!(unpriced.to_string().contains("--price A100=UNITS"), "{unpriced}");
        assert!(skip(mk_node(labels("H100"), "1", true)).is_none());
    }

    #[test]
    fn a_node_that_is_not_ready_reports_its_gpus_unhealthy() {
        let node = mk_node(
            json!({MODEL_LABEL: "H100", MEMORY_LABEL: "81920", "topology.kubernetes.io/region": "local"}),
            "1",
            false,
        );
        let inventory = node_inventory("fleet-a", &node).expect("inventory");
        let health = node_health(&node, &inventory);
        assert_eq!(health[0].health, GpuHealth::Unhealthy);
        assert!(health[0].reason.as_deref().is_some_and(|r| r.contains("not Ready")));
    }
}
