//! Binding GPUs to a GpuCluster without ever handing one GPU to two clusters.
//!
//! Choice: the allocation is recorded on the GpuOffer's status (`status.gpus[].lease`) with a
//! `resourceVersion` precondition, and the API server is the arbiter. Every claim is a
//! read-modify-replace of the offer status carrying the resourceVersion that was read: if another
//! reconcile or another replica (or the agent's heartbeat) wrote the offer in between, the API
//! server answers 409 Conflict and nothing is written: the claim is made again on a fresh read
//! while its GPUs are still free, and the cluster is matched again against fresh supply when
//! they are not. A GPU therefore names at most one lease at any time. Deterministic lease names
//! alone would not do: two different gangs can share a GPU without sharing a name.
//!
//! Order and crash safety: all claims of a gang first (rolled back if one fails), then the
//! GpuLease objects, named deterministically from (cluster uid, node, GPU set, bind time) so a
//! retried create finds the lease it already created, while a later placement on the same GPUs
//! (its earlier lease ended: the node failed and came back) gets a lease of its own. A crash
//! after the claims but before the leases leaves claims naming leases that do not exist: the
//! offer controller releases a claim whose lease has ended, or has been missing (confirmed
//! against the API, not only the cache) for a grace period longer than any bind takes; a
//! deleted cluster releases its claims in its finalizer.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpumarket_crds::{
    ClusterRef, GpuCluster, GpuLease, GpuLeaseSpec, GpuOffer, GpuOfferStatus, GpuState, LeasePhase,
    LeaseTerms,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::matching::{Assignment, WorkerSlot};
use crate::raycluster::CLUSTER_LABEL;
use crate::runtime::context::MANAGER;

/// Label on a lease carrying the GpuCluster's uid, for listing a cluster's leases.
pub const CLUSTER_UID_LABEL: &str = "gpumarket.io/cluster-uid";

/// Prefix of every lease name of `cluster`: its name (shortened) and the start of its uid, so a
/// re-created cluster of the same name never claims the old one's leases.
pub fn lease_prefix(cluster: &GpuCluster) -> String {
    let name: String = cluster.name_any().chars().take(40).collect();
    let uid: String = cluster.uid().unwrap_or_default().chars().take(8).collect();
    format!("{}-{uid}-", name.trim_end_matches(['-', '.']))
}

/// Deterministic lease name for `gpus` of `node` bound to `cluster` at `bound`.
pub fn lease_name(cluster: &GpuCluster, node: &str, gpus: &[String], bound: Timestamp) -> String {
    let mut sorted = gpus.to_vec();
    sorted.sort();
    let mut hasher = Sha256::new();
    hasher.update(cluster.uid().unwrap_or_default());
    hasher.update([0]);
    hasher.update(node);
    for gpu in &sorted {
        hasher.update([0]);
        hasher.update(gpu);
    }
    hasher.update([0]);
    hasher.update(bound.as_nanosecond().to_le_bytes());
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{}{hex}", lease_prefix(cluster))
}

/// The leases for an assignment: one per node, holding all of that node's workers.
pub fn plan_leases(
    cluster: &GpuCluster,
    assignment: &Assignment,
    wallets: &BTreeMap<String, String>,
    terms: &LeaseTerms,
    now: Timestamp,
) -> Result<Vec<GpuLease>> {
    let mut per_node: BTreeMap<&str, (Vec<String>, u32, &WorkerSlot)> = BTreeMap::new();
    for slot in &assignment.workers {
        let entry = per_node.entry(&slot.node).or_insert((Vec::new(), 0, slot));
        entry.0.extend(slot.gpus.iter().cloned());
        entry.1 += 1;
    }
    let cluster_ref = ClusterRef {
        namespace: cluster.namespace().unwrap_or_default(),
        name: cluster.name_any(),
        uid: cluster.uid().unwrap_or_default(),
    };
    per_node
        .into_iter()
        // The workers of one node come from one request on one offer: one price, one share.
        .map(|(node, (gpus, workers, first))| {
            let wallet = wallets.get(node).ok_or_else(|| {
                Error::InvalidSpec(format!("offer {node} vanished while binding"))
            })?;
            Ok(GpuLease {
                metadata: ObjectMeta {
                    name: Some(lease_name(cluster, node, &gpus, now)),
                    labels: Some(BTreeMap::from([
                        (CLUSTER_LABEL.to_string(), cluster_ref.name.clone()),
                        (CLUSTER_UID_LABEL.to_string(), cluster_ref.uid.clone()),
                    ])),
                    ..Default::default()
                },
                spec: GpuLeaseSpec {
                    cluster: cluster_ref.clone(),
                    offer: node.to_string(),
                    supplier_wallet: wallet.clone(),
                    gpus,
                    workers,
                    price_per_gpu_hour: first.price_per_gpu_hour,
                    worker_resources: first.resources,
                    start_time: Time(now),
                    terms: Some(terms.clone()),
                },
                status: None,
            })
        })
        .collect()
}

/// Why GPUs could not be claimed on an offer as read.
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimRefused {
    /// The GPU is allocated to another lease.
    Taken { gpu: String, lease: String },
    /// The GPU is not (or no longer) offered, or is unhealthy.
    Unavailable { gpu: String },
}

/// The offer status with `gpus` allocated to `lease`. Pure; a GPU already allocated to `lease`
/// is accepted (a retried bind).
pub fn claim(
    offer: &GpuOffer,
    gpus: &[String],
    lease: &str,
) -> Result<GpuOfferStatus, ClaimRefused> {
    let mut status = offer.status.clone().unwrap_or_default();
    for gpu in gpus {
        if !offer.spec.gpus.iter().any(|g| &g.uuid == gpu)
            || !crate::market::supply::gpu_healthy(offer, gpu)
        {
            return Err(ClaimRefused::Unavailable { gpu: gpu.clone() });
        }
        match status.gpus.iter_mut().find(|g| &g.uuid == gpu) {
            Some(state) => match &state.lease {
                Some(other) if other != lease => {
                    return Err(ClaimRefused::Taken { gpu: gpu.clone(), lease: other.clone() });
                }
                _ => state.lease = Some(lease.to_string()),
            },
            None => status.gpus.push(GpuState {
                uuid: gpu.clone(),
                health: None,
                reason: None,
                lease: Some(lease.to_string()),
            }),
        }
    }
    status.free_gpus = Some(count_free(offer, &status));
    Ok(status)
}

/// The offer status with every allocation to a lease in `leases` removed, or `None` if there
/// was none. Pure.
pub fn release(offer: &GpuOffer, is_released: impl Fn(&str) -> bool) -> Option<GpuOfferStatus> {
    let mut status = offer.status.clone()?;
    let mut changed = false;
    for state in &mut status.gpus {
        if state.lease.as_deref().is_some_and(&is_released) {
            state.lease = None;
            changed = true;
        }
    }
    status.free_gpus = Some(count_free(offer, &status));
    changed.then_some(status)
}

fn count_free(offer: &GpuOffer, status: &GpuOfferStatus) -> u32 {
    let with_status = GpuOffer {
        metadata: Default::default(),
        spec: offer.spec.clone(),
        status: Some(status.clone()),
    };
    crate::market::supply::free_gpus(&with_status).len() as u32
}

/// Write `status` to the offer, conditional on the resourceVersion it was read at.
async fn replace_offer_status(
    api: &Api<GpuOffer>,
    read: &GpuOffer,
    status: GpuOfferStatus,
) -> Result<()> {
    let mut updated = read.clone();
    updated.status = Some(status);
    updated.metadata.managed_fields = None;
    match api.replace_status(&read.name_any(), &PostParams::default(), &updated).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            Err(Error::AllocationConflict { offer: read.name_any() })
        }
        Err(e) => Err(e.into()),
    }
}

/// Claim every planned lease's GPUs on its offer, all at once and all or nothing (the claims
/// made are rolled back when one fails). `cached` gives the offer as last seen, which saves a
/// read when it is current; a stale copy costs a 409 and one fresh read. Every rollback is
/// tried even when one fails; a claim left behind that way has no lease, and the offer
/// controller frees it after its grace (`reclaim_allocations`).
pub async fn claim_all(
    offers: &Api<GpuOffer>,
    cached: impl Fn(&str) -> Option<Arc<GpuOffer>>,
    planned: &[GpuLease],
) -> Result<()> {
    let claims = planned.iter().map(|lease| claim_lease(offers, cached(&lease.spec.offer), lease));
    let mut claimed = Vec::new();
    let mut failed = None;
    for (lease, result) in planned.iter().zip(futures::future::join_all(claims).await) {
        match result {
            Ok(()) => claimed.push(lease),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let Some(e) = failed else { return Ok(()) };
    for lease in claimed {
        if let Err(release) = release_lease_claims(offers, lease).await {
            tracing::warn!(lease = %lease.name_any(), %release, "rollback of a claim failed");
        }
    }
    Err(e)
}

/// Create the planned leases (their GPUs claimed), Active, all at once. A lease that already
/// exists (a retried bind) is taken as it is.
pub async fn create_leases(
    leases_api: &Api<GpuLease>,
    planned: &[GpuLease],
) -> Result<Vec<GpuLease>> {
    futures::future::try_join_all(planned.iter().map(|lease| create_lease(leases_api, lease))).await
}

async fn create_lease(leases_api: &Api<GpuLease>, lease: &GpuLease) -> Result<GpuLease> {
    let lease = match leases_api.create(&PostParams::default(), lease).await {
        Ok(lease) => lease,
        Err(kube::Error::Api(e)) if e.code == 409 => leases_api.get(&lease.name_any()).await?,
        Err(e) => return Err(e.into()),
    };
    if lease.status.as_ref().and_then(|s| s.phase).is_some() {
        return Ok(lease);
    }
    let active = json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuLease",
        "status": {"phase": LeasePhase::Active},
    });
    let params = PatchParams::apply(MANAGER).force();
    Ok(leases_api.patch_status(&lease.name_any(), &params, &Patch::Apply(&active)).await?)
}

/// Claim `lease`'s GPUs on its offer: on the cached copy first, then, when that is stale, on
/// fresh reads for as long as the GPUs are still free. An offer is written often (heartbeats,
/// claims of its other GPUs by binds running at the same time), and none of those writes is a
/// reason to give up the gang.
async fn claim_lease(
    offers: &Api<GpuOffer>,
    cached: Option<Arc<GpuOffer>>,
    lease: &GpuLease,
) -> Result<()> {
    const ATTEMPTS: usize = 5;
    if let Some(offer) = cached {
        match claim_on(offers, &offer, lease).await {
            Ok(true) => return Ok(()),
            Ok(false) | Err(Error::AllocationConflict { .. }) => {} // a stale copy
            Err(e) => return Err(e),
        }
    }
    for _ in 0..ATTEMPTS {
        let offer = offers.get(&lease.spec.offer).await?;
        if claim_on(offers, &offer, lease).await? {
            return Ok(());
        }
    }
    Err(Error::AllocationConflict { offer: lease.spec.offer.clone() })
}

/// Claim `lease`'s GPUs on `offer` as read: `Ok(false)` when the offer was written since.
async fn claim_on(offers: &Api<GpuOffer>, offer: &GpuOffer, lease: &GpuLease) -> Result<bool> {
    let status = claim(offer, &lease.spec.gpus, &lease.name_any()).map_err(|refused| {
        tracing::debug!(offer = %lease.spec.offer, ?refused, "claim refused");
        Error::AllocationConflict { offer: lease.spec.offer.clone() }
    })?;
    match replace_offer_status(offers, offer, status).await {
        Ok(()) => Ok(true),
        Err(Error::AllocationConflict { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove the lease's allocations from its offer, retrying on write races. A missing offer has
/// nothing to release.
pub async fn release_lease_claims(offers: &Api<GpuOffer>, lease: &GpuLease) -> Result<()> {
    let name = lease.name_any();
    release_claims(offers, &lease.spec.offer, |l| l == name).await
}

/// Remove allocations on `offer_name` for which `is_released` holds, retrying on write races.
pub async fn release_claims(
    offers: &Api<GpuOffer>,
    offer_name: &str,
    is_released: impl Fn(&str) -> bool,
) -> Result<()> {
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let Some(offer) = offers.get_opt(offer_name).await? else {
            return Ok(());
        };
        let Some(status) = release(&offer, &is_released) else {
            return Ok(());
        };
        match replace_offer_status(offers, &offer, status).await {
            Err(Error::AllocationConflict { .. }) => continue,
            other => return other,
        }
    }
    Err(Error::AllocationConflict { offer: offer_name.to_string() })
}

#[cfg(test)]
mod tests {
    use gpumarket_crds::HostResources;

    use super::*;
    use crate::testing::{mk_cluster, mk_offer, now};

    #[test]
    fn lease_names_are_deterministic_and_distinct_per_gpu_set_and_bind() {
        let cluster = mk_cluster("train", 1, 2);
        let bound = now();
        let a = lease_name(&cluster, "node-a", &["g2".into(), "g1".into()], bound);
        assert_eq!(a, lease_name(&cluster, "node-a", &["g1".into(), "g2".into()], bound));
        assert_ne!(a, lease_name(&cluster, "node-a", &["g1".into(), "g3".into()], bound));
        assert!(a.starts_with(&lease_prefix(&cluster)));
        let mut recreated = mk_cluster("train", 1, 2);
        recreated.metadata.uid = Some("99999999-other".into());
        assert_ne!(a, lease_name(&recreated, "node-a", &["g1".into(), "g2".into()], bound));
        // The same GPUs bound again later (the first lease ended) are another lease.
        let later = bound + jiff::SignedDuration::from_secs(30);
        assert_ne!(a, lease_name(&cluster, "node-a", &["g1".into(), "g2".into()], later));
    }

    #[test]
    fn one_lease_per_node_holding_its_workers() {
        let cluster = mk_cluster("train", 3, 1);
        let share = HostResources { cpu_millicores: 8_000, memory_bytes: 64 << 30 };
        let slot =
            |node: &str, gpu: &str, price: u64, resources: Option<HostResources>| WorkerSlot {
                node: node.into(),
                gpus: vec![gpu.into()],
                price_per_gpu_hour: price,
                resources,
            };
        let assignment = Assignment {
            workers: vec![
                slot("b", "b1", 7, None),
                slot("a", "a1", 5, Some(share)),
                slot("a", "a2", 5, Some(share)),
            ],
        };
        let wallets = BTreeMap::from([
            ("a".to_string(), "wa".to_string()),
            ("b".to_string(), "wb".to_string()),
        ]);
        let terms = LeaseTerms { heartbeat_timeout_seconds: 60, ..LeaseTerms::default() };
        let leases = plan_leases(&cluster, &assignment, &wallets, &terms, now()).expect("plans");
        assert_eq!(leases.len(), 2);
        assert_eq!((leases[0].spec.offer.as_str(), leases[0].spec.workers), ("a", 2));
        assert_eq!(leases[0].spec.gpus, ["a1", "a2"]);
        assert_eq!(leases[0].spec.supplier_wallet, "wa");
        assert_eq!(leases[0].spec.worker_resources, Some(share), "each worker's CPU and memory");
        assert_eq!((leases[1].spec.offer.as_str(), leases[1].spec.workers), ("b", 1));
        assert_eq!(leases[1].spec.worker_resources, None, "an offer without allocatable");
        assert_eq!(leases[1].spec.cluster.uid, cluster.uid().unwrap_or_default());
        assert!(leases.iter().all(|l| l.spec.terms.as_ref() == Some(&terms)), "terms frozen");
    }

    #[test]
    fn a_gpu_is_never_claimed_for_two_leases() {
        let offer = mk_offer("n", "H100", 2, now());
        let gpus = vec!["n-gpu-0".to_string()];
        let status = claim(&offer, &gpus, "lease-1").expect("free");
        assert_eq!(status.free_gpus, Some(1));
        let taken = GpuOffer { status: Some(status), ..offer.clone() };
        assert_eq!(
            claim(&taken, &gpus, "lease-1").map(|s| s.free_gpus),
            Ok(Some(1)),
            "retry is idempotent"
        );
        assert_eq!(
            claim(&taken, &gpus, "lease-2"),
            Err(ClaimRefused::Taken { gpu: "n-gpu-0".into(), lease: "lease-1".into() })
        );
        assert_eq!(
            claim(&offer, &["ghost".to_string()], "lease-1"),
            Err(ClaimRefused::Unavailable { gpu: "ghost".into() })
        );
        let released = release(&taken, |l| l == "lease-1").expect("had a claim");
        assert_eq!(released.free_gpus, Some(2));
        assert!(release(&taken, |l| l == "other").is_none());
    }

    /// A gang whose last claim loses a race gives back the claims already made, each of them
    /// even when giving back another fails: scripted API calls.
    #[tokio::test]
    async fn a_lost_claim_rolls_back_the_claims_already_made() {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let offers: Api<GpuOffer> = Api::all(client.clone());
        let cluster = mk_cluster("train", 3, 1);
        let leases: Vec<GpuLease> = ["a", "b", "c"]
            .into_iter()
            .map(|node| crate::testing::mk_lease(&cluster, node, &[&format!("{node}-gpu-0")], 1))
            .collect();
        let cache: Vec<Arc<GpuOffer>> = ["a", "b", "c"]
            .into_iter()
            .map(|node| {
                let mut offer = mk_offer(node, "H100", 1, now());
                offer.metadata.resource_version = Some("1".into());
                Arc::new(offer)
            })
            .collect();
        let offer_c = (*cache[2]).clone();

        let server = tokio::spawn(async move {
            let respond = |code: u16, body: serde_json::Value| {
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response")
            };
            let path = |node: &str| format!("/apis/gpumarket.io/v1alpha1/gpuoffers/{node}");
            // a and b: claimed from the cached copies.
            let mut claimed = BTreeMap::new();
            for node in ["a", "b"] {
                let (req, send) = handle.next_request().await.expect("claim");
                assert_eq!(
                    (req.method().as_str(), req.uri().path()),
                    ("PUT", format!("{}/status", path(node)).as_str())
                );
                let body: GpuOffer =
                    serde_json::from_slice(&req.into_body().collect_bytes().await.expect("body"))
                        .expect("offer");
                assert_eq!(
                    body.metadata.resource_version.as_deref(),
                    Some("1"),
                    "conditional on what was read"
                );
                send.send_response(respond(200, serde_json::to_value(&body).expect("json")));
                claimed.insert(node, body);
            }
            // c: the cached copy is stale, the fresh one too (another replica won).
            let (req, send) = handle.next_request().await.expect("claim c");
            assert_eq!(req.uri().path(), format!("{}/status", path("c")));
            send.send_response(respond(409, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "modified"})));
            let (req, send) = handle.next_request().await.expect("fresh read of c");
            assert_eq!((req.method().as_str(), req.uri().path()), ("GET", path("c").as_str()));
            let mut taken = offer_c;
            taken.status.get_or_insert_default().gpus = vec![GpuState {
                uuid: "c-gpu-0".into(),
                health: None,
                reason: None,
                lease: Some("someone-else".into()),
            }];
            send.send_response(respond(200, serde_json::to_value(&taken).expect("json")));
            // rollback of a: the read fails.
            let (req, send) = handle.next_request().await.expect("read a for rollback");
            assert_eq!((req.method().as_str(), req.uri().path()), ("GET", path("a").as_str()));
            send.send_response(respond(500, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd down"})));
            // rollback of b all the same: read, then write without the claim.
            let (req, send) = handle.next_request().await.expect("read b for rollback");
            assert_eq!((req.method().as_str(), req.uri().path()), ("GET", path("b").as_str()));
            send.send_response(respond(200, serde_json::to_value(&claimed["b"]).expect("json")));
            let (req, send) = handle.next_request().await.expect("release b");
            assert_eq!(
                (req.method().as_str(), req.uri().path()),
                ("PUT", format!("{}/status", path("b")).as_str())
            );
            let body: GpuOffer =
                serde_json::from_slice(&req.into_body().collect_bytes().await.expect("body"))
                    .expect("offer");
            assert!(
                body.status.iter().flat_map(|s| &s.gpus).all(|g| g.lease.is_none()),
                "claim on b released"
            );
            send.send_response(respond(200, serde_json::to_value(&body).expect("json")));
        });

        let cached =
            |name: &str| cache.iter().find(|o| o.metadata.name.as_deref() == Some(name)).cloned();
        let result = claim_all(&offers, cached, &leases).await;
        assert!(
            matches!(result, Err(Error::AllocationConflict { ref offer }) if offer == "c"),
            "the lost claim is the error, not the failed rollback: {result:?}"
        );
        server.await.expect("scripted calls all made");
    }
}
