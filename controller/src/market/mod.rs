//! The market's view of supply and how GPUs are bound to requests: which offered GPUs can be
//! matched ([`supply`]), claiming them for a gang without ever handing one GPU to two clusters
//! ([`binding`]), and the GpuOffer controller that keeps each offer's availability and
//! allocations true ([`offer`]) and challenges idle offers to prove their GPUs compute ([`proof`]).

pub mod binding;
pub mod offer;
pub mod proof;
pub mod supply;
