//! The plugin against a test kubelet over unix sockets in a temp directory: a Registration
//! server (generated from the same proto) receives the registration, then calls the plugin as
//! the kubelet does, and a PodResources server says which pods the kubelet has and which GPUs
//! they hold; the node's leases are fed on a channel. Also: health changes on the ListAndWatch
//! stream, re-registration after a kubelet restart, GPUs handed to leases' worker pods only,
//! the binary refusing bad settings with a message saying what to fix, and with CDI on, the CDI
//! spec of the GPUs of a fake node written while the agent runs, and `--discover` printing it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpumarket_device_plugin::agent::{Agent, AgentConfig};
use gpumarket_device_plugin::allocation::{NodeLease, PodName};
use gpumarket_device_plugin::api::device_plugin_client::DevicePluginClient;
use gpumarket_device_plugin::api::registration_server::{Registration, RegistrationServer};
use gpumarket_device_plugin::api::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest,
    ContainerPreferredAllocationRequest, Empty, ListAndWatchResponse, PreferredAllocationRequest,
    RegisterRequest,
};
use gpumarket_device_plugin::cdi::{self, SPEC_FILE};
use gpumarket_device_plugin::config::{Mode, Supplier};
use gpumarket_device_plugin::pod_resources_api::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use gpumarket_device_plugin::pod_resources_api::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use gpumarket_device_plugin::registration::{PluginSocket, connect};
use gpumarket_device_plugin::source::fake::{FakeFault, FakeSource, FaultInjector};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

const WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
const WAIT: Duration = Duration::from_secs(10);
/// How long the agents of these tests wait for a lease that lists its pod late.
const LEASE_WAIT: Duration = Duration::from_secs(1);
const NAMESPACE: &str = "ml";

/// GPU-0..3; GPU-2 and GPU-3 are NVLink peers.
const FOUR_H100: &str = "
driverVersion: 560.35.03
cudaVersion: '12.6'
gpus:
  - {uuid: GPU-0, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}
  - {uuid: GPU-1, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}
  - {uuid: GPU-2, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559, nvlinkPeers: [GPU-3]}
  - {uuid: GPU-3, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}
";

/// The kubelet's Registration service: hands each request to the test.
struct TestKubelet(mpsc::Sender<RegisterRequest>);

#[tonic::async_trait]
impl Registration for TestKubelet {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        self.0.send(request.into_inner()).await.map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Empty {}))
    }
}

/// Serves a test kubelet on `dir/kubelet.sock` until the handle is aborted.
fn start_kubelet(dir: &Path) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<RegisterRequest>) {
    let (tx, rx) = mpsc::channel(8);
    let listener = UnixListener::bind(dir.join("kubelet.sock")).unwrap();
    let server = tokio::spawn(async move {
        Server::builder()
            .add_service(RegistrationServer::new(TestKubelet(tx)))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    (server, rx)
}

/// Pod names, each with the GPUs it holds.
type HeldGpus = Vec<(String, Vec<String>)>;

/// The kubelet's PodResources service: the pods the test says the kubelet has, in namespace
/// `ml`, each with the GPUs it holds.
#[derive(Clone, Default)]
struct TestPodResources(Arc<Mutex<HeldGpus>>);

impl TestPodResources {
    fn set(&self, pods: &[(&str, &[&str])]) {
        *self.0.lock().unwrap() = pods
            .iter()
            .map(|(name, gpus)| (name.to_string(), gpus.iter().map(|g| g.to_string()).collect()))
            .collect();
    }
}

#[tonic::async_trait]
impl PodResourcesLister for TestPodResources {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        let pod_resources = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(name, gpus)| PodResources {
                name: name.clone(),
                namespace: NAMESPACE.into(),
                containers: vec![ContainerResources {
                    name: "ray-worker".into(),
                    devices: vec![ContainerDevices {
                        resource_name: "nvidia.com/gpu".into(),
                        device_ids: gpus.clone(),
                        topology: None,
                    }],
                    ..Default::default()
                }],
            })
            .collect();
        Ok(Response::new(ListPodResourcesResponse { pod_resources }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not used by the plugin"))
    }

    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not used by the plugin"))
    }
}

/// Serves the test PodResources API on `dir/pod-resources.sock`.
fn start_pod_resources(dir: &Path) -> TestPodResources {
    let pods = TestPodResources::default();
    let listener = UnixListener::bind(dir.join("pod-resources.sock")).unwrap();
    let service = PodResourcesListerServer::new(pods.clone());
    tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    pods
}

fn supplier() -> Supplier {
    Supplier {
        wallet: WALLET.into(),
        wallet_key: None,
        prices: [("H100".to_string(), 2_200_000)].into(),
        region: Some("eu-west".into()),
        zone: None,
    }
}

/// A lease of node-a; its pods are in namespace `ml`.
fn lease(name: &str, since: i64, gpus: &[&str], pods: &[&str]) -> NodeLease {
    NodeLease {
        name: name.into(),
        since: jiff::Timestamp::from_second(since).unwrap(),
        gpus: gpus.iter().map(|g| g.to_string()).collect(),
        pods: pods.iter().map(|p| PodName::new(NAMESPACE, *p)).collect(),
    }
}

/// Lays out a fake node's `/` in `dir/node` as the NVIDIA driver leaves it (plain files for
/// device nodes): the four GPUs' nodes, the control nodes, driver libraries and nvidia-smi.
fn fake_node_root(dir: &Path) -> PathBuf {
    let root = dir.join("node");
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    for dir in [root.join("dev"), lib.clone(), root.join("usr/bin")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    for file in ["nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm"] {
        std::fs::write(root.join("dev").join(file), "").unwrap();
    }
    for file in ["libcuda.so.560.35.03", "libnvidia-ml.so.560.35.03", "libcudart.so.12"] {
        std::fs::write(lib.join(file), "").unwrap();
    }
    std::os::unix::fs::symlink("libcuda.so.560.35.03", lib.join("libcuda.so.1")).unwrap();
    std::fs::write(root.join("usr/bin/nvidia-smi"), "").unwrap();
    root
}

/// The fake GPUs, on a fake node root in `dir` when `cdi`.
fn four_h100(dir: &Path, cdi: bool) -> String {
    match cdi {
        true => format!("{FOUR_H100}hostRoot: {}\n", fake_node_root(dir).display()),
        false => FOUR_H100.into(),
    }
}

/// A plugin-mode agent on the fake GPUs, serving in `dir`, with its PodResources API there too
/// and its leases fed by the test (its CDI spec in `dir/cdi`); stopped when the test ends.
struct TestNode {
    injector: FaultInjector,
    leases: watch::Sender<Vec<NodeLease>>,
    pods: TestPodResources,
    agent: tokio::task::JoinHandle<()>,
}

fn start_agent(dir: &Path, cdi: bool) -> TestNode {
    start_agent_with(dir, cdi, None)
}

fn start_agent_with(dir: &Path, cdi: bool, client: Option<kube::Client>) -> TestNode {
    let source = FakeSource::from_yaml(&four_h100(dir, cdi)).unwrap();
    let injector = source.injector();
    let pods = start_pod_resources(dir);
    let (leases, view) = watch::channel(Vec::new());
    let config = AgentConfig {
        node_name: "node-a".into(),
        supplier: supplier(),
        mode: Mode::Plugin,
        socket: PluginSocket { dir: dir.to_owned(), resource_name: "nvidia.com/gpu".into() },
        cdi,
        cdi_spec_dir: dir.join("cdi"),
        heartbeat: Duration::from_secs(1),
        pod_resources_socket: dir.join("pod-resources.sock"),
        lease_wait: LEASE_WAIT,
        reserve: Default::default(),
    };
    let agent = Agent::prepare(config, Arc::new(source)).unwrap().with_leases(view);
    let agent = tokio::spawn(async move { agent.run(client).await.unwrap() });
    TestNode { injector, leases, pods, agent }
}

async fn next_registration(rx: &mut mpsc::Receiver<RegisterRequest>) -> RegisterRequest {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("registration within 10s").expect("open")
}

async fn next_list(
    stream: &mut Streaming<ListAndWatchResponse>,
    within: Duration,
) -> Vec<(String, String)> {
    let list = tokio::time::timeout(within, stream.message())
        .await
        .expect("a device list in time")
        .unwrap()
        .expect("stream open");
    list.devices.into_iter().map(|d| (d.id, d.health)).collect()
}

fn healthy(ids: &[&str]) -> Vec<(String, String)> {
    ids.iter().map(|id| (id.to_string(), "Healthy".to_string())).collect()
}

/// The kubelet's side of a registered plugin.
async fn kubelet_client(
    dir: &Path,
    registrations: &mut mpsc::Receiver<RegisterRequest>,
) -> DevicePluginClient<Channel> {
    let registration = next_registration(registrations).await;
    DevicePluginClient::new(connect(&dir.join(&registration.endpoint)).await.unwrap())
}

async fn preferred(
    plugin: &mut DevicePluginClient<Channel>,
    available: &[&str],
    size: i32,
) -> Vec<String> {
    let request = PreferredAllocationRequest {
        container_requests: vec![ContainerPreferredAllocationRequest {
            available_device_i_ds: available.iter().map(|d| d.to_string()).collect(),
            must_include_device_i_ds: vec![],
            allocation_size: size,
        }],
    };
    let response = plugin.get_preferred_allocation(request).await.unwrap().into_inner();
    response.container_responses[0].device_i_ds.clone()
}

async fn allocate(
    plugin: &mut DevicePluginClient<Channel>,
    devices: &[&str],
) -> Result<AllocateResponse, Status> {
    let request = AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: devices.iter().map(|d| d.to_string()).collect(),
        }],
    };
    plugin.allocate(request).await.map(Response::into_inner)
}

#[tokio::test]
async fn the_kubelet_registers_lists_allocates_and_sees_health_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (_kubelet, mut registrations) = start_kubelet(dir.path());
    // A socket left behind by an earlier run must not stop the plugin.
    let socket =
        PluginSocket { dir: dir.path().to_owned(), resource_name: "nvidia.com/gpu".into() };
    std::fs::write(socket.path(), b"stale").unwrap();
    let node = start_agent(dir.path(), true);
    let injector = &node.injector;
    // GPU-2 and GPU-3 are leased to lease l, whose worker pod w-0 the kubelet is admitting.
    node.leases.send_replace(vec![lease("l", 1, &["GPU-2", "GPU-3"], &["w-0"])]);
    node.pods.set(&[("w-0", &[])]);

    let registration = next_registration(&mut registrations).await;
    assert_eq!(registration.version, "v1beta1");
    assert_eq!(registration.resource_name, "nvidia.com/gpu");
    assert_eq!(registration.endpoint, socket.endpoint());
    assert!(registration.options.unwrap().get_preferred_allocation_available);

    // Now the kubelet's side: dial the endpoint it was given.
    let channel = connect(&dir.path().join(&registration.endpoint)).await.unwrap();
    let mut plugin = DevicePluginClient::new(channel);
    let options = plugin.get_device_plugin_options(Empty {}).await.unwrap().into_inner();
    assert!(options.get_preferred_allocation_available && !options.pre_start_required);

    let mut stream = plugin.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next_list(&mut stream, WAIT).await, healthy(&["GPU-0", "GPU-1", "GPU-2", "GPU-3"]));

    let preferred = plugin
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
                    .map(String::from)
                    .into(),
                must_include_device_i_ds: vec![],
                allocation_size: 2,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        preferred.container_responses[0].device_i_ds,
        ["GPU-2", "GPU-3"],
        "the lease's GPUs"
    );

    let allocated = plugin
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: ["GPU-2", "GPU-3"].map(String::from).into(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let container = &allocated.container_responses[0];
    assert_eq!(container.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-2,GPU-3");
    let cdi: Vec<&str> = container.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(cdi, ["nvidia.com/gpu=GPU-2", "nvidia.com/gpu=GPU-3"]);
    let unknown = plugin
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: vec!["GPU-9".into()],
            }],
        })
        .await
        .expect_err("an unknown device is refused");
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);

    // An application XID changes nothing; a critical one shows within 1 s.
    injector.inject("GPU-1", FakeFault::Xid(13));
    injector.inject("GPU-1", FakeFault::Xid(79));
    let injected = Instant::now();
    let mut expected = healthy(&["GPU-0", "GPU-1", "GPU-2", "GPU-3"]);
    expected[1].1 = "Unhealthy".into();
    assert_eq!(next_list(&mut stream, Duration::from_secs(1)).await, expected);
    println!("XID 79 on the ListAndWatch stream after {:?}", injected.elapsed());

    injector.inject("GPU-1", FakeFault::Recover);
    assert_eq!(
        next_list(&mut stream, Duration::from_secs(1)).await,
        healthy(&["GPU-0", "GPU-1", "GPU-2", "GPU-3"])
    );
}

#[tokio::test]
async fn the_plugin_registers_again_when_the_kubelet_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (kubelet, mut registrations) = start_kubelet(dir.path());
    let _node = start_agent(dir.path(), false);
    let first = next_registration(&mut registrations).await;
    // The old kubelet's ListAndWatch stream stays open across the restart: it must not hold up
    // the plugin's new server.
    let channel = connect(&dir.path().join(&first.endpoint)).await.unwrap();
    let mut old_stream =
        DevicePluginClient::new(channel).list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next_list(&mut old_stream, WAIT).await.len(), 4);

    // A restarting kubelet removes its socket and the plugins' sockets, then comes back.
    kubelet.abort();
    std::fs::remove_file(dir.path().join("kubelet.sock")).unwrap();
    std::fs::remove_file(dir.path().join(&first.endpoint)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_kubelet, mut registrations) = start_kubelet(dir.path());
    let restarted = Instant::now();

    let again = next_registration(&mut registrations).await;
    println!("registered again {:?} after the kubelet came back", restarted.elapsed());
    assert_eq!(again.endpoint, first.endpoint);
    let channel = connect(&dir.path().join(&again.endpoint)).await.unwrap();
    let mut stream =
        DevicePluginClient::new(channel).list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next_list(&mut stream, WAIT).await.len(), 4, "served again on a fresh socket");
}

#[tokio::test]
async fn the_kubelet_is_served_while_the_api_server_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let (_kubelet, mut registrations) = start_kubelet(dir.path());
    // Nothing listens on port 1: every offer write fails and is retried.
    let unreachable = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
    let client = kube::Client::try_from(unreachable).unwrap();
    let node = start_agent_with(dir.path(), false, Some(client));

    let registration = next_registration(&mut registrations).await;
    let channel = connect(&dir.path().join(&registration.endpoint)).await.unwrap();
    let mut stream =
        DevicePluginClient::new(channel).list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next_list(&mut stream, WAIT).await.len(), 4);
    node.injector.inject("GPU-0", FakeFault::DoubleBitEcc);
    let list = next_list(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(list[0], ("GPU-0".to_string(), "Unhealthy".to_string()));
}

#[tokio::test]
async fn each_lease_pod_gets_its_own_leases_gpus_and_no_one_else_gets_any() {
    let dir = tempfile::tempdir().unwrap();
    let (_kubelet, mut registrations) = start_kubelet(dir.path());
    let node = start_agent(dir.path(), false);
    // Two leases of equal size. l2 holds the NVLink pair a lease-blind plugin prefers for
    // anyone, and is the older one: neither may pull l1's pod onto it.
    node.leases.send_replace(vec![
        lease("l1", 20, &["GPU-0", "GPU-1"], &["a"]),
        lease("l2", 10, &["GPU-2", "GPU-3"], &["b"]),
    ]);
    let mut plugin = kubelet_client(dir.path(), &mut registrations).await;
    let all = ["GPU-0", "GPU-1", "GPU-2", "GPU-3"];

    // A pod of no lease (it tolerates the supplier taint and asks for GPUs): refused, on free
    // or leased GPUs, once the lease watch had its chance to explain it.
    node.pods.set(&[("rogue", &[])]);
    let asked = Instant::now();
    let refused = allocate(&mut plugin, &["GPU-0"]).await.expect_err("no lease lists it");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("not one of them"), "{}", refused.message());
    assert!(asked.elapsed() >= LEASE_WAIT, "refused only after waiting for the leases");

    // l1's pod a is admitted: it is preferred l1's GPUs and gets them.
    node.pods.set(&[("a", &[])]);
    assert_eq!(preferred(&mut plugin, &all, 2).await, ["GPU-0", "GPU-1"]);
    let asked = Instant::now();
    let crossing = allocate(&mut plugin, &["GPU-1", "GPU-2"]).await.expect_err("two leases");
    assert_eq!(crossing.code(), tonic::Code::PermissionDenied);
    let message = crossing.message();
    assert!(message.contains("lease l1") && message.contains("lease l2"), "{message}");
    assert!(asked.elapsed() < LEASE_WAIT, "a crossing is refused at once: no lease view lifts it");
    let wrong = allocate(&mut plugin, &["GPU-2", "GPU-3"]).await.expect_err("l2's GPUs");
    assert!(wrong.message().contains("ml/a of lease l1"), "{}", wrong.message());
    let given = allocate(&mut plugin, &["GPU-0", "GPU-1"]).await.unwrap();
    assert_eq!(given.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], "GPU-0,GPU-1");

    // Then l2's pod b: l2's GPUs are what is left and what it gets.
    node.pods.set(&[("a", &["GPU-0", "GPU-1"]), ("b", &[])]);
    assert_eq!(preferred(&mut plugin, &["GPU-2", "GPU-3"], 2).await, ["GPU-2", "GPU-3"]);
    allocate(&mut plugin, &["GPU-2", "GPU-3"]).await.unwrap();

    // Both served: a third pod of l1 that the kubelet admits gets nothing until l1 lists it.
    node.pods.set(&[("a", &["GPU-0", "GPU-1"]), ("b", &["GPU-2", "GPU-3"]), ("a2", &[])]);
    let refused = allocate(&mut plugin, &["GPU-0"]).await.expect_err("a2 is no lease's");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_pod_its_lease_lists_late_is_served_once_the_lease_watch_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let (_kubelet, mut registrations) = start_kubelet(dir.path());
    let node = start_agent(dir.path(), false);
    // The kubelet admits w-0 a moment after it was bound; its lease does not list it yet.
    node.leases.send_replace(vec![lease("l", 1, &["GPU-1", "GPU-2"], &[])]);
    node.pods.set(&[("w-0", &[])]);
    let mut plugin = kubelet_client(dir.path(), &mut registrations).await;

    let asked = Instant::now();
    let allocation = tokio::spawn(async move { allocate(&mut plugin, &["GPU-1", "GPU-2"]).await });
    tokio::time::sleep(LEASE_WAIT / 4).await;
    node.leases.send_replace(vec![lease("l", 1, &["GPU-1", "GPU-2"], &["w-0"])]);
    let given = allocation.await.unwrap().expect("served once the lease lists it");
    assert_eq!(given.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], "GPU-1,GPU-2");
    let waited = asked.elapsed();
    assert!(waited >= LEASE_WAIT / 4 && waited < LEASE_WAIT, "{waited:?}");
}

#[tokio::test]
async fn the_cdi_spec_gives_each_gpu_its_node_and_goes_when_the_agent_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (_kubelet, mut registrations) = start_kubelet(dir.path());
    let node = start_agent(dir.path(), true);
    // Written before the kubelet hears of the GPUs.
    next_registration(&mut registrations).await;
    let path = dir.path().join("cdi").join(SPEC_FILE);
    let spec: cdi::Spec = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();

    let root = dir.path().join("node");
    let names: Vec<&str> = spec.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]);
    for (index, device) in spec.devices.iter().enumerate() {
        let [node] = device.container_edits.device_nodes.as_slice() else {
            panic!("{device:?} needs exactly its own device node")
        };
        assert_eq!(node.path, Path::new(&format!("/dev/nvidia{index}")));
        assert_eq!(node.host_path, root.join(format!("dev/nvidia{index}")));
    }
    let common = &spec.container_edits;
    let control: Vec<&Path> = common.device_nodes.iter().map(|n| n.host_path.as_path()).collect();
    assert_eq!(control, [root.join("dev/nvidiactl"), root.join("dev/nvidia-uvm")]);
    let mounted: Vec<&Path> = common.mounts.iter().map(|m| m.container_path.as_path()).collect();
    assert_eq!(
        mounted,
        [
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "/usr/lib/x86_64-linux-gnu/libcuda.so.560.35.03",
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.560.35.03",
            "/usr/bin/nvidia-smi",
        ]
        .map(Path::new)
    );
    let edits = spec.devices.iter().map(|d| &d.container_edits).chain([common]);
    for host_path in edits.flat_map(|e| {
        e.device_nodes.iter().map(|n| &n.host_path).chain(e.mounts.iter().map(|m| &m.host_path))
    }) {
        assert!(host_path.exists(), "{} is on the node", host_path.display());
    }

    node.agent.abort();
    assert!(node.agent.await.unwrap_err().is_cancelled());
    assert!(!path.exists(), "the spec is removed when the agent stops");
}

/// Runs the agent binary.
fn run_agent_output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpumarket-device-plugin"))
        .args(["--node-name", "node-a"])
        .args(args)
        .env("RUST_LOG", "off")
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap()
}

/// Runs the agent binary; its exit status and stderr.
fn run_agent(args: &[&str]) -> (bool, String) {
    let output = run_agent_output(args);
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn discover_prints_the_gpus_and_their_cdi_spec_without_any_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpus.yaml");
    std::fs::write(&path, four_h100(dir.path(), true)).unwrap();
    let output = run_agent_output(&["--discover", "--source", &format!("fake:{}", path.display())]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["inventory"]["gpus"].as_array().map(Vec::len), Some(4));
    assert_eq!(printed["inventory"]["gpus"][3]["deviceNode"], "/dev/nvidia3");
    assert_eq!(printed["driverFiles"]["controlNodes"][0], "/dev/nvidiactl");
    let spec: cdi::Spec = serde_json::from_value(printed["cdiSpec"].clone()).unwrap();
    assert_eq!(spec.devices.len(), 4);
}

fn fake_file(dir: &Path) -> PathBuf {
    let path = dir.join("gpus.yaml");
    std::fs::write(&path, FOUR_H100).unwrap();
    path
}

#[test]
fn bad_settings_stop_the_agent_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let fake = format!("fake:{}", fake_file(dir.path()).display());
    for (args, expected) in [
        (
            vec!["--wallet", "not-a-wallet", "--price", "H100=1", "--source", &fake],
            "is not a Solana public key",
        ),
        (vec!["--wallet", WALLET, "--price", "H100=0", "--source", &fake], "greater than 0"),
        (
            vec!["--wallet", WALLET, "--price", "A100=5", "--source", &fake],
            "add --price H100=UNITS",
        ),
        (vec!["--wallet", WALLET, "--price", "H100", "--source", &fake], "write MODEL=UNITS"),
        (
            vec!["--wallet", WALLET, "--price", "H100=1", "--source", "fake:/nonexistent.yaml"],
            "fake device file",
        ),
        // No NVIDIA driver on this machine: NVML fails only now that it is used, and says why.
        (vec!["--wallet", WALLET, "--price", "H100=1", "--source", "nvml"], "NVIDIA driver"),
        // A fake node without driver files cannot make a CDI spec that would work.
        (
            vec!["--wallet", WALLET, "--price", "H100=1", "--source", &fake, "--cdi"],
            "/dev/nvidiactl was not found",
        ),
        (vec!["--discover", "--source", &fake], "/dev/nvidiactl was not found"),
    ] {
        let (ok, stderr) = run_agent(&args);
        assert!(!ok, "{args:?} must stop the agent");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in:\n{stderr}");
    }
}
