//! The GpuFleet controller: tells each fleet (a supplier cluster joined from outside, see the
//! agent's `fleet` module) the work placed on it, and whether it counts as joined.
//!
//! A fleet's credential reads only its own GpuFleet, so everything it needs to run the active
//! leases on its offers is copied into `status.assignments` (lease, offer, cluster, workers,
//! GPUs per worker, CPU and memory, image). The fleet runs the cluster's Ray head and workers in
//! its own cluster and reports back in `status.workloads`, from which [`fleet_service`] starts
//! the meter as Ready pods do for in-cluster nodes, and [`fleet_ray`] tells the GpuCluster's
//! readiness and access point as a RayCluster does for them.

pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gpumarket_crds::{
    FLEET_LABEL, FleetAssignment, FleetWorkload, GpuCluster, GpuFleet, GpuLease, GpuOffer,
    RayAccess,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::cluster::status::{is_active, set_condition};
use crate::error::{Error, Result};
use crate::raycluster::ray_image;
use crate::runtime::cache;
use crate::runtime::context::{Context, MANAGER};

pub const JOINED: &str = "Joined";
const CONTROLLER: &str = "gpufleet";

/// The fleet an offer belongs to, if it was published by one.
pub fn offer_fleet(offer: &GpuOffer) -> Option<&str> {
    offer.labels().get(FLEET_LABEL).map(String::as_str)
}

/// The active leases on fleet `fleet`'s offers, as the fleet runs them, in lease name order.
/// A lease whose cluster is not known (yet) is left out until it is.
pub fn assignments(
    fleet: &str,
    offers: &[Arc<GpuOffer>],
    leases: &[Arc<GpuLease>],
    clusters: &[Arc<GpuCluster>],
) -> Vec<FleetAssignment> {
    let ours = |offer: &str| {
        offers
            .iter()
            .any(|o| o.metadata.name.as_deref() == Some(offer) && offer_fleet(o) == Some(fleet))
    };
    let mut assigned: Vec<FleetAssignment> = leases
        .iter()
        .filter(|l| is_active(l) && ours(&l.spec.offer))
        .filter_map(|lease| {
            let cluster = clusters
                .iter()
                .find(|c| c.metadata.uid.as_deref() == Some(&lease.spec.cluster.uid))?;
            Some(FleetAssignment {
                lease: lease.name_any(),
                offer: lease.spec.offer.clone(),
                cluster: lease.spec.cluster.clone(),
                workers: lease.spec.workers,
                gpus_per_worker: cluster.spec.gpus_per_worker,
                worker_resources: lease.spec.worker_resources,
                image: ray_image(cluster),
            })
        })
        .collect();
    assigned.sort_by(|a, b| a.lease.cmp(&b.lease));
    assigned
}

/// Whether the fleet counts as joined: it heartbeated within `timeout`. As (status, reason,
/// message).
pub fn joined(fleet: &GpuFleet, now: Timestamp, timeout: Duration) -> (bool, &'static str, String) {
    let Some(beat) = fleet.status.as_ref().and_then(|s| s.last_heartbeat.as_ref()) else {
        return (false, "NeverJoined", "the fleet's agent has not reported yet: install it in the fleet with this fleet's join credential".into());
    };
    let age = now.duration_since(beat.0);
    if age.is_negative() || age.unsigned_abs() <= timeout {
        (true, "Heartbeating", format!("the fleet's agent reported at {}", beat.0))
    } else {
        (
            false,
            "Silent",
            format!(
                "no report from the fleet's agent since {} (more than {}s)",
                beat.0,
                timeout.as_secs()
            ),
        )
    }
}

/// Whether the fleet reports `lease` serving: its cluster's Ray head and all its workers Ready
/// (in-cluster workers are Ready only once their raylet joined the head).
fn serves(lease: &GpuLease, workload: Option<&FleetWorkload>) -> bool {
    workload.is_some_and(|w| w.head_ready && w.ready_workers >= lease.spec.workers)
}

/// The lease of a fleet with its start of service recorded once the fleet reports its Ray head
/// and all its workers Ready (a start already recorded never moves); `None` when nothing
/// changes.
pub fn fleet_service(
    lease: &GpuLease,
    workload: Option<&FleetWorkload>,
    now: Timestamp,
) -> Option<GpuLease> {
    if !serves(lease, workload) || lease.status.as_ref().is_some_and(|s| s.serving_since.is_some())
    {
        return None;
    }
    let mut next = lease.clone();
    next.metadata.managed_fields = None;
    next.status.get_or_insert_default().serving_since =
        Some(Time(now.max(lease.spec.start_time.0)));
    Some(next)
}

/// How a cluster runs in `fleet` (`None`: not in the cache), from its report on the cluster's
/// `active` leases there: ready once they all serve, and where the buyer reaches its Ray head.
pub fn fleet_ray(fleet: Option<&GpuFleet>, active: &[&GpuLease]) -> (bool, Option<RayAccess>) {
    let reports: Vec<(&GpuLease, Option<&FleetWorkload>)> = active
        .iter()
        .map(|lease| (*lease, fleet.and_then(|f| f.workload(&lease.name_any()))))
        .collect();
    let ready = !reports.is_empty() && reports.iter().all(|(lease, w)| serves(lease, *w));
    let access = reports.iter().find_map(|(_, w)| w.and_then(|w| w.access.clone()));
    (ready, access)
}

async fn reconcile(fleet: Arc<GpuFleet>, ctx: Arc<Context>) -> Result<Action> {
    let now = Timestamp::now();
    let name = fleet.name_any();
    let assigned =
        assignments(&name, &ctx.offers.state(), &ctx.leases.state(), &ctx.clusters.state());
    let (ok, reason, message) = joined(&fleet, now, ctx.settings.heartbeat_timeout);
    let mut conditions = fleet.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let generation = fleet.meta().generation;
    set_condition(&mut conditions, JOINED, ok, reason, message, now, generation);
    let current = fleet.status.as_ref();
    if current.map(|s| &s.assignments) != Some(&assigned)
        || current.map(|s| &s.conditions) != Some(&conditions)
    {
        let status = json!({
            "apiVersion": "gpumarket.io/v1alpha1",
            "kind": "GpuFleet",
            "status": {"conditions": conditions, "assignments": assigned},
        });
        Api::<GpuFleet>::all(ctx.client.clone())
            .patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&status))
            .await?;
    }
    // Looked at again when a heartbeat would go stale.
    Ok(Action::requeue(ctx.settings.heartbeat_timeout / 2))
}

fn error_policy(fleet: Arc<GpuFleet>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.with_label_values(&[CONTROLLER, error.metric_label()]).inc();
    tracing::warn!(fleet = %fleet.name_any(), %error, "fleet reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the GpuFleet controller: triggered by its GpuFleets and by the leases on their offers.
pub async fn run(ctx: Arc<Context>) {
    let offers = ctx.offers.clone();
    let fleet_of_lease = move |lease: GpuLease| {
        let offer = offers.get(&ObjectRef::new(&lease.spec.offer))?;
        offer_fleet(&offer).map(ObjectRef::new)
    };
    cache::controller::<GpuFleet>(&ctx.client, watcher::Config::default())
        .watches(
            Api::<GpuLease>::all(ctx.client.clone()),
            watcher::Config::default(),
            fleet_of_lease,
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "gpufleet reconcile");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use gpumarket_crds::GpuFleetStatus;

    use super::*;
    use crate::testing::{mk_cluster, mk_lease, mk_offer, now};

    fn in_fleet(mut offer: GpuOffer, fleet: &str) -> Arc<GpuOffer> {
        offer.metadata.labels.get_or_insert_default().insert(FLEET_LABEL.into(), fleet.into());
        Arc::new(offer)
    }

    #[test]
    fn a_fleet_is_assigned_only_the_active_leases_on_its_own_offers() {
        let llm = mk_cluster("llm", 2, 2);
        let stranger = mk_cluster("gone", 1, 1);
        let offers = [
            in_fleet(mk_offer("fleet-a.n1", "H100", 4, now()), "fleet-a"),
            in_fleet(mk_offer("fleet-b.n1", "H100", 4, now()), "fleet-b"),
            Arc::new(mk_offer("hub-node", "H100", 4, now())),
        ];
        let mut ended = mk_lease(&llm, "fleet-a.n1", &["GPU-3"], 1);
        ended.metadata.name = Some("llm-ended".into());
        ended.status.get_or_insert_default().phase = Some(gpumarket_crds::LeasePhase::Ended);
        let on_a = mk_lease(&llm, "fleet-a.n1", &["GPU-0", "GPU-1"], 1);
        let leases: Vec<Arc<GpuLease>> = [
            on_a.clone(),
            mk_lease(&llm, "fleet-b.n1", &["GPU-0"], 1),
            mk_lease(&llm, "hub-node", &["GPU-0"], 1),
            ended,
            // Its cluster is not in the cache (yet).
            mk_lease(&stranger, "fleet-a.n1", &["GPU-2"], 1),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let assigned = assignments("fleet-a", &offers, &leases, &[Arc::new(llm)]);
        let names: Vec<String> = assigned.iter().map(|a| a.lease.clone()).collect();
        assert_eq!(names, [on_a.name_any()]);
        assert_eq!(assigned[0].gpus_per_worker, 2);
        assert_eq!(assigned[0].offer, "fleet-a.n1");
        assert_eq!(assigned[0].cluster.name, "llm");
        assert!(assigned[0].image.starts_with("rayproject/ray:"), "{}", assigned[0].image);
    }

    #[test]
    fn a_fleet_is_joined_while_it_heartbeats() {
        let timeout = Duration::from_secs(30);
        let mut fleet =
            GpuFleet::new("fleet-a", gpumarket_crds::GpuFleetSpec { wallet: "w".into() });
        assert_eq!(joined(&fleet, now(), timeout).1, "NeverJoined");
        fleet.status =
            Some(GpuFleetStatus { last_heartbeat: Some(Time(now())), ..Default::default() });
        assert!(joined(&fleet, now(), timeout).0);
        let later = now() + jiff::SignedDuration::from_secs(31);
        assert_eq!(joined(&fleet, later, timeout).1, "Silent");
    }

    #[test]
    fn service_starts_when_the_fleet_reports_every_worker_ready_and_never_moves() {
        let lease = mk_lease(&mk_cluster("llm", 2, 1), "fleet-a.n1", &["GPU-0", "GPU-1"], 2);
        let report = |ready, head_ready| FleetWorkload {
            lease: lease.name_any(),
            workers: 2,
            ready_workers: ready,
            message: None,
            head_ready,
            access: None,
        };
        assert!(fleet_service(&lease, None, now()).is_none());
        assert!(fleet_service(&lease, Some(&report(1, true)), now()).is_none());
        assert!(fleet_service(&lease, Some(&report(2, false)), now()).is_none(), "no head");
        let serving = fleet_service(&lease, Some(&report(2, true)), now()).expect("serves");
        let since = serving.status.as_ref().and_then(|s| s.serving_since.clone());
        assert_eq!(since, Some(Time(now().max(lease.spec.start_time.0))));
        assert!(fleet_service(&serving, Some(&report(2, true)), now()).is_none());
    }

    #[test]
    fn a_cluster_in_a_fleet_is_ready_once_its_head_and_every_lease_serve_there() {
        let cluster = mk_cluster("llm", 2, 1);
        let (a, b) = (
            mk_lease(&cluster, "fleet-a.n1", &["GPU-0"], 1),
            mk_lease(&cluster, "fleet-a.n2", &["GPU-0"], 1),
        );
        let access = RayAccess {
            dashboard: "http://ray-head-u.market.svc:8265".into(),
            ray_client: "ray://ray-head-u.market.svc:10001".into(),
        };
        let report = |lease: &GpuLease, ready_workers, head_ready| FleetWorkload {
            lease: lease.name_any(),
            workers: 1,
            ready_workers,
            message: None,
            head_ready,
            access: Some(access.clone()),
        };
        let mut fleet =
            GpuFleet::new("fleet-a", gpumarket_crds::GpuFleetSpec { wallet: "w".into() });
        assert_eq!(fleet_ray(None, &[&a, &b]), (false, None), "not in the cache");
        assert_eq!(fleet_ray(Some(&fleet), &[&a, &b]), (false, None), "nothing reported");
        let status = fleet.status.get_or_insert_default();
        status.workloads = vec![report(&a, 1, true), report(&b, 0, true)];
        assert_eq!(fleet_ray(Some(&fleet), &[&a, &b]), (false, Some(access.clone())));
        let status = fleet.status.get_or_insert_default();
        status.workloads = vec![report(&a, 1, true), report(&b, 1, false)];
        assert!(!fleet_ray(Some(&fleet), &[&a, &b]).0, "the head is not Ready");
        let status = fleet.status.get_or_insert_default();
        status.workloads = vec![report(&a, 1, true), report(&b, 1, true)];
        assert_eq!(fleet_ray(Some(&fleet), &[&a, &b]), (true, Some(access)));
        assert!(!fleet_ray(Some(&fleet), &[]).0, "no lease, nothing runs");
    }
}
