//! Pure computations of a GpuCluster's lifecycle: when it expires, which leases a supplier
//! failure has cost it, which phase it is in and the status that says so.

use std::collections::HashMap;
use std::time::Duration;

use gpumarket_crds::{
    ClusterPhase, EndReason, GpuCluster, GpuClusterStatus, GpuLease, GpuOffer, LeasePhase,
    LeasePod, RayAccess,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::cluster::pod_trouble::PodTrouble;
use crate::raycluster::LEASE_ANNOTATION;

use crate::market::supply::{gpu_healthy, heartbeat_fresh};
use crate::settlement::meter::{Meter, Paid};

pub const MATCHED: &str = "Matched";
pub const FUNDED: &str = "Funded";
pub const RAY_READY: &str = "RayReady";
pub const DEGRADED: &str = "Degraded";

/// When the cluster's duration runs out: start time + duration, once it has started.
pub fn expires_at(cluster: &GpuCluster) -> Option<Timestamp> {
    let start = cluster.status.as_ref()?.start_time.as_ref()?.0;
    let duration = jiff::SignedDuration::try_from(cluster.spec.duration().ok()?).ok()?;
    start.checked_add(duration).ok()
}

/// What a lease has cost through `t`: its meter, and never less than what was already paid for
/// it (a payout may run through a time after `t`, which the status rounds down to the minute),
/// so that the cost a buyer reads is never below what was charged.
pub fn lease_cost(lease: &GpuLease, t: Timestamp) -> u64 {
    Meter::of(lease).cost_through(t).max(Paid::of(lease).confirmed())
}

/// Whether a lease is still metering.
pub fn is_active(lease: &GpuLease) -> bool {
    lease.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == LeasePhase::Active
}

/// Whether the cluster is looking for GPUs: pending or running short of workers (degraded),
/// not ended, not being deleted, and not waiting for its deposit.
pub fn wants_supply(cluster: &GpuCluster) -> bool {
    if cluster.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &cluster.status else { return true };
    let condition = |type_: &str, value: &str| {
        status.conditions.iter().any(|c| c.type_ == type_ && c.status == value)
    };
    if condition(FUNDED, "False") {
        return false;
    }
    match status.phase.unwrap_or_default() {
        ClusterPhase::Pending => true,
        ClusterPhase::Completed | ClusterPhase::Failed | ClusterPhase::Expiring => false,
        _ => condition(DEGRADED, "True"),
    }
}

/// Whether `cluster` has started (Provisioning or Running) and its active leases, as `placed`
/// counts them by cluster uid, hold fewer workers than it asks for: it lost some.
pub fn short_of_workers(cluster: &GpuCluster, placed: &HashMap<&str, u32>) -> bool {
    let started = matches!(
        cluster.status.as_ref().and_then(|s| s.phase),
        Some(ClusterPhase::Provisioning | ClusterPhase::Running)
    );
    let uid = cluster.metadata.uid.as_deref().unwrap_or_default();
    started
        && cluster.metadata.deletion_timestamp.is_none()
        && placed.get(uid).copied().unwrap_or(0) < cluster.spec.workers
}

/// How a cluster ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ending {
    /// Given to the leases still active.
    pub lease_reason: EndReason,
    /// `Completed` or `Failed`.
    pub phase: ClusterPhase,
    /// Event and condition reason.
    pub reason: &'static str,
    pub message: String,
}

/// Whether the cluster is over, and how: its duration ran out (Completed), settlement ended
/// a lease because the escrow ran dry (Failed: its workers are not re-placed, nobody would pay
/// for them), or the buyer's pods cannot start before any lease served (Failed: no supplier
/// could run them; nothing billed, no supplier blamed).
pub fn ending(
    cluster: &GpuCluster,
    leases: &[GpuLease],
    trouble: Option<&PodTrouble>,
    now: Timestamp,
) -> Option<Ending> {
    if let Some(at) = expires_at(cluster).filter(|at| *at <= now) {
        return Some(Ending {
            lease_reason: EndReason::Expired,
            phase: ClusterPhase::Completed,
            reason: "Expired",
            message: format!("ran its duration {} (until {at})", cluster.spec.duration),
        });
    }
    let served =
        leases.iter().any(|l| l.status.as_ref().is_some_and(|s| s.serving_since.is_some()));
    if let Some(trouble) = trouble.filter(|t| t.buyers && !served) {
        return Some(Ending {
            lease_reason: EndReason::WorkloadFailed,
            phase: ClusterPhase::Failed,
            reason: trouble.reason,
            message: format!(
                "{}; nothing was billed: apply the GpuCluster again once that is fixed",
                trouble.message
            ),
        });
    }
    let dry = leases
        .iter()
        .find(|l| l.status.as_ref().and_then(|s| s.end_reason) == Some(EndReason::OutOfFunds))?;
    Some(Ending {
        lease_reason: EndReason::OutOfFunds,
        phase: ClusterPhase::Failed,
        reason: "OutOfFunds",
        message: format!(
            "escrow exhausted: lease {} ended OutOfFunds; deposit more for a new cluster",
            dry.metadata.name.as_deref().unwrap_or_default()
        ),
    })
}

/// Why an active lease can no longer serve, and until when it is known to have served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupplierFailure {
    pub why: String,
    /// The end of its meter: the node's last heartbeat when it went silent (the buyer pays
    /// nothing for the silence), else now.
    pub served_until: Timestamp,
}

/// The lease's supplier failure: its offer is gone, its heartbeat is stale, or one of its GPUs
/// is unhealthy. `None` while the lease is fine.
pub fn supplier_failure(
    lease: &GpuLease,
    offer: Option<&GpuOffer>,
    now: Timestamp,
    heartbeat_timeout: Duration,
) -> Option<SupplierFailure> {
    let failure = |why: String| Some(SupplierFailure { why, served_until: now });
    let Some(offer) = offer else {
        return failure(format!("offer {} was withdrawn", lease.spec.offer));
    };
    if !heartbeat_fresh(offer, now, heartbeat_timeout) {
        let last = offer.status.as_ref().and_then(|s| s.last_heartbeat.as_ref()).map(|t| t.0);
        return Some(SupplierFailure {
            why: format!("node {} stopped heartbeating", lease.spec.offer),
            served_until: last.map_or(now, |last| last.min(now)),
        });
    }
    let sick: Vec<&str> =
        lease.spec.gpus.iter().filter(|g| !gpu_healthy(offer, g)).map(String::as_str).collect();
    if sick.is_empty() {
        return None;
    }
    failure(format!("GPU {} on node {} is unhealthy", sick.join(", "), lease.spec.offer))
}

/// The worker pods serving `lease` among `pods` (the cluster's): those KubeRay made for it
/// (owned by a RayCluster, annotated with the lease), bound to the lease's node and not
/// finished, oldest first, at most the lease's workers.
pub fn lease_pods<'a>(lease: &GpuLease, pods: &[&'a Pod]) -> Vec<&'a Pod> {
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    let mut serving: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| p.annotations().get(LEASE_ANNOTATION).map(String::as_str) == Some(name))
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&lease.spec.offer))
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.kind == "RayCluster" && o.controller == Some(true))
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .collect();
    serving.sort_by(|a, b| {
        (a.metadata.creation_timestamp.as_ref().map(|t| t.0), &a.metadata.name)
            .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), &b.metadata.name))
    });
    serving.truncate(lease.spec.workers as usize);
    serving
}

/// Worker pods of this cluster's leases that have ended. KubeRay leaves running the pods of a
/// worker group taken out of the RayCluster: they would keep the supplier's GPUs after the
/// lease (and its billing) ended, and keep the next lease on those GPUs from starting.
pub fn stale_worker_pods<'a>(leases: &[GpuLease], pods: &[&'a Pod]) -> Vec<&'a Pod> {
    let ended: Vec<&str> = leases
        .iter()
        .filter(|l| !is_active(l))
        .filter_map(|l| l.metadata.name.as_deref())
        .collect();
    pods.iter()
        .copied()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.annotations().get(LEASE_ANNOTATION).is_some_and(|l| ended.contains(&l.as_str()))
        })
        .collect()
}

/// When a pod last became Ready, if it is Ready.
fn ready_since(pod: &Pod) -> Option<Timestamp> {
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(ready.last_transition_time.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0))
}

/// When the lease began serving: once every one of its workers is Ready, the moment the last of
/// them became Ready (never before the bind, never after `now`). `None` while any is not.
pub fn serving_since(lease: &GpuLease, serving: &[&Pod], now: Timestamp) -> Option<Timestamp> {
    if serving.len() < lease.spec.workers as usize {
        return None;
    }
    let all_ready = serving.iter().map(|p| ready_since(p)).collect::<Option<Vec<_>>>()?;
    let last = all_ready.into_iter().max()?;
    Some(last.max(lease.spec.start_time.0).min(now))
}

/// The lease with the worker pods seen and, once it serves, its start of service recorded (a
/// start already recorded never moves); `None` when nothing changed.
pub fn with_service(lease: &GpuLease, serving: &[&Pod], now: Timestamp) -> Option<GpuLease> {
    let pods: Vec<LeasePod> = serving
        .iter()
        .map(|p| LeasePod {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            uid: p.uid().unwrap_or_default(),
            ready: ready_since(p).is_some(),
        })
        .collect();
    let status = lease.status.clone().unwrap_or_default();
    let since =
        status.serving_since.clone().or_else(|| serving_since(lease, serving, now).map(Time));
    if status.pods == pods && status.serving_since == since {
        return None;
    }
    let mut next = lease.clone();
    next.metadata.managed_fields = None;
    let status = next.status.get_or_insert_default();
    status.pods = pods;
    status.serving_since = since;
    Some(next)
}

/// Worker pods `before` recorded as serving the lease that `after` no longer does (deleted,
/// evicted or failed): their Ray tasks are gone, and KubeRay starts new pods on the lease's node.
pub fn lost_pods(before: &GpuLease, after: &GpuLease) -> Vec<String> {
    let recorded = |l: &GpuLease| l.status.as_ref().map(|s| s.pods.clone()).unwrap_or_default();
    let now: Vec<String> = recorded(after).into_iter().map(|p| p.uid).collect();
    recorded(before).into_iter().filter(|p| !now.contains(&p.uid)).map(|p| p.name).collect()
}

/// Whether an active lease has failed to serve within the provisioning timeout of its bind.
pub fn not_serving(lease: &GpuLease, now: Timestamp, timeout: Duration) -> bool {
    let serving = lease.status.as_ref().is_some_and(|s| s.serving_since.is_some());
    let waited = now.duration_since(lease.spec.start_time.0);
    !serving && is_active(lease) && waited.is_positive() && waited.unsigned_abs() > timeout
}

/// Workers still to be placed: the spec's count minus those of the active leases.
pub fn missing_workers(cluster: &GpuCluster, active: &[&GpuLease]) -> u32 {
    let placed: u32 = active.iter().map(|l| l.spec.workers).sum();
    cluster.spec.workers.saturating_sub(placed)
}

/// Active leases beyond what the spec asks for, newest first, each only if the rest still
/// hold every worker.
pub fn surplus_leases<'a>(cluster: &GpuCluster, active: &[&'a GpuLease]) -> Vec<&'a GpuLease> {
    let mut newest_first = active.to_vec();
    newest_first.sort_by(|a, b| {
        (b.spec.start_time.0, &b.metadata.name).cmp(&(a.spec.start_time.0, &a.metadata.name))
    });
    let mut placed: u32 = active.iter().map(|l| l.spec.workers).sum();
    newest_first
        .into_iter()
        .filter(|lease| {
            let surplus = placed - lease.spec.workers >= cluster.spec.workers;
            if surplus {
                placed -= lease.spec.workers;
            }
            surplus
        })
        .collect()
}

/// The lease ended at `at` for `reason`, with its meter closed (hired and served GPU-seconds),
/// to be written; never before what its payments, landed or in flight, already cover. `None`
/// when it has already ended (an ended meter never moves).
pub fn ended_lease(lease: &GpuLease, reason: EndReason, at: Timestamp) -> Option<GpuLease> {
    if lease.status.as_ref().is_some_and(|s| s.end_time.is_some()) {
        return None;
    }
    let end = Paid::of(lease).committed_through().map_or(at, |paid| paid.max(at));
    let mut ended = lease.clone();
    ended.metadata.managed_fields = None;
    let status = ended.status.get_or_insert_default();
    status.phase = Some(LeasePhase::Ended);
    status.end_time = Some(Time(end));
    status.end_reason = Some(reason);
    let meter = Meter::of(&ended);
    let status = ended.status.get_or_insert_default();
    status.served_gpu_seconds = Some(meter.gpu_seconds_through(end));
    status.hired_gpu_seconds = Some(meter.hired_gpu_seconds_through(end));
    Some(ended)
}

/// What the reconcile saw, for `build_status`.
#[derive(Debug)]
pub struct Observation<'a> {
    pub cluster: &'a GpuCluster,
    /// Every lease of the cluster, active or ended.
    pub leases: &'a [&'a GpuLease],
    /// `None` while no Ray head exists (no RayCluster, no fleet running it); otherwise whether
    /// the cluster's Ray is ready.
    pub ray_ready: Option<bool>,
    /// Where its Ray runs and is reached.
    pub ray: RaySite,
    /// The matching engine's explanation when the (remaining) workers found no supply.
    pub unmatched: Option<String>,
    /// Outcome of the deposit check, when settlement is on: `Ok(message)` when the escrow
    /// covers the cluster, `Err(message)` when it is short.
    pub funding: Option<Result<String, String>>,
    /// Why the Ray pods are not starting, if they are not.
    pub pod_trouble: Option<&'a PodTrouble>,
    pub now: Timestamp,
}

/// Where a cluster's Ray runs: a RayCluster of the hub, or a fleet's own cluster; and where the
/// buyer reaches its head.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RaySite {
    pub ray_cluster: Option<String>,
    pub fleet: Option<String>,
    pub access: Option<RayAccess>,
    /// `access` is the hub's gateway to the head in `fleet`, not the fleet's own address.
    pub through_hub: bool,
}

impl RaySite {
    /// What runs the Ray head, for the RayReady condition.
    fn head(&self) -> String {
        match &self.fleet {
            Some(fleet) => format!("the Ray head in fleet {fleet}'s cluster"),
            None => "the RayCluster".into(),
        }
    }
}

/// Phase of a cluster that has not ended: by what exists so far.
pub fn live_phase(active_leases: usize, ray_ready: Option<bool>) -> ClusterPhase {
    match (active_leases, ray_ready) {
        (0, None) => ClusterPhase::Pending,
        (_, None) => ClusterPhase::Matched,
        (_, Some(false)) => ClusterPhase::Provisioning,
        (_, Some(true)) => ClusterPhase::Running,
    }
}

/// The status of a cluster that has not ended.
pub fn build_status(obs: &Observation<'_>) -> GpuClusterStatus {
    let cluster = obs.cluster;
    let previous = cluster.status.clone().unwrap_or_default();
    let active: Vec<&GpuLease> = obs.leases.iter().copied().filter(|l| is_active(l)).collect();
    let started = previous.start_time.is_some() || !active.is_empty();
    let phase = if started && active.is_empty() && obs.ray_ready.is_none() {
        // Every worker lost and nothing to replace it with: still the same cluster, degraded.
        ClusterPhase::Provisioning
    } else {
        live_phase(active.len(), obs.ray_ready)
    };
    let missing = missing_workers(cluster, &active);
    let gpus: u32 = active.iter().map(|l| l.spec.gpus.len() as u32).sum();
    let hourly_rate: u64 =
        active.iter().map(|l| l.spec.price_per_gpu_hour * l.spec.gpus.len() as u64).sum();
    // Accrued cost moves in whole minutes: a status that changed on every reconcile would
    // trigger the next reconcile through its own watch event.
    let meter_time =
        Timestamp::from_second(obs.now.as_second() - obs.now.as_second().rem_euclid(60))
            .unwrap_or(obs.now);
    let cost: u64 = obs.leases.iter().map(|l| lease_cost(l, meter_time)).sum();
    let start_time = previous
        .start_time
        .clone()
        .or_else(|| active.iter().map(|l| l.spec.start_time.clone()).min_by_key(|t| t.0));

    let mut conditions = previous.conditions.clone();
    let generation = cluster.metadata.generation;
    let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
        set_condition(&mut conditions, type_, ok, reason, message, obs.now, generation);
    };
    match (&obs.unmatched, started) {
        (Some(why), false) => set(MATCHED, false, "NoMatchingSupply", why.clone()),
        (None, false) => set(MATCHED, false, "Matching", "looking for GPUs".into()),
        (_, true) => set(
            MATCHED,
            true,
            "Bound",
            format!("{gpus} GPUs bound through {} leases", active.len()),
        ),
    }
    match &obs.funding {
        Some(Ok(message)) => set(FUNDED, true, "DepositCovers", message.clone()),
        Some(Err(why)) => set(FUNDED, false, "DepositShort", why.clone()),
        None => {}
    }
    let waiting_for = match &obs.ray.fleet {
        Some(fleet) => format!("fleet {fleet} to report its Ray head and workers Ready"),
        None => "KubeRay to start the pods".into(),
    };
    match obs.ray_ready {
        Some(true) => set(RAY_READY, true, "Ready", format!("{} is ready", obs.ray.head())),
        Some(false) => match obs.pod_trouble {
            Some(trouble) => set(RAY_READY, false, trouble.reason, trouble.message.clone()),
            None => set(RAY_READY, false, "Provisioning", format!("waiting for {waiting_for}")),
        },
        None => set(
            RAY_READY,
            false,
            "NoRayCluster",
            "the RayCluster is created once GPUs are bound".into(),
        ),
    }
    if started && missing > 0 {
        let why = obs.unmatched.clone().unwrap_or_else(|| "looking for replacement GPUs".into());
        set(
            DEGRADED,
            true,
            "MissingWorkers",
            format!("{missing} of {} workers have no GPUs: {why}", cluster.spec.workers),
        );
    } else if started {
        set(
            DEGRADED,
            false,
            "AllWorkersPlaced",
            format!("all {} workers have GPUs", cluster.spec.workers),
        );
    }

    GpuClusterStatus {
        phase: Some(phase),
        conditions,
        leases: active.iter().filter_map(|l| l.metadata.name.clone()).collect(),
        gpus: Some(gpus),
        ray_cluster: obs.ray.ray_cluster.clone(),
        dashboard: obs.ray.access.as_ref().map(|a| a.dashboard.clone()),
        ray_client: obs.ray.access.as_ref().map(|a| a.ray_client.clone()),
        fleet: obs.ray.fleet.clone(),
        through_hub: obs.ray.through_hub.then_some(true),
        hourly_rate: Some(hourly_rate),
        start_time,
        cost_accrued: Some(cost),
        // Settlement's totals are written by settlement alone: carried here from a cached
        // object they would overwrite newer values (this status is applied with force).
        amount_settled: None,
        amount_refunded: None,
        escrow: None,
        observed_generation: generation,
    }
}

/// The status of a cluster that has ended (`Completed` or `Failed`): no leases, no RayCluster.
pub fn ended_status(
    cluster: &GpuCluster,
    leases: &[&GpuLease],
    phase: ClusterPhase,
    reason: &str,
    message: String,
    now: Timestamp,
) -> GpuClusterStatus {
    let previous = cluster.status.clone().unwrap_or_default();
    let mut conditions = previous.conditions.clone();
    let generation = cluster.metadata.generation;
    set_condition(&mut conditions, RAY_READY, false, reason, message.clone(), now, generation);
    if phase == ClusterPhase::Failed {
        set_condition(&mut conditions, MATCHED, false, reason, message, now, generation);
    }
    let cost: u64 = leases.iter().map(|l| lease_cost(l, now)).sum();
    GpuClusterStatus {
        phase: Some(phase),
        conditions,
        leases: Vec::new(),
        gpus: Some(0),
        ray_cluster: None,
        dashboard: None,
        ray_client: None,
        fleet: None,
        through_hub: None,
        hourly_rate: Some(0),
        start_time: previous.start_time,
        cost_accrued: Some(cost),
        // Settlement's totals are written by settlement alone: carried here from a cached
        // object they would overwrite newer values (this status is applied with force).
        amount_settled: None,
        amount_refunded: None,
        escrow: None,
        observed_generation: generation,
    }
}

/// Set a condition, keeping its transition time when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    now: Timestamp,
    generation: Option<i64>,
) {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    conditions.retain(|c| c.type_ != type_);
    conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    });
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease, mk_offer, now};
    use gpumarket_crds::{GpuHealth, GpuLeaseStatus, GpuState, SettlementRecord, SettlementState};

    fn cond<'a>(s: &'a GpuClusterStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).expect("condition present")
    }

    fn obs<'a>(
        cluster: &'a GpuCluster,
        leases: &'a [&'a GpuLease],
        ray_ready: Option<bool>,
    ) -> Observation<'a> {
        Observation {
            cluster,
            leases,
            ray_ready,
            ray: RaySite::default(),
            unmatched: None,
            funding: None,
            pod_trouble: None,
            now: now(),
        }
    }

    #[test]
    fn pending_and_degraded_clusters_want_supply_unless_unfunded_or_over() {
        let mut cluster = mk_cluster("c", 2, 1);
        assert!(wants_supply(&cluster), "new");
        let with = |phase, conditions: &[(&str, &str)]| GpuClusterStatus {
            phase: Some(phase),
            conditions: conditions
                .iter()
                .map(|(t, s)| Condition {
                    type_: (*t).into(),
                    status: (*s).into(),
                    reason: "R".into(),
                    message: String::new(),
                    last_transition_time: Time(now()),
                    observed_generation: None,
                })
                .collect(),
            ..GpuClusterStatus::default()
        };
        for (status, wants) in [
            (with(ClusterPhase::Pending, &[]), true),
            (with(ClusterPhase::Pending, &[(FUNDED, "False")]), false),
            (with(ClusterPhase::Running, &[(DEGRADED, "False")]), false),
            (with(ClusterPhase::Running, &[(DEGRADED, "True")]), true),
            (with(ClusterPhase::Expiring, &[(DEGRADED, "True")]), false),
            (with(ClusterPhase::Failed, &[]), false),
        ] {
            cluster.status = Some(status.clone());
            assert_eq!(wants_supply(&cluster), wants, "{status:?}");
        }
        cluster.status = None;
        cluster.metadata.deletion_timestamp = Some(Time(now()));
        assert!(!wants_supply(&cluster), "being deleted");
    }

    #[test]
    fn a_started_cluster_whose_leases_lost_workers_is_short_whatever_its_status_says() {
        let mut cluster = mk_cluster("c", 2, 1);
        let uid = cluster.metadata.uid.clone().unwrap_or_default();
        let placed = |workers| HashMap::from([(uid.as_str(), workers)]);
        assert!(!short_of_workers(&cluster, &placed(0)), "not started: its status says");
        for (phase, workers, short) in [
            (ClusterPhase::Running, 1, true),
            (ClusterPhase::Provisioning, 0, true),
            (ClusterPhase::Running, 2, false),
            (ClusterPhase::Pending, 0, false),
            (ClusterPhase::Expiring, 1, false),
            (ClusterPhase::Completed, 0, false),
        ] {
            cluster.status = Some(GpuClusterStatus { phase: Some(phase), ..Default::default() });
            assert_eq!(short_of_workers(&cluster, &placed(workers)), short, "{phase:?} {workers}");
        }
        cluster.status =
            Some(GpuClusterStatus { phase: Some(ClusterPhase::Running), ..Default::default() });
        assert!(short_of_workers(&cluster, &HashMap::new()), "no lease at all");
        cluster.metadata.deletion_timestamp = Some(Time(now()));
        assert!(!short_of_workers(&cluster, &placed(0)), "being deleted");
    }

    #[test]
    fn a_cluster_ends_when_its_time_is_up_or_its_escrow_ran_dry() {
        let mut cluster = mk_cluster("c", 2, 1);
        let ended = |reason| {
            let mut lease = mk_lease(&cluster, "n1", &["g0"], 1);
            lease.status = Some(GpuLeaseStatus {
                phase: Some(LeasePhase::Ended),
                end_reason: Some(reason),
                ..GpuLeaseStatus::default()
            });
            lease
        };
        let failed = ended(EndReason::SupplierFailure);
        let dry = ended(EndReason::OutOfFunds);
        let active = mk_lease(&cluster, "n2", &["g0"], 1);
        assert_eq!(
            ending(&cluster, &[failed.clone(), active.clone()], None, now()),
            None,
            "re-placed"
        );
        let out =
            ending(&cluster, &[failed, dry.clone(), active.clone()], None, now()).expect("ends");
        assert_eq!((out.phase, out.lease_reason), (ClusterPhase::Failed, EndReason::OutOfFunds));
        assert!(out.message.contains(dry.metadata.name.as_deref().expect("named")));

        cluster.status = Some(GpuClusterStatus {
            start_time: Some(Time(now() - jiff::SignedDuration::from_hours(1))),
            ..Default::default()
        });
        let up = ending(&cluster, &[dry, active], None, now()).expect("ends");
        assert_eq!((up.phase, up.reason), (ClusterPhase::Completed, "Expired"), "time first");
    }

    #[test]
    fn a_recorded_worker_pod_that_is_gone_is_lost() {
        let cluster = mk_cluster("c", 1, 1);
        let pod = |name: &str, uid: &str| LeasePod {
            namespace: "ns".into(),
            name: name.into(),
            uid: uid.into(),
            ready: true,
        };
        let with_pods = |pods: Vec<LeasePod>| {
            let mut lease = mk_lease(&cluster, "n1", &["g0"], 2);
            lease.status = Some(GpuLeaseStatus { pods, ..Default::default() });
            lease
        };
        let before = with_pods(vec![pod("w-a", "1"), pod("w-b", "2")]);
        assert_eq!(lost_pods(&before, &before), Vec::<String>::new());
        let replaced = with_pods(vec![pod("w-b", "2"), pod("w-c", "3")]);
        assert_eq!(lost_pods(&before, &replaced), ["w-a"]);
        assert_eq!(lost_pods(&replaced, &with_pods(vec![])), ["w-b", "w-c"]);
    }

    /// The buyer's pods that cannot start fail the cluster before any lease served (nothing
    /// billed, no supplier blamed); after service began, or when a worker's node may be at
    /// fault, they only say so in RayReady.
    #[test]
    fn the_buyers_pods_failing_before_service_fail_the_cluster() {
        let cluster = mk_cluster("c", 1, 1);
        let mut lease = mk_lease(&cluster, "n1", &["g0"], 1);
        let trouble = PodTrouble {
            reason: "RayVersionMismatch",
            message: "the image has Ray 2.41.0; spec.ray.version asks 2.9.3".into(),
            buyers: true,
        };
        let out =
            ending(&cluster, std::slice::from_ref(&lease), Some(&trouble), now()).expect("fails");
        assert_eq!(
            (out.phase, out.lease_reason, out.reason),
            (ClusterPhase::Failed, EndReason::WorkloadFailed, "RayVersionMismatch")
        );
        assert!(out.message.starts_with(&trouble.message), "{}", out.message);
        assert!(!EndReason::WorkloadFailed.is_supplier_failure());

        let suppliers = PodTrouble { buyers: false, ..trouble.clone() };
        assert_eq!(ending(&cluster, std::slice::from_ref(&lease), Some(&suppliers), now()), None);
        lease.status =
            Some(GpuLeaseStatus { serving_since: Some(Time(now())), ..Default::default() });
        assert_eq!(ending(&cluster, std::slice::from_ref(&lease), Some(&trouble), now()), None);

        let leases = [&lease];
        let status = build_status(&Observation {
            pod_trouble: Some(&suppliers),
            ..obs(&cluster, &leases, Some(false))
        });
        let ray = cond(&status, RAY_READY);
        assert_eq!((ray.status.as_str(), ray.reason.as_str()), ("False", "RayVersionMismatch"));
        assert_eq!(ray.message, trouble.message);
    }

    #[test]
    fn expiry_is_start_plus_duration() {
        let mut cluster = mk_cluster("c", 1, 1);
        assert_eq!(expires_at(&cluster), None, "not started, no expiry");
        cluster.status =
            Some(GpuClusterStatus { start_time: Some(Time(now())), ..Default::default() });
        cluster.spec.duration = "2h30m".into();
        assert_eq!(expires_at(&cluster), Some(now() + jiff::SignedDuration::from_secs(9000)));
    }

    #[test]
    fn phases_follow_what_exists() {
        assert_eq!(live_phase(0, None), ClusterPhase::Pending);
        assert_eq!(live_phase(2, None), ClusterPhase::Matched);
        assert_eq!(live_phase(2, Some(false)), ClusterPhase::Provisioning);
        assert_eq!(live_phase(2, Some(true)), ClusterPhase::Running);
    }

    #[test]
    fn unmatched_request_stays_pending_with_the_explanation() {
        let cluster = mk_cluster("c", 2, 1);
        let mut o = obs(&cluster, &[], None);
        o.unmatched = Some("no H100 offers in eu-west".into());
        let status = build_status(&o);
        assert_eq!(status.phase, Some(ClusterPhase::Pending));
        let matched = cond(&status, MATCHED);
        assert_eq!(
            (matched.status.as_str(), matched.reason.as_str()),
            ("False", "NoMatchingSupply")
        );
        assert_eq!(matched.message, "no H100 offers in eu-west");
        assert!(status.start_time.is_none());
    }

    #[test]
    fn running_cluster_reports_rate_cost_and_start() {
        let cluster = mk_cluster("c", 2, 2);
        let mut a = mk_lease(&cluster, "a", &["a1", "a2"], 1);
        a.spec.start_time = Time(now() - jiff::SignedDuration::from_secs(2400));
        // Serving for the last half hour: the ten minutes before it are not billed.
        a.status.get_or_insert_default().serving_since =
            Some(Time(now() - jiff::SignedDuration::from_secs(1800)));
        let b = mk_lease(&cluster, "b", &["b1", "b2"], 1);
        let leases = [&a, &b];
        let status = build_status(&obs(&cluster, &leases, Some(true)));
        assert_eq!(status.phase, Some(ClusterPhase::Running));
        assert_eq!(status.gpus, Some(4));
        assert_eq!(status.hourly_rate, Some(4_000_000));
        // Half an hour served of 2 GPUs at 1 token per GPU-hour; b has not served yet.
        assert_eq!(status.cost_accrued, Some(1_000_000));
        assert_eq!(status.start_time, Some(a.spec.start_time.clone()));
        assert_eq!(cond(&status, DEGRADED).status, "False");
        assert_eq!(cond(&status, RAY_READY).status, "True");
    }

    #[test]
    fn a_cluster_in_a_fleet_runs_there_and_is_reached_where_the_fleet_says() {
        let cluster = mk_cluster("c", 1, 1);
        let lease = mk_lease(&cluster, "fleet-a.n1", &["g0"], 1);
        let leases = [&lease];
        let access = RayAccess {
            dashboard: "http://ray-head-u.market.svc:8265".into(),
            ray_client: "ray://ray-head-u.market.svc:10001".into(),
        };
        let ray = RaySite {
            ray_cluster: None,
            fleet: Some("fleet-a".into()),
            access: Some(access),
            through_hub: false,
        };
        let waiting =
            build_status(&Observation { ray: ray.clone(), ..obs(&cluster, &leases, Some(false)) });
        assert_eq!(waiting.phase, Some(ClusterPhase::Provisioning));
        assert!(cond(&waiting, RAY_READY).message.contains("fleet fleet-a to report"));
        let running = build_status(&Observation { ray, ..obs(&cluster, &leases, Some(true)) });
        assert_eq!(running.phase, Some(ClusterPhase::Running));
        let ready = cond(&running, RAY_READY);
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("True", "the Ray head in fleet fleet-a's cluster is ready")
        );
        assert_eq!(running.ray_cluster, None, "no RayCluster on the hub");
        assert_eq!(running.fleet.as_deref(), Some("fleet-a"));
        assert_eq!(running.dashboard.as_deref(), Some("http://ray-head-u.market.svc:8265"));
        assert_eq!(running.ray_client.as_deref(), Some("ray://ray-head-u.market.svc:10001"));
        assert_eq!(running.through_hub, None, "the fleet's own address");
    }

    #[test]
    fn the_cost_never_reads_below_what_was_paid() {
        let cluster = mk_cluster("c", 1, 1);
        let mut a = mk_lease(&cluster, "a", &["a1"], 1);
        // 1000 per GPU-second, serving from 30 s before a whole minute until 59 s after it:
        // the minute-rounded meter has 30000, a payout through then paid 89000.
        a.spec.price_per_gpu_hour = 3_600_000;
        let minute = now().as_second() / 60 * 60;
        let at = |s: i64| Timestamp::from_second(minute + s).expect("time");
        let mut paid = crate::settlement::plan::new_record("0001".into(), at(59), 89_000);
        paid.state = gpumarket_crds::SettlementState::Confirmed;
        let status = a.status.get_or_insert_default();
        status.serving_since = Some(Time(at(-30)));
        status.settlements = vec![paid];
        let leases = [&a];
        let mut o = obs(&cluster, &leases, Some(true));
        o.now = at(59);
        let built = build_status(&o);
        assert_eq!(built.cost_accrued, Some(89_000), "not the 30000 of the rounded meter");
    }

    #[test]
    fn status_does_not_change_between_reconciles_within_a_minute() {
        let cluster = mk_cluster("c", 1, 1);
        let a = mk_lease(&cluster, "a", &["a1"], 1);
        let leases = [&a];
        let first = build_status(&obs(&cluster, &leases, Some(true)));
        let mut later = obs(&cluster, &leases, Some(true));
        later.now = now() + jiff::SignedDuration::from_secs(59);
        let cluster = GpuCluster { status: Some(first.clone()), ..cluster.clone() };
        later.cluster = &cluster;
        assert_eq!(build_status(&later), first);
    }

    #[test]
    fn surplus_is_the_newest_leases_beyond_the_spec() {
        let cluster = mk_cluster("c", 2, 1);
        let a = mk_lease(&cluster, "a", &["a1"], 1);
        let b = mk_lease(&cluster, "b", &["b1"], 1);
        let mut c = mk_lease(&cluster, "c", &["c1"], 1);
        c.spec.start_time = Time(now() + jiff::SignedDuration::from_secs(1));
        let names = |leases: Vec<&GpuLease>| -> Vec<String> {
            leases.iter().filter_map(|l| l.metadata.name.clone()).collect()
        };
        assert_eq!(names(surplus_leases(&cluster, &[&a, &b, &c])), names(vec![&c]));
        assert!(surplus_leases(&cluster, &[&a, &b]).is_empty());
        let two = mk_lease(&cluster, "d", &["d1", "d2"], 2);
        // Ending `two` would leave one worker: only the one-worker leases can go.
        assert_eq!(names(surplus_leases(&cluster, &[&two, &a])), names(vec![&a]));
    }

    #[test]
    fn settlement_totals_are_left_to_settlement() {
        let mut cluster = mk_cluster("c", 1, 1);
        cluster.status = Some(GpuClusterStatus {
            amount_settled: Some(5),
            amount_refunded: Some(7),
            ..Default::default()
        });
        let lease = mk_lease(&cluster, "a", &["a1"], 1);
        let leases = [&lease];
        let live = build_status(&obs(&cluster, &leases, Some(true)));
        let ended =
            ended_status(&cluster, &leases, ClusterPhase::Completed, "Expired", "m".into(), now());
        for status in [live, ended] {
            assert_eq!((status.amount_settled, status.amount_refunded), (None, None));
            let json = serde_json::to_value(&status).expect("json");
            assert!(json.get("amountSettled").is_none(), "not applied, so not owned: {json}");
        }
    }

    #[test]
    fn lost_workers_without_replacement_mark_the_cluster_degraded() {
        let mut cluster = mk_cluster("c", 2, 1);
        cluster.status =
            Some(GpuClusterStatus { start_time: Some(Time(now())), ..Default::default() });
        let a = mk_lease(&cluster, "a", &["a1"], 1);
        let mut lost = mk_lease(&cluster, "b", &["b1"], 1);
        lost.status = Some(GpuLeaseStatus {
            phase: Some(LeasePhase::Ended),
            end_time: Some(Time(now())),
            ..Default::default()
        });
        let leases = [&a, &lost];
        let mut o = obs(&cluster, &leases, Some(true));
        o.unmatched = Some("no free H100".into());
        let status = build_status(&o);
        assert_eq!(status.phase, Some(ClusterPhase::Running));
        assert_eq!(status.leases, vec![a.metadata.name.clone().expect("named")]);
        let degraded = cond(&status, DEGRADED);
        assert_eq!(degraded.status, "True");
        assert!(degraded.message.contains("1 of 2 workers"), "{}", degraded.message);
    }

    #[test]
    fn supplier_failures_are_stale_heartbeats_unhealthy_gpus_or_withdrawn_offers() {
        let cluster = mk_cluster("c", 1, 2);
        let lease = mk_lease(&cluster, "n", &["n-gpu-0", "n-gpu-1"], 1);
        let timeout = Duration::from_secs(30);
        let fresh = mk_offer("n", "H100", 4, now());
        assert_eq!(supplier_failure(&lease, Some(&fresh), now(), timeout), None);
        let last_heartbeat = now() - jiff::SignedDuration::from_secs(31);
        let stale = mk_offer("n", "H100", 4, last_heartbeat);
        let silent = supplier_failure(&lease, Some(&stale), now(), timeout).expect("failed");
        assert!(silent.why.contains("heartbeat"), "{}", silent.why);
        assert_eq!(silent.served_until, last_heartbeat, "the silence is not billed");
        let ahead = mk_offer("n", "H100", 4, now() + jiff::SignedDuration::from_secs(3600));
        let lying = supplier_failure(&lease, Some(&ahead), now(), timeout).expect("failed");
        assert_eq!(lying.served_until, now(), "never billed past now");
        let withdrawn = supplier_failure(&lease, None, now(), timeout).expect("failed");
        assert!(withdrawn.why.contains("withdrawn"), "{}", withdrawn.why);
        assert_eq!(withdrawn.served_until, now());
        let mut sick = fresh.clone();
        sick.status.get_or_insert_default().gpus.push(GpuState {
            uuid: "n-gpu-1".into(),
            health: Some(GpuHealth::Unhealthy),
            reason: Some("XID 79".into()),
            lease: None,
        });
        let unhealthy = supplier_failure(&lease, Some(&sick), now(), timeout).expect("failed");
        assert!(unhealthy.why.contains("n-gpu-1"), "{}", unhealthy.why);
        // An unhealthy GPU that the lease does not hold does not affect it.
        let other = mk_lease(&cluster, "n", &["n-gpu-2"], 1);
        assert_eq!(supplier_failure(&other, Some(&sick), now(), timeout), None);
    }

    #[test]
    fn transition_time_is_kept_while_a_condition_holds() {
        let mut conditions = Vec::new();
        let t0 = now();
        set_condition(&mut conditions, MATCHED, false, "NoMatchingSupply", "a".into(), t0, None);
        let later = t0 + jiff::SignedDuration::from_secs(60);
        set_condition(&mut conditions, MATCHED, false, "NoMatchingSupply", "b".into(), later, None);
        assert_eq!(conditions[0].last_transition_time.0, t0);
        assert_eq!(conditions[0].message, "b");
        set_condition(&mut conditions, MATCHED, true, "Bound", "c".into(), later, None);
        assert_eq!(conditions[0].last_transition_time.0, later);
        assert_eq!(conditions.len(), 1);
    }

    #[test]
    fn a_lease_serves_once_every_worker_on_its_node_is_ready() {
        use crate::testing::mk_worker_pod;
        let cluster = mk_cluster("c", 2, 1);
        let lease = mk_lease(&cluster, "node-a", &["a1", "a2"], 2);
        let first = mk_worker_pod(&lease, "w1", 1, Some(20));
        let mut elsewhere = mk_worker_pod(&lease, "w2", 2, Some(5));
        elsewhere.spec.get_or_insert_default().node_name = Some("node-b".into());
        let mut forged = mk_worker_pod(&lease, "w3", 3, Some(5));
        forged.metadata.owner_references = None; // a pod of the buyer's own, not KubeRay's
        let pending = mk_worker_pod(&lease, "w4", 4, None);
        let pods = [&first, &elsewhere, &forged, &pending];
        let serving = lease_pods(&lease, &pods);
        let names: Vec<String> = serving.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["w1", "w4"], "only KubeRay's pods of this lease on its node");
        assert_eq!(serving_since(&lease, &serving, now()), None, "one worker is not Ready");

        let later = mk_worker_pod(&lease, "w4", 4, Some(30));
        let pods = [&first, &later];
        let serving = lease_pods(&lease, &pods);
        let at_30 = now() + jiff::SignedDuration::from_secs(30);
        let at_40 = now() + jiff::SignedDuration::from_secs(40);
        assert_eq!(serving_since(&lease, &serving, at_40), Some(at_30), "when the last got Ready");
        let recorded = with_service(&lease, &serving, at_40).expect("changed");
        let status = recorded.status.clone().expect("status");
        assert_eq!(status.serving_since, Some(Time(at_30)));
        assert!(status.pods.iter().all(|p| p.ready) && status.pods.len() == 2);
        assert!(with_service(&recorded, &serving, at_40).is_none(), "nothing new");

        // A start of service never moves, even when a worker is lost later.
        let lost = [&first];
        let after =
            with_service(&recorded, &lease_pods(&recorded, &lost), at_40).expect("pods changed");
        assert_eq!(after.status.expect("status").serving_since, Some(Time(at_30)));
    }

    #[test]
    fn a_lease_not_serving_in_time_has_failed_and_ends_once() {
        let cluster = mk_cluster("c", 1, 1);
        let lease = mk_lease(&cluster, "node-a", &["a1"], 1);
        let timeout = Duration::from_secs(600);
        let at = |s: i64| now() + jiff::SignedDuration::from_secs(s);
        assert!(!not_serving(&lease, at(600), timeout));
        assert!(not_serving(&lease, at(601), timeout));
        let mut serving = lease.clone();
        serving.status.get_or_insert_default().serving_since = Some(Time(at(30)));
        assert!(!not_serving(&serving, at(6000), timeout));

        let ended = ended_lease(&serving, EndReason::NotServing, at(90)).expect("ends");
        let status = ended.status.clone().expect("status");
        assert_eq!(
            (status.phase, status.end_reason),
            (Some(LeasePhase::Ended), Some(EndReason::NotServing))
        );
        assert_eq!((status.hired_gpu_seconds, status.served_gpu_seconds), (Some(90), Some(60)));
        assert!(
            ended_lease(&ended, EndReason::OutOfFunds, at(95)).is_none(),
            "an end is written once"
        );

        // An end before what payments already cover (a payout in flight through 80 s) is
        // moved to it: no payment ever exceeds the meter.
        let mut paid = serving.clone();
        paid.status.get_or_insert_default().settlements.push(SettlementRecord {
            period: "0001".into(),
            through: Time(at(80)),
            amount: 50,
            conversion: None,
            signature: Some("sig".into()),
            last_valid_block_height: Some(1),
            signed_slot: None,
            transaction: None,
            state: SettlementState::Signed,
        });
        let ended = ended_lease(&paid, EndReason::SupplierFailure, at(70)).expect("ends");
        let status = ended.status.expect("status");
        assert_eq!(status.end_time, Some(Time(at(80))));
        assert_eq!(status.served_gpu_seconds, Some(50));
    }

    #[test]
    fn the_pods_of_ended_leases_are_stale() {
        use crate::testing::mk_worker_pod;
        let cluster = mk_cluster("c", 2, 1);
        let active = mk_lease(&cluster, "node-a", &["a1"], 1);
        let mut ended = mk_lease(&cluster, "node-b", &["b1"], 1);
        ended.status.get_or_insert_default().phase = Some(LeasePhase::Ended);
        let (live, left) =
            (mk_worker_pod(&active, "w1", 0, Some(1)), mk_worker_pod(&ended, "w2", 0, Some(1)));
        let mut going = mk_worker_pod(&ended, "w3", 0, Some(1));
        going.metadata.deletion_timestamp = Some(Time(now()));
        let stale = stale_worker_pods(&[active, ended], &[&live, &left, &going]);
        assert_eq!(stale.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["w2"]);
    }
}
