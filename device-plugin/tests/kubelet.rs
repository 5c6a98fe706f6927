//! The plugin against a test kubelet over unix sockets in a temp directory: a Registration
//! server (generated from the same proto) receives the registration, then calls the plugin as
//! the kubelet does. Also: health changes on the ListAndWatch stream, re-registration after a
//! kubelet restart, and the binary refusing bad settings with a message saying what to fix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpumarket_device_plugin::agent::{Agent, AgentConfig};
use gpumarket_device_plugin::api::device_plugin_client::DevicePluginClient;
use gpumarket_device_plugin::api::registration_server::{Registration, RegistrationServer};
use gpumarket_device_plugin::api::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Empty,
    ListAndWatchResponse, PreferredAllocationRequest, RegisterRequest,
};
use gpumarket_device_plugin::config::{Mode, Supplier};
use gpumarket_device_plugin::registration::{PluginSocket, connect};
use gpumarket_device_plugin::source::fake::{FakeFault, FakeSource, FaultInjector};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

const WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
const WAIT: Duration = Duration::from_secs(10);

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

fn supplier() -> Supplier {
    Supplier {
        wallet: WALLET.into(),
        prices: [("H100".to_string(), 2_200_000)].into(),
        region: Some("eu-west".into()),
        zone: None,
    }
}

/// A plugin-mode agent on the fake GPUs, serving in `dir`; stopped when the test ends.
fn start_agent(dir: &Path, cdi: bool) -> FaultInjector {
    start_agent_with(dir, cdi, None)
}

fn start_agent_with(dir: &Path, cdi: bool, client: Option<kube::Client>) -> FaultInjector {
    let source = FakeSource::from_yaml(FOUR_H100).unwrap();
    let injector = source.injector();
    let config = AgentConfig {
        node_name: "node-a".into(),
        supplier: supplier(),
        mode: Mode::Plugin,
        socket: PluginSocket { dir: dir.to_owned(), resource_name: "nvidia.com/gpu".into() },
        cdi,
        heartbeat: Duration::from_secs(1),
    };
    let agent = Agent::prepare(config, Arc::new(source)).unwrap();
    tokio::spawn(async move { agent.run(client).await.unwrap() });
    injector
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

#[tokio::test]
async fn the_kubelet_registers_lists_allocates_and_sees_health_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (_kubelet, mut registrations) = start_kubelet(dir.path());
    // A socket left behind by an earlier run must not stop the plugin.
    let socket =
        PluginSocket { dir: dir.path().to_owned(), resource_name: "nvidia.com/gpu".into() };
    std::fs::write(socket.path(), b"stale").unwrap();
    let injector = start_agent(dir.path(), true);

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
    assert_eq!(preferred.container_responses[0].device_i_ds, ["GPU-2", "GPU-3"], "the NVLink pair");

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
    let _injector = start_agent(dir.path(), false);
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
    let injector = start_agent_with(dir.path(), false, Some(client));

    let registration = next_registration(&mut registrations).await;
    let channel = connect(&dir.path().join(&registration.endpoint)).await.unwrap();
    let mut stream =
        DevicePluginClient::new(channel).list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next_list(&mut stream, WAIT).await.len(), 4);
    injector.inject("GPU-0", FakeFault::DoubleBitEcc);
    let list = next_list(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(list[0], ("GPU-0".to_string(), "Unhealthy".to_string()));
}

/// Runs the agent binary; its exit status and stderr.
fn run_agent(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gpumarket-device-plugin"))
        .args(["--node-name", "node-a"])
        .args(args)
        .env("RUST_LOG", "off")
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
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
    ] {
        let (ok, stderr) = run_agent(&args);
        assert!(!ok, "{args:?} must stop the agent");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in:\n{stderr}");
    }
}
