//! What matching answers for a request, and why a request is not matched, in numbers.

use std::fmt;

use gpumarket_crds::{Amount, GpuTier};

use super::index::{Index, Need};
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
    /// CPU per worker (`spec.perWorker.cpuMillicores`) beyond the node's share.
    Cpu,
    /// Memory per worker (`spec.perWorker.memoryMib`) beyond the node's share.
    HostMemory,
}

impl Constraint {
    /// Every constraint, in the order that breaks ties when naming the binding one (price first:
    /// it is the one a buyer most often can change).
    pub const ALL: [Constraint; 8] = [
        Constraint::Price,
        Constraint::Model,
        Constraint::Memory,
        Constraint::Region,
        Constraint::Zone,
        Constraint::Reputation,
        Constraint::Cpu,
        Constraint::HostMemory,
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
    /// Boxed: a shortage carries the whole request, many times the size of the other answers.
    Short(Box<Shortage>),
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
    /// When the usable GPUs would be enough together but no one site has enough of them (a gang
    /// stays inside one fleet, or on the hub's own nodes): the site with the most usable GPUs
    /// (a fleet's name, "" for the hub's own nodes), and how many it has.
    pub largest_site: Option<(String, u64)>,
    /// When offers are on the market but not one lists a model the request accepts (a typo in
    /// `spec.gpu.models`, or a tier nobody offers): the models that are on offer, each once.
    pub models_on_offer: Option<Box<[String]>>,
}

/// The models on offer when the market has offers and none of them, free GPUs or not, is of a
/// model the request accepts (see [`Shortage::models_on_offer`]).
pub(super) fn models_on_offer(index: &Index<'_>, need: &Need) -> Option<Box<[String]>> {
    let lists_an_accepted_model =
        index.entries.iter().any(|e| need.failures(e) & Constraint::Model.bit() == 0);
    if index.entries.is_empty() || lists_an_accepted_model {
        return None;
    }
    let mut models: Vec<String> = index.offers.iter().map(|o| o.model.clone()).collect();
    // Spellings that differ in case only are one model, named by the first spelling in byte
    // order, so that the answer does not depend on the order of the offers.
    models.sort_by(|a, b| a.to_ascii_uppercase().cmp(&b.to_ascii_uppercase()).then(a.cmp(b)));
    models.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    Some(models.into_boxed_slice())
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
        let needed = self.needed();
        write!(f, "need {needed} {}", if needed == 1 { "GPU" } else { "GPUs" })?;
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
        let with = if r.min_memory_mib > 0 { "and" } else { "with" };
        match (r.per_worker.cpu_millicores, r.per_worker.memory_bytes) {
            (Some(cpu), Some(bytes)) => write!(
                f,
                " {with} {cpu} millicores of CPU and {} MiB of memory per worker",
                mib(bytes)
            )?,
            (Some(cpu), None) => write!(f, " {with} {cpu} millicores of CPU per worker")?,
            (None, Some(bytes)) => write!(f, " {with} {} MiB of memory per worker", mib(bytes))?,
            (None, None) => {}
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
        if let Some(models) = &self.models_on_offer {
            return match &r.models {
                ModelFilter::Models(wanted) => write!(
                    f,
                    "; no offer on the market lists model {}: the models on offer are {} \
                     (check spec.gpu.models for a typo)",
                    wanted.join(" or "),
                    models.join(", ")
                ),
                ModelFilter::MinTier(tier) => write!(
                    f,
                    "; no offer on the market is of tier ≥ {tier}: the models on offer are {} \
                     (lower spec.gpu.minTier, or wait for supply)",
                    models.join(", ")
                ),
            };
        }
        write!(f, "; {} free match all constraints", self.free_matching)?;
        if let Some((site, gpus)) = &self.largest_site {
            let place = if site.is_empty() {
                "on the hub's own nodes".to_owned()
            } else {
                format!("in fleet {site}")
            };
            return write!(
                f,
                " but no one fleet has {needed} of them, and a gang stays inside one fleet (or \
                 on the hub's own nodes): the most in one place is {gpus} ({place}); ask for at \
                 most {gpus} GPUs (spec.workers × spec.gpusPerWorker, e.g. spec.workers {}), or \
                 wait for one fleet to have {needed} free",
                gpus / u64::from(r.gpus_per_worker.max(1))
            );
        }
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
        Constraint::Cpu => format!(
            "are on nodes whose CPU share per worker is less than {} millicores (or not \
             published): lower spec.perWorker.cpuMillicores, or leave it out to take each \
             node's share",
            r.per_worker.cpu_millicores.unwrap_or_default()
        ),
        Constraint::HostMemory => format!(
            "are on nodes whose memory share per worker is less than {} MiB (or not \
             published): lower spec.perWorker.memoryMib, or leave it out to take each node's \
             share",
            mib(r.per_worker.memory_bytes.unwrap_or_default())
        ),
    }
}

/// Bytes as whole MiB (asks are made in MiB).
fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

#[cfg(test)]
mod tests {
    use gpumarket_crds::{GpuTier, Interconnect, Placement};

    use super::super::{Offer, WorkerAsk, quote};
    use super::*;

    fn offer(node: &str, model: &str, free: usize) -> Offer {
        Offer {
            node: node.to_owned(),
            free_gpus: (0..free).map(|i| format!("GPU-{node}-{i}")).collect(),
            model: model.to_owned(),
            tier: GpuTier::of_model(model),
            memory_mib: 81_920,
            price_per_gpu_hour: 1_000_000,
            region: "eu-west".to_owned(),
            zone: "eu-west-1a".to_owned(),
            interconnect: Interconnect::NvLink,
            reputation: 500,
            stake: 0,
            allocatable: None,
            node_gpus: u32::try_from(free).unwrap_or(u32::MAX),
            fleet: None,
            spec_generation: None,
        }
    }

    fn request(models: ModelFilter) -> Request {
        Request {
            key: "ns/typo".to_owned(),
            models,
            min_memory_mib: 0,
            workers: 1,
            gpus_per_worker: 1,
            max_price_per_gpu_hour: 2_000_000,
            region: None,
            zone: None,
            min_reputation: 0,
            placement: Placement::Pack,
            per_worker: WorkerAsk::default(),
            created: 0,
            within: None,
        }
    }

    fn explanation(offers: &[Offer], request: &Request) -> Shortage {
        match quote(offers, request) {
            Outcome::Unmatched(Explanation::Short(shortage)) => *shortage,
            other => panic!("expected a shortage, got {other:?}"),
        }
    }

    #[test]
    fn a_model_no_offer_lists_is_named_with_the_models_on_offer() {
        // The only H100s are all leased: H100 is still a model on offer.
        let offers = [offer("a", "A100", 4), offer("b", "H100", 0), offer("c", "a100", 2)];
        let typo = request(ModelFilter::Models(vec!["H10O".to_owned()]));
        let why = explanation(&offers, &typo);
        assert_eq!(
            why.models_on_offer.as_deref(),
            Some(&["A100".to_owned(), "H100".to_owned()][..])
        );
        assert_eq!(
            why.to_string(),
            "need 1 GPU of model H10O at ≤ 2.000000/h; no offer on the market lists model \
             H10O: the models on offer are A100, H100 (check spec.gpu.models for a typo)"
        );

        let tier = request(ModelFilter::MinTier(GpuTier::H100));
        let why = explanation(&[offer("a", "A100", 4)], &tier);
        assert!(
            why.to_string().ends_with(
                "no offer on the market is of tier ≥ H100: the models on offer are A100 \
                 (lower spec.gpu.minTier, or wait for supply)"
            ),
            "{why}"
        );
    }

    #[test]
    fn a_listed_model_without_free_gpus_is_explained_by_counts() {
        let offers = [offer("a", "A100", 4), offer("b", "H100", 0)];
        let why = explanation(&offers, &request(ModelFilter::Models(vec!["h100".to_owned()])));
        assert_eq!(why.models_on_offer, None);
        assert!(why.to_string().contains("; 0 free match all constraints"), "{why}");
        // An empty market has no models to name.
        let why = explanation(&[], &request(ModelFilter::Models(vec!["H10O".to_owned()])));
        assert_eq!(why.models_on_offer, None);
    }
}
