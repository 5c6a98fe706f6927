//! Where GPUs come from: a `DeviceSource` discovers the node's GPUs and reports health changes.
//! NVML in production ([`nvml::NvmlSource`]), a scripted file for tests and simulated suppliers
//! ([`fake::FakeSource`]). Both also say which files of the node a container of the GPUs needs
//! (device nodes, driver libraries: [`driver`]), for the CDI spec.

pub mod driver;
pub mod fake;
pub mod nvml;

use std::collections::BTreeSet;
use std::path::PathBuf;

use gpumarket_crds::proof::ProductTask;
use gpumarket_crds::{GpuHealth, GpuTier};
use serde::Serialize;
use tokio::sync::mpsc;

pub use driver::DriverFiles;

/// One GPU as discovered on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    /// NVML uuid, e.g. `GPU-5d2f...`; the device id the kubelet sees.
    pub uuid: String,
    /// Product name as NVML reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub product_name: String,
    pub memory_mib: u64,
    /// PCI bus id, e.g. `00000000:1B:00.0`.
    pub pci_bus_id: String,
    /// Uuids of the GPUs this one reaches over NVLink (directly or through an NVSwitch).
    pub nvlink_peers: BTreeSet<String>,
    /// NUMA node of the GPU's PCI device, when the platform reports one.
    pub numa_node: Option<u32>,
    /// The GPU's device node as containers see it (`/dev/nvidia<minor>`), when known.
    pub device_node: Option<PathBuf>,
}

impl Gpu {
    /// Canonical market model (`H100`, `A100`, `RTX4090`, ...) of the product name.
    pub fn model(&self) -> String {
        model_of_product(&self.product_name)
    }

    pub fn tier(&self) -> GpuTier {
        GpuTier::of_model(&self.model())
    }
}

/// Everything discovery found on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
}

impl Inventory {
    pub fn gpu(&self, uuid: &str) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.uuid == uuid)
    }

    pub fn has_nvlink(&self) -> bool {
        self.gpus.iter().any(|g| !g.nvlink_peers.is_empty())
    }
}

/// A change of one GPU's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub uuid: String,
    pub health: GpuHealth,
    /// Why, e.g. `XID 79`; empty when the GPU recovered.
    pub reason: String,
}

/// What the agent needs from the GPUs of its node.
pub trait DeviceSource: Send + Sync {
    /// The node's GPUs. Fails with a message that says what is missing (no driver, no GPUs).
    fn discover(&self) -> Result<Inventory, SourceError>;

    /// Start reporting health changes on `events` until the receiver is dropped.
    fn watch_health(&self, events: mpsc::Sender<HealthEvent>) -> Result<(), SourceError>;

    /// The node's files that every container of its GPUs needs besides the GPUs' own device
    /// nodes: the driver's control nodes and user-space libraries.
    fn driver_files(&self) -> Result<DriverFiles, SourceError>;

    /// `C = A·B` of a proof-of-compute challenge, computed on the GPU `task.uuid`, row by row;
    /// `None` when the source does not answer challenges. Blocks while it computes.
    fn multiply(&self, task: &ProductTask) -> Result<Option<Vec<Vec<u64>>>, SourceError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "NVML is not available ({0}): run the agent on a node with the NVIDIA driver and expose \
         it to the container (NVIDIA container toolkit, NVIDIA_DRIVER_CAPABILITIES=utility), or \
         use --source fake:PATH for a simulated node"
    )]
    NvmlUnavailable(String),
    #[error("NVML call failed: {0}")]
    Nvml(String),
    #[error("fake device file {path}: {message}")]
    FakeFile { path: String, message: String },
    #[error("looking for the NVIDIA driver's files under {root}: {message}")]
    DriverFiles { root: String, message: String },
}

/// XIDs that report application errors rather than a broken GPU; NVIDIA's device plugin skips
/// them too (13 graphics engine exception, 31 memory page fault, 43 stopped channel, 45
/// preemptive cleanup, 68 video decoder exception, 109 context switch timeout).
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// The health event an XID means for `uuid`, or `None` for an application-level XID.
pub fn xid_event(uuid: &str, xid: u64) -> Option<HealthEvent> {
    (!APPLICATION_XIDS.contains(&xid)).then(|| HealthEvent {
        uuid: uuid.to_owned(),
        health: GpuHealth::Unhealthy,
        reason: format!("XID {xid}"),
    })
}

/// An uncorrectable (double-bit) ECC error makes the GPU unhealthy; corrected ones do not.
pub fn double_bit_ecc_event(uuid: &str) -> HealthEvent {
    HealthEvent {
        uuid: uuid.to_owned(),
        health: GpuHealth::Unhealthy,
        reason: "uncorrectable (double-bit) ECC error".into(),
    }
}

/// Market model name of an NVML product name: vendor and brand words dropped, then the model
/// token without form-factor suffixes. `NVIDIA H100 80GB HBM3` → `H100`,
/// `NVIDIA A100-SXM4-80GB` → `A100`, `NVIDIA GeForce RTX 4090` → `RTX4090`,
/// `NVIDIA RTX A6000` → `A6000`, `Tesla T4` → `T4`.
pub fn model_of_product(product_name: &str) -> String {
    const BRANDS: [&str; 5] = ["NVIDIA", "GEFORCE", "TESLA", "QUADRO", "TITAN"];
    let words: Vec<String> = product_name
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .filter(|w| !BRANDS.contains(&w.as_str()))
        .collect();
    let token = match words.as_slice() {
        // "RTX 4090" is a consumer card named with its RTX prefix; "RTX A6000" is a workstation
        // card known by its own name.
        [rtx, next, ..] if rtx == "RTX" && next.starts_with(|c: char| c.is_ascii_digit()) => {
            format!("RTX{next}")
        }
        [rtx, next, ..] if rtx == "RTX" => next.clone(),
        [first, ..] => first.clone(),
        [] => return "Unknown".into(),
    };
    let model: String = token
        .split('-')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
        .take(63)
        .collect();
    if model.is_empty() { "Unknown".into() } else { model }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_names_map_onto_market_models_and_tiers() {
        for (product, model, tier) in [
            ("NVIDIA H100 80GB HBM3", "H100", GpuTier::H100),
            ("NVIDIA H100 PCIe", "H100", GpuTier::H100),
            ("NVIDIA H200", "H200", GpuTier::H100),
            ("NVIDIA GH200 480GB", "GH200", GpuTier::H100),
            ("NVIDIA A100-SXM4-80GB", "A100", GpuTier::A100),
            ("NVIDIA A100 80GB PCIe", "A100", GpuTier::A100),
            ("NVIDIA RTX A6000", "A6000", GpuTier::A6000),
            ("NVIDIA L40S", "L40S", GpuTier::A6000),
            ("NVIDIA GeForce RTX 4090", "RTX4090", GpuTier::Rtx4090),
            ("NVIDIA GeForce RTX 3090 Ti", "RTX3090", GpuTier::Rtx3090),
            ("Tesla T4", "T4", GpuTier::Other),
            ("", "Unknown", GpuTier::Other),
        ] {
            let gpu = Gpu {
                uuid: "GPU-0".into(),
                product_name: product.into(),
                memory_mib: 1,
                pci_bus_id: String::new(),
                nvlink_peers: BTreeSet::new(),
                numa_node: None,
                device_node: None,
            };
            assert_eq!((gpu.model().as_str(), gpu.tier()), (model, tier), "{product}");
        }
    }

    #[test]
    fn application_xids_leave_the_gpu_healthy() {
        for xid in APPLICATION_XIDS {
            assert_eq!(xid_event("GPU-0", xid), None, "XID {xid}");
        }
        for xid in [48, 63, 64, 74, 79, 94, 95] {
            let event = xid_event("GPU-0", xid).expect("a critical XID");
            assert_eq!(event.health, GpuHealth::Unhealthy);
            assert_eq!(event.reason, format!("XID {xid}"));
        }
    }
}
