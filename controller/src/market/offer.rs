//! The GpuOffer controller: decides whether an offer can be matched (`Available`: fresh
//! heartbeat, at least one healthy GPU), keeps `freeGpus` current, wakes up when a heartbeat is
//! due so a silent node is noticed, and reclaims allocations whose lease ended or never came to
//! exist.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpumarket_crds::common::is_valid_wallet;
use gpumarket_crds::{GpuLease, GpuOffer, LeasePhase};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use crate::cluster::status::set_condition;
use crate::error::{Error, Result};
use crate::market::supply::{free_gpus, gpu_healthy, heartbeat_deadline, heartbeat_fresh};
use crate::market::{binding, proof};
use crate::runtime::cache;
use crate::runtime::context::{Context, MANAGER};
use crate::verification::{self, VERIFIED};

pub const AVAILABLE: &str = "Available";
const CONTROLLER: &str = "gpuoffer";
/// Offers reconciled at once, at most. A start reconciles every offer: each reconcile in flight
/// holds its status patch and task (about 10 KB), while the client sends only
/// `REQUESTS_IN_FLIGHT` requests at a time; enough wait together at the signing-time lock to
/// share its writes.
const RECONCILES_AT_ONCE: u16 = 512;
/// An offer with a fresh heartbeat is looked at again at least this often.
const RECHECK: Duration = Duration::from_secs(60);

/// Availability of an offer as (available, reason, message). Pure.
pub fn availability(
    offer: &GpuOffer,
    now: Timestamp,
    heartbeat_timeout: Duration,
) -> (bool, &'static str, String) {
    // The schema checks the characters; only decoding tells a key from a look-alike, and a
    // payout to it could never be made.
    if !is_valid_wallet(&offer.spec.wallet) {
        return (
            false,
            "InvalidWallet",
            format!(
                "spec.wallet {:?} is not a Solana public key (it does not decode to 32 bytes): \
                 set the supplier agent's wallet to the address that receives payouts",
                offer.spec.wallet
            ),
        );
    }
    if offer.spec.gpus.is_empty() {
        return (false, "NoGpus", "the offer lists no GPUs".into());
    }
    if !heartbeat_fresh(offer, now, heartbeat_timeout) {
        return (
            false,
            "HeartbeatStale",
            format!("no heartbeat from the node's agent within {}s", heartbeat_timeout.as_secs()),
        );
    }
    let healthy = offer.spec.gpus.iter().filter(|g| gpu_healthy(offer, &g.uuid)).count();
    if healthy == 0 {
        return (false, "NoHealthyGpus", "every GPU of the offer is reported unhealthy".into());
    }
    (true, "Ready", format!("{healthy} of {} GPUs healthy", offer.spec.gpus.len()))
}

pub async fn reconcile(offer: Arc<GpuOffer>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_duration.with_label_values(&[CONTROLLER]).start_timer();
    ctx.metrics.reconciles.with_label_values(&[CONTROLLER]).inc();
    let now = Timestamp::now();
    let timeout = ctx.settings().heartbeat_timeout;

    reclaim_allocations(&offer, &ctx).await?;

    let (available, reason, message) = availability(&offer, now, timeout);
    // The whole cache is read for the verdict (GPUs shared with other offers) and let go
    // before anything is awaited: a start reconciles every offer at once.
    let verdict = {
        let listed = ctx.offers.state();
        let listed: Vec<&GpuOffer> = listed.iter().map(AsRef::as_ref).collect();
        verification::verdict(&offer, &listed, &ctx.signatures, &ctx.settings(), &|fleet| {
            ctx.fleet_wallet(fleet)
        })
    };
    ctx.record_signing_time(&offer.name_any()).await?;
    let status = offer.status.clone().unwrap_or_default();
    let mut conditions = status.conditions.clone();
    set_condition(
        &mut conditions,
        AVAILABLE,
        available,
        reason,
        message.clone(),
        now,
        offer.metadata.generation,
    );
    set_condition(
        &mut conditions,
        VERIFIED,
        verdict.admitted,
        verdict.reason,
        verdict.message.clone(),
        now,
        offer.metadata.generation,
    );
    let ours = |c: &&Condition| c.type_ == AVAILABLE || c.type_ == VERIFIED;
    let written: Vec<Condition> = conditions.iter().filter(ours).cloned().collect();
    let shown =
        |c: &Condition| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone());
    let previous = status.conditions.iter().find(|c| c.type_ == AVAILABLE);
    let previous_verdict = verification::condition(&offer);
    let free = free_gpus(&offer).len() as u32;
    let changed = status.conditions.iter().filter(ours).map(shown).collect::<Vec<_>>()
        != written.iter().map(shown).collect::<Vec<_>>()
        || status.free_gpus != Some(free)
        || status.observed_generation != offer.metadata.generation;
    if !verdict.admitted
        && previous_verdict
            .is_none_or(|c| c.reason != verdict.reason || c.message != verdict.message)
    {
        ctx.event(&*offer, EventType::Warning, verdict.reason, "Verify", verdict.message.clone())
            .await;
    }
    if changed {
        if !available && previous.is_some_and(|c| c.status == "True")
            || reason == "NoGpus" && previous.is_none()
        {
            ctx.event(&*offer, EventType::Warning, reason, "Check", message).await;
        }
        let patch = json!({
            "apiVersion": "gpumarket.io/v1alpha1",
            "kind": "GpuOffer",
            "status": {
                "conditions": written,
                "freeGpus": free,
                "observedGeneration": offer.metadata.generation,
            },
        });
        Api::<GpuOffer>::all(ctx.client.clone())
            .patch_status(
                &offer.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
    }

    let proof_due = proof::advance(&offer, available, &ctx).await?;
    let next = match heartbeat_deadline(&offer, timeout).filter(|_| available) {
        Some(deadline) => {
            deadline.duration_since(now).unsigned_abs().min(RECHECK) + Duration::from_millis(200)
        }
        None => RECHECK,
    };
    let next = proof_due.map_or(next, |due| due.min(next));
    Ok(Action::requeue(next))
}

/// Release allocations to leases that ended, or that are missing for longer than the grace
/// period (checked against the API, not only the cache, before anything is released).
async fn reclaim_allocations(offer: &GpuOffer, ctx: &Context) -> Result<()> {
    let Some(status) = &offer.status else { return Ok(()) };
    let leases: Api<GpuLease> = Api::all(ctx.client.clone());
    let mut stale = Vec::new();
    for name in status.gpus.iter().filter_map(|g| g.lease.as_deref()) {
        if stale.iter().any(|s: &String| s == name) {
            continue;
        }
        let cached = ctx.leases.get(&ObjectRef::new(name));
        let ended = |l: &GpuLease| {
            l.status.as_ref().and_then(|s| s.phase).unwrap_or_default() != LeasePhase::Active
        };
        match cached {
            Some(lease) if ended(&lease) => stale.push(name.to_string()),
            Some(_) => {}
            None => {
                let first_seen = *ctx
                    .orphans_seen
                    .lock()
                    .map_err(|_| Error::InvalidSpec("orphan tracker poisoned".into()))?
                    .entry(name.to_string())
                    .or_insert_with(Instant::now);
                if first_seen.elapsed() >= ctx.settings.orphan_grace {
                    match leases.get_opt(name).await? {
                        None => stale.push(name.to_string()),
                        Some(lease) if ended(&lease) => stale.push(name.to_string()),
                        Some(_) => {}
                    }
                }
            }
        }
    }
    if stale.is_empty() {
        return Ok(());
    }
    tracing::info!(offer = %offer.name_any(), leases = ?stale, "reclaiming GPU allocations of ended or missing leases");
    binding::release_claims(&Api::all(ctx.client.clone()), &offer.name_any(), |l| {
        stale.iter().any(|s| s == l)
    })
    .await?;
    if let Ok(mut seen) = ctx.orphans_seen.lock() {
        for name in &stale {
            seen.remove(name);
        }
    }
    Ok(())
}

pub fn error_policy(offer: Arc<GpuOffer>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.with_label_values(&[CONTROLLER, error.metric_label()]).inc();
    tracing::warn!(offer = %offer.name_any(), %error, "offer reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Run the controller on the shared offer cache (`ctx.offers`), whose `changes` trigger it: the
/// offers are the largest cache, and one copy of them is enough.
pub async fn run(ctx: Arc<Context>, changes: Arc<cache::Changes<GpuOffer>>) {
    cache::controller_on(ctx.offers.clone(), changes)
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILES_AT_ONCE))
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "gpuoffer reconcile");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_offer, now};
    use gpumarket_crds::{GpuHealth, GpuState};

    #[test]
    fn availability_needs_gpus_a_fresh_heartbeat_and_a_healthy_gpu() {
        let timeout = Duration::from_secs(30);
        assert_eq!(availability(&mk_offer("n", "H100", 2, now()), now(), timeout).1, "Ready");
        assert_eq!(availability(&mk_offer("n", "H100", 0, now()), now(), timeout).1, "NoGpus");
        let stale = mk_offer("n", "H100", 2, now() - jiff::SignedDuration::from_secs(31));
        assert_eq!(availability(&stale, now(), timeout).1, "HeartbeatStale");
        let mut sick = mk_offer("n", "H100", 1, now());
        sick.status.get_or_insert_default().gpus = vec![GpuState {
            uuid: "n-gpu-0".into(),
            health: Some(GpuHealth::Unhealthy),
            reason: None,
            lease: None,
        }];
        let (ok, reason, _) = availability(&sick, now(), timeout);
        assert!(!ok);
        assert_eq!(reason, "NoHealthyGpus");
    }

    #[test]
    fn a_wallet_that_does_not_decode_to_32_bytes_is_not_available() {
        let timeout = Duration::from_secs(30);
        let mut offer = mk_offer("n", "H100", 2, now());
        // Base-58 characters of the right length, but 33 bytes once decoded.
        offer.spec.wallet = "z".repeat(44);
        let (ok, reason, message) = availability(&offer, now(), timeout);
        assert!(!ok);
        assert_eq!(reason, "InvalidWallet");
        assert!(message.starts_with("spec.wallet \"zzz"), "{message}");
        assert!(message.contains("does not decode to 32 bytes"), "{message}");
    }
}
