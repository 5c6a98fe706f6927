//! The GpuCluster controller: owns the cluster's GpuLeases and its RayCluster.

pub mod lease_view;
pub mod pod_trouble;
pub mod reconcile;
pub mod status;
pub mod validate;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use gpumarket_crds::{GpuCluster, GpuFleet, GpuLease, GpuOffer};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, watcher};

use crate::market::supply::{free_gpus, placed_workers};
use crate::raycluster;
use crate::runtime::cache;
use crate::runtime::context::Context;

/// Events for one cluster closer together than this make one reconcile.
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(250);

/// Build the controller: triggered by its GpuClusters, their RayClusters, their leases, and
/// offers (see `clusters_affected_by`).
pub fn controller(ctx: &Arc<Context>) -> Controller<GpuCluster> {
    let client = ctx.client.clone();
    // Binding a cluster writes its leases (create, then status) and its RayCluster, each of
    // which triggers it again: a short debounce makes one reconcile of such a burst.
    let controller = cache::controller::<GpuCluster>(&client, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().debounce(DEBOUNCE));
    let clusters = controller.store();
    let lease_store = ctx.leases.clone();
    let seen = Mutex::new(HashMap::new());
    let offers = watcher(Api::<GpuOffer>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .predicate_filter(offer_market_state, PredicateConfig::default());
    controller
        .owns_with(
            Api::<DynamicObject>::all_with(client.clone(), &raycluster::api_resource()),
            raycluster::api_resource(),
            watcher::Config::default(),
        )
        .watches(Api::<GpuLease>::all(client.clone()), watcher::Config::default(), |lease| {
            Some(ObjectRef::new(&lease.spec.cluster.name).within(&lease.spec.cluster.namespace))
        })
        // Worker pods becoming Ready start the meter.
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(raycluster::CLUSTER_LABEL),
            |pod| {
                let cluster = pod.labels().get(raycluster::CLUSTER_LABEL)?;
                Some(ObjectRef::new(cluster).within(&pod.namespace()?))
            },
        )
        // A fleet reporting its workers Ready starts the meter of the leases it runs.
        .watches(Api::<GpuFleet>::all(client), watcher::Config::default(), |fleet| {
            let assigned = fleet.status.map(|s| s.assignments).unwrap_or_default();
            assigned
                .into_iter()
                .map(|a| ObjectRef::new(&a.cluster.name).within(&a.cluster.namespace))
        })
        .watches_stream(offers, move |offer| {
            let grew = supply_grew(&seen, &offer);
            clusters_affected_by(&offer, grew, &clusters, &lease_store)
        })
}

/// Hash of what matters to clusters about an offer: its spec, availability, per-GPU health
/// and allocation, and its stake. Heartbeats alone do not wake every pending cluster.
fn offer_market_state(offer: &GpuOffer) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    offer.metadata.generation.hash(&mut hasher);
    offer.is_available().hash(&mut hasher);
    crate::verification::admitted(offer).hash(&mut hasher);
    if let Some(status) = &offer.status {
        for gpu in &status.gpus {
            (&gpu.uuid, gpu.health.map(|h| h == gpumarket_crds::GpuHealth::Healthy), &gpu.lease)
                .hash(&mut hasher);
        }
        offer.bonded_stake().hash(&mut hasher);
        offer.unbonding().hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// Whether the offer has more matchable GPUs (it became available or verified), or more stake
/// (it may now be admitted), than when last seen (`seen` remembers).
fn supply_grew(seen: &Mutex<HashMap<String, (usize, u64)>>, offer: &GpuOffer) -> bool {
    let matchable = offer.is_available() && crate::verification::admitted(offer);
    let free = if matchable { free_gpus(offer).len() } else { 0 };
    let stake = offer.bonded_stake();
    let mut seen = match seen.lock() {
        Ok(seen) => seen,
        Err(poisoned) => poisoned.into_inner(),
    };
    let (free_before, stake_before) =
        seen.insert(offer.name_any(), (free, stake)).unwrap_or_default();
    free > free_before || (free > 0 && stake > stake_before)
}

/// A change to an offer concerns the clusters leasing from it (failure, recovery) and, when it
/// brings more free GPUs, every cluster still looking for GPUs: those whose status says so, and
/// started ones whose leases are short of their workers while their status is not written yet
/// (a reconcile that matched on the supply just before it grew may be writing it now).
fn clusters_affected_by(
    offer: &GpuOffer,
    supply_grew: bool,
    clusters: &Store<GpuCluster>,
    leases: &Store<GpuLease>,
) -> Vec<ObjectRef<GpuCluster>> {
    let node = offer.spec.node_name.as_str();
    let leases = leases.state();
    let mut refs: Vec<ObjectRef<GpuCluster>> = leases
        .iter()
        .filter(|l| l.spec.offer == node && status::is_active(l))
        .map(|l| ObjectRef::new(&l.spec.cluster.name).within(&l.spec.cluster.namespace))
        .collect();
    if supply_grew {
        let placed = placed_workers(leases.iter().map(AsRef::as_ref));
        refs.extend(
            clusters
                .state()
                .iter()
                .filter(|c| status::wants_supply(c) || status::short_of_workers(c, &placed))
                .map(|c| ObjectRef::from(c.as_ref())),
        );
    }
    refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    refs.dedup();
    refs
}

/// Run the controller until the stream ends.
pub async fn run(controller: Controller<GpuCluster>, ctx: Arc<Context>) {
    controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "gpucluster reconcile");
            }
        })
        .await;
}
