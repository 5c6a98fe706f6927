//! The cheapest worker slots for one request.
//!
//! Every worker needs `g` GPUs on one node and all GPUs of a node have one price, so a node with
//! `f` usable GPUs is `f / g` interchangeable worker slots costing `price × g` each. The cheapest
//! gang is then simply the `workers` cheapest slots: any gang that leaves a cheaper slot unused
//! while using a dearer one gets cheaper by swapping them. So every slot cheaper than the
//! dearest slot used (the boundary price) is used in every cheapest gang, and the only freedom
//! left is which slots of the boundary price to take. That is where placement decides:
//! - Pack: fewest nodes, by taking the boundary nodes with the most slots first until one
//!   holds what is left, and then the smallest that does (best fit: a single worker fills a
//!   partly used node rather than break into an empty one, which stays whole for a larger gang);
//! - Spread: most nodes, by taking one slot per boundary node in turn, the nodes with the fewest
//!   slots first (partly used nodes fill up; empty ones stay whole for a larger gang).
//!
//! Among boundary nodes equal on that count, higher reputation and then node name go first.
//!
//! A gang stays inside one site (one fleet, or the hub's own nodes), so the above is done per
//! site, in one scan of the price-ordered supply, and the cheapest site's gang wins: placement
//! (fewest nodes for pack, most for spread) and then the site's name break ties. The scan stops
//! where no site it has not completed could still match the cheapest gang.

use gpumarket_crds::Placement;

use super::index::{Entry, Index, Need};

/// Workers to place on one index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pick {
    pub entry: usize,
    pub workers: u32,
}

pub(super) enum Selection {
    /// Picks for exactly the workers asked, all in one site, ordered by entry (price, then node).
    Complete(Vec<Pick>),
    /// Every slot the request could use in the site with the most of them, fewer than it needs,
    /// in entry order.
    Partial(Vec<Pick>),
}

/// What one request asks of the index, besides its constraints.
pub(super) struct Gang {
    pub workers: u32,
    pub gpus_per_worker: u32,
    pub placement: Placement,
}

/// The slots one site offers a request, as the scan finds them.
struct SiteSlots {
    site: u32,
    /// Candidate slots in price order, none dearer than the boundary once there is one.
    picks: Vec<Pick>,
    found: u64,
    /// Price of the cheapest `workers` slots of the site, per GPU, summed over the slots found
    /// until there are that many.
    cost: u64,
    /// The price at which the site has enough slots for the gang.
    boundary: Option<u64>,
}

/// The cheapest `gang.workers` slots in one site among entries that meet `need`, where `usable`
/// says how many GPUs of an entry this request may take. `gang.gpus_per_worker` must not be
/// zero.
pub(super) fn cheapest_slots(
    index: &Index<'_>,
    need: &Need,
    gang: &Gang,
    usable: impl Fn(&Entry) -> u32,
) -> Selection {
    let wanted = u64::from(gang.workers);
    // Position in `sites` of each site id seen.
    let mut seen: Vec<Option<usize>> = vec![None; index.site_count()];
    let mut sites: Vec<SiteSlots> = Vec::new();
    let mut incomplete = 0usize;
    let mut last_boundary = None;
    for (pos, entry) in index.entries.iter().enumerate() {
        // Entries are in price order: nothing after a dearer one is within budget; and once
        // every site seen has its gang, an entry dearer than all their boundaries cannot tie
        // in them, and a site not seen yet would cost more than any of them.
        if entry.price > need.max_price
            || incomplete == 0 && last_boundary.is_some_and(|b| entry.price > b)
        {
            break;
        }
        let slots = usable(entry) / gang.gpus_per_worker;
        if slots == 0 || need.failures(entry) != 0 {
            continue;
        }
        let at = *seen[entry.site as usize].get_or_insert_with(|| {
            incomplete += 1;
            sites.push(SiteSlots {
                site: entry.site,
                picks: Vec::new(),
                found: 0,
                cost: 0,
                boundary: None,
            });
            sites.len() - 1
        });
        let site = &mut sites[at];
        if site.boundary.is_some_and(|b| entry.price > b) {
            continue;
        }
        site.picks.push(Pick { entry: pos, workers: slots });
        if site.boundary.is_none() {
            let taken = u64::from(slots).min(wanted - site.found);
            site.cost = site.cost.saturating_add(entry.price.saturating_mul(taken));
            site.found += u64::from(slots);
            if site.found >= wanted {
                site.boundary = Some(entry.price);
                last_boundary = Some(entry.price);
                incomplete -= 1;
            }
        } else {
            site.found += u64::from(slots);
        }
    }
    if !sites.iter().any(|site| site.boundary.is_some()) {
        let most = sites.into_iter().max_by(|a, b| {
            a.found.cmp(&b.found).then_with(|| index.site_name(b.site).cmp(index.site_name(a.site)))
        });
        return Selection::Partial(most.map(|site| site.picks).unwrap_or_default());
    }
    let best = sites
        .into_iter()
        .filter_map(|site| {
            let boundary = site.boundary?;
            let picks = site_gang(index, site.picks, boundary, wanted, gang.placement);
            let nodes = picks.len() as i64;
            let nodes = if gang.placement == Placement::Spread { -nodes } else { nodes };
            Some(((site.cost, nodes, index.site_name(site.site)), picks))
        })
        .min_by(|a, b| a.0.cmp(&b.0));
    Selection::Complete(best.map(|(_, picks)| picks).unwrap_or_default())
}

/// The dearest `workers` slots of `gpus_per_worker` GPUs in one site among entries that meet
/// `need` (`usable` as in [`cheapest_slots`]), found scanning down from the dearest supply
/// within the price limit: the first site to hold the gang wins. In entry order; `None` when no
/// site holds it. What a fill pass takes (see `engine`).
pub(super) fn dearest_slots(
    index: &Index<'_>,
    need: &Need,
    (workers, gpus_per_worker): (u32, u32),
    usable: impl Fn(&Entry) -> u32,
) -> Option<Vec<Pick>> {
    if workers == 0 {
        return Some(Vec::new());
    }
    let mut sites: Vec<(u32, Vec<Pick>)> = vec![(0, Vec::new()); index.site_count()];
    let within = index.entries.partition_point(|e| e.price <= need.max_price);
    for (pos, entry) in index.entries[..within].iter().enumerate().rev() {
        let slots = usable(entry) / gpus_per_worker;
        if slots == 0 || need.failures(entry) != 0 {
            continue;
        }
        let (found, picks) = &mut sites[entry.site as usize];
        let taken = slots.min(workers - *found);
        picks.push(Pick { entry: pos, workers: taken });
        *found += taken;
        if *found == workers {
            let mut gang = std::mem::take(picks);
            gang.reverse();
            return Some(gang);
        }
    }
    None
}

/// The cheapest `wanted` of one site's `candidates` (in price order, none dearer than
/// `boundary`, at least `wanted` slots): all those cheaper than the boundary, and the rest at
/// the boundary price as the placement wants; in entry order.
fn site_gang(
    index: &Index<'_>,
    mut candidates: Vec<Pick>,
    boundary: u64,
    wanted: u64,
    placement: Placement,
) -> Vec<Pick> {
    let split = candidates.partition_point(|c| index.entries[c.entry].price < boundary);
    let cheaper: u64 = candidates[..split].iter().map(|c| u64::from(c.workers)).sum();
    // `cheaper < wanted`, or the boundary would be a lower price.
    let left = u32::try_from(wanted - cheaper).unwrap_or(u32::MAX);
    let at_boundary = candidates.split_off(split);
    candidates.extend(share_boundary(index, at_boundary, left, placement));
    candidates.sort_by_key(|c| c.entry);
    candidates
}

/// Place `workers` workers on boundary-price slots (`group`, more than enough of them) as the
/// placement wants.
fn share_boundary(
    index: &Index<'_>,
    mut group: Vec<Pick>,
    workers: u32,
    placement: Placement,
) -> Vec<Pick> {
    let reputation = |p: &Pick| index.entries[p.entry].reputation;
    let mut left = workers;
    match placement {
        Placement::Pack => {
            group.sort_by_key(|p| (std::cmp::Reverse((p.workers, reputation(p))), p.entry));
            let mut chosen = Vec::new();
            while left > 0 && !group.is_empty() {
                // The smallest node that holds what is left finishes the gang (best fit);
                // until one does, the largest is taken whole.
                let at = (0..group.len())
                    .filter(|&i| group[i].workers >= left)
                    .min_by_key(|&i| group[i].workers)
                    .unwrap_or(0);
                let mut pick = group.remove(at);
                pick.workers = pick.workers.min(left);
                left -= pick.workers;
                chosen.push(pick);
            }
            chosen
        }
        Placement::Spread => {
            // Nodes with the fewest slots first: a worker goes to a partly used node rather
            // than break into an empty one, which stays whole for a larger gang.
            group.sort_by_key(|p| (p.workers, std::cmp::Reverse(reputation(p)), p.entry));
            let capacity: Vec<u32> = group.iter().map(|p| p.workers).collect();
            group.iter_mut().for_each(|p| p.workers = 0);
            while left > 0 {
                for (pick, &cap) in group.iter_mut().zip(&capacity) {
                    if left > 0 && pick.workers < cap {
                        pick.workers += 1;
                        left -= 1;
                    }
                }
            }
            group.retain(|p| p.workers > 0);
            group
        }
    }
}
