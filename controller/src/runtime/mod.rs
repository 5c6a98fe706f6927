//! The controller as a process: what every reconcile is handed ([`context`]) and the caches it
//! reads ([`cache`]), leader election and the fence that keeps a paused leader from paying
//! ([`leader`]), and metrics and health endpoints ([`metrics`]).

pub mod cache;
pub mod context;
pub mod leader;
pub mod metrics;
