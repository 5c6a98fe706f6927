//! The controller as a process: what every reconcile is handed ([`context`]), leader election
//! and the fence that keeps a paused leader from paying ([`leader`]), and metrics and health
//! endpoints ([`metrics`]).

pub mod context;
pub mod leader;
pub mod metrics;
