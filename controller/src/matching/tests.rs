use std::collections::HashSet;

use gpumarket_crds::{GpuTier, HostResources, Interconnect, Placement};
use proptest::prelude::*;

use super::brute_force::{accepts, best_gang, best_total};
use super::*;

const DOLLAR: u64 = 1_000_000;

fn mk_offer(node: &str, model: &str, gpus: u32, price: u64) -> Offer {
    Offer {
        node: node.to_owned(),
        free_gpus: (0..gpus).map(|i| format!("{node}-gpu-{i}")).collect(),
        model: model.to_owned(),
        tier: GpuTier::of_model(model),
        memory_mib: 81_920,
        price_per_gpu_hour: price,
        region: "eu-west".to_owned(),
        zone: "eu-west-1a".to_owned(),
        interconnect: Interconnect::NvLink,
        reputation: 500,
        stake: 0,
        allocatable: None,
        node_gpus: gpus,
        fleet: None,
        spec_generation: None,
    }
}

/// `offer` publishing a node of `cores` cores and `gib` GiB of memory to share among its GPUs.
fn with_allocatable(offer: Offer, cores: u64, gib: u64) -> Offer {
    let allocatable = HostResources { cpu_millicores: cores * 1000, memory_bytes: gib << 30 };
    Offer { allocatable: Some(allocatable), ..offer }
}

fn mk_request(key: &str, workers: u32, gpus_per_worker: u32, max_price: u64) -> Request {
    Request {
        key: key.to_owned(),
        models: ModelFilter::MinTier(GpuTier::A100),
        min_memory_mib: 0,
        workers,
        gpus_per_worker,
        max_price_per_gpu_hour: max_price,
        region: None,
        zone: None,
        min_reputation: 0,
        placement: Placement::Pack,
        per_worker: WorkerAsk::default(),
        created: 0,
        within: None,
    }
}

fn matched(outcome: &Outcome) -> &Assignment {
    match outcome {
        Outcome::Matched(a) => a,
        Outcome::Unmatched(why) => panic!("expected a match, got: {why}"),
    }
}

fn shortage(outcome: &Outcome) -> &Shortage {
    match outcome {
        Outcome::Unmatched(Explanation::Short(s)) => s,
        other => panic!("expected a shortage, got {other:?}"),
    }
}

/// Workers per node, in assignment order.
fn nodes(a: &Assignment) -> Vec<(&str, usize)> {
    let mut out: Vec<(&str, usize)> = Vec::new();
    for w in &a.workers {
        match out.last_mut() {
            Some((node, n)) if *node == w.node => *n += 1,
            _ => out.push((w.node.as_str(), 1)),
        }
    }
    out
}

fn no_hold() -> HoldPolicy {
    HoldPolicy::at(0)
}

#[test]
fn a_replacement_avoids_the_offers_that_failed_its_cluster_unless_nothing_else_fits() {
    let offers = [mk_offer("a", "H100", 2, 1_000_000), mk_offer("b", "H100", 2, 1_200_000)];
    let request = mk_request("ns/c", 1, 2, 2_000_000);
    let failed = std::collections::BTreeSet::from(["a".to_owned()]);
    let nodes = |outcome: &Outcome| -> Vec<String> {
        matched(outcome).workers.iter().map(|w| w.node.clone()).collect()
    };
    let answer = |supply: &[Offer]| quote(supply, &request);
    assert_eq!(nodes(&avoiding_failed(&offers, &Default::default(), answer)), ["a"], "cheapest");
    assert_eq!(nodes(&avoiding_failed(&offers, &failed, answer)), ["b"], "not the failed one");
    assert_eq!(nodes(&avoiding_failed(&offers[..1], &failed, answer)), ["a"], "better than none");
}

#[test]
fn takes_the_cheapest_slots_and_the_first_free_gpus_of_each_node() {
    let offers = vec![
        mk_offer("dear", "H100", 8, 3 * DOLLAR),
        mk_offer("cheap", "A100", 2, DOLLAR),
        mk_offer("mid", "A100", 4, 2 * DOLLAR),
    ];
    let a = matched(&quote(&offers, &mk_request("ns/a", 3, 2, 3 * DOLLAR))).clone();
    assert_eq!(nodes(&a), vec![("cheap", 1), ("mid", 2)]);
    assert_eq!(a.workers[1].gpus, vec!["mid-gpu-0", "mid-gpu-1"]);
    assert_eq!(a.workers[2].gpus, vec!["mid-gpu-2", "mid-gpu-3"]);
    assert_eq!(a.hourly_cost(), 2 * DOLLAR + 8 * DOLLAR);
}

#[test]
fn a_worker_never_spans_nodes() {
    let offers = vec![mk_offer("a", "A100", 3, DOLLAR), mk_offer("b", "A100", 3, DOLLAR)];
    let two = matched(&quote(&offers, &mk_request("ns/a", 2, 2, DOLLAR))).clone();
    assert_eq!(nodes(&two), vec![("a", 1), ("b", 1)]);
    let three = quote(&offers, &mk_request("ns/a", 3, 2, DOLLAR));
    assert_eq!(
        shortage(&three).to_string(),
        "need 6 GPUs (3 workers × 2 on one node) of tier ≥ A100 at ≤ 1.000000/h; 6 free match \
         all constraints but only 4 of them form whole workers, no other free GPU misses only one \
         constraint"
    );
}

#[test]
fn one_worker_of_any_model_reads_naturally() {
    let offers = vec![mk_offer("a", "T4", 3, DOLLAR)];
    let request = Request {
        models: ModelFilter::MinTier(GpuTier::Other),
        ..mk_request("ns/a", 1, 4, DOLLAR)
    };
    assert!(shortage(&quote(&offers, &request)).to_string().starts_with(
        "need 4 GPUs (1 worker × 4 on one node) of any model at ≤ 1.000000/h; 3 free"
    ));
}

#[test]
fn pack_fills_few_nodes_and_spread_many_at_equal_cost() {
    let offers = vec![
        mk_offer("a", "A100", 2, DOLLAR),
        mk_offer("b", "A100", 4, DOLLAR),
        mk_offer("c", "A100", 2, DOLLAR),
        mk_offer("cheapest", "A100", 1, DOLLAR / 2),
    ];
    let mut request = mk_request("ns/a", 5, 1, DOLLAR);
    let pack = matched(&quote(&offers, &request)).clone();
    assert_eq!(nodes(&pack), vec![("cheapest", 1), ("b", 4)]);
    request.placement = Placement::Spread;
    let spread = matched(&quote(&offers, &request)).clone();
    assert_eq!(nodes(&spread), vec![("cheapest", 1), ("a", 2), ("b", 1), ("c", 1)]);
    assert_eq!(pack.hourly_cost(), spread.hourly_cost());
}

#[test]
fn pack_fills_a_partly_used_node_and_keeps_an_empty_one_whole() {
    let offers = vec![
        mk_offer("a", "A100", 8, DOLLAR),
        mk_offer("b", "A100", 3, DOLLAR),
        mk_offer("c", "A100", 5, DOLLAR),
    ];
    // One worker: the smallest node that holds it, not the emptiest.
    let one = mk_request("ns/one", 1, 1, DOLLAR);
    assert_eq!(nodes(matched(&quote(&offers, &one))), vec![("b", 1)]);
    let four = mk_request("ns/four", 4, 1, DOLLAR);
    assert_eq!(nodes(matched(&quote(&offers, &four))), vec![("c", 4)]);
    // More than any node holds: the largest whole, then the smallest that holds the rest.
    let ten = mk_request("ns/ten", 10, 1, DOLLAR);
    assert_eq!(nodes(matched(&quote(&offers, &ten))), vec![("a", 8), ("b", 2)]);
}

#[test]
fn spread_fills_partly_used_nodes_and_keeps_an_empty_one_whole() {
    let offers = vec![
        mk_offer("a", "A100", 8, DOLLAR),
        mk_offer("b", "A100", 3, DOLLAR),
        mk_offer("c", "A100", 5, DOLLAR),
    ];
    let two = Request { placement: Placement::Spread, ..mk_request("ns/two", 2, 1, DOLLAR) };
    assert_eq!(nodes(matched(&quote(&offers, &two))), vec![("b", 1), ("c", 1)]);
    // More workers than nodes: every node, still one at a time from the smallest.
    let five = Request { workers: 5, ..two };
    assert_eq!(nodes(matched(&quote(&offers, &five))), vec![("a", 1), ("b", 2), ("c", 2)]);
}

#[test]
fn higher_reputation_wins_a_tie_then_the_node_name() {
    let mut offers = vec![
        mk_offer("a", "A100", 4, DOLLAR),
        mk_offer("b", "A100", 4, DOLLAR),
        mk_offer("c", "A100", 4, DOLLAR),
    ];
    offers[2].reputation = 900;
    let request = mk_request("ns/a", 2, 4, DOLLAR);
    assert_eq!(nodes(matched(&quote(&offers, &request))), vec![("a", 1), ("c", 1)]);
}

#[test]
fn model_names_match_regardless_of_case() {
    let offers = vec![mk_offer("a", "RTX4090", 4, DOLLAR)];
    let mut request = mk_request("ns/a", 1, 4, DOLLAR);
    request.models = ModelFilter::Models(vec!["rtx4090".to_owned()]);
    matched(&quote(&offers, &request));
}

#[test]
fn no_workers_is_an_empty_match_and_no_gpus_per_worker_is_refused() {
    let offers = vec![mk_offer("a", "A100", 4, DOLLAR)];
    assert_eq!(
        quote(&offers, &mk_request("ns/a", 0, 1, DOLLAR)),
        Outcome::Matched(Assignment { workers: vec![] })
    );
    let Outcome::Unmatched(why @ Explanation::Invalid(_)) =
        quote(&offers, &mk_request("ns/a", 1, 0, DOLLAR))
    else {
        panic!("zero GPUs per worker must be refused");
    };
    assert_eq!(why.to_string(), "ns/a: gpusPerWorker must be at least 1");
}

/// `offer` on a node of fleet `fleet`.
fn in_fleet(offer: Offer, fleet: &str) -> Offer {
    Offer { fleet: Some(fleet.to_owned()), ..offer }
}

#[test]
fn a_gang_stays_inside_one_fleet_or_on_the_hubs_own_nodes() {
    let offers = vec![
        in_fleet(mk_offer("a-1", "A100", 4, DOLLAR), "fleet-a"),
        in_fleet(mk_offer("b-1", "A100", 4, 2 * DOLLAR), "fleet-b"),
        in_fleet(mk_offer("b-2", "A100", 4, 2 * DOLLAR), "fleet-b"),
        mk_offer("hub-1", "A100", 4, DOLLAR / 2),
    ];
    // Cheaper mixed with the hub's node or fleet A's; fleet B alone holds the whole gang.
    let two = matched(&quote(&offers, &mk_request("ns/two", 2, 4, 3 * DOLLAR))).clone();
    assert_eq!(nodes(&two), [("b-1", 1), ("b-2", 1)]);
    assert_eq!(two.hourly_cost(), 16 * DOLLAR);
    // Three workers fit nowhere whole: refused, though 16 GPUs match.
    let three = quote(&offers, &mk_request("ns/three", 3, 4, 3 * DOLLAR));
    let why = shortage(&three);
    assert_eq!((why.usable, why.largest_site.clone()), (16, Some(("fleet-b".to_owned(), 8))));
    assert!(
        why.to_string().ends_with(
            "16 free match all constraints but no one fleet has 12 of them, and a gang stays \
             inside one fleet (or on the hub's own nodes): the most in one place is 8 (in fleet \
             fleet-b); ask for at most 8 GPUs (spec.workers × spec.gpusPerWorker, e.g. \
             spec.workers 2), or wait for one fleet to have 12 free"
        ),
        "{why}"
    );
    // One worker takes the cheapest node, wherever it is.
    let one = matched(&quote(&offers, &mk_request("ns/one", 1, 4, 3 * DOLLAR))).clone();
    assert_eq!(nodes(&one), [("hub-1", 1)]);
}

#[test]
fn a_gang_across_a_fleet_and_the_hub_is_refused_with_what_to_change() {
    let offers = vec![
        in_fleet(mk_offer("a-1", "A100", 4, DOLLAR), "fleet-a"),
        mk_offer("hub-1", "A100", 4, DOLLAR),
    ];
    let request = mk_request("ns/llm", 2, 4, DOLLAR);
    let outcome = quote(&offers, &request);
    let why = shortage(&outcome);
    // Equal: the hub's own nodes are named first.
    assert_eq!(why.largest_site, Some((String::new(), 4)));
    assert!(
        why.to_string().contains("the most in one place is 4 (on the hub's own nodes)"),
        "{why}"
    );
    assert!(why.to_string().contains("e.g. spec.workers 1"), "{why}");
    // In its turn it is refused too: the pass never splits a gang.
    let results = match_all(&offers, std::slice::from_ref(&request), no_hold());
    assert_eq!(results[0].1, outcome);
    // A fleet joining with enough for the whole gang serves it there.
    let mut more = offers.clone();
    more.push(in_fleet(mk_offer("a-2", "A100", 4, DOLLAR), "fleet-a"));
    assert_eq!(nodes(matched(&quote(&more, &request))), [("a-1", 1), ("a-2", 1)]);
}

#[test]
fn lost_workers_are_replaced_in_the_fleet_where_the_rest_of_the_gang_runs() {
    let offers = vec![
        mk_offer("hub-1", "A100", 4, DOLLAR),
        in_fleet(mk_offer("a-1", "A100", 4, 2 * DOLLAR), "fleet-a"),
    ];
    let lost = |within: Option<&str>| Request {
        within: Some(within.map(str::to_owned)),
        ..mk_request("ns/llm", 1, 4, 2 * DOLLAR)
    };
    assert_eq!(nodes(matched(&quote(&offers, &lost(Some("fleet-a"))))), [("a-1", 1)]);
    assert_eq!(nodes(matched(&quote(&offers, &lost(None)))), [("hub-1", 1)]);
    let gone = quote(&offers, &lost(Some("fleet-b")));
    assert_eq!(shortage(&gone).usable, 0, "fleet B has nothing free");
}

// Explanations: one constraint at a time is the one that cuts the supply.

/// 12 A100s at $2 in eu-west that match everything, beside `others` that do not.
fn explain_with(others: Vec<Offer>, request: &Request) -> Shortage {
    let mut offers =
        vec![mk_offer("fit-a", "A100", 8, 2 * DOLLAR), mk_offer("fit-b", "A100", 4, 2 * DOLLAR)];
    offers.extend(others);
    let why = shortage(&quote(&offers, request)).clone();
    assert_eq!((why.free_matching, why.usable), (12, 12));
    why
}

fn bulk(prefix: &str, count: usize, model: &str, price: u64) -> Vec<Offer> {
    (0..count).map(|i| mk_offer(&format!("{prefix}-{i}"), model, 8, price)).collect()
}

fn eu_west_request() -> Request {
    Request { region: Some("eu-west".to_owned()), ..mk_request("ns/big", 32, 1, 5 * DOLLAR / 2) }
}

#[test]
fn explains_the_price() {
    let mut others = bulk("dear", 5, "H100", 3 * DOLLAR);
    others.push(mk_offer("dear-and-old", "RTX3090", 8, 3 * DOLLAR)); // fails two constraints
    let why = explain_with(others, &eu_west_request());
    assert_eq!(why.binding, Some((Constraint::Price, 40)));
    assert_eq!(
        why.to_string(),
        "need 32 GPUs of tier ≥ A100 at ≤ 2.500000/h in eu-west; 12 free match all \
         constraints, 40 more exceed the price"
    );
}

#[test]
fn explains_the_model_tier_and_names() {
    let why = explain_with(bulk("old", 3, "RTX4090", DOLLAR), &eu_west_request());
    assert_eq!(why.binding, Some((Constraint::Model, 24)));
    assert!(
        why.to_string().ends_with("12 free match all constraints, 24 more are below tier A100")
    );

    let request =
        Request { models: ModelFilter::Models(vec!["A100".to_owned()]), ..eu_west_request() };
    let why = explain_with(bulk("h", 2, "H100", DOLLAR), &request);
    assert_eq!(why.binding, Some((Constraint::Model, 16)));
    assert!(why.to_string().starts_with("need 32 GPUs of model A100 at"));
    assert!(why.to_string().ends_with(", 16 more are other models"));
}

#[test]
fn explains_memory() {
    let mut small = bulk("small", 3, "A100", DOLLAR);
    small.iter_mut().for_each(|o| o.memory_mib = 40_960);
    let request = Request { min_memory_mib: 81_920, ..eu_west_request() };
    let why = explain_with(small, &request);
    assert_eq!(why.binding, Some((Constraint::Memory, 24)));
    assert!(why.to_string().contains(" with ≥ 81920 MiB at ≤ 2.500000/h"));
    assert!(why.to_string().ends_with(", 24 more have less than 81920 MiB"));
}

#[test]
fn explains_region_and_zone() {
    let mut elsewhere = bulk("us", 4, "A100", DOLLAR);
    elsewhere.iter_mut().for_each(|o| o.region = "us-east".to_owned());
    let why = explain_with(elsewhere, &eu_west_request());
    assert_eq!(why.binding, Some((Constraint::Region, 32)));
    assert!(why.to_string().ends_with(", 32 more are in other regions"));

    let mut other_zone = bulk("b", 2, "A100", DOLLAR);
    other_zone.iter_mut().for_each(|o| o.zone = "eu-west-1b".to_owned());
    let request = Request { zone: Some("eu-west-1a".to_owned()), ..eu_west_request() };
    let why = explain_with(other_zone, &request);
    assert_eq!(why.binding, Some((Constraint::Zone, 16)));
    assert!(why.to_string().contains(" in eu-west/eu-west-1a;"));
    assert!(why.to_string().ends_with(", 16 more are in other zones"));
}

#[test]
fn explains_reputation() {
    let mut unproven = bulk("new", 3, "A100", DOLLAR);
    unproven.iter_mut().for_each(|o| o.reputation = 100);
    let request = Request { min_reputation: 400, ..eu_west_request() };
    let why = explain_with(unproven, &request);
    assert_eq!(why.binding, Some((Constraint::Reputation, 24)));
    assert!(why.to_string().contains(" from reputation ≥ 400;"));
    assert!(why.to_string().ends_with(", 24 more are from suppliers below reputation 400"));
}

#[test]
fn the_constraint_excluding_most_is_named() {
    let mut others = bulk("dear", 1, "A100", 3 * DOLLAR);
    others.extend(bulk("old", 2, "RTX3090", DOLLAR));
    let why = explain_with(others, &eu_west_request());
    assert_eq!(why.binding, Some((Constraint::Model, 16)));
}

#[test]
fn a_worker_gets_the_share_of_cpu_and_memory_that_comes_with_its_gpus() {
    // 8 GPUs, 100 cores and 1000 GiB + 7 bytes: the shares are rounded down.
    let mut offer = with_allocatable(mk_offer("a", "A100", 8, DOLLAR), 100, 1000);
    offer.allocatable =
        offer.allocatable.map(|a| HostResources { memory_bytes: a.memory_bytes + 7, ..a });
    let a = matched(&quote(&[offer], &mk_request("ns/a", 3, 2, DOLLAR))).clone();
    let expected = HostResources { cpu_millicores: 25_000, memory_bytes: (250 << 30) + 1 };
    assert!(a.workers.iter().all(|w| w.resources == Some(expected)), "{a:?}");

    // 3 GPUs: a third of 1000 millicores is 333, not 333.33.
    let odd = share(HostResources { cpu_millicores: 1_000, memory_bytes: 10 }, 1, 3);
    assert_eq!(odd, HostResources { cpu_millicores: 333, memory_bytes: 3 });
}

#[test]
fn an_ask_within_the_share_is_what_the_worker_gets_and_only_nodes_that_hold_it_qualify() {
    let offers = vec![
        // 4 cores per GPU, cheap; 16 cores per GPU, dearer.
        with_allocatable(mk_offer("thin", "A100", 8, DOLLAR), 32, 512),
        with_allocatable(mk_offer("fat", "A100", 8, 2 * DOLLAR), 128, 1024),
    ];
    let request = Request {
        per_worker: WorkerAsk { cpu_millicores: Some(8_000), memory_bytes: None },
        ..mk_request("ns/a", 2, 1, 2 * DOLLAR)
    };
    let a = matched(&quote(&offers, &request)).clone();
    assert_eq!(nodes(&a), [("fat", 2)]);
    let got = HostResources { cpu_millicores: 8_000, memory_bytes: 128 << 30 };
    assert!(a.workers.iter().all(|w| w.resources == Some(got)), "the ask, and the memory share");

    // Two GPUs per worker double the share: the thin node holds 8 cores then.
    let pairs = Request { gpus_per_worker: 2, ..request };
    assert_eq!(nodes(matched(&quote(&offers, &pairs))), [("thin", 2)]);
}

#[test]
fn asking_more_than_any_share_is_unmatched_with_what_to_change() {
    let offers = vec![with_allocatable(mk_offer("a", "A100", 8, DOLLAR), 64, 512)];
    let request = Request {
        per_worker: WorkerAsk { cpu_millicores: Some(16_000), memory_bytes: Some(32 << 30) },
        ..mk_request("ns/a", 1, 1, DOLLAR)
    };
    let why = shortage(&quote(&offers, &request)).clone();
    assert_eq!(why.binding, Some((Constraint::Cpu, 8)));
    assert_eq!(
        why.to_string(),
        "need 1 GPU of tier ≥ A100 with 16000 millicores of CPU and 32768 MiB of memory per \
         worker at ≤ 1.000000/h; 0 free match all constraints, 8 more are on nodes whose CPU \
         share per worker is less than 16000 millicores (or not published): lower \
         spec.perWorker.cpuMillicores, or leave it out to take each node's share"
    );

    let memory = Request {
        per_worker: WorkerAsk { cpu_millicores: None, memory_bytes: Some(128 << 30) },
        ..request
    };
    let why = shortage(&quote(&offers, &memory)).clone();
    assert_eq!(why.binding, Some((Constraint::HostMemory, 8)));
    assert!(why.to_string().contains("lower spec.perWorker.memoryMib"), "{why}");
}

#[test]
fn an_offer_without_allocatable_serves_workers_without_cpu_or_memory_but_no_ask() {
    // An agent from before allocatable was published.
    let offers = vec![mk_offer("old", "A100", 4, DOLLAR)];
    let a = matched(&quote(&offers, &mk_request("ns/a", 2, 1, DOLLAR))).clone();
    assert!(a.workers.iter().all(|w| w.resources.is_none()), "{a:?}");

    let asking = Request {
        per_worker: WorkerAsk { cpu_millicores: None, memory_bytes: Some(1 << 30) },
        ..mk_request("ns/a", 1, 1, DOLLAR)
    };
    assert_eq!(shortage(&quote(&offers, &asking)).binding, Some((Constraint::HostMemory, 4)));
}

// Across requests.

#[test]
fn the_oldest_request_is_served_first_whatever_the_input_order() {
    let offers =
        vec![mk_offer("cheap", "A100", 4, DOLLAR), mk_offer("dear", "A100", 4, 2 * DOLLAR)];
    let old = Request { created: 10, ..mk_request("ns/z-old", 1, 4, 2 * DOLLAR) };
    let young = Request { created: 20, ..mk_request("ns/a-young", 1, 4, 2 * DOLLAR) };
    for requests in [vec![old.clone(), young.clone()], vec![young.clone(), old.clone()]] {
        let results = match_all(&offers, &requests, no_hold());
        assert_eq!(results[0].0, "ns/z-old");
        assert_eq!(nodes(matched(&results[0].1)), vec![("cheap", 1)]);
        assert_eq!(nodes(matched(&results[1].1)), vec![("dear", 1)]);
    }
}

#[test]
fn younger_requests_backfill_behind_one_that_cannot_be_matched() {
    let offers = vec![mk_offer("a", "A100", 4, DOLLAR)];
    let big = Request { created: 10, ..mk_request("ns/big", 8, 1, DOLLAR) };
    let small = Request { created: 20, ..mk_request("ns/small", 2, 1, DOLLAR) };
    let results = match_all(&offers, &[big, small], no_hold());
    assert_eq!(shortage(&results[0].1).usable, 4);
    assert_eq!(matched(&results[1].1).workers.len(), 2);
}

#[test]
fn a_request_that_fits_only_ahead_of_older_ones_goes_ahead_when_they_all_still_fit() {
    let offers =
        vec![mk_offer("cheap", "A100", 4, DOLLAR), mk_offer("dear", "A100", 4, 2 * DOLLAR)];
    let rich = Request { created: 10, ..mk_request("ns/rich", 1, 4, 2 * DOLLAR) };
    let frugal = Request { created: 20, ..mk_request("ns/frugal", 1, 4, DOLLAR) };
    let results = match_all(&offers, &[rich.clone(), frugal.clone()], no_hold());
    assert_eq!(nodes(matched(&results[0].1)), vec![("dear", 1)]);
    assert_eq!(nodes(matched(&results[1].1)), vec![("cheap", 1)]);
    assert_eq!(
        nodes(matched(&match_in_turn(&offers, std::slice::from_ref(&rich), &frugal, no_hold()))),
        vec![("cheap", 1)]
    );
    // Not when the older request would lose its match: it keeps the cheap GPUs.
    let only_cheap = vec![offers[0].clone()];
    let results = match_all(&only_cheap, &[rich, frugal], no_hold());
    assert_eq!(nodes(matched(&results[0].1)), vec![("cheap", 1)]);
    shortage(&results[1].1);
}

#[test]
fn a_request_moves_only_the_older_ones_in_its_way() {
    let cents = |c: u64| c * DOLLAR / 100;
    let offers = vec![
        mk_offer("t4", "T4", 1, cents(10)),
        mk_offer("mid", "RTX3090", 1, cents(20)),
        mk_offer("dear", "RTX3090", 1, cents(30)),
    ];
    let any = |key, created, max| Request {
        created,
        models: ModelFilter::MinTier(GpuTier::Other),
        ..mk_request(key, 1, 1, max)
    };
    let flexible = any("ns/flexible", 10, cents(30));
    let at_its_limit = any("ns/at-its-limit", 20, cents(20));
    let t4_only = Request {
        created: 30,
        models: ModelFilter::Models(vec!["T4".into()]),
        ..mk_request("ns/t4-only", 1, 1, cents(10))
    };
    // In age order the flexible request takes the T4, the only GPU the young one can use.
    // Moving every older request would push the one at its price limit out; moving only the
    // one in the way serves all three.
    let results = match_all(&offers, &[flexible, at_its_limit, t4_only], no_hold());
    let placed: Vec<(&str, Vec<(&str, usize)>)> =
        results.iter().map(|(key, outcome)| (key.as_str(), nodes(matched(outcome)))).collect();
    assert_eq!(
        placed,
        [
            ("ns/flexible", vec![("dear", 1)]),
            ("ns/at-its-limit", vec![("mid", 1)]),
            ("ns/t4-only", vec![("t4", 1)]),
        ]
    );
}

#[test]
fn older_requests_that_can_go_elsewhere_move_aside_for_one_that_fits_nowhere_else() {
    let cents = |c: u64| c * DOLLAR / 100;
    let offers = vec![
        mk_offer("t4-a", "T4", 1, cents(10)),
        mk_offer("t4-b", "T4", 1, cents(10)),
        mk_offer("rtx", "RTX3090", 1, cents(30)),
    ];
    let any = Request {
        created: 10,
        models: ModelFilter::MinTier(GpuTier::Other),
        ..mk_request("ns/any", 1, 1, DOLLAR)
    };
    let t4 = |key, created, max| Request {
        created,
        models: ModelFilter::Models(vec!["T4".into()]),
        ..mk_request(key, 1, 1, max)
    };
    // The T4-only request at a generous limit is given back first, but finds no other T4; the
    // one that can run anywhere moves to the RTX instead, and the frugal request gets its T4.
    let requests = [any, t4("ns/t4-generous", 20, DOLLAR), t4("ns/t4-frugal", 30, cents(10))];
    let results = match_all(&offers, &requests, no_hold());
    let placed: Vec<(&str, Vec<(&str, usize)>)> =
        results.iter().map(|(key, outcome)| (key.as_str(), nodes(matched(outcome)))).collect();
    assert_eq!(
        placed,
        [
            ("ns/any", vec![("rtx", 1)]),
            ("ns/t4-generous", vec![("t4-b", 1)]),
            ("ns/t4-frugal", vec![("t4-a", 1)]),
        ]
    );
}

/// A request, created at `created`, for `workers` workers of one GPU of these models.
fn asking(key: &str, created: i64, workers: u32, models: &[&str]) -> Request {
    Request {
        created,
        models: ModelFilter::Models(models.iter().map(|m| (*m).to_owned()).collect()),
        ..mk_request(key, workers, 1, 2 * DOLLAR)
    }
}

/// A T4 node at 10 cents, an RTX3090 one at 30 and an A100 one at a dollar, of `gpus` each.
fn three_models(gpus: u32) -> Vec<Offer> {
    let cents = |c: u64| c * DOLLAR / 100;
    vec![
        mk_offer("t4", "T4", gpus, cents(10)),
        mk_offer("rtx", "RTX3090", gpus, cents(30)),
        mk_offer("a100", "A100", gpus, DOLLAR),
    ]
}

fn served(results: &[(String, Outcome)]) -> Vec<(&str, bool)> {
    let served = |outcome: &Outcome| matches!(outcome, Outcome::Matched(_));
    results.iter().map(|(key, outcome)| (key.as_str(), served(outcome))).collect()
}

#[test]
fn filling_the_dearest_gpus_first_serves_a_left_out_one_when_moving_one_step_is_not_enough() {
    // Cheapest first, the T4 goes to the first request and the RTX3090 to the second; the
    // T4-only request is left out with the A100 free. Moving the first request alone finds no
    // free GPU it can use: only a chain of moves (first to the RTX3090, second to the A100)
    // frees the T4. The fill pass, each request on its dearest GPUs, finds that chain.
    let offers = three_models(1);
    let requests = [
        asking("ns/t4-or-rtx", 10, 1, &["T4", "RTX3090"]),
        asking("ns/rtx-or-a100", 20, 1, &["RTX3090", "A100"]),
        asking("ns/t4-only", 30, 1, &["T4"]),
    ];
    let results = match_all(&offers, &requests, no_hold());
    let placed: Vec<(&str, Vec<(&str, usize)>)> =
        results.iter().map(|(key, outcome)| (key.as_str(), nodes(matched(outcome)))).collect();
    assert_eq!(
        placed,
        [
            ("ns/t4-or-rtx", vec![("rtx", 1)]),
            ("ns/rtx-or-a100", vec![("a100", 1)]),
            ("ns/t4-only", vec![("t4", 1)]),
        ]
    );
    // In its turn too: what the controller binds.
    let outcome = match_in_turn(&offers, &requests[..2], &requests[2], no_hold());
    assert_eq!(nodes(matched(&outcome)), vec![("t4", 1)]);
}

#[test]
fn filling_first_never_costs_an_older_request_its_match() {
    // Nodes of two GPUs. Filling first puts the first request on the RTX3090s and the second on
    // the A100s, which leaves the A100-only request out: four served instead of three (the
    // T4-only ones), but at an older one's cost.
    let offers = three_models(2);
    let requests = [
        asking("ns/t4-or-rtx", 10, 2, &["T4", "RTX3090"]),
        asking("ns/rtx-or-a100", 20, 2, &["RTX3090", "A100"]),
        asking("ns/a100-only", 25, 2, &["A100"]),
        asking("ns/t4-a", 30, 1, &["T4"]),
        asking("ns/t4-b", 40, 1, &["T4"]),
    ];
    assert_eq!(
        served(&match_all(&offers, &requests, no_hold())),
        [
            ("ns/t4-or-rtx", true),
            ("ns/rtx-or-a100", true),
            ("ns/a100-only", true),
            ("ns/t4-a", false),
            ("ns/t4-b", false)
        ]
    );
    // Without the A100-only request, filling first costs no one: the T4-only ones are served.
    let without: Vec<Request> =
        requests.iter().filter(|r| r.key != "ns/a100-only").cloned().collect();
    assert!(served(&match_all(&offers, &without, no_hold())).iter().all(|(_, s)| *s));
}

#[test]
fn in_its_turn_a_request_gets_what_older_ones_leave_whoever_asks_first() {
    let offers = vec![mk_offer("a", "A100", 4, DOLLAR), mk_offer("b", "A100", 2, DOLLAR)];
    let old = Request { created: 10, ..mk_request("ns/old", 1, 4, DOLLAR) };
    let young = Request { created: 20, ..mk_request("ns/young", 1, 4, DOLLAR) };
    let small = Request { created: 30, ..mk_request("ns/small", 1, 2, DOLLAR) };
    let queue = [young.clone(), old.clone(), small.clone()];
    // The young request asks first, yet the only 4-GPU node is the old one's: no 4 GPUs are
    // left together for it.
    assert_eq!(shortage(&match_in_turn(&offers, &queue, &young, no_hold())).usable, 0);
    assert_eq!(nodes(matched(&match_in_turn(&offers, &queue, &old, no_hold()))), vec![("a", 1)]);
    // Backfill: what the older ones cannot use is still served.
    assert_eq!(nodes(matched(&match_in_turn(&offers, &queue, &small, no_hold()))), vec![("b", 1)]);
    // Alone, the young request would have been matched.
    matched(&match_in_turn(&offers, &[], &young, no_hold()));
}

#[test]
fn a_request_that_waited_long_enough_holds_the_gpus_it_can_use() {
    let offers =
        vec![mk_offer("a100", "A100", 4, DOLLAR), mk_offer("gaming", "RTX4090", 4, DOLLAR)];
    let big = Request { created: 0, ..mk_request("ns/big", 8, 1, DOLLAR) };
    let small = Request {
        created: 100,
        models: ModelFilter::MinTier(GpuTier::Other),
        ..mk_request("ns/small", 6, 1, DOLLAR)
    };
    let policy = |now| HoldPolicy { now, after_secs: 600, for_secs: 3600 };

    // Not waited long enough: the small request backfills onto the A100s too.
    let results = match_all(&offers, &[big.clone(), small.clone()], policy(599));
    assert_eq!(nodes(matched(&results[1].1)), vec![("a100", 4), ("gaming", 2)]);

    // Waited: the A100s are held for it; the small request may only use what it cannot.
    let mut market = Market::new(&offers);
    let results = market.match_all(&[big.clone(), small.clone()], policy(600));
    assert_eq!(market.holder(), Some("ns/big"));
    let why = shortage(&results[1].1);
    assert_eq!((why.free_matching, why.held.clone()), (4, Some(("ns/big".to_owned(), 4))));
    assert!(why.to_string().contains(", 4 more are held for the older request ns/big"));
    let fits_beside = Request { workers: 4, ..small.clone() };
    assert_eq!(nodes(matched(&market.quote(&fits_beside))), vec![("gaming", 4)]);
    // The holder still sees its GPUs.
    assert_eq!(shortage(&market.quote(&big)).usable, 4);

    // The hold lapses after `for_secs`, so a request the market cannot serve does not block it.
    let results = match_all(&offers, &[big.clone(), small.clone()], policy(600 + 3600));
    matched(&results[1].1);
}

#[test]
fn the_holder_is_matched_once_enough_gpus_are_free_and_holds_no_more_than_its_gang() {
    let offers = vec![mk_offer("a", "A100", 8, DOLLAR), mk_offer("b", "A100", 8, 2 * DOLLAR)];
    let waited = HoldPolicy { now: 1000, after_secs: 600, for_secs: 3600 };
    let big = Request { created: 0, ..mk_request("ns/big", 3, 4, 2 * DOLLAR) };
    let small = Request { created: 10, ..mk_request("ns/small", 1, 4, 2 * DOLLAR) };
    let cheap_only = Request { created: 10, ..mk_request("ns/cheap-only", 1, 2, DOLLAR) };
    // Needs 12 of 16 free: matched, and the rest backfills.
    let results = match_all(&offers, &[big.clone(), small.clone()], waited);
    assert_eq!(nodes(matched(&results[0].1)), vec![("a", 2), ("b", 1)]);
    matched(&results[1].1);

    // 20 GPUs wanted, 16 free: it holds its 4 slots' GPUs and nothing is left to others.
    let bigger = Request { workers: 5, ..big };
    let mut market = Market::new(&offers);
    let results = market.match_all(&[bigger, small, cheap_only], waited);
    assert_eq!(results[1].0, "ns/cheap-only");
    assert_eq!(shortage(&results[1].1).held, Some(("ns/big".to_owned(), 8)));
    assert_eq!(shortage(&results[2].1).held, Some(("ns/big".to_owned(), 16)));
}

// Properties on random small markets.

/// The outcome is the brute-force cheapest gang on `offers`, on the nodes its placement wants,
/// or explains correctly that there is none.
fn prop_assert_optimal(
    outcome: &Outcome,
    offers: &[Offer],
    request: &Request,
) -> Result<(), TestCaseError> {
    match (outcome, best_gang(offers, request)) {
        (Outcome::Matched(assignment), Some(best)) => {
            prop_assert_eq!(assignment.hourly_cost(), best.cost);
            let used: HashSet<&str> = assignment.workers.iter().map(|w| w.node.as_str()).collect();
            let wanted = match request.placement {
                Placement::Pack => best.min_nodes,
                Placement::Spread => best.max_nodes,
            };
            prop_assert_eq!(used.len(), wanted);
        }
        (Outcome::Unmatched(Explanation::Short(why)), None) => {
            // Too few usable GPUs, or enough of them in too many fleets.
            match &why.largest_site {
                None => prop_assert!(why.usable < why.needed()),
                Some((_, gpus)) => {
                    prop_assert!(why.usable >= why.needed() && *gpus < why.needed())
                }
            }
            let free_matching: usize =
                offers.iter().filter(|o| accepts(o, request)).map(|o| o.free_gpus.len()).sum();
            prop_assert_eq!(why.free_matching, free_matching as u64);
        }
        (outcome, best) => prop_assert!(false, "engine {:?} but brute force {:?}", outcome, best),
    }
    Ok(())
}

const MODELS: [&str; 4] = ["H100", "A100", "RTX4090", "a100"];

fn arb_offers() -> impl Strategy<Value = Vec<Offer>> {
    let place = (0..2usize, 0..2usize, 0..3u32);
    // Nodes of 8 GPUs, some leased; half of them publish 32 or 64 cores and 256 or 512 GiB.
    let allocatable = prop::option::of(1u64..=2);
    // Half of them on the hub's own nodes, the rest in two fleets.
    let fleet = prop::sample::select(vec![None, None, Some("f1"), Some("f2")]);
    let offer = (0..MODELS.len(), 0u32..=8, 0..3usize, 1u64..=4, place, allocatable, fleet);
    prop::collection::vec(offer, 0..7).prop_map(|offers| {
        offers
            .into_iter()
            .enumerate()
            .map(
                |(
                    i,
                    (model, gpus, memory, price, (region, zone, reputation), allocatable, fleet),
                )| {
                    let offer = Offer {
                        memory_mib: [24_576, 40_960, 81_920][memory],
                        region: ["eu-west", "us-east"][region].to_owned(),
                        zone: ["z1", "z2"][zone].to_owned(),
                        reputation: reputation * 400,
                        node_gpus: 8,
                        fleet: fleet.map(str::to_owned),
                        ..mk_offer(&format!("node-{i}"), MODELS[model], gpus, price * DOLLAR)
                    };
                    match allocatable {
                        Some(size) => with_allocatable(offer, 32 * size, 256 * size),
                        None => offer,
                    }
                },
            )
            .collect()
    })
}

fn arb_request() -> impl Strategy<Value = Request> {
    let models = prop_oneof![
        1 => prop::sample::subsequence(MODELS.to_vec(), 1..3)
            .prop_map(|m| ModelFilter::Models(m.into_iter().map(str::to_owned).collect())),
        3 => prop::sample::select(GpuTier::ALL.to_vec()).prop_map(ModelFilter::MinTier),
    ];
    // Loose more often than not, so that many offers compete and ties are common.
    let location = (prop::option::weighted(0.3, 0..2usize), prop::option::weighted(0.2, 0..2usize));
    let place = (location, prop::sample::select(vec![0, 0, 1, 2u32]), any::<bool>());
    let memory = prop::sample::select(vec![0, 0, 1, 2usize]);
    // Mostly no ask; else 4 or 8 cores and 32 or 64 GiB per worker.
    let ask = (prop::option::weighted(0.3, 1u64..=2), prop::option::weighted(0.3, 1u64..=2));
    (models, memory, 1u32..=4, 1u32..=4, 1u64..=4, place, 0i64..4, ask).prop_map(
        |(
            models,
            memory,
            workers,
            g,
            price,
            ((region, zone), rep, spread),
            created,
            (cpu, mem),
        )| Request {
            models,
            min_memory_mib: [0, 40_960, 81_920][memory],
            region: region.map(|r| ["eu-west", "us-east"][r].to_owned()),
            zone: zone.map(|z| ["z1", "z2"][z].to_owned()),
            min_reputation: rep * 400,
            placement: if spread { Placement::Spread } else { Placement::Pack },
            per_worker: WorkerAsk {
                cpu_millicores: cpu.map(|c| 4_000 * c),
                memory_bytes: mem.map(|m| (32 * m) << 30),
            },
            created,
            ..mk_request("", workers, g, price * DOLLAR)
        },
    )
}

fn arb_requests() -> impl Strategy<Value = Vec<Request>> {
    prop::collection::vec(arb_request(), 0..6).prop_map(|requests| {
        requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| Request { key: format!("ns/r{i}"), ..r })
            .collect()
    })
}

proptest! {
    #[test]
    fn every_assignment_is_a_complete_gang_within_every_constraint_and_no_gpu_is_used_twice(
        offers in arb_offers(),
        requests in arb_requests(),
        now in 0i64..2000,
    ) {
        let hold = HoldPolicy { now, after_secs: 1000, for_secs: 500 };
        let results = match_all(&offers, &requests, hold);
        prop_assert_eq!(results.len(), requests.len());
        let mut used = HashSet::new();
        for (key, outcome) in &results {
            let Outcome::Matched(assignment) = outcome else { continue };
            let request = requests.iter().find(|r| r.key == *key).expect("known key");
            prop_assert_eq!(assignment.workers.len(), request.workers as usize);
            for worker in &assignment.workers {
                let offer = offers.iter().find(|o| o.node == worker.node).expect("known node");
                prop_assert!(accepts(offer, request), "{} breaks a constraint of {}", offer.node, key);
                prop_assert_eq!(worker.price_per_gpu_hour, offer.price_per_gpu_hour);
                prop_assert_eq!(worker.gpus.len(), request.gpus_per_worker as usize);
                let share = offer.worker_share(request.gpus_per_worker);
                prop_assert_eq!(worker.resources, request.per_worker.grant(share));
                if let (Some(got), Some(share)) = (worker.resources, share) {
                    prop_assert!(got.cpu_millicores <= share.cpu_millicores);
                    prop_assert!(got.memory_bytes <= share.memory_bytes);
                }
                for gpu in &worker.gpus {
                    prop_assert!(offer.free_gpus.contains(gpu), "{} is not free on {}", gpu, offer.node);
                    prop_assert!(used.insert(gpu.clone()), "{} assigned twice", gpu);
                }
            }
        }
        // No feasible way to serve the same requests is cheaper than the optimum.
        let served: Vec<Request> = results
            .iter()
            .filter(|(_, outcome)| matches!(outcome, Outcome::Matched(_)))
            .map(|(key, _)| requests.iter().find(|r| r.key == *key).expect("known key").clone())
            .collect();
        let cost: u64 = results
            .iter()
            .filter_map(|(_, outcome)| match outcome {
                Outcome::Matched(a) => Some(a.hourly_cost()),
                Outcome::Unmatched(_) => None,
            })
            .sum();
        prop_assert!(cost >= best_total(&offers, &served).expect("the engine served them"));
    }

    #[test]
    fn shares_of_one_node_never_add_up_to_more_than_it_has(
        cpu in 1u64..=4_096_000,
        memory in 1u64..=(64 << 40),
        leases in prop::collection::vec(1u32..=16, 1..8),
        spare in 0u32..4,
    ) {
        let node_gpus = leases.iter().sum::<u32>() + spare;
        let allocatable = HostResources { cpu_millicores: cpu, memory_bytes: memory };
        let shares: Vec<HostResources> =
            leases.iter().map(|&gpus| share(allocatable, gpus, node_gpus)).collect();
        prop_assert!(shares.iter().map(|s| s.cpu_millicores).sum::<u64>() <= cpu);
        prop_assert!(shares.iter().map(|s| s.memory_bytes).sum::<u64>() <= memory);
        // Rounded down by less than a millicore or byte each.
        for (s, &gpus) in shares.iter().zip(&leases) {
            let exact = u128::from(cpu) * u128::from(gpus);
            prop_assert!(u128::from(s.cpu_millicores) * u128::from(node_gpus) <= exact);
            prop_assert!(u128::from(s.cpu_millicores + 1) * u128::from(node_gpus) > exact);
        }
        // The whole node's GPUs take the whole node.
        prop_assert_eq!(share(allocatable, node_gpus, node_gpus), allocatable);
    }

    #[test]
    fn the_same_input_in_any_order_gives_the_same_answer(
        (offers, shuffled_offers) in arb_offers().prop_flat_map(|o| (Just(o.clone()), Just(o).prop_shuffle())),
        (requests, shuffled_requests) in arb_requests().prop_flat_map(|r| (Just(r.clone()), Just(r).prop_shuffle())),
    ) {
        let hold = HoldPolicy { now: 3, after_secs: 1, for_secs: 100 };
        prop_assert_eq!(
            match_all(&offers, &requests, hold),
            match_all(&shuffled_offers, &shuffled_requests, hold)
        );
    }

    #[test]
    fn no_request_could_do_better_on_what_a_pass_leaves_free(
        offers in arb_offers(),
        requests in arb_requests(),
    ) {
        let results = match_all(&offers, &requests, no_hold());
        let taken: HashSet<&String> = results
            .iter()
            .filter_map(|(_, outcome)| match outcome {
                Outcome::Matched(a) => Some(a.workers.iter().flat_map(|w| &w.gpus)),
                Outcome::Unmatched(_) => None,
            })
            .flatten()
            .collect();
        for (key, outcome) in &results {
            let request = requests.iter().find(|r| r.key == *key).expect("known key");
            // What is free after the pass, plus the request's own GPUs.
            let own: HashSet<&String> = match outcome {
                Outcome::Matched(a) => a.workers.iter().flat_map(|w| &w.gpus).collect(),
                Outcome::Unmatched(_) => HashSet::new(),
            };
            let mut left = offers.clone();
            left.iter_mut()
                .for_each(|o| o.free_gpus.retain(|g| own.contains(g) || !taken.contains(g)));
            match outcome {
                Outcome::Matched(_) => prop_assert_optimal(outcome, &left, request)?,
                Outcome::Unmatched(Explanation::Short(_)) => {
                    prop_assert_eq!(best_gang(&left, request), None, "{} left unmatched", key);
                }
                Outcome::Unmatched(Explanation::Invalid(_)) => {}
            }
        }
    }

    #[test]
    fn a_younger_request_goes_ahead_only_when_every_older_one_still_fits(
        offers in arb_offers(),
        requests in arb_requests(),
    ) {
        // Matched in age order alone means matched in the pass: moves never cost an older
        // request its match.
        let results = match_all(&offers, &requests, no_hold());
        let mut age_order = requests.clone();
        age_order.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
        for (at, request) in age_order.iter().enumerate() {
            let Outcome::Matched(_) = match_all(&offers, &age_order[..=at], no_hold())[at].1 else {
                continue;
            };
            let (_, outcome) = results.iter().find(|(k, _)| *k == request.key).expect("known key");
            prop_assert!(matches!(outcome, Outcome::Matched(_)), "{} lost its match", request.key);
        }
    }

    #[test]
    fn a_quote_costs_the_brute_force_optimum_on_the_nodes_its_placement_wants(
        offers in arb_offers(),
        request in arb_request(),
    ) {
        prop_assert_optimal(&quote(&offers, &request), &offers, &request)?;
    }
}
