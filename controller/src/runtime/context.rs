//! What every reconcile is handed: the client, the caches, the event recorder, the metrics and
//! the settings. One value in an `Arc`, no globals.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpumarket_crds::{GpuCluster, GpuFleet, GpuLease, GpuOffer, GpuTier, LeaseTerms, MarketPolicy};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::{Resource, ResourceExt};

use crate::cluster::lease_view::{self, LastWrite};
use crate::market::binding::CLUSTER_UID_LABEL;
use crate::market::supply::{
    as_cached_now, gang_fleets, gpu_lease, matchable_supply, placed_workers, waiting_requests,
};
use crate::matching::{Offer, Request};
use crate::raycluster::HeadPlacement;
use crate::settlement::{SettlementConfig, Settler};
use crate::verification::{SignatureChecks, signing_times, verdicts};
use gpumarket_crds::policy::POLICY_NAME;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};

use crate::runtime::metrics::Metrics;

/// Field manager of every write, and the reporting controller of Events.
pub const MANAGER: &str = "gpumarket-controller";

/// Settings of the controllers (the flags that shape behaviour, not wiring).
#[derive(Clone, Debug)]
pub struct Settings {
    /// An offer whose agent has not heartbeated for this long is treated as failed.
    pub heartbeat_timeout: Duration,
    /// How long a GPU may stay allocated to a lease that does not exist before the allocation is
    /// reclaimed (covers the moment between claiming GPUs and creating their lease).
    pub orphan_grace: Duration,
    /// A lease whose workers are not all Ready this long after the bind has failed to serve: it
    /// ends (a supplier failure, never billed) and its workers are placed elsewhere.
    pub provisioning_timeout: Duration,
    /// Where Ray heads run.
    pub head_placement: HeadPlacement,
    /// Challenge idle offers to prove their GPUs compute; off when `None`.
    pub proof_of_compute: Option<crate::market::proof::ProofSettings>,
    /// Match only offers signed by their wallet's key; offers with a bad signature are never
    /// matched, unsigned ones are when this is off.
    pub require_signed_offers: bool,
    /// GPU models the market accepts (the MarketPolicy's), each with the tier it is matched
    /// and staked as; every model, at the tier its name gives, when `None`.
    pub accepted_models: Option<std::collections::BTreeMap<String, GpuTier>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_timeout: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(30),
            provisioning_timeout: Duration::from_secs(600),
            head_placement: HeadPlacement::default(),
            proof_of_compute: None,
            require_signed_offers: true,
            accepted_models: None,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub offers: Store<GpuOffer>,
    pub leases: Store<GpuLease>,
    /// Every GpuCluster, for the queue of requests older than the one being matched.
    pub clusters: Store<GpuCluster>,
    /// The pods of every GpuCluster (labelled with it), to meter from their workers being Ready.
    pub pods: Store<Pod>,
    /// The market's MarketPolicy, if there is one: it overrides the flags' settings.
    pub policy: Store<MarketPolicy>,
    /// Every GpuFleet, to meter a fleet's leases from the workloads it reports.
    pub fleets: Store<GpuFleet>,
    /// When each allocation to a missing lease was first seen, by lease name (offer controller).
    pub orphans_seen: Mutex<HashMap<String, Instant>>,
    /// Held while matching and setting the GPUs matched aside (`remember_claims`), so this
    /// replica's reconciles do not pick the same GPUs.
    pub bind_lock: tokio::sync::Mutex<()>,
    /// Settlement, when on: a cluster is provisioned only once its deposit covers it.
    pub settler: Option<Arc<Settler>>,
    /// Offer signatures verified so far (each once per change of its offer).
    pub signatures: SignatureChecks,
    /// The controller's own namespace, where it records the offers' signing times.
    pub namespace: String,
    /// Held while writing signing times, so that they are written in batches.
    signing_time_writes: tokio::sync::Mutex<()>,
    /// When this controller started (its caches filled): what happened before, while no
    /// controller watched, is not known from watching (e.g. when an agent answered).
    pub started: jiff::Timestamp,
    /// The tunnel to Ray heads that run in fleets, when it runs (set after [`Context::new`]).
    pub tunnel: Option<Arc<crate::fleet::tunnel::TunnelHub>>,
    /// GPUs this replica claims, by (offer, uuid), until the offer cache shows the claim.
    recent_claims: Mutex<HashMap<(String, String), Instant>>,
    /// Leases this replica creates, until the lease cache shows them: (cluster uid, workers).
    recent_leases: Mutex<HashMap<String, (String, u32, Instant)>>,
    /// This replica's last write of a lease of each cluster, by cluster uid (see `lease_view`).
    last_lease_writes: Mutex<HashMap<String, LastWrite>>,
    /// The admitted supply last read for a bind, and when.
    admitted: Mutex<Option<(jiff::Timestamp, Arc<Vec<Offer>>)>>,
}

/// The cache shows a claim within this time, or the claim was undone (rolled back, released).
const RECENT_CLAIM_TTL: Duration = Duration::from_secs(30);

/// The caches a Context reads, filled by their own watches.
pub struct Caches {
    pub offers: Store<GpuOffer>,
    pub leases: Store<GpuLease>,
    pub clusters: Store<GpuCluster>,
    pub pods: Store<Pod>,
    pub policy: Store<MarketPolicy>,
    pub fleets: Store<GpuFleet>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: Settings,
        caches: Caches,
        settler: Option<Arc<Settler>>,
        namespace: String,
        signatures: SignatureChecks,
    ) -> Self {
        let Caches { offers, leases, clusters, pods, policy, fleets } = caches;
        let reporter =
            Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            offers,
            leases,
            clusters,
            pods,
            policy,
            fleets,
            orphans_seen: Mutex::new(HashMap::new()),
            bind_lock: tokio::sync::Mutex::new(()),
            settler,
            signatures,
            namespace,
            signing_time_writes: tokio::sync::Mutex::new(()),
            started: jiff::Timestamp::now(),
            tunnel: None,
            recent_claims: Mutex::new(HashMap::new()),
            recent_leases: Mutex::new(HashMap::new()),
            last_lease_writes: Mutex::new(HashMap::new()),
            admitted: Mutex::new(None),
        }
    }

    /// The settings in force: the flags', with what the MarketPolicy sets on top.
    pub fn settings(&self) -> Settings {
        let policy = self.policy.get(&ObjectRef::new(POLICY_NAME));
        crate::policy::effective(&self.settings, policy.as_deref().map(|p| &p.spec))
    }

    /// The settlement configuration in force (the MarketPolicy over the flags), with
    /// settlement on.
    pub fn settlement(&self) -> Option<SettlementConfig> {
        let policy = self.policy.get(&ObjectRef::new(POLICY_NAME));
        let policy = policy.as_deref().map(|p| &p.spec);
        self.settler.as_ref().map(|s| crate::policy::effective_settlement(s.config(), policy))
    }

    /// The terms a lease bound now gets: the settings and, with settlement on, the settlement
    /// configuration in force.
    pub fn lease_terms(&self) -> LeaseTerms {
        crate::policy::terms::at_binding(&self.settings(), self.settlement().as_ref())
    }

    /// Free supply for matching: the cached offers that verification admits (with settlement
    /// on, only those staked enough), less the GPUs claimed that the cache does not show yet.
    pub fn supply(&self, now: jiff::Timestamp) -> Vec<Offer> {
        self.unclaimed(&self.admitted_supply(now))
    }

    /// [`Context::admitted_supply`] as read at `since` or later (a reconcile's start: what
    /// triggered it is in), one reading shared by every bind that started before it: binds that
    /// waited for the lock together do not each read every offer again.
    pub fn admitted_supply_since(&self, since: jiff::Timestamp) -> Arc<Vec<Offer>> {
        let mut shared = lock(&self.admitted);
        if let Some((at, supply)) = shared.as_ref()
            && *at >= since
        {
            return supply.clone();
        }
        let now = jiff::Timestamp::now();
        let supply = Arc::new(self.admitted_supply(now));
        *shared = Some((now, supply.clone()));
        supply
    }

    /// The cached offers that verification admits (with settlement on, only those staked
    /// enough) as supply: the costly part of [`Context::supply`] (a verdict on every offer).
    pub fn admitted_supply(&self, now: jiff::Timestamp) -> Vec<Offer> {
        let offers = self.offers.state();
        let listed: Vec<&GpuOffer> = offers.iter().map(AsRef::as_ref).collect();
        let settings = self.settings();
        let verdicts =
            verdicts(&listed, &self.signatures, &settings, &|fleet| self.fleet_wallet(fleet));
        let admitted = |o: &GpuOffer| verdicts.get(&o.name_any()).is_some_and(|v| v.admitted);
        self.signatures.retain(|name| verdicts.contains_key(name));
        let stake = self.settlement().map(|s| s.stake);
        matchable_supply(offers.iter().map(AsRef::as_ref), admitted, &settings, stake.as_ref(), now)
    }

    /// `supply` as the offer cache has it now (`as_cached_now`), less the GPUs this replica set
    /// aside that the cache does not show leased yet. Cheap: what a bind does under its lock.
    pub fn unclaimed(&self, supply: &[Offer]) -> Vec<Offer> {
        let cached = |name: &str| self.offers.get(&ObjectRef::new(name));
        let mut recent = lock(&self.recent_claims);
        recent.retain(|(offer, gpu), at| {
            at.elapsed() < RECENT_CLAIM_TTL
                && cached(offer).is_some_and(|o| gpu_lease(&o, gpu).is_none())
        });
        let set_aside = |offer: &str, gpu: &str| recent.contains_key(&(offer.into(), gpu.into()));
        as_cached_now(supply, cached, set_aside)
    }

    /// Records offer `name`'s newest verified signing time if it is not recorded yet: a
    /// replica that restarts still refuses its older signed specs. One write at a time, carrying
    /// every time unrecorded by then: offers verified together (a controller start, a fleet
    /// joining) share a few writes instead of contending for the one ConfigMap.
    pub async fn record_signing_time(&self, name: &str) -> Result<(), kube::Error> {
        if self.signatures.unrecorded(name).is_none() {
            return Ok(());
        }
        let _writing = self.signing_time_writes.lock().await;
        let times = self.signatures.all_unrecorded();
        if times.is_empty() {
            return Ok(()); // written by the write just before
        }
        signing_times::record(&self.client, &self.namespace, &times).await?;
        for (offer, at) in times {
            self.signatures.mark_recorded(&offer, at);
        }
        Ok(())
    }

    /// Drops the recorded signing times of offers gone whose time is older than
    /// [`signing_times::RETENTION`] for a floor, so that the record stays the size of the
    /// supply however many nodes come and go.
    pub async fn prune_signing_times(&self) -> Result<(), kube::Error> {
        let before = jiff::Timestamp::now() - signing_times::RETENTION;
        let exists = |name: &str| self.offers.get(&ObjectRef::new(name)).is_some();
        let pruned = signing_times::prune(&self.client, &self.namespace, exists, before).await?;
        if let Some(pruned) = pruned {
            self.signatures.forget(&pruned);
            tracing::info!(
                offers = pruned.offers.len(),
                floor = %pruned.floor,
                "signing times of offers gone dropped"
            );
        }
        Ok(())
    }

    /// The wallet of GpuFleet `name`, if the hub has it.
    pub fn fleet_wallet(&self, name: &str) -> Option<String> {
        self.fleets.get(&ObjectRef::new(name)).map(|f| f.spec.wallet.clone())
    }

    /// Requests of the clusters looking for GPUs (each for its workers not placed), from the
    /// caches and the leases just created: the queue a match waits its turn in.
    pub fn queue(&self) -> Vec<Request> {
        let cached: Vec<Arc<GpuLease>> = self.leases.state();
        let mut placed = placed_workers(cached.iter().map(AsRef::as_ref));
        let in_cache: HashSet<&str> =
            cached.iter().filter_map(|l| l.metadata.name.as_deref()).collect();
        let mut recent = lock(&self.recent_leases);
        recent.retain(|name, (_, _, at)| {
            at.elapsed() < RECENT_CLAIM_TTL && !in_cache.contains(name.as_str())
        });
        for (uid, workers, _) in recent.values() {
            *placed.entry(uid.as_str()).or_default() += workers;
        }
        let fleets = gang_fleets(cached.iter().map(AsRef::as_ref), |o| self.offer_fleet(o));
        let clusters = self.clusters.state();
        waiting_requests(clusters.iter().map(AsRef::as_ref), &placed, &fleets)
    }

    /// The fleet of offer `name` (`Some(None)`: a node of the hub), if the cache has the offer.
    pub fn offer_fleet(&self, name: &str) -> Option<Option<String>> {
        let offer = self.offers.get(&ObjectRef::new(name))?;
        Some(crate::fleet::offer_fleet(&offer).map(str::to_owned))
    }

    /// The pods labelled with `cluster` in its namespace.
    pub fn pods_of(&self, cluster: &GpuCluster) -> Vec<Arc<Pod>> {
        let (name, namespace) = (cluster.name_any(), cluster.namespace());
        self.pods
            .state()
            .into_iter()
            .filter(|p| p.namespace() == namespace)
            .filter(|p| p.labels().get(crate::raycluster::CLUSTER_LABEL) == Some(&name))
            .collect()
    }

    /// Note the GPUs and workers of leases being bound (see `supply` and `queue`), until the
    /// caches show them.
    pub fn remember_claims(&self, leases: &[GpuLease]) {
        let mut recent = lock(&self.recent_claims);
        for lease in leases {
            for gpu in &lease.spec.gpus {
                recent.insert((lease.spec.offer.clone(), gpu.clone()), Instant::now());
            }
        }
        drop(recent);
        let mut recent = lock(&self.recent_leases);
        for lease in leases {
            let name = lease.metadata.name.clone().unwrap_or_default();
            let entry = (lease.spec.cluster.uid.clone(), lease.spec.workers, Instant::now());
            recent.insert(name, entry);
        }
    }

    /// Note a lease as written by this replica (created, ended, its service recorded), for
    /// [`Context::cached_leases_of`].
    pub fn note_lease_write(&self, lease: &GpuLease) {
        let Some(written) = lease_view::version(lease) else { return };
        let mut writes = lock(&self.last_lease_writes);
        let last = writes.entry(lease.spec.cluster.uid.clone()).or_insert((lease.name_any(), 0));
        if written >= last.1 {
            *last = (lease.name_any(), written);
        }
    }

    /// The cluster's leases from the cache, when the cache shows every write that matters (see
    /// `lease_view`); else `None`, and they are read from the API.
    pub fn cached_leases_of(&self, cluster: &GpuCluster) -> Option<Vec<GpuLease>> {
        let uid = cluster.uid().unwrap_or_default();
        let cached: Vec<GpuLease> = self
            .leases
            .state()
            .iter()
            .filter(|l| l.labels().get(CLUSTER_UID_LABEL) == Some(&uid))
            .map(|l| GpuLease::clone(l))
            .collect();
        let named = cluster.status.as_ref().map(|s| s.leases.as_slice()).unwrap_or_default();
        let created: Vec<String> = lock(&self.recent_leases)
            .iter()
            .filter(|(_, (of, _, at))| *of == uid && at.elapsed() < RECENT_CLAIM_TTL)
            .map(|(name, _)| name.clone())
            .collect();
        let last_write = lock(&self.last_lease_writes).get(&uid).cloned();
        lease_view::cache_is_current(&cached, named, &created, last_write.as_ref())
            .then_some(cached)
    }

    /// Forget what this replica wrote for a cluster that is gone.
    pub fn forget_lease_writes(&self, cluster: &GpuCluster) {
        lock(&self.last_lease_writes).remove(&cluster.uid().unwrap_or_default());
    }

    /// Forget the GPUs and workers of planned leases whose claims failed: free again.
    pub fn forget_claims(&self, leases: &[GpuLease]) {
        let mut recent = lock(&self.recent_claims);
        for lease in leases {
            for gpu in &lease.spec.gpus {
                recent.remove(&(lease.spec.offer.clone(), gpu.clone()));
            }
        }
        drop(recent);
        let mut recent = lock(&self.recent_leases);
        for lease in leases {
            recent.remove(lease.metadata.name.as_deref().unwrap_or_default());
        }
    }

    /// Publish an Event about `object`. Events are best effort: a failure is logged, never
    /// fatal. Awaited, not sent in the background: reconciles that do not wait for their Events
    /// run more often and write more, and the scale bench's burst got slower.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing event");
        }
    }
}

/// The mutex's guard, even if a thread panicked holding it (the data stays usable).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
