//! The agent's view of the `GpuLease`s of its node, for the plugin to hand GPUs to their worker
//! pods only: a kube watcher on the leases whose `spec.offer` is this node (a selectable field
//! of the CRD), published on a `watch` channel that the plugin reads. Tests feed that channel
//! themselves ([`crate::agent::Agent::with_leases`]).
//!
//! The agent reads no pods: which pods belong to which lease comes from the leases' own
//! `status.pods`, written by the controller.

use std::convert::Infallible;
use std::time::Duration;

use futures::StreamExt;
use gpumarket_crds::{GpuLease, LeasePhase};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::allocation::{NodeLease, PodName};

/// The lease as the plugin needs it, when it is an active lease of `node`. A lease without a
/// status yet is active (its phase defaults to Active) but lists no pods.
pub fn node_lease(lease: &GpuLease, node: &str) -> Option<NodeLease> {
    let status = lease.status.clone().unwrap_or_default();
    let active =
        status.phase.unwrap_or_default() == LeasePhase::Active && status.end_time.is_none();
    (lease.spec.offer == node && active).then(|| NodeLease {
        name: lease.name_any(),
        since: lease.spec.start_time.0,
        gpus: lease.spec.gpus.clone(),
        pods: status.pods.iter().map(|p| PodName::new(&p.namespace, &p.name)).collect(),
    })
}

/// The active leases of `node` among `leases`, by name.
pub fn node_leases<'a>(
    leases: impl IntoIterator<Item = &'a GpuLease>,
    node: &str,
) -> Vec<NodeLease> {
    let mut active: Vec<NodeLease> =
        leases.into_iter().filter_map(|l| node_lease(l, node)).collect();
    active.sort_by(|a, b| a.name.cmp(&b.name));
    active
}

/// Keeps `view` equal to the active leases of `node` until the future is dropped. API errors
/// are logged and retried with backoff; meanwhile the plugin keeps the last view it had.
pub async fn follow_leases(
    client: Client,
    node: String,
    view: watch::Sender<Vec<NodeLease>>,
) -> Infallible {
    let api: Api<GpuLease> = Api::all(client);
    let selector = format!("spec.offer={node}");
    loop {
        let (store, writer) = reflector::store();
        let mut events = watcher(api.clone(), watcher::Config::default().fields(&selector))
            .default_backoff()
            .reflect(writer)
            .boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => {
                    let leases = store.state();
                    let now = node_leases(leases.iter().map(|l| &**l), &node);
                    view.send_if_modified(|seen| {
                        let changed = *seen != now;
                        if changed {
                            tracing::info!(leases = ?now.iter().map(|l| &l.name).collect::<Vec<_>>(), "active leases of this node");
                            *seen = now;
                        }
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %e, "watching the GpuLeases of this node"),
            }
        }
        // The backoff stream does not end by itself; start over if it ever does.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpumarket_crds::{ClusterRef, GpuLeaseSpec, GpuLeaseStatus, LeasePod};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn lease(name: &str, offer: &str, status: Option<GpuLeaseStatus>) -> GpuLease {
        let mut lease = GpuLease::new(
            name,
            GpuLeaseSpec {
                cluster: ClusterRef { namespace: "ml".into(), name: "llm".into(), uid: "u".into() },
                offer: offer.into(),
                supplier_wallet: "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV".into(),
                gpus: vec!["GPU-0".into(), "GPU-1".into()],
                workers: 1,
                price_per_gpu_hour: 1,
                worker_resources: None,
                start_time: Time(jiff::Timestamp::from_second(100).expect("valid time")),
                terms: None,
            },
        );
        lease.status = status;
        lease
    }

    fn pod(name: &str) -> LeasePod {
        LeasePod { namespace: "ml".into(), name: name.into(), uid: "u".into(), ready: false }
    }

    #[test]
    fn only_active_leases_of_this_node_count_with_their_pods() {
        let serving = GpuLeaseStatus { pods: vec![pod("w-0")], ..Default::default() };
        let ended = GpuLeaseStatus {
            phase: Some(LeasePhase::Ended),
            pods: vec![pod("w-1")],
            ..Default::default()
        };
        let leases = [
            lease("b", "node-a", Some(serving)),
            lease("a", "node-a", None),
            lease("c", "node-a", Some(ended)),
            lease(
                "d",
                "node-b",
                Some(GpuLeaseStatus { pods: vec![pod("w-2")], ..Default::default() }),
            ),
        ];
        let view = node_leases(&leases, "node-a");
        let names: Vec<&str> = view.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(view[0].pods.is_empty(), "no status yet: no pods");
        assert_eq!(view[1].pods, [PodName::new("ml", "w-0")]);
        assert_eq!(view[1].gpus, ["GPU-0", "GPU-1"]);
        assert_eq!(view[1].since, jiff::Timestamp::from_second(100).expect("valid time"));
    }
}
