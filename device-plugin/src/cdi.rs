//! The Container Device Interface spec of the node's GPUs, so that a CDI-aware runtime
//! (containerd 2, CRI-O) gives a container the GPUs `Allocate` names (`nvidia.com/gpu=<uuid>`)
//! without NVIDIA's container toolkit: each GPU's device node, and for every GPU container the
//! driver's control nodes and libraries. The spec is built from discovery alone ([`spec`]);
//! the agent writes it where runtimes read specs ([`WrittenSpec`]).
//!
//! Format: <https://github.com/cncf-tags/container-device-interface/blob/main/SPEC.md>.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::allocation::CDI_KIND;
use crate::source::{DriverFiles, Inventory};

/// The oldest CDI version with every field the spec uses (`hostPath` of device nodes came in
/// 0.5.0), so that every CDI-aware runtime loads it: a runtime refuses versions newer than its
/// CDI library knows. NVIDIA's `nvidia-ctk cdi generate` writes 0.5.0 too.
pub const CDI_VERSION: &str = "0.5.0";

/// The spec's file name in the spec directory; runtimes load every `*.json` and `*.yaml` there.
pub const SPEC_FILE: &str = "gpumarket-nvidia.json";

/// Bind mounts of the driver's files: read-only, nothing on them runs set-uid or as a device.
const MOUNT_OPTIONS: [&str; 4] = ["ro", "nosuid", "nodev", "bind"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<Device>,
    /// Applied to every container given any of the devices.
    pub container_edits: ContainerEdits,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    pub name: String,
    pub container_edits: ContainerEdits,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
}

/// A device node: `path` in the container, `host_path` on the node. The runtime reads its type
/// and numbers from the node's file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceNode {
    pub path: PathBuf,
    pub host_path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub options: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CdiError {
    #[error("no GPUs were discovered: there is nothing for a CDI spec to name; run without --cdi")]
    NoGpus,
    #[error("GPU {uuid} has no device node, so a CDI spec cannot give it to containers")]
    NoDeviceNode { uuid: String },
    #[error(
        "the NVIDIA driver's {missing} was not found: load the driver, and with the agent in a \
         container mount the node's /dev and /usr under --host-root (the chart does with \
         agent.cdi); a CDI spec without it would give containers GPUs they cannot use"
    )]
    MissingDriverFile { missing: &'static str },
    #[error("writing the CDI spec {path}: {message}")]
    Write { path: String, message: String },
}

/// The CDI spec of the node's GPUs: one device per GPU, named by its uuid as `Allocate` names
/// it, with its device node; the driver's control nodes and files go to every GPU container.
pub fn spec(inventory: &Inventory, files: &DriverFiles) -> Result<Spec, CdiError> {
    if inventory.gpus.is_empty() {
        return Err(CdiError::NoGpus);
    }
    if !files.control_nodes.iter().any(|node| node.ends_with("nvidiactl")) {
        return Err(CdiError::MissingDriverFile { missing: "control node /dev/nvidiactl" });
    }
    if !files.libraries.iter().any(|library| library.ends_with("libcuda.so.1")) {
        return Err(CdiError::MissingDriverFile { missing: "library libcuda.so.1" });
    }
    let node = |path: &Path| DeviceNode { path: path.to_owned(), host_path: files.host_path(path) };
    let devices = inventory
        .gpus
        .iter()
        .map(|gpu| {
            let path = gpu
                .device_node
                .as_deref()
                .ok_or_else(|| CdiError::NoDeviceNode { uuid: gpu.uuid.clone() })?;
            Ok(Device {
                name: gpu.uuid.clone(),
                container_edits: ContainerEdits {
                    device_nodes: vec![node(path)],
                    ..Default::default()
                },
            })
        })
        .collect::<Result<_, CdiError>>()?;
    let mounts = files
        .libraries
        .iter()
        .chain(&files.binaries)
        .map(|path| Mount {
            host_path: files.host_path(path),
            container_path: path.clone(),
            options: MOUNT_OPTIONS.map(String::from).to_vec(),
        })
        .collect();
    Ok(Spec {
        cdi_version: CDI_VERSION.into(),
        kind: CDI_KIND.into(),
        devices,
        container_edits: ContainerEdits {
            // The spec itself gives the container its GPUs; `void` tells an NVIDIA runtime
            // hook, should the node have one, to add none (as NVIDIA's own CDI specs do).
            env: vec!["NVIDIA_VISIBLE_DEVICES=void".into()],
            device_nodes: files.control_nodes.iter().map(|path| node(path)).collect(),
            mounts,
        },
    })
}

/// The spec as written in a spec directory; removed when dropped (the agent stopping), so that
/// no runtime hands out GPUs of an agent that no longer serves them.
#[derive(Debug)]
pub struct WrittenSpec {
    path: PathBuf,
}

impl WrittenSpec {
    /// Writes `spec` to `dir`, replacing the agent's earlier one. Runtimes may load the
    /// directory at any moment: the file appears whole, by a rename, never half-written (the
    /// temporary file's name is no spec's).
    pub fn write(dir: &Path, spec: &Spec) -> Result<WrittenSpec, CdiError> {
        let path = dir.join(SPEC_FILE);
        let error = |e: std::io::Error| CdiError::Write {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let json = serde_json::to_vec_pretty(spec).map_err(|e| error(e.into()))?;
        let temporary = dir.join(format!(".{SPEC_FILE}.tmp"));
        std::fs::create_dir_all(dir).map_err(error)?;
        std::fs::write(&temporary, json).map_err(error)?;
        std::fs::rename(&temporary, &path).map_err(error)?;
        tracing::info!(path = %path.display(), devices = spec.devices.len(), "wrote the CDI spec");
        Ok(WrittenSpec { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WrittenSpec {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::info!(path = %self.path.display(), "removed the CDI spec"),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the CDI spec")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Gpu;
    use crate::source::driver::device_node;

    fn inventory(gpus: usize) -> Inventory {
        let gpus = (0..)
            .take(gpus)
            .map(|i| Gpu {
                uuid: format!("GPU-{i}"),
                product_name: "NVIDIA H100 80GB HBM3".into(),
                memory_mib: 81_559,
                pci_bus_id: String::new(),
                nvlink_peers: Default::default(),
                numa_node: None,
                device_node: Some(device_node(i)),
            })
            .collect();
        Inventory { gpus, ..Default::default() }
    }

    fn files(host_root: &str) -> DriverFiles {
        let lib = Path::new("/usr/lib/x86_64-linux-gnu");
        DriverFiles {
            host_root: host_root.into(),
            control_nodes: vec!["/dev/nvidiactl".into(), "/dev/nvidia-uvm".into()],
            libraries: vec![lib.join("libcuda.so.1"), lib.join("libnvidia-ml.so.1")],
            binaries: vec!["/usr/bin/nvidia-smi".into()],
        }
    }

    #[test]
    fn each_gpu_is_a_device_named_as_allocate_names_it() {
        let spec = spec(&inventory(2), &files("/")).expect("a spec");
        assert_eq!((spec.cdi_version.as_str(), spec.kind.as_str()), ("0.5.0", "nvidia.com/gpu"));
        let allocated =
            crate::allocation::container_devices(&inventory(2), &["GPU-1".to_string()], true)
                .expect("known device");
        let named: Vec<String> =
            spec.devices.iter().map(|d| format!("{}={}", spec.kind, d.name)).collect();
        assert!(named.contains(&allocated.cdi_devices[0]), "{named:?}");
        assert_eq!(
            spec.devices[1].container_edits,
            ContainerEdits {
                device_nodes: vec![DeviceNode {
                    path: "/dev/nvidia1".into(),
                    host_path: "/dev/nvidia1".into()
                }],
                ..Default::default()
            }
        );
        let common = &spec.container_edits;
        assert_eq!(common.env, ["NVIDIA_VISIBLE_DEVICES=void"]);
        let control: Vec<&Path> = common.device_nodes.iter().map(|n| n.path.as_path()).collect();
        assert_eq!(control, [Path::new("/dev/nvidiactl"), Path::new("/dev/nvidia-uvm")]);
        let mounted: Vec<&Path> =
            common.mounts.iter().map(|m| m.container_path.as_path()).collect();
        assert_eq!(mounted.len(), 3);
        assert!(mounted.contains(&Path::new("/usr/bin/nvidia-smi")));
        for mount in &common.mounts {
            assert_eq!(mount.host_path, mount.container_path, "on a node, paths stay the node's");
            assert!(
                mount.options.iter().any(|o| o == "ro") && mount.options.contains(&"bind".into())
            );
        }
    }

    #[test]
    fn a_fake_nodes_files_are_placed_under_its_root() {
        let spec = spec(&inventory(1), &files("/tmp/node")).expect("a spec");
        let node = &spec.devices[0].container_edits.device_nodes[0];
        assert_eq!(
            (node.path.as_path(), node.host_path.as_path()),
            (Path::new("/dev/nvidia0"), Path::new("/tmp/node/dev/nvidia0"))
        );
        let mount = &spec.container_edits.mounts[0];
        assert_eq!(mount.host_path, Path::new("/tmp/node/usr/lib/x86_64-linux-gnu/libcuda.so.1"));
        assert_eq!(mount.container_path, Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1"));
    }

    #[test]
    fn the_json_has_the_cdi_field_names() {
        let json = serde_json::to_value(spec(&inventory(1), &files("/")).expect("a spec"))
            .expect("serializes");
        assert_eq!(json["cdiVersion"], "0.5.0");
        assert_eq!(json["devices"][0]["name"], "GPU-0");
        assert_eq!(
            json["devices"][0]["containerEdits"]["deviceNodes"][0]["hostPath"],
            "/dev/nvidia0"
        );
        assert!(
            json["devices"][0]["containerEdits"].get("mounts").is_none(),
            "empty lists left out"
        );
        assert_eq!(
            json["containerEdits"]["mounts"][0]["containerPath"],
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
        );
    }

    #[test]
    fn a_spec_that_could_not_work_is_refused() {
        assert_eq!(spec(&inventory(0), &files("/")), Err(CdiError::NoGpus));
        let mut no_node = inventory(1);
        no_node.gpus[0].device_node = None;
        assert_eq!(
            spec(&no_node, &files("/")),
            Err(CdiError::NoDeviceNode { uuid: "GPU-0".into() })
        );
        let mut no_ctl = files("/");
        no_ctl.control_nodes.retain(|n| !n.ends_with("nvidiactl"));
        let error = spec(&inventory(1), &no_ctl).expect_err("no nvidiactl");
        assert!(error.to_string().contains("/dev/nvidiactl was not found"), "{error}");
        let mut no_cuda = files("/");
        no_cuda.libraries.retain(|l| !l.ends_with("libcuda.so.1"));
        assert!(spec(&inventory(1), &no_cuda).is_err());
    }

    #[test]
    fn the_written_spec_replaces_a_stale_one_and_is_removed_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let specs = dir.path().join("cdi");
        std::fs::create_dir_all(&specs).expect("spec dir");
        // Left by an agent that was killed.
        std::fs::write(specs.join(SPEC_FILE), "{\"cdiVersion\": \"0.5.0\"").expect("stale spec");
        let two = spec(&inventory(2), &files("/")).expect("spec");
        let written = WrittenSpec::write(&specs, &two).expect("written");
        let read: Spec =
            serde_json::from_slice(&std::fs::read(written.path()).expect("read")).expect("a spec");
        assert_eq!(read, two);
        let names: Vec<_> = std::fs::read_dir(&specs)
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [SPEC_FILE], "no temporary file left behind");
        drop(written);
        assert!(!specs.join(SPEC_FILE).exists());
    }
}
