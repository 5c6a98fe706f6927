//! The NVIDIA driver's files a GPU container needs besides its GPUs' own device nodes, looked up
//! under a root directory: the node's `/`, where the agent sees it when it runs in a container
//! (`--host-root`), or a fake node's directory.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::SourceError;

/// The driver's control nodes; GPU processes open them besides their GPUs' nodes. A node may
/// lack some (UVM tools, modeset without a display driver): only those present are used.
pub const CONTROL_NODES: [&str; 4] =
    ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"];

/// Where the distributions' packages and NVIDIA's installer put the driver's libraries.
const LIBRARY_DIRS: [&str; 4] =
    ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"];

/// The driver's libraries for compute and management: the ones NVIDIA's container toolkit
/// mounts for the `compute` and `utility` capabilities.
const LIBRARIES: [&str; 9] = [
    "libcuda",
    "libcudadebugger",
    "libnvidia-ml",
    "libnvidia-ptxjitcompiler",
    "libnvidia-nvvm",
    "libnvidia-gpucomp",
    "libnvidia-cfg",
    "libnvidia-opencl",
    "libnvidia-allocator",
];

/// The driver's tools a container may run to look at its GPUs.
const BINARIES: [&str; 2] = ["/usr/bin/nvidia-smi", "/usr/bin/nvidia-debugdump"];

/// The driver's files on a node, at the paths containers see them at (the node's own paths).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverFiles {
    /// Where the node's `/` is for the container runtime that reads the CDI spec: `/` on a
    /// real node, a fake node's directory.
    pub host_root: PathBuf,
    /// The control nodes present (`/dev/nvidiactl`, ...).
    pub control_nodes: Vec<PathBuf>,
    /// The driver's libraries: each name present, sonames and versioned files alike
    /// (`libcuda.so.1` and `libcuda.so.560.35.03`), so no symlinks are needed in containers.
    pub libraries: Vec<PathBuf>,
    pub binaries: Vec<PathBuf>,
}

/// The device node of the GPU with this minor number.
pub fn device_node(minor: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nvidia{minor}"))
}

/// Whether `file_name` names one of the driver's libraries: `libcuda.so`, `libcuda.so.1`,
/// `libcuda.so.560.35.03`; not `libcudart.so.12` (the CUDA runtime, which images bring).
pub fn is_driver_library(file_name: &str) -> bool {
    LIBRARIES.iter().any(|library| {
        file_name
            .strip_prefix(library)
            .and_then(|rest| rest.strip_prefix(".so"))
            .is_some_and(|version| version.is_empty() || version.starts_with('.'))
    })
}

impl DriverFiles {
    /// Looks the files up under `lookup_root`, where the agent sees the node's `/`; `host_root`
    /// is where that `/` is for the container runtime.
    pub fn find(lookup_root: &Path, host_root: &Path) -> Result<DriverFiles, SourceError> {
        let present = |path: &Path| under(lookup_root, path).exists();
        let control_nodes =
            CONTROL_NODES.iter().map(PathBuf::from).filter(|p| present(p)).collect();
        let binaries = BINARIES.iter().map(PathBuf::from).filter(|p| present(p)).collect();
        let mut libraries = Vec::new();
        for dir in LIBRARY_DIRS {
            let entries = match std::fs::read_dir(under(lookup_root, Path::new(dir))) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(SourceError::DriverFiles {
                        root: lookup_root.display().to_string(),
                        message: format!("reading {dir}: {e}"),
                    });
                }
            };
            for entry in entries.flatten() {
                let path = Path::new(dir).join(entry.file_name());
                // A dangling symlink (a -dev package's libcuda.so without the driver) is no library.
                if entry.file_name().to_str().is_some_and(is_driver_library) && present(&path) {
                    libraries.push(path);
                }
            }
        }
        libraries.sort();
        Ok(DriverFiles { host_root: host_root.to_owned(), control_nodes, libraries, binaries })
    }

    /// Where a file containers see at `path` is on the node.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        under(&self.host_root, path)
    }
}

/// `path` (absolute, as on the node) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_libraries_are_told_apart_from_look_alikes() {
        for name in [
            "libcuda.so",
            "libcuda.so.1",
            "libcuda.so.560.35.03",
            "libnvidia-ml.so.1",
            "libnvidia-ptxjitcompiler.so.560.35.03",
        ] {
            assert!(is_driver_library(name), "{name}");
        }
        for name in [
            "libcudart.so.12",
            "libcuda.a",
            "libcuda.sox",
            "libnvidia-mlx.so.1",
            "libnvidia-egl.so",
        ] {
            assert!(!is_driver_library(name), "{name}");
        }
    }

    #[test]
    fn files_are_found_under_the_root_and_placed_on_the_host() {
        let root = tempfile::tempdir().expect("tempdir");
        let lib = root.path().join("usr/lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&lib).expect("lib dir");
        std::fs::create_dir_all(root.path().join("dev")).expect("dev dir");
        for file in ["dev/nvidiactl", "dev/nvidia-uvm", "dev/nvidia0"] {
            std::fs::write(root.path().join(file), "").expect("device node");
        }
        for file in ["libcuda.so.560.35.03", "libnvidia-ml.so.560.35.03", "libcudart.so.12"] {
            std::fs::write(lib.join(file), "").expect("library");
        }
        std::os::unix::fs::symlink("libcuda.so.560.35.03", lib.join("libcuda.so.1")).expect("ln");
        std::os::unix::fs::symlink("libcuda.so.555.1", lib.join("libcuda.so")).expect("ln");

        let files = DriverFiles::find(root.path(), Path::new("/")).expect("found");
        assert_eq!(
            files.control_nodes,
            [Path::new("/dev/nvidiactl"), Path::new("/dev/nvidia-uvm")]
        );
        let dir = Path::new("/usr/lib/x86_64-linux-gnu");
        assert_eq!(
            files.libraries,
            [
                dir.join("libcuda.so.1"),
                dir.join("libcuda.so.560.35.03"),
                dir.join("libnvidia-ml.so.560.35.03")
            ],
            "the dangling libcuda.so and the CUDA runtime are left out"
        );
        assert!(files.binaries.is_empty());
        assert_eq!(files.host_path(Path::new("/dev/nvidia0")), Path::new("/dev/nvidia0"));

        let fake = DriverFiles::find(root.path(), root.path()).expect("found");
        assert_eq!(fake.host_path(Path::new("/dev/nvidia0")), root.path().join("dev/nvidia0"));
        assert_eq!(device_node(3), Path::new("/dev/nvidia3"));
    }
}
