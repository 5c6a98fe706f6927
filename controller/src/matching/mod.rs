//! Gang matching of requests to supplier GPUs at minimum cost. Pure: no I/O.
//!
//! [`match_all`] serves every pending request (oldest first, with backfill, older requests
//! moved to make room for one that fits only then, a pass filling the dearest GPUs first when
//! one is left short, and an anti-starvation hold, see `engine`);
//! [`match_in_turn`] answers for one request after the older ones (what the controller binds);
//! [`quote`] and [`Market::quote`] answer for one request without taking anything. Both choose
//! GPUs the same way (`select`): the cheapest complete gang, placement and reputation breaking
//! ties, so the same input always gives the same answer.

#[cfg(test)]
mod brute_force;
mod engine;
mod explain;
mod index;
mod model;
mod select;
#[cfg(test)]
mod tests;

pub use engine::{HoldPolicy, Market, avoiding_failed, match_all, match_in_turn, quote};
pub use explain::{Constraint, Explanation, Outcome, Shortage};
pub use model::{Assignment, ModelFilter, Offer, Request, WorkerAsk, WorkerSlot, share};
