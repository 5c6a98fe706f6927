//! Events on the buyer's GpuCluster for what settlement did: leases paid in full, failed
//! suppliers' stakes slashed, the deposit refunded. Best effort, like the controller's Events: a
//! failure to publish is logged, never fatal.
//!
//! What a round brings to leases is gathered and told at its end, one Event per cluster and
//! reason: a cluster of 64 workers ending is one `Settled` Event, not 64 (settling 10,000
//! leases would otherwise write 10,000 Events, a third of settlement's writes).

use std::collections::BTreeMap;
use std::sync::Mutex;

use gpumarket_crds::{Amount, GpuCluster, GpuLease, LeasePhase, SettlementRecord, SettlementState};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

use super::round::MANAGER;
use super::stake::SLASH_PERIOD;

/// Notes are kept under the Event API's 1 kB: leases past this many characters of listing are
/// counted, not named.
const LISTING_CHARS: usize = 640;

/// Publishes settlement's Events.
pub struct ClusterEvents {
    recorder: Recorder,
    /// Lease news of the round so far, by cluster uid (with the cluster as Event object).
    gathered: Mutex<BTreeMap<String, (ObjectReference, Vec<LeaseNews>)>>,
}

impl ClusterEvents {
    pub fn new(client: Client) -> Self {
        let reporter =
            Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        ClusterEvents { recorder: Recorder::new(client, reporter), gathered: Mutex::default() }
    }

    /// Gather what a lease update brought the buyer (see [`lease_news`]), told at [`Self::flush`].
    pub fn lease_changed(&self, before: &GpuLease, after: &GpuLease) {
        let news = lease_news(before, after);
        if news.is_empty() {
            return;
        }
        let mut gathered = self.gathered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let cluster = lease_cluster(after);
        let uid = cluster.uid.clone().unwrap_or_default();
        gathered.entry(uid).or_insert_with(|| (cluster, Vec::new())).1.extend(news);
    }

    /// Tell each cluster what its leases' news were, one Event per reason.
    pub async fn flush(&self) {
        let gathered = std::mem::take(
            &mut *self.gathered.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (cluster, news) in gathered.into_values() {
            for (reason, note) in told(&news) {
                self.publish(&cluster, reason, note).await;
            }
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
        self.publish(&cluster.object_ref(&()), "Refunded", note).await;
    }

    async fn publish(&self, cluster: &ObjectReference, reason: &str, note: String) {
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Settle".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, cluster).await {
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

/// Something a lease update brought that the buyer hears of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseNews {
    pub lease: String,
    pub offer: String,
    pub what: News,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum News {
    /// Paid in full: the amount paid for the GPU-seconds served.
    Settled { paid: u64, gpu_seconds: u64 },
    /// A slash of the supplier's stake, paid to the buyer, is confirmed.
    Slashed { amount: u64 },
}

impl News {
    fn reason(&self) -> &'static str {
        match self {
            News::Settled { .. } => "Settled",
            News::Slashed { .. } => "Slashed",
        }
    }

    /// What moved: paid to the supplier, or slashed to the buyer.
    fn amount(&self) -> u64 {
        match *self {
            News::Settled { paid, .. } => paid,
            News::Slashed { amount } => amount,
        }
    }
}

/// What a lease update brought that the buyer hears of: the lease paid in full, a slash of the
/// supplier's stake confirmed.
pub fn lease_news(before: &GpuLease, after: &GpuLease) -> Vec<LeaseNews> {
    let phase = |l: &GpuLease| l.status.as_ref().and_then(|s| s.phase);
    let slash = |l: &GpuLease| {
        l.status
            .as_ref()?
            .settlements
            .iter()
            .find(|r| r.period == SLASH_PERIOD && r.state == SettlementState::Confirmed)
            .map(|r| r.amount)
    };
    let news = |what| LeaseNews { lease: after.name_any(), offer: after.spec.offer.clone(), what };
    let mut told = Vec::new();
    if phase(after) == Some(LeasePhase::Settled) && phase(before) != Some(LeasePhase::Settled) {
        let status = after.status.clone().unwrap_or_default();
        told.push(news(News::Settled {
            paid: status.amount_settled.unwrap_or(0),
            gpu_seconds: status.served_gpu_seconds.unwrap_or(0),
        }));
    }
    if let (None, Some(amount)) = (slash(before), slash(after)) {
        told.push(news(News::Slashed { amount }));
    }
    told
}

/// One cluster's lease news as (reason, note), one per reason, in the order first heard: a
/// single lease's news in full, several summed with each lease named (as many as fit).
pub fn told(news: &[LeaseNews]) -> Vec<(&'static str, String)> {
    let mut reasons: Vec<&'static str> = Vec::new();
    for n in news {
        if !reasons.contains(&n.what.reason()) {
            reasons.push(n.what.reason());
        }
    }
    reasons
        .into_iter()
        .map(|reason| {
            let of: Vec<&LeaseNews> = news.iter().filter(|n| n.what.reason() == reason).collect();
            (reason, note(&of))
        })
        .collect()
}

/// The note of news of one reason.
fn note(news: &[&LeaseNews]) -> String {
    let amount: u64 = news.iter().map(|n| n.what.amount()).sum();
    let gpu_seconds: u64 = news
        .iter()
        .map(|n| match n.what {
            News::Settled { gpu_seconds, .. } => gpu_seconds,
            News::Slashed { .. } => 0,
        })
        .sum();
    match (news, &news.first().map(|n| &n.what)) {
        ([one], Some(News::Settled { .. })) => format!(
            "lease {} on {} settled: {} paid for {gpu_seconds} GPU-seconds",
            one.lease,
            one.offer,
            Amount::new(amount)
        ),
        ([one], _) => format!(
            "{} of node {}'s stake paid to the buyer for its failure",
            Amount::new(amount),
            one.offer
        ),
        (_, Some(News::Settled { .. })) => format!(
            "{} leases settled: {} paid for {gpu_seconds} GPU-seconds ({})",
            news.len(),
            Amount::new(amount),
            listing(news)
        ),
        _ => format!(
            "{} of {} nodes' stakes paid to the buyer for their failures ({})",
            Amount::new(amount),
            news.len(),
            listing(news)
        ),
    }
}

/// "lease on node: amount", for as many as fit in [`LISTING_CHARS`], then how many more.
fn listing(news: &[&LeaseNews]) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut length = 0;
    for n in news {
        let item = format!("{} on {}: {}", n.lease, n.offer, Amount::new(n.what.amount()));
        if length + item.len() > LISTING_CHARS {
            items.push(format!("and {} more", news.len() - items.len()));
            break;
        }
        length += item.len() + 2;
        items.push(item);
    }
    items.join("; ")
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
        let name = settled.name_any();
        let heard = |what| LeaseNews { lease: name.clone(), offer: "n1".into(), what };
        assert_eq!(
            news,
            [
                heard(News::Settled { paid: 7_000_000, gpu_seconds: 7 }),
                heard(News::Slashed { amount: 250 })
            ]
        );
        let told = told(&news);
        assert_eq!(
            told[0],
            ("Settled", format!("lease {name} on n1 settled: 7.000000 paid for 7 GPU-seconds"))
        );
        assert_eq!(
            told[1],
            ("Slashed", "0.000250 of node n1's stake paid to the buyer for its failure".into())
        );
        assert!(lease_news(&settled, &settled).is_empty(), "nothing new");

        let mut signed = ended.clone();
        signed.status = Some(GpuLeaseStatus {
            settlements: vec![record(SLASH_PERIOD, SettlementState::Signed, 250)],
            ..GpuLeaseStatus::default()
        });
        assert!(lease_news(&ended, &signed).is_empty(), "a slash counts once confirmed");
        assert_eq!(lease_cluster(&settled).uid.as_deref(), Some("c-0000-uid"));
    }

    #[test]
    fn a_cluster_hears_of_many_leases_in_one_event_per_reason_that_fits_the_event_api() {
        let settled = |i: u64| LeaseNews {
            lease: format!("lease-{i}"),
            offer: format!("node-{i}"),
            what: News::Settled { paid: 1_000_000 * i, gpu_seconds: i },
        };
        let slashed = |i: u64| LeaseNews {
            lease: format!("lease-{i}"),
            offer: format!("node-{i}"),
            what: News::Slashed { amount: i },
        };
        let news = vec![settled(1), slashed(8), settled(2), slashed(9)];
        let told = told(&news);
        assert_eq!(
            told,
            [
                (
                    "Settled",
                    "2 leases settled: 3.000000 paid for 3 GPU-seconds (lease-1 on node-1: 1.000000; lease-2 on node-2: 2.000000)".to_owned()
                ),
                (
                    "Slashed",
                    "0.000017 of 2 nodes' stakes paid to the buyer for their failures (lease-8 on node-8: 0.000008; lease-9 on node-9: 0.000009)".to_owned()
                ),
            ]
        );

        // 10,000 leases of one cluster: one Event, its note within the API's 1 kB.
        let many: Vec<LeaseNews> = (1..=10_000).map(settled).collect();
        let told = super::told(&many);
        assert_eq!(told.len(), 1);
        let note = &told[0].1;
        assert!(note.starts_with("10000 leases settled: 50005000.000000 paid for 50005000 GPU-seconds (lease-1 on node-1: 1.000000; "), "{note}");
        assert!(note.len() < 1024, "{} characters", note.len());
        let named = note.matches(" on node-").count();
        assert!(note.ends_with(&format!("; and {} more)", 10_000 - named)), "{note}");
    }
}
