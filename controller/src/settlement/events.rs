//! Events on the buyer's GpuCluster for what settlement did: a lease paid in full, a failed
//! supplier's stake slashed, the deposit refunded. Best effort, like the controller's Events: a
//! failure to publish is logged, never fatal.

use gpumarket_crds::{Amount, GpuCluster, GpuLease, LeasePhase, SettlementRecord, SettlementState};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

use super::round::MANAGER;
use super::stake::SLASH_PERIOD;

/// Publishes settlement's Events.
pub struct ClusterEvents {
    recorder: Recorder,
}

impl ClusterEvents {
    pub fn new(client: Client) -> Self {
        let reporter =
            Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        ClusterEvents { recorder: Recorder::new(client, reporter) }
    }

    /// Tell the buyer what a lease update brought (see [`lease_news`]).
    pub async fn lease_changed(&self, before: &GpuLease, after: &GpuLease) {
        for (reason, note) in lease_news(before, after) {
            // The lease as related object: news of two leases are two Events, not one series.
            self.publish(lease_cluster(after), Some(after.object_ref(&())), reason, note).await;
        }
    }

    /// The refund of `cluster`'s deposit is confirmed.
    pub async fn refunded(&self, cluster: &GpuCluster, record: &SettlementRecord) {
        let to = &cluster.spec.payment.buyer_wallet;
        let note = match &record.signature {
            Some(signature) => {
                format!("refunded {} to {to} (transaction {signature})", Amount::new(record.amount))
            }
            None => "nothing left of the deposit to refund".to_owned(),
        };
        self.publish(cluster.object_ref(&()), None, "Refunded", note).await;
    }

    async fn publish(
        &self,
        cluster: ObjectReference,
        related: Option<ObjectReference>,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Settle".into(),
            secondary: related,
        };
        if let Err(e) = self.recorder.publish(&event, &cluster).await {
            tracing::warn!(error = %e, reason, "publishing settlement event");
        }
    }
}

/// The GpuCluster a lease belongs to, as an Event's regarding object.
fn lease_cluster(lease: &GpuLease) -> ObjectReference {
    ObjectReference {
        api_version: Some(GpuCluster::api_version(&()).into_owned()),
        kind: Some(GpuCluster::kind(&()).into_owned()),
        namespace: Some(lease.spec.cluster.namespace.clone()),
        name: Some(lease.spec.cluster.name.clone()),
        uid: Some(lease.spec.cluster.uid.clone()),
        ..ObjectReference::default()
    }
}

/// What a lease update brought that the buyer hears of, as (reason, note): the lease paid in
/// full (`Settled`), a slash of the supplier's stake confirmed (`Slashed`).
pub fn lease_news(before: &GpuLease, after: &GpuLease) -> Vec<(&'static str, String)> {
    let phase = |l: &GpuLease| l.status.as_ref().and_then(|s| s.phase);
    let slash = |l: &GpuLease| {
        l.status
            .as_ref()?
            .settlements
            .iter()
            .find(|r| r.period == SLASH_PERIOD && r.state == SettlementState::Confirmed)
            .map(|r| r.amount)
    };
    let mut news = Vec::new();
    if phase(after) == Some(LeasePhase::Settled) && phase(before) != Some(LeasePhase::Settled) {
        let status = after.status.clone().unwrap_or_default();
        news.push((
            "Settled",
            format!(
                "lease {} on {} settled: {} paid for {} GPU-seconds",
                after.name_any(),
                after.spec.offer,
                Amount::new(status.amount_settled.unwrap_or(0)),
                status.served_gpu_seconds.unwrap_or(0)
            ),
        ));
    }
    if let (None, Some(amount)) = (slash(before), slash(after)) {
        news.push((
            "Slashed",
            format!(
                "{} of node {}'s stake paid to the buyer for its failure",
                Amount::new(amount),
                after.spec.offer
            ),
        ));
    }
    news
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease};
    use gpumarket_crds::GpuLeaseStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn record(period: &str, state: SettlementState, amount: u64) -> SettlementRecord {
        SettlementRecord {
            period: period.into(),
            through: Time(crate::testing::now()),
            amount,
            conversion: None,
            signature: None,
            last_valid_block_height: None,
            signed_slot: None,
            transaction: None,
            state,
        }
    }

    #[test]
    fn the_buyer_hears_of_a_settled_lease_and_a_slash_once() {
        let cluster = mk_cluster("c", 1, 1);
        let ended = mk_lease(&cluster, "n1", &["g"], 1);
        let mut settled = ended.clone();
        settled.status = Some(GpuLeaseStatus {
            phase: Some(LeasePhase::Settled),
            amount_settled: Some(7_000_000),
            served_gpu_seconds: Some(7),
            settlements: vec![
                record("0001", SettlementState::Confirmed, 7_000_000),
                record(SLASH_PERIOD, SettlementState::Confirmed, 250),
            ],
            ..GpuLeaseStatus::default()
        });
        let news = lease_news(&ended, &settled);
        let reasons: Vec<&str> = news.iter().map(|(r, _)| *r).collect();
        assert_eq!(reasons, ["Settled", "Slashed"]);
        assert!(news[0].1.contains("settled: 7.000000 paid for 7 GPU-seconds"), "{}", news[0].1);
        assert!(news[1].1.contains("node n1's stake"), "{}", news[1].1);
        assert!(lease_news(&settled, &settled).is_empty(), "nothing new");

        let mut signed = ended.clone();
        signed.status = Some(GpuLeaseStatus {
            settlements: vec![record(SLASH_PERIOD, SettlementState::Signed, 250)],
            ..GpuLeaseStatus::default()
        });
        assert!(lease_news(&ended, &signed).is_empty(), "a slash counts once confirmed");
        assert_eq!(lease_cluster(&settled).uid.as_deref(), Some("c-0000-uid"));
    }
}
