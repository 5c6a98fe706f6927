//! KWOK and fake GPU nodes: Nodes that KWOK keeps Ready (with leases) and whose pods it runs.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use gpumarket_crds::common::{GPU_RESOURCE, REGION_LABEL, ZONE_LABEL};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use crate::process::{Process, Reaper};
use crate::tools::Tools;

/// The annotation KWOK manages nodes by.
pub const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");
/// Label naming the GPU model of a node (what simulated suppliers and the agent read).
pub const MODEL_LABEL: &str = "gpumarket.io/gpu-model";
/// Label with the memory of each GPU, in MiB.
pub const MEMORY_LABEL: &str = "gpumarket.io/gpu-memory-mib";

/// The stages KWOK plays: nodes become Ready and heartbeat, pods become Ready, finish and go.
const STAGES: &[&str] =
    &["node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"];

/// The addresses KWOK gives its pods (room for many: the default /24 has 254). Nothing is
/// there: the real node's routing keeps traffic to them on the host.
pub const POD_CIDR: &str = "10.0.0.0/16";

/// KWOK for the cluster of `kubeconfig`, giving its pods addresses from `pod_cidr`.
pub fn start(
    dir: &Path,
    tools: &Tools,
    kubeconfig: &Path,
    reaper: &Reaper,
    pod_cidr: &str,
) -> Result<Process> {
    let mut kwok = tools.command("kwok")?;
    kwok.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--manage-all-nodes=false")
        .arg(format!(
            "--manage-nodes-with-annotation-selector={}={}",
            KWOK_NODE_ANNOTATION.0, KWOK_NODE_ANNOTATION.1
        ))
        .arg("--node-lease-duration-seconds=40")
        .arg(format!("--cidr={pod_cidr}"));
    for stage in STAGES {
        let file = tools.kwok_stages.join(format!("{stage}.yaml"));
        if !file.is_file() {
            bail!("KWOK stage {} not found: run hack/tools/build.sh", file.display());
        }
        kwok.arg("-c").arg(file);
    }
    Ok(Process::spawn(reaper, &dir.join("logs"), "kwok", kwok)?.supervised())
}

/// A fake GPU node: `GpuNode::new("h100-a", "H100", 8).region("eu-west").zone("eu-west-1a")`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuNode {
    pub name: String,
    pub model: String,
    pub gpus: u32,
    pub memory_mib: u64,
    pub region: String,
    pub zone: Option<String>,
}

impl GpuNode {
    /// A node in region `local` with `gpus` GPUs of `model` (memory from the model's usual
    /// size; change it with [`GpuNode::memory_mib`]).
    pub fn new(name: &str, model: &str, gpus: u32) -> GpuNode {
        GpuNode {
            name: name.to_string(),
            model: model.to_string(),
            gpus,
            memory_mib: usual_memory_mib(model),
            region: "local".to_string(),
            zone: None,
        }
    }

    pub fn region(mut self, region: &str) -> GpuNode {
        self.region = region.to_string();
        self
    }

    pub fn zone(mut self, zone: &str) -> GpuNode {
        self.zone = Some(zone.to_string());
        self
    }

    /// Memory of each GPU, in MiB.
    pub fn memory_mib(mut self, memory_mib: u64) -> GpuNode {
        self.memory_mib = memory_mib;
        self
    }

    /// The Node object: KWOK's annotation, model/memory/topology labels, and capacity (CPU
    /// and memory in proportion to the GPUs, so that GPU pods are limited by GPUs).
    pub fn to_node(&self) -> Result<Node> {
        let mut labels = json!({
            MODEL_LABEL: self.model,
            MEMORY_LABEL: self.memory_mib.to_string(),
            REGION_LABEL: self.region,
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        });
        if let Some(zone) = &self.zone {
            labels[ZONE_LABEL] = json!(zone);
        }
        let resources = json!({
            "cpu": (16 * self.gpus.max(1)).to_string(),
            "memory": format!("{}Gi", 128 * self.gpus.max(1)),
            "ephemeral-storage": "1Ti",
            "pods": "110",
            GPU_RESOURCE: self.gpus.to_string(),
        });
        Ok(serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {KWOK_NODE_ANNOTATION.0: KWOK_NODE_ANNOTATION.1},
                "labels": labels,
            },
            "status": {"capacity": resources, "allocatable": resources},
        }))?)
    }
}

/// Memory of one GPU of a model, in MiB, for the models the market knows.
fn usual_memory_mib(model: &str) -> u64 {
    match model {
        "H200" => 143_771,
        "A6000" | "L40S" => 49_140,
        "RTX4090" | "RTX3090" => 24_564,
        _ => 81_920, // H100 and A100 80 GB
    }
}

/// Create the nodes (existing ones are left as they are) and wait until KWOK reports each Ready
/// with its GPUs allocatable.
pub async fn add_gpu_nodes(client: &kube::Client, nodes: &[GpuNode]) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let objects = nodes.iter().map(GpuNode::to_node).collect::<Result<Vec<_>>>()?;
    futures::stream::iter(objects)
        .map(|node| {
            let api = api.clone();
            async move {
                match api.create(&PostParams::default(), &node).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    Err(e) => Err(e).context("creating a KWOK node"),
                }
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    wait_nodes_ready(&api, nodes, Duration::from_secs(180)).await
}

async fn wait_nodes_ready(api: &Api<Node>, nodes: &[GpuNode], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut waiting: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let selector = format!("{}={}", "type", "kwok");
    loop {
        for node in api.list(&ListParams::default().labels(&selector)).await?.items {
            if node_ready_with_gpus(&node) {
                waiting.remove(node.metadata.name.as_deref().unwrap_or_default());
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let some: Vec<_> = waiting.iter().take(5).collect();
            bail!(
                "{} KWOK nodes not Ready with GPUs after {timeout:?} (e.g. {some:?}); is kwok running?",
                waiting.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Ready, and `nvidia.com/gpu` allocatable.
pub fn node_ready_with_gpus(node: &Node) -> bool {
    let Some(status) = &node.status else { return false };
    let ready =
        status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    let gpus = status.allocatable.as_ref().and_then(|a| a.get(GPU_RESOURCE)).is_some();
    ready && gpus
}
