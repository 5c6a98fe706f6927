//! The container images `hack/images/build.sh` builds without Docker or a registry: each is an
//! OCI image layout archive (what `ctr images import` takes) whose blobs match their digests,
//! named as the chart (or kubelet, for pause) expects, running its own binary as the
//! Dockerfile says, with the libraries it needs inside the image. The ray image is left out
//! (about 10 minutes cold): `hack/images/build.sh ray`.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use gpumarket_tests::tools::Tools;
use serde::Deserialize as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Runs `hack/images/build.sh <image>` (cached: quick when warm) and opens the archive.
fn build(image: &str) -> Image {
    Image::open(&gpumarket_tests::images::build(&Tools::locate(), image).unwrap())
}

/// sha256 of the bytes, as an OCI digest.
fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn tar(args: &[&str], dir: &Path) {
    let status = Command::new("tar").args(args).current_dir(dir).status().expect("running tar");
    assert!(status.success(), "tar {args:?} failed");
}

/// An image archive unpacked: its layout, the one image it names and that image's filesystem.
struct Image {
    /// Kept for as long as the image is open.
    _layout: TempDir,
    rootfs: TempDir,
    /// The index entry's io.containerd.image.name.
    name: String,
    config: Value,
}

impl Image {
    fn open(archive: &Path) -> Image {
        let layout = TempDir::new().unwrap();
        tar(&["-xf", archive.to_str().unwrap()], layout.path());
        let read_json = |name: &str| -> Value {
            let bytes = std::fs::read(layout.path().join(name)).expect(name);
            serde_json::from_slice(&bytes).expect(name)
        };
        assert_eq!(read_json("oci-layout")["imageLayoutVersion"], "1.0.0");
        let index = read_json("index.json");
        assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
        let manifests = index["manifests"].as_array().expect("index.json manifests");
        assert_eq!(manifests.len(), 1, "one image per archive: {index}");
        let entry = &manifests[0];
        assert_eq!(entry["platform"]["os"], "linux");
        let name = entry["annotations"]["io.containerd.image.name"].as_str().expect("image name");
        let tag = name.rsplit_once(':').expect("a tagged name").1;
        assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], tag);

        // Every descriptor's blob is there, with the digest and size it claims.
        let blob = |descriptor: &Value| -> Vec<u8> {
            let digest_str = descriptor["digest"].as_str().expect("digest");
            let hex = digest_str.strip_prefix("sha256:").expect("a sha256 digest");
            let bytes = std::fs::read(layout.path().join("blobs/sha256").join(hex))
                .unwrap_or_else(|e| panic!("blob {digest_str}: {e}"));
            assert_eq!(digest(&bytes), digest_str, "blob content does not match its digest");
            assert_eq!(descriptor["size"], bytes.len(), "size of {digest_str}");
            bytes
        };
        let manifest: Value = serde_json::from_slice(&blob(entry)).unwrap();
        assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
        let config: Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(
            layers.len(),
            config["rootfs"]["diff_ids"].as_array().expect("diff_ids").len(),
            "one diff_id per layer"
        );

        let rootfs = TempDir::new().unwrap();
        for layer in layers {
            assert_eq!(layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
            let path = layout.path().join("layer.tar.gz");
            std::fs::write(&path, blob(layer)).unwrap();
            tar(&["-xzf", path.to_str().unwrap()], rootfs.path());
        }

        // The Docker view of the same blobs (crane, docker load) names the same image.
        let docker = read_json("manifest.json");
        assert_eq!(docker[0]["RepoTags"][0], name);
        assert_eq!(docker[0]["Config"], format!("blobs/sha256/{}", hex(&manifest["config"])));

        Image { name: name.to_owned(), config, _layout: layout, rootfs }
    }

    fn user(&self) -> &str {
        self.config["config"]["User"].as_str().unwrap_or_default()
    }

    fn entrypoint(&self) -> Vec<&str> {
        let entrypoint = self.config["config"]["Entrypoint"].as_array().expect("an entrypoint");
        entrypoint.iter().map(|v| v.as_str().unwrap()).collect()
    }

    fn file(&self, path: &str) -> PathBuf {
        self.rootfs.path().join(path.trim_start_matches('/'))
    }

    /// Runs a program of the image with the image's own dynamic loader and libraries only.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let loader = self.file("/lib64/ld-linux-x86-64.so.2");
        let mut cmd = if loader.exists() {
            let libs = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
                .map(|d| self.rootfs.path().join(d).display().to_string())
                .join(":");
            let mut cmd = Command::new(loader);
            cmd.args(["--inhibit-cache", "--library-path", &libs]).arg(self.file(program));
            cmd
        } else {
            Command::new(self.file(program))
        };
        let out = cmd.args(args).env_clear().output().expect("running the image's program");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{program} {args:?} in {} failed: {text}", self.name);
        text
    }
}

fn hex(descriptor: &Value) -> &str {
    descriptor["digest"].as_str().unwrap().trim_start_matches("sha256:")
}

/// `<repository>:<tag>` the chart deploys for a component by default.
fn chart_default_image(component: &str) -> String {
    let read = |file: &str| -> serde_yaml::Value {
        let text =
            std::fs::read_to_string(repo_root().join("charts/gpumarket").join(file)).unwrap();
        serde_yaml::from_str(&text).unwrap()
    };
    let image = &read("values.yaml")[component]["image"];
    let repository = image["repository"].as_str().expect("image.repository");
    let tag = match image["tag"].as_str() {
        Some(tag) if !tag.is_empty() => tag.to_owned(),
        _ => read("Chart.yaml")["appVersion"].as_str().expect("appVersion").to_owned(),
    };
    format!("{repository}:{tag}")
}

/// The release binary `cargo build --release` left (the one build.sh put in the image).
fn release_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    target.join("release").join(name)
}

#[test]
fn pause_image_is_the_static_sandbox_kubelet_expects() {
    let image = build("pause");
    // kubeadm's PauseVersion for the pinned Kubernetes (build.sh checks its Makefile agrees).
    assert_eq!(image.name, "registry.k8s.io/pause:3.10.2");
    assert_eq!(image.entrypoint(), ["/pause"]);
    assert_eq!(image.user(), "65535:65535");
    assert!(!image.file("/lib64").exists(), "pause must be static, with nothing beside it");
    let version = image.run("/pause", &["-v"]);
    assert!(version.starts_with("pause.c v3.10.2-"), "pause -v: {version}");
}

/// A gpumarket image: the chart's default name, the release binary as entrypoint, running as
/// the Dockerfile's non-root user, answering --help with the libraries shipped in the image,
/// no shell.
fn assert_gpumarket_image(image: &str, component: &str, binary: &str) {
    let image = build(image);
    assert_eq!(image.name, chart_default_image(component));
    let path = format!("/usr/local/bin/{binary}");
    assert_eq!(image.entrypoint(), [path.as_str()]);
    assert_eq!(image.user(), "65532:65532");
    let inside = std::fs::read(image.file(&path)).unwrap();
    let built = std::fs::read(release_binary(binary)).unwrap();
    assert!(inside == built, "{path} in {} is not the binary cargo built", image.name);
    let help = image.run(&path, &["--help"]);
    assert!(help.contains("Usage:"), "{binary} --help: {help}");
    assert!(!image.file("/bin/sh").exists(), "no shell in {}", image.name);
    assert!(image.file("/etc/ssl/certs/ca-certificates.crt").is_file(), "CA certificates");
}

#[test]
fn controller_image_runs_the_release_binary_as_nonroot_under_the_chart_default_name() {
    assert_gpumarket_image("controller", "controller", "gpumarket-controller");
}

#[test]
fn agent_image_runs_the_release_binary_as_nonroot_under_the_chart_default_name() {
    assert_gpumarket_image("agent", "agent", "gpumarket-device-plugin");
}

/// The Ray version examples/gpucluster.yaml pins.
fn examples_ray_version() -> String {
    let text = std::fs::read_to_string(repo_root().join("examples/gpucluster.yaml")).unwrap();
    // The first of the example GpuClusters that names its Ray version (as build.sh reads it).
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde_yaml::Value::deserialize(document).unwrap())
        .find_map(|cluster| cluster["spec"]["ray"]["version"].as_str().map(str::to_owned))
        .expect("spec.ray.version in examples/gpucluster.yaml")
}

/// About 15 minutes cold (debootstrap, PyPI), cached after.
#[test]
fn ray_image_carries_the_examples_ray_version_for_the_ray_user() {
    let version = examples_ray_version();
    let image = build("ray");
    assert_eq!(image.name, format!("ghcr.io/gpumarket/ray:{version}"));
    assert_eq!(image.user(), "1000:100");
    let dist_info = format!("/opt/ray/lib/python3.11/site-packages/ray-{version}.dist-info");
    assert!(image.file(&dist_info).is_dir(), "{dist_info} in {}", image.name);
    // KubeRay starts Ray with bash and probes it with wget.
    for tool in ["/opt/ray/bin/ray", "/bin/bash", "/usr/bin/wget"] {
        assert!(image.file(tool).exists(), "{tool} in {}", image.name);
    }
}
