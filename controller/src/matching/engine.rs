//! Matching over a standing market: a pass over all pending requests, oldest first with
//! backfill, and quotes for requests not applied yet against what the pass left.
//!
//! Making room: taking the cheapest GPUs oldest first leaves a buyer with a low price limit
//! (or a narrow choice of models) unserved once older buyers who could have paid for other GPUs
//! took the ones it can use. So a request that does not fit on what older ones left moves a few
//! of those on GPUs it could use, those able to pay the most first: their gangs are given back
//! until it fits; it is placed, and they are placed again, each on its cheapest gang of what is
//! left. If one of them finds none, they are moved one by one instead, each onto its cheapest
//! gang among the GPUs the request cannot use (one that has none stays where it is), until the
//! request fits on what they freed. Either way the moves stand only when all of them still have
//! a complete gang (an older request may pay more, never above its own price limit); else
//! nothing changes. An older request never loses its match to a younger one this
//! way. Moves free GPUs, so the matched requests then settle: each takes its cheapest gang on
//! what is free and its own, so no buyer could do better on what the pass leaves. What fairness
//! costs in price, and what the moves win in requests served, is what the matching bench
//! prints.
//!
//! Filling first: moves are bounded and go one step (an older request moves only onto GPUs
//! free at that point), so a request can stay left out that the supply could serve: taking the
//! cheapest GPUs oldest first spends the cheap ones, which every buyer can afford, on buyers
//! who could have paid for others. So when a pass leaves short a request that the supply could
//! serve on its own, the pass is done again filling first: each request, oldest first, takes
//! the dearest gang within its own price limit, which leaves the cheap GPUs to buyers who can
//! afford nothing else; then every matched request settles onto its cheapest gang on what is
//! free and its own, so no buyer pays for the order GPUs were handed out in. The fill pass is
//! kept when it serves more requests and, of those the two passes differ on, the oldest: a
//! request loses its match only to an older one, never to a younger one.
//!
//! Anti-starvation: backfill alone lets a stream of small requests take every GPU that frees up
//! while an old large request waits for enough of them to be free at once. So the oldest
//! unmatched request that has waited [`HoldPolicy::after_secs`] holds the free GPUs it could use
//! (its cheapest usable slots, never more than its gang needs): younger requests backfill only
//! on the rest, and the holder is matched as soon as enough of its GPUs are free together. One
//! request holds at a time, which bounds what is held to one gang. A request that the market
//! can never serve must not block it for good, so a request holds for at most
//! [`HoldPolicy::for_secs`]; the next oldest waiting request holds after it.

use std::collections::BTreeSet;

use super::explain::{Constraint, Explanation, Outcome, Shortage};
use super::index::{Entry, Index, Need};
use super::model::{Assignment, Offer, Request, WorkerSlot};
use super::select::{Gang, Pick, Selection, cheapest_slots, dearest_slots};

/// When a waiting request may hold GPUs (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldPolicy {
    /// Seconds since the epoch, on the same clock as `Request::created`.
    pub now: i64,
    /// A request holds once it has waited this long.
    pub after_secs: i64,
    /// ...and for at most this long.
    pub for_secs: i64,
}

impl HoldPolicy {
    pub const DEFAULT_AFTER_SECS: i64 = 10 * 60;
    pub const DEFAULT_FOR_SECS: i64 = 6 * 60 * 60;

    /// The default policy at `now`.
    pub fn at(now: i64) -> Self {
        HoldPolicy { now, after_secs: Self::DEFAULT_AFTER_SECS, for_secs: Self::DEFAULT_FOR_SECS }
    }

    fn may_hold(&self, request: &Request) -> bool {
        let waited = self.now.saturating_sub(request.created);
        waited >= self.after_secs && waited - self.after_secs < self.for_secs
    }
}

/// How many older requests may move to make room for one that does not fit (see
/// [`Market::make_room`]).
const MAX_MOVED: usize = 32;
/// Rounds of [`Market::settle`] at most; a request moves only onto a gang it prefers.
const MAX_SETTLE_ROUNDS: usize = 4;

/// Which gang each request takes in a pass, oldest first (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Its cheapest.
    Cheapest,
    /// Its dearest within its price limit; the matched requests settle onto their cheapest
    /// after the pass.
    Fill,
}

/// What one pass decided for each request, by position in the pass's order: its gang, or why
/// it has none; and the market it leaves.
struct Pass {
    gangs: Vec<Option<Vec<Pick>>>,
    unmatched: Vec<Option<Explanation>>,
    entries: Vec<Entry>,
    holder: Option<String>,
}

impl Pass {
    /// Whether this pass serves more requests than `other` and, of those the two passes
    /// differ on, serves the oldest: a request loses its match only to an older one.
    fn serves_more_than(&self, other: &Pass) -> bool {
        let served = |pass: &Pass| pass.gangs.iter().flatten().count();
        let first_difference =
            self.gangs.iter().zip(&other.gangs).find(|(g, o)| g.is_some() != o.is_some());
        first_difference.is_some_and(|(g, _)| g.is_some()) && served(self) > served(other)
    }

    /// Positions of the requests short of supply.
    fn left_out(&self) -> impl Iterator<Item = usize> + '_ {
        let short = |at: &usize| matches!(self.unmatched[*at], Some(Explanation::Short(_)));
        (0..self.unmatched.len()).filter(short)
    }
}

/// Free supply indexed once, and what has been matched or held on it since.
pub struct Market<'a> {
    index: Index<'a>,
    /// Key of the request holding GPUs (`Entry::held`), if any.
    holder: Option<String>,
}

impl<'a> Market<'a> {
    pub fn new(offers: &'a [Offer]) -> Self {
        Market { index: Index::new(offers), holder: None }
    }

    /// The request holding GPUs after the last pass, if any.
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_deref()
    }

    /// Match every request, oldest first (then by key); a request that cannot be matched does
    /// not stop younger ones that can (backfill), within the hold rule. A request that does not
    /// fit on what older ones took may move some of them (see [`Market::make_room`]); once such
    /// moves settled ([`Market::settle`]), what they freed is offered again, oldest first, to
    /// the requests still unmatched. GPUs matched are taken from the market; any earlier hold
    /// is replaced by this pass's.
    pub fn match_all(&mut self, requests: &[Request], hold: HoldPolicy) -> Vec<(String, Outcome)> {
        self.release_hold();
        let mut order: Vec<&Request> = requests.iter().collect();
        order.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
        let start = self.index.entries.clone();
        let mut best = self.pass(&order, hold, Way::Cheapest);
        // Filling first can serve more only if a request left short could be served on the
        // supply alone (one that never can, waiting for more, costs no second pass).
        self.reset(&start);
        let fits_alone = |at: usize| matches!(self.select(order[at]), Ok(Selection::Complete(_)));
        if best.left_out().any(fits_alone) {
            let filled = self.pass(&order, hold, Way::Fill);
            if filled.serves_more_than(&best) {
                best = filled;
            }
        }
        self.index.entries = best.entries;
        self.holder = best.holder;
        // GPUs are handed out once every gang is final, oldest request first.
        let mut first: Vec<u32> = start.iter().map(|e| e.taken).collect();
        let mut next = |entry: usize, gpus: u32| {
            let at = first[entry];
            first[entry] += gpus;
            at
        };
        order
            .iter()
            .zip(best.gangs.into_iter().zip(best.unmatched))
            .map(|(request, (gang, why))| {
                let outcome = match (gang, why) {
                    (Some(picks), _) => {
                        Outcome::Matched(self.assignment(request, &picks, &mut next))
                    }
                    (None, Some(why)) => Outcome::Unmatched(why),
                    (None, None) => unreachable!("a request is matched or has a reason"),
                };
                (request.key.clone(), outcome)
            })
            .collect()
    }

    /// One pass of [`Market::match_all`] over `order`, each request taking its gang `way`.
    fn pass(&mut self, order: &[&Request], hold: HoldPolicy, way: Way) -> Pass {
        let mut gangs = vec![None; order.len()];
        let mut unmatched = Vec::with_capacity(order.len());
        let mut moved = false;
        for (at, request) in order.iter().enumerate() {
            unmatched.push(match self.select_by(request, way) {
                Err(invalid) => Some(Explanation::Invalid(invalid)),
                Ok(Selection::Complete(picks)) => {
                    self.take(request, &picks);
                    gangs[at] = Some(picks);
                    None
                }
                Ok(Selection::Partial(picks)) => {
                    if self.holder.is_none() && self.make_room(order, at, &mut gangs) {
                        moved = true;
                        None
                    } else {
                        let why = Explanation::Short(Box::new(self.shortage(request)));
                        if self.holder.is_none() && hold.may_hold(request) {
                            self.hold(request, &picks);
                        }
                        Some(why)
                    }
                }
            });
        }
        if moved || way == Way::Fill {
            self.settle(order, &mut gangs);
            for (at, request) in order.iter().enumerate() {
                if !matches!(unmatched[at], Some(Explanation::Short(_))) {
                    continue;
                }
                if let Ok(Selection::Complete(picks)) = self.select(request) {
                    self.take(request, &picks);
                    gangs[at] = Some(picks);
                    unmatched[at] = None;
                }
            }
        }
        Pass { gangs, unmatched, entries: self.index.entries.clone(), holder: self.holder.clone() }
    }

    /// The request's gang taken `way`: its dearest within its price limit when filling and it
    /// has one; else its cheapest slots (or all it could use, when they are too few).
    fn select_by(&self, request: &Request, way: Way) -> Result<Selection, String> {
        if way == Way::Fill && request.gpus_per_worker > 0 {
            let need = self.index.need(request);
            let usable = |e: &Entry| self.usable(e, request);
            let gang = (request.workers, request.gpus_per_worker);
            if let Some(picks) = dearest_slots(&self.index, &need, gang, usable) {
                return Ok(Selection::Complete(picks));
            }
        }
        self.select(request)
    }

    /// Make room for `order[at]`, which does not fit on what the older requests took, by moving
    /// older matched requests on GPUs it could use (those with the highest price limit first,
    /// the most likely to find other GPUs; then the youngest). Two ways, the first that works:
    /// - give them back one by one until it fits; place it, then place them again, oldest
    ///   first, each on its cheapest gang ([`Market::place_after_moving`]);
    /// - move them one by one, each onto its cheapest gang among the GPUs it cannot use (one
    ///   that has none stays), until it fits on what they freed ([`Market::move_aside`]).
    ///
    /// An older request never loses its match to a younger one, and never pays above its own
    /// price limit. At most [`MAX_MOVED`] move, which bounds the work per request.
    fn make_room(
        &mut self,
        order: &[&Request],
        at: usize,
        gangs: &mut [Option<Vec<Pick>>],
    ) -> bool {
        let request = order[at];
        let need = self.index.need(request);
        let mut in_the_way: Vec<usize> = (0..at)
            .filter(|&older| {
                let picks = gangs[older].iter().flatten();
                picks
                    .into_iter()
                    .any(|p| self.could_use(&need, request, &self.index.entries[p.entry]))
            })
            .collect();
        in_the_way.sort_by_key(|&older| {
            (std::cmp::Reverse(order[older].max_price_per_gpu_hour), std::cmp::Reverse(older))
        });
        let before: Vec<u32> = self.index.entries.iter().map(|e| e.taken).collect();
        in_the_way.truncate(MAX_MOVED);
        let mut placed = self.place_after_moving(order, at, gangs, &in_the_way);
        if placed.is_none() {
            self.set_taken(&before);
            placed = self.move_aside(order, at, gangs, &in_the_way, &need);
        }

        match placed {
            Some(placed) => {
                for (at, picks) in placed {
                    gangs[at] = Some(picks);
                }
                true
            }
            None => {
                self.set_taken(&before);
                false
            }
        }
    }

    /// Give back the gangs of `in_the_way` one by one until `order[at]` fits; place it, then
    /// them again, oldest first, each on its cheapest gang. The new gangs when every one of
    /// them still gets one.
    fn place_after_moving(
        &mut self,
        order: &[&Request],
        at: usize,
        gangs: &[Option<Vec<Pick>>],
        in_the_way: &[usize],
    ) -> Option<Vec<(usize, Vec<Pick>)>> {
        let request = order[at];
        for (moved, &older) in in_the_way.iter().enumerate() {
            if let Some(picks) = &gangs[older] {
                self.give_back(order[older], picks);
            }
            let Ok(Selection::Complete(mine)) = self.select(request) else { continue };
            self.take(request, &mine);
            let mut again = in_the_way[..=moved].to_vec();
            again.sort_unstable();
            let mut placed = vec![(at, mine)];
            for older in again {
                let Ok(Selection::Complete(picks)) = self.select(order[older]) else { return None };
                self.take(order[older], &picks);
                placed.push((older, picks));
            }
            return Some(placed);
        }
        None
    }

    /// Move the requests of `in_the_way` one by one onto their cheapest gang among the GPUs
    /// `order[at]` (which asks `need`) cannot use, each that has none staying where it is,
    /// until `order[at]` fits on what they freed. The new gangs when it does.
    fn move_aside(
        &mut self,
        order: &[&Request],
        at: usize,
        gangs: &[Option<Vec<Pick>>],
        in_the_way: &[usize],
        need: &Need,
    ) -> Option<Vec<(usize, Vec<Pick>)>> {
        let request = order[at];
        let mut placed = Vec::new();
        for &older in in_the_way {
            let Some(picks) = &gangs[older] else { continue };
            self.give_back(order[older], picks);
            let aside = self.select_where(order[older], |e| !self.could_use(need, request, e));
            let Ok(Selection::Complete(aside)) = aside else {
                self.take(order[older], picks);
                continue;
            };
            self.take(order[older], &aside);
            placed.push((older, aside));
            if let Ok(Selection::Complete(mine)) = self.select(request) {
                self.take(request, &mine);
                placed.push((at, mine));
                return Some(placed);
            }
        }
        None
    }

    /// Whether `request` (which asks `need`) could use GPUs of the entry.
    fn could_use(&self, need: &Need, request: &Request, entry: &Entry) -> bool {
        need.failures(entry) == 0 && self.in_site(entry, request)
    }

    /// After requests moved, each matched one (oldest first) takes the cheapest gang on the
    /// free GPUs and its own, until none changes (or [`MAX_SETTLE_ROUNDS`]): what a move freed
    /// goes to whoever it is cheaper for, so no matched request could do better on what the
    /// pass leaves free.
    fn settle(&mut self, order: &[&Request], gangs: &mut [Option<Vec<Pick>>]) {
        for _ in 0..MAX_SETTLE_ROUNDS {
            let mut changed = false;
            for (request, gang) in order.iter().zip(gangs.iter_mut()) {
                let Some(picks) = gang else { continue };
                self.give_back(request, picks);
                if let Ok(Selection::Complete(cheapest)) = self.select(request)
                    && cheapest != *picks
                {
                    *picks = cheapest;
                    changed = true;
                }
                self.take(request, picks);
            }
            if !changed {
                break;
            }
        }
    }

    /// Back to the market `entries` were, with no hold.
    fn reset(&mut self, entries: &[Entry]) {
        self.index.entries.clone_from_slice(entries);
        self.holder = None;
    }

    fn set_taken(&mut self, taken: &[u32]) {
        for (entry, &t) in self.index.entries.iter_mut().zip(taken) {
            entry.taken = t;
        }
    }

    /// What the request would get now, without taking anything: the cheapest complete gang on
    /// the supply not matched or held for others, or why there is none. For requests that are
    /// not in the last pass (a pass has already taken the GPUs of those it matched).
    pub fn quote(&self, request: &Request) -> Outcome {
        match self.select(request) {
            Err(invalid) => Outcome::Unmatched(Explanation::Invalid(invalid)),
            Ok(Selection::Complete(picks)) => {
                let mut next = |entry: usize, _| self.index.entries[entry].taken;
                Outcome::Matched(self.assignment(request, &picks, &mut next))
            }
            Ok(Selection::Partial(_)) => {
                Outcome::Unmatched(Explanation::Short(Box::new(self.shortage(request))))
            }
        }
    }

    /// The request's cheapest slots, or why it is invalid.
    fn select(&self, request: &Request) -> Result<Selection, String> {
        self.select_where(request, |_| true)
    }

    /// The request's cheapest slots on the entries `allowed` lets it use, or why it is invalid.
    fn select_where(
        &self,
        request: &Request,
        allowed: impl Fn(&Entry) -> bool,
    ) -> Result<Selection, String> {
        if request.gpus_per_worker == 0 {
            return Err(format!("{}: gpusPerWorker must be at least 1", request.key));
        }
        let gang = Gang {
            workers: request.workers,
            gpus_per_worker: request.gpus_per_worker,
            placement: request.placement,
        };
        let need = self.index.need(request);
        let usable = |e: &Entry| if allowed(e) { self.usable(e, request) } else { 0 };
        Ok(cheapest_slots(&self.index, &need, &gang, usable))
    }

    /// GPUs of the entry that the request may take: none outside the fleet it must be in, all
    /// unassigned ones for the holder, the unassigned and unheld ones for everyone else.
    fn usable(&self, entry: &Entry, request: &Request) -> u32 {
        if !self.in_site(entry, request) {
            0
        } else if self.holder.as_deref() == Some(request.key.as_str()) {
            entry.unassigned()
        } else {
            entry.unassigned() - entry.held
        }
    }

    /// Whether the entry is in the fleet the request must stay in, if it must.
    fn in_site(&self, entry: &Entry, request: &Request) -> bool {
        request.within.as_ref().is_none_or(|within| {
            self.index.site_name(entry.site) == within.as_deref().unwrap_or_default()
        })
    }

    /// The picks as workers with their GPUs: of each entry, the GPUs from the position `next`
    /// gives for it (called once per pick with the pick's GPU count). Held GPUs are the last
    /// ones of an offer (see `hold`), so those handed out come from the front.
    fn assignment(
        &self,
        request: &Request,
        picks: &[Pick],
        next: &mut impl FnMut(usize, u32) -> u32,
    ) -> Assignment {
        let g = request.gpus_per_worker as usize;
        let workers = picks
            .iter()
            .flat_map(|pick| {
                let entry = &self.index.entries[pick.entry];
                let offer = self.index.offer(entry);
                let first = next(pick.entry, pick.workers * request.gpus_per_worker) as usize;
                (0..pick.workers as usize).map(move |w| WorkerSlot {
                    node: offer.node.clone(),
                    gpus: offer.free_gpus[first + w * g..first + (w + 1) * g].to_vec(),
                    price_per_gpu_hour: offer.price_per_gpu_hour,
                    resources: request
                        .per_worker
                        .grant(offer.worker_share(request.gpus_per_worker)),
                })
            })
            .collect();
        Assignment { workers }
    }

    fn take(&mut self, request: &Request, picks: &[Pick]) {
        if self.holder.as_deref() == Some(request.key.as_str()) {
            self.release_hold();
        }
        for pick in picks {
            self.index.entries[pick.entry].taken += pick.workers * request.gpus_per_worker;
        }
    }

    fn give_back(&mut self, request: &Request, picks: &[Pick]) {
        for pick in picks {
            self.index.entries[pick.entry].taken -= pick.workers * request.gpus_per_worker;
        }
    }

    /// Hold the slots the request could use. Held GPUs are the last unassigned ones of each
    /// offer, so others keep taking from the front.
    fn hold(&mut self, request: &Request, picks: &[Pick]) {
        for pick in picks {
            self.index.entries[pick.entry].held = pick.workers * request.gpus_per_worker;
        }
        self.holder = Some(request.key.clone());
    }

    fn release_hold(&mut self) {
        self.index.entries.iter_mut().for_each(|e| e.held = 0);
        self.holder = None;
    }

    /// Count the supply as the request sees it, for its explanation.
    fn shortage(&self, request: &Request) -> Shortage {
        let need = self.index.need(request);
        let g = request.gpus_per_worker;
        let whole = |gpus: u32| u64::from(gpus / g * g);
        let mut why = Shortage {
            request: request.clone(),
            free_matching: 0,
            usable: 0,
            held: None,
            taken_by_older: 0,
            binding: None,
            largest_site: None,
            models_on_offer: super::explain::models_on_offer(&self.index, &need),
        };
        let mut held = 0;
        let mut usable_by_site = vec![0u64; self.index.site_count()];
        let mut relaxed = [0u64; Constraint::ALL.len()];
        for entry in &self.index.entries {
            let usable = self.usable(entry, request);
            match need.failures(entry) {
                0 => {
                    why.free_matching += u64::from(usable);
                    why.usable += whole(usable);
                    usable_by_site[entry.site as usize] += whole(usable);
                    held += whole(entry.unassigned()) - whole(usable);
                    why.taken_by_older += whole(entry.free) - whole(entry.unassigned());
                }
                one if one.is_power_of_two() => {
                    relaxed[one.trailing_zeros() as usize] += whole(usable);
                }
                _ => {}
            }
        }
        // Enough usable GPUs and no gang: they are in too many places.
        if why.usable >= why.needed() {
            why.largest_site = (0..self.index.site_count())
                .map(|site| (usable_by_site[site], self.index.site_name(site as u32)))
                .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
                .map(|(gpus, site)| (site.to_owned(), gpus));
        }
        if let Some(holder) = self.holder.as_ref().filter(|_| held > 0) {
            why.held = Some((holder.clone(), held));
        }
        // The first constraint (in `Constraint::ALL` order) of the largest count wins ties.
        why.binding = Constraint::ALL
            .into_iter()
            .map(|c| (c, relaxed[c as usize]))
            .filter(|&(_, gpus)| gpus > 0)
            .fold(None, |best, (c, gpus)| match best {
                Some((_, most)) if most >= gpus => best,
                _ => Some((c, gpus)),
            });
        why
    }
}

/// Match every pending request against the offers (see [`Market::match_all`]).
pub fn match_all(
    offers: &[Offer],
    requests: &[Request],
    hold: HoldPolicy,
) -> Vec<(String, Outcome)> {
    Market::new(offers).match_all(requests, hold)
}

/// What `request` gets in its turn: the pass of [`Market::match_all`] over it and every request
/// of `queue` older than it (oldest first, then by key; with backfill, moves that make room and
/// the hold rule); younger ones come after it and do not change its outcome. `request` need not
/// be in `queue`.
pub fn match_in_turn(
    offers: &[Offer],
    queue: &[Request],
    request: &Request,
    hold: HoldPolicy,
) -> Outcome {
    let turn = |r: &Request| (r.created, r.key.clone());
    let mut older: Vec<Request> =
        queue.iter().filter(|r| turn(r) < turn(request)).cloned().collect();
    older.push(request.clone());
    let mut results = Market::new(offers).match_all(&older, hold);
    results.pop().map(|(_, outcome)| outcome).unwrap_or_else(|| quote(offers, request))
}

/// The answer for a cluster replacing lost workers: `answer` on the offers other than those
/// that `failed` it (their node went silent or never started its workers), or, when those
/// cannot serve it, on all of them: a node back from a failure is better than none.
pub fn avoiding_failed(
    offers: &[Offer],
    failed: &BTreeSet<String>,
    answer: impl Fn(&[Offer]) -> Outcome,
) -> Outcome {
    if failed.is_empty() {
        return answer(offers);
    }
    let others: Vec<Offer> = offers.iter().filter(|o| !failed.contains(&o.node)).cloned().collect();
    match answer(&others) {
        Outcome::Unmatched(_) => answer(offers),
        matched => matched,
    }
}

/// What the request would get on these offers now (see [`Market::quote`]).
pub fn quote(offers: &[Offer], request: &Request) -> Outcome {
    Market::new(offers).quote(request)
}
