//! `quote`: what a GpuCluster would get if applied now, from the matching engine's answer for
//! it, and when nothing matches, which single constraint relaxed would match and how.

use std::fmt::Write as _;

use gpumarket_crds::{Amount, GpuCluster};
use serde::Serialize;

use crate::matching::{Constraint, Explanation, ModelFilter, Offer, Outcome, Request};
use crate::settlement::escrow::required_deposit;
use crate::settlement::meter::cost_ceil;

/// The answer for one GpuCluster. Amounts are base units of the settlement mint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Quote {
    /// `namespace/name`.
    pub cluster: String,
    pub duration_seconds: u64,
    /// Present when the market can serve it now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<Matched>,
    /// Why it would wait, in the controller's words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmatched: Option<String>,
    /// Single changes to the spec that would let it match now, cheapest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relaxations: Vec<Relaxation>,
    /// When it is unmatched only because the offers that would serve it are refused by the
    /// market's verification: those offers, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused_offers: Vec<RefusedOffer>,
}

/// An offer the market does not match (its `Verified` condition is not True), and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedOffer {
    pub node: String,
    pub why: String,
}

/// An offer of the market as supply, refused by verification for `why`.
#[derive(Clone, Debug)]
pub struct Refused {
    pub offer: Offer,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Matched {
    pub price_per_hour: u64,
    /// The price over the whole duration (rounded up, as deposits are).
    pub total: u64,
    /// What the escrow must hold before the GPUs are bound (the controller's deposit rule).
    pub deposit: u64,
    pub workers: Vec<QuotedWorker>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotedWorker {
    /// The node (its GpuOffer's name).
    pub node: String,
    pub model: String,
    pub gpus: u32,
    pub price_per_gpu_hour: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Relaxation {
    pub constraint: String,
    /// The change to make, naming the spec field.
    pub change: String,
    pub price_per_hour: u64,
}

/// The quote of `cluster` as `request` on `supply` (what the controller matches on), where
/// `answer` is the matching engine's answer for a request on some supply (the same call for
/// the relaxed requests). `refused` are the offers verification keeps out of `supply`: when
/// they alone would match, the quote names them.
pub fn quote(
    cluster: &GpuCluster,
    request: &Request,
    supply: &[Offer],
    refused: &[Refused],
    answer: impl Fn(&[Offer], &Request) -> Outcome,
    margin_percent: u32,
) -> anyhow::Result<Quote> {
    let duration = cluster.spec.duration().map_err(|e| anyhow::anyhow!("spec.duration: {e}"))?;
    crate::cluster::validate::validate(cluster).map_err(anyhow::Error::msg)?;
    let mut quote = Quote {
        cluster: request.key.clone(),
        duration_seconds: duration.as_secs(),
        matched: None,
        unmatched: None,
        relaxations: Vec::new(),
        refused_offers: Vec::new(),
    };
    match answer(supply, request) {
        Outcome::Matched(assignment) => {
            let hourly = assignment.hourly_cost();
            let model = |node: &str| {
                supply.iter().find(|o| o.node == node).map(|o| o.model.clone()).unwrap_or_default()
            };
            quote.matched = Some(Matched {
                price_per_hour: hourly,
                total: cost_ceil(hourly, duration.as_secs()),
                deposit: required_deposit(hourly, duration, margin_percent),
                workers: assignment
                    .workers
                    .iter()
                    .map(|w| QuotedWorker {
                        node: w.node.clone(),
                        model: model(&w.node),
                        gpus: u32::try_from(w.gpus.len()).unwrap_or(u32::MAX),
                        price_per_gpu_hour: w.price_per_gpu_hour,
                    })
                    .collect(),
            });
        }
        Outcome::Unmatched(why) => {
            quote.unmatched = Some(why.to_string());
            quote.refused_offers = refused_offers(request, supply, refused, &answer);
            if let Explanation::Short(_) = why {
                let on_supply = |r: &Request| answer(supply, r);
                quote.relaxations = relaxations(request, supply, &on_supply);
            }
        }
    }
    Ok(quote)
}

/// The `refused` offers that `request` would be matched to if verification admitted them.
fn refused_offers(
    request: &Request,
    supply: &[Offer],
    refused: &[Refused],
    answer: &impl Fn(&[Offer], &Request) -> Outcome,
) -> Vec<RefusedOffer> {
    if refused.is_empty() {
        return Vec::new();
    }
    let widened: Vec<Offer> =
        supply.iter().cloned().chain(refused.iter().map(|r| r.offer.clone())).collect();
    let Outcome::Matched(assignment) = answer(&widened, request) else { return Vec::new() };
    let mut found: Vec<RefusedOffer> = refused
        .iter()
        .filter(|r| assignment.workers.iter().any(|w| w.node == r.offer.node))
        .map(|r| RefusedOffer { node: r.offer.node.clone(), why: r.why.clone() })
        .collect();
    found.sort_by(|a, b| a.node.cmp(&b.node));
    found
}

/// Each constraint relaxed alone (as far as it goes: any price, any model, ...); those that
/// match say how far the spec must move, read off the offers the relaxed request got.
fn relaxations(
    request: &Request,
    supply: &[Offer],
    answer: &impl Fn(&Request) -> Outcome,
) -> Vec<Relaxation> {
    let mut found: Vec<Relaxation> = Constraint::ALL
        .into_iter()
        .filter_map(|constraint| {
            let relaxed = relax(request, constraint);
            let Outcome::Matched(assignment) = answer(&relaxed) else { return None };
            let used: Vec<&Offer> = assignment
                .workers
                .iter()
                .filter_map(|w| supply.iter().find(|o| o.node == w.node))
                .collect();
            let change = describe(constraint, &used)?;
            Some(Relaxation {
                constraint: format!("{constraint:?}"),
                change,
                price_per_hour: assignment.hourly_cost(),
            })
        })
        .collect();
    found.sort_by_key(|r| r.price_per_hour);
    found
}

/// `request` without `constraint`.
fn relax(request: &Request, constraint: Constraint) -> Request {
    let mut r = request.clone();
    match constraint {
        Constraint::Price => r.max_price_per_gpu_hour = u64::MAX,
        Constraint::Model => r.models = ModelFilter::MinTier(gpumarket_crds::GpuTier::Other),
        Constraint::Memory => r.min_memory_mib = 0,
        Constraint::Region => (r.region, r.zone) = (None, None),
        Constraint::Zone => r.zone = None,
        Constraint::Reputation => r.min_reputation = 0,
        Constraint::Cpu => r.per_worker.cpu_millicores = None,
        Constraint::HostMemory => r.per_worker.memory_bytes = None,
    }
    r
}

/// What to write in the spec so that the offers `used` qualify.
fn describe(constraint: Constraint, used: &[&Offer]) -> Option<String> {
    let list = |mut items: Vec<String>| {
        items.sort();
        items.dedup();
        items.join(", ")
    };
    Some(match constraint {
        Constraint::Price => {
            format!("spec.maxPricePerGpuHour: {}", used.iter().map(|o| o.price_per_gpu_hour).max()?)
        }
        Constraint::Model => {
            format!("spec.gpu.models: [{}]", list(used.iter().map(|o| o.model.clone()).collect()))
        }
        Constraint::Memory => {
            format!("spec.gpu.minMemoryMib: {}", used.iter().map(|o| o.memory_mib).min()?)
        }
        Constraint::Region => format!(
            "spec.location.region: {} (or leave spec.location out)",
            list(used.iter().map(|o| o.region.clone()).collect())
        ),
        Constraint::Zone => "leave spec.location.zone out".to_owned(),
        Constraint::Reputation => {
            format!("spec.minReputation: {}", used.iter().map(|o| o.reputation).min()?)
        }
        Constraint::Cpu => "leave spec.perWorker.cpuMillicores out".to_owned(),
        Constraint::HostMemory => "leave spec.perWorker.memoryMib out".to_owned(),
    })
}

/// The quotes for people.
pub fn render(quotes: &[Quote]) -> String {
    let mut s = String::new();
    for q in quotes {
        let hours = q.duration_seconds as f64 / 3600.0;
        let _ = writeln!(s, "GpuCluster {} ({hours} h):", q.cluster);
        match &q.matched {
            Some(m) => {
                let _ = writeln!(s, "  price:    {} per hour", Amount::new(m.price_per_hour));
                let _ = writeln!(s, "  total:    {} for the whole duration", Amount::new(m.total));
                let _ = writeln!(
                    s,
                    "  deposit:  {} (`kubectl gpumarket deposit` sends it once applied)",
                    Amount::new(m.deposit)
                );
                let _ = writeln!(s, "  matched:");
                for w in &m.workers {
                    let _ = writeln!(
                        s,
                        "    {:<24} {} × {:<10} {} per GPU-hour",
                        w.node,
                        w.gpus,
                        w.model,
                        Amount::new(w.price_per_gpu_hour)
                    );
                }
            }
            None => {
                let why = q.unmatched.as_deref().unwrap_or_default();
                let _ = writeln!(s, "  unmatched: {why}");
                for r in &q.refused_offers {
                    let _ = writeln!(
                        s,
                        "  would match offer {} if the market verified it; it does not: {}",
                        r.node, r.why
                    );
                }
                if q.relaxations.is_empty() && q.refused_offers.is_empty() {
                    let _ = writeln!(s, "  no single change to the spec matches it now");
                }
                for r in &q.relaxations {
                    let _ = writeln!(
                        s,
                        "  would match with {} ({} per hour)",
                        r.change,
                        Amount::new(r.price_per_hour)
                    );
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use gpumarket_crds::{GpuTier, HostResources, Interconnect};

    use super::*;
    use crate::market::supply::market_request;
    use crate::matching;

    fn offer(node: &str, region: &str, price: u64, reputation: u32) -> Offer {
        Offer {
            node: node.to_owned(),
            free_gpus: (0..8).map(|i| format!("GPU-{node}-{i}")).collect(),
            model: "A100".to_owned(),
            tier: GpuTier::A100,
            memory_mib: 81_920,
            price_per_gpu_hour: price,
            region: region.to_owned(),
            zone: format!("{region}-a"),
            interconnect: Interconnect::NvLink,
            reputation,
            stake: 0,
            allocatable: Some(HostResources { cpu_millicores: 128_000, memory_bytes: 1 << 40 }),
            node_gpus: 8,
            fleet: None,
            spec_generation: None,
        }
    }

    fn examples() -> Vec<GpuCluster> {
        let text = include_str!("../../../examples/gpucluster.yaml");
        crate::plugin::parse_clusters(text, "default").expect("the examples parse")
    }

    fn quote_of(cluster: &GpuCluster, supply: &[Offer]) -> Quote {
        let request = market_request(cluster, cluster.spec.workers);
        quote(cluster, &request, supply, &[], matching::quote, 10).expect("valid")
    }

    #[test]
    fn a_match_is_priced_per_hour_in_total_and_as_the_deposit_rule_asks() {
        let finetune = &examples()[0];
        let supply: Vec<Offer> =
            (0..4).map(|i| offer(&format!("n{i}"), "eu-west", 2_000_000, 700)).collect();
        let q = quote_of(finetune, &supply);
        let m = q.matched.clone().expect("two nodes of eight A100s match");
        // 16 GPUs at 2.0 per hour, for 2 hours; the deposit has the 10 % margin on top.
        assert_eq!(m.price_per_hour, 32_000_000);
        assert_eq!(m.total, 64_000_000);
        assert_eq!(m.deposit, 70_400_000);
        assert_eq!(m.workers.len(), 2);
        assert!(render(&[q]).contains("price:    32.000000 per hour"));
    }

    #[test]
    fn an_unmatched_request_says_which_single_change_would_match_it() {
        let finetune = &examples()[0];
        let dear: Vec<Offer> =
            (0..4).map(|i| offer(&format!("n{i}"), "eu-west", 3_000_000, 700)).collect();
        let q = quote_of(finetune, &dear);
        assert!(q.matched.is_none());
        assert!(q.unmatched.as_deref().is_some_and(|w| w.contains("exceed the price")), "{q:?}");
        let changes: Vec<&str> = q.relaxations.iter().map(|r| r.change.as_str()).collect();
        assert_eq!(changes, ["spec.maxPricePerGpuHour: 3000000"]);

        let elsewhere: Vec<Offer> =
            (0..4).map(|i| offer(&format!("n{i}"), "us-east", 2_000_000, 700)).collect();
        let q = quote_of(finetune, &elsewhere);
        assert_eq!(
            q.relaxations[0].change,
            "spec.location.region: us-east (or leave spec.location out)"
        );
        let text = render(&[q]);
        assert!(text.contains("would match with spec.location.region: us-east"), "{text}");
    }

    #[test]
    fn an_offer_the_market_refuses_is_not_quoted_but_named_when_only_it_would_match() {
        let finetune = &examples()[0];
        let verified: Vec<Offer> =
            (0..2).map(|i| offer(&format!("v{i}"), "eu-west", 2_000_000, 700)).collect();
        let forged = Refused {
            offer: offer("forged", "eu-west", 1_000_000, 700),
            why: "BadSignature: not signed by spec.wallet's key".into(),
        };
        let request = market_request(finetune, finetune.spec.workers);
        let refused = std::slice::from_ref(&forged);
        let q = quote(finetune, &request, &verified, refused, matching::quote, 10).expect("valid");
        let m = q.matched.expect("the verified offers match");
        assert!(m.workers.iter().all(|w| w.node.starts_with('v')), "{m:?}");
        assert_eq!(m.price_per_hour, 32_000_000, "not the cheaper refused offer's price");

        let q =
            quote(finetune, &request, &verified[..1], refused, matching::quote, 10).expect("valid");
        assert!(q.matched.is_none());
        let named = RefusedOffer { node: "forged".into(), why: forged.why.clone() };
        assert_eq!(q.refused_offers, [named]);
        let text = render(&[q]);
        assert!(
            text.contains(
                "would match offer forged if the market verified it; it does not: BadSignature"
            ),
            "{text}"
        );
    }
}
