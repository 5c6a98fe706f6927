//! The hub's end of the tunnel through which buyers reach the Ray heads of clusters that run in
//! fleets (`gpumarket_crds::tunnel`). The hub has no route into a fleet, so the fleet dials out:
//! its agent holds a Control call, authenticated by its join credential (a TokenReview of the
//! bearer token must name the fleet's ServiceAccount). For each cluster running in a fleet the
//! hub opens a *gateway*, two listening ports (dashboard, Ray client) on `--tunnel-gateway-address`,
//! shown in the GpuCluster's status. A buyer's connection to a gateway becomes an Open sent to
//! the fleet the cluster runs in now, whose agent connects to the head in its own cluster and
//! answers with a Relay call carrying the bytes.
//!
//! ```text
//!  buyer ──tcp──► gateway (hub) ──Open{id}──► fleet agent ──tcp──► Ray head (fleet)
//!                      ▲                           │
//!                      └──────── Relay{id} ◄───────┘
//! ```
//!
//! A fleet learns an Open's id only on its own authenticated call, and a Relay is paired with
//! the connection of that id alone: a fleet can never reach another's buyers, nor a buyer a
//! cluster that is not its gateway's. Runs on the leader, with the controllers.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use gpumarket_crds::tunnel::api::tunnel_server::{Tunnel, TunnelServer};
use gpumarket_crds::tunnel::{Chunk, Hello, Open, pipe};
use gpumarket_crds::{FLEET_NAMESPACE, RayAccess};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::runtime::context::MANAGER;

/// The Ray head's ports a gateway forwards: the dashboard (and job API), the Ray client server.
pub const DASHBOARD_PORT: u32 = 8265;
pub const RAY_CLIENT_PORT: u32 = 10001;
/// How long a buyer's connection waits for its fleet's Relay call.
const RELAY_WAIT: Duration = Duration::from_secs(10);

/// Where the tunnel listens and how buyers reach its gateways.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// The fleets' Control and Relay calls (gRPC).
    pub listen: SocketAddr,
    /// TLS certificate and key (PEM) of the fleets' endpoint; plain HTTP/2 only on loopback.
    pub tls: Option<Identity>,
    /// The gateways listen on this address of the hub (the controller pod's IP in a cluster),
    /// which the GpuClusters' status gives (IPv4: the status's addresses are `host:port`).
    pub gateway_address: Ipv4Addr,
    /// The ports the gateways take theirs from (what a NetworkPolicy opens); any free port
    /// when `None`.
    pub gateway_ports: Option<RangeInclusive<u16>>,
    /// The selector-less Service of the controller's namespace that fleets dial: serving, this
    /// replica (the leader) points its EndpointSlice at `gateway_address`, so that fleets reach
    /// the leader alone, never a standby. None outside a cluster.
    pub service: Option<String>,
}

/// Why the tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "the tunnel would carry fleets' credentials in clear on {0}: give it a TLS certificate and key, or listen on loopback"
    )]
    Cleartext(SocketAddr),
    #[error("serving the tunnel: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(
        "the tunnel's Service cannot lead to {0}, a loopback address: give the pod's IP as the gateway address (--tunnel-gateway-address), or no Service"
    )]
    LoopbackService(Ipv4Addr),
    #[error("listening on {0} for the tunnel: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// The EndpointSlice of the tunnel's Service `service` that sends fleets to this replica alone:
/// `address` (its pod IP), the tunnel's `port`.
pub fn endpoint_slice(service: &str, address: Ipv4Addr, port: u16) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(service.to_owned()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/service-name".to_owned(), service.to_owned()),
                ("endpointslice.kubernetes.io/managed-by".to_owned(), "gpumarket.io".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![address.to_string()],
            conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
            ..Endpoint::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("tunnel".into()),
            port: Some(port.into()),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// Applies `slice` until it is written: fleets reach no replica through the Service until then.
async fn point_at_self(api: Api<EndpointSlice>, slice: EndpointSlice) {
    let name = slice.metadata.name.clone().unwrap_or_default();
    let params = PatchParams::apply(MANAGER).force();
    loop {
        match api.patch(&name, &params, &Patch::Apply(&slice)).await {
            Ok(_) => {
                tracing::info!(service = %name, "the tunnel's Service leads here");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, service = %name, "pointing the tunnel's Service here; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A buyer's connection and the Relay call that serves it, paired.
struct RelayCall {
    inbound: Streaming<Chunk>,
    outbound: mpsc::Sender<Result<Chunk, Status>>,
}

/// One cluster's gateway: its listeners run while it exists.
struct Gateway {
    access: RayAccess,
    /// The fleet the cluster runs in now (it moves when the cluster is re-placed).
    fleet: watch::Sender<String>,
    listeners: Vec<tokio::task::AbortHandle>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.listeners.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// The tunnel's state: connected fleets, buyer connections waiting for their Relay, gateways.
pub struct TunnelHub {
    client: Client,
    gateway_address: Ipv4Addr,
    gateway_ports: Option<RangeInclusive<u16>>,
    /// Where to send each connected fleet's Opens (its Control call's stream).
    fleets: Mutex<HashMap<String, mpsc::Sender<Result<Open, Status>>>>,
    /// Buyer connections waiting for their Relay call, by Open id.
    waiting: Mutex<HashMap<String, oneshot::Sender<RelayCall>>>,
    /// The gateway of each cluster running in a fleet, by the cluster's uid.
    gateways: Mutex<HashMap<String, Gateway>>,
}

impl std::fmt::Debug for TunnelHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelHub").field("gateway_address", &self.gateway_address).finish()
    }
}

/// Locks `mutex`, whose data no panic can leave half-written (single inserts and removes).
fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TunnelHub {
    pub fn new(client: Client, config: &TunnelConfig) -> Arc<TunnelHub> {
        Arc::new(TunnelHub {
            client,
            gateway_address: config.gateway_address,
            gateway_ports: config.gateway_ports.clone(),
            fleets: Mutex::default(),
            waiting: Mutex::default(),
            gateways: Mutex::default(),
        })
    }

    /// Serves the fleets' calls on `config.listen` until dropped; once listening, leads the
    /// Service `config.service` of `namespace` here.
    pub async fn serve(
        self: Arc<Self>,
        config: TunnelConfig,
        namespace: String,
    ) -> Result<(), TunnelError> {
        let mut server = Server::builder();
        match config.tls {
            Some(identity) => {
                server = server.tls_config(ServerTlsConfig::new().identity(identity))?;
            }
            None if config.listen.ip().is_loopback() => {}
            None => return Err(TunnelError::Cleartext(config.listen)),
        }
        if config.service.is_some() && config.gateway_address.is_loopback() {
            return Err(TunnelError::LoopbackService(config.gateway_address));
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| TunnelError::Listen(config.listen, e))?;
        tracing::info!(listen = %config.listen, "serving the fleets' tunnel");
        let _endpoint = config.service.map(|service| {
            let slice = endpoint_slice(&service, config.gateway_address, config.listen.port());
            let api = Api::namespaced(self.client.clone(), &namespace);
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(point_at_self(api, slice)))
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        server.add_service(TunnelServer::from_arc(self)).serve_with_incoming(incoming).await?;
        Ok(())
    }

    /// Where the buyer reaches cluster `uid`, running in `fleet`, through the hub: its gateway,
    /// opened now if it has none (and then pointed at `fleet`).
    pub async fn gateway(self: &Arc<Self>, uid: &str, fleet: &str) -> std::io::Result<RayAccess> {
        if let Some(gateway) = locked(&self.gateways).get(uid) {
            gateway.fleet.send_if_modified(|current| {
                let moved = current != fleet;
                if moved {
                    fleet.clone_into(current);
                }
                moved
            });
            return Ok(gateway.access.clone());
        }
        let (fleet_tx, fleet_rx) = watch::channel(fleet.to_owned());
        let mut listeners = Vec::new();
        let mut ports = Vec::new();
        for head_port in [DASHBOARD_PORT, RAY_CLIENT_PORT] {
            let listener = self.listen().await?;
            ports.push(listener.local_addr()?.port());
            let forward = forward(
                Arc::downgrade(self),
                listener,
                uid.to_owned(),
                head_port,
                fleet_rx.clone(),
            );
            listeners.push(tokio::spawn(forward).abort_handle());
        }
        let host = self.gateway_address;
        let access = RayAccess {
            dashboard: format!("http://{host}:{}", ports[0]),
            ray_client: format!("ray://{host}:{}", ports[1]),
        };
        let gateway = Gateway { access: access.clone(), fleet: fleet_tx, listeners };
        // A concurrent call may have opened one first: keep that one (its address may be shown).
        let kept = locked(&self.gateways).entry(uid.to_owned()).or_insert(gateway).access.clone();
        tracing::info!(cluster_uid = %uid, %fleet, dashboard = %kept.dashboard, "gateway open");
        Ok(kept)
    }

    /// A listener on the gateway address, on the first free port of the range.
    async fn listen(&self) -> std::io::Result<TcpListener> {
        let Some(ports) = self.gateway_ports.clone() else {
            return TcpListener::bind((self.gateway_address, 0)).await;
        };
        for port in ports {
            if let Ok(listener) = TcpListener::bind((self.gateway_address, port)).await {
                return Ok(listener);
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "every port of the tunnel's gateway range is taken: widen --tunnel-gateway-ports",
        ))
    }

    /// Closes cluster `uid`'s gateway, if it has one (it no longer runs in a fleet).
    pub fn close_gateway(&self, uid: &str) {
        if locked(&self.gateways).remove(uid).is_some() {
            tracing::info!(cluster_uid = %uid, "gateway closed");
        }
    }

    /// Asks `fleet` to connect to `port` of cluster `uid`'s head and waits for its Relay call.
    async fn connect(&self, fleet: &str, uid: &str, port: u32) -> Result<RelayCall, String> {
        let control = locked(&self.fleets).get(fleet).cloned();
        let control = control.ok_or_else(|| format!("fleet {fleet} has no tunnel connected"))?;
        let id = format!("{:032x}", rand::random::<u128>());
        let (tx, rx) = oneshot::channel();
        locked(&self.waiting).insert(id.clone(), tx);
        let open = Open { id: id.clone(), cluster_uid: uid.to_owned(), port };
        let answered = match control.send(Ok(open)).await {
            Ok(()) => tokio::time::timeout(RELAY_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok)
                .ok_or_else(|| format!("fleet {fleet} did not answer within {RELAY_WAIT:?}")),
            Err(_) => {
                // Its Control call ended (the agent went away) since it was last used.
                let mut fleets = locked(&self.fleets);
                if fleets.get(fleet).is_some_and(mpsc::Sender::is_closed) {
                    fleets.remove(fleet);
                }
                Err(format!("fleet {fleet} has no tunnel connected"))
            }
        };
        locked(&self.waiting).remove(&id);
        answered
    }

    /// Whether `token` is fleet `fleet`'s join credential: the hub's API server says it belongs
    /// to the fleet's ServiceAccount.
    async fn authenticate(&self, token: &str, fleet: &str) -> Result<(), Status> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), ..Default::default() },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("reviewing the credential: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        let user = status.user.and_then(|u| u.username);
        let expected = format!("system:serviceaccount:{FLEET_NAMESPACE}:{fleet}");
        if status.authenticated == Some(true) && user.as_deref() == Some(&expected) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this credential is not fleet {fleet}'s join credential (a token of ServiceAccount {FLEET_NAMESPACE}/{fleet} on the hub)"
            )))
        }
    }
}

/// Relays each connection to `listener` to port `head_port` of cluster `uid`'s Ray head, in the
/// fleet `fleet` names at the time. Holds the hub weakly: the gateways go with it (when the
/// controllers stop) rather than keeping it alive.
async fn forward(
    hub: Weak<TunnelHub>,
    listener: TcpListener,
    uid: String,
    head_port: u32,
    fleet: watch::Receiver<String>,
) {
    while let Ok((buyer, _)) = listener.accept().await {
        let Some(hub) = hub.upgrade() else { return };
        let (uid, fleet) = (uid.clone(), fleet.borrow().clone());
        tokio::spawn(async move {
            match hub.connect(&fleet, &uid, head_port).await {
                Ok(call) => pipe(buyer, call.inbound, call.outbound, Ok).await,
                Err(why) => {
                    tracing::info!(cluster_uid = %uid, %fleet, %why, "buyer connection dropped")
                }
            }
        });
    }
}

#[tonic::async_trait]
impl Tunnel for TunnelHub {
    type ControlStream = ReceiverStream<Result<Open, Status>>;
    type RelayStream = ReceiverStream<Result<Chunk, Status>>;

    async fn control(
        &self,
        request: Request<Hello>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("give the fleet's join credential as a bearer token")
            })?;
        let fleet = request.get_ref().fleet.clone();
        self.authenticate(token, &fleet).await?;
        let (tx, rx) = mpsc::channel(64);
        // A fleet's newer call replaces its older one (the agent reconnected).
        locked(&self.fleets).insert(fleet.clone(), tx);
        tracing::info!(%fleet, "fleet's tunnel connected");
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn relay(
        &self,
        request: Request<Streaming<Chunk>>,
    ) -> Result<Response<Self::RelayStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("a Relay call starts with a chunk naming its Open")
        })?;
        let waiting = locked(&self.waiting).remove(&first.id);
        let waiting =
            waiting.ok_or_else(|| Status::not_found("no connection waits for this id"))?;
        let (outbound, rx) = mpsc::channel(16);
        waiting
            .send(RelayCall { inbound, outbound })
            .map_err(|_| Status::cancelled("the buyer's connection is gone"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    use super::*;

    fn hub(gateway_ports: Option<RangeInclusive<u16>>) -> Arc<TunnelHub> {
        // No API call is made: only a fleet's Control call reviews a token.
        let (service, _) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let config = TunnelConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls: None,
            gateway_address: Ipv4Addr::LOCALHOST,
            gateway_ports,
            service: None,
        };
        TunnelHub::new(Client::new(service, "default"), &config)
    }

    fn socket_of(address: &str) -> SocketAddr {
        address.split_once("://").and_then(|(_, a)| a.parse().ok()).expect("host:port")
    }

    #[tokio::test]
    async fn a_cluster_keeps_its_gateway_as_it_moves_between_fleets_until_it_is_closed() {
        let hub = hub(None);
        let access = hub.gateway("uid-1", "fleet-a").await.expect("a gateway");
        assert!(access.dashboard.starts_with("http://127.0.0.1:"), "{access:?}");
        assert!(access.ray_client.starts_with("ray://127.0.0.1:"), "{access:?}");
        let moved = hub.gateway("uid-1", "fleet-b").await.expect("the same gateway");
        assert_eq!(moved, access);
        let fleet = locked(&hub.gateways)["uid-1"].fleet.borrow().clone();
        assert_eq!(fleet, "fleet-b");

        // No fleet holds a tunnel: a buyer's connection is closed at once.
        let mut buyer = TcpStream::connect(socket_of(&access.dashboard)).await.expect("accepted");
        let mut read = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), buyer.read_to_end(&mut read));
        assert_eq!(closed.await.expect("closed at once").expect("a clean close"), 0);

        hub.close_gateway("uid-1");
        let refused = async {
            while TcpStream::connect(socket_of(&access.ray_client)).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), refused).await.expect("the ports closed");
    }

    #[test]
    fn the_tunnels_service_is_pointed_at_this_replica_alone() {
        let slice = endpoint_slice("hub-tunnel", Ipv4Addr::new(10, 1, 2, 3), 9444);
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels["kubernetes.io/service-name"], "hub-tunnel");
        let endpoints = slice.endpoints.unwrap_or_default();
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].addresses, ["10.1.2.3"]);
        let ports = slice.ports.unwrap_or_default();
        assert_eq!((ports[0].name.as_deref(), ports[0].port), (Some("tunnel"), Some(9444)));
    }

    #[tokio::test]
    async fn gateways_take_ports_from_their_range_and_say_so_when_it_is_full() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("a port");
        let port = taken.local_addr().expect("bound").port();
        let full = hub(Some(port..=port)).gateway("uid-1", "fleet-a").await;
        let error = full.expect_err("its only port is taken");
        assert!(error.to_string().contains("widen --tunnel-gateway-ports"), "{error}");
        drop(taken);
        let ports = port..=port.saturating_add(50);
        let access = hub(Some(ports)).gateway("uid-1", "fleet-a").await.expect("free ports");
        assert_eq!(socket_of(&access.dashboard).port(), port);
    }
}
