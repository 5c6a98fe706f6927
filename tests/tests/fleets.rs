//! Remote fleets against real components: a hub and two fleets, each its own control plane
//! (etcd, kube-apiserver, controller-manager, scheduler, KWOK GPU nodes), and the real Solana
//! validator for a fleet's payouts. The hub admin applies
//! each fleet's join objects (`gpumarket-fleet join`) and the chart's fleet-isolation policy; each
//! fleet agent runs with its own cluster's client, a hub client holding only its join
//! credential (a ServiceAccount token from the hub's TokenRequest API) and its wallet's keypair,
//! which signs its offers: the hub controller requires signed offers, as by default. The hub
//! never gets a client of a fleet.
//!
//! The controller and the fleet agents run in-process (`gpumarket_controller::run`,
//! `gpumarket_device_plugin::fleet::run`); stopping a fleet is dropping its task. One more
//! fleet is installed as an operator would: the chart's fleet mode from the agent image, on a
//! fleet whose node is a real one, where a buyer's Ray job runs, submitted through the hub.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gpumarket_controller::fleet::tunnel::TunnelConfig;
use gpumarket_controller::raycluster;
use gpumarket_controller::settlement::{SettlementConfig, Settler};
use gpumarket_controller::verification::{self, NOT_THE_FLEETS_WALLET};
use gpumarket_controller::{Config, Settings};
use gpumarket_crds::common::GPU_RESOURCE;
use gpumarket_crds::signature::sign;
use gpumarket_crds::{
    ClusterPhase, EndReason, FLEET_NAMESPACE, GpuCluster, GpuFleet, GpuLease, GpuOffer,
    GpuOfferSpec, LeasePhase, RayAccess, fleet_offer_name,
};
use gpumarket_device_plugin::config::WalletKey;
use gpumarket_device_plugin::fleet::tunnel::TunnelSettings;
use gpumarket_device_plugin::fleet::workload::{head_access, head_name};
use gpumarket_device_plugin::fleet::{self, FleetConfig, join::join_objects};
use gpumarket_device_plugin::offer::Reserve;
use gpumarket_tests::certs::ServingIdentity;
use gpumarket_tests::kwok::GpuNode;
use gpumarket_tests::ray::{Dashboard, python_entrypoint};
use gpumarket_tests::real_node::NODE_NAME;
use gpumarket_tests::solana::read_keypair;
use gpumarket_tests::{Env, EnvOptions, chart, eventually};
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use solana_sdk::signature::{Keypair, Signer};
use support::InProcessController;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Identity;

const BUYER_WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
const REGION: &str = "fleets";
const HEARTBEAT: Duration = Duration::from_secs(2);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(8);
const WAIT: Duration = Duration::from_secs(60);
/// How long the paying fleet's workers have to get Ready (short: one of its leases never does).
const PAYMENT_PROVISIONING_TIMEOUT: Duration = Duration::from_secs(8);

/// A fleet: its own control plane and KWOK GPU nodes, and (while running) its agent.
struct Fleet {
    name: &'static str,
    /// The keypair of its GpuFleet's wallet, which signs its offers.
    wallet: WalletKey,
    env: Env,
    namespace: String,
    /// Hub requests made with this fleet's credential.
    hub_requests: Arc<AtomicU64>,
    agent: Option<tokio::task::JoinHandle<()>>,
    /// When the agent last started.
    agent_started: Instant,
    /// The hub's tunnel the agent holds, if any: its endpoint and CA certificate.
    tunnel: Option<(String, Vec<u8>)>,
}

impl Fleet {
    /// Fleet `name` with one 4-GPU node in `region`, its KWOK pods on addresses of `pod_cidr`,
    /// holding the hub's `tunnel`.
    async fn start(
        name: &'static str,
        wallet: WalletKey,
        region: &str,
        price: u64,
        hub: &Env,
        pod_cidr: &str,
        tunnel: Option<(String, Vec<u8>)>,
    ) -> Fleet {
        let keep_dir = std::env::var_os("GPUMARKET_KEEP_ENV").is_some_and(|v| v == "1");
        let kwok_pod_cidr = Some(pod_cidr.to_owned());
        let options = EnvOptions { keep_dir, kwok_pod_cidr, ..EnvOptions::default() };
        let env = Env::start(options).await.expect("a fleet control plane");
        eprintln!("{name}: control plane in {}", env.dir().display());
        env.add_gpu_nodes(&[GpuNode::new("gpu-1", "H100", 4).region(region)]).await.unwrap();
        let namespace = env.namespace("gpumarket-workloads").await.unwrap();
        apply(hub, &join_objects(name, &wallet.public_key()).unwrap());
        let hub_requests = Arc::new(AtomicU64::new(0));
        let mut fleet = Fleet {
            name,
            wallet,
            env,
            namespace,
            hub_requests,
            agent: None,
            agent_started: Instant::now(),
            tunnel,
        };
        fleet.run(hub, price).await;
        fleet
    }

    /// Starts the fleet's agent: this fleet's admin client and a hub client with the join
    /// credential only.
    async fn run(&mut self, hub: &Env, price: u64) {
        let local = self.env.client().await.unwrap();
        let (credential, token) =
            join_credential(hub, self.name, Some(self.hub_requests.clone())).await;
        let tunnel = self.tunnel.clone().map(|(endpoint, ca)| TunnelSettings {
            endpoint,
            ca_pem: Some(ca),
            token,
        });
        let config = FleetConfig {
            name: self.name.into(),
            wallet_key: self.wallet.clone(),
            prices: vec![format!("H100={price}")],
            region: None,
            zone: None,
            heartbeat: HEARTBEAT,
            workload_check: Duration::from_millis(500),
            namespace: self.namespace.clone(),
            reserve: Reserve::default(),
            tunnel,
        };
        self.agent_started = Instant::now();
        self.agent = Some(tokio::spawn(async move {
            if let Err(e) = fleet::run(local, credential, config).await {
                panic!("fleet agent stopped: {e}");
            }
        }));
    }

    fn stop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.abort();
        }
    }

    /// Every pod the fleet runs for the market: Ray heads and workers.
    async fn pods(&self) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.env.client().await.unwrap(), &self.namespace);
        pods.list(&ListParams::default()).await.unwrap().items
    }

    /// The Ray worker pods (those of a lease).
    async fn workers(&self) -> Vec<Pod> {
        let mut pods = self.pods().await;
        pods.retain(|p| p.labels().contains_key("gpumarket.io/lease"));
        pods
    }

    /// Stands in for the Ray dashboard of the cluster with uid `uid` (KWOK runs no container):
    /// an HTTP server at its head pod's address (on loopback: the fleet's pod CIDR) that names
    /// the fleet, until dropped.
    async fn serve_dashboard(&self, uid: &str) -> tokio::task::JoinHandle<()> {
        let head = self.running_head(uid).await.expect("a Running head");
        let ip = head.status.and_then(|s| s.pod_ip).expect("a pod IP");
        let listener = tokio::net::TcpListener::bind((ip.as_str(), 8265)).await.unwrap();
        let body = format!("Ray dashboard of {uid} in {}", self.name);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0; 1024];
                let _ = socket.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            }
        })
    }

    /// The Running Ray head of the cluster with uid `uid`, if any.
    async fn running_head(&self, uid: &str) -> Option<Pod> {
        self.pods().await.into_iter().find(|p| {
            p.name_any() == head_name(uid)
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
        let _ = self.env.shutdown();
    }
}

/// `kubectl apply` of `objects` on `env`.
fn apply(env: &Env, objects: &[Value]) {
    let yaml: String =
        objects.iter().map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap())).collect();
    let mut kubectl = env.tools().command("kubectl").unwrap();
    kubectl.arg("--kubeconfig").arg(env.kubeconfig()).args(["apply", "--server-side", "-f", "-"]);
    run_with_stdin(&mut kubectl, &yaml);
}

fn run_with_stdin(command: &mut Command, stdin: &str) -> String {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The chart's fleet-isolation policy, as `helm template` renders it, applied on the hub.
fn install_fleet_isolation(hub: &Env) {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/gpumarket");
    let mut helm = hub.tools().command("helm").unwrap();
    helm.args(["template", "gpumarket"]).arg(chart).args([
        "--namespace",
        "gpumarket",
        "--show-only",
        "templates/fleet-isolation.yaml",
    ]);
    let rendered = run_with_stdin(&mut helm, "");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &Value| !doc.is_null())
        .collect();
    assert_eq!(objects.len(), 2, "the policy and its binding");
    apply(hub, &objects);
}

/// A hub client holding nothing but fleet `name`'s join credential (a ServiceAccount token),
/// counting its requests into `counter`; and the token.
async fn join_credential(
    hub: &Env,
    name: &str,
    counter: Option<Arc<AtomicU64>>,
) -> (Client, String) {
    let admin = hub.client().await.unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, FLEET_NAMESPACE);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600}
    }))
    .unwrap();
    let issued =
        accounts.create_token_request(name, &PostParams::default(), &request).await.unwrap();
    let token = issued.status.and_then(|s| s.token).expect("a token");
    let kubeconfig = Kubeconfig::read_from(hub.kubeconfig()).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info =
        kube::config::AuthInfo { token: Some(token.clone().into()), ..Default::default() };
    let builder = kube::client::ClientBuilder::try_from(config).unwrap();
    let client = match counter {
        None => builder.build(),
        Some(counter) => builder
            .with_layer(&tower::util::MapRequestLayer::new(move |request| {
                counter.fetch_add(1, Ordering::Relaxed);
                request
            }))
            .build(),
    };
    (client, token)
}

fn gpu_cluster(name: &str, region: &str, gpus_per_worker: u32, buyer: &str) -> GpuCluster {
    serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuCluster",
        "metadata": {"name": name},
        "spec": {
            "gpu": {"models": ["H100"]},
            "workers": 1,
            "gpusPerWorker": gpus_per_worker,
            "duration": "1h",
            "maxPricePerGpuHour": 5_000_000,
            "location": {"region": region},
            "payment": {"buyerWallet": buyer},
        },
    }))
    .unwrap()
}

/// The status code of a refused request, and its message.
fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{what}: {status:?}");
            status.message
        }
        other => panic!("{what}: expected Forbidden, got {other:?}"),
    }
}

fn fleet_offer_manifest(fleet: &str, name: &str) -> Value {
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "metadata": {"name": name, "labels": {"gpumarket.io/fleet": fleet}},
        "spec": {
            "nodeName": name,
            "wallet": BUYER_WALLET,
            "gpus": [{"uuid": "GPU-x-0", "model": "H100", "memoryMib": 81920}],
            "pricePerGpuHour": 1,
            "region": REGION,
        },
    })
}

/// The hub's tunnel on a free loopback port, over TLS with the hub API server's certificate
/// (for 127.0.0.1, from the hub's CA); and what a fleet needs to reach it: its endpoint and the
/// CA certificate.
fn hub_tunnel(hub: &Env) -> (TunnelConfig, (String, Vec<u8>)) {
    let pki = hub.dir().join("pki");
    let read = |name: &str| std::fs::read(pki.join(name)).unwrap();
    let port = gpumarket_tests::ports::free_tcp_ports(1).unwrap()[0];
    let config = TunnelConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: Some(Identity::from_pem(read("apiserver.crt"), read("apiserver.key"))),
        gateway_address: Ipv4Addr::LOCALHOST,
        gateway_ports: None,
        service: None,
    };
    (config, (format!("https://127.0.0.1:{port}"), read("ca.crt")))
}

/// An HTTP GET of `url` (`http://host:port`), the whole response as text.
async fn http_get(url: &str) -> String {
    let address = url.strip_prefix("http://").expect("an http URL");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = socket.read_to_string(&mut response).await;
    response
}

/// Tests take turns: each runs its own hub controller, which watches the whole hub.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The hub's controller, in this test's runtime (settling through `settler`), until dropped.
fn start_hub_controller(
    client: &Client,
    settler: Option<Arc<Settler>>,
    provisioning_timeout: Duration,
    tunnel: Option<TunnelConfig>,
) -> InProcessController {
    let config = Config {
        tunnel,
        settings: Settings {
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            orphan_grace: Duration::from_secs(2),
            provisioning_timeout,
            ..Settings::default()
        },
        ..Config::default()
    };
    InProcessController::start(client, config, settler)
}

#[tokio::test]
async fn fleets_join_the_hub_run_clusters_in_their_own_cluster_and_stay_confined() {
    let _turn = TURN.lock().await;
    let hub = Env::shared().await;
    let admin = hub.client().await.unwrap();
    install_fleet_isolation(hub);
    let (tunnel, reach_tunnel) = hub_tunnel(hub);
    let _controller = start_hub_controller(&admin, None, Duration::from_secs(120), Some(tunnel));

    // Join: each fleet's GPU node is on the hub, as an offer of its own name and wallet. One
    // fleet after the other: three control planes starting at once overload a small machine.
    let offers: Api<GpuOffer> = Api::all(admin.clone());
    let offer_a = fleet_offer_name("fleet-a", "gpu-1");
    let offer_b = fleet_offer_name("fleet-b", "gpu-1");
    let (key_a, key_b) = (new_wallet(), new_wallet());
    let (wallet_a, wallet_b) = (key_a.public_key(), key_b.public_key());
    let tunnel = Some(reach_tunnel.clone());
    let mut fleet_a =
        Fleet::start("fleet-a", key_a, REGION, 2_000_000, hub, "127.42.0.0/16", tunnel).await;
    let joined_a = offer_available(&offers, &offer_a, &wallet_a, fleet_a.agent_started).await;
    let tunnel = Some(reach_tunnel.clone());
    let fleet_b =
        Fleet::start("fleet-b", key_b, REGION, 3_000_000, hub, "127.43.0.0/16", tunnel).await;
    let joined_b = offer_available(&offers, &offer_b, &wallet_b, fleet_b.agent_started).await;
    let fleets: Api<GpuFleet> = Api::all(admin.clone());
    eventually("fleet-a to be Joined", WAIT, || async {
        let fleet = fleets.get("fleet-a").await.unwrap();
        let status = fleet.status?;
        let joined = status.conditions.iter().any(|c| c.type_ == "Joined" && c.status == "True");
        (joined && status.offers == [offer_a.clone()]).then_some(())
    })
    .await;

    // A gang stays inside one fleet: two workers of 4 GPUs, with 4 free in each fleet, are
    // refused, and the buyer is told what to change.
    let ns = hub.namespace("fleet-buyer").await.unwrap();
    let clusters: Api<GpuCluster> = Api::namespaced(admin.clone(), &ns);
    let mut split = gpu_cluster("split", REGION, 4, BUYER_WALLET);
    split.spec.workers = 2;
    clusters.create(&PostParams::default(), &split).await.unwrap();
    let refusal = eventually("the gang across two fleets to be refused", WAIT, || async {
        let status = clusters.get("split").await.unwrap().status?;
        let matched = status.conditions.into_iter().find(|c| c.type_ == "Matched")?;
        (matched.status == "False" && matched.reason == "NoMatchingSupply")
            .then_some(matched.message)
    })
    .await;
    assert!(refusal.contains("a gang stays inside one fleet"), "{refusal}");
    assert!(refusal.contains("e.g. spec.workers 1"), "{refusal}");
    clusters.delete("split", &DeleteParams::default()).await.unwrap();
    eventually("the refused GpuCluster gone", WAIT, || async {
        clusters.get_opt("split").await.unwrap().is_none().then_some(())
    })
    .await;

    // A GpuCluster on the hub runs in fleet A (the cheaper), its worker in fleet A's cluster.
    let applied = Instant::now();
    clusters
        .create(&PostParams::default(), &gpu_cluster("llm", REGION, 4, BUYER_WALLET))
        .await
        .unwrap();
    let leases: Api<GpuLease> = Api::all(admin.clone());
    let lease = eventually("a lease on fleet A's offer", WAIT, || async {
        leases.list(&ListParams::default()).await.unwrap().items.into_iter().find(|l| {
            l.spec.cluster.namespace == ns
                && l.spec.offer == offer_a
                && l.spec.supplier_wallet == wallet_a
        })
    })
    .await;
    let worker = eventually("the worker pod Running in fleet A", WAIT, || async {
        fleet_a.workers().await.into_iter().find(|p| {
            p.labels().get("gpumarket.io/lease") == Some(&lease.name_any())
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
    })
    .await;
    let to_workers = applied.elapsed();
    let spec = worker.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("gpu-1"));
    let limits = spec.containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "4");
    // The cluster's Ray head runs in fleet A too, and the worker joins it there.
    let uid = lease.spec.cluster.uid.clone();
    eventually("the Ray head Running in fleet A", WAIT, || fleet_a.running_head(&uid)).await;
    let command = spec.containers[0].command.as_ref().unwrap().join(" ");
    assert!(command.contains(&format!("--address={}:6379", head_name(&uid))), "{command}");
    assert!(fleet_b.pods().await.is_empty(), "nothing runs in fleet B");
    eventually("the lease to serve from fleet A's report", WAIT, || async {
        let lease = leases.get(&lease.name_any()).await.unwrap();
        lease.status?.serving_since
    })
    .await;
    let access = runs_in(&admin, &ns, "llm", &fleet_a).await;
    let to_running = applied.elapsed();

    // The buyer reaches the head's dashboard through the hub: the hub has no route into fleet A,
    // whose agent dialled out to the hub's tunnel and connects to the head inside fleet A.
    let _dashboard_a = fleet_a.serve_dashboard(&uid).await;
    let asked = Instant::now();
    let page = http_get(&access.dashboard).await;
    let through_tunnel = asked.elapsed();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.ends_with(&format!("Ray dashboard of {uid} in fleet-a")), "{page}");
    // The tunnel takes only a fleet's own credential, and pairs a relay only with a connection
    // the hub opened.
    let (_, token_b) = join_credential(hub, "fleet-b", None).await;
    let (control, relay) = tunnel_refusals(&reach_tunnel, "fleet-a", Some(&token_b)).await;
    assert_eq!(control.code(), tonic::Code::PermissionDenied, "{control:?}");
    assert!(control.message().contains("not fleet fleet-a's join credential"), "{control:?}");
    assert_eq!(relay.code(), tonic::Code::NotFound, "{relay:?}");
    let (control, _) = tunnel_refusals(&reach_tunnel, "fleet-a", None).await;
    assert_eq!(control.code(), tonic::Code::Unauthenticated, "{control:?}");

    // Confinement: fleet A's credential, against the hub's real API server.
    let (as_a, _) = join_credential(hub, "fleet-a", None).await;
    let fleets_a: Api<GpuFleet> = Api::all(as_a.clone());
    let offers_a: Api<GpuOffer> = Api::all(as_a.clone());
    let leases_a: Api<GpuLease> = Api::all(as_a.clone());
    fleets_a.get("fleet-a").await.expect("its own GpuFleet");
    refused("read fleet B's GpuFleet", fleets_a.get("fleet-b").await);
    refused("list GpuFleets", fleets_a.list(&ListParams::default()).await);
    refused("read fleet B's offer", offers_a.get(&offer_b).await);
    refused("list offers", offers_a.list(&ListParams::default()).await);
    refused("read its own lease", leases_a.get(&lease.name_any()).await);
    refused("list leases", leases_a.list(&ListParams::default()).await);
    refused(
        "read the buyer's GpuCluster",
        Api::<GpuCluster>::namespaced(as_a.clone(), &ns).get("llm").await,
    );
    let apply = PatchParams::apply("intruder").force();
    // The policy is in force once its informer has it; RBAC alone would allow these writes.
    let message =
        eventually("the fleet-isolation policy to refuse fleet B's offer", WAIT, || async {
            match offers_a
                .patch(&offer_b, &apply, &Patch::Apply(fleet_offer_manifest("fleet-b", &offer_b)))
                .await
            {
                Err(kube::Error::Api(status))
                    if status.code == 403 && status.message.contains("fleet-isolation") =>
                {
                    Some(status.message)
                }
                _ => None,
            }
        })
        .await;
    assert!(message.contains("may write only its own GpuOffers"), "{message}");
    let unlabelled = fleet_offer_manifest("fleet-b", "fleet-a.extra");
    let message = refused(
        "an offer of its name without its label",
        offers_a.patch("fleet-a.extra", &apply, &Patch::Apply(&unlabelled)).await,
    );
    assert!(message.contains("must carry the label gpumarket.io/fleet=fleet-a"), "{message}");
    let claim = json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuOffer",
        "status": {"gpus": [{"uuid": "GPU-fleet-a-gpu-1-0", "lease": "stolen"}]},
    });
    let message = refused(
        "allocate its own GPU",
        offers_a.patch_status(&offer_a, &apply, &Patch::Apply(&claim)).await,
    );
    assert!(message.contains("written only by the gpumarket controller"), "{message}");
    let assign = json!({"status": {"assignments": []}});
    let message = refused(
        "clear its own assignments",
        fleets_a.patch_status("fleet-a", &PatchParams::default(), &Patch::Merge(&assign)).await,
    );
    assert!(message.contains("assignments are the hub's"), "{message}");
    // A fleet's offer is paid to its GpuFleet's wallet: one that names another wallet (signed
    // with that wallet's own key) is written, but the hub never matches it.
    let other = Keypair::new();
    let mut rogue = fleet_offer_manifest("fleet-a", "fleet-a.rogue");
    let mut spec: GpuOfferSpec = serde_json::from_value(rogue["spec"].clone()).unwrap();
    spec.wallet = other.pubkey().to_string();
    rogue["spec"] = serde_json::to_value(sign(&spec, &other)).unwrap();
    offers_a.patch("fleet-a.rogue", &apply, &Patch::Apply(&rogue)).await.unwrap();
    let condition = eventually("the hub to refuse an offer of another wallet", WAIT, || async {
        let offer = offers.get("fleet-a.rogue").await.unwrap();
        verification::condition(&offer).cloned()
    })
    .await;
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", NOT_THE_FLEETS_WALLET)
    );
    assert!(
        condition.message.contains("not the wallet of GpuFleet fleet-a"),
        "{}",
        condition.message
    );
    offers.delete("fleet-a.rogue", &DeleteParams::default()).await.unwrap();
    refused(
        "report on fleet B",
        fleets_a
            .patch_status("fleet-b", &PatchParams::default(), &Patch::Merge(json!({"status": {}})))
            .await,
    );

    // Steady state: the hub requests of fleet B's credential over a window.
    let window = Duration::from_secs(20);
    let before = fleet_b.hub_requests.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    let per_minute = (fleet_b.hub_requests.load(Ordering::Relaxed) - before) as f64 * 60.0
        / window.as_secs_f64();

    // Fleet A goes silent: its lease ends as a supplier failure and the cluster is re-placed
    // in fleet B, whole.
    fleet_a.stop();
    let stopped = Instant::now();
    let ended = eventually("fleet A's lease to end as a supplier failure", WAIT, || async {
        let lease = leases.get(&lease.name_any()).await.unwrap();
        let status = lease.status?;
        (status.phase == Some(LeasePhase::Ended)).then_some(status.end_reason)
    })
    .await;
    assert_eq!(ended, Some(gpumarket_crds::EndReason::SupplierFailure));
    let replaced = eventually("the worker re-placed in fleet B", WAIT, || async {
        fleet_b
            .workers()
            .await
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
    let replacement =
        leases.get(replaced.labels().get("gpumarket.io/lease").unwrap()).await.unwrap();
    assert_eq!(
        (replacement.spec.offer.as_str(), replacement.spec.supplier_wallet.as_str()),
        (offer_b.as_str(), wallet_b.as_str())
    );
    let to_replaced = stopped.elapsed();
    eventually("the Ray head Running in fleet B", WAIT, || fleet_b.running_head(&uid)).await;
    let _dashboard_b = fleet_b.serve_dashboard(&uid).await;
    let moved = runs_in(&admin, &ns, "llm", &fleet_b).await;
    assert_eq!(moved, access, "the buyer's address through the hub stays");
    let page = http_get(&access.dashboard).await;
    assert!(page.ends_with(&format!("Ray dashboard of {uid} in fleet-b")), "{page}");
    eventually("the buyer told of the re-placement", WAIT, || async {
        hub_events(hub, &ns).await.iter().any(|e| e.contains("Replaced")).then_some(())
    })
    .await;

    println!(
        "\nfleet figures (two fleets, one 4-GPU KWOK node each, heartbeat {HEARTBEAT:?}):\n\
         - fleet agent start to its offer Available on the hub: {joined_a:.1?} (fleet A), {joined_b:.1?} (fleet B)\n\
         - GpuCluster apply on the hub to its worker Running in fleet A: {to_workers:.1?}\n\
         - GpuCluster apply on the hub to Running there (Ray head and worker Ready, reported): {to_running:.1?}\n\
         - a dashboard request from the hub through the tunnel (new connection, fleet relay): {through_tunnel:.1?}\n\
         - fleet A stopped to the worker Running in fleet B: {to_replaced:.1?}\n\
         - hub API requests of one fleet (1 node) at steady state: {per_minute:.0}/min at a {HEARTBEAT:?} heartbeat\n\
           (offers + 1 GpuFleet report per heartbeat, plus one watch: {:.0}/min at the default 20s)",
        per_minute * HEARTBEAT.as_secs_f64() / 20.0
    );
}

#[tokio::test]
async fn a_cluster_served_by_a_fleet_pays_the_fleets_wallet_on_chain() {
    let _turn = TURN.lock().await;
    let hub = Env::shared().await;
    let admin = hub.client().await.unwrap();
    install_fleet_isolation(hub);
    let sol = hub.solana().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let keypair = keys.path().join("settlement.json");
    sol.settlement_authority(&keypair).await.unwrap();
    let mut config = SettlementConfig::new(
        sol.rpc_url.clone(),
        keypair,
        sol.mint.to_string(),
        Duration::from_secs(3),
    );
    config.poll_interval = Duration::from_secs(1);
    config.heartbeat_timeout = HEARTBEAT_TIMEOUT;
    let settler = Some(Arc::new(Settler::new(config).unwrap()));
    let _controller = start_hub_controller(&admin, settler, PAYMENT_PROVISIONING_TIMEOUT, None);

    // 1000 base units per GPU-second, paid to the wallet of the fleet's GpuFleet.
    let price = 3_600_000;
    let fleet_key = WalletKey(Arc::new(read_keypair(&sol.suppliers[0]).unwrap()));
    let fleet_wallet = fleet_key.0.pubkey();
    let fleet =
        Fleet::start("fleet-pay", fleet_key, "fleet-pay", price, hub, "127.44.0.0/16", None).await;
    offer_available(
        &Api::all(admin.clone()),
        &fleet_offer_name("fleet-pay", "gpu-1"),
        &fleet_wallet.to_string(),
        fleet.agent_started,
    )
    .await;

    let ns = hub.namespace("fleet-payer").await.unwrap();
    let clusters: Api<GpuCluster> = Api::namespaced(admin.clone(), &ns);
    let buyer = read_keypair(&sol.buyer).unwrap();
    let spec = gpu_cluster("paid", "fleet-pay", 2, &buyer.pubkey().to_string());
    let created = clusters.create(&PostParams::default(), &spec).await.unwrap();
    let escrow = eventually("the escrow recorded", WAIT, || async {
        clusters
            .get("paid")
            .await
            .ok()?
            .status?
            .escrow?
            .account
            .parse::<solana_sdk::pubkey::Pubkey>()
            .ok()
    })
    .await;
    // The fleet's own quota lets no GPU pod start: the first lease's worker never gets Ready.
    let quotas: Api<ResourceQuota> =
        Api::namespaced(fleet.env.client().await.unwrap(), &fleet.namespace);
    let no_gpus: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-gpus"},
        "spec": {"hard": {format!("requests.{GPU_RESOURCE}"): "0"}},
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &no_gpus).await.unwrap();
    let (buyer_before, fleet_before) =
        (sol.balance(&buyer.pubkey()).await.unwrap(), sol.balance(&fleet_wallet).await.unwrap());
    sol.transfer(&buyer, &escrow, 2 * price, Some("deposit")).await.unwrap();
    let uid = created.uid().unwrap();
    let leases: Api<GpuLease> = Api::all(admin.clone());
    let leases_of_paid = || async {
        let mut all = leases.list(&ListParams::default()).await.unwrap().items;
        all.retain(|l| l.spec.cluster.uid == uid);
        all
    };

    // A supplier failure like a silent node's: the lease ends when the provisioning timeout
    // passes, unbilled, and the buyer is told.
    let unserved = eventually("the lease whose worker never started to end", WAIT, || async {
        leases_of_paid()
            .await
            .into_iter()
            .find(|l| l.status.as_ref().and_then(|s| s.end_reason) == Some(EndReason::NotServing))
    })
    .await;
    let status = unserved.status.as_ref().unwrap();
    assert_eq!((status.served_gpu_seconds, status.serving_since.as_ref()), (Some(0), None));
    // The Event follows the lease's end (best effort, after it).
    let told = format!("not Ready within {}s", PAYMENT_PROVISIONING_TIMEOUT.as_secs());
    eventually("the buyer told why the lease ended", WAIT, || async {
        let events = hub_events(hub, &ns).await;
        events.iter().any(|e| e.starts_with("NotServing") && e.contains(&told)).then_some(())
    })
    .await;

    // Once the fleet lets GPU pods start, the cluster is re-placed there and served.
    quotas.delete("no-gpus", &DeleteParams::default()).await.unwrap();
    let served = eventually("the fleet's lease serving", WAIT, || async {
        leases_of_paid().await.into_iter().find(|l| {
            l.status.as_ref().is_some_and(|s| s.serving_since.is_some() && s.end_reason.is_none())
        })
    })
    .await;
    assert_eq!(served.spec.supplier_wallet, fleet_wallet.to_string());
    tokio::time::sleep(Duration::from_secs(4)).await;

    clusters.delete("paid", &kube::api::DeleteParams::default()).await.unwrap();
    eventually("the GpuCluster refunded and gone", Duration::from_secs(90), || async {
        clusters.get_opt("paid").await.unwrap().is_none().then_some(())
    })
    .await;
    // Every lease of the cluster is settled at its served time, to the base unit: those that
    // never served pay nothing.
    let mut paid = 0;
    for lease in leases_of_paid().await {
        let status = lease.status.unwrap();
        assert_eq!(status.phase, Some(LeasePhase::Settled), "{status:?}");
        let served_seconds = status.served_gpu_seconds.unwrap();
        assert_eq!(status.amount_settled, Some(served_seconds * 1000), "{status:?}");
        if status.end_reason == Some(EndReason::NotServing) {
            assert_eq!(served_seconds, 0, "{status:?}");
        }
        paid += served_seconds * 1000;
    }
    let status = leases.get(&served.name_any()).await.unwrap().status.unwrap();
    assert!(status.amount_settled.unwrap() > 0, "{status:?}");
    assert_eq!(
        sol.balance(&fleet_wallet).await.unwrap() - fleet_before,
        paid,
        "paid to the fleet's wallet"
    );
    assert_eq!(buyer_before - sol.balance(&buyer.pubkey()).await.unwrap(), paid, "rest refunded");
    eventually("the fleet to remove the worker and head of the ended lease", WAIT, || async {
        fleet.pods().await.is_empty().then_some(())
    })
    .await;
}

/// Waits for GpuCluster `name` to be Running in `fleet` from the fleet's report: RayReady, its
/// dashboard and Ray client reached through the hub's tunnel when the fleet holds one (else
/// those of its Ray head's Service in the fleet), and no RayCluster of the hub's own. Where the
/// status says the buyer reaches it.
async fn runs_in(hub: &Client, ns: &str, name: &str, fleet: &Fleet) -> RayAccess {
    let clusters: Api<GpuCluster> = Api::namespaced(hub.clone(), ns);
    let what = format!("GpuCluster {name} Running in {}", fleet.name);
    let uid = clusters.get(name).await.unwrap().uid().unwrap();
    let in_fleet = head_access(&fleet.namespace, &uid);
    let status = eventually(&what, WAIT, || async {
        let status = clusters.get(name).await.unwrap().status?;
        let shown = status.dashboard.as_deref();
        // Just after a re-placement the status may still show the fleet's own address.
        let access_as_meant = fleet.tunnel.is_none() || shown != Some(&in_fleet.dashboard);
        (status.phase == Some(ClusterPhase::Running)
            && status.fleet.as_deref() == Some(fleet.name)
            && access_as_meant)
            .then_some(status)
    })
    .await;
    let ready = status.conditions.iter().find(|c| c.type_ == "RayReady").unwrap();
    assert_eq!(ready.status, "True", "{ready:?}");
    assert!(ready.message.contains(fleet.name), "{}", ready.message);
    let access =
        RayAccess { dashboard: status.dashboard.unwrap(), ray_client: status.ray_client.unwrap() };
    if fleet.tunnel.is_some() {
        assert!(access.dashboard.starts_with("http://127.0.0.1:"), "{access:?}");
        assert!(access.ray_client.starts_with("ray://127.0.0.1:"), "{access:?}");
        assert_eq!(status.through_hub, Some(true), "the hub's gateway, and the status says so");
    } else {
        assert_eq!(access, in_fleet);
        assert_eq!(status.through_hub, None);
    }
    assert_eq!(status.ray_cluster, None);
    let ray_clusters: Api<DynamicObject> =
        Api::namespaced_with(hub.clone(), ns, &raycluster::api_resource());
    assert!(ray_clusters.get_opt(name).await.unwrap().is_none(), "no RayCluster on the hub");
    access
}

/// What the hub's tunnel answers a Control call for `fleet` with `token` (none without), and
/// a Relay call naming an Open that was never sent.
async fn tunnel_refusals(
    (endpoint, ca): &(String, Vec<u8>),
    fleet: &str,
    token: Option<&str>,
) -> (tonic::Status, tonic::Status) {
    use gpumarket_crds::tunnel::api::tunnel_client::TunnelClient;
    use gpumarket_crds::tunnel::{Chunk, Hello};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let channel =
        Endpoint::from_shared(endpoint.clone()).unwrap().tls_config(tls).unwrap().connect().await;
    let mut client = TunnelClient::new(channel.unwrap());
    let mut hello = tonic::Request::new(Hello { fleet: fleet.into() });
    if let Some(token) = token {
        hello.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let control = client.control(hello).await.expect_err("a refused Control call");
    let guess = Chunk { id: format!("{:032x}", 7u128), data: Vec::new() };
    let relay = client.relay(futures::stream::iter([guess])).await.expect_err("a refused Relay");
    (control, relay)
}

/// A new wallet's keypair.
fn new_wallet() -> WalletKey {
    WalletKey(Arc::new(Keypair::new()))
}

/// Waits for `name` to be Available and Verified on the hub, paid to `wallet`, with the node's
/// 4 GPUs; how long after `since` it was.
async fn offer_available(
    offers: &Api<GpuOffer>,
    name: &str,
    wallet: &str,
    since: Instant,
) -> Duration {
    let published =
        eventually("the fleet's offer to be Available and Verified on the hub", WAIT, || async {
            offers
                .get_opt(name)
                .await
                .unwrap()
                .filter(|o| o.is_available() && verification::admitted(o))
        })
        .await;
    let elapsed = since.elapsed();
    assert_eq!(published.spec.wallet, wallet);
    let verified = verification::condition(&published).unwrap();
    assert_eq!(verified.reason, "Signed", "signed by the fleet's wallet: {}", verified.message);
    assert_eq!(published.spec.gpus.len(), 4);
    elapsed
}

/// The reasons and messages of the Events in `ns` on the hub.
async fn hub_events(hub: &Env, ns: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(hub.client().await.unwrap(), ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| format!("{}: {}", e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// The chart's fleet mode for real: a fleet whose GPU node is a real node (containerd, kubelet,
/// Ray's image), its agent installed with `helm install` from the agent image as a fleet's
/// operator does and dialing the hub from its pod with nothing but the join credential. A
/// buyer's GpuCluster on the hub runs there as Ray pods, and a Ray job submitted through the
/// hub's gateway (the tunnel) runs on the fleet's GPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_fleet_mode_joins_from_a_real_node_and_runs_a_buyers_ray_job_through_the_hub() {
    const NAME: &str = "fleet-real";
    const REGION: &str = "real-fleet";
    const RAY_WAIT: Duration = Duration::from_secs(600);
    let _turn = TURN.lock().await;
    let hub = Env::shared().await;
    let admin = hub.client().await.unwrap();
    install_fleet_isolation(hub);

    // The fleet: its own control plane and a real node, whose GPUs the fleet's own device
    // plugin would advertise; here they are on the Node's status (Kubernetes' way of advertising
    // an extended resource by hand), described by GPU feature discovery's labels.
    let keep_dir = std::env::var_os("GPUMARKET_KEEP_ENV").is_some_and(|v| v == "1");
    let options = EnvOptions { keep_dir, real_node: true, ..EnvOptions::default() };
    let fleet = Env::start(options).await.expect("a fleet control plane with a real node");
    eprintln!("{NAME}: control plane in {}", fleet.dir().display());
    let node = fleet.real_node().unwrap();
    let nodes: Api<Node> = Api::all(fleet.client().await.unwrap());
    let gpus = json!({"nvidia.com/gpu": "4"});
    let status = json!({"status": {"capacity": gpus, "allocatable": gpus}});
    nodes.patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    let labels = json!({"metadata": {"labels": {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
    }}});
    nodes.patch(NODE_NAME, &PatchParams::default(), &Patch::Merge(labels)).await.unwrap();

    // The hub admin's part: the fleet's join objects, its credential, and the tunnel. The
    // fleet's pods reach the hub's API server and tunnel at the fleet's bridge address (relays
    // to the hub's loopback ports), as they would reach a hub's public address.
    let wallet = Keypair::new();
    apply(hub, &join_objects(NAME, &wallet.pubkey().to_string()).unwrap());
    let (_, token) = join_credential(hub, NAME, None).await;
    let hub_config = Kubeconfig::read_from(hub.kubeconfig()).unwrap();
    let hub_cluster = hub_config.clusters[0].cluster.clone().unwrap();
    let hub_port: u16 =
        hub_cluster.server.as_deref().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let _hub_api = node.expose(hub_port).await.unwrap();
    let tunnel_port = gpumarket_tests::ports::free_tcp_ports(1).unwrap()[0];
    let _hub_tunnel = node.expose(tunnel_port).await.unwrap();
    let bridge = node.host_address.to_string();
    let identity = ServingIdentity::generate("gpumarket-tunnel", &bridge).unwrap();
    let tunnel = TunnelConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], tunnel_port)),
        tls: Some(Identity::from_pem(&identity.cert, &identity.key)),
        gateway_address: Ipv4Addr::LOCALHOST,
        gateway_ports: None,
        service: None,
    };
    let _controller = start_hub_controller(&admin, None, RAY_WAIT, Some(tunnel));
    let hub_kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "hub", "cluster": {
            "server": format!("https://{bridge}:{hub_port}"),
            "certificate-authority-data": ByteString(std::fs::read(hub.dir().join("pki/ca.crt")).unwrap()),
            // The hub's certificate names its loopback address, not the bridge's.
            "tls-server-name": "127.0.0.1",
        }}],
        "users": [{"name": NAME, "user": {"token": token}}],
        "contexts": [{"name": "hub", "context": {"cluster": "hub", "user": NAME}}],
        "current-context": "hub",
    });
    let keys = tempfile::tempdir().unwrap();
    let wallet_file = keys.path().join("wallet.json");
    solana_sdk::signer::keypair::write_keypair_file(&wallet, &wallet_file).unwrap();

    // The fleet operator's part: `helm install` in fleet mode.
    let join = chart::FleetJoin {
        name: NAME.into(),
        hub_kubeconfig: serde_yaml::to_string(&hub_kubeconfig).unwrap(),
        wallet: wallet_file,
        hub_tunnel: (format!("https://{bridge}:{tunnel_port}"), identity.ca_cert),
        price: 2_000_000,
        region: REGION.into(),
    };
    let installing = chart::install_fleet_on_real_node(&fleet, &join).await.unwrap();
    let installed = installing.elapsed();
    let offers: Api<GpuOffer> = Api::all(admin.clone());
    let offer = fleet_offer_name(NAME, NODE_NAME);
    let to_offer = offer_available(&offers, &offer, &wallet.pubkey().to_string(), installing).await;

    // A buyer's GpuCluster on the hub, with Ray's image: its head and worker run on the
    // fleet's real node.
    let ns = hub.namespace("fleet-chart-buyer").await.unwrap();
    let clusters: Api<GpuCluster> = Api::namespaced(admin.clone(), &ns);
    let mut cluster = gpu_cluster("train", REGION, 4, BUYER_WALLET);
    cluster.spec.ray = serde_json::from_value(
        json!({"version": "2.41.0", "image": "ghcr.io/gpumarket/ray:2.41.0"}),
    )
    .unwrap();
    let applied = Instant::now();
    clusters.create(&PostParams::default(), &cluster).await.unwrap();
    let status = eventually("the GpuCluster Running in the fleet", RAY_WAIT, || async {
        let status = clusters.get("train").await.unwrap().status?;
        (status.phase == Some(ClusterPhase::Running)).then_some(status)
    })
    .await;
    let to_running = applied.elapsed();
    assert_eq!(status.fleet.as_deref(), Some(NAME));
    assert_eq!(status.through_hub, Some(true), "{status:?}");
    let fleet_pods: Api<Pod> = Api::namespaced(fleet.client().await.unwrap(), chart::NAMESPACE);
    let workers = fleet_pods.list(&ListParams::default().labels("gpumarket.io/lease")).await;
    let workers = workers.unwrap().items;
    assert_eq!(workers.len(), 1, "one worker");
    let on = workers[0].spec.as_ref().and_then(|s| s.node_name.as_deref());
    assert_eq!(on, Some(NODE_NAME), "on the fleet's real node");

    // The buyer's Ray job, through the hub's gateway: the bytes go hub → tunnel → the fleet's
    // agent pod → the head's pod, and its tasks run on the fleet's worker and its GPUs.
    let dashboard = Dashboard { address: status.dashboard.clone().unwrap() };
    assert!(dashboard.address.starts_with("http://127.0.0.1:"), "{}", dashboard.address);
    let job = python_entrypoint(
        r#"import ray
ray.init()
@ray.remote(num_gpus=1, num_cpus=0)
def gpu(): return ray.get_gpu_ids()
print("GPUS", int(ray.cluster_resources()["GPU"]), "TASK", ray.get(gpu.remote()))
"#,
    );
    let run = dashboard.run("gpus", &job, RAY_WAIT).await.unwrap();
    let job_done = applied.elapsed();
    assert_eq!(run.status, "SUCCEEDED", "{}", run.logs);
    assert!(run.logs.contains("GPUS 4 TASK ["), "{}", run.logs);

    // The buyer deletes the cluster: its lease ends and the fleet removes its pods.
    clusters.delete("train", &DeleteParams::default()).await.unwrap();
    eventually("the fleet's Ray pods removed", WAIT, || async {
        fleet_pods
            .list(&ListParams::default().labels("gpumarket.io/fleet-workload"))
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;

    println!(
        "\nfleet mode from the chart (a real node, Ray's image, 2 cores):\n\
         - helm install (images imported) until the fleet's agent is Ready: {installed:.1?}\n\
         - helm install to the fleet's offer Available on the hub: {to_offer:.1?}\n\
         - GpuCluster apply on the hub to Running in the fleet (Ray head and worker Ready): {to_running:.1?}\n\
         - GpuCluster apply to a Ray job succeeded through the hub's gateway: {job_done:.1?}"
    );
}
