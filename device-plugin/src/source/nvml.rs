//! GPUs through NVML (nvml-wrapper). The library is loaded on first use, so the agent builds and
//! starts on machines without the NVIDIA driver and fails, with a message saying so, only when
//! it needs NVML.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpumarket_crds::proof::ProductTask;
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use tokio::sync::mpsc;

use super::driver::device_node;
use super::{
    DeviceSource, DriverFiles, Gpu, HealthEvent, Inventory, SourceError, double_bit_ecc_event,
    xid_event,
};

/// Most NVLinks a GPU has (18 on H100); NVML answers InvalidArg past the last one.
const MAX_NVLINKS: u32 = 18;
/// How long one wait for events blocks before checking whether anyone still listens.
const EVENT_WAIT_MS: u32 = 5_000;

pub struct NvmlSource {
    nvml: Mutex<Option<Arc<Nvml>>>,
    /// Where the agent sees the node's `/` (the driver's files are looked up there).
    host_root: PathBuf,
}

impl Default for NvmlSource {
    fn default() -> Self {
        NvmlSource::new(PathBuf::from("/"))
    }
}

impl NvmlSource {
    /// NVML, with the node's `/` seen at `host_root` (`/` when the agent runs on the node
    /// itself, a mount of it when the agent runs in a container).
    pub fn new(host_root: PathBuf) -> Self {
        NvmlSource { nvml: Mutex::new(None), host_root }
    }

    fn nvml(&self) -> Result<Arc<Nvml>, SourceError> {
        let mut loaded =
            self.nvml.lock().map_err(|_| SourceError::Nvml("NVML handle lock poisoned".into()))?;
        if let Some(nvml) = loaded.as_ref() {
            return Ok(nvml.clone());
        }
        let nvml = Arc::new(Nvml::init().map_err(|e| SourceError::NvmlUnavailable(e.to_string()))?);
        *loaded = Some(nvml.clone());
        Ok(nvml)
    }
}

fn nvml_error(what: &str) -> impl Fn(NvmlError) -> SourceError + '_ {
    move |e| SourceError::Nvml(format!("{what}: {e}"))
}

/// The NVLink wiring of one GPU as NVML reports it.
#[derive(Clone, Debug)]
pub struct LinkScan {
    pub uuid: String,
    pub pci_bus_id: String,
    /// PCI bus ids at the far end of each active link: another GPU, or an NVSwitch.
    pub remote_bus_ids: Vec<String>,
}

/// NVLink peers of each GPU. A link to a bus id that is no GPU of the node goes to an NVSwitch,
/// and every GPU on the switch fabric reaches every other one.
pub fn nvlink_peers(scans: &[LinkScan]) -> BTreeMap<String, BTreeSet<String>> {
    let by_bus: BTreeMap<String, &str> =
        scans.iter().map(|s| (normalize_bus_id(&s.pci_bus_id), s.uuid.as_str())).collect();
    let mut peers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut fabric = BTreeSet::new();
    for scan in scans {
        for remote in &scan.remote_bus_ids {
            match by_bus.get(&normalize_bus_id(remote)) {
                Some(&peer) if peer != scan.uuid => {
                    peers.entry(scan.uuid.clone()).or_default().insert(peer.to_owned());
                    peers.entry(peer.to_owned()).or_default().insert(scan.uuid.clone());
                }
                Some(_) => {}
                None => {
                    fabric.insert(scan.uuid.clone());
                }
            }
        }
    }
    for member in &fabric {
        let others = fabric.iter().filter(|other| *other != member).cloned();
        peers.entry(member.clone()).or_default().extend(others);
    }
    peers
}

/// `00000000:1B:00.0` and `0000:1b:00.0` name the same device.
fn normalize_bus_id(bus_id: &str) -> String {
    let upper = bus_id.trim().to_ascii_uppercase();
    match upper.split_once(':') {
        Some((domain, rest)) => format!("{:0>4}:{rest}", domain.trim_start_matches('0')),
        None => upper,
    }
}

/// The NUMA node the kernel reports for the GPU's PCI device (`numa_node` in sysfs), `None`
/// on single-node machines (-1) or when unreadable.
fn numa_node_of(bus_id: &str) -> Option<u32> {
    let path = format!("/sys/bus/pci/devices/{}/numa_node", sysfs_pci_address(bus_id));
    parse_numa_node(&std::fs::read_to_string(path).ok()?)
}

/// NVML's bus id (`00000000:1B:00.0`) as sysfs names the device (`0000:1b:00.0`).
fn sysfs_pci_address(bus_id: &str) -> String {
    normalize_bus_id(bus_id).to_ascii_lowercase()
}

fn parse_numa_node(text: &str) -> Option<u32> {
    text.trim().parse::<i64>().ok().and_then(|n| u32::try_from(n).ok())
}

impl DeviceSource for NvmlSource {
    fn discover(&self) -> Result<Inventory, SourceError> {
        let nvml = self.nvml()?;
        let count = nvml.device_count().map_err(nvml_error("counting GPUs"))?;
        let mut gpus = Vec::new();
        let mut scans = Vec::new();
        for index in 0..count {
            let device = nvml.device_by_index(index).map_err(nvml_error("opening a GPU"))?;
            let uuid = device.uuid().map_err(nvml_error("reading a GPU uuid"))?;
            let pci_bus_id = device.pci_info().map_err(nvml_error("reading PCI info"))?.bus_id;
            let mut remote_bus_ids = Vec::new();
            for link in 0..MAX_NVLINKS {
                let link = device.link_wrapper_for(link);
                match link.is_active() {
                    Ok(true) => {
                        if let Ok(remote) = link.remote_pci_info() {
                            remote_bus_ids.push(remote.bus_id);
                        }
                    }
                    Ok(false) => {}
                    // No NVLink on this GPU, or past its last link.
                    Err(_) => break,
                }
            }
            scans.push(LinkScan {
                uuid: uuid.clone(),
                pci_bus_id: pci_bus_id.clone(),
                remote_bus_ids,
            });
            gpus.push(Gpu {
                product_name: device.name().map_err(nvml_error("reading a GPU name"))?,
                memory_mib: device.memory_info().map_err(nvml_error("reading GPU memory"))?.total
                    / (1024 * 1024),
                uuid,
                device_node: Some(device_node(
                    device.minor_number().map_err(nvml_error("reading a GPU's minor number"))?,
                )),
                numa_node: numa_node_of(&pci_bus_id),
                pci_bus_id,
                nvlink_peers: BTreeSet::new(),
            });
        }
        let mut peers = nvlink_peers(&scans);
        for gpu in &mut gpus {
            gpu.nvlink_peers = peers.remove(&gpu.uuid).unwrap_or_default();
        }
        let cuda_version = nvml
            .sys_cuda_driver_version()
            .ok()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        Ok(Inventory { gpus, driver_version: nvml.sys_driver_version().ok(), cuda_version })
    }

    fn watch_health(&self, events: mpsc::Sender<HealthEvent>) -> Result<(), SourceError> {
        let nvml = self.nvml()?;
        std::thread::Builder::new()
            .name("nvml-events".into())
            .spawn(move || {
                if let Err(e) = watch_events(&nvml, &events) {
                    tracing::error!(error = %e, "NVML health events stopped; GPU health is no longer watched");
                }
            })
            .map_err(|e| SourceError::Nvml(format!("starting the NVML event thread: {e}")))?;
        Ok(())
    }

    fn driver_files(&self) -> Result<DriverFiles, SourceError> {
        // The runtime that reads the spec runs on the node: the files are at the node's paths.
        DriverFiles::find(&self.host_root, Path::new("/"))
    }

    /// Computed on the host's CPU: the answer is right, and in time for the default deadlines
    /// (the products are at most 512×512), but proves the host rather than the GPU. A CUDA
    /// driver API kernel loaded at run time is what makes it a proof of the GPU.
    fn multiply(&self, task: &ProductTask) -> Result<Option<Vec<Vec<u64>>>, SourceError> {
        Ok(Some(task.multiply()))
    }
}

/// Blocks on NVML's event set until the receiver goes away.
fn watch_events(nvml: &Nvml, events: &mpsc::Sender<HealthEvent>) -> Result<(), SourceError> {
    let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
    let mut set = nvml.create_event_set().map_err(nvml_error("creating an event set"))?;
    for index in 0..nvml.device_count().map_err(nvml_error("counting GPUs"))? {
        let device = nvml.device_by_index(index).map_err(nvml_error("opening a GPU"))?;
        let supported = match device.supported_event_types() {
            Ok(supported) if supported.intersects(wanted) => supported,
            // Older GPUs report no events: they stay healthy rather than stopping the others.
            other => {
                tracing::warn!(index, error = ?other.err(), "GPU reports no XID/ECC events; its health is not watched");
                continue;
            }
        };
        set = device
            .register_events(wanted & supported, set)
            .map_err(|e| SourceError::Nvml(format!("registering health events: {}", e.error)))?;
    }
    while !events.is_closed() {
        let data = match set.wait(EVENT_WAIT_MS) {
            Ok(data) => data,
            Err(NvmlError::Timeout) => continue,
            Err(e) => return Err(nvml_error("waiting for events")(e)),
        };
        let uuid = data.device.uuid().map_err(nvml_error("reading a GPU uuid"))?;
        let event = if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
            Some(double_bit_ecc_event(&uuid))
        } else {
            match data.event_data {
                Some(XidError::Value(xid)) => xid_event(&uuid, xid),
                // An XID NVML cannot name may be anything; take the GPU out, as NVIDIA's plugin does.
                Some(XidError::Unknown) | None => Some(HealthEvent {
                    uuid: uuid.clone(),
                    health: gpumarket_crds::GpuHealth::Unhealthy,
                    reason: "unknown XID".into(),
                }),
            }
        };
        if let Some(event) = event
            && events.blocking_send(event).is_err()
        {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_node_is_read_from_the_sysfs_pci_device() {
        assert_eq!(sysfs_pci_address("00000000:1B:00.0"), "0000:1b:00.0");
        assert_eq!(sysfs_pci_address("0001:AB:00.0"), "0001:ab:00.0");
        assert_eq!(parse_numa_node("1\n"), Some(1));
        assert_eq!(parse_numa_node("-1\n"), None, "no NUMA affinity");
        assert_eq!(parse_numa_node(""), None);
    }

    fn scan(uuid: &str, bus: &str, remotes: &[&str]) -> LinkScan {
        LinkScan {
            uuid: uuid.into(),
            pci_bus_id: bus.into(),
            remote_bus_ids: remotes.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn direct_links_pair_gpus_and_switch_links_join_the_fabric() {
        let direct = nvlink_peers(&[
            scan("A", "00000000:1B:00.0", &["0000:1c:00.0"]),
            scan("B", "00000000:1C:00.0", &["00000000:1B:00.0"]),
            scan("C", "00000000:3D:00.0", &[]),
        ]);
        assert_eq!(direct.get("A"), Some(&BTreeSet::from(["B".to_string()])));
        assert_eq!(direct.get("C"), None);

        let switched = nvlink_peers(&[
            scan("A", "00000000:1B:00.0", &["00000000:C1:00.0"]),
            scan("B", "00000000:1C:00.0", &["00000000:C2:00.0"]),
            scan("C", "00000000:3D:00.0", &["00000000:C1:00.0"]),
        ]);
        assert_eq!(switched.get("B"), Some(&BTreeSet::from(["A".to_string(), "C".to_string()])));
    }

    #[test]
    fn starts_without_a_driver_and_explains_when_used() {
        // No GPU machine here: the real path cannot run, but a missing driver must be a clear error.
        let source = NvmlSource::default();
        if let Err(e) = source.discover() {
            assert!(e.to_string().contains("NVIDIA driver"), "{e}");
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and driver; run by hand on a GPU machine"]
    fn discovers_the_real_gpus() {
        let inventory = NvmlSource::default().discover().expect("NVML");
        assert!(!inventory.gpus.is_empty());
        for gpu in &inventory.gpus {
            println!(
                "{} {} -> {} ({} MiB, {} peers)",
                gpu.uuid,
                gpu.product_name,
                gpu.model(),
                gpu.memory_mib,
                gpu.nvlink_peers.len()
            );
            assert!(gpu.uuid.starts_with("GPU-"));
            assert!(gpu.device_node.as_ref().is_some_and(|node| node.exists()), "{gpu:?}");
            assert!(gpu.memory_mib > 1024);
            assert_ne!(gpu.model(), "Unknown");
        }
        let files = NvmlSource::default().driver_files().expect("driver files");
        println!("{files:#?}");
        assert!(files.control_nodes.contains(&PathBuf::from("/dev/nvidiactl")));
        assert!(files.libraries.iter().any(|l| l.ends_with("libcuda.so.1")), "{files:?}");
    }
}
