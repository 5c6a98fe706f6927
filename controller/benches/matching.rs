//! Matching at fleet scale: `cargo bench -p gpumarket-controller --bench matching`.
//!
//! The standard mix (seeded, so every run sees the same market): 10,000 offers of 8 GPUs of
//! mixed models, regions and prices (one in five partly leased already) and 1,000 pending
//! requests of 1–64 GPUs. Prints the time of a full pass (index + every request) and of one new
//! request against the standing market afterwards, peak memory, and total cost against
//! - first fit, the naive baseline: requests oldest first, each worker on the first offer in
//!   input order that meets every constraint and has the GPUs free, all or nothing;
//! - the brute-force optimum, on small instances where it is computable.

use std::time::{Duration, Instant};

use gpumarket_controller::matching::{
    Assignment, HoldPolicy, Market, ModelFilter, Offer, Outcome, Request, WorkerAsk, WorkerSlot,
    match_all, match_in_turn, quote,
};
use gpumarket_crds::{GpuTier, HostResources, Interconnect, Placement};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

#[path = "../src/matching/brute_force.rs"]
#[allow(dead_code)]
mod brute_force;

const OFFERS: usize = 10_000;
const REQUESTS: usize = 1_000;
const DOLLAR: f64 = 1_000_000.0;
const REGIONS: [&str; 6] = ["eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-east"];
/// Model, memory (MiB), list price per GPU-hour, weight in the fleet.
const MODELS: [(&str, u64, f64, u32); 7] = [
    ("H100", 81_920, 2.50, 15),
    ("A100", 81_920, 1.60, 12),
    ("A100", 40_960, 1.30, 13),
    ("A6000", 49_152, 0.80, 15),
    ("RTX4090", 24_576, 0.45, 25),
    ("RTX3090", 24_576, 0.30, 15),
    ("T4", 16_384, 0.15, 5),
];

fn main() {
    let mut rng = StdRng::seed_from_u64(4);
    let offers: Vec<Offer> = (0..OFFERS).map(|i| gen_offer(&mut rng, i)).collect();
    let requests: Vec<Request> = (0..REQUESTS).map(|i| gen_request(&mut rng, i)).collect();
    let newcomers: Vec<Request> =
        (0..REQUESTS).map(|i| gen_request(&mut rng, REQUESTS + i)).collect();
    let hold = HoldPolicy::at(200_000);
    let hwm_inputs = vm_hwm_kib();

    let pass_times: Vec<Duration> = (0..10)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(match_all(&offers, &requests, hold));
            start.elapsed()
        })
        .collect();
    let ours = match_all(&offers, &requests, hold);

    let mut market = Market::new(&offers);
    market.match_all(&requests, hold);
    // Each newcomer quoted 5 times, keeping its fastest: the figure for the request, not for
    // whatever else the machine was doing at that moment.
    let mut quote_times: Vec<Duration> = newcomers
        .iter()
        .map(|request| {
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    std::hint::black_box(market.quote(request));
                    start.elapsed()
                })
                .min()
                .unwrap_or_default()
        })
        .collect();
    let from_scratch: Vec<Duration> = newcomers
        .iter()
        .take(50)
        .map(|request| {
            let start = Instant::now();
            std::hint::black_box(quote(&offers, request));
            start.elapsed()
        })
        .collect();
    // What a GpuCluster reconcile runs: the youngest request served after every older one.
    let youngest = Request { created: 100_000, ..newcomers[0].clone() };
    let in_turn: Vec<Duration> = (0..10)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(match_in_turn(&offers, &requests, &youngest, hold));
            start.elapsed()
        })
        .collect();
    let newcomers_matched =
        newcomers.iter().filter(|r| matches!(market.quote(r), Outcome::Matched(_))).count();
    let hwm_after = vm_hwm_kib();

    println!("standard mix: {OFFERS} offers x 8 GPUs, {REQUESTS} requests of 1-64 GPUs");
    println!(
        "full pass (index + {REQUESTS} requests): median {:?}, min {:?}, max {:?} over {} runs",
        median(&pass_times),
        pass_times.iter().min().copied().unwrap_or_default(),
        pass_times.iter().max().copied().unwrap_or_default(),
        pass_times.len()
    );
    quote_times.sort();
    println!(
        "one new request against the standing market: median {:?}, p99 {:?}, max {:?} ({} of {} matched)",
        median(&quote_times),
        quote_times[quote_times.len() * 99 / 100],
        quote_times.last().copied().unwrap_or_default(),
        newcomers_matched,
        newcomers.len()
    );
    println!(
        "one request from scratch (quote(offers, request), index built each time): median {:?}",
        median(&from_scratch)
    );
    println!(
        "one request in its turn behind the {REQUESTS} older ones (match_in_turn, a reconcile): median {:?}",
        median(&in_turn)
    );
    println!(
        "peak memory (VmHWM): {:.1} MiB with the inputs generated, {:.1} MiB after the passes",
        hwm_inputs as f64 / 1024.0,
        hwm_after as f64 / 1024.0
    );
    compare_with_first_fit(&offers, &requests, &ours);
    compare_with_optimum(&mut rng);
}

/// Side by side: requests served (fill rate), GPUs placed (utilisation of the free GPUs) and
/// cost, of all matched and of the requests both matched.
fn compare_with_first_fit(offers: &[Offer], requests: &[Request], ours: &[(String, Outcome)]) {
    let baseline = first_fit(offers, requests);
    let (mut ours_cost, mut baseline_cost, mut both) = (0u64, 0u64, 0usize);
    for ((key, outcome), (baseline_key, baseline_outcome)) in ours.iter().zip(&baseline) {
        assert_eq!(key, baseline_key, "both list requests oldest first");
        if let (Outcome::Matched(a), Some(b)) = (outcome, baseline_outcome) {
            ours_cost += a.hourly_cost();
            baseline_cost += b.hourly_cost();
            both += 1;
        }
    }
    let ours_all: Vec<&Assignment> = ours
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Matched(a) => Some(a),
            Outcome::Unmatched(_) => None,
        })
        .collect();
    let baseline_all: Vec<&Assignment> = baseline.iter().filter_map(|(_, b)| b.as_ref()).collect();
    let free: usize = offers.iter().map(|o| o.free_gpus.len()).sum();
    let wanted: u64 = requests.iter().map(|r| u64::from(r.workers * r.gpus_per_worker)).sum();
    let row = |name: &str, ours: String, first_fit: String| {
        println!("  {name:<34} {ours:>18} {first_fit:>18}");
    };
    println!("vs first fit, same mix ({free} free GPUs, {wanted} GPUs asked):");
    row("", "gpumarket".into(), "first fit".into());
    let served = |n: usize| format!("{n} ({:.1}%)", 100.0 * n as f64 / requests.len() as f64);
    row("requests served (fill rate)", served(ours_all.len()), served(baseline_all.len()));
    let placed = |a: &[&Assignment]| {
        let gpus = gpus(a);
        format!("{gpus} ({:.1}%)", 100.0 * gpus as f64 / free as f64)
    };
    row("GPUs placed (utilisation)", placed(&ours_all), placed(&baseline_all));
    let cost = |a: &[&Assignment]| {
        format!("{:.2}/h", a.iter().map(|a| a.hourly_cost()).sum::<u64>() as f64 / DOLLAR)
    };
    row("cost of all matched", cost(&ours_all), cost(&baseline_all));
    let per_gpu = |a: &[&Assignment]| format!("{:.4}/h", mean_gpu_price(a));
    row("mean price per GPU-hour", per_gpu(&ours_all), per_gpu(&baseline_all));
    row(
        &format!("cost of the {both} both matched"),
        format!("{:.2}/h", ours_cost as f64 / DOLLAR),
        format!("{:.2}/h", baseline_cost as f64 / DOLLAR),
    );
    println!(
        "  gpumarket {:.1}% cheaper per GPU-hour, {:.1}% cheaper on the requests both matched",
        100.0 * (1.0 - mean_gpu_price(&ours_all) / mean_gpu_price(&baseline_all)),
        100.0 * (1.0 - ours_cost as f64 / baseline_cost as f64)
    );
}

fn gpus(assignments: &[&Assignment]) -> usize {
    assignments.iter().flat_map(|a| &a.workers).map(|w| w.gpus.len()).sum()
}

fn mean_gpu_price(assignments: &[&Assignment]) -> f64 {
    let cost: u64 = assignments.iter().map(|a| a.hourly_cost()).sum();
    cost as f64 / DOLLAR / gpus(assignments) as f64
}

/// The baseline (see the module documentation).
fn first_fit(offers: &[Offer], requests: &[Request]) -> Vec<(String, Option<Assignment>)> {
    let mut used = vec![0usize; offers.len()];
    let mut order: Vec<&Request> = requests.iter().collect();
    order.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
    order
        .into_iter()
        .map(|r| {
            let g = r.gpus_per_worker as usize;
            let mut taken = used.clone();
            let mut workers = Vec::new();
            for (i, offer) in offers.iter().enumerate() {
                if !brute_force::accepts(offer, r) {
                    continue;
                }
                while workers.len() < r.workers as usize && offer.free_gpus.len() - taken[i] >= g {
                    workers.push(WorkerSlot {
                        node: offer.node.clone(),
                        gpus: offer.free_gpus[taken[i]..taken[i] + g].to_vec(),
                        price_per_gpu_hour: offer.price_per_gpu_hour,
                        resources: r.per_worker.grant(offer.worker_share(r.gpus_per_worker)),
                    });
                    taken[i] += g;
                }
            }
            let complete = workers.len() == r.workers as usize;
            if complete {
                used = taken;
            }
            (r.key.clone(), complete.then_some(Assignment { workers }))
        })
        .collect()
}

/// On small instances where requests compete: what we serve against the best in strict age
/// order (`brute_force::best_in_age_order`, no request going ahead of an older one), and what
/// fairness costs: our total against the cheapest way to serve the same requests with no regard
/// to age (mean over the instances, and the worst).
fn compare_with_optimum(rng: &mut StdRng) {
    let instances = 300;
    let (mut in_order_exact, mut ours_total, mut joint_total, mut worst) = (0, 0u64, 0u64, 0.0f64);
    let (mut ours_served, mut in_order_served, mut excess_sum) = (0usize, 0usize, 0.0f64);
    for _ in 0..instances {
        let offers: Vec<Offer> = (0..6)
            .map(|i| {
                let mut offer = gen_offer(rng, i);
                offer.free_gpus.truncate(rng.random_range(1..=4));
                offer.region = "eu-west".to_owned();
                offer
            })
            .collect();
        let requests: Vec<Request> = (0..3)
            .map(|i| {
                // Few constraints, so that the requests compete for the same GPUs.
                let mut request = gen_request(rng, i);
                request.region = None;
                request.zone = None;
                request.min_reputation = 0;
                request.min_memory_mib = 0;
                request.models = ModelFilter::MinTier(GpuTier::Other);
                request.max_price_per_gpu_hour = rng.random_range(1..=3) * 1_000_000;
                request.gpus_per_worker = rng.random_range(1..=2);
                request.workers = rng.random_range(1..=3);
                request
            })
            .collect();
        let results = match_all(&offers, &requests, HoldPolicy::at(0));
        let costs: Vec<Option<u64>> = results
            .iter()
            .map(|(_, o)| match o {
                Outcome::Matched(a) => Some(a.hourly_cost()),
                Outcome::Unmatched(_) => None,
            })
            .collect();
        let in_order = brute_force::best_in_age_order(&offers, &requests);
        in_order_exact += usize::from(costs == in_order);
        ours_served += costs.iter().flatten().count();
        in_order_served += in_order.iter().flatten().count();
        let served: Vec<Request> = results
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Matched(_)))
            .filter_map(|(key, _)| requests.iter().find(|r| r.key == *key).cloned())
            .collect();
        let ours: u64 = costs.iter().flatten().sum();
        let joint = brute_force::best_total(&offers, &served).unwrap_or(0);
        ours_total += ours;
        joint_total += joint;
        if joint > 0 {
            let excess = ours as f64 / joint as f64 - 1.0;
            worst = worst.max(excess);
            excess_sum += excess;
        }
    }
    println!(
        "vs brute force on {instances} small instances (6 offers, 3 competing requests): \
         {ours_served} requests served vs {in_order_served} by the best in strict age order \
         ({in_order_exact} instances exactly that); fairness cost, against the cheapest joint \
         assignment of the same requests ignoring age: {:.2}% in total, {:.2}% mean per \
         instance, worst {:.1}%",
        100.0 * (ours_total as f64 / joint_total as f64 - 1.0),
        100.0 * excess_sum / instances as f64,
        100.0 * worst
    );
}

fn gen_offer(rng: &mut StdRng, i: usize) -> Offer {
    let weights: u32 = MODELS.iter().map(|m| m.3).sum();
    let mut pick = rng.random_range(0..weights);
    let &(model, memory_mib, list_price, _) = MODELS
        .iter()
        .find(|m| {
            let hit = pick < m.3;
            pick = pick.saturating_sub(m.3);
            hit
        })
        .unwrap_or(&MODELS[0]);
    let node = format!("node-{i:05}");
    let free = if rng.random_bool(0.8) { 8 } else { rng.random_range(1..8) };
    let region = *REGIONS.choose(rng).unwrap_or(&REGIONS[0]);
    Offer {
        free_gpus: (0..free).map(|g| format!("GPU-{node}-{g}")).collect(),
        node,
        model: model.to_owned(),
        tier: GpuTier::of_model(model),
        memory_mib,
        // Prices on a 1-cent grid, so that equal prices (and tie-breaks) are common.
        price_per_gpu_hour: (list_price * rng.random_range(0.7..1.5) * 100.0).round() as u64
            * 10_000,
        region: region.to_owned(),
        zone: format!("{region}-{}", ["a", "b", "c"][rng.random_range(0..3)]),
        interconnect: Interconnect::Pcie,
        reputation: rng.random_range(0..=1000),
        stake: 0,
        // Most agents publish the node's CPU and memory (16 cores and 128 GiB per GPU).
        allocatable: rng
            .random_bool(0.9)
            .then_some(HostResources { cpu_millicores: 128_000, memory_bytes: 1 << 40 }),
        node_gpus: 8,
        fleet: None,
        spec_generation: None,
    }
}

fn gen_request(rng: &mut StdRng, i: usize) -> Request {
    let gpus_per_worker = *[1, 2, 4, 8].choose(rng).unwrap_or(&1);
    let workers = rng.random_range(1..=64 / gpus_per_worker);
    let (model, memory_mib, list_price, _) = *MODELS.choose(rng).unwrap_or(&MODELS[0]);
    let models = if rng.random_bool(0.5) {
        ModelFilter::MinTier(GpuTier::of_model(model))
    } else {
        ModelFilter::Models(vec![model.to_owned()])
    };
    let region = rng.random_bool(0.6).then(|| REGIONS.choose(rng).unwrap_or(&REGIONS[0]));
    let zone = region.filter(|_| rng.random_bool(0.2)).map(|r| format!("{r}-a"));
    Request {
        key: format!("team-{}/cluster-{i}", i % 20),
        models,
        min_memory_mib: if rng.random_bool(0.3) { memory_mib } else { 0 },
        workers,
        gpus_per_worker,
        max_price_per_gpu_hour: (list_price * rng.random_range(0.9..2.0) * DOLLAR) as u64,
        region: region.map(|r| (*r).to_owned()),
        zone,
        min_reputation: if rng.random_bool(0.5) { 0 } else { rng.random_range(0..600) },
        placement: if rng.random_bool(0.7) { Placement::Pack } else { Placement::Spread },
        per_worker: WorkerAsk {
            cpu_millicores: rng.random_bool(0.2).then_some(12_000 * u64::from(gpus_per_worker)),
            memory_bytes: None,
        },
        created: rng.random_range(0..100_000),
        within: None,
    }
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// Peak resident memory of this process, from /proc/self/status (0 where unavailable).
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}
