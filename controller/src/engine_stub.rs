//! Stand-in for `matching::quote` until the matching engine lands (greedy, cheapest first);
//! removed when `crate::matching::{quote, Outcome}` exist.
use crate::matching::{Assignment, Offer, Request};
pub enum Outcome {
    Matched(Assignment),
    Unmatched(Explanation),
}
pub struct Explanation(pub String);
impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
pub fn quote(offers: &[Offer], request: &Request) -> Outcome {
    let mut workers = Vec::new();
    let mut offers: Vec<Offer> = offers.to_vec();
    offers.sort_by_key(|o| (o.price_per_gpu_hour, o.node.clone()));
    for o in &mut offers {
        let ok = match &request.models {
            crate::matching::ModelFilter::Models(m) => {
                m.iter().any(|x| x.eq_ignore_ascii_case(&o.model))
            }
            crate::matching::ModelFilter::MinTier(t) => o.tier >= *t,
        };
        if !ok || o.price_per_gpu_hour > request.max_price_per_gpu_hour {
            continue;
        }
        while workers.len() < request.workers as usize
            && o.free_gpus.len() >= request.gpus_per_worker as usize
        {
            let gpus: Vec<String> = o.free_gpus.drain(..request.gpus_per_worker as usize).collect();
            workers.push(crate::matching::WorkerSlot {
                node: o.node.clone(),
                gpus,
                price_per_gpu_hour: o.price_per_gpu_hour,
            });
        }
    }
    if workers.len() == request.workers as usize {
        Outcome::Matched(Assignment { workers })
    } else {
        Outcome::Unmatched(Explanation(format!(
            "only {} of {} workers fit the free supply",
            workers.len(),
            request.workers
        )))
    }
}
