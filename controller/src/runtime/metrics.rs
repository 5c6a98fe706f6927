//! Prometheus metrics, and the HTTP endpoint serving them with health and readiness.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use gpumarket_crds::{ClusterPhase, GpuCluster, GpuLease, GpuOffer};
use jiff::Timestamp;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cluster::status::is_active;
use crate::market::supply::{gpu_healthy, gpu_lease};
use crate::settlement::earnings;

/// Every metric of the controller, registered in its own registry (no globals).
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub pending_requests: IntGauge,
    pub gpus: IntGaugeVec,
    pub match_latency: Histogram,
    pub active_leases: IntGauge,
    pub replacements: IntCounter,
    /// Reads of a cluster's leases by a reconcile, by source: `cache` or `api` (see
    /// `cluster::lease_view`).
    pub lease_reads: IntCounterVec,
    /// Settlement rounds by outcome: `ok` or the error's stable label.
    pub settlement_rounds: IntCounterVec,
    /// What settlement rounds did, by action (payouts sent, confirmed, refunds sent, ...).
    pub settlement_actions: IntCounterVec,
    /// Age of the oldest served GPU-second not confirmed paid (see `earnings::settlement_lag`).
    pub settlement_lag: IntGauge,
    /// Supplier earnings by node and model over the leases the API server holds: GPU-seconds
    /// served, base units confirmed paid, base units metered and not paid yet.
    pub served_gpu_seconds: IntGaugeVec,
    pub paid: IntGaugeVec,
    pub pending: IntGaugeVec,
    /// Set once the caches are filled (and, with leader election, while leading).
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("gpumarket".into()), None)?;
        let reconciles =
            IntCounterVec::new(Opts::new("reconciles_total", "Reconciles run"), &["controller"])?;
        let errors = IntCounterVec::new(
            Opts::new("reconcile_errors_total", "Reconciles that failed, by error kind"),
            &["controller", "error"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Time spent in one reconcile")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["controller"],
        )?;
        let pending_requests = IntGauge::new("pending_requests", "GpuClusters waiting for supply")?;
        let gpus = IntGaugeVec::new(
            Opts::new("gpus", "Offered GPUs by model and state"),
            &["model", "state"],
        )?;
        let match_latency = Histogram::with_opts(
            HistogramOpts::new(
                "match_latency_seconds",
                "Time the matching engine takes for one request",
            )
            .buckets(vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]),
        )?;
        let active_leases = IntGauge::new("active_leases", "GpuLeases currently metering")?;
        let replacements =
            IntCounter::new("replacements_total", "Workers re-placed after a supplier failure")?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(pending_requests.clone()))?;
        registry.register(Box::new(gpus.clone()))?;
        registry.register(Box::new(match_latency.clone()))?;
        registry.register(Box::new(active_leases.clone()))?;
        registry.register(Box::new(replacements.clone()))?;
        let lease_reads = IntCounterVec::new(
            Opts::new("lease_reads_total", "Reads of a cluster's leases, by source"),
            &["source"],
        )?;
        registry.register(Box::new(lease_reads.clone()))?;
        let settlement_rounds = IntCounterVec::new(
            Opts::new("settlement_rounds_total", "Settlement rounds, by outcome"),
            &["outcome"],
        )?;
        let settlement_actions = IntCounterVec::new(
            Opts::new("settlement_actions_total", "What settlement rounds did, by action"),
            &["action"],
        )?;
        registry.register(Box::new(settlement_rounds.clone()))?;
        registry.register(Box::new(settlement_actions.clone()))?;
        let settlement_lag = IntGauge::new(
            "settlement_lag_seconds",
            "Age of the oldest served GPU-second not confirmed paid on chain",
        )?;
        let earnings =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["node", "model"]);
        let served_gpu_seconds = earnings(
            "supplier_served_gpu_seconds",
            "GPU-seconds served, by supplier node, over the leases held",
        )?;
        let paid = earnings(
            "supplier_paid_base_units",
            "Payouts confirmed on chain, by supplier node, over the leases held",
        )?;
        let pending = earnings(
            "supplier_pending_base_units",
            "Metered and not yet paid, by supplier node, over the leases held",
        )?;
        registry.register(Box::new(settlement_lag.clone()))?;
        registry.register(Box::new(served_gpu_seconds.clone()))?;
        registry.register(Box::new(paid.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            reconcile_duration,
            pending_requests,
            gpus,
            match_latency,
            active_leases,
            replacements,
            lease_reads,
            settlement_rounds,
            settlement_actions,
            settlement_lag,
            served_gpu_seconds,
            paid,
            pending,
            ready: AtomicBool::new(false),
        })
    }

    /// Update the inventory, earnings and settlement-lag gauges from the caches at `now`.
    pub fn refresh_inventory(
        &self,
        offers: &[Arc<GpuOffer>],
        leases: &[Arc<GpuLease>],
        clusters: &[Arc<GpuCluster>],
        now: Timestamp,
    ) {
        self.gpus.reset();
        for ((model, state), count) in gpu_inventory(offers) {
            self.gpus.with_label_values(&[model.as_str(), state]).set(count);
        }
        self.active_leases.set(leases.iter().filter(|l| is_active(l)).count() as i64);
        let pending = clusters
            .iter()
            .filter(|c| {
                c.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == ClusterPhase::Pending
            })
            .count();
        self.pending_requests.set(pending as i64);

        let held = || leases.iter().map(AsRef::as_ref);
        self.settlement_lag.set(gauge(earnings::settlement_lag(held(), now)));
        let earned = earnings::tally(held(), offers.iter().map(AsRef::as_ref), None, now);
        for gauges in [&self.served_gpu_seconds, &self.paid, &self.pending] {
            gauges.reset();
        }
        for node in &earned.nodes {
            let labels = [node.node.as_str(), node.model.as_str()];
            let t = &node.totals;
            self.served_gpu_seconds.with_label_values(&labels).set(gauge(t.served_gpu_seconds));
            self.paid.with_label_values(&labels).set(gauge(t.paid));
            self.pending.with_label_values(&labels).set(gauge(t.pending));
        }
    }

    /// Count a settlement round and what it did.
    /// A settlement round: what it did, by action, or the label of the error that stopped it.
    pub fn record_round(&self, round: Result<&[(&'static str, usize)], &'static str>) {
        match round {
            Ok(actions) => {
                self.settlement_rounds.with_label_values(&["ok"]).inc();
                for (action, count) in actions {
                    self.settlement_actions.with_label_values(&[action]).inc_by(*count as u64);
                }
            }
            Err(label) => self.settlement_rounds.with_label_values(&[label]).inc(),
        }
    }

    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// A count as a gauge value (saturating: base units can exceed `i64`).
fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Offered GPUs counted by (model, state), state one of `free`, `leased`, `unhealthy`.
pub fn gpu_inventory(offers: &[Arc<GpuOffer>]) -> BTreeMap<(String, &'static str), i64> {
    let mut counts = BTreeMap::new();
    for offer in offers {
        for gpu in &offer.spec.gpus {
            let state = if !gpu_healthy(offer, &gpu.uuid) {
                "unhealthy"
            } else if gpu_lease(offer, &gpu.uuid).is_some() {
                "leased"
            } else {
                "free"
            };
            *counts.entry((gpu.model.clone(), state)).or_insert(0) += 1;
        }
    }
    counts
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(|State(m): State<Arc<Metrics>>| async move { m.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    axum::serve(listener, app).await
}

/// How often the inventory gauges are recomputed from the caches.
pub const INVENTORY_PERIOD: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease, mk_offer, now};
    use gpumarket_crds::{GpuHealth, GpuLeaseStatus, GpuState, LeasePhase};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn inventory_counts_free_leased_and_unhealthy_gpus_by_model() {
        let mut a = mk_offer("a", "H100", 3, now());
        a.status.get_or_insert_default().gpus = vec![
            GpuState {
                uuid: "a-gpu-0".into(),
                health: Some(GpuHealth::Unhealthy),
                reason: None,
                lease: None,
            },
            GpuState {
                uuid: "a-gpu-1".into(),
                health: Some(GpuHealth::Healthy),
                reason: None,
                lease: Some("l".into()),
            },
        ];
        let b = mk_offer("b", "A100", 2, now());
        let counts = gpu_inventory(&[Arc::new(a), Arc::new(b)]);
        assert_eq!(counts.get(&("H100".into(), "unhealthy")), Some(&1));
        assert_eq!(counts.get(&("H100".into(), "leased")), Some(&1));
        assert_eq!(counts.get(&("H100".into(), "free")), Some(&1));
        assert_eq!(counts.get(&("A100".into(), "free")), Some(&2));

        let metrics = Metrics::new().expect("registers");
        metrics.refresh_inventory(&[Arc::new(mk_offer("c", "H100", 1, now()))], &[], &[], now());
        metrics.replacements.inc();
        metrics.record_round(Ok(&[("payouts_sent", 3), ("transactions_sent", 1)]));
        metrics.record_round(Err("config"));
        let text = metrics.encode();
        assert!(text.contains("gpumarket_settlement_rounds_total{outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("gpumarket_settlement_rounds_total{outcome=\"config\"} 1"), "{text}");
        assert!(
            text.contains("gpumarket_settlement_actions_total{action=\"payouts_sent\"} 3"),
            "{text}"
        );
        assert!(text.contains("gpumarket_gpus{model=\"H100\",state=\"free\"} 1"), "{text}");
        assert!(text.contains("gpumarket_replacements_total 1"), "{text}");
    }

    #[test]
    fn earnings_and_settlement_lag_come_from_the_leases() {
        let cluster = mk_cluster("c", 1, 2);
        let mut lease = mk_lease(&cluster, "c", &["c-gpu-0", "c-gpu-1"], 1);
        // Two GPUs at 1.000000 per GPU-hour, serving for the last 90 s, nothing paid yet.
        let serving = now() - jiff::SignedDuration::from_secs(90);
        lease.status = Some(GpuLeaseStatus {
            phase: Some(LeasePhase::Active),
            serving_since: Some(Time(serving)),
            ..GpuLeaseStatus::default()
        });
        let metrics = Metrics::new().expect("registers");
        let offers = [Arc::new(mk_offer("c", "H100", 2, now()))];
        metrics.refresh_inventory(&offers, &[Arc::new(lease)], &[], now());
        let text = metrics.encode();
        let node = "{model=\"H100\",node=\"c\"}";
        assert!(
            text.contains(&format!("gpumarket_supplier_served_gpu_seconds{node} 180")),
            "{text}"
        );
        assert!(
            text.contains(&format!("gpumarket_supplier_pending_base_units{node} 50000")),
            "{text}"
        );
        assert!(text.contains(&format!("gpumarket_supplier_paid_base_units{node} 0")), "{text}");
        assert!(text.contains("gpumarket_settlement_lag_seconds 90"), "{text}");

        // The lease gone from the API server: its node is no longer reported.
        metrics.refresh_inventory(&offers, &[], &[], now());
        let text = metrics.encode();
        assert!(!text.contains("gpumarket_supplier_served_gpu_seconds{"), "{text}");
        assert!(text.contains("gpumarket_settlement_lag_seconds 0"), "{text}");
    }
}
