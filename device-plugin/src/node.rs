//! Marks the agent's node as a marketplace node:
//! - taint `gpumarket.io/supplier:NoSchedule`, so only pods that tolerate it (the controller's
//!   RayCluster workers for leases on this node, and the agent itself) are scheduled there;
//! - label `gpumarket.io/gpu-model=<model>` (the node's most common GPU model), which the
//!   controller and buyers' node affinity select on.
//!
//! Taints are an atomic list, so the patch is a merge patch carrying the node's
//! `resourceVersion`: a concurrent change to the taints makes it fail and it is retried on
//! fresh data, never overwriting someone else's taint.

use std::collections::BTreeMap;

use gpumarket_crds::common::SUPPLIER_TAINT;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::source::Inventory;

pub const MODEL_LABEL: &str = "gpumarket.io/gpu-model";
const NO_SCHEDULE: &str = "NoSchedule";

/// The model most of the node's GPUs are (ties: the better tier); `None` without GPUs.
pub fn primary_model(inventory: &Inventory) -> Option<String> {
    let mut counts: BTreeMap<String, (usize, gpumarket_crds::GpuTier)> = BTreeMap::new();
    for gpu in &inventory.gpus {
        counts.entry(gpu.model()).or_insert((0, gpu.tier())).0 += 1;
    }
    counts.into_iter().max_by_key(|(_, rank)| *rank).map(|(model, _)| model)
}

/// The merge patch that adds the taint and label `node` lacks; `None` when it has both.
pub fn node_patch(node: &Node, model: Option<&str>) -> Option<Value> {
    let mut taints: Vec<Taint> =
        node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let tainted = taints.iter().any(|t| t.key == SUPPLIER_TAINT && t.effect == NO_SCHEDULE);
    let relabel = model.filter(|m| node.labels().get(MODEL_LABEL).map(String::as_str) != Some(*m));
    if tainted && relabel.is_none() {
        return None;
    }
    let mut patch = json!({"metadata": {"resourceVersion": node.resource_version()}});
    if !tainted {
        taints.push(Taint {
            key: SUPPLIER_TAINT.into(),
            effect: NO_SCHEDULE.into(),
            ..Default::default()
        });
        patch["spec"] = json!({"taints": taints});
    }
    if let Some(model) = relabel {
        patch["metadata"]["labels"] = json!({ MODEL_LABEL: model });
    }
    Some(patch)
}

/// Taints and labels the node if it is not yet.
pub async fn mark_node(
    nodes: &Api<Node>,
    name: &str,
    model: Option<&str>,
) -> Result<(), kube::Error> {
    let node = nodes.get(name).await?;
    if let Some(patch) = node_patch(&node, model) {
        nodes.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        tracing::info!(node = name, taint = SUPPLIER_TAINT, "node marked as a gpumarket supplier");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    fn node(taints: Vec<Taint>, model: Option<&str>) -> Node {
        let mut node = Node::default();
        node.metadata.resource_version = Some("42".into());
        node.metadata.labels =
            model.map(|m| BTreeMap::from([(MODEL_LABEL.to_string(), m.to_string())]));
        node.spec = Some(NodeSpec { taints: Some(taints), ..Default::default() });
        node
    }

    #[test]
    fn taint_is_added_next_to_existing_ones_with_a_version_check() {
        let other = Taint {
            key: "nvidia.com/gpu".into(),
            effect: NO_SCHEDULE.into(),
            ..Default::default()
        };
        let patch = node_patch(&node(vec![other], None), Some("H100")).expect("changes");
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(patch["metadata"]["labels"][MODEL_LABEL], "H100");
        let keys: Vec<&str> = patch["spec"]["taints"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|t| t["key"].as_str())
            .collect();
        assert_eq!(keys, ["nvidia.com/gpu", SUPPLIER_TAINT]);
    }

    #[test]
    fn a_marked_node_is_left_alone() {
        let ours =
            Taint { key: SUPPLIER_TAINT.into(), effect: NO_SCHEDULE.into(), ..Default::default() };
        assert_eq!(node_patch(&node(vec![ours.clone()], Some("H100")), Some("H100")), None);
        let relabel = node_patch(&node(vec![ours], Some("A100")), Some("H100")).expect("new model");
        assert!(relabel.get("spec").is_none(), "taints untouched");
    }
}
