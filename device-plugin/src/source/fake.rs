//! A node's GPUs described in a YAML file, with a script of health events over time: used by the
//! tests and by simulated suppliers on KWOK nodes (`--source fake:PATH`).
//!
//! ```yaml
//! driverVersion: 560.35.03
//! cudaVersion: "12.6"
//! gpus:
//!   - uuid: GPU-0
//!     productName: NVIDIA H100 80GB HBM3
//!     memoryMib: 81559
//!     pciBusId: 00000000:1B:00.0
//!     nvlinkPeers: [GPU-1]     # links are symmetric; naming them on one side is enough
//!   - uuid: GPU-1
//!     productName: NVIDIA H100 80GB HBM3
//!     memoryMib: 81559
//! events:                      # times count from the start of the agent
//!   - {after: 30s, uuid: GPU-0, xid: 79}
//!   - {after: 2m, uuid: GPU-0, recover: true}
//! hostRoot: /tmp/fake-node      # optional: stands in for the node's /
//! challenges:                   # optional: how proof-of-compute challenges are answered
//!   answer: honest              # honest (default), wrong (a made-up product), silent (none)
//!   opsPerSecond: 5000000       # optional: answer no faster than this many multiply-adds/s
//! ```
//!
//! The GPUs' device nodes are `/dev/nvidia<i>` in file order. With `hostRoot`, the driver's
//! files (control nodes, libraries) are looked up under that directory as under `/` on a real
//! node, and the CDI spec places every file there (`<hostRoot>/dev/nvidia0`): whoever sets up
//! the fake node creates them (plain files do for tests that only check the spec). Without it
//! the node has no driver files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpumarket_crds::GpuHealth;
use gpumarket_crds::common::parse_duration;
use gpumarket_crds::proof::{MODULUS, ProductTask};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use super::driver::device_node;
use super::{
    DeviceSource, DriverFiles, Gpu, HealthEvent, Inventory, SourceError, double_bit_ecc_event,
    xid_event,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FakeFile {
    driver_version: Option<String>,
    cuda_version: Option<String>,
    gpus: Vec<FakeGpu>,
    #[serde(default)]
    events: Vec<ScriptedEvent>,
    host_root: Option<PathBuf>,
    #[serde(default)]
    challenges: FakeChallenges,
}

/// How the fake answers proof-of-compute challenges: it computes on the CPU, then, to play a
/// slower GPU, waits until the work would have taken at `ops_per_second`.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FakeChallenges {
    #[serde(default)]
    pub answer: FakeAnswer,
    pub ops_per_second: Option<u64>,
}

#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum FakeAnswer {
    #[default]
    Honest,
    /// A product that is not `A·B` (every entry one more).
    Wrong,
    /// No answer at all.
    Silent,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FakeGpu {
    uuid: String,
    product_name: String,
    memory_mib: u64,
    #[serde(default)]
    pci_bus_id: String,
    #[serde(default)]
    nvlink_peers: Vec<String>,
    #[serde(default)]
    numa_node: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ScriptedEvent {
    after: String,
    uuid: String,
    xid: Option<u64>,
    #[serde(default)]
    double_bit_ecc: bool,
    #[serde(default)]
    recover: bool,
}

/// What can happen to a fake GPU, from the script or from a test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeFault {
    Xid(u64),
    DoubleBitEcc,
    Recover,
}

impl FakeFault {
    /// The health event the fault causes, classified as the NVML source would.
    fn event(&self, uuid: &str) -> Option<HealthEvent> {
        match self {
            FakeFault::Xid(xid) => xid_event(uuid, *xid),
            FakeFault::DoubleBitEcc => Some(double_bit_ecc_event(uuid)),
            FakeFault::Recover => Some(HealthEvent {
                uuid: uuid.to_owned(),
                health: GpuHealth::Healthy,
                reason: String::new(),
            }),
        }
    }
}

pub struct FakeSource {
    inventory: Inventory,
    host_root: Option<PathBuf>,
    script: Vec<(Duration, String, FakeFault)>,
    injected: broadcast::Sender<(String, FakeFault)>,
    challenges: FakeChallenges,
}

/// Injects faults into a running [`FakeSource`], as a GPU would raise them.
#[derive(Clone)]
pub struct FaultInjector(broadcast::Sender<(String, FakeFault)>);

impl FaultInjector {
    pub fn inject(&self, uuid: &str, fault: FakeFault) {
        // No receiver yet only means nobody watches health; the fault is then moot.
        let _ = self.0.send((uuid.to_owned(), fault));
    }
}

impl FakeSource {
    pub fn from_file(path: &Path) -> Result<Self, SourceError> {
        let error =
            |message: String| SourceError::FakeFile { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::from_yaml(&text).map_err(error)
    }

    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let file: FakeFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let known: BTreeSet<&str> = file.gpus.iter().map(|g| g.uuid.as_str()).collect();
        if known.len() != file.gpus.len() {
            return Err("every GPU needs its own uuid".into());
        }
        let mut peers: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for gpu in &file.gpus {
            if gpu.memory_mib == 0 {
                return Err(format!("GPU {} needs memoryMib greater than 0", gpu.uuid));
            }
            for peer in &gpu.nvlink_peers {
                if !known.contains(peer.as_str()) || *peer == gpu.uuid {
                    return Err(format!(
                        "GPU {}: nvlinkPeers names {peer}, which is not another GPU of the file",
                        gpu.uuid
                    ));
                }
                peers.entry(&gpu.uuid).or_default().insert(peer.clone());
                peers.entry(peer).or_default().insert(gpu.uuid.clone());
            }
        }
        let mut script = Vec::new();
        for event in &file.events {
            if !known.contains(event.uuid.as_str()) {
                return Err(format!("event for {}: no GPU with that uuid", event.uuid));
            }
            let after = parse_duration(&event.after).map_err(|e| e.to_string())?;
            let fault = match (event.xid, event.double_bit_ecc, event.recover) {
                (Some(xid), false, false) => FakeFault::Xid(xid),
                (None, true, false) => FakeFault::DoubleBitEcc,
                (None, false, true) => FakeFault::Recover,
                _ => {
                    return Err(format!(
                        "event for {} after {}: give exactly one of xid: N, doubleBitEcc: true, recover: true",
                        event.uuid, event.after
                    ));
                }
            };
            script.push((after, event.uuid.clone(), fault));
        }
        script.sort_by_key(|(after, _, _)| *after);
        let gpus = (0..)
            .zip(&file.gpus)
            .map(|(index, g)| Gpu {
                uuid: g.uuid.clone(),
                product_name: g.product_name.clone(),
                memory_mib: g.memory_mib,
                pci_bus_id: g.pci_bus_id.clone(),
                nvlink_peers: peers.remove(g.uuid.as_str()).unwrap_or_default(),
                numa_node: g.numa_node,
                device_node: Some(device_node(index)),
            })
            .collect();
        let inventory = Inventory {
            gpus,
            driver_version: file.driver_version,
            cuda_version: file.cuda_version,
        };
        Ok(FakeSource {
            inventory,
            host_root: file.host_root,
            script,
            injected: broadcast::channel(64).0,
            challenges: file.challenges,
        })
    }

    pub fn injector(&self) -> FaultInjector {
        FaultInjector(self.injected.clone())
    }
}

impl DeviceSource for FakeSource {
    fn discover(&self) -> Result<Inventory, SourceError> {
        Ok(self.inventory.clone())
    }

    fn watch_health(&self, events: mpsc::Sender<HealthEvent>) -> Result<(), SourceError> {
        let script = self.script.clone();
        let mut injected = self.injected.subscribe();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut script = script.into_iter().peekable();
            loop {
                let next_at = script.peek().map(|(after, _, _)| start + *after);
                let (uuid, fault) = tokio::select! {
                    Some(()) = async { tokio::time::sleep_until(next_at?).await; Some(()) } => {
                        let Some((_, uuid, fault)) = script.next() else { continue };
                        (uuid, fault)
                    }
                    received = injected.recv() => match received {
                        Ok(injected) => injected,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if let Some(event) = fault.event(&uuid)
                    && events.send(event).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(())
    }

    fn driver_files(&self) -> Result<DriverFiles, SourceError> {
        match &self.host_root {
            Some(root) => DriverFiles::find(root, root),
            None => Ok(DriverFiles {
                host_root: PathBuf::from("/"),
                control_nodes: Vec::new(),
                libraries: Vec::new(),
                binaries: Vec::new(),
            }),
        }
    }

    fn multiply(&self, task: &ProductTask) -> Result<Option<Vec<Vec<u64>>>, SourceError> {
        let started = std::time::Instant::now();
        let mut product = match self.challenges.answer {
            FakeAnswer::Silent => return Ok(None),
            FakeAnswer::Honest | FakeAnswer::Wrong => task.multiply(),
        };
        if self.challenges.answer == FakeAnswer::Wrong {
            product.iter_mut().flatten().for_each(|v| *v = (*v + 1) % MODULUS);
        }
        if let Some(rate) = self.challenges.ops_per_second.filter(|r| *r > 0) {
            let slow = Duration::from_secs_f64(task.operations() as f64 / rate as f64);
            std::thread::sleep(slow.saturating_sub(started.elapsed()));
        }
        Ok(Some(product))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_H100: &str = "
driverVersion: 560.35.03
gpus:
  - {uuid: GPU-0, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559, nvlinkPeers: [GPU-1]}
  - {uuid: GPU-1, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}
events:
  - {after: 0s, uuid: GPU-1, xid: 13}
  - {after: 0s, uuid: GPU-1, xid: 79}
";

    #[test]
    fn nvlink_peers_are_symmetric() {
        let inventory = FakeSource::from_yaml(TWO_H100).expect("valid file").inventory;
        assert_eq!(
            inventory.gpu("GPU-1").map(|g| g.nvlink_peers.clone()),
            Some(BTreeSet::from(["GPU-0".to_string()]))
        );
        assert_eq!(inventory.driver_version.as_deref(), Some("560.35.03"));
        let nodes: Vec<_> = inventory.gpus.iter().map(|g| g.device_node.clone()).collect();
        assert_eq!(nodes, [Some("/dev/nvidia0".into()), Some("/dev/nvidia1".into())]);
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        for (yaml, expected) in [
            ("gpus: [{uuid: A, productName: x, memoryMib: 0}]", "memoryMib greater than 0"),
            (
                "gpus: [{uuid: A, productName: x, memoryMib: 1, nvlinkPeers: [B]}]",
                "not another GPU",
            ),
            ("gpus: []\nevents: [{after: 1s, uuid: A, xid: 79}]", "no GPU with that uuid"),
            (
                "gpus: [{uuid: A, productName: x, memoryMib: 1}]\nevents: [{after: 1s, uuid: A}]",
                "exactly one of",
            ),
            (
                "gpus: [{uuid: A, productName: x, memoryMib: 1}]\nevents: [{after: soon, uuid: A, xid: 1}]",
                "invalid duration",
            ),
        ] {
            let error = FakeSource::from_yaml(yaml).err().unwrap_or_default();
            assert!(error.contains(expected), "{yaml}: {error}");
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fake-hgx-h100.yaml");
        let source = FakeSource::from_file(&path).expect("the example parses");
        assert_eq!(source.inventory.gpus.len(), 8);
        assert!(source.inventory.gpus.iter().all(|g| g.nvlink_peers.len() == 7));
        assert_eq!(source.script.len(), 2);
    }

    #[tokio::test]
    async fn the_script_plays_critical_events_only() {
        let source = FakeSource::from_yaml(TWO_H100).expect("valid file");
        let (tx, mut rx) = mpsc::channel(8);
        source.watch_health(tx).expect("watch");
        let event = rx.recv().await.expect("an event");
        assert_eq!(
            (event.uuid.as_str(), event.health, event.reason.as_str()),
            ("GPU-1", GpuHealth::Unhealthy, "XID 79")
        );
        source.injector().inject("GPU-1", FakeFault::Recover);
        assert_eq!(rx.recv().await.map(|e| e.health), Some(GpuHealth::Healthy));
    }
}
