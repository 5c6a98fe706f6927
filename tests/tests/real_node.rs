//! The real node: it becomes Ready, runs pods on its bridge; from inside a pod's network
//! namespace a Service's name resolves through the kube-dns ClusterIP and another pod answers
//! at its Service's ClusterIP (kube-proxy), while nothing from the pods leaves the host, not
//! even through a Service whose endpoint is off the host. It leaves nothing behind (processes,
//! mounts, network namespaces, links, cgroups, iptables rules, routes, policy rules) when the
//! environment stops or when the process that started it is killed.
//!
//! Needs root (it creates a bridge, mounts and cgroups), like the environment it tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpumarket_tests::real_node::{
    CLUSTER_DOMAIN, DEVICE_PLUGIN_DIR, DNS_SERVICE_IP, NODE_NAME, PAUSE_IMAGE, routing_table,
    service_proxied,
};
use gpumarket_tests::{Env, EnvOptions, RealNode, eventually};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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

/// A pause pod `name` (label `app: <name>`) pinned to the real node, with its service account
/// token (a projected volume, mounted by the kubelet). Returns the pod once Running.
async fn run_pod(env: &Env, namespace: &str, name: &str) -> Pod {
    let client = env.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
            "containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually("the pod Running with an IP", Duration::from_secs(120), || async {
        let pod = pods.get(name).await.ok()?;
        let status = pod.status.as_ref()?;
        (status.phase.as_deref() == Some("Running") && status.pod_ip.is_some()).then_some(pod)
    })
    .await
}

/// A Service `name` with `spec`; returns its ClusterIP.
async fn create_service(env: &Env, namespace: &str, name: &str, spec: serde_json::Value) -> String {
    let services: Api<Service> = Api::namespaced(env.client().await.unwrap(), namespace);
    let service =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
    let service = services.create(&PostParams::default(), &service).await.unwrap();
    service.spec.unwrap().cluster_ip.unwrap()
}

/// `python3 -c <program> <args>` inside the network namespace `netns`.
fn python_in(netns: &Path, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={}", netns.display())).args(["python3", "-c", program]);
    command
}

/// Accepts connections forever and answers each with the peer's address.
const ECHO_PEER: &str = "import socket\n\
s = socket.socket()\n\
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', 80))\n\
s.listen()\n\
while True:\n    c, peer = s.accept()\n    c.sendall(peer[0].encode())\n    c.close()\n";

/// Connects to argv[1]:80 and prints what it reads.
const READ_FROM: &str = "import socket, sys\n\
s = socket.create_connection((sys.argv[1], 80), timeout=2)\n\
print(s.recv(100).decode())\n";

/// Sends three datagrams to argv[1]:9.
const SEND_UDP: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
for _ in range(3):\n    s.sendto(b'x', (sys.argv[1], 9))\n";

/// The packets that `spec` (an iptables rule, counting only) counts in `table`'s `chain` while
/// `send` runs.
fn packets_counted(table: &str, chain: &str, spec: &[&str], send: impl FnOnce()) -> u64 {
    let comment = format!("gpumarket-test-{chain}");
    let iptables = |op: &str| {
        let status = Command::new("iptables")
            .args(["-w", "5", "-t", table, op, chain])
            .args(spec)
            .args(["-m", "comment", "--comment", &comment])
            .status()
            .unwrap();
        assert!(status.success(), "iptables {op} {chain} {spec:?}");
    };
    iptables("-I");
    send();
    let saved = Command::new("iptables-save").args(["-c", "-t", table]).output().unwrap();
    iptables("-D");
    let saved = String::from_utf8_lossy(&saved.stdout).into_owned();
    let line = saved.lines().find(|l| l.contains(&comment)).unwrap_or_else(|| panic!("{saved}"));
    line.trim_start_matches('[').split(':').next().unwrap().parse().unwrap()
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
    // kube-proxy runs dual-stack: its chains are in both families.
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = Command::new(save).output().map(|o| o.stdout).unwrap_or_default();
        let rules = String::from_utf8_lossy(&rules).into_owned();
        left.extend(
            rules
                .lines()
                .filter(|l| l.contains(&bridge) || l.contains(&subnet) || l.contains("KUBE-"))
                .map(|l| format!("{save}: {l}")),
        );
    }
    let table = routing_table(slot).to_string();
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules = ip(&["rule", "show"]);
    left.extend(rules.lines().filter(|l| l.contains(&table)).map(|l| format!("ip rule {l}")));
    let routes = ip(&["route", "show", "table", "all"]);
    left.extend(
        routes
            .lines()
            .filter(|l| {
                l.contains(&format!("table {table}")) || l.contains(&format!("metric {table}"))
            })
            .map(|l| format!("route {l}")),
    );
    if std::path::Path::new(&format!("/proc/sys/net/ipv4/conf/{bridge}")).exists() {
        left.push(format!("sysctl net.ipv4.conf.{bridge}"));
    }
    if Path::new(DEVICE_PLUGIN_DIR).exists() {
        left.push(format!("the kubelet's device-plugin directory {DEVICE_PLUGIN_DIR}"));
    }
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
async fn real_node_pods_reach_services_nothing_leaves_the_host_and_it_stops_clean() {
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
    let web = run_pod(&env, &namespace, "web").await;
    let client = run_pod(&env, &namespace, "client").await;
    let web_ip = web.status.unwrap().pod_ip.unwrap();
    let client_ip = client.status.unwrap().pod_ip.unwrap();
    for ip in [&web_ip, &client_ip] {
        assert!(ip.starts_with(&format!("10.244.{}.", node.slot)), "pod IP {ip} on the bridge");
    }
    let (web_netns, client_netns) = (netns_with(node, &web_ip), netns_with(node, &client_ip));
    // The API server reaches the kubelet (logs, exec): pause writes nothing.
    let pods: Api<Pod> = Api::namespaced(env.client().await.unwrap(), &namespace);
    assert_eq!(pods.logs("web", &Default::default()).await.unwrap(), "");

    // The Service's name, asked of the kube-dns ClusterIP (the pods' nameserver) from the pod.
    let sandboxes = env.dir().join("real-node/containerd/io.containerd.grpc.v1.cri/sandboxes");
    let sandboxes: Vec<_> =
        std::fs::read_dir(&sandboxes).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(sandboxes.len(), 2, "web's and client's sandboxes: {sandboxes:?}");
    for sandbox in sandboxes {
        let resolv_conf = std::fs::read_to_string(sandbox.join("resolv.conf")).unwrap();
        assert!(resolv_conf.contains(&format!("nameserver {DNS_SERVICE_IP}\n")), "{resolv_conf}");
    }
    let web_service = json!({"selector": {"app": "web"}, "ports": [{"port": 80}]});
    let cluster_ip = create_service(&env, &namespace, "web", web_service).await;
    let name = format!("web.{namespace}.svc.{CLUSTER_DOMAIN}");
    let resolved = Command::new("nsenter")
        .arg(format!("--net={}", client_netns.display()))
        .arg(env!("CARGO_BIN_EXE_gpumarket-env"))
        .args(["resolve", "--server", &format!("{DNS_SERVICE_IP}:53"), &name])
        .output()
        .unwrap();
    assert!(resolved.status.success(), "{}", String::from_utf8_lossy(&resolved.stderr));
    assert_eq!(String::from_utf8_lossy(&resolved.stdout).trim(), cluster_ip, "{name} from the pod");

    // One pod reaches the other through its Service's ClusterIP, unmasqueraded.
    let mut listener = python_in(&web_netns, ECHO_PEER).spawn().unwrap();
    let peer = eventually("web answering at its ClusterIP", Duration::from_secs(30), || async {
        let out = python_in(&client_netns, READ_FROM).arg(&cluster_ip).output().unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    })
    .await;
    listener.kill().unwrap();
    listener.wait().unwrap();
    assert_eq!(peer, client_ip, "web sees the client pod's own address");

    // Nothing leaves the host: not to an address beyond it, nor through a Service whose
    // endpoint is there, from a pod or from the host (192.0.2.1 is TEST-NET-1).
    let bridge = node.bridge.as_str();
    let route_from_pod = |to: &str| {
        let out = Command::new("ip")
            .args(["route", "get", to, "from", &client_ip, "iif", bridge])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let to_web = route_from_pod(&web_ip);
    assert!(to_web.starts_with(&format!("{web_ip} from {client_ip} dev {bridge}")), "{to_web}");
    // A blackhole route makes the lookup fail with EINVAL.
    let off_host = route_from_pod("192.0.2.1");
    assert!(off_host.contains("RTNETLINK answers: Invalid argument"), "routed: {off_host}");
    let outside = json!({"ports": [{"port": 9, "protocol": "UDP"}]});
    let outside_ip = create_service(&env, &namespace, "outside", outside).await;
    let slices: Api<EndpointSlice> = Api::namespaced(env.client().await.unwrap(), &namespace);
    let slice = serde_json::from_value(json!({
        "metadata": {"name": "outside", "labels": {"kubernetes.io/service-name": "outside"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.1"]}],
        "ports": [{"port": 9, "protocol": "UDP"}],
    }))
    .unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();
    eventually("kube-proxy's rules for outside", Duration::from_secs(30), || async {
        service_proxied(&outside_ip).unwrap().then_some(())
    })
    .await;
    let arrived = ["-i", bridge, "-s", &client_ip, "-p", "udp", "--dport", "9", "-j", "ACCEPT"];
    let left = ["-d", "192.0.2.1/32", "-p", "udp", "-m", "udp", "--dport", "9", "-j", "ACCEPT"];
    let mut sent_out = 0;
    let from_pod = packets_counted("mangle", "PREROUTING", &arrived, || {
        sent_out += packets_counted("mangle", "POSTROUTING", &left, || {
            for target in ["192.0.2.1", outside_ip.as_str()] {
                let status = python_in(&client_netns, SEND_UDP).arg(target).status().unwrap();
                assert!(status.success(), "sending from the pod to {target}");
            }
            // From the host to the ClusterIP (the send may fail: DNAT's reroute finds the
            // blackhole). A send to 192.0.2.1 itself is the host's own business.
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = socket.send_to(b"x", (outside_ip.as_str(), 9));
            std::thread::sleep(Duration::from_millis(200));
        });
    });
    assert_eq!(from_pod, 6, "the pod's datagrams reach the host");
    assert_eq!(sent_out, 0, "no datagram left for 192.0.2.1");
    let route = Command::new("ip").args(["route", "get", &outside_ip]).output().unwrap();
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    assert!(
        route.contains(&format!(" dev {bridge} ")),
        "the host routes ClusterIPs to the bridge: {route}"
    );

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
    run_pod(&env, &namespace, "web").await;
    println!("slot={}", env.real_node().unwrap().slot);
    tokio::time::sleep(Duration::from_secs(600)).await;
}
