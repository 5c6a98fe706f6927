//! The fleet's end of the hub's tunnel (the controller's `fleet::tunnel`): buyers on the hub
//! reach the Ray heads the fleet runs, though the hub has no route into the fleet. The fleet
//! dials out and holds a Control call authenticated by its join credential; for each Open the
//! hub sends, it connects to the head's port in its own cluster (the head pod's IP: the agent
//! runs in the fleet's pod network) and answers with a Relay call carrying the bytes. Only the
//! heads of clusters assigned to this fleet, and only their dashboard and Ray client ports, are
//! ever connected to, whatever the hub asks.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use gpumarket_crds::tunnel::api::tunnel_client::TunnelClient;
use gpumarket_crds::tunnel::{Chunk, Hello, Open, pipe};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The Ray head ports the hub may ask for: the dashboard (and job API), the Ray client server.
const RELAYED_PORTS: [u32; 2] = [8265, 10001];
/// Waits between attempts to (re)connect to the hub, doubling up to the last.
const RETRY: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(15),
];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the fleet reaches the hub's tunnel.
#[derive(Clone)]
pub struct TunnelSettings {
    /// The hub's tunnel endpoint, e.g. `https://hub.example.net:9444`.
    pub endpoint: String,
    /// CA certificate (PEM) the endpoint's certificate must chain to (with `https`).
    pub ca_pem: Option<Vec<u8>>,
    /// The fleet's join credential: its ServiceAccount token on the hub.
    pub token: String,
}

impl std::fmt::Debug for TunnelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("TunnelSettings").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

/// The Ray heads the fleet runs now, by the cluster's uid on the hub: their pod IPs.
pub type Heads = BTreeMap<String, IpAddr>;

/// Holds fleet `fleet`'s tunnel to the hub and serves its Opens until dropped, reconnecting
/// after any failure.
pub async fn run(fleet: String, settings: TunnelSettings, heads: watch::Receiver<Heads>) {
    let mut failures = 0;
    loop {
        match serve(&fleet, &settings, &heads).await {
            Ok(()) => {
                tracing::info!("the hub closed the tunnel; reconnecting");
                failures = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %settings.endpoint, "tunnel to the hub; retrying")
            }
        }
        tokio::time::sleep(RETRY[failures.min(RETRY.len() - 1)]).await;
        failures += 1;
    }
}

/// One Control call: connect, then serve Opens until the call ends.
async fn serve(
    fleet: &str,
    settings: &TunnelSettings,
    heads: &watch::Receiver<Heads>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut endpoint = Endpoint::from_shared(settings.endpoint.clone())?;
    if let Some(ca) = &settings.ca_pem {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?;
    }
    let client = TunnelClient::new(endpoint.connect_timeout(CONNECT_TIMEOUT).connect().await?);
    let mut request = tonic::Request::new(Hello { fleet: fleet.to_owned() });
    request.metadata_mut().insert("authorization", format!("Bearer {}", settings.token).parse()?);
    let mut opens = client.clone().control(request).await?.into_inner();
    tracing::info!(endpoint = %settings.endpoint, "tunnel to the hub open");
    while let Some(open) = opens.next().await {
        let open = open?;
        let head = heads.borrow().get(&open.cluster_uid).copied();
        tokio::spawn(relay(client.clone(), open, head));
    }
    Ok(())
}

/// Connects Open `open` to its head (at `head`, if the fleet runs it) and relays the bytes.
async fn relay(mut client: TunnelClient<Channel>, open: Open, head: Option<IpAddr>) {
    let Some(head) = head.filter(|_| RELAYED_PORTS.contains(&open.port)) else {
        tracing::warn!(cluster_uid = %open.cluster_uid, port = open.port, "the hub asked for a head or port this fleet does not run; not connected");
        return;
    };
    let Ok(port) = u16::try_from(open.port) else { return };
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((head, port))).await
    {
        Ok(Ok(socket)) => socket,
        Ok(Err(e)) => {
            tracing::info!(error = %e, %head, port, "connecting to the Ray head");
            return;
        }
        Err(_) => {
            tracing::info!(%head, port, "connecting to the Ray head timed out");
            return;
        }
    };
    let (outbound, rx) = mpsc::channel(16);
    // The first chunk names the connection; nothing else is queued yet, so this cannot wait.
    let _ = outbound.try_send(Chunk { id: open.id, data: Vec::new() });
    match client.relay(ReceiverStream::new(rx)).await {
        Ok(inbound) => pipe(socket, inbound.into_inner(), outbound, std::convert::identity).await,
        Err(e) => tracing::info!(error = %e, "relay refused by the hub"),
    }
}
