//! `status NAME`: a GpuCluster's state for its buyer, with cost counted from the leases' own
//! meters (what settlement pays from), not from the status's periodic refresh.

use std::fmt::Write as _;

use gpumarket_crds::{Amount, ClusterPhase, GpuCluster, GpuLease};
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use crate::cluster::status::{DEGRADED, is_active};
use crate::settlement::meter::{Meter, Paid};
use crate::settlement::pricing::Conversion;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// `namespace/name`.
    pub cluster: String,
    pub phase: ClusterPhase,
    /// What holds it up, or what is wrong, in the controller's words; empty when nothing is.
    pub waiting: Vec<String>,
    pub leases: Vec<LeaseLine>,
    /// Base units per hour of the active leases.
    pub hourly_rate: u64,
    /// Metered cost of every lease so far.
    pub cost_so_far: u64,
    /// Paid to suppliers (confirmed on chain).
    pub paid: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escrow: Option<String>,
    /// What the escrow held when settlement last looked, in base units of its mint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escrow_balance: Option<u64>,
    /// Whether that mint is a token converted at a price feed's rate (prices are micro-USD,
    /// the balance the token's base units).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub escrow_converted: bool,
    /// The escrow, in price units at the rate now, less what is metered and not paid yet: what
    /// is left to run on (absent while there is no rate to pay at).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deposit_left: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refunded: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dashboard: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ray_client: Option<String>,
    /// The fleet whose cluster runs its Ray (the addresses are in that cluster's network,
    /// unless `through_hub`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    /// The addresses are the hub's gateway to the head in `fleet`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub through_hub: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseLine {
    pub name: String,
    pub node: String,
    pub gpus: u32,
    /// `Active`, `Ended (reason)`, `Settled (reason)`.
    pub state: String,
    pub served_gpu_seconds: u64,
    pub cost: u64,
    pub paid: u64,
}

/// The summary of `cluster` and its `leases` at `now`, its escrow's tokens worth price units
/// at `conversion`.
pub fn summarize(
    cluster: &GpuCluster,
    leases: &[GpuLease],
    conversion: &Conversion,
    now: Timestamp,
) -> Summary {
    let status = cluster.status.clone().unwrap_or_default();
    let lines: Vec<LeaseLine> = leases
        .iter()
        .map(|lease| {
            let meter = Meter::of(lease);
            let s = lease.status.as_ref();
            let phase = s.and_then(|s| s.phase).unwrap_or_default();
            let state = match s.and_then(|s| s.end_reason) {
                Some(reason) => format!("{phase:?} ({reason:?})"),
                None => format!("{phase:?}"),
            };
            LeaseLine {
                name: lease.name_any(),
                node: lease.spec.offer.clone(),
                gpus: u32::try_from(lease.spec.gpus.len()).unwrap_or(u32::MAX),
                state,
                served_gpu_seconds: meter.gpu_seconds_through(now),
                cost: meter.cost_through(now),
                paid: Paid::of(lease).confirmed(),
            }
        })
        .collect();
    let cost_so_far = lines.iter().map(|l| l.cost).sum();
    let paid: u64 = lines.iter().map(|l| l.paid).sum();
    let escrow = status.escrow.as_ref();
    let balance = escrow.and_then(|e| e.balance);
    Summary {
        cluster: format!("{}/{}", cluster.namespace().unwrap_or_default(), cluster.name_any()),
        phase: status.phase.unwrap_or_default(),
        waiting: waiting(cluster),
        hourly_rate: leases
            .iter()
            .filter(|l| is_active(l))
            .map(|l| Meter::of(l).hourly_rate())
            .sum(),
        cost_so_far,
        paid,
        escrow: escrow.map(|e| e.account.clone()),
        escrow_balance: balance,
        escrow_converted: !matches!(conversion, Conversion::OneToOne),
        // The balance already excludes what was paid out of it.
        deposit_left: balance
            .and_then(|b| conversion.price_units(b))
            .map(|b| b.saturating_sub(cost_so_far.saturating_sub(paid))),
        refunded: status.amount_refunded,
        dashboard: status.dashboard.clone(),
        ray_client: status.ray_client.clone(),
        fleet: status.fleet.clone(),
        through_hub: status.through_hub == Some(true),
        leases: lines,
    }
}

/// What holds the cluster up or is wrong with it: the conditions that do not hold (Matched,
/// Funded, RayReady False) and Degraded when it holds, each with its message.
pub fn waiting(cluster: &GpuCluster) -> Vec<String> {
    let Some(status) = &cluster.status else {
        return vec!["the controller has not looked at it yet".to_owned()];
    };
    status
        .conditions
        .iter()
        .filter(|c| {
            let problem = if c.type_ == DEGRADED { "True" } else { "False" };
            c.status == problem
        })
        .map(|c| format!("{}: {}", c.type_, c.message))
        .collect()
}

pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "GpuCluster {}: {:?}", s.cluster, s.phase);
    for why in &s.waiting {
        let _ = writeln!(out, "  waiting: {why}");
    }
    if !s.leases.is_empty() {
        let _ = writeln!(
            out,
            "  {:<40} {:<20} {:>4} {:>12} {:>14} {:>14}  STATE",
            "LEASE", "NODE", "GPUS", "SERVED", "COST", "PAID"
        );
        for l in &s.leases {
            let _ = writeln!(
                out,
                "  {:<40} {:<20} {:>4} {:>12} {:>14} {:>14}  {}",
                l.name,
                l.node,
                l.gpus,
                served(l.served_gpu_seconds),
                Amount::new(l.cost).to_string(),
                Amount::new(l.paid).to_string(),
                l.state
            );
        }
    }
    let _ = writeln!(out, "  rate:        {} per hour", Amount::new(s.hourly_rate));
    let _ = writeln!(out, "  cost so far: {}", Amount::new(s.cost_so_far));
    let _ = writeln!(out, "  paid:        {}", Amount::new(s.paid));
    if let Some(escrow) = &s.escrow {
        let balance = match s.escrow_balance {
            None => "not read yet".to_owned(),
            Some(b) if s.escrow_converted => format!("{b} base units of its token"),
            Some(b) => Amount::new(b).to_string(),
        };
        let _ = writeln!(out, "  escrow:      {escrow} holds {balance}");
    }
    if let Some(left) = s.deposit_left {
        let _ = writeln!(out, "  deposit left: {}", Amount::new(left));
    }
    if let Some(refunded) = s.refunded {
        let _ = writeln!(out, "  refunded:    {}", Amount::new(refunded));
    }
    let reached = match &s.fleet {
        Some(fleet) => reached_in_fleet(fleet, s.through_hub),
        None => "`kubectl gpumarket dashboard` forwards it here".into(),
    };
    if let Some(dashboard) = &s.dashboard {
        let _ = writeln!(out, "  dashboard:   {dashboard} ({reached})");
    }
    if let Some(client) = &s.ray_client {
        let _ = writeln!(out, "  ray client:  {client}");
    }
    out
}

/// Where a buyer reaches the head of a cluster that runs in `fleet`'s own cluster: through the
/// hub's gateway (`through_hub`), else only from inside the fleet.
pub fn reached_in_fleet(fleet: &str, through_hub: bool) -> String {
    if through_hub {
        format!("the hub's gateway to fleet {fleet}: open it from the hub's cluster network")
    } else {
        format!("in fleet {fleet}'s cluster: ask its operator for a route")
    }
}

/// GPU-seconds as GPU-hours and minutes, the way served time is read.
fn served(gpu_seconds: u64) -> String {
    format!("{}h{:02}m GPU", gpu_seconds / 3600, gpu_seconds % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn condition(type_: &str, status: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            message: message.into(),
            reason: "R".into(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }

    #[test]
    fn only_conditions_that_hold_it_up_are_shown_as_waiting() {
        let mut cluster: GpuCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuCluster",
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"gpu": {"models": ["H100"]}, "workers": 1, "gpusPerWorker": 1,
                     "duration": "1h", "maxPricePerGpuHour": 1,
                     "payment": {"buyerWallet": "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV"}},
        }))
        .expect("cluster");
        assert_eq!(waiting(&cluster), ["the controller has not looked at it yet"]);
        cluster.status = Some(gpumarket_crds::GpuClusterStatus {
            conditions: vec![
                condition("Matched", "True", "2 GPUs bound"),
                condition("Funded", "False", "deposit 0.000000 short"),
                condition("Degraded", "False", "all 2 workers have GPUs"),
            ],
            ..Default::default()
        });
        assert_eq!(waiting(&cluster), ["Funded: deposit 0.000000 short"]);
    }

    #[test]
    fn a_cluster_in_a_fleet_is_reached_in_the_fleets_cluster() {
        let mut cluster = crate::testing::mk_cluster("c", 1, 1);
        cluster.status = Some(gpumarket_crds::GpuClusterStatus {
            dashboard: Some("http://ray-head-u.ray.svc:8265".into()),
            ray_client: Some("ray://ray-head-u.ray.svc:10001".into()),
            fleet: Some("fleet-a".into()),
            ..Default::default()
        });
        let text = render(&summarize(&cluster, &[], &Conversion::OneToOne, Timestamp::UNIX_EPOCH));
        assert!(
            text.contains(
                "dashboard:   http://ray-head-u.ray.svc:8265 (in fleet fleet-a's cluster: ask its operator for a route)"
            ),
            "{text}"
        );
        assert!(text.contains("ray client:  ray://ray-head-u.ray.svc:10001"), "{text}");

        // With the hub's tunnel, the addresses are the hub's gateway.
        let status = cluster.status.as_mut().expect("set above");
        status.dashboard = Some("http://10.0.0.5:31000".into());
        status.through_hub = Some(true);
        let text = render(&summarize(&cluster, &[], &Conversion::OneToOne, Timestamp::UNIX_EPOCH));
        assert!(
            text.contains(
                "dashboard:   http://10.0.0.5:31000 (the hub's gateway to fleet fleet-a: open it from the hub's cluster network)"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_token_escrow_is_left_in_price_units_at_the_rate_now() {
        let mut cluster = crate::testing::mk_cluster("c", 1, 1);
        cluster.status = Some(gpumarket_crds::GpuClusterStatus {
            escrow: Some(gpumarket_crds::EscrowStatus {
                account: "escrow".into(),
                balance: Some(4_000_000),
                refund: None,
            }),
            ..Default::default()
        });
        let mut lease = crate::testing::mk_lease(&cluster, "n1", &["g0"], 1);
        lease.spec.price_per_gpu_hour = 3_600_000; // 1,000 micro-USD per second
        let start = Timestamp::from_second(1_800_000_000).expect("time");
        lease.spec.start_time = Time(start);
        lease.status = Some(gpumarket_crds::GpuLeaseStatus {
            phase: Some(gpumarket_crds::LeasePhase::Active),
            serving_since: Some(Time(start)),
            ..Default::default()
        });
        let now = Timestamp::from_second(1_800_000_003).expect("time");
        // $2.50 per token of 9 decimals: 400 base units per micro-USD; 3,000 micro-USD served.
        let rate = crate::settlement::pricing::Rate { price: 250, exponent: -2, publish_time: 0 };
        let at = Conversion::At { rate, decimals: 9 };
        let s = summarize(&cluster, std::slice::from_ref(&lease), &at, now);
        assert_eq!((s.cost_so_far, s.deposit_left), (3_000, Some(10_000 - 3_000)));
        let text = render(&s);
        assert!(text.contains("holds 4000000 base units of its token"), "{text}");
        let paused = summarize(&cluster, &[lease], &Conversion::Paused("stale".into()), now);
        assert_eq!(paused.deposit_left, None, "no rate, no worth");
        assert_eq!(
            summarize(&cluster, &[], &Conversion::OneToOne, now).deposit_left,
            Some(4_000_000)
        );
    }

    #[test]
    fn served_time_reads_in_hours_and_minutes() {
        assert_eq!(served(3 * 3600 + 5 * 60 + 59), "3h05m GPU");
    }
}
