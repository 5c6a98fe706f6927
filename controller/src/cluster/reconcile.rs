//! The GpuCluster reconcile as named steps: read → validate → match → bind → build → apply →
//! status, wrapped in a finalizer whose cleanup ends the leases before anything disappears.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gpumarket_crds::{
    Amount, ClusterPhase, EndReason, GpuCluster, GpuClusterStatus, GpuLease, GpuOffer, LeaseTerms,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use super::pod_trouble::pod_trouble;
use super::status::{
    Ending, Observation, RaySite, build_status, ended_status, ending, expires_at, is_active,
    lease_pods, lost_pods, missing_workers, not_serving, stale_worker_pods, supplier_failure,
    surplus_leases, with_service,
};
use crate::error::{Error, Result};
use crate::fleet::{fleet_ray, fleet_service, offer_fleet};
use crate::market::binding::{self, CLUSTER_UID_LABEL, lease_prefix, plan_leases};
use crate::market::supply::{gang_fleets, market_request};
use crate::matching::{self, Outcome, Request};
use crate::policy::terms;
use crate::raycluster::{self, build_ray_cluster, head_access, is_ready, ray_cluster_name};
use crate::runtime::context::{Context, MANAGER};
use crate::settlement::escrow::required_deposit;
use crate::settlement::{self, DepositStatus};

pub const FINALIZER: &str = "gpumarket.io/leases";
const CONTROLLER: &str = "gpucluster";
/// A request that found no supply is looked at again this often even without an offer event.
const PENDING_RECHECK: Duration = Duration::from_secs(60);
/// A request waiting for its deposit looks at the escrow this often (deposits raise no event).
const DEPOSIT_RECHECK: Duration = Duration::from_secs(5);
/// A running cluster's status (accrued cost) is refreshed at least this often.
const STATUS_REFRESH: Duration = Duration::from_secs(300);
/// Retry delay after losing a race for GPUs: short, the next match sees fresh supply.
const CONFLICT_RETRY: Duration = Duration::from_millis(200);

pub async fn reconcile(cluster: Arc<GpuCluster>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_duration.with_label_values(&[CONTROLLER]).start_timer();
    ctx.metrics.reconciles.with_label_values(&[CONTROLLER]).inc();
    finalizer(&cluster_api(&cluster, &ctx), FINALIZER, cluster, |event| async {
        match event {
            Finalizer::Apply(cluster) => apply(&cluster, &ctx).await,
            Finalizer::Cleanup(cluster) => cleanup(&cluster, &ctx).await,
        }
    })
    .await
    .map_err(Error::from)
}

pub fn error_policy(cluster: Arc<GpuCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.with_label_values(&[CONTROLLER, error.metric_label()]).inc();
    tracing::warn!(cluster = %cluster.name_any(), %error, "reconcile failed");
    match error {
        // Lost a write race (e.g. another replica added the finalizer first): retry soon.
        Error::Finalizer(_) | Error::AllocationConflict { .. } => {
            Action::requeue(Duration::from_secs(1))
        }
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

/// What the read step gathers.
struct Read {
    leases: Vec<GpuLease>,
    ray_cluster: Option<DynamicObject>,
}

/// Where the read step takes the cluster's leases from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LeaseSource {
    /// The cache when it shows every write that matters (`lease_view`), else the API.
    CacheWhenCurrent,
    /// The API: a deleted cluster ends every lease it has, seen or not.
    Api,
}

async fn read(cluster: &GpuCluster, ctx: &Context, source: LeaseSource) -> Result<Read> {
    // A lease created by the previous reconcile and missed would be matched again and
    // over-provision the cluster: a cache behind such a write is not read.
    let cached =
        (source == LeaseSource::CacheWhenCurrent).then(|| ctx.cached_leases_of(cluster)).flatten();
    ctx.metrics
        .lease_reads
        .with_label_values(&[if cached.is_some() { "cache" } else { "api" }])
        .inc();
    let leases = match cached {
        Some(leases) => leases,
        None => {
            let uid = cluster.uid().unwrap_or_default();
            let params = ListParams::default().labels(&format!("{CLUSTER_UID_LABEL}={uid}"));
            Api::<GpuLease>::all(ctx.client.clone()).list(&params).await?.items
        }
    };
    let ray_cluster = ray_api(cluster, ctx).get_opt(&ray_cluster_name(cluster)).await?;
    Ok(Read { leases, ray_cluster })
}

fn ray_api(cluster: &GpuCluster, ctx: &Context) -> Api<DynamicObject> {
    Api::namespaced_with(
        ctx.client.clone(),
        &cluster.namespace().unwrap_or_default(),
        &raycluster::api_resource(),
    )
}

async fn apply(cluster: &GpuCluster, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    if ctx.settler.is_some() && !settlement::refunded(cluster) {
        // Before anything is bound or deposited: a deleted cluster waits for its refund.
        settlement::set_finalizer(&cluster_api(cluster, ctx), cluster, true).await?;
    }
    let phase = cluster.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    if matches!(phase, ClusterPhase::Completed | ClusterPhase::Failed) {
        return Ok(Action::await_change());
    }

    let Read { mut leases, ray_cluster } =
        read(cluster, ctx, LeaseSource::CacheWhenCurrent).await?;

    // validate: before any GPU is leased, what the schema cannot check (or checked only for
    // objects written after its rules) fails the cluster with a message that says what to change.
    let started =
        cluster.status.as_ref().is_some_and(|s| s.start_time.is_some()) || !leases.is_empty();
    let unaccepted_mint = || ctx.settler.as_ref().and_then(|s| s.mints().of(cluster).err());
    let invalid = match cluster.spec.duration() {
        Err(e) => Some(format!("spec.duration: {e}")),
        Ok(_) if !started => super::validate::validate(cluster).err().or_else(unaccepted_mint),
        Ok(_) => None,
    };
    if let Some(message) = invalid {
        ctx.event(cluster, EventType::Warning, "InvalidSpec", "Validate", message.clone()).await;
        let refs: Vec<&GpuLease> = leases.iter().collect();
        write_status(
            cluster,
            ctx,
            ended_status(cluster, &refs, ClusterPhase::Failed, "InvalidSpec", message, now),
        )
        .await?;
        return Ok(Action::await_change());
    }

    let pods = ctx.pods_of(cluster);
    let pods: Vec<&Pod> = pods.iter().map(AsRef::as_ref).collect();
    let trouble = pod_trouble(&pods);
    if let Some(end) = ending(cluster, &leases, trouble.as_ref(), now) {
        return finish(cluster, ctx, leases, ray_cluster.is_some(), end).await;
    }

    // Supplier failures end the affected leases; their workers are matched again below.
    for lease in leases.iter_mut().filter(|l| is_active(l)) {
        let offer = ctx.offers.get(&ObjectRef::<GpuOffer>::new(&lease.spec.offer));
        let timeout = terms::heartbeat_timeout(lease, ctx.settings().heartbeat_timeout);
        if let Some(failure) = supplier_failure(lease, offer.as_deref(), now, timeout) {
            *lease =
                end_lease(ctx, lease, EndReason::SupplierFailure, failure.served_until).await?;
            let billed = lease.status.as_ref().and_then(|s| s.end_time.as_ref());
            let note = format!(
                "lease {} ended: {}; billed through {}",
                lease.name_any(),
                failure.why,
                billed.map_or_else(|| "its end".into(), |t| t.0.to_string())
            );
            ctx.event(cluster, EventType::Warning, "SupplierFailure", "Recover", note).await;
        }
    }

    // Service: each lease's worker pods, and when it began serving (billing starts there); a
    // lease that has not served within the provisioning timeout has failed its buyer.
    for lease in leases.iter_mut().filter(|l| is_active(l)) {
        let before = lease.clone();
        *lease = record_service(ctx, lease, &pods, now).await?;
        for pod in lost_pods(&before, lease) {
            let note = format!(
                "worker pod {pod} of lease {} is gone: KubeRay starts another on {}; Ray jobs that ran on it must be resubmitted",
                lease.name_any(),
                lease.spec.offer
            );
            ctx.event(cluster, EventType::Warning, "WorkerPodLost", "Recover", note).await;
        }
        let timeout = terms::provisioning_timeout(lease, ctx.settings().provisioning_timeout);
        if not_serving(lease, now, timeout) {
            *lease = end_lease(ctx, lease, EndReason::NotServing, now).await?;
            let note = format!(
                "lease {} ended: its workers on {} were not Ready within {}s of the bind (not billed)",
                lease.name_any(),
                lease.spec.offer,
                timeout.as_secs()
            );
            ctx.event(cluster, EventType::Warning, "NotServing", "Recover", note).await;
        }
    }

    // Replicas racing without leader election can each bind the same cluster (never the same
    // GPU): the extra leases are ended before they serve any worker.
    let active: Vec<&GpuLease> = leases.iter().filter(|l| is_active(l)).collect();
    let surplus: Vec<String> =
        surplus_leases(cluster, &active).iter().map(|l| l.name_any()).collect();
    for lease in leases.iter_mut().filter(|l| surplus.contains(&l.name_any())) {
        // Ended at its start: it never served a worker, so nothing is metered.
        *lease = end_lease(ctx, lease, EndReason::Surplus, lease.spec.start_time.0).await?;
        let note =
            format!("lease {} ended: more workers were bound than requested", lease.name_any());
        ctx.event(cluster, EventType::Warning, "SurplusLease", "Bind", note).await;
    }

    // match + bind
    let mut unmatched = None;
    let mut funding = None;
    let active: Vec<&GpuLease> = leases.iter().filter(|l| is_active(l)).collect();
    let missing = missing_workers(cluster, &active);
    let replacing = cluster.status.as_ref().is_some_and(|s| s.start_time.is_some())
        || leases.iter().any(|l| !is_active(l));
    if missing > 0 {
        let uid = cluster.uid().unwrap_or_default();
        let within =
            gang_fleets(active.iter().copied(), |o| ctx.offer_fleet(o)).remove(uid.as_str());
        // Lost workers go elsewhere than the nodes that failed this cluster, if they can.
        let failed: BTreeSet<String> = leases
            .iter()
            .filter(|l| {
                let reason = l.status.as_ref().and_then(|s| s.end_reason);
                reason.is_some_and(EndReason::is_supplier_failure)
            })
            .map(|l| l.spec.offer.clone())
            .collect();
        let (bind, checked) =
            match_and_bind(cluster, ctx, missing, replacing, within, &failed, now).await?;
        funding = checked;
        match bind {
            Bind::Unmatched(why) => {
                let previous = cluster
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == super::status::MATCHED));
                if previous.is_none_or(|c| c.message != why) {
                    ctx.event(cluster, EventType::Normal, "Unmatched", "Match", why.clone()).await;
                }
                unmatched = Some(why);
            }
            Bind::Unfunded(why) => {
                ctx.event(cluster, EventType::Warning, "DepositShort", "Fund", why).await;
            }
            Bind::Conflict(offer) => {
                tracing::debug!(cluster = %cluster.name_any(), %offer, "lost a race for GPUs, matching again");
                return Ok(Action::requeue(CONFLICT_RETRY));
            }
            Bind::Bound(bound) => {
                let placed = describe_placement(&bound);
                let (reason, note) = if replacing {
                    ctx.metrics.replacements.inc_by(u64::from(missing));
                    ("Replaced", format!("{missing} workers re-placed on {placed}"))
                } else {
                    ("Matched", format!("{missing} workers bound on {placed}"))
                };
                ctx.event(cluster, EventType::Normal, reason, "Bind", note).await;
                leases.extend(bound);
            }
        }
    }

    // build + apply: a gang placed in a fleet runs there (the fleet reports its Ray head); the
    // hub's own nodes run a RayCluster.
    let active: Vec<&GpuLease> = leases.iter().filter(|l| is_active(l)).collect();
    let name = ray_cluster_name(cluster);
    let namespace = cluster.namespace().unwrap_or_default();
    let uid = cluster.uid().unwrap_or_default();
    let fleet = gang_fleets(active.iter().copied(), |o| ctx.offer_fleet(o)).remove(uid.as_str());
    let (ray_ready, ray) = if let Some(Some(fleet)) = fleet {
        // A RayCluster of an earlier placement on the hub's nodes has no workers left.
        if ray_cluster.is_some() {
            delete_ray_cluster(cluster, ctx).await?;
        }
        let (ready, in_fleet) =
            fleet_ray(ctx.fleets.get(&ObjectRef::new(&fleet)).as_deref(), &active);
        // The buyer reaches the head through the hub's tunnel, when it runs; else the fleet's
        // own address is shown (reachable from inside the fleet).
        let (access, through_hub) = match (&ctx.tunnel, in_fleet) {
            (Some(tunnel), Some(_)) => {
                (Some(tunnel.gateway(&uid, &fleet).await.map_err(Error::Gateway)?), true)
            }
            (_, in_fleet) => (in_fleet, false),
        };
        let ray = RaySite { ray_cluster: None, fleet: Some(fleet), access, through_hub };
        (Some(ready), ray)
    } else if active.is_empty() && ray_cluster.is_none() {
        close_gateway(cluster, ctx);
        (None, RaySite::default())
    } else {
        close_gateway(cluster, ctx);
        let desired = build_ray_cluster(cluster, &active, &ctx.settings.head_placement)?;
        let applied = ray_api(cluster, ctx)
            .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired))
            .await?;
        if ray_cluster.is_none() {
            ctx.event(
                cluster,
                EventType::Normal,
                "Provisioning",
                "Apply",
                format!("RayCluster {name} created with {} worker groups", active.len()),
            )
            .await;
        }
        let ready = serde_json::to_value(&applied).map(|v| is_ready(&v)).unwrap_or(false);
        let access = Some(head_access(&name, &namespace));
        let ray =
            RaySite { ray_cluster: Some(name.clone()), fleet: None, access, through_hub: false };
        (Some(ready), ray)
    };
    let running = cluster.status.as_ref().and_then(|s| s.phase) == Some(ClusterPhase::Running);
    if ray_ready == Some(true) && !running {
        let note = match &ray.fleet {
            Some(fleet) => format!("the Ray head in fleet {fleet} is ready"),
            None => format!("RayCluster {name} is ready"),
        };
        ctx.event(cluster, EventType::Normal, "Running", "Status", note).await;
    }

    // The pods of ended leases go (KubeRay leaves them when their worker group is removed).
    for pod in stale_worker_pods(&leases, &pods) {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
        match api.delete(&pod.name_any(), &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(cluster = %cluster.name_any(), pod = %pod.name_any(), "worker pod of an ended lease deleted")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }

    // status
    let awaiting_deposit = funding.as_ref().is_some_and(Result::is_err);
    let refs: Vec<&GpuLease> = leases.iter().collect();
    let status = build_status(&Observation {
        cluster,
        leases: &refs,
        ray_ready,
        ray,
        unmatched,
        funding,
        pod_trouble: trouble.as_ref(),
        now,
    });
    let pending = status.phase == Some(ClusterPhase::Pending);
    let still_missing = missing_workers(
        cluster,
        &refs.iter().copied().filter(|l| is_active(l)).collect::<Vec<_>>(),
    ) > 0;
    let with_start = GpuCluster { status: Some(status.clone()), ..cluster.clone() };
    write_status(cluster, ctx, status).await?;

    let mut next = if awaiting_deposit {
        DEPOSIT_RECHECK
    } else if pending || still_missing {
        PENDING_RECHECK
    } else {
        STATUS_REFRESH
    };
    if let Some(at) = expires_at(&with_start) {
        let until = at.duration_since(now).unsigned_abs();
        next = next.min(until + Duration::from_millis(100));
    }
    for lease in leases.iter().filter(|l| is_active(l) && !serves(l)) {
        let waited = now.duration_since(lease.spec.start_time.0).unsigned_abs();
        let timeout = terms::provisioning_timeout(lease, ctx.settings().provisioning_timeout);
        let left = timeout.saturating_sub(waited);
        next = next.min(left + Duration::from_millis(100));
    }
    Ok(Action::requeue(next))
}

enum Bind {
    Unmatched(String),
    /// The deposit does not cover the match (settlement on).
    Unfunded(String),
    /// Another replica took GPUs of the match first (offer named).
    Conflict(String),
    Bound(Vec<GpuLease>),
}

/// Match `workers` more workers against the cached supply and bind the result. Reconciles of
/// this replica match and bind one at a time: they would otherwise all pick the same cheapest
/// GPUs and all but one lose the race; GPUs this replica has just claimed are left out until
/// the cache shows the claim. Other replicas are kept out by the API server (see `binding`).
async fn match_and_bind(
    cluster: &GpuCluster,
    ctx: &Context,
    workers: u32,
    replacing: bool,
    within: Option<Option<String>>,
    failed: &BTreeSet<String>,
    now: Timestamp,
) -> Result<(Bind, Option<Result<String, String>>)> {
    let request = Request { within, ..market_request(cluster, workers) };
    // The rules in force now are the leases' terms: their deposit margin is what the deposit
    // is checked against.
    let mint = ctx.settler.as_ref().and_then(|s| s.mints().of(cluster).ok());
    let terms = LeaseTerms { mint: mint.map(|m| m.to_string()), ..ctx.lease_terms() };
    let margin = terms::deposit_margin_percent(&terms);
    // The deposit is checked against a quote before anything is taken (the chain is slow, so
    // not under the lock); the bind below re-checks the final price against what was deposited.
    let deposited = match (&ctx.settler, replacing) {
        (Some(settler), false) => {
            let mint = settler.mints().of(cluster).map_err(Error::InvalidSpec)?;
            let duration =
                cluster.spec.duration().map_err(|e| Error::InvalidSpec(e.to_string()))?;
            let quoted = match matching::quote(&ctx.supply(now), &request) {
                Outcome::Matched(assignment) => assignment.hourly_cost(),
                Outcome::Unmatched(why) => return Ok((Bind::Unmatched(why.to_string()), None)),
            };
            let conversion = match settler.conversion_of(mint).await {
                Ok(conversion) => conversion,
                Err(e) => {
                    tracing::warn!(cluster = %cluster.name_any(), error = %e, "reading the price feed");
                    let why = format!("cannot read the price feed: {}", e.public_message());
                    return Ok((Bind::Unfunded(why.clone()), Some(Err(why))));
                }
            };
            let Some(required) = conversion.tokens(required_deposit(quoted, duration, margin))
            else {
                let why = format!(
                    "the deposit waits for a price to convert at: {}",
                    conversion.paused().unwrap_or_default()
                );
                return Ok((Bind::Unfunded(why.clone()), Some(Err(why))));
            };
            let uid = cluster.uid().unwrap_or_default();
            match settler.deposit_status(&uid, mint, required).await {
                Ok((escrow, DepositStatus::Covered { deposited })) => {
                    Some((conversion, duration, deposited, escrow))
                }
                Ok((escrow, DepositStatus::Short { deposited, missing })) => {
                    let why = format!(
                        "deposit {} short of the {} this match needs: transfer {} more of the \
                         mint {mint} to this cluster's escrow account {escrow}",
                        Amount::new(deposited),
                        Amount::new(required),
                        Amount::new(missing),
                    );
                    return Ok((Bind::Unfunded(why.clone()), Some(Err(why))));
                }
                Err(e) => {
                    tracing::warn!(cluster = %cluster.name_any(), error = %e, "reading the escrow");
                    let why = format!("cannot read the escrow: {}", e.public_message());
                    return Ok((Bind::Unfunded(why.clone()), Some(Err(why))));
                }
            }
        }
        _ => None,
    };
    let (planned, funding) = {
        let _turn = ctx.bind_lock.lock().await;
        // The costly part of the supply (a verdict on every offer) is shared with the binds
        // that waited alongside; what changed since it was read is taken out.
        let supply = ctx.unclaimed(&ctx.admitted_supply_since(now));
        let outcome = {
            let _timer = ctx.metrics.match_latency.start_timer();
            // Oldest first: GPUs that older waiting requests (degraded clusters among them)
            // would get are not this one's, whichever reconcile runs first.
            let hold = matching::HoldPolicy::at(now.as_second());
            let queue = ctx.queue();
            matching::avoiding_failed(&supply, failed, |supply| {
                matching::match_in_turn(supply, &queue, &request, hold)
            })
        };
        let assignment = match outcome {
            Outcome::Unmatched(why) => return Ok((Bind::Unmatched(why.to_string()), None)),
            Outcome::Matched(assignment) => assignment,
        };
        let mut funding = None;
        if let Some((conversion, duration, deposited, escrow)) = &deposited {
            let cost = required_deposit(assignment.hourly_cost(), *duration, margin);
            let required = conversion.tokens(cost).unwrap_or(u64::MAX);
            if required > *deposited {
                let why = format!(
                    "supply moved: the match now needs a deposit of {}, {} was deposited to the \
                     escrow account {escrow}",
                    Amount::new(required),
                    Amount::new(*deposited)
                );
                return Ok((Bind::Unfunded(why.clone()), Some(Err(why))));
            }
            funding = Some(Ok(format!(
                "escrow account {escrow} holds {}, covering the {} needed",
                Amount::new(*deposited),
                Amount::new(required)
            )));
        }
        let planned = plan_leases(cluster, &assignment, &offer_wallets(ctx), &terms, now)?;
        // Set aside before the lock goes: the next match leaves these GPUs to this bind.
        ctx.remember_claims(&planned);
        (planned, funding)
    };
    // The claims are written without holding up other binds: the set-aside only steers this
    // replica's matches, the API server arbitrates (each claim is conditional on the offer as
    // read), and a claim that fails gives the GPUs back.
    let claimed = async {
        // Nothing is bound on a signing time a restarted replica would not know (the offer
        // controller records it too, but maybe not yet).
        for lease in &planned {
            ctx.record_signing_time(&lease.spec.offer).await?;
        }
        let cached = |name: &str| ctx.offers.get(&ObjectRef::new(name));
        binding::claim_all(&offers_api(ctx), cached, &planned).await
    };
    if let Err(e) = claimed.await {
        ctx.forget_claims(&planned);
        return match e {
            Error::AllocationConflict { offer } => Ok((Bind::Conflict(offer), None)),
            e => Err(e),
        };
    }
    let bound = binding::create_leases(&Api::all(ctx.client.clone()), &planned).await?;
    bound.iter().for_each(|lease| ctx.note_lease_write(lease));
    Ok((Bind::Bound(bound), funding))
}

fn offer_wallets(ctx: &Context) -> BTreeMap<String, String> {
    ctx.offers.state().iter().map(|o| (o.name_any(), o.spec.wallet.clone())).collect()
}

fn offers_api(ctx: &Context) -> Api<GpuOffer> {
    Api::all(ctx.client.clone())
}

fn describe_placement(leases: &[GpuLease]) -> String {
    leases
        .iter()
        .map(|l| format!("{} ({} GPUs)", l.spec.offer, l.spec.gpus.len()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Release every allocation naming a lease of this cluster (the cluster is going away, so none
/// of them can still be needed, including claims left by a crash before their lease existed).
async fn release_cluster_claims(cluster: &GpuCluster, ctx: &Context) -> Result<()> {
    let prefix = lease_prefix(cluster);
    let is_ours = |lease: &str| lease.starts_with(&prefix);
    for offer in ctx.offers.state() {
        let holds_ours = offer
            .status
            .iter()
            .flat_map(|s| &s.gpus)
            .any(|g| g.lease.as_deref().is_some_and(is_ours));
        if holds_ours {
            binding::release_claims(&offers_api(ctx), &offer.name_any(), is_ours).await?;
        }
    }
    Ok(())
}

/// Close a lease's meter at `at` (phase Ended) and return its GPUs to the offer. The end is
/// written once, conditionally on the version read: a lease already ended (by settlement
/// running out of funds, say) keeps its end and its reason. Metering is closed first: if the
/// release fails, the offer controller reclaims allocations of ended leases.
pub async fn end_lease(
    ctx: &Context,
    lease: &GpuLease,
    reason: EndReason,
    at: Timestamp,
) -> Result<GpuLease> {
    let api: Api<GpuLease> = Api::all(ctx.client.clone());
    let mut current = lease.clone();
    let ended = loop {
        let Some(next) = super::status::ended_lease(&current, reason, at) else { break current };
        let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        match api.replace_status(&lease.name_any(), &params, &next).await {
            Ok(ended) => {
                ctx.note_lease_write(&ended);
                break ended;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                current = api.get_status(&lease.name_any()).await?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    binding::release_lease_claims(&offers_api(ctx), lease).await?;
    Ok(ended)
}

/// The cluster is over (duration up, escrow dry): Expiring, RayCluster deleted, active leases
/// ended, then the final phase.
async fn finish(
    cluster: &GpuCluster,
    ctx: &Context,
    leases: Vec<GpuLease>,
    has_ray_cluster: bool,
    end: Ending,
) -> Result<Action> {
    let now = Timestamp::now();
    let expiring = GpuClusterStatus {
        phase: Some(ClusterPhase::Expiring),
        ..cluster.status.clone().unwrap_or_default()
    };
    write_status(cluster, ctx, expiring).await?;
    if has_ray_cluster {
        delete_ray_cluster(cluster, ctx).await?;
    }
    close_gateway(cluster, ctx);
    let mut ended = Vec::new();
    let mut ended_now = 0;
    for lease in leases {
        if is_active(&lease) {
            ended.push(end_lease(ctx, &lease, end.lease_reason, now).await?);
            ended_now += 1;
        } else {
            ended.push(lease);
        }
    }
    let refs: Vec<&GpuLease> = ended.iter().collect();
    let event_type =
        if end.phase == ClusterPhase::Failed { EventType::Warning } else { EventType::Normal };
    let note = format!("{}: RayCluster deleted, {ended_now} leases ended", end.message);
    ctx.event(cluster, event_type, end.reason, "End", note).await;
    write_status(
        cluster,
        ctx,
        ended_status(cluster, &refs, end.phase, end.reason, end.message, now),
    )
    .await?;
    Ok(Action::await_change())
}

/// Finalizer: end every active lease (reason Deleted) before the GpuCluster and its RayCluster go.
async fn cleanup(cluster: &GpuCluster, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    let Read { leases, ray_cluster } = read(cluster, ctx, LeaseSource::Api).await?;
    let mut count = 0;
    for lease in leases.iter().filter(|l| is_active(l)) {
        end_lease(ctx, lease, EndReason::Deleted, now).await?;
        count += 1;
    }
    release_cluster_claims(cluster, ctx).await?;
    if ray_cluster.is_some() {
        delete_ray_cluster(cluster, ctx).await?;
    }
    close_gateway(cluster, ctx);
    ctx.forget_lease_writes(cluster);
    ctx.event(
        cluster,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        format!("{count} leases ended before deletion"),
    )
    .await;
    Ok(Action::await_change())
}

/// The hub's gateway to the cluster's head in a fleet goes: the cluster runs there no more.
fn close_gateway(cluster: &GpuCluster, ctx: &Context) {
    if let Some(tunnel) = &ctx.tunnel {
        tunnel.close_gateway(&cluster.uid().unwrap_or_default());
    }
}

async fn delete_ray_cluster(cluster: &GpuCluster, ctx: &Context) -> Result<()> {
    match ray_api(cluster, ctx).delete(&ray_cluster_name(cluster), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Write the lease's worker pods and start of service as seen now, conditionally on the
/// version read (a start of service, once written, never moves).
async fn record_service(
    ctx: &Context,
    lease: &GpuLease,
    pods: &[&Pod],
    now: Timestamp,
) -> Result<GpuLease> {
    let api: Api<GpuLease> = Api::all(ctx.client.clone());
    let mut current = lease.clone();
    // A lease on a fleet's offer serves in the fleet's cluster: the fleet reports its workers.
    let fleet = ctx
        .offers
        .get(&ObjectRef::new(&lease.spec.offer))
        .and_then(|offer| offer_fleet(&offer).map(|f| ctx.fleets.get(&ObjectRef::new(f))));
    loop {
        let next = match &fleet {
            Some(fleet) => {
                let workload = fleet.as_deref().and_then(|f| f.workload(&lease.name_any()));
                fleet_service(&current, workload, now)
            }
            None => with_service(&current, &lease_pods(&current, pods), now),
        };
        let Some(next) = next else {
            return Ok(current);
        };
        let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        match api.replace_status(&lease.name_any(), &params, &next).await {
            Ok(updated) => {
                ctx.note_lease_write(&updated);
                return Ok(updated);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                current = api.get_status(&lease.name_any()).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn serves(lease: &GpuLease) -> bool {
    lease.status.as_ref().is_some_and(|s| s.serving_since.is_some())
}

fn cluster_api(cluster: &GpuCluster, ctx: &Context) -> Api<GpuCluster> {
    Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default())
}

async fn write_status(cluster: &GpuCluster, ctx: &Context, status: GpuClusterStatus) -> Result<()> {
    let api = cluster_api(cluster, ctx);
    let patch =
        json!({"apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuCluster", "status": status});
    api.patch_status(
        &cluster.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
