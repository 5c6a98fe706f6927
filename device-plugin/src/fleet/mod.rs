//! Fleet mode: an existing Kubernetes GPU cluster (a *fleet*, with its own API server, device
//! plugin or DRA driver) joins the market's cluster (the *hub*) as a supplier without re-homing
//! a node. The fleet dials out; the hub holds no credential to it and needs no route to it.
//!
//! ```text
//!  fleet cluster                          hub cluster
//!  ┌──────────────────────────┐  join    ┌──────────────────────────────────────────┐
//!  │ gpumarket-fleet          │ ───────► │ GpuFleet <name> (admin: wallet)           │
//!  │  in-cluster client:      │  token   │  status.lastHeartbeat, offers, workloads  │
//!  │   Nodes (GPUs, labels)   │          │        (fleet)                            │
//!  │   worker Pods it runs    │          │  status.conditions, assignments           │
//!  │  hub client (SA token):  │          │        (controller)                       │
//!  │   offers, heartbeats,    │          │ GpuOffer <name>.<node> (fleet: spec,      │
//!  │   own GpuFleet           │          │   health, heartbeat; label fleet=<name>)  │
//!  └──────────────────────────┘          └──────────────────────────────────────────┘
//! ```
//!
//! - **Join** ([`join`]): the hub admin applies the fleet's GpuFleet, a ServiceAccount
//!   `gpumarket-fleets/<name>` and RBAC reaching only that GpuFleet by name, plus creating and
//!   patching GpuOffers; the chart's `fleet-isolation` ValidatingAdmissionPolicy confines those
//!   writes to offers named `<name>.<node>` labelled `gpumarket.io/fleet=<name>` and keeps the
//!   fleet off what the controller owns. The ServiceAccount's token in a kubeconfig is the join
//!   credential (`kubectl create token -n gpumarket-fleets <name>`, or a token Secret).
//! - **Offers** ([`mirror`]): every heartbeat the fleet lists its Nodes and applies one
//!   offer-only GpuOffer per GPU node (allocatable `nvidia.com/gpu`, model and memory from GPU
//!   feature discovery's labels or gpumarket's), signed with the keypair of the GpuFleet's
//!   wallet as any supplier's offer is (the hub matches only offers signed by their wallet, and
//!   a fleet's offers only with its GpuFleet's wallet), heartbeats its status (GPUs unhealthy
//!   while the node is not Ready) and its GpuFleet (heartbeat and offer names).
//! - **Work** ([`workload`]): the controller lists each active lease placed on a fleet's offers
//!   in the GpuFleet's `status.assignments` with what running it needs; the fleet watches its
//!   GpuFleet (by name: it reads no lease, cluster or other fleet), runs each cluster's Ray head
//!   (a pod and its Service) and one worker pod per Ray worker on the node in its own cluster,
//!   the workers joining the head, removes what runs for leases no longer assigned, and
//!   reports workers and Ready workers per lease in `status.workloads`, with whether the head
//!   is Ready and its Service's dashboard and Ray client addresses in the fleet; from that
//!   the controller meters service (billing starts when the head and all workers are Ready)
//!   as it does from pods, and reports the GpuCluster Running (it applies no RayCluster).
//! - **Failure**: a silent fleet stops heartbeating its offers, so its leases end as supplier
//!   failures and the clusters are re-placed (in another fleet if needed) as for any node.

pub mod join;
pub mod mirror;
pub mod tunnel;
pub mod workload;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use gpumarket_crds::{FleetAssignment, FleetWorkload, GpuFleet, GpuOffer};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio_util::task::AbortOnDropHandle;

use crate::config::{ConfigError, Supplier, WalletKey};
use crate::offer::{Reserve, status_manifest};

/// Field manager of the fleet's writes on the hub and in the fleet.
pub const FIELD_MANAGER: &str = "gpumarket-fleet";
/// How long to wait before asking the hub for the GpuFleet again while it is missing.
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// What the fleet offers and how it runs its work.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Name of the fleet's GpuFleet on the hub.
    pub name: String,
    /// Keypair of the GpuFleet's wallet: it signs the fleet's offers.
    pub wallet_key: WalletKey,
    /// `MODEL=UNITS` prices per GPU-hour, as the agent's `--price`.
    pub prices: Vec<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    /// How often offers and the GpuFleet are heartbeated.
    pub heartbeat: Duration,
    /// How often the fleet's own worker pods are checked (a local read; the hub hears only of
    /// changes).
    pub workload_check: Duration,
    /// Namespace of the fleet's cluster the workers run in.
    pub namespace: String,
    pub reserve: Reserve,
    /// The hub's tunnel, through which buyers reach the Ray heads run here; none when `None`.
    pub tunnel: Option<tunnel::TunnelSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "the wallet of GpuFleet {fleet} on the hub is {wallet}, not the public key of the fleet's \
         wallet keypair ({keypair}): give the keypair of {wallet}, or have the hub admin set the \
         GpuFleet's wallet"
    )]
    WrongKeypair { fleet: String, wallet: String, keypair: String },
}

/// Joins the hub as fleet `config.name` and runs until the future is dropped. API errors (hub
/// or fleet) are logged and retried; only settings that cannot work end it.
pub async fn run(fleet: Client, hub: Client, config: FleetConfig) -> Result<(), FleetError> {
    let fleets: Api<GpuFleet> = Api::all(hub.clone());
    let joined = loop {
        match fleets.get(&config.name).await {
            Ok(joined) => break joined,
            Err(e) => {
                tracing::warn!(error = %e, fleet = %config.name, "reading the GpuFleet on the hub; retrying")
            }
        }
        tokio::time::sleep(JOIN_RETRY).await;
    };
    if joined.spec.wallet != config.wallet_key.public_key() {
        return Err(FleetError::WrongKeypair {
            fleet: config.name,
            wallet: joined.spec.wallet,
            keypair: config.wallet_key.public_key(),
        });
    }
    let supplier = Supplier::for_fleet(
        config.wallet_key.clone(),
        &config.prices,
        config.region.clone(),
        config.zone.clone(),
    )?;
    tracing::info!(fleet = %config.name, "joined the hub");
    let pods = Api::namespaced(fleet.clone(), &config.namespace);
    let services = Api::namespaced(fleet.clone(), &config.namespace);
    let (heads, heads_seen) = tokio::sync::watch::channel(tunnel::Heads::new());
    // Aborted when this future is dropped, as everything else the fleet runs.
    let _tunnel = config.tunnel.clone().map(|settings| {
        AbortOnDropHandle::new(tokio::spawn(tunnel::run(config.name.clone(), settings, heads_seen)))
    });
    let mut state = Runner {
        config,
        supplier,
        nodes: Api::all(fleet),
        pods,
        services,
        offers: Api::all(hub.clone()),
        fleets: fleets.clone(),
        applied: BTreeMap::new(),
        skipped: BTreeMap::new(),
        offer_names: Vec::new(),
        assignments: Vec::new(),
        workloads: Vec::new(),
        heads,
    };
    let selector =
        watcher::Config::default().fields(&format!("metadata.name={}", state.config.name));
    let mut own = std::pin::pin!(watcher(fleets, selector).default_backoff().applied_objects());
    let mut heartbeat = tokio::time::interval(state.config.heartbeat);
    let mut check = tokio::time::interval(state.config.workload_check);
    for ticks in [&mut heartbeat, &mut check] {
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                state.publish_offers().await;
                state.report(true).await;
            }
            _ = check.tick() => state.run_workloads().await,
            Some(event) = own.next() => match event {
                Ok(fleet) => {
                    state.assignments = fleet.status.map(|s| s.assignments).unwrap_or_default();
                    state.run_workloads().await;
                }
                Err(e) => tracing::warn!(error = %e, "watching the GpuFleet on the hub"),
            },
        }
    }
}

/// Creates `object` (a pod or Service the fleet runs for `lease`) unless `existing` has one of
/// its name.
async fn create_missing<K>(api: &Api<K>, object: Value, existing: &[K], lease: &str)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K: serde::Serialize,
{
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    if existing.iter().any(|o| o.name_any() == name) {
        return;
    }
    let created = match serde_json::from_value::<K>(object) {
        Ok(object) => api.create(&PostParams::default(), &object).await.map(drop),
        Err(e) => Err(kube::Error::SerdeError(e)),
    };
    let kind = K::kind(&());
    match created {
        Ok(()) => tracing::info!(%kind, %name, %lease, "started in the fleet"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => tracing::warn!(error = %e, %kind, %name, "starting in the fleet"),
    }
}

/// Deletes `name`, which the fleet ran for work no longer assigned to it.
async fn delete<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let kind = K::kind(&());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(%kind, %name, "removed: its work is no longer assigned here"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => tracing::warn!(error = %e, %kind, %name, "removing"),
    }
}

struct Runner {
    config: FleetConfig,
    supplier: Supplier,
    nodes: Api<Node>,
    pods: Api<Pod>,
    services: Api<Service>,
    offers: Api<GpuOffer>,
    fleets: Api<GpuFleet>,
    /// The offer last applied for each node, so an unchanged spec is not signed and sent again.
    applied: BTreeMap<String, Value>,
    /// Why each node is not offered, so the reason is logged once.
    skipped: BTreeMap<String, String>,
    offer_names: Vec<String>,
    assignments: Vec<FleetAssignment>,
    /// What the hub was last told.
    workloads: Vec<FleetWorkload>,
    /// The Ray heads run here, for the tunnel.
    heads: tokio::sync::watch::Sender<tunnel::Heads>,
}

impl Runner {
    /// Applies the offer of each GPU node whose spec changed and heartbeats every offer.
    async fn publish_offers(&mut self) {
        let nodes = match self.nodes.list(&ListParams::default()).await {
            Ok(nodes) => nodes.items,
            Err(e) => {
                tracing::warn!(error = %e, "listing the fleet's nodes; retrying");
                return;
            }
        };
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = Vec::new();
        for node in &nodes {
            let node_name = node.name_any();
            let (offer, inventory) = match mirror::fleet_offer(
                &self.config.name,
                &self.supplier,
                node,
                self.config.reserve,
            ) {
                Ok(offer) => offer,
                Err(why) => {
                    let why = why.to_string();
                    if self.skipped.get(&node_name) != Some(&why) {
                        tracing::info!(node = %node_name, %why, "node not offered");
                        self.skipped.insert(node_name, why);
                    }
                    continue;
                }
            };
            self.skipped.remove(&node_name);
            let name = gpumarket_crds::fleet_offer_name(&self.config.name, &node_name);
            if !mirror::unchanged(self.applied.get(&node_name), &offer) {
                match self.offers.patch(&name, &apply, &Patch::Apply(&offer)).await {
                    Ok(_) => {
                        tracing::info!(offer = %name, "offer published on the hub");
                        self.applied.insert(node_name.clone(), offer);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, offer = %name, "publishing the offer; retrying");
                        continue;
                    }
                }
            }
            let health = mirror::node_health(node, &inventory);
            let status = status_manifest(&health, jiff::Timestamp::now());
            if let Err(e) = self.offers.patch_status(&name, &apply, &Patch::Apply(&status)).await {
                tracing::warn!(error = %e, offer = %name, "heartbeat; retrying");
                // The offer may have been deleted on the hub: publish it again next time.
                self.applied.remove(&node_name);
            }
            names.push(name);
        }
        names.sort();
        self.offer_names = names;
    }

    /// Starts the heads and workers of new assignments, removes those of ended ones, and tells
    /// the hub when what runs has changed (or, with `heartbeat`, in any case).
    async fn run_workloads(&mut self) {
        let managed = ListParams::default().labels(&format!("{}=true", workload::MANAGED_LABEL));
        let (pods, services) = match tokio::try_join!(
            self.pods.list(&managed),
            self.services.list(&managed)
        ) {
            Ok((pods, services)) => (pods.items, services.items),
            Err(e) => {
                tracing::warn!(error = %e, "listing the fleet's Ray pods and Services; retrying");
                return;
            }
        };
        for pod in workload::stale(&self.assignments, &pods) {
            delete(&self.pods, &pod.name_any()).await;
        }
        for service in workload::stale(&self.assignments, &services) {
            delete(&self.services, &service.name_any()).await;
        }
        let mut heads = Vec::new();
        for assignment in &self.assignments {
            let Some(workers) =
                workload::worker_pods(&self.config.name, &self.config.namespace, assignment)
            else {
                continue;
            };
            // One head per cluster, however many of its leases are here.
            if !heads.contains(&&assignment.cluster.uid) {
                heads.push(&assignment.cluster.uid);
                let [head, service] = workload::head_objects(&self.config.namespace, assignment);
                create_missing(&self.services, service, &services, &assignment.lease).await;
                create_missing(&self.pods, head, &pods, &assignment.lease).await;
            }
            for pod in workers {
                create_missing(&self.pods, pod, &pods, &assignment.lease).await;
            }
        }
        self.heads.send_if_modified(|heads| {
            let now = workload::head_addresses(&self.assignments, &pods);
            let changed = *heads != now;
            *heads = now;
            changed
        });
        let workloads = workload::workloads(
            &self.config.name,
            &self.config.namespace,
            &self.assignments,
            &pods,
        );
        if workloads != self.workloads {
            self.workloads = workloads;
            self.report(false).await;
        }
    }

    /// The fleet's part of its GpuFleet status, all of it in each apply (what a field manager
    /// leaves out of an apply is removed).
    async fn report(&mut self, heartbeat: bool) {
        let status = json!({
            "apiVersion": "gpumarket.io/v1alpha1",
            "kind": "GpuFleet",
            "status": {
                "lastHeartbeat": Time(jiff::Timestamp::now()),
                "offers": self.offer_names,
                "workloads": self.workloads,
            },
        });
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        if let Err(e) =
            self.fleets.patch_status(&self.config.name, &apply, &Patch::Apply(&status)).await
        {
            tracing::warn!(error = %e, heartbeat, "reporting to the hub; retrying");
            // Reported again at the next check.
            self.workloads.clear();
        }
    }
}
