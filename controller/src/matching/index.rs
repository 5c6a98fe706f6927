//! The supply as matching scans it: offers in price order as compact records with interned
//! names, so that checking an offer against a request is a handful of integer comparisons.

use std::collections::HashMap;

use gpumarket_crds::{GpuTier, HostResources};

use super::explain::Constraint;
use super::model::{ModelFilter, Offer, Request, WorkerAsk, share};

/// Interned id of a name that no offer has: matches nothing.
const UNKNOWN: u32 = u32::MAX;

/// One offer in the index, with what matching has done to it so far.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub price: u64,
    pub memory_mib: u64,
    /// Position of the offer in the input slice.
    pub offer: u32,
    /// Free GPUs when the index was built.
    pub free: u32,
    /// GPUs assigned since, always the first ones of the offer's list.
    pub taken: u32,
    /// GPUs held for a starving request (see `engine`), after the taken ones.
    pub held: u32,
    pub model: u32,
    pub tier: GpuTier,
    pub region: u32,
    pub zone: u32,
    pub reputation: u32,
    pub allocatable: Option<HostResources>,
    pub node_gpus: u32,
    /// Interned fleet of the node ([`Index::site_name`]): a gang stays inside one site.
    pub site: u32,
}

impl Entry {
    /// GPUs not assigned yet, held or not.
    pub fn unassigned(&self) -> u32 {
        self.free - self.taken
    }
}

/// Offers sorted by (price, node name): the order in which the cheapest supply is found.
pub(super) struct Index<'a> {
    pub offers: &'a [Offer],
    pub entries: Vec<Entry>,
    models: HashMap<String, u32>,
    regions: HashMap<&'a str, u32>,
    zones: HashMap<&'a str, u32>,
    /// Site names by id: fleet names, and "" for the hub's own nodes.
    sites: Vec<&'a str>,
}

impl<'a> Index<'a> {
    pub fn new(offers: &'a [Offer]) -> Self {
        let mut models = HashMap::new();
        // Spellings seen, so that each is lower-cased once rather than once per offer.
        let mut spellings: HashMap<&str, u32> = HashMap::new();
        let mut regions = HashMap::new();
        let mut zones = HashMap::new();
        let mut sites = HashMap::new();
        let mut entries: Vec<Entry> = offers
            .iter()
            .enumerate()
            .map(|(i, o)| Entry {
                price: o.price_per_gpu_hour,
                memory_mib: o.memory_mib,
                offer: u32::try_from(i).unwrap_or(u32::MAX),
                free: u32::try_from(o.free_gpus.len()).unwrap_or(u32::MAX),
                taken: 0,
                held: 0,
                model: *spellings
                    .entry(&o.model)
                    .or_insert_with(|| intern(&mut models, o.model.to_ascii_lowercase())),
                tier: o.tier,
                region: intern(&mut regions, o.region.as_str()),
                zone: intern(&mut zones, o.zone.as_str()),
                reputation: o.reputation,
                allocatable: o.allocatable,
                node_gpus: o.node_gpus,
                site: intern(&mut sites, o.fleet.as_deref().unwrap_or_default()),
            })
            .collect();
        // Node names are unique; the input position only orders duplicates, should any appear.
        entries.sort_unstable_by(|a, b| {
            let node = |e: &Entry| offers[e.offer as usize].node.as_str();
            (a.price, node(a), a.offer).cmp(&(b.price, node(b), b.offer))
        });
        let mut names = vec![""; sites.len()];
        for (name, id) in sites {
            names[id as usize] = name;
        }
        Index { offers, entries, models, regions, zones, sites: names }
    }

    /// How many sites (fleets, and the hub's own nodes) the offers are in.
    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// The fleet of site `site`, "" for the hub's own nodes.
    pub fn site_name(&self, site: u32) -> &'a str {
        self.sites.get(site as usize).copied().unwrap_or_default()
    }

    pub fn offer(&self, entry: &Entry) -> &'a Offer {
        &self.offers[entry.offer as usize]
    }

    /// The request's constraints in terms of this index.
    pub fn need(&self, request: &Request) -> Need {
        let models = match &request.models {
            ModelFilter::Models(names) => Models::Named(
                names
                    .iter()
                    .map(|n| self.models.get(&n.to_ascii_lowercase()).copied().unwrap_or(UNKNOWN))
                    .collect(),
            ),
            ModelFilter::MinTier(tier) => Models::MinTier(*tier),
        };
        let id = |names: &HashMap<&str, u32>, name: &Option<String>| {
            name.as_deref().map(|n| names.get(n).copied().unwrap_or(UNKNOWN))
        };
        Need {
            models,
            min_memory_mib: request.min_memory_mib,
            max_price: request.max_price_per_gpu_hour,
            region: id(&self.regions, &request.region),
            zone: id(&self.zones, &request.zone),
            min_reputation: request.min_reputation,
            gpus_per_worker: request.gpus_per_worker,
            per_worker: request.per_worker,
        }
    }
}

fn intern<K: Eq + std::hash::Hash>(names: &mut HashMap<K, u32>, name: K) -> u32 {
    let next = u32::try_from(names.len()).unwrap_or(UNKNOWN);
    *names.entry(name).or_insert(next)
}

#[derive(Clone, Debug)]
pub(super) enum Models {
    Named(Vec<u32>),
    MinTier(GpuTier),
}

/// A request's constraints, compiled against one index.
#[derive(Clone, Debug)]
pub(super) struct Need {
    models: Models,
    min_memory_mib: u64,
    pub max_price: u64,
    region: Option<u32>,
    zone: Option<u32>,
    min_reputation: u32,
    gpus_per_worker: u32,
    per_worker: WorkerAsk,
}

impl Need {
    /// The constraints the entry fails, as a set of [`Constraint::bit`]s; 0 when it qualifies.
    pub fn failures(&self, e: &Entry) -> u8 {
        let mut failed = 0;
        let mut check = |ok: bool, c: Constraint| {
            if !ok {
                failed |= c.bit();
            }
        };
        check(e.price <= self.max_price, Constraint::Price);
        check(
            match &self.models {
                Models::Named(ids) => ids.contains(&e.model),
                Models::MinTier(tier) => e.tier >= *tier,
            },
            Constraint::Model,
        );
        check(e.memory_mib >= self.min_memory_mib, Constraint::Memory);
        check(self.region.is_none_or(|r| r == e.region), Constraint::Region);
        check(self.zone.is_none_or(|z| z == e.zone), Constraint::Zone);
        check(e.reputation >= self.min_reputation, Constraint::Reputation);
        let share = e.allocatable.map(|a| share(a, self.gpus_per_worker, e.node_gpus));
        check(self.per_worker.cpu_fits(share), Constraint::Cpu);
        check(self.per_worker.memory_fits(share), Constraint::HostMemory);
        failed
    }
}
