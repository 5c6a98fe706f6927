//! What matching answers for a request, and why a request is not matched, in numbers.

use std::fmt;

use gpumarket_crds::{Amount, GpuTier};

use super::model::{Assignment, ModelFilter, Request};

/// The answer for one request: a complete gang, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Matched(Assignment),
    Unmatched(Explanation),
}

/// One constraint of a request, as named in explanations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Constraint {
    Price,
    Model,
    Memory,
    Region,
    Zone,
    Reputation,
}

impl Constraint {
    /// Every constraint, in the order that breaks ties when naming the binding one (price first:
    /// it is the one a buyer most often can change).
    pub const ALL: [Constraint; 6] = [
        Constraint::Price,
        Constraint::Model,
        Constraint::Memory,
        Constraint::Region,
        Constraint::Zone,
        Constraint::Reputation,
    ];

    pub(super) fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Why a request found no complete gang. Counts are GPUs; "usable" GPUs are those that come in
/// whole workers (`gpus_per_worker` free on one node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Explanation {
    /// The request cannot be served whatever the supply (the API schema normally prevents this).
    Invalid(String),
    Short(Shortage),
}

/// The supply as the request saw it, and the constraint that cuts it most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortage {
    /// What was asked, to be shown back.
    pub request: Request,
    /// Free GPUs that meet every constraint, in whole workers or not.
    pub free_matching: u64,
    /// Of those, GPUs usable as whole workers.
    pub usable: u64,
    /// Usable GPUs that meet every constraint but are held for an older, starving request.
    pub held: Option<(String, u64)>,
    /// Usable GPUs that meet every constraint but went to older requests in the same pass.
    pub taken_by_older: u64,
    /// The constraint whose relaxation alone would add the most usable GPUs, and how many.
    pub binding: Option<(Constraint, u64)>,
}

impl Shortage {
    pub fn needed(&self) -> u64 {
        u64::from(self.request.workers) * u64::from(self.request.gpus_per_worker)
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Explanation::Invalid(why) => f.write_str(why),
            Explanation::Short(shortage) => shortage.fmt(f),
        }
    }
}

/// One line for a Kubernetes condition, e.g. "need 32 GPUs (8 workers × 4 on one node) of tier ≥
/// A100 at ≤ 2.500000/h in eu-west; 12 free match all constraints, 40 more exceed the price".
impl fmt::Display for Shortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        write!(f, "need {} GPUs", self.needed())?;
        if r.gpus_per_worker > 1 {
            let workers = if r.workers == 1 { "worker" } else { "workers" };
            write!(f, " ({} {workers} × {} on one node)", r.workers, r.gpus_per_worker)?;
        }
        match &r.models {
            ModelFilter::Models(models) => write!(f, " of model {}", models.join(" or "))?,
            ModelFilter::MinTier(GpuTier::Other) => f.write_str(" of any model")?,
            ModelFilter::MinTier(tier) => write!(f, " of tier ≥ {tier}")?,
        }
        if r.min_memory_mib > 0 {
            write!(f, " with ≥ {} MiB", r.min_memory_mib)?;
        }
        write!(f, " at ≤ {}/h", Amount::new(r.max_price_per_gpu_hour))?;
        match (&r.region, &r.zone) {
            (Some(region), Some(zone)) => write!(f, " in {region}/{zone}")?,
            (Some(region), None) => write!(f, " in {region}")?,
            (None, Some(zone)) => write!(f, " in zone {zone}")?,
            (None, None) => {}
        }
        if r.min_reputation > 0 {
            write!(f, " from reputation ≥ {}", r.min_reputation)?;
        }
        write!(f, "; {} free match all constraints", self.free_matching)?;
        if self.usable < self.free_matching {
            write!(f, " but only {} of them form whole workers", self.usable)?;
        }
        if let Some((holder, gpus)) = &self.held {
            write!(f, ", {gpus} more are held for the older request {holder}")?;
        }
        if self.taken_by_older > 0 {
            write!(f, ", {} more went to older requests", self.taken_by_older)?;
        }
        match self.binding {
            Some((constraint, gpus)) => write!(f, ", {gpus} more {}", excluded_by(constraint, r)),
            None => f.write_str(", no other free GPU misses only one constraint"),
        }
    }
}

/// How GPUs excluded by `constraint` alone are described: "40 more exceed the price".
fn excluded_by(constraint: Constraint, r: &Request) -> String {
    match constraint {
        Constraint::Price => "exceed the price".to_owned(),
        Constraint::Model => match &r.models {
            ModelFilter::Models(_) => "are other models".to_owned(),
            ModelFilter::MinTier(tier) => format!("are below tier {tier}"),
        },
        Constraint::Memory => format!("have less than {} MiB", r.min_memory_mib),
        Constraint::Region => "are in other regions".to_owned(),
        Constraint::Zone => "are in other zones".to_owned(),
        Constraint::Reputation => {
            format!("are from suppliers below reputation {}", r.min_reputation)
        }
    }
}
