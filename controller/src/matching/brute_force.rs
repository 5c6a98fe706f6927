//! Test oracle: exhaustive search on small instances, written apart from the engine (no shared
//! code) so that it checks the engine rather than repeats it. Also used by the benchmark.

use gpumarket_crds::Placement;

use super::{ModelFilter, Offer, Request};

/// Whether the offer meets every constraint of the request (free capacity aside).
pub fn accepts(offer: &Offer, request: &Request) -> bool {
    let model_ok = match &request.models {
        ModelFilter::Models(names) => names.iter().any(|n| n.eq_ignore_ascii_case(&offer.model)),
        ModelFilter::MinTier(tier) => offer.tier >= *tier,
    };
    model_ok
        && offer.memory_mib >= request.min_memory_mib
        && offer.price_per_gpu_hour <= request.max_price_per_gpu_hour
        && request.region.as_ref().is_none_or(|r| *r == offer.region)
        && request.zone.as_ref().is_none_or(|z| *z == offer.zone)
        && offer.reputation >= request.min_reputation
        && request.per_worker.cpu_fits(offer.worker_share(request.gpus_per_worker))
        && request.per_worker.memory_fits(offer.worker_share(request.gpus_per_worker))
}

/// The cheapest complete gangs of one request on the offers' free GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Best {
    pub cost: u64,
    /// Fewest and most nodes among the gangs of that cost.
    pub min_nodes: usize,
    pub max_nodes: usize,
}

/// Tries every number of workers on every offer.
pub fn best_gang(offers: &[Offer], request: &Request) -> Option<Best> {
    let free: Vec<u32> = offers.iter().map(|o| o.free_gpus.len() as u32).collect();
    let mut best: Option<Best> = None;
    for_each_gang(
        offers,
        &slots(offers, &free, request),
        request.workers,
        &mut Vec::new(),
        &mut |x| {
            let cost = gang_cost(offers, request, x);
            let nodes = x.iter().filter(|&&w| w > 0).count();
            best = Some(match best {
                Some(b) if b.cost < cost => b,
                Some(b) if b.cost == cost => Best {
                    cost,
                    min_nodes: b.min_nodes.min(nodes),
                    max_nodes: b.max_nodes.max(nodes),
                },
                _ => Best { cost, min_nodes: nodes, max_nodes: nodes },
            });
        },
    );
    best
}

/// The least total hourly cost that serves all `requests` at once, if they fit together.
pub fn best_total(offers: &[Offer], requests: &[Request]) -> Option<u64> {
    let free: Vec<u32> = offers.iter().map(|o| o.free_gpus.len() as u32).collect();
    best_total_from(offers, &free, requests)
}

fn best_total_from(offers: &[Offer], free: &[u32], requests: &[Request]) -> Option<u64> {
    let Some((request, rest)) = requests.split_first() else {
        return Some(0);
    };
    let mut best: Option<u64> = None;
    for_each_gang(
        offers,
        &slots(offers, free, request),
        request.workers,
        &mut Vec::new(),
        &mut |x| {
            let left = free_after(free, x, request);
            if let Some(rest_cost) = best_total_from(offers, &left, rest) {
                let total = gang_cost(offers, request, x) + rest_cost;
                best = Some(best.map_or(total, |b| b.min(total)));
            }
        },
    );
    best
}

/// Free GPUs per offer once `request` takes `workers[i]` workers on offer `i`.
fn free_after(free: &[u32], workers: &[u32], request: &Request) -> Vec<u32> {
    free.iter().zip(workers).map(|(f, w)| f - w * request.gpus_per_worker).collect()
}

/// What each request pays (`None`: unmatched), oldest first (by created, then key), under the
/// engine's own rule: each request matched whenever it can be, as cheaply as possible given
/// what older ones took, on as few (pack) or many (spread) nodes as it can at that cost; among
/// an older request's gangs equal on all that, the best for younger ones.
#[allow(dead_code)] // for the benchmark
pub fn best_in_age_order(offers: &[Offer], requests: &[Request]) -> Vec<Option<u64>> {
    let mut sorted = requests.to_vec();
    sorted.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
    let free: Vec<u32> = offers.iter().map(|o| o.free_gpus.len() as u32).collect();
    ranked_from(offers, &free, &sorted).1
}

/// The best outcome in age order for `requests` on `free`, with its rank (lower is better).
#[allow(clippy::type_complexity)]
fn ranked_from(
    offers: &[Offer],
    free: &[u32],
    requests: &[Request],
) -> (Vec<(bool, u64, i64)>, Vec<Option<u64>>) {
    let Some((request, rest)) = requests.split_first() else {
        return (Vec::new(), Vec::new());
    };
    // Request by request: matched before unmatched, then cheaper, then nodes as placed.
    type Ranked = Vec<(bool, u64, i64)>;
    let mut best: Option<(Ranked, Vec<Option<u64>>)> = None;
    for_each_gang(
        offers,
        &slots(offers, free, request),
        request.workers,
        &mut Vec::new(),
        &mut |x| {
            let left = free_after(free, x, request);
            let cost = gang_cost(offers, request, x);
            let nodes = x.iter().filter(|&&w| w > 0).count() as i64;
            let nodes = if request.placement == Placement::Spread { -nodes } else { nodes };
            let (rest_rank, rest_costs) = ranked_from(offers, &left, rest);
            let rank: Ranked = std::iter::once((false, cost, nodes)).chain(rest_rank).collect();
            if best.as_ref().is_none_or(|(b, _)| rank < *b) {
                let costs = std::iter::once(Some(cost)).chain(rest_costs).collect();
                best = Some((rank, costs));
            }
        },
    );
    best.unwrap_or_else(|| {
        let (rest_rank, rest_costs) = ranked_from(offers, free, rest);
        (
            std::iter::once((true, 0, 0)).chain(rest_rank).collect(),
            std::iter::once(None).chain(rest_costs).collect(),
        )
    })
}

/// Workers each offer could host for the request.
fn slots(offers: &[Offer], free: &[u32], request: &Request) -> Vec<u32> {
    offers
        .iter()
        .zip(free)
        .map(|(o, f)| if accepts(o, request) { f / request.gpus_per_worker } else { 0 })
        .collect()
}

fn gang_cost(offers: &[Offer], request: &Request, workers_per_offer: &[u32]) -> u64 {
    offers
        .iter()
        .zip(workers_per_offer)
        .map(|(o, &w)| o.price_per_gpu_hour * u64::from(w * request.gpus_per_worker))
        .sum()
}

/// Calls `visit` with every way to place `workers` workers within `slots` per offer, all on
/// offers of one fleet (or all on the hub's own nodes).
fn for_each_gang(
    offers: &[Offer],
    slots: &[u32],
    workers: u32,
    chosen: &mut Vec<u32>,
    visit: &mut dyn FnMut(&[u32]),
) {
    let Some(&here) = slots.get(chosen.len()) else {
        let mut fleets =
            offers.iter().zip(chosen.iter()).filter(|(_, w)| **w > 0).map(|(o, _)| &o.fleet);
        let one_site = fleets.next().is_none_or(|first| fleets.all(|f| f == first));
        if workers == 0 && one_site {
            visit(chosen);
        }
        return;
    };
    for w in 0..=here.min(workers) {
        chosen.push(w);
        for_each_gang(offers, slots, workers - w, chosen, visit);
        chosen.pop();
    }
}
