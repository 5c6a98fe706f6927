//! gpumarket controller: matches GpuClusters to supplier offers, provisions KubeRay clusters on
//! the matched nodes and settles GPU time on Solana.
//!
//! [`run`] is the whole controller as a library call, so tests start it in-process (and stop it
//! by dropping the future), and can race two replicas.

#![cfg_attr(test, allow(clippy::expect_used))]

pub mod cluster;
pub mod error;
pub mod fleet;
pub mod market;
pub mod matching;
pub mod plugin;
pub mod policy;
pub mod raycluster;
pub mod runtime;
pub mod settlement;
pub mod simulate;
#[cfg(test)]
mod testing;
pub mod verification;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use gpumarket_crds::{GpuCluster, GpuFleet, GpuLease, GpuOffer, MarketPolicy};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::runtime::cache::{cache, watched};

pub use error::Error;
pub use runtime::context::Settings;
pub use runtime::leader::LeaderElection;

/// Everything [`run`] needs besides the client.
#[derive(Clone, Debug)]
pub struct Config {
    pub settings: Settings,
    /// The controller's own namespace, where it keeps its records (the offers' signing times,
    /// `verification::signing_times`).
    pub namespace: String,
    /// Serve `/metrics`, `/healthz`, `/readyz` here; no HTTP server when `None`.
    pub metrics_addr: Option<SocketAddr>,
    /// Elect a leader before reconciling; every replica reconciles when `None`.
    pub leader_election: Option<LeaderElection>,
    /// Cancelled to stop: [`run`] then gives up leadership and returns.
    pub shutdown: CancellationToken,
    /// Serve the tunnel through which buyers reach Ray heads in fleets (leader only); fleet
    /// clusters' status shows the heads' in-fleet addresses when `None`.
    pub tunnel: Option<fleet::tunnel::TunnelConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            settings: Settings::default(),
            namespace: "default".into(),
            metrics_addr: None,
            leader_election: None,
            shutdown: CancellationToken::new(),
            tunnel: None,
        }
    }
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("leader election: {0}")]
    LeaderElection(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost leadership; stopping so that the new leader reconciles alone")]
    LeadershipLost,
    #[error(transparent)]
    Tunnel(#[from] fleet::tunnel::TunnelError),
}

/// The User-Agent of the controller's requests. The API server names the field manager of a
/// write that gives none (the finalizer patches of kube-runtime's `finalizer` helper) after it,
/// so managedFields show `gpumarket-controller` owning the finalizers, not `unknown`.
const USER_AGENT: &str = concat!("gpumarket-controller/", env!("CARGO_PKG_VERSION"));

/// Requests of the controller's client in flight at once, at most. Each takes a connection
/// (HTTP/1.1) with its TLS and read buffers, about 100 KB: a start that reconciles every offer
/// at once opened thousands (5,000 connections made most of a 550 MiB peak at 10,000 offers),
/// while the API server serves a few hundred at a time anyway.
pub const REQUESTS_IN_FLIGHT: usize = 64;

/// The controller's client from `config`: its User-Agent on every request, and at most
/// [`REQUESTS_IN_FLIGHT`] requests at once (the others wait their turn; a watch holds its place
/// only until the response starts).
pub fn client(mut config: kube::Config) -> Result<Client, kube::Error> {
    use axum::http::{HeaderValue, header};
    config.headers.push((header::USER_AGENT, HeaderValue::from_static(USER_AGENT)));
    let limit = tower::limit::ConcurrencyLimitLayer::new(REQUESTS_IN_FLIGHT);
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&limit).build())
}

/// Run the controller until `config.shutdown` is cancelled or the future dropped (or, with
/// leader election, leadership is lost). No settlement: leases are metered but nobody is paid.
pub async fn run(client: Client, config: Config) -> Result<(), RunError> {
    run_with(client, config, None).await
}

/// [`run`], settling leases on Solana through `settler` (leader only, like the controllers), and
/// provisioning a cluster only once its deposit covers it.
pub async fn run_settling(
    client: Client,
    config: Config,
    settler: Arc<settlement::Settler>,
) -> Result<(), RunError> {
    run_with(client, config, Some(settler)).await
}

async fn run_with(
    client: Client,
    config: Config,
    settler: Option<Arc<settlement::Settler>>,
) -> Result<(), RunError> {
    let metrics = Arc::new(runtime::metrics::Metrics::new()?);
    let _server = config.metrics_addr.map(|addr| {
        let metrics = metrics.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            if let Err(e) = runtime::metrics::serve(addr, metrics).await {
                tracing::error!(error = %e, %addr, "metrics server stopped");
            }
        }))
    });
    let shutdown = config.shutdown.clone();
    // Not started until polled (after leadership where elected). Boxed: the joined controllers
    // are a large future, and unoptimised builds copy it into every frame that polls it.
    let controllers = Box::pin(run_controllers(
        client.clone(),
        config.settings,
        config.namespace,
        metrics.clone(),
        settler,
        config.tunnel,
    ));
    match &config.leader_election {
        None => {
            tokio::select! {
                stopped = controllers => stopped,
                () = shutdown.cancelled() => Ok(()),
            }
        }
        Some(election) => {
            let mut leadership =
                runtime::leader::Leadership::start(client.clone(), election).await?;
            // A standby replica is ready: it serves its purpose by waiting.
            metrics.ready.store(true, Ordering::Relaxed);
            tracing::info!(identity = %election.identity, "waiting for leadership");
            tokio::select! {
                () = leadership.acquired() => {}
                () = shutdown.cancelled() => {
                    leadership.release().await;
                    return Ok(());
                }
            }
            tracing::info!(identity = %election.identity, "leading");
            metrics.ready.store(false, Ordering::Relaxed);
            let stopped = tokio::select! {
                stopped = controllers => stopped,
                () = leadership.lost() => Err(RunError::LeadershipLost),
                () = shutdown.cancelled() => Ok(()),
            };
            // Controllers stopped first (the select dropped them), then the Lease is given up:
            // the next leader never overlaps with this one.
            leadership.release().await;
            stopped
        }
    }
}

async fn run_controllers(
    client: Client,
    settings: Settings,
    namespace: String,
    metrics: Arc<runtime::metrics::Metrics>,
    settler: Option<Arc<settlement::Settler>>,
    tunnel: Option<fleet::tunnel::TunnelConfig>,
) -> Result<(), RunError> {
    // The caches are filled by their own tasks, so a reconcile can wait for them without
    // depending on the controller polling its trigger streams; the controllers have their own
    // watches as triggers, except the offer controller, which the offer cache's changes trigger.
    let every = watcher::Config::default;
    let (offer_store, offer_changes, _offers) = watched::<GpuOffer>(&client, every());
    let (lease_store, _leases) = cache::<GpuLease>(&client, every());
    let (cluster_store, _clusters) = cache::<GpuCluster>(&client, every());
    let (pod_store, _pods) = cache::<Pod>(&client, every().labels(raycluster::CLUSTER_LABEL));
    let (policy_store, _policies) = cache::<MarketPolicy>(&client, every());
    let (fleet_store, _fleets) = cache::<GpuFleet>(&client, every());
    if offer_store.wait_until_ready().await.is_err()
        || lease_store.wait_until_ready().await.is_err()
        || cluster_store.wait_until_ready().await.is_err()
        || pod_store.wait_until_ready().await.is_err()
        || policy_store.wait_until_ready().await.is_err()
        || fleet_store.wait_until_ready().await.is_err()
    {
        tracing::error!("a cache stopped before it was filled");
        return Ok(());
    }

    let signatures = verification::SignatureChecks::from_recorded(
        recorded_signing_times(&client, &namespace).await,
    );

    let settle = {
        let (client, settler, metrics) = (client.clone(), settler.clone(), metrics.clone());
        async move {
            match settler {
                Some(settler) => settlement::run(client, settler, metrics).await,
                None => std::future::pending().await,
            }
        }
    };
    let mut ctx = runtime::context::Context::new(
        client,
        metrics,
        settings,
        runtime::context::Caches {
            offers: offer_store,
            leases: lease_store,
            clusters: cluster_store,
            pods: pod_store,
            policy: policy_store,
            fleets: fleet_store,
        },
        settler,
        namespace,
        signatures,
    );
    let tunnel = tunnel.map(|config| {
        let hub = fleet::tunnel::TunnelHub::new(ctx.client.clone(), &config);
        ctx.tunnel = Some(hub.clone());
        hub.serve(config, ctx.namespace.clone())
    });
    let ctx = Arc::new(ctx);
    let clusters = cluster::controller(&ctx);
    // Ready: the caches are filled. (Not by waiting on the cluster controller's own store: its
    // readiness wakes only the last task to wait, and the controller itself waits on it.)
    ctx.metrics.ready.store(true, Ordering::Relaxed);
    let inventory = periodically(runtime::metrics::INVENTORY_PERIOD, {
        let ctx = ctx.clone();
        move || {
            let (o, l, c) = (ctx.offers.state(), ctx.leases.state(), ctx.clusters.state());
            ctx.metrics.refresh_inventory(&o, &l, &c, jiff::Timestamp::now());
            std::future::ready(())
        }
    });
    let prune_signing_times = periodically(verification::signing_times::PRUNE_PERIOD, {
        let ctx = ctx.clone();
        move || {
            let ctx = ctx.clone();
            async move {
                if let Err(e) = ctx.prune_signing_times().await {
                    tracing::warn!(error = %e, "pruning the offers' signing times; retrying later");
                }
            }
        }
    });
    let offer_controller = market::offer::run(ctx.clone(), offer_changes);
    let policy_events = policy::run(ctx.clone());
    let fleet_controller = fleet::run(ctx.clone());
    // Each its own task, polled from the runtime rather than through this function's frame
    // (large in unoptimised builds); a panic in one is this function's panic.
    let tasks = [
        tokio::spawn(cluster::run(clusters, ctx)),
        tokio::spawn(offer_controller),
        tokio::spawn(fleet_controller),
        tokio::spawn(inventory),
        tokio::spawn(prune_signing_times),
        tokio::spawn(settle),
        tokio::spawn(policy_events),
    ]
    .map(AbortOnDropHandle::new);
    let controllers = async {
        if let Err(stopped) = futures::future::try_join_all(tasks).await
            && let Ok(panic) = stopped.try_into_panic()
        {
            std::panic::resume_unwind(panic);
        }
    };
    match tunnel {
        None => controllers.await,
        Some(tunnel) => tokio::select! {
            () = controllers => {}
            served = tunnel => served?,
        },
    }
    Ok(())
}

/// Runs `tick` every `period`, the first at once, for as long as the future is polled.
async fn periodically<F: Future<Output = ()>>(
    period: std::time::Duration,
    mut tick: impl FnMut() -> F,
) {
    let mut ticks = tokio::time::interval(period);
    loop {
        ticks.tick().await;
        tick().await;
    }
}

/// The offers' signing times recorded by earlier replicas, retried until they can be read: a
/// controller that forgot them would take an offer's older signed spec for its newest.
async fn recorded_signing_times(
    client: &Client,
    namespace: &str,
) -> verification::signing_times::Recorded {
    loop {
        match verification::signing_times::load(client, namespace).await {
            Ok(times) => return times,
            Err(e) => {
                tracing::error!(error = %e, %namespace, "reading the offers' signing times");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_user_agent_names_the_field_manager() {
        // The API server takes the field manager from the User-Agent up to the first '/'.
        let manager = super::USER_AGENT.split('/').next();
        assert_eq!(manager, Some(crate::runtime::context::MANAGER));
    }
}
