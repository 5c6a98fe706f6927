//! Gang matching of requests to supplier GPUs at minimum cost. Pure: no I/O.

mod model;

pub use model::{Assignment, ModelFilter, Offer, Request, WorkerSlot};
