//! Conversions between the Kubernetes objects and the matching engine's plain types, and the
//! health rules that decide which offered GPUs are usable. Pure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gpumarket_crds::common::is_valid_wallet;
use gpumarket_crds::{GpuCluster, GpuHealth, GpuLease, GpuOffer, GpuState};
use jiff::Timestamp;

use crate::matching::{ModelFilter, Offer, Request, WorkerAsk};
use crate::runtime::context::Settings;
use crate::settlement::stake::StakePolicy;

/// Most a heartbeat may lie in the future (clocks of the agent's node and the controller's
/// differ a little); one further ahead is a lie that would keep a dead offer fresh forever.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(10);

/// Whether the offer's agent has heartbeated within `timeout` of `now`: the one freshness rule
/// of matching, failure detection and reputation. A heartbeat more than [`MAX_CLOCK_SKEW`] in
/// the future is stale.
pub fn heartbeat_fresh(offer: &GpuOffer, now: Timestamp, timeout: Duration) -> bool {
    let Some(last) = offer.status.as_ref().and_then(|s| s.last_heartbeat.as_ref()) else {
        return false;
    };
    let age = now.duration_since(last.0);
    if age.is_negative() {
        return age.unsigned_abs() <= MAX_CLOCK_SKEW;
    }
    age.unsigned_abs() <= timeout
}

/// When the offer's heartbeat goes stale, if it is fresh now.
pub fn heartbeat_deadline(offer: &GpuOffer, timeout: Duration) -> Option<Timestamp> {
    let last = offer.status.as_ref()?.last_heartbeat.as_ref()?.0;
    last.checked_add(jiff::SignedDuration::try_from(timeout).ok()?).ok()
}

/// Per-GPU state from the offer status, if reported.
pub fn gpu_state<'a>(offer: &'a GpuOffer, uuid: &str) -> Option<&'a GpuState> {
    offer.status.as_ref()?.gpus.iter().find(|g| g.uuid == uuid)
}

/// A GPU is usable unless the agent reported it unhealthy.
pub fn gpu_healthy(offer: &GpuOffer, uuid: &str) -> bool {
    gpu_state(offer, uuid).and_then(|g| g.health) != Some(GpuHealth::Unhealthy)
}

/// Name of the lease a GPU is allocated to, if any.
pub fn gpu_lease<'a>(offer: &'a GpuOffer, uuid: &str) -> Option<&'a str> {
    gpu_state(offer, uuid).and_then(|g| g.lease.as_deref())
}

/// GPUs of the offer that are offered, healthy and not allocated, in offer order.
pub fn free_gpus(offer: &GpuOffer) -> Vec<String> {
    offer
        .spec
        .gpus
        .iter()
        .filter(|g| gpu_healthy(offer, &g.uuid) && gpu_lease(offer, &g.uuid).is_none())
        .map(|g| g.uuid.clone())
        .collect()
}

/// The offer as supply for matching, or `None` when it cannot be matched now (stale heartbeat,
/// no GPUs). A node offers one model; GPUs of another model on the same node are left out.
pub fn market_offer(offer: &GpuOffer, now: Timestamp, timeout: Duration) -> Option<Offer> {
    // An offer that could never be paid (its wallet is no public key) is not supply.
    if !heartbeat_fresh(offer, now, timeout) || !is_valid_wallet(&offer.spec.wallet) {
        return None;
    }
    // GPUs that failed their last proof of compute are not what they claim to be.
    if crate::market::proof::compute_refused(offer) {
        return None;
    }
    let first = offer.spec.gpus.first()?;
    let same_model =
        |uuid: &str| offer.spec.gpus.iter().any(|g| g.uuid == uuid && g.model == first.model);
    let free: Vec<String> = free_gpus(offer).into_iter().filter(|u| same_model(u)).collect();
    let memory_mib = offer
        .spec
        .gpus
        .iter()
        .filter(|g| g.model == first.model)
        .map(|g| g.memory_mib)
        .min()
        .unwrap_or(first.memory_mib);
    let status = offer.status.as_ref();
    Some(Offer {
        node: offer.spec.node_name.clone(),
        free_gpus: free,
        model: first.model.clone(),
        tier: first.tier(),
        memory_mib,
        price_per_gpu_hour: offer.spec.price_per_gpu_hour,
        region: offer.spec.region.clone(),
        zone: offer.spec.zone.clone().unwrap_or_default(),
        interconnect: offer.spec.interconnect,
        reputation: status.and_then(|s| s.reputation.as_ref()).map_or(0, |r| r.score),
        stake: offer.bonded_stake(),
        allocatable: offer.spec.allocatable,
        node_gpus: u32::try_from(offer.spec.gpus.len()).unwrap_or(u32::MAX),
        fleet: crate::fleet::offer_fleet(offer).map(str::to_owned),
        spec_generation: offer.metadata.generation,
    })
}

/// The offers that `admits` (with settlement on: staked enough) as supply for matching at `now`:
/// what the controller matches on, and what `kubectl gpumarket quote` quotes on.
pub fn market_supply<'a>(
    offers: impl IntoIterator<Item = &'a GpuOffer>,
    admits: impl Fn(&GpuOffer) -> bool,
    now: Timestamp,
    timeout: Duration,
) -> Vec<Offer> {
    offers.into_iter().filter(|o| admits(o)).filter_map(|o| market_offer(o, now, timeout)).collect()
}

/// The supply the controller matches on at `now`: the offers verification `admitted`, with
/// settlement on staked as `stake` asks, each GPU of the tier the market's `settings` give its
/// model. `kubectl gpumarket quote` quotes on the same.
pub fn matchable_supply<'a>(
    offers: impl IntoIterator<Item = &'a GpuOffer>,
    admitted: impl Fn(&GpuOffer) -> bool,
    settings: &Settings,
    stake: Option<&StakePolicy>,
    now: Timestamp,
) -> Vec<Offer> {
    let tier_of = |model: &str| crate::policy::tier_of(settings, model);
    let staked = |o: &GpuOffer| stake.is_none_or(|s| s.admits(o, tier_of));
    let mut supply =
        market_supply(offers, |o| admitted(o) && staked(o), now, settings.heartbeat_timeout);
    for offer in &mut supply {
        offer.tier = tier_of(&offer.model);
    }
    supply
}

/// `supply`, read a moment ago, as the offers `cached` now have it: less the GPUs leased or
/// unhealthy since and those `set_aside` (offer, GPU), and without the offers gone or whose
/// spec changed since (a lease is bound on the offer's price and wallet, as verified).
pub fn as_cached_now(
    supply: &[Offer],
    cached: impl Fn(&str) -> Option<Arc<GpuOffer>>,
    set_aside: impl Fn(&str, &str) -> bool,
) -> Vec<Offer> {
    supply
        .iter()
        .filter_map(|offer| {
            let current = cached(&offer.node)?;
            if current.metadata.generation != offer.spec_generation {
                return None;
            }
            let free = offer.free_gpus.iter().filter(|g| {
                gpu_lease(&current, g).is_none()
                    && gpu_healthy(&current, g)
                    && !set_aside(&offer.node, g)
            });
            Some(Offer { free_gpus: free.cloned().collect(), ..offer.clone() })
        })
        .collect()
}

/// Workers of the active leases, by cluster uid.
pub fn placed_workers<'a>(leases: impl IntoIterator<Item = &'a GpuLease>) -> HashMap<&'a str, u32> {
    let mut placed: HashMap<&str, u32> = HashMap::new();
    for lease in leases.into_iter().filter(|l| crate::cluster::status::is_active(l)) {
        *placed.entry(lease.spec.cluster.uid.as_str()).or_default() += lease.spec.workers;
    }
    placed
}

/// The fleet each cluster's gang runs in (`None`: the hub's own nodes), by cluster uid: that of
/// the offer of one of its active leases, as `offer_fleet` tells it from the offer's name
/// (`None` for an offer it does not know). Its lost workers are replaced there: a gang stays
/// inside one fleet.
pub fn gang_fleets<'a>(
    leases: impl IntoIterator<Item = &'a GpuLease>,
    offer_fleet: impl Fn(&str) -> Option<Option<String>>,
) -> HashMap<&'a str, Option<String>> {
    leases
        .into_iter()
        .filter(|l| crate::cluster::status::is_active(l))
        .filter_map(|l| Some((l.spec.cluster.uid.as_str(), offer_fleet(&l.spec.offer)?)))
        .collect()
}

/// Requests of the clusters looking for GPUs, each for its workers not `placed` yet, within the
/// fleet of the rest of its gang (from [`gang_fleets`]): the queue a match waits its turn in.
pub fn waiting_requests<'a>(
    clusters: impl IntoIterator<Item = &'a GpuCluster>,
    placed: &HashMap<&str, u32>,
    fleets: &HashMap<&str, Option<String>>,
) -> Vec<Request> {
    clusters
        .into_iter()
        .filter(|c| crate::cluster::status::wants_supply(c))
        .map(|c| {
            let uid = c.metadata.uid.as_deref().unwrap_or_default();
            let missing = c.spec.workers.saturating_sub(placed.get(uid).copied().unwrap_or(0));
            Request { within: fleets.get(uid).cloned(), ..market_request(c, missing) }
        })
        .filter(|r| r.workers > 0)
        .collect()
}

/// The request for `workers` workers of `cluster` (all of them at first, the lost ones when
/// replacing).
pub fn market_request(cluster: &GpuCluster, workers: u32) -> Request {
    let spec = &cluster.spec;
    let models = match (&spec.gpu.models, spec.gpu.min_tier) {
        (Some(models), _) => ModelFilter::Models(models.clone()),
        (None, Some(tier)) => ModelFilter::MinTier(tier),
        (None, None) => ModelFilter::MinTier(gpumarket_crds::GpuTier::Other),
    };
    Request {
        key: format!(
            "{}/{}",
            cluster.metadata.namespace.as_deref().unwrap_or_default(),
            cluster.metadata.name.as_deref().unwrap_or_default()
        ),
        models,
        min_memory_mib: spec.gpu.min_memory_mib,
        workers,
        gpus_per_worker: spec.gpus_per_worker,
        max_price_per_gpu_hour: spec.max_price_per_gpu_hour,
        region: spec.location.as_ref().map(|l| l.region.clone()),
        zone: spec.location.as_ref().and_then(|l| l.zone.clone()),
        min_reputation: spec.min_reputation,
        placement: spec.placement,
        per_worker: WorkerAsk {
            cpu_millicores: spec.per_worker.and_then(|p| p.cpu_millicores),
            memory_bytes: spec.per_worker.and_then(|p| p.memory_mib).map(|mib| mib << 20),
        },
        created: cluster.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
        within: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease, mk_offer, now};

    #[test]
    fn supply_read_a_moment_ago_loses_what_was_claimed_failed_or_changed_since() {
        let mut offers = [mk_offer("a", "H100", 3, now()), mk_offer("b", "H100", 1, now())];
        for offer in &mut offers {
            offer.metadata.generation = Some(1);
        }
        let supply: Vec<Offer> =
            offers.iter().filter_map(|o| market_offer(o, now(), Duration::from_secs(60))).collect();
        let mut a = offers[0].clone();
        let state = |uuid: &str, health, lease: Option<&str>| GpuState {
            uuid: uuid.into(),
            health: Some(health),
            reason: None,
            lease: lease.map(Into::into),
        };
        a.status.get_or_insert_default().gpus = vec![
            state("a-gpu-0", GpuHealth::Healthy, Some("other")),
            state("a-gpu-1", GpuHealth::Unhealthy, None),
        ];
        let cached = |name: &str| (name == "a").then(|| Arc::new(a.clone()));
        let nothing_set_aside = |_: &str, _: &str| false;
        let now_free = as_cached_now(&supply, cached, nothing_set_aside);
        assert_eq!(now_free.len(), 1, "b is gone");
        assert_eq!(now_free[0].free_gpus, ["a-gpu-2"]);
        let set_aside = |offer: &str, gpu: &str| (offer, gpu) == ("a", "a-gpu-2");
        assert!(as_cached_now(&supply, cached, set_aside)[0].free_gpus.is_empty());

        // Any change of spec (here the wallet paid) is a new generation, the API server's count.
        let mut changed = a.clone();
        changed.spec.wallet = "another-wallet".into();
        changed.metadata.generation = Some(2);
        let cached = |_: &str| Some(Arc::new(changed.clone()));
        assert!(as_cached_now(&supply, cached, nothing_set_aside).is_empty());
    }

    #[test]
    fn stale_heartbeat_takes_the_offer_off_the_market() {
        let offer = mk_offer("node-a", "H100", 4, now() - jiff::SignedDuration::from_secs(61));
        assert!(market_offer(&offer, now(), Duration::from_secs(60)).is_none());
        assert!(market_offer(&offer, now(), Duration::from_secs(120)).is_some());
    }

    #[test]
    fn a_heartbeat_from_the_future_does_not_keep_an_offer_fresh() {
        let timeout = Duration::from_secs(60);
        let skewed = mk_offer("node-a", "H100", 1, now() + jiff::SignedDuration::from_secs(5));
        assert!(heartbeat_fresh(&skewed, now(), timeout), "a little clock skew is fine");
        let lying = mk_offer("node-a", "H100", 1, now() + jiff::SignedDuration::from_secs(3600));
        assert!(!heartbeat_fresh(&lying, now(), timeout), "an hour ahead is stale");
        assert!(market_offer(&lying, now(), timeout).is_none());
    }

    #[test]
    fn an_offer_whose_wallet_cannot_be_paid_is_not_supply() {
        let mut offer = mk_offer("node-a", "H100", 1, now());
        offer.spec.wallet = "1".repeat(44); // the right characters, but 44 zero bytes
        assert!(market_offer(&offer, now(), Duration::from_secs(60)).is_none());
    }

    #[test]
    fn a_degraded_clusters_lost_workers_wait_for_the_fleet_its_gang_runs_in() {
        let (degraded, on_hub, new) =
            (mk_cluster("degraded", 3, 1), mk_cluster("on-hub", 2, 1), mk_cluster("new", 1, 1));
        let mut ended = mk_lease(&degraded, "fleet-a.n2", &["g9"], 1);
        ended.status.get_or_insert_default().phase = Some(gpumarket_crds::LeasePhase::Ended);
        let leases = [
            mk_lease(&degraded, "fleet-a.n1", &["g0", "g1"], 2),
            ended,
            mk_lease(&on_hub, "hub-node", &["g2"], 1),
        ];
        let offer_fleet =
            |offer: &str| Some(offer.split_once('.').map(|(fleet, _)| fleet.to_owned()));
        let fleets = gang_fleets(&leases, offer_fleet);
        let placed = placed_workers(&leases);
        let queue = waiting_requests([&degraded, &on_hub, &new], &placed, &fleets);
        let asked: Vec<(&str, u32, Option<Option<&str>>)> = queue
            .iter()
            .map(|r| (r.key.as_str(), r.workers, r.within.as_ref().map(Option::as_deref)))
            .collect();
        assert_eq!(
            asked,
            [
                ("ns/degraded", 1, Some(Some("fleet-a"))),
                ("ns/on-hub", 1, Some(None)),
                ("ns/new", 1, None),
            ]
        );
    }

    #[test]
    fn unhealthy_and_allocated_gpus_are_not_free() {
        let mut offer = mk_offer("node-a", "H100", 4, now());
        let status = offer.status.get_or_insert_default();
        status.gpus = vec![
            GpuState {
                uuid: "node-a-gpu-0".into(),
                health: Some(GpuHealth::Unhealthy),
                reason: None,
                lease: None,
            },
            GpuState {
                uuid: "node-a-gpu-1".into(),
                health: Some(GpuHealth::Healthy),
                reason: None,
                lease: Some("x".into()),
            },
        ];
        let market = market_offer(&offer, now(), Duration::from_secs(60)).expect("fresh");
        assert_eq!(market.free_gpus, ["node-a-gpu-2", "node-a-gpu-3"]);
        assert_eq!(market.model, "H100");
    }
}
