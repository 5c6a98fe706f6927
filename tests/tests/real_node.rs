//! The real node: it becomes Ready, runs a pod on its bridge, resolves a Service's name through
//! CoreDNS from inside the pod's network namespace, and leaves nothing behind (processes,
//! mounts, network namespaces, links, cgroups, iptables rules) when the environment stops or
//! when the process that started it is killed.
//!
//! Needs root (it creates a bridge, mounts and cgroups), like the environment it tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpumarket_tests::real_node::{CLUSTER_DOMAIN, NODE_NAME, PAUSE_IMAGE};
use gpumarket_tests::{Env, EnvOptions, RealNode, eventually};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::json;

/// Set (to the directory to use) in the child process of the kill test.
const CHILD_DIR: &str = "GPUMARKET_REAL_NODE_CHILD_DIR";

/// One real node at a time: every kubelet makes the same iptables chains, which a stopping
/// environment removes, so `leftovers` cannot tell whose they are.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start_env(dir: Option<PathBuf>) -> Env {
    let options =
        EnvOptions { dir, keep_dir: keep_dir(), real_node: true, ..EnvOptions::default() };
    Env::start(options).await.expect("environment with a real node")
}

/// A pause pod pinned to the real node (with its service account token: a projected volume,
/// mounted by the kubelet), and a Service selecting it. Returns the pod once Running.
async fn run_pod(env: &Env, namespace: &str) -> (Pod, Service) {
    let client = env.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
            "containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
    }))
    .unwrap();
    let services: Api<Service> = Api::namespaced(client, namespace);
    let service = services.create(&PostParams::default(), &service).await.unwrap();
    let pod = eventually("the pod Running with an IP", Duration::from_secs(120), || async {
        let pod = pods.get("web").await.ok()?;
        let status = pod.status.as_ref()?;
        (status.phase.as_deref() == Some("Running") && status.pod_ip.is_some()).then_some(pod)
    })
    .await;
    (pod, service)
}

/// The network namespace (under containerd's state) holding `ip`.
fn netns_with(node: &RealNode, ip: &str) -> PathBuf {
    let entries = std::fs::read_dir(&node.netns_dir).unwrap();
    entries
        .map(|e| e.unwrap().path())
        .find(|netns| {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["ip", "-4", "-o", "addr", "show"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/"))
        })
        .unwrap_or_else(|| panic!("no network namespace in {} has {ip}", node.netns_dir.display()))
}

/// What is left on the host of the environment in `dir` whose real node had `slot`.
fn leftovers(dir: &Path, slot: u8) -> Vec<String> {
    let dir = dir.display().to_string();
    let mut left = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    left.extend(mounts.lines().filter(|l| l.contains(&dir)).map(|l| format!("mount {l}")));
    for process in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(process.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&dir) {
            left.push(format!("process {:?}: {cmdline}", process.file_name()));
        }
    }
    let bridge = format!("gpmreal{slot}");
    let links = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    left.extend(links.lines().filter(|l| l.contains(&bridge)).map(|l| format!("link {l}")));
    let subnet = format!("10.244.{slot}.");
    let rules = Command::new("iptables-save").output().map(|o| o.stdout).unwrap_or_default();
    let rules = String::from_utf8_lossy(&rules).into_owned();
    left.extend(
        rules
            .lines()
            .filter(|l| l.contains(&bridge) || l.contains(&subnet) || l.contains("KUBE-"))
            .map(|l| format!("iptables {l}")),
    );
    let cgroup = format!("gpumarket-real-{slot}");
    for result in std::fs::read_dir("/var/lib/cni/results").into_iter().flatten().flatten() {
        if result.file_name().to_string_lossy().starts_with(&cgroup) {
            left.push(format!("CNI result {}", result.path().display()));
        }
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let path = hierarchy.path().join(&cgroup);
        if path.exists() {
            left.push(format!("cgroup {}", path.display()));
        }
    }
    left
}

fn keep_dir() -> bool {
    std::env::var_os("GPUMARKET_KEEP_ENV").is_some_and(|v| v == "1")
}

/// Nothing left of the environment in `dir`, which is gone too unless kept.
async fn wait_clean(dir: &Path, slot: u8) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = leftovers(dir, slot);
        if left.is_empty() && (keep_dir() || !dir.exists()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind by the environment in {} (exists: {}):\n{}",
            dir.display(),
            dir.exists(),
            left.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_node_runs_a_pod_that_resolves_a_service_and_stops_clean() {
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let env = start_env(None).await;
    let ready = started.elapsed();
    let node = env.real_node().unwrap();
    for (step, elapsed) in env.timings() {
        eprintln!("{step}: {:.1} s", elapsed.as_secs_f64());
    }
    eprintln!("start to real node Ready: {:.1} s", ready.as_secs_f64());

    let namespace = env.namespace("real-node").await.unwrap();
    let (pod, service) = run_pod(&env, &namespace).await;
    let pod_ip = pod.status.unwrap().pod_ip.unwrap();
    assert!(pod_ip.starts_with(&format!("10.244.{}.", node.slot)), "pod IP {pod_ip} on the bridge");
    let netns = netns_with(node, &pod_ip);
    // The API server reaches the kubelet (logs, exec): pause writes nothing.
    let pods: Api<Pod> = Api::namespaced(env.client().await.unwrap(), &namespace);
    assert_eq!(pods.logs("web", &Default::default()).await.unwrap(), "");

    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();
    let name = format!("web.{namespace}.svc.{CLUSTER_DOMAIN}");
    let resolved = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(env!("CARGO_BIN_EXE_gpumarket-env"))
        .args(["resolve", "--server", &node.dns().to_string(), &name])
        .output()
        .unwrap();
    assert!(resolved.status.success(), "{}", String::from_utf8_lossy(&resolved.stderr));
    assert_eq!(String::from_utf8_lossy(&resolved.stdout).trim(), cluster_ip, "{name} from the pod");

    let (dir, slot) = (env.dir().to_path_buf(), node.slot);
    env.shutdown().unwrap();
    wait_clean(&dir, slot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_process_with_a_real_node_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::Builder::new().prefix("gpumarket-real-kill-").tempdir().unwrap().keep();
    std::fs::remove_dir(&dir).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_with_a_running_pod", "--ignored", "--nocapture"])
        .env(CHILD_DIR, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let line = tokio::task::spawn_blocking(move || {
        stdout.lines().map_while(Result::ok).find(|l| l.starts_with("slot="))
    })
    .await
    .unwrap()
    .expect("the child printed its slot (see its output above)");
    let slot: u8 = line.trim_start_matches("slot=").parse().unwrap();
    assert!(!leftovers(&dir, slot).is_empty(), "the child's node is running");

    child.kill().unwrap();
    child.wait().unwrap();
    wait_clean(&dir, slot).await;
}

/// Run by the kill test in a child process: an environment with a running pod, until killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by killing_the_process_with_a_real_node_leaves_nothing_behind"]
async fn child_with_a_running_pod() {
    let dir = PathBuf::from(std::env::var_os(CHILD_DIR).expect("only run by the kill test"));
    let env = start_env(Some(dir)).await;
    let namespace = env.namespace("real-node-kill").await.unwrap();
    run_pod(&env, &namespace).await;
    println!("slot={}", env.real_node().unwrap().slot);
    tokio::time::sleep(Duration::from_secs(600)).await;
}
