//! A real node beside the KWOK ones: containerd (CRI, overlayfs) running pods with runc on a CNI
//! bridge of its own, a kubelet registered as [`NODE_NAME`], and CoreDNS serving the cluster
//! domain from the API server at the bridge's address (the pods' nameserver).
//!
//! Everything host-wide it creates is named after a slot (a lock under the cache directory, so
//! parallel environments each get their own): the bridge `gpmreal<slot>` with
//! `10.244.<slot>.1/24`, the cgroup `/gpumarket-real-<slot>` of its pods, the CNI network
//! `gpumarket-real-<slot>`. The rest lives in the environment's directory.
//!
//! kube-proxy (iptables mode) makes Services' ClusterIPs work, and nothing is routed off the
//! host. Pods' default route is the bridge address, so a packet to a ClusterIP reaches the
//! host, whose DNAT rewrites it to an endpoint; forwarding is on for the bridge only (IPv4
//! decides by the input device), never host-wide, and nothing is masqueraded. A policy rule
//! sends everything *from* the pod subnet (pods, and the host's own packets from the bridge
//! address) to a routing table of the slot holding only the subnet and `blackhole default`:
//! after any DNAT, only the bridge and the host's own addresses are reachable. The host's own
//! packets to a ClusterIP are routed to the bridge (taking the bridge address as source, so
//! the rule applies once DNAT has rerouted them), and those to KWOK's pod addresses to a
//! blackhole, never to the default route. The pods' nameserver is the `kube-dns` Service
//! ([`DNS_SERVICE_IP`]), selector-less, whose EndpointSlice names CoreDNS at the bridge address.
//! The API server listens on loopback only: a relay on the bridge address ([`RealNode::expose`])
//! is the `kubernetes` Service's endpoint, so in-cluster clients (the chart's pods) reach it.
//!
//! GPUs: [`FAKE_GPUS`] fake ones, described for the agent's fake source in
//! [`RealNode::fake_gpus`], whose device nodes (`dev/nvidia<i>`, `dev/nvidiactl` under
//! [`RealNode::fake_gpu_root`]) are character devices like `/dev/null`; containerd reads CDI
//! specs from [`RealNode::cdi_spec_dir`], where the agent writes the spec naming them.
//!
//! Global, not per slot: the kubelet's device-plugin directory ([`DEVICE_PLUGIN_DIR`], fixed
//! in the kubelet, unlike the rest of its root), kube-proxy's and the kubelet's iptables chains (fixed names: two
//! real nodes at once would overwrite each other's Service rules, and either's cleanup removes
//! both), the ClusterIP range and KWOK's pod range (the same in every environment; each slot
//! adds its own routes for them, with its own metric), `kube-dns` in each environment's API.
//!
//! What killing the processes leaves (pod processes, their shims, mounts, network namespaces,
//! the bridge, cgroups, the kubelet's and kube-proxy's iptables chains, the slot's routes and
//! policy rule) is removed by `cleanup.sh`, which the environment's reaper runs however
//! the environment ends (see [`crate::process`]). It also runs before a start, which clears the
//! slot-named leftovers (pod processes and cgroups, the bridge) of an earlier environment whose
//! reaper could not finish; its mounts and shims are that reaper's to remove.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::control_plane::{ControlPlane, SERVICE_CIDR};
use crate::process::{Process, Reaper};
use crate::relay::Relay;
use crate::tools::{Tools, cache_dir};

/// The real node's name (its kubelet's client certificate is made for it, see [`crate::certs`]).
pub const NODE_NAME: &str = "gpumarket-real-0";
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Image of every pod sandbox; `hack/images/build.sh pause` builds it.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.2";
/// The ClusterIP of `kube-dns` in kube-system: the pods' nameserver (CoreDNS behind it).
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Parallel environments with a real node, at most.
const SLOTS: u8 = 16;
/// Where the kubelet serves device plugins (`kubelet.sock`) and they theirs: the same for
/// every kubelet, whatever its root directory.
pub const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// The real node's (fake) GPUs.
pub const FAKE_GPUS: usize = 2;
/// Where containers given the fake GPUs find the driver's library (a CDI mount).
pub const FAKE_DRIVER_LIBRARY: &str = "/usr/lib/libcuda.so.1";
/// Their model, as the agent's fake source reports it.
pub const FAKE_GPU_PRODUCT: &str = "NVIDIA H100 80GB HBM3";

/// A running real node. See the module documentation.
#[derive(Debug)]
pub struct RealNode {
    pub slot: u8,
    /// The bridge the pods' `eth0` are plugged into.
    pub bridge: String,
    /// `10.244.<slot>.0/24`.
    pub pod_subnet: String,
    /// The bridge's address: the node's InternalIP, the kubelet's and CoreDNS's address.
    pub host_address: Ipv4Addr,
    /// containerd's CRI socket (for `ctr --address`).
    pub containerd_socket: PathBuf,
    /// Where containerd mounts pod network namespaces (`cni-<uuid>` files).
    pub netns_dir: PathBuf,
    /// The directory containerd reads CDI specs from.
    pub cdi_spec_dir: PathBuf,
    /// Stands in for the node's `/` for its fake GPUs' files (`hostRoot` of [`Self::fake_gpus`]).
    pub fake_gpu_root: PathBuf,
    /// The fake source's file of the node's GPUs (`--source fake:<path>`).
    pub fake_gpus: PathBuf,
    /// Held while the slot is in use.
    _slot_lock: File,
    /// The API server on the bridge address (see the module docs).
    api_relay: Option<Relay>,
}

impl RealNode {
    /// CoreDNS on the bridge (pods' `/etc/resolv.conf` names [`DNS_SERVICE_IP`], in front of it).
    pub fn dns(&self) -> SocketAddr {
        SocketAddr::from((self.host_address, 53))
    }

    /// A relay on the bridge address, at the same port, to a server that listens on loopback
    /// only: pods reach it at `<host_address>:<port>`. It stops when dropped.
    pub async fn expose(&self, port: u16) -> Result<Relay> {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Relay::listen(SocketAddr::from((self.host_address, port)), target)
            .await
            .with_context(|| format!("listening on {}:{port}", self.host_address))
    }

    /// Import an OCI image archive (`hack/images/build.sh`) into the CRI's image store.
    pub fn import_image(&self, tools: &Tools, archive: &Path) -> Result<()> {
        let mut import = ctr(&self.containerd_socket, tools)?;
        import.args(["images", "import"]).arg(archive);
        let output = import.output()?;
        ensure!(
            output.status.success(),
            "ctr images import {} failed: {}",
            archive.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

/// The slot's routing table for traffic from its pod subnet; also its policy rule's priority
/// and the metric of its routes for the ClusterIP and KWOK ranges.
pub fn routing_table(slot: u8) -> u32 {
    2440 + u32::from(slot)
}

/// Paths of one real node under `<env>/real-node`.
struct Layout {
    root: PathBuf,
    containerd_root: PathBuf,
    containerd_state: PathBuf,
    containerd_socket: PathBuf,
    cni_conf: PathBuf,
    cni_ipam: PathBuf,
    kubelet_root: PathBuf,
    pod_logs: PathBuf,
    cleanup: PathBuf,
    cdi: PathBuf,
    fake_gpus: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        let root = dir.join("real-node");
        let containerd_state = root.join("containerd-state");
        Layout {
            containerd_root: root.join("containerd"),
            containerd_socket: root.join("containerd.sock"),
            cni_conf: root.join("cni"),
            cni_ipam: root.join("cni-ipam"),
            kubelet_root: root.join("kubelet"),
            pod_logs: root.join("pod-logs"),
            cleanup: root.join("cleanup.sh"),
            cdi: root.join("cdi"),
            fake_gpus: root.join("fake-gpus"),
            containerd_state,
            root,
        }
    }

    fn netns_dir(&self) -> PathBuf {
        self.containerd_state.join("io.containerd.grpc.v1.cri").join("netns")
    }
}

/// Start containerd, CoreDNS and the kubelet, and wait until the Node is Ready.
pub async fn start(
    dir: &Path,
    tools: &Tools,
    control_plane: &ControlPlane,
    reaper: &Reaper,
    processes: &mut Vec<Process>,
) -> Result<RealNode> {
    ensure_root()?;
    let (slot, slot_lock) = claim_slot()?;
    let layout = Layout::new(dir);
    for d in [
        &layout.containerd_root,
        &layout.containerd_state,
        &layout.cni_conf,
        &layout.cni_ipam,
        &layout.cdi,
    ] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let node = RealNode {
        slot,
        bridge: format!("gpmreal{slot}"),
        pod_subnet: format!("10.244.{slot}.0/24"),
        host_address: Ipv4Addr::new(10, 244, slot, 1),
        containerd_socket: layout.containerd_socket.clone(),
        netns_dir: layout.netns_dir(),
        cdi_spec_dir: layout.cdi.clone(),
        fake_gpu_root: layout.fake_gpus.clone(),
        fake_gpus: layout.fake_gpus.join("gpus.yaml"),
        _slot_lock: slot_lock,
        api_relay: None,
    };
    std::fs::write(&layout.cleanup, cleanup_script(&layout, tools, &node))?;
    create_fake_gpus(&node)?;
    // What an earlier environment of this slot may have left, then ours whenever we end.
    run("sh", [layout.cleanup.as_os_str()])?;
    reaper.run_at_end(&layout.cleanup)?;
    create_bridge(&node)?;
    for command in confine_commands(&node) {
        run("ip", command)?;
    }
    // The bridge's own flag (deleted with it): IPv4 forwards by the input device's.
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{}/forwarding", node.bridge), "1")
        .context("turning on forwarding for the bridge")?;

    let logs = dir.join("logs");
    let client = crate::control_plane::client(&control_plane.kubeconfig).await?;
    let mut node = node;
    node.api_relay = Some(node.expose(control_plane.port).await?);
    create_api_endpoints(&client, &node, control_plane.port).await?;
    processes.push(start_coredns(&layout, tools, control_plane, &node, reaper, &logs)?);
    processes.push(start_containerd(&layout, tools, &node, reaper, &logs)?);
    wait_for_containerd(&layout, tools, processes).await?;
    // The pause image, from `hack/images/build.sh pause` (cached).
    node.import_image(tools, &crate::images::build(tools, "pause")?)?;
    processes.push(start_kubelet(&layout, tools, control_plane, &node, reaper, &logs)?);
    create_dns_service(&client, &node).await?;
    processes.push(start_kube_proxy(&layout, tools, control_plane, &node, reaper, &logs)?);
    wait_dns_ready(&node, processes).await?;
    wait_node_ready(&Api::all(client), processes, Duration::from_secs(120)).await?;
    wait_service_proxied(&DNS_SERVICE_IP.to_string(), processes, Duration::from_secs(60)).await?;
    Ok(node)
}

/// Bridges, mounts and cgroups need root.
fn ensure_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
    if uid.split_whitespace().nth(1) != Some("0") {
        bail!("a real node needs root (it creates a bridge, mounts and cgroups): run as root");
    }
    Ok(())
}

/// The first free slot: its lock file, held (the kernel releases it when we exit).
fn claim_slot() -> Result<(u8, File)> {
    let locks = cache_dir().join("real-node-slots");
    std::fs::create_dir_all(&locks)?;
    for slot in 0..SLOTS {
        let file = File::create(locks.join(format!("{slot}.lock")))?;
        match file.try_lock() {
            Ok(()) => return Ok((slot, file)),
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
    bail!("all {SLOTS} real-node slots are in use (locks in {})", locks.display())
}

/// The shell script that removes what the node's processes leave when killed. Idempotent.
fn cleanup_script(layout: &Layout, tools: &Tools, node: &RealNode) -> String {
    let cgroup = format!("gpumarket-real-{}", node.slot);
    format!(
        r#"# Written by gpumarket-tests (real_node.rs): what a killed real node leaves behind.
cgroup='{cgroup}'
socket='{socket}'
root='{root}/'
# Pod processes (their cgroups are under ours), then containerd's shims (found by its socket).
for round in 1 2 3 4 5; do
  pids=$(cat /sys/fs/cgroup/pids/"$cgroup"/cgroup.procs $(find /sys/fs/cgroup/pids/"$cgroup" -mindepth 2 -name cgroup.procs 2>/dev/null) 2>/dev/null)
  for p in /proc/[0-9]*; do
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $socket " && pids="$pids ${{p#/proc/}}"
  done
  [ -z "$pids" ] && break
  kill -s KILL $pids 2>/dev/null
  sleep 0.2
done
# The shims' sockets (named by a hash of our socket, namespace and task id), then the
# directories the shims made for them if nothing else is in there.
for task in '{tasks}'/*; do
  [ -e "$task" ] || continue
  hash=$(printf '%s' "$socket/k8s.io/${{task##*/}}" | sha256sum | cut -c1-64)
  rm -f "/run/containerd/s/$hash"
done
rmdir /run/containerd/s /run/containerd 2>/dev/null
# Mounts (container root filesystems, sandbox /dev/shm, network namespaces, pod volumes,
# the kubelet's shared bind mount of its root), deepest first.
awk -v root="$root" 'index($2, root) == 1 {{ print $2 }}' /proc/self/mounts | sort -r |
  while read -r m; do umount -l "$m" 2>/dev/null; done
for c in /sys/fs/cgroup/*/"$cgroup"; do
  [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {{}} \; 2>/dev/null
done
ip link delete '{bridge}' 2>/dev/null
# The slot's policy rule and routing table, and its routes for the ClusterIP range (gone
# with the bridge) and KWOK's pods.
while ip rule del pref {table} 2>/dev/null; do :; done
ip route flush table {table} 2>/dev/null
while ip route del blackhole '{kwok}' metric {table} 2>/dev/null; do :; done
# kube-proxy's chains (the same names for every kube-proxy: see the module docs).
'{kube_proxy}' --cleanup >/dev/null 2>&1
# The kubelet's chains (the same names for every kubelet: a parallel environment's kubelet
# makes its own again).
for cmd in iptables ip6tables; do
  for chain in INPUT OUTPUT; do
    while $cmd -w 5 -t filter -D "$chain" -j KUBE-FIREWALL 2>/dev/null; do :; done
  done
  $cmd -w 5 -t filter -F KUBE-FIREWALL 2>/dev/null
  $cmd -w 5 -t filter -X KUBE-FIREWALL 2>/dev/null
  for table in mangle filter nat; do $cmd -w 5 -t "$table" -X KUBE-KUBELET-CANARY 2>/dev/null; done
  $cmd -w 5 -t mangle -X KUBE-IPTABLES-HINT 2>/dev/null
done
rm -f /var/lib/cni/results/'{network}'-* 2>/dev/null
# The kubelet's device-plugin socket and checkpoint, and what plugins left beside them.
rm -f '{device_plugins}'/* 2>/dev/null
rmdir '{device_plugins}' /var/lib/kubelet 2>/dev/null
find /var/log/containers -maxdepth 1 -lname "$root*" -delete 2>/dev/null
exit 0
"#,
        socket = layout.containerd_socket.display(),
        root = layout.root.display(),
        tasks = layout.containerd_state.join("io.containerd.runtime.v2.task/k8s.io").display(),
        bridge = node.bridge,
        network = network_name(node),
        table = routing_table(node.slot),
        kwok = crate::kwok::POD_CIDR,
        kube_proxy = tools.bin.join("kube-proxy").display(),
        device_plugins = DEVICE_PLUGIN_DIR,
    )
}

fn network_name(node: &RealNode) -> String {
    format!("gpumarket-real-{}", node.slot)
}

fn create_bridge(node: &RealNode) -> Result<()> {
    let bridge = node.bridge.as_str();
    run("ip", ["link", "add", "name", bridge, "type", "bridge"])?;
    run("ip", ["addr", "add", &format!("{}/24", node.host_address), "dev", bridge])?;
    run("ip", ["link", "set", bridge, "up"])
}

/// The `ip` commands that keep everything from the pod subnet on the host (see the module docs).
fn confine_commands(node: &RealNode) -> Vec<Vec<String>> {
    let table = routing_table(node.slot).to_string();
    let bridge = node.bridge.as_str();
    let commands: [&[&str]; 5] = [
        &["route", "add", &node.pod_subnet, "dev", bridge, "table", &table],
        &["route", "add", "blackhole", "default", "table", &table],
        &["rule", "add", "from", &node.pod_subnet, "lookup", &table, "pref", &table],
        &["route", "add", SERVICE_CIDR, "dev", bridge, "metric", &table],
        &["route", "add", "blackhole", crate::kwok::POD_CIDR, "metric", &table],
    ];
    commands.iter().map(|c| c.iter().map(|a| (*a).to_owned()).collect()).collect()
}

fn start_coredns(
    layout: &Layout,
    tools: &Tools,
    control_plane: &ControlPlane,
    node: &RealNode,
    reaper: &Reaper,
    logs: &Path,
) -> Result<Process> {
    let corefile = layout.root.join("Corefile");
    // Only the cluster domain: there is no upstream to forward anything else to.
    std::fs::write(
        &corefile,
        format!(
            ".:53 {{\n  bind {address}\n  errors\n  kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n    \
             kubeconfig {kubeconfig} gpumarket\n    pods insecure\n    fallthrough in-addr.arpa ip6.arpa\n  }}\n  \
             cache 5\n}}\n",
            address = node.host_address,
            kubeconfig = control_plane.kubeconfig.display(),
        ),
    )?;
    let mut coredns = tools.command("coredns")?;
    coredns.arg("-conf").arg(&corefile);
    Ok(Process::spawn(reaper, logs, "coredns", coredns)?.supervised())
}

fn start_containerd(
    layout: &Layout,
    tools: &Tools,
    node: &RealNode,
    reaper: &Reaper,
    logs: &Path,
) -> Result<Process> {
    std::fs::write(
        layout.cni_conf.join("10-gpumarket.conflist"),
        serde_json::to_string_pretty(&cni_config(layout, node))?,
    )?;
    let config = layout.root.join("containerd.toml");
    std::fs::write(&config, containerd_config(layout, tools))?;
    let mut containerd = tools.command("containerd")?;
    containerd.arg("--config").arg(&config);
    // The shim and runc are found on PATH.
    containerd.env("PATH", path_with(&tools.bin)?);
    Ok(Process::spawn(reaper, logs, "containerd", containerd)?.supervised())
}

/// The pods' network: the bridge, with the host's address on it as their default route (not
/// `isGateway`: the plugin would turn on forwarding host-wide). See the module docs.
fn cni_config(layout: &Layout, node: &RealNode) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": network_name(node),
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": layout.cni_ipam,
                    "ranges": [[{"subnet": node.pod_subnet, "gateway": node.host_address}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": node.host_address}],
                },
            },
        ],
    })
}

fn containerd_config(layout: &Layout, tools: &Tools) -> String {
    format!(
        r#"version = 3
root = '{root}'
state = '{state}'

[grpc]
  address = '{socket}'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{PAUSE_IMAGE}'

[plugins.'io.containerd.cri.v1.runtime']
  netns_mounts_under_state_dir = true
  # Pods' oom_score_adj no lower than containerd's own: lowering it needs CAP_SYS_RESOURCE,
  # which this sandbox does not give root.
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false
  enable_unprivileged_icmp = false
  # Only the agent's spec of the fake GPUs, not the host's /etc/cdi and /var/run/cdi.
  cdi_spec_dirs = ['{cdi}']
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = '{runc}'
      Root = '{state}/runc'
      SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{cni_bin}']
    conf_dir = '{cni_conf}'
    # containerd brings up the pods' lo itself: no CNI result cached for it in /var/lib/cni.
    use_internal_loopback = true

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
"#,
        root = layout.containerd_root.display(),
        state = layout.containerd_state.display(),
        socket = layout.containerd_socket.display(),
        runc = tools.bin.join("runc").display(),
        cni_bin = tools.cni_bin.display(),
        cni_conf = layout.cni_conf.display(),
        cdi = layout.cdi.display(),
    )
}

async fn wait_for_containerd(layout: &Layout, tools: &Tools, processes: &[Process]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        processes.iter().try_for_each(Process::ensure_running)?;
        let mut version = ctr(&layout.containerd_socket, tools)?;
        version.arg("version");
        if layout.containerd_socket.exists() && version.output()?.status.success() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "containerd did not answer on its socket within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ctr(socket: &Path, tools: &Tools) -> Result<Command> {
    let mut ctr = tools.command("ctr")?;
    ctr.arg("--address").arg(socket).args(["--namespace", "k8s.io"]);
    Ok(ctr)
}

fn start_kubelet(
    layout: &Layout,
    tools: &Tools,
    control_plane: &ControlPlane,
    node: &RealNode,
    reaper: &Reaper,
    logs: &Path,
) -> Result<Process> {
    let pki = &control_plane.pki;
    let kubeconfig = layout.root.join("kubelet.kubeconfig");
    control_plane.write_client_kubeconfig(&kubeconfig, &pki.node_cert, &pki.node_key)?;

    let config = layout.root.join("kubelet.yaml");
    std::fs::write(&config, serde_yaml::to_string(&kubelet_config(layout, node, pki))?)?;
    ensure_cgroup_root(node)?;
    let mut kubelet = tools.command("kubelet")?;
    kubelet
        .arg(format!("--config={}", config.display()))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--root-dir={}", layout.kubelet_root.display()))
        .arg(format!("--cert-dir={}", layout.kubelet_root.join("pki").display()))
        .arg(format!("--hostname-override={NODE_NAME}"))
        .arg(format!("--node-ip={}", node.host_address))
        // What NVIDIA's GPU feature discovery labels GPU nodes with (the chart's agent selects it).
        .arg("--node-labels=nvidia.com/gpu.present=true")
        .arg("--v=1");
    Ok(Process::spawn(reaper, logs, "kubelet", kubelet)?.supervised())
}

fn kubelet_config(layout: &Layout, node: &RealNode, pki: &crate::certs::Pki) -> serde_json::Value {
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.host_address,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": pki.ca_cert},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": format!("unix://{}", layout.containerd_socket.display()),
        // This machine kind has cgroup v1 (hybrid); Kubernetes 1.35+ refuses it without this.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/gpumarket-real-{}", node.slot),
        "failSwapOn": false,
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        // No host search domains or nameservers in pods: only the cluster's.
        "resolvConf": "",
        "podCIDR": node.pod_subnet,
        "podLogsDir": layout.pod_logs,
        // A shared machine: never evict the few test pods for disk or memory pressure.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "registerNode": true,
        "serializeImagePulls": false,
    })
}

/// kube-proxy for the real node: Services of its pod subnet, NodePorts on the bridge address
/// only, no health or metrics server, the host's conntrack settings left as they are.
fn start_kube_proxy(
    layout: &Layout,
    tools: &Tools,
    control_plane: &ControlPlane,
    node: &RealNode,
    reaper: &Reaper,
    logs: &Path,
) -> Result<Process> {
    let pki = &control_plane.pki;
    let kubeconfig = layout.root.join("kube-proxy.kubeconfig");
    control_plane.write_client_kubeconfig(&kubeconfig, &pki.proxy_cert, &pki.proxy_key)?;
    let mut proxy = tools.command("kube-proxy")?;
    proxy.args(kube_proxy_args(node)).arg(format!("--kubeconfig={}", kubeconfig.display()));
    Ok(Process::spawn(reaper, logs, "kube-proxy", proxy)?.supervised())
}

fn kube_proxy_args(node: &RealNode) -> Vec<String> {
    vec![
        "--proxy-mode=iptables".into(),
        format!("--hostname-override={NODE_NAME}"),
        format!("--cluster-cidr={}", node.pod_subnet),
        format!("--nodeport-addresses={}/32", node.host_address),
        "--iptables-localhost-nodeports=false".into(),
        "--healthz-bind-address=".into(),
        "--metrics-bind-address=".into(),
        // 0: leave the host's conntrack table size and timeouts alone.
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        // Lowering it needs CAP_SYS_RESOURCE (see the containerd config).
        "--oom-score-adj=0".into(),
        "--iptables-min-sync-period=0".into(),
        "--v=1".into(),
    ]
}

/// The fake GPUs' file, device nodes and driver library (see the module docs): the device
/// nodes are character devices with `/dev/null`'s numbers, so a container given one by CDI
/// opens a harmless device.
fn create_fake_gpus(node: &RealNode) -> Result<()> {
    let dev = node.fake_gpu_root.join("dev");
    std::fs::create_dir_all(&dev)?;
    let names = (0..FAKE_GPUS).map(|i| format!("nvidia{i}")).chain(["nvidiactl".to_string()]);
    for name in names {
        let path = dev.join(name);
        if !path.exists() {
            run("mknod", [path.as_os_str(), "c".as_ref(), "1".as_ref(), "3".as_ref()])?;
        }
    }
    // The driver library a CDI spec must name (an empty stand-in: nothing here loads it).
    let libraries = node.fake_gpu_root.join(FAKE_DRIVER_LIBRARY.trim_start_matches('/'));
    std::fs::create_dir_all(libraries.parent().context("library directory")?)?;
    std::fs::write(&libraries, b"")?;
    let gpus: Vec<serde_json::Value> = (0..FAKE_GPUS)
        .map(|i| {
            json!({
                "uuid": fake_gpu_uuid(node.slot, i),
                "productName": FAKE_GPU_PRODUCT,
                "memoryMib": 81559,
                "pciBusId": format!("00000000:{:02X}:00.0", 0x1b + i),
            })
        })
        .collect();
    let file = json!({
        "driverVersion": "560.35.03",
        "cudaVersion": "12.6",
        "gpus": gpus,
        "hostRoot": node.fake_gpu_root,
    });
    std::fs::write(&node.fake_gpus, serde_yaml::to_string(&file)?)?;
    Ok(())
}

/// The uuid of fake GPU `index` of the node in `slot` (distinct across parallel environments).
pub fn fake_gpu_uuid(slot: u8, index: usize) -> String {
    format!("GPU-real{slot}-{index}")
}

/// The `kubernetes` Service's EndpointSlice: the API server's relay on the bridge. (The API
/// server manages none itself: its address is loopback, which no endpoint may be.)
async fn create_api_endpoints(client: &kube::Client, node: &RealNode, port: u16) -> Result<()> {
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "kubernetes-relay", "labels": {
            "kubernetes.io/service-name": "kubernetes",
            "endpointslice.kubernetes.io/managed-by": "gpumarket-tests",
        }},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node.host_address], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &slice)
        .await
        .context("creating the kubernetes Service's EndpointSlice")?;
    Ok(())
}

/// `kube-dns` in kube-system at [`DNS_SERVICE_IP`], its endpoint CoreDNS on the bridge.
async fn create_dns_service(client: &kube::Client, node: &RealNode) -> Result<()> {
    let ports = [("dns", "UDP"), ("dns-tcp", "TCP")];
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns"}},
        "spec": {
            "clusterIP": DNS_SERVICE_IP,
            "ports": ports.map(|(name, protocol)| json!({"name": name, "port": 53, "protocol": protocol})),
        },
    }))?;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "kube-dns-coredns", "labels": {
            "kubernetes.io/service-name": "kube-dns",
            "endpointslice.kubernetes.io/managed-by": "gpumarket-tests",
        }},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node.host_address], "conditions": {"ready": true}}],
        "ports": ports.map(|(name, protocol)| json!({"name": name, "port": 53, "protocol": protocol})),
    }))?;
    let params = PostParams::default();
    Api::<Service>::namespaced(client.clone(), "kube-system")
        .create(&params, &service)
        .await
        .context("creating the kube-dns Service")?;
    Api::<EndpointSlice>::namespaced(client.clone(), "kube-system")
        .create(&params, &slice)
        .await
        .context("creating kube-dns's EndpointSlice")?;
    Ok(())
}

/// kube-proxy has written the rules of the Service at `cluster_ip`.
pub fn service_proxied(cluster_ip: &str) -> Result<bool> {
    let nat = Command::new("iptables-save").args(["-t", "nat"]).output()?;
    let rule = format!("-d {cluster_ip}/32 ");
    Ok(String::from_utf8_lossy(&nat.stdout)
        .lines()
        .any(|l| l.starts_with("-A KUBE-SERVICES ") && l.contains(&rule)))
}

async fn wait_service_proxied(
    cluster_ip: &str,
    processes: &[Process],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        processes.iter().try_for_each(Process::ensure_running)?;
        if service_proxied(cluster_ip)? {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "kube-proxy wrote no rule for {cluster_ip} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The cgroup the kubelet puts its pods under, in every v1 hierarchy (it must exist; cpuset
/// needs the parent's cpus and mems before tasks can join).
fn ensure_cgroup_root(node: &RealNode) -> Result<()> {
    let name = format!("gpumarket-real-{}", node.slot);
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")? {
        let hierarchy = hierarchy?.path();
        if hierarchy.file_name().is_some_and(|n| n == "unified") {
            continue;
        }
        let dir = hierarchy.join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                std::fs::write(dir.join(file), value.trim())?;
            }
        }
    }
    Ok(())
}

/// CoreDNS answers for the API server's own Service: it serves and has synced from the API.
async fn wait_dns_ready(node: &RealNode, processes: &[Process]) -> Result<()> {
    let name = format!("kubernetes.default.svc.{CLUSTER_DOMAIN}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        processes.iter().try_for_each(Process::ensure_running)?;
        let server = node.dns();
        let answer = tokio::task::spawn_blocking({
            let name = name.clone();
            move || crate::dns::resolve_a(server, &name, Duration::from_millis(500))
        })
        .await?;
        match answer {
            Ok(addresses) if !addresses.is_empty() => return Ok(()),
            answer if Instant::now() > deadline => {
                bail!("CoreDNS at {server} did not resolve {name} within 60 s: {answer:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn wait_node_ready(api: &Api<Node>, processes: &[Process], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        processes.iter().try_for_each(Process::ensure_running)?;
        let node = api.get_opt(NODE_NAME).await?;
        let ready = node.as_ref().and_then(|n| n.status.as_ref()).is_some_and(|status| {
            status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            let conditions = node.and_then(|n| n.status).and_then(|s| s.conditions);
            bail!("node {NODE_NAME} not Ready within {timeout:?}: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `$PATH` with `dir` first.
fn path_with(dir: &Path) -> Result<std::ffi::OsString> {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    Ok(std::env::join_paths(
        std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&rest)),
    )?)
}

fn run<I, S>(program: &str, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(program);
    command.args(args);
    let output = command.output().with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(slot: u8) -> (Layout, RealNode) {
        let layout = Layout::new(Path::new("/tmp/env"));
        let node = RealNode {
            slot,
            bridge: format!("gpmreal{slot}"),
            pod_subnet: format!("10.244.{slot}.0/24"),
            host_address: Ipv4Addr::new(10, 244, slot, 1),
            containerd_socket: layout.containerd_socket.clone(),
            netns_dir: layout.netns_dir(),
            cdi_spec_dir: layout.cdi.clone(),
            fake_gpu_root: layout.fake_gpus.clone(),
            fake_gpus: layout.fake_gpus.join("gpus.yaml"),
            _slot_lock: tempfile::tempfile().unwrap(),
            api_relay: None,
        };
        (layout, node)
    }

    /// Nothing may leave the host: the plugin is no gateway (it would turn on IP forwarding
    /// host-wide), nothing is masqueraded; pods' one route beyond the subnet is the host.
    #[test]
    fn pod_network_routes_only_to_the_host() {
        let (layout, node) = node(3);
        let config = cni_config(&layout, &node);
        let bridge = &config["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], "gpmreal3");
        assert_eq!(bridge["isGateway"], false);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["routes"], json!([{"dst": "0.0.0.0/0", "gw": "10.244.3.1"}]));
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(config["plugins"].as_array().unwrap().len(), 1, "no portmap (iptables)");
    }

    /// Everything from the pod subnet looks up the slot's table, which routes the subnet and
    /// blackholes the rest; the host's packets to ClusterIPs go to the bridge, to KWOK's pods
    /// nowhere.
    #[test]
    fn pod_subnet_is_confined_to_the_bridge() {
        let (_, node) = node(3);
        let commands: Vec<String> = confine_commands(&node).iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            commands,
            [
                "route add 10.244.3.0/24 dev gpmreal3 table 2443",
                "route add blackhole default table 2443",
                "rule add from 10.244.3.0/24 lookup 2443 pref 2443",
                "route add 10.96.0.0/16 dev gpmreal3 metric 2443",
                "route add blackhole 10.0.0.0/16 metric 2443",
            ]
        );
    }

    /// Only the bridge address for NodePorts, no listener beyond the host's loopback (none at
    /// all), no host-wide conntrack change.
    #[test]
    fn kube_proxy_listens_nowhere_and_leaves_conntrack_alone() {
        let (_, node) = node(3);
        let args = kube_proxy_args(&node);
        for expected in [
            "--proxy-mode=iptables",
            "--hostname-override=gpumarket-real-0",
            "--cluster-cidr=10.244.3.0/24",
            "--nodeport-addresses=10.244.3.1/32",
            "--iptables-localhost-nodeports=false",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
        }
    }

    #[test]
    fn cleanup_script_is_scoped_to_the_slot_and_the_environment() {
        let (layout, node) = node(3);
        let tools = Tools { bin: PathBuf::from("/tools/bin"), ..Tools::locate() };
        let script = cleanup_script(&layout, &tools, &node);
        assert!(script.contains("cgroup='gpumarket-real-3'"));
        assert!(script.contains("ip link delete 'gpmreal3'"));
        assert!(script.contains("socket='/tmp/env/real-node/containerd.sock'"));
        assert!(script.contains("root='/tmp/env/real-node/'"), "mounts under the node's dir only");
        assert!(script.contains("/var/lib/cni/results/'gpumarket-real-3'-*"));
        assert!(script.contains("while ip rule del pref 2443 "));
        assert!(script.contains("ip route flush table 2443 "));
        assert!(script.contains("ip route del blackhole '10.0.0.0/16' metric 2443 "));
        assert!(script.contains("'/tools/bin/kube-proxy' --cleanup"));
    }
}
