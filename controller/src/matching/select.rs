//! The cheapest worker slots for one request.
//!
//! Every worker needs `g` GPUs on one node and all GPUs of a node have one price, so a node with
//! `f` usable GPUs is `f / g` interchangeable worker slots costing `price × g` each. The cheapest
//! gang is then simply the `workers` cheapest slots: any gang that leaves a cheaper slot unused
//! while using a dearer one gets cheaper by swapping them. So every slot cheaper than the
//! dearest slot used (the boundary price) is used in every cheapest gang, and the only freedom
//! left is which slots of the boundary price to take. That is where placement decides:
//! - Pack: fewest nodes, by taking the boundary nodes with the most slots first;
//! - Spread: most nodes, by taking one slot per boundary node in turn.
//!
//! Among boundary nodes equal on that count, higher reputation and then node name go first.

use gpumarket_crds::Placement;

use super::index::{Entry, Index, Need};

/// Workers to place on one index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pick {
    pub entry: usize,
    pub workers: u32,
}

pub(super) enum Selection {
    /// Picks for exactly the workers asked, ordered by entry (price, then node).
    Complete(Vec<Pick>),
    /// Every slot the request could use, fewer than it needs, in entry order.
    Partial(Vec<Pick>),
}

/// What one request asks of the index, besides its constraints.
pub(super) struct Gang {
    pub workers: u32,
    pub gpus_per_worker: u32,
    pub placement: Placement,
}

/// The cheapest `gang.workers` slots among entries that meet `need`, where `usable` says how
/// many GPUs of an entry this request may take. `gang.gpus_per_worker` must not be zero.
pub(super) fn cheapest_slots(
    index: &Index<'_>,
    need: &Need,
    gang: &Gang,
    usable: impl Fn(&Entry) -> u32,
) -> Selection {
    let wanted = u64::from(gang.workers);
    let mut candidates = Vec::new();
    let mut found = 0u64;
    let mut boundary_price = None;
    for (pos, entry) in index.entries.iter().enumerate() {
        // Entries are in price order: nothing after a dearer one can be within budget or tie.
        if entry.price > boundary_price.unwrap_or(need.max_price) {
            break;
        }
        let slots = usable(entry) / gang.gpus_per_worker;
        if slots == 0 || need.failures(entry) != 0 {
            continue;
        }
        candidates.push(Pick { entry: pos, workers: slots });
        found += u64::from(slots);
        if boundary_price.is_none() && found >= wanted {
            boundary_price = Some(entry.price);
        }
    }
    let Some(boundary_price) = boundary_price else {
        return Selection::Partial(candidates);
    };
    let split = candidates.partition_point(|c| index.entries[c.entry].price < boundary_price);
    let cheaper: u64 = candidates[..split].iter().map(|c| u64::from(c.workers)).sum();
    // `cheaper < wanted`, or the boundary would be a lower price.
    let left = u32::try_from(wanted - cheaper).unwrap_or(u32::MAX);
    let at_boundary = candidates.split_off(split);
    candidates.extend(share_boundary(index, at_boundary, left, gang.placement));
    candidates.sort_by_key(|c| c.entry);
    Selection::Complete(candidates)
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
            group.retain_mut(|p| {
                p.workers = p.workers.min(left);
                left -= p.workers;
                p.workers > 0
            });
            group
        }
        Placement::Spread => {
            group.sort_by_key(|p| (std::cmp::Reverse(reputation(p)), p.entry));
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
