//! Where the prebuilt tools are: `hack/tools/build.sh` and `hack/solana-validator/build.sh`
//! build them once into `${GPUMARKET_CACHE:-~/.cache/gpumarket}/tools`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

#[derive(Clone, Debug)]
pub struct Tools {
    /// etcd, kube-*, kubectl, kwok, helm, kuberay-operator, argocd-health, gpumarket-validator,
    /// and for the real node kubelet, containerd, ctr, runc, coredns.
    pub bin: PathBuf,
    /// KWOK stage files (node-initialize.yaml, pod-ready.yaml, ...).
    pub kwok_stages: PathBuf,
    /// KubeRay CRD manifests.
    pub kuberay_crds: PathBuf,
    /// CNI plugins (bridge, host-local, loopback, portmap), for the real node.
    pub cni_bin: PathBuf,
}

impl Tools {
    /// `$GPUMARKET_TOOLS_BIN` if set, else the cache's `tools/bin`.
    pub fn locate() -> Tools {
        let root = cache_dir().join("tools");
        let bin =
            std::env::var_os("GPUMARKET_TOOLS_BIN").map_or_else(|| root.join("bin"), PathBuf::from);
        let tools_dir = bin.parent().map_or_else(|| root.clone(), Path::to_path_buf);
        Tools {
            kwok_stages: tools_dir.join("kwok-stages"),
            kuberay_crds: tools_dir.join("kuberay-crds"),
            cni_bin: tools_dir.join("cni-bin"),
            bin,
        }
    }

    /// A command for one of the tools, failing with how to build it when it is missing.
    pub fn command(&self, tool: &str) -> Result<Command> {
        let path = self.bin.join(tool);
        if !path.is_file() {
            let build = if tool == "gpumarket-validator" {
                "hack/solana-validator/build.sh"
            } else {
                "hack/tools/build.sh"
            };
            bail!("{} not found: build it with {build} (or run hack/dev.sh)", path.display());
        }
        Ok(Command::new(path))
    }
}

/// `${GPUMARKET_CACHE:-$HOME/.cache/gpumarket}`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GPUMARKET_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("gpumarket")
}
