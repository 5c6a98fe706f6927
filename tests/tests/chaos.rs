//! The chaos run of issue 13: the whole market (the real controller and agent binaries, the
//! KubeRay operator, KWOK GPU nodes, the Solana test validator) under random `kill -9`s,
//! checked at the end against an independent reading of the chain.
//!
//! - Two controller replicas with leader election and settlement, through a relay to the
//!   validator's RPC port; one rolling upgrade mid-run (a third replica started, an old one
//!   sent SIGTERM); the relay cut for 10 s and restored.
//! - One agent per KWOK GPU node (offer-only, fake GPU source), its node's stake bonded from
//!   the supplier's wallet.
//! - Buyers keep a number of GpuClusters ordered, each funded once its escrow account appears
//!   (some with a burst of tiny deposits on top), delete some mid-run and order new ones, and
//!   write junk settlement annotations on others.
//! - Controllers and agents are killed with SIGKILL at random moments and restarted after a
//!   random delay as new processes (at least 20 kills; 200 with `GPUMARKET_CHAOS_LONG=1`,
//!   which also runs longer with more nodes and clusters).
//! - Every 300 ms a sampler lists the GpuLeases: no GPU may be in two Active leases.
//!
//! Then calm: every process runs, every remaining cluster is Running with its workers serving
//! (or ended), all are deleted and must be gone (refunded, released) with every lease Settled.
//! The chain, read from each escrow's, stake account's and the settlement authority's own
//! history (token balances and memos, nothing the controller recorded), must show per cluster,
//! to the base unit, that the deposits (the test's own ledger of the transfers that landed)
//! equal the payouts plus the refund plus what is left (nothing); every settlement key once;
//! the suppliers' and the buyer's wallets moved by exactly what was paid to them. The figures
//! are printed (`-- --nocapture`).
//!
//! The seed is printed; `GPUMARKET_CHAOS_SEED=<n>` replays the same random choices (timing
//! still differs). The controller and agent binaries must be built (`cargo build --bins`, as
//! `hack/dev.sh test` does before the tests).

#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use gpumarket_controller::settlement::{accounts, memo};
use gpumarket_crds::{ClusterPhase, GpuCluster, GpuLease, GpuOffer, LeasePhase};
use gpumarket_tests::chaos::{ChainReader, ChainTx, Ledger, Rng, alive, fake_source, signal};
use gpumarket_tests::relay::Relay;
use gpumarket_tests::solana::read_keypair;
use gpumarket_tests::{Env, GpuNode, Solana};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signer};

/// Price per GPU-hour of node i: `BASE_PRICE + 100_000 × i` base units.
const BASE_PRICE: u64 = 3_000_000;
/// The buyers' highest price per GPU-hour (above every node's).
const MAX_PRICE: u64 = 4_000_000;
/// Stake each node bonds, and the minimum per GPU the controllers require.
const BOND: u64 = 3_000_000;
const MIN_STAKE_PER_GPU: u64 = 100_000;
/// The controllers' leader election Lease (the default name), in the test's namespace.
const ELECTION_LEASE: &str = "gpumarket-controller";
/// How long a leader holds the election Lease without renewing it: short, so that leaders
/// change often.
const ELECTION_DURATION: &str = "6s";
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(8);
const TINY_DEPOSITS: usize = 20;

/// How big a run is: the CI-sized one by default, the long one with `GPUMARKET_CHAOS_LONG=1`.
#[derive(Clone, Debug)]
struct Scale {
    long: bool,
    /// GPUs of each KWOK H100 node.
    gpu_nodes: Vec<u32>,
    /// Clusters the buyers keep ordered (not deleted) during the chaos, at most `pair_slots`.
    live_clusters: usize,
    /// Clusters ordered in all, at most.
    max_clusters: usize,
    /// Clusters the buyers delete mid-run (each replaced by a new order).
    deletions: usize,
    /// Durations of the clusters, in minutes (the CRD's minimum is 10).
    minutes: (u64, u64),
    /// The chaos lasts this long, and at least until `min_kills` kills.
    chaos: Duration,
    min_kills: usize,
    upgrades: usize,
    cuts: usize,
    /// How long the calm phase may take to see every cluster gone and every lease Settled.
    settle_timeout: Duration,
}

impl Scale {
    fn from_env() -> Scale {
        if std::env::var("GPUMARKET_CHAOS_LONG").is_ok_and(|v| v == "1") {
            Scale {
                long: true,
                gpu_nodes: vec![4, 4, 2, 4, 3, 4, 4, 4],
                live_clusters: 14,
                max_clusters: 80,
                deletions: 30,
                minutes: (10, 14),
                chaos: Duration::from_secs(18 * 60),
                min_kills: 200,
                upgrades: 3,
                cuts: 4,
                settle_timeout: Duration::from_secs(600),
            }
        } else {
            Scale {
                long: false,
                gpu_nodes: vec![4, 4, 2, 4, 3],
                live_clusters: 8,
                max_clusters: 14,
                deletions: 3,
                minutes: (10, 12),
                chaos: Duration::from_secs(150),
                min_kills: 24,
                upgrades: 1,
                cuts: 1,
                settle_timeout: Duration::from_secs(240),
            }
        }
    }

    /// Two-GPU workers the nodes hold when all are free. A live order takes at most one of them
    /// whatever the placement (a pair takes one, a single GPU breaks at most one), so with no
    /// more live orders than this every order fits however the chaos scattered the others: a
    /// cluster stuck after the calm is then a bug, not fragmentation.
    fn pair_slots(&self) -> usize {
        self.gpu_nodes.iter().map(|gpus| *gpus as usize / 2).sum()
    }

    /// Mean time between kills: the minimum number of kills well within the chaos.
    fn kill_interval(&self) -> Duration {
        self.chaos.div_f64(self.min_kills as f64 * 1.25)
    }
}

/// What the run did, for the figures.
#[derive(Debug, Default)]
struct Figures {
    controller_kills: usize,
    agent_kills: usize,
    leader_kills: usize,
    exits_on_their_own: Vec<String>,
    processes_started: usize,
    upgrades: usize,
    cut_for: Duration,
    junk_annotations: usize,
    junk_refused: usize,
    deleted_mid_run: usize,
    deleted_ended: usize,
    bursts: usize,
}

impl Figures {
    fn kills(&self) -> usize {
        self.controller_kills + self.agent_kills
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Controller,
    Agent,
}

/// A controller replica or an agent: one process at a time, restarted as a new one.
#[derive(Debug)]
struct Slot {
    role: Role,
    /// Controller: the replica's name; agent: its node.
    name: String,
    /// The replica's leader election identity (kept across container restarts, new when the
    /// replica comes back as a new pod).
    identity: String,
    pid: Option<u32>,
    generation: u32,
    /// Name of the current process's log.
    log: String,
    restart_at: Option<Instant>,
    /// Sent SIGTERM by the rolling upgrade: not restarted.
    retiring: bool,
}

/// The processes of the market, started through the environment (logs in its `logs/`).
struct Fleet {
    env: &'static Env,
    ns: String,
    binaries: PathBuf,
    rpc_url: String,
    authority: PathBuf,
    mint: Pubkey,
    nodes: Vec<GpuNode>,
    wallets: Vec<Pubkey>,
    /// The wallets' keypair files, each agent signing its offer with its wallet's.
    wallet_keypairs: Vec<PathBuf>,
    slots: Vec<Slot>,
}

impl Fleet {
    fn add(&mut self, role: Role, name: &str) -> Result<usize> {
        self.slots.push(Slot {
            role,
            name: name.to_owned(),
            identity: name.to_owned(),
            pid: None,
            generation: 0,
            log: String::new(),
            restart_at: None,
            retiring: false,
        });
        let i = self.slots.len() - 1;
        self.start(i)?;
        Ok(i)
    }

    fn start(&mut self, i: usize) -> Result<()> {
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.restart_at = None;
        let log = format!(
            "{}-{}-{}",
            if slot.role == Role::Controller { "controller" } else { "agent" },
            slot.name,
            slot.generation
        );
        let command = match slot.role {
            Role::Controller => {
                let mut controller = Command::new(self.binaries.join("gpumarket-controller"));
                controller
                    .env("KUBECONFIG", self.env.kubeconfig())
                    .env("POD_NAMESPACE", &self.ns)
                    .args(["--metrics-addr", "127.0.0.1:0"])
                    .arg(format!("--leader-election-identity={}", slot.identity))
                    .arg(format!("--leader-election-duration={ELECTION_DURATION}"))
                    .arg(format!("--heartbeat-timeout={}s", HEARTBEAT_TIMEOUT.as_secs()))
                    .args(["--provisioning-timeout", "60s", "--settlement-period", "5s"])
                    .arg(format!("--rpc-url={}", self.rpc_url))
                    .arg(format!("--settlement-keypair={}", self.authority.display()))
                    .arg(format!("--mint={}", self.mint))
                    .args(["--slash-permille", "100", "--unbond-cooldown", "1h"])
                    .arg(format!("--min-stake-per-gpu=H100={MIN_STAKE_PER_GPU}"));
                controller
            }
            Role::Agent => {
                let n = self.nodes.iter().position(|n| n.name == slot.name).context("node")?;
                let node = &self.nodes[n];
                let source = self.env.dir().join(format!("gpus-{}.json", node.name));
                if !source.exists() {
                    std::fs::write(&source, fake_source(node))?;
                }
                let mut agent = Command::new(self.binaries.join("gpumarket-device-plugin"));
                agent
                    .env("KUBECONFIG", self.env.kubeconfig())
                    .args(["--node-name", &node.name, "--mode", "offer-only"])
                    .args(["--heartbeat-interval", "2s"])
                    .arg(format!("--wallet={}", self.wallets[n % self.wallets.len()]))
                    .arg(format!(
                        "--wallet-keypair={}",
                        self.wallet_keypairs[n % self.wallet_keypairs.len()].display()
                    ))
                    .arg(format!("--price=H100={}", price_of(n)))
                    .arg(format!("--source=fake:{}", source.display()));
                agent
            }
        };
        slot.pid = Some(self.env.spawn(&log, command)?);
        slot.log = log;
        Ok(())
    }

    /// Restart what is due; a process that died unasked (a replica that lost its Lease exits)
    /// is counted and restarted a second later.
    fn supervise(&mut self, figures: &mut Figures, wall: Instant) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if let Some(pid) = slot.pid.filter(|pid| !alive(*pid)) {
                slot.pid = None;
                if slot.retiring {
                    continue;
                }
                let log = self.env.dir().join("logs").join(format!("{}.log", slot.log));
                let line = format!(
                    "{} (pid {pid}) exited on its own: {}",
                    slot.log,
                    gpumarket_tests::process::log_tail(&log, 3).replace('\n', " | ")
                );
                println!("[{:>6.1} s] {line}", elapsed(wall));
                figures.exits_on_their_own.push(line);
                slot.restart_at = Some(now + Duration::from_secs(1));
            }
            if self.slots[i].restart_at.is_some_and(|t| t <= now) {
                self.start(i)?;
                figures.processes_started += 1;
            }
        }
        Ok(())
    }

    /// Slots with a running process (and not retiring) of `role`.
    fn running(&self, role: Role) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|i| {
                let s = &self.slots[*i];
                s.role == role && !s.retiring && s.pid.is_some_and(alive)
            })
            .collect()
    }
}

fn price_of(node: usize) -> u64 {
    BASE_PRICE + 100_000 * node as u64
}

/// Each condition as `Type=Status (reason: message)`.
fn describe_conditions(conditions: &[Condition]) -> String {
    let shown: Vec<String> = conditions
        .iter()
        .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
        .collect();
    shown.join("; ")
}

/// What the market could see of an offer: its conditions, heartbeat, stake, and each GPU's
/// health and lease (with the lease's phase), for a stuck cluster's report.
fn describe_offer(offer: &GpuOffer, leases: &[GpuLease]) -> String {
    let status = offer.status.clone().unwrap_or_default();
    let gpus: Vec<String> = offer
        .spec
        .gpus
        .iter()
        .map(|gpu| {
            let state = status.gpus.iter().find(|g| g.uuid == gpu.uuid);
            let health = state.and_then(|s| s.health).map_or("-".to_owned(), |h| format!("{h:?}"));
            let lease = state.and_then(|s| s.lease.as_deref()).map_or("free".to_owned(), |name| {
                let phase = leases
                    .iter()
                    .find(|l| l.name_any() == name)
                    .map(|l| l.status.as_ref().and_then(|s| s.phase));
                format!("{name} {phase:?}")
            });
            format!("{} {health} {lease}", gpu.uuid)
        })
        .collect();
    let heartbeat = status.last_heartbeat.as_ref().map(|t| t.0.to_string());
    format!(
        "{}: {} ; heartbeat {heartbeat:?}, stake {} ; {}",
        offer.name_any(),
        describe_conditions(&status.conditions),
        offer.bonded_stake(),
        gpus.join("; ")
    )
}

/// What the sampler saw.
#[derive(Debug, Default)]
struct Sampled {
    samples: usize,
    max_active: usize,
    /// GPUs found in two Active leases at once, with the sample.
    violations: Vec<String>,
    leader: Option<String>,
    leader_changes: usize,
    lease_transitions: Option<i32>,
}

/// List the GpuLeases every 300 ms until `stop`: no GPU (offer, uuid) in two Active leases at
/// once. Also follows who holds the election Lease.
async fn sample(client: Client, ns: String, state: Arc<Mutex<Sampled>>, stop: Arc<AtomicBool>) {
    let leases: Api<GpuLease> = Api::all(client.clone());
    let election: Api<Lease> = Api::namespaced(client, &ns);
    while !stop.load(Ordering::SeqCst) {
        if let Ok(list) = leases.list(&ListParams::default()).await {
            let mut seen: HashMap<(String, String), String> = HashMap::new();
            let mut violations = Vec::new();
            let mut active = 0;
            for lease in list.items.iter().filter(|l| l.spec.cluster.namespace == ns) {
                if lease.status.as_ref().and_then(|s| s.phase) != Some(LeasePhase::Active) {
                    continue;
                }
                active += 1;
                for gpu in &lease.spec.gpus {
                    let key = (lease.spec.offer.clone(), gpu.clone());
                    if let Some(other) = seen.insert(key, lease.name_any()) {
                        violations.push(format!(
                            "GPU {gpu} of {} in Active leases {other} and {}",
                            lease.spec.offer,
                            lease.name_any()
                        ));
                    }
                }
            }
            let mut sampled = lock(&state);
            sampled.samples += 1;
            sampled.max_active = sampled.max_active.max(active);
            sampled.violations.extend(violations);
        }
        if let Ok(Some(lease)) = election.get_opt(ELECTION_LEASE).await {
            let spec = lease.spec.unwrap_or_default();
            let mut sampled = lock(&state);
            if let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) {
                if sampled.leader.as_ref().is_some_and(|l| *l != holder) {
                    sampled.leader_changes += 1;
                }
                sampled.leader = Some(holder);
            }
            sampled.lease_transitions = spec.lease_transitions;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One GpuCluster a buyer ordered.
#[derive(Debug)]
struct Order {
    name: String,
    uid: String,
    deleted: bool,
    funding: Option<tokio::task::JoinHandle<Funding>>,
}

/// What became of an order's funding.
#[derive(Debug, Default, Clone)]
struct Funding {
    escrow: Option<Pubkey>,
    funded: bool,
    tiny_sent: usize,
    note: Option<String>,
}

/// The buyers: they order clusters and fund them, delete and annotate them.
struct Buyers {
    api: Api<GpuCluster>,
    ns: String,
    sol: Solana,
    buyer: Arc<Keypair>,
    ledger: Arc<Ledger>,
    orders: Vec<Order>,
}

impl Buyers {
    async fn order(&mut self, rng: &mut Rng, scale: &Scale, started: Instant) -> Result<()> {
        let name = format!("c-{}", self.orders.len());
        let gpus: u32 = if rng.chance(0.35) { 2 } else { 1 };
        let minutes = rng.between(scale.minutes.0, scale.minutes.1);
        let cluster: GpuCluster = serde_json::from_value(json!({
            "apiVersion": "gpumarket.io/v1alpha1",
            "kind": "GpuCluster",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "gpu": {"models": ["H100"]},
                "workers": 1,
                "gpusPerWorker": gpus,
                "duration": format!("{minutes}m"),
                "maxPricePerGpuHour": MAX_PRICE,
                "payment": {"buyerWallet": self.buyer.pubkey().to_string()},
            }
        }))?;
        let created = self.api.create(&PostParams::default(), &cluster).await?;
        let uid = created.uid().context("uid")?;
        // Enough at the highest price for the whole duration, and a little more.
        let deposit = MAX_PRICE * u64::from(gpus) * minutes / 60 + rng.between(0, 50_000);
        let tiny: Vec<(u64, Option<String>)> = if rng.chance(0.4) {
            (0..TINY_DEPOSITS)
                .map(|i| {
                    if i % 2 == 0 {
                        (rng.between(1, 9), Some(format!("tip {i} for {name}")))
                    } else {
                        // No memo: distinct amounts keep the transactions distinct.
                        (1 + i as u64 / 2, None)
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        println!(
            "[{:>6.1} s] order {name}: {gpus} GPU(s) for {minutes}m, deposit {deposit}{}",
            started.elapsed().as_secs_f64(),
            if tiny.is_empty() { String::new() } else { format!(" + {} tiny", tiny.len()) }
        );
        let funding = tokio::spawn(fund(
            self.api.clone(),
            name.clone(),
            self.sol.clone(),
            self.buyer.clone(),
            self.ledger.clone(),
            deposit,
            tiny,
        ));
        self.orders.push(Order { name, uid, deleted: false, funding: Some(funding) });
        Ok(())
    }

    fn live(&self) -> Vec<usize> {
        (0..self.orders.len()).filter(|i| !self.orders[*i].deleted).collect()
    }

    async fn delete(&mut self, i: usize) -> Result<()> {
        self.orders[i].deleted = true;
        match self.api.delete(&self.orders[i].name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Delete the orders whose cluster has ended (Completed, Failed), as a buyer cleans up; how
    /// many.
    async fn delete_ended(&mut self) -> Result<usize> {
        let listed = self.api.list(&ListParams::default()).await?.items;
        let ended: Vec<String> = listed
            .iter()
            .filter(|c| {
                let phase = c.status.as_ref().and_then(|s| s.phase);
                matches!(phase, Some(ClusterPhase::Completed | ClusterPhase::Failed))
            })
            .map(ResourceExt::name_any)
            .collect();
        let mut deleted = 0;
        for i in self.live() {
            if ended.contains(&self.orders[i].name) {
                self.delete(i).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Junk of the kind that fooled the old design (settlement state in annotations), written,
    /// rewritten or removed. `Ok(false)` when the API server refused it.
    async fn annotate(&self, i: usize, rng: &mut Rng) -> Result<bool> {
        let annotations = match rng.below(4) {
            0 => json!({"gpumarket.io/refund": "{\"state\":\"Expired\"}"}),
            1 => json!({"gpumarket.io/refund": "{\"state\":\"Confirmed\",\"amount\":0}",
                        "gpumarket.io/deposit": "999999999999"}),
            2 => json!({"gpumarket.io/refund": null, "gpumarket.io/settled": "[]"}),
            _ => {
                json!({"gpumarket.io/refund": "{\"state\":\"Signed\",\"signature\":\"1111111111111111111111111111111111111111111111111111111111111111\"}"})
            }
        };
        let patch = json!({"metadata": {"annotations": annotations}});
        let name = &self.orders[i].name;
        match self.api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A burst of tiny deposits into the escrow of live order `i` (if it has one).
    async fn burst(&self, i: usize, rng: &mut Rng) -> Result<bool> {
        let name = self.orders[i].name.clone();
        let Some(cluster) = self.api.get_opt(&name).await? else { return Ok(false) };
        if cluster.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }
        let Some(escrow) =
            cluster.status.and_then(|s| s.escrow).and_then(|e| e.account.parse().ok())
        else {
            return Ok(false);
        };
        let amounts: Vec<(u64, Option<String>)> = (0..TINY_DEPOSITS)
            .map(|j| (rng.between(1, 5), Some(format!("burst {j} for {name} {}", rng.next_u64()))))
            .collect();
        let (sol, buyer, ledger) = (self.sol.clone(), self.buyer.clone(), self.ledger.clone());
        tokio::spawn(async move {
            tiny_deposits(&sol, &buyer, &ledger, &escrow, &name, amounts).await;
        });
        Ok(true)
    }
}

/// Fund an order once its escrow account appears: the main deposit, then the tiny ones.
async fn fund(
    api: Api<GpuCluster>,
    name: String,
    sol: Solana,
    buyer: Arc<Keypair>,
    ledger: Arc<Ledger>,
    deposit: u64,
    tiny: Vec<(u64, Option<String>)>,
) -> Funding {
    let mut funding = Funding::default();
    let deadline = Instant::now() + Duration::from_secs(180);
    let escrow = loop {
        match api.get_opt(&name).await {
            Ok(None) => {
                funding.note = Some("deleted before its escrow opened".into());
                return funding;
            }
            Ok(Some(cluster)) => {
                if let Some(escrow) = cluster.status.and_then(|s| s.escrow) {
                    match escrow.account.parse::<Pubkey>() {
                        Ok(account) => break account,
                        Err(e) => {
                            funding.note = Some(format!("escrow {:?}: {e}", escrow.account));
                            return funding;
                        }
                    }
                }
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            funding.note = Some("no escrow account after 180 s".into());
            return funding;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    funding.escrow = Some(escrow);
    let rpc = sol.rpc();
    for attempt in 0..3 {
        let memo = format!("deposit for {name} ({attempt})");
        match ledger.transfer(&rpc, &sol.mint, &buyer, &escrow, deposit, Some(&memo), &name).await {
            Ok(_) => {
                funding.funded = true;
                break;
            }
            Err(e) => {
                funding.note = Some(format!("{e:#}"));
                // Gone (deleted and refunded) or refused: the ledger keeps what landed anyway.
                if api.get_opt(&name).await.ok().flatten().is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    if funding.funded && !tiny.is_empty() {
        funding.tiny_sent = tiny_deposits(&sol, &buyer, &ledger, &escrow, &name, tiny).await;
    }
    funding
}

/// Send tiny deposits, four at a time; how many were confirmed.
async fn tiny_deposits(
    sol: &Solana,
    buyer: &Keypair,
    ledger: &Ledger,
    escrow: &Pubkey,
    name: &str,
    amounts: Vec<(u64, Option<String>)>,
) -> usize {
    let rpc = sol.rpc();
    futures::stream::iter(amounts)
        .map(|(amount, memo)| {
            let rpc = &rpc;
            async move {
                ledger.transfer(rpc, &sol.mint, buyer, escrow, amount, memo.as_deref(), name).await
            }
        })
        .buffer_unordered(4)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await
}

fn elapsed(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

/// Where the workspace's binaries are: the test runs from `<target>/<profile>/deps/`.
fn binaries() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile = exe.parent().and_then(Path::parent).context("the test's directory")?;
    for binary in ["gpumarket-controller", "gpumarket-device-plugin"] {
        if !profile.join(binary).is_file() {
            bail!(
                "{} is missing: build the binaries first (cargo build --bins, as hack/dev.sh test does)",
                profile.join(binary).display()
            );
        }
    }
    Ok(profile.to_path_buf())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_money_balances_on_chain_and_no_gpu_is_leased_twice() -> Result<()> {
    let wall = Instant::now();
    let scale = Scale::from_env();
    ensure!(
        scale.live_clusters <= scale.pair_slots(),
        "{} live clusters may not all fit in {} two-GPU slots",
        scale.live_clusters,
        scale.pair_slots()
    );
    let seed = std::env::var("GPUMARKET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(Rng::seed_from_time);
    let mut rng = Rng::new(seed);
    println!(
        "chaos run ({}), seed {seed} (GPUMARKET_CHAOS_SEED={seed} replays its choices)",
        if scale.long { "long" } else { "CI-sized" }
    );
    let binaries = binaries()?;

    let env = Env::shared().await;
    let client = env.client().await?;
    let ns = env.namespace("chaos").await?;
    let sol = env.solana().await?.clone();
    let rpc = sol.rpc();
    let buyer = Arc::new(read_keypair(&sol.buyer)?);
    let suppliers: Vec<Keypair> =
        sol.suppliers.iter().map(|p| read_keypair(p)).collect::<Result<_>>()?;
    let wallets: Vec<Pubkey> = suppliers.iter().map(Signer::pubkey).collect();
    let ledger = Arc::new(Ledger::default());

    // Nodes: H100s for the suppliers, one plain node for the Ray heads.
    let nodes: Vec<GpuNode> = scale
        .gpu_nodes
        .iter()
        .enumerate()
        .map(|(i, gpus)| GpuNode::new(&format!("chaos-h100-{i}"), "H100", *gpus))
        .collect();
    let mut all_nodes = nodes.clone();
    all_nodes.push(GpuNode::new("chaos-cpu", "none", 0));
    env.add_gpu_nodes(&all_nodes).await?;
    let mut operator = env.tools().command("kuberay-operator")?;
    operator
        .arg(format!("-kubeconfig={}", env.kubeconfig().display()))
        .arg(format!("-watch-namespace={ns}"))
        .args(["-enable-leader-election=false", "-metrics-addr=0", "-health-probe-bind-address=0"]);
    env.spawn("kuberay-operator", operator)?;

    let authority_path = env.dir().join("chaos-settlement-keypair.json");
    let authority = sol.settlement_authority(&authority_path).await?;
    let validator: std::net::SocketAddr = sol.rpc_url.trim_start_matches("http://").parse()?;
    let relay = Relay::start(validator).await?;

    // Balances before anything moves, for the wallets' own check at the end.
    let buyer_before = sol.balance(&buyer.pubkey()).await?;
    let mut suppliers_before = BTreeMap::new();
    for wallet in &wallets {
        suppliers_before.insert(*wallet, sol.balance(wallet).await?);
    }
    // The suppliers' wallets hold no tokens: the buyer funds their bonds.
    for (w, wallet) in wallets.iter().enumerate() {
        let bonds = (0..nodes.len()).filter(|n| n % wallets.len() == w).count() as u64;
        if bonds > 0 {
            let account = sol.token_account(wallet);
            ledger
                .transfer(
                    &rpc,
                    &sol.mint,
                    &buyer,
                    &account,
                    bonds * BOND,
                    None,
                    &format!("fund:{wallet}"),
                )
                .await?;
        }
    }

    let mut fleet = Fleet {
        env,
        ns: ns.clone(),
        binaries,
        rpc_url: format!("http://{}", relay.addr),
        authority: authority_path,
        mint: sol.mint,
        nodes: nodes.clone(),
        wallets: wallets.clone(),
        wallet_keypairs: sol.suppliers.clone(),
        slots: Vec::new(),
    };
    let mut figures = Figures::default();
    for node in &nodes {
        fleet.add(Role::Agent, &node.name)?;
    }
    for replica in ["replica-a", "replica-b"] {
        fleet.add(Role::Controller, replica)?;
    }
    figures.processes_started = fleet.slots.len();

    // Each node's stake account appears in its offer's status; its supplier bonds into it.
    let offers: Api<GpuOffer> = Api::all(client.clone());
    let stake_of = |offer: &GpuOffer| offer.status.as_ref().and_then(|s| s.stake.clone());
    let mut bonded = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while bonded.len() < nodes.len() {
        for (n, node) in nodes.iter().enumerate() {
            if bonded.contains(&n) {
                continue;
            }
            let Some(stake) = offers.get_opt(&node.name).await?.as_ref().and_then(stake_of) else {
                continue;
            };
            let account: Pubkey = stake.account.parse()?;
            assert_eq!(
                Some(account),
                accounts::stake_address(&authority, &node.name),
                "the stake account of {} is the one anyone derives",
                node.name
            );
            let wallet = &suppliers[n % suppliers.len()];
            let label = format!("bond:{}", node.name);
            let memo = format!("bond {}", node.name);
            ledger.transfer(&rpc, &sol.mint, wallet, &account, BOND, Some(&memo), &label).await?;
            bonded.insert(n);
        }
        assert!(
            Instant::now() < deadline,
            "no stake account in the offers of {:?} after 180 s",
            nodes
                .iter()
                .enumerate()
                .filter(|(n, _)| !bonded.contains(n))
                .map(|(_, n)| &n.name)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = offers.list(&ListParams::default()).await?.items;
        let waiting: Vec<String> = nodes
            .iter()
            .filter(|n| !listed.iter().any(|o| o.name_any() == n.name && o.bonded_stake() >= BOND))
            .map(|n| n.name.clone())
            .collect();
        if waiting.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "stake of {waiting:?} not seen bonded after 120 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "[{:>6.1} s] {} nodes up and bonded, 2 controller replicas",
        elapsed(wall),
        nodes.len()
    );

    // The sampler runs from the first order to the very end.
    let sampled = Arc::new(Mutex::new(Sampled::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(client.clone(), ns.clone(), sampled.clone(), stop.clone()));

    let mut buyers = Buyers {
        api: Api::namespaced(client.clone(), &ns),
        ns: ns.clone(),
        sol: sol.clone(),
        buyer: buyer.clone(),
        ledger: ledger.clone(),
        orders: Vec::new(),
    };
    for _ in 0..scale.live_clusters {
        buyers.order(&mut rng, &scale, wall).await?;
    }

    // The chaos.
    let chaos_start = Instant::now();
    let chaos_end = chaos_start + scale.chaos;
    let at = |fraction: f64| chaos_start + scale.chaos.mul_f64(fraction);
    let mean = scale.kill_interval();
    let mut next_kill = chaos_start + rng.duration(mean / 4, mean);
    let mut upgrades: Vec<Instant> =
        (0..scale.upgrades).map(|k| at((k as f64 + 0.4) / scale.upgrades as f64)).collect();
    let mut cuts: Vec<Instant> =
        (0..scale.cuts).map(|k| at((k as f64 + 0.6) / scale.cuts as f64 * 0.95)).collect();
    let mut cut_since: Option<Instant> = None;
    let mut deletions: Vec<Instant> =
        (0..scale.deletions).map(|_| at(0.1 + 0.8 * rng.unit())).collect();
    deletions.sort();
    let mut next_annotation =
        chaos_start + rng.duration(Duration::from_secs(3), Duration::from_secs(10));
    let mut bursts: Vec<Instant> = vec![at(0.3), at(0.75)];
    let mut next_order = chaos_start;
    let mut next_cleanup = chaos_start;
    let mut retiring: Vec<usize> = Vec::new();
    let mut upgrade_replicas = 0;
    loop {
        let now = Instant::now();
        if now >= chaos_end
            && figures.kills() >= scale.min_kills
            && upgrades.is_empty()
            && cuts.is_empty()
            && cut_since.is_none()
        {
            break;
        }
        fleet.supervise(&mut figures, wall)?;
        // A random kill -9 of a controller replica (often the leader) or an agent.
        if now >= next_kill {
            next_kill = now + rng.duration(mean / 3, mean * 5 / 3);
            let controllers = fleet.running(Role::Controller);
            let agents = fleet.running(Role::Agent);
            let leader = lock(&sampled).leader.clone();
            let target = if !controllers.is_empty() && (agents.is_empty() || rng.chance(0.45)) {
                let leading = controllers
                    .iter()
                    .copied()
                    .find(|i| leader.as_deref() == Some(fleet.slots[*i].identity.as_str()));
                match leading {
                    Some(i) if rng.chance(0.6) => {
                        figures.leader_kills += 1;
                        Some(i)
                    }
                    _ => Some(controllers[rng.below(controllers.len())]),
                }
            } else if !agents.is_empty() {
                Some(agents[rng.below(agents.len())])
            } else {
                None
            };
            if let Some(i) = target {
                let pid = fleet.slots[i].pid.context("a running slot has a pid")?;
                signal(pid, "KILL")?;
                let role = fleet.slots[i].role;
                let delay = match role {
                    Role::Controller => {
                        figures.controller_kills += 1;
                        rng.duration(Duration::from_millis(300), Duration::from_secs(5))
                    }
                    Role::Agent => {
                        figures.agent_kills += 1;
                        // Some come back within the heartbeat timeout, some after it.
                        rng.duration(
                            Duration::from_secs(1),
                            HEARTBEAT_TIMEOUT + Duration::from_secs(6),
                        )
                    }
                };
                let slot = &mut fleet.slots[i];
                slot.pid = None;
                slot.restart_at = Some(now + delay);
                if role == Role::Controller && rng.chance(0.5) {
                    // Back as a new pod rather than a restarted container.
                    slot.identity = format!("{}-{}", slot.name, slot.generation + 1);
                }
                println!(
                    "[{:>6.1} s] kill -9 #{} {} (pid {pid}), back in {:.1} s",
                    elapsed(wall),
                    figures.kills(),
                    slot.name,
                    delay.as_secs_f64()
                );
            }
        }
        // A rolling upgrade: a new replica first, then SIGTERM to an old one.
        if upgrades.first().is_some_and(|t| *t <= now) {
            upgrades.remove(0);
            upgrade_replicas += 1;
            let name = format!("replica-u{upgrade_replicas}");
            let new = fleet.add(Role::Controller, &name)?;
            figures.processes_started += 1;
            let old: Vec<usize> = (0..fleet.slots.len())
                .filter(|i| {
                    let s = &fleet.slots[*i];
                    *i != new && s.role == Role::Controller && !s.retiring
                })
                .collect();
            let oldest = old.first().copied().context("an old replica")?;
            retiring.push(oldest);
            fleet.slots[oldest].retiring = true;
            fleet.slots[oldest].restart_at = None;
            if let Some(pid) = fleet.slots[oldest].pid {
                // Its surge partner had a moment to start, as a Deployment's would.
                tokio::time::sleep(Duration::from_secs(2)).await;
                signal(pid, "TERM")?;
            }
            figures.upgrades += 1;
            println!(
                "[{:>6.1} s] rolling upgrade: {name} started, {} sent SIGTERM",
                elapsed(wall),
                fleet.slots[oldest].name
            );
        }
        // The validator, cut off from the controllers for 10 s.
        if cuts.first().is_some_and(|t| *t <= now) && cut_since.is_none() {
            cuts.remove(0);
            relay.cut();
            cut_since = Some(now);
            println!("[{:>6.1} s] validator RPC cut", elapsed(wall));
        }
        if let Some(since) = cut_since.filter(|s| now.duration_since(*s) >= Duration::from_secs(10))
        {
            relay.restore();
            figures.cut_for += now.duration_since(since);
            cut_since = None;
            println!("[{:>6.1} s] validator RPC restored", elapsed(wall));
        }
        // Buyers delete clusters, order new ones, write junk annotations, send tiny deposits.
        if deletions.first().is_some_and(|t| *t <= now) {
            deletions.remove(0);
            let live = buyers.live();
            if !live.is_empty() {
                let i = live[rng.below(live.len())];
                buyers.delete(i).await?;
                figures.deleted_mid_run += 1;
                println!("[{:>6.1} s] buyer deletes {}", elapsed(wall), buyers.orders[i].name);
            }
        }
        if now >= chaos_start
            && now < chaos_end
            && now >= next_order
            && buyers.live().len() < scale.live_clusters
            && buyers.orders.len() < scale.max_clusters
        {
            next_order = now + Duration::from_secs(3);
            buyers.order(&mut rng, &scale, wall).await?;
        }
        if now >= next_annotation {
            next_annotation = now + rng.duration(Duration::from_secs(3), Duration::from_secs(10));
            let live = buyers.live();
            if !live.is_empty() {
                let i = live[rng.below(live.len())];
                if buyers.annotate(i, &mut rng).await? {
                    figures.junk_annotations += 1;
                } else {
                    figures.junk_refused += 1;
                }
            }
        }
        if now >= next_cleanup {
            next_cleanup = now + Duration::from_secs(15);
            figures.deleted_ended += buyers.delete_ended().await?;
        }
        if bursts.first().is_some_and(|t| *t <= now) {
            bursts.remove(0);
            let live = buyers.live();
            if !live.is_empty() && buyers.burst(live[rng.below(live.len())], &mut rng).await? {
                figures.bursts += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let chaos_time = chaos_start.elapsed();
    println!("[{:>6.1} s] chaos over: calm", elapsed(wall));

    // Calm: every process runs again (and is kept running) and a leader holds the Lease.
    for slot in fleet.slots.iter_mut().filter(|s| !s.retiring && !s.pid.is_some_and(alive)) {
        slot.restart_at = Some(Instant::now());
    }
    fleet.supervise(&mut figures, wall)?;
    let mut problems: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let identities: Vec<String> = fleet
            .running(Role::Controller)
            .iter()
            .map(|i| fleet.slots[*i].identity.clone())
            .collect();
        if lock(&sampled).leader.as_ref().is_some_and(|l| identities.contains(l)) {
            break;
        }
        if Instant::now() > deadline {
            problems.push(format!("no running replica ({identities:?}) took the lead within 60 s"));
            break;
        }
        fleet.supervise(&mut figures, wall)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in &retiring {
        if fleet.slots[*i].pid.is_some_and(alive) {
            problems.push(format!("{} did not stop after SIGTERM", fleet.slots[*i].name));
        }
    }

    // Every funded cluster still ordered ends up Running (or ended): none stuck.
    let deadline = Instant::now() + Duration::from_secs(200);
    while buyers.orders.iter().any(|o| o.funding.as_ref().is_some_and(|t| !t.is_finished()))
        && Instant::now() < deadline
    {
        fleet.supervise(&mut figures, wall)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut fundings: HashMap<String, Funding> = HashMap::new();
    for order in &mut buyers.orders {
        if let Some(task) = order.funding.take() {
            let funding = if task.is_finished() {
                task.await.unwrap_or_else(|e| Funding {
                    note: Some(format!("funding task: {e}")),
                    ..Funding::default()
                })
            } else {
                task.abort();
                Funding { note: Some("funding still waiting".into()), ..Funding::default() }
            };
            fundings.insert(order.name.clone(), funding);
        }
    }
    let clusters_api: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    // Running with every worker placed and serving (its Active leases have begun service), or
    // ended.
    let settled_phase = |cluster: &GpuCluster, leases: &[GpuLease]| {
        let Some(status) = &cluster.status else { return false };
        let degraded =
            status.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True");
        let serving = leases
            .iter()
            .filter(|l| l.spec.cluster.uid == cluster.uid().unwrap_or_default())
            .filter(|l| l.status.as_ref().and_then(|s| s.phase) == Some(LeasePhase::Active))
            .all(|l| l.status.as_ref().is_some_and(|s| s.serving_since.is_some()));
        match status.phase {
            Some(ClusterPhase::Running) => !degraded && serving,
            Some(ClusterPhase::Completed | ClusterPhase::Failed) => true,
            _ => false,
        }
    };
    let all_leases: Api<GpuLease> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(if scale.long { 300 } else { 150 });
    let phases: BTreeMap<String, String> = loop {
        let listed = clusters_api.list(&ListParams::default()).await?.items;
        let leases = all_leases.list(&ListParams::default()).await?.items;
        let stuck: Vec<&GpuCluster> = listed
            .iter()
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .filter(|c| fundings.get(&c.name_any()).is_some_and(|f| f.funded))
            .filter(|c| !settled_phase(c, &leases))
            .collect();
        if stuck.is_empty() || Instant::now() > deadline {
            for cluster in stuck {
                let status = cluster.status.clone().unwrap_or_default();
                let conditions = describe_conditions(&status.conditions);
                let waiting: Vec<String> = leases
                    .iter()
                    .filter(|l| l.spec.cluster.uid == cluster.uid().unwrap_or_default())
                    .filter(|l| {
                        l.status.as_ref().is_some_and(|s| {
                            s.phase == Some(LeasePhase::Active) && s.serving_since.is_none()
                        })
                    })
                    .map(|l| format!("{} on {}", l.name_any(), l.spec.offer))
                    .collect();
                problems.push(format!(
                    "{} stuck {:?} after the calm: {}; Active leases not serving: {waiting:?}",
                    cluster.name_any(),
                    status.phase,
                    conditions
                ));
            }
            if problems.iter().any(|p| p.contains("after the calm")) {
                let offers = Api::<GpuOffer>::all(client.clone());
                for offer in offers.list(&ListParams::default()).await?.items {
                    problems.push(format!("  supply then: {}", describe_offer(&offer, &leases)));
                }
            }
            break listed
                .iter()
                .map(|c| {
                    let phase = c.status.as_ref().and_then(|s| s.phase);
                    (c.name_any(), phase.map_or("-".to_owned(), |p| format!("{p:?}")))
                })
                .collect();
        }
        fleet.supervise(&mut figures, wall)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut phase_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for phase in phases.values() {
        *phase_counts.entry(phase.as_str()).or_default() += 1;
    }
    println!("[{:>6.1} s] before the end: {phase_counts:?}", elapsed(wall));

    // The buyers delete every cluster: each must be refunded and released, each lease Settled.
    for i in buyers.live() {
        buyers.delete(i).await?;
    }
    let deadline = Instant::now() + scale.settle_timeout;
    loop {
        let left = clusters_api.list(&ListParams::default()).await?.items;
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for cluster in left {
                let status = cluster.status.clone().unwrap_or_default();
                problems.push(format!(
                    "{} not gone {} s after its deletion: phase {:?}, escrow {:?}, finalizers {:?}",
                    cluster.name_any(),
                    scale.settle_timeout.as_secs(),
                    status.phase,
                    status.escrow,
                    cluster.metadata.finalizers
                ));
            }
            break;
        }
        fleet.supervise(&mut figures, wall)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let leases_api: Api<GpuLease> = Api::all(client.clone());
    let ours = |leases: Vec<GpuLease>| -> Vec<GpuLease> {
        leases.into_iter().filter(|l| l.spec.cluster.namespace == ns).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let leases = loop {
        let leases = ours(leases_api.list(&ListParams::default()).await?.items);
        let open: Vec<&GpuLease> = leases
            .iter()
            .filter(|l| l.status.as_ref().and_then(|s| s.phase) != Some(LeasePhase::Settled))
            .collect();
        if open.is_empty() {
            break leases;
        }
        if Instant::now() > deadline {
            for lease in open {
                let status = lease.status.clone().unwrap_or_default();
                let states: Vec<String> = status
                    .settlements
                    .iter()
                    .map(|r| format!("{} {} {:?}", r.period, r.amount, r.state))
                    .collect();
                problems.push(format!(
                    "lease {} not Settled: phase {:?}, end {:?}, served since {:?}, {} settled, records [{}]",
                    lease.name_any(),
                    status.phase,
                    status.end_reason,
                    status.serving_since.as_ref().map(|t| t.0),
                    status.amount_settled.unwrap_or(0),
                    states.join(", ")
                ));
            }
            break leases;
        }
        fleet.supervise(&mut figures, wall)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    println!("[{:>6.1} s] every cluster gone, {} leases settled", elapsed(wall), leases.len());
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    drop(relay);

    // The chain, read independently.
    let mut chain = ChainReader::new(sol.rpc(), sol.mint);
    let landed = ledger.landed(&rpc).await?;
    let buyer_account = sol.token_account(&buyer.pubkey());
    let supplier_accounts: BTreeMap<Pubkey, Pubkey> =
        wallets.iter().map(|w| (sol.token_account(w), *w)).collect();
    let escrows: BTreeMap<Pubkey, (String, String)> = buyers
        .orders
        .iter()
        .filter_map(|o| {
            Some((accounts::escrow_address(&authority, &o.uid)?, (o.name.clone(), o.uid.clone())))
        })
        .collect();
    let stakes: BTreeMap<Pubkey, String> = nodes
        .iter()
        .filter_map(|n| Some((accounts::stake_address(&authority, &n.name)?, n.name.clone())))
        .collect();

    let mut totals = Totals::default();
    let mut per_cluster = Vec::new();
    for (escrow, (name, uid)) in &escrows {
        let history = chain.history(escrow).await?;
        let mut book = Book::default();
        for tx in history.iter().filter(|tx| !tx.failed) {
            let delta = tx.delta(escrow);
            if delta > 0 {
                book.deposits += delta;
                book.deposit_txs += 1;
                if !landed.iter().any(|t| t.signature.to_string() == tx.signature) {
                    problems.push(format!(
                        "{name}: deposit {} of {delta} is not one the test made",
                        tx.signature
                    ));
                }
            } else if tx.has_memo(memo::REFUND_PREFIX) {
                book.refunds -= delta;
                book.refund_txs += 1;
                if !tx.memos.iter().any(|m| m.trim() == memo::refund_memo(uid)) {
                    problems.push(format!(
                        "{name}: refund {} names another cluster: {:?}",
                        tx.signature, tx.memos
                    ));
                }
            } else if tx.has_memo(memo::PAY_PREFIX) {
                book.payouts -= delta;
                book.payout_txs += usize::from(delta < 0);
            } else if delta < 0 {
                problems.push(format!(
                    "{name}: {} left its escrow in {} without a settlement memo ({:?})",
                    -delta, tx.signature, tx.memos
                ));
            }
        }
        book.left = i128::from(sol.account_balance(escrow).await?.unwrap_or(0));
        book.open = sol.account_balance(escrow).await?.is_some();
        let ledger_deposits: i128 =
            landed.iter().filter(|t| t.to == *escrow).map(|t| i128::from(t.amount)).sum();
        if book.deposits != ledger_deposits {
            problems.push(format!(
                "{name}: {} deposited on chain, {ledger_deposits} by the test's ledger",
                book.deposits
            ));
        }
        if book.deposits != book.payouts + book.refunds + book.left {
            problems.push(format!(
                "{name}: deposits {} ≠ payouts {} + refunds {} + left {} (escrow {escrow})",
                book.deposits, book.payouts, book.refunds, book.left
            ));
        }
        if book.left != 0 {
            problems
                .push(format!("{name}: {} left in its escrow {escrow} after the end", book.left));
        }
        if book.refund_txs > 1 {
            problems.push(format!("{name}: refunded {} times", book.refund_txs));
        }
        if book.deposits > 0 && book.refund_txs == 0 {
            problems.push(format!("{name}: deposited but never refunded"));
        }
        totals.add(&book);
        per_cluster.push((name.clone(), book));
    }

    let mut stake_books = Vec::new();
    for (account, node) in &stakes {
        let history = chain.history(account).await?;
        let mut book = Book::default();
        for tx in history.iter().filter(|tx| !tx.failed) {
            let delta = tx.delta(account);
            if delta > 0 {
                book.deposits += delta;
            } else if delta < 0 && tx.has_memo(memo::PAY_PREFIX) {
                book.payouts -= delta;
                book.payout_txs += 1;
            } else if delta < 0 {
                problems.push(format!(
                    "stake of {node}: {} left in {} without a settlement memo",
                    -delta, tx.signature
                ));
            }
        }
        book.left = i128::from(sol.account_balance(account).await?.unwrap_or(0));
        let bonds: i128 =
            landed.iter().filter(|t| t.to == *account).map(|t| i128::from(t.amount)).sum();
        if book.deposits != bonds {
            problems.push(format!(
                "stake of {node}: {} bonded on chain, {bonds} by the test's ledger",
                book.deposits
            ));
        }
        if book.deposits != book.payouts + book.left {
            problems.push(format!(
                "stake of {node}: bonded {} ≠ slashed {} + left {}",
                book.deposits, book.payouts, book.left
            ));
        }
        stake_books.push((node.clone(), book));
    }

    // Every settlement transaction, from the authority's own history (it signs them all).
    chain.history(&authority).await?;
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let (mut to_suppliers, mut to_buyer, mut from_escrows, mut from_stakes) =
        (0i128, 0i128, 0i128, 0i128);
    let mut paid_to: BTreeMap<Pubkey, i128> = BTreeMap::new();
    let mut settlement_txs = 0;
    let mut failed_txs = 0;
    let read: Vec<ChainTx> = chain.read().cloned().collect();
    for tx in &read {
        if tx.failed {
            failed_txs += 1;
            continue;
        }
        let mut is_settlement = false;
        for key in tx.memos.iter().filter_map(|m| memo::settlement_keys(m)).flatten() {
            keys.entry(key.to_owned()).or_default().push(tx.signature.clone());
            is_settlement = true;
        }
        if !is_settlement {
            continue;
        }
        settlement_txs += 1;
        for (account, delta) in &tx.deltas {
            match (*delta).cmp(&0) {
                std::cmp::Ordering::Less if escrows.contains_key(account) => from_escrows -= delta,
                std::cmp::Ordering::Less if stakes.contains_key(account) => from_stakes -= delta,
                std::cmp::Ordering::Less => problems.push(format!(
                    "settlement transaction {} took {} from {account}, neither an escrow nor a stake account",
                    tx.signature, -delta
                )),
                std::cmp::Ordering::Greater if tx.has_memo(memo::PAY_PREFIX) => {
                    if let Some(wallet) = supplier_accounts.get(account) {
                        to_suppliers += delta;
                        *paid_to.entry(*wallet).or_default() += delta;
                    } else if *account == buyer_account {
                        to_buyer += delta;
                    } else {
                        problems.push(format!("payout {} paid {delta} to {account}, not a wallet of the run", tx.signature));
                    }
                }
                _ => {}
            }
        }
    }
    let twice: Vec<(&String, &Vec<String>)> =
        keys.iter().filter(|(_, sigs)| sigs.len() > 1).collect();
    for (key, signatures) in &twice {
        problems.push(format!(
            "settlement key {key} on chain {} times: {signatures:?}",
            signatures.len()
        ));
    }
    if from_escrows != totals.payouts + totals.refunds {
        problems.push(format!(
            "settlement transactions took {from_escrows} from escrows, the escrows' histories show {} paid + {} refunded",
            totals.payouts, totals.refunds
        ));
    }
    if to_suppliers != totals.payouts {
        problems.push(format!(
            "suppliers received {to_suppliers} in payouts, escrows paid out {}",
            totals.payouts
        ));
    }
    let slashed: i128 = stake_books.iter().map(|(_, b)| b.payouts).sum();
    if to_buyer != slashed || from_stakes != slashed {
        problems.push(format!("slashes: {slashed} left stake accounts ({from_stakes} in settlement transactions), the buyer received {to_buyer} in payouts"));
    }

    // The wallets themselves moved by exactly that.
    let sum_to = |to: &Pubkey| -> i128 {
        landed.iter().filter(|t| t.to == *to).map(|t| i128::from(t.amount)).sum()
    };
    let bonds_from = |wallet: &Pubkey| -> i128 {
        landed
            .iter()
            .filter(|t| t.label.starts_with("bond:"))
            .filter(|t| {
                let node = t.label.trim_start_matches("bond:");
                nodes
                    .iter()
                    .position(|n| n.name == node)
                    .is_some_and(|n| wallets[n % wallets.len()] == *wallet)
            })
            .map(|t| i128::from(t.amount))
            .sum()
    };
    for wallet in &wallets {
        let moved = i128::from(sol.balance(wallet).await?) - i128::from(suppliers_before[wallet]);
        let funded = sum_to(&sol.token_account(wallet));
        let paid = paid_to.get(wallet).copied().unwrap_or(0);
        if moved != funded - bonds_from(wallet) + paid {
            problems.push(format!(
                "supplier {wallet}: balance moved {moved}, expected funding {funded} − bonds {} + payouts {paid}",
                bonds_from(wallet)
            ));
        }
    }
    let buyer_moved = i128::from(sol.balance(&buyer.pubkey()).await?) - i128::from(buyer_before);
    let sent_by_buyer: i128 =
        landed.iter().filter(|t| !t.label.starts_with("bond:")).map(|t| i128::from(t.amount)).sum();
    if buyer_moved != totals.refunds + to_buyer - sent_by_buyer {
        problems.push(format!(
            "buyer: balance moved {buyer_moved}, expected refunds {} + slashes {to_buyer} − sent {sent_by_buyer}",
            totals.refunds
        ));
    }
    let recorded: u64 = leases.iter().filter_map(|l| l.status.as_ref()?.amount_settled).sum();
    let mut end_reasons: BTreeMap<String, usize> = BTreeMap::new();
    for lease in &leases {
        let reason = lease.status.as_ref().and_then(|s| s.end_reason);
        *end_reasons.entry(reason.map_or("-".to_owned(), |r| format!("{r:?}"))).or_default() += 1;
    }

    let sampled = lock(&sampled);
    for violation in sampled.violations.iter().take(20) {
        problems.push(violation.clone());
    }
    let deposits_landed = landed.iter().filter(|t| escrows.contains_key(&t.to)).count();
    println!(
        "\n==== chaos run figures ({}, seed {seed}) ====",
        if scale.long { "long" } else { "CI-sized" }
    );
    println!(
        "{:<10} {:>6} {:>11} {:>11} {:>11} {:>6}  escrow",
        "cluster", "txs", "deposits", "payouts", "refunds", "left"
    );
    for (name, book) in &per_cluster {
        println!(
            "{name:<10} {:>6} {:>11} {:>11} {:>11} {:>6}  {}",
            book.deposit_txs,
            book.deposits,
            book.payouts,
            book.refunds,
            book.left,
            if book.open { "open" } else { "closed" }
        );
    }
    println!(
        "clusters: {} ordered, {} deleted mid-run, {} deleted once ended, phases before the end {phase_counts:?}",
        buyers.orders.len(),
        figures.deleted_mid_run,
        figures.deleted_ended
    );
    println!(
        "kills: {} kill -9 ({} controller, {} of them the leader; {} agent), {} processes started, {} rolling upgrade(s), exits on their own: {}",
        figures.kills(),
        figures.controller_kills,
        figures.leader_kills,
        figures.agent_kills,
        figures.processes_started,
        figures.upgrades,
        figures.exits_on_their_own.len()
    );
    println!(
        "leader: {} changes seen by the sampler, Lease leaseTransitions {:?}; validator cut for {:.1} s",
        sampled.leader_changes,
        sampled.lease_transitions,
        figures.cut_for.as_secs_f64()
    );
    println!(
        "deposits: {} Σ {} in {} transfers (test ledger: {} landed of {} signed), {} mid-run bursts; junk annotations {} ({} refused)",
        totals.deposit_txs,
        totals.deposits,
        deposits_landed,
        landed.len(),
        ledger.signed(),
        figures.bursts,
        figures.junk_annotations,
        figures.junk_refused
    );
    println!(
        "payouts: Σ {} (controller records Σ {recorded}), refunds: Σ {} in {} transactions, escrow left Σ {}; Σ deposits = Σ payouts + Σ refunds + left: {}",
        totals.payouts,
        totals.refunds,
        totals.refund_txs,
        totals.left,
        totals.deposits == totals.payouts + totals.refunds + totals.left
    );
    println!(
        "stake: {} bonded, {} slashed to the buyer in {} payments, {} left",
        stake_books.iter().map(|(_, b)| b.deposits).sum::<i128>(),
        slashed,
        stake_books.iter().map(|(_, b)| b.payout_txs).sum::<usize>(),
        stake_books.iter().map(|(_, b)| b.left).sum::<i128>()
    );
    println!(
        "chain: {} transactions read, {} settlement transactions, {} failed ones; {} settlement keys, {} twice",
        read.len(),
        settlement_txs,
        failed_txs,
        keys.len(),
        twice.len()
    );
    println!(
        "leases: {} in all, ended {end_reasons:?}; {} samples every 300 ms, at most {} Active at once, {} GPU(s) in two Active leases",
        leases.len(),
        sampled.samples,
        sampled.max_active,
        sampled.violations.len()
    );
    println!(
        "time: chaos {:.1} s, wall {:.1} s",
        chaos_time.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    for (name, funding) in fundings.iter().filter(|(_, f)| f.note.is_some()) {
        println!("note: {name}: {}", funding.note.as_deref().unwrap_or_default());
    }
    for line in &figures.exits_on_their_own {
        println!("note: {line}");
    }

    assert!(figures.kills() >= scale.min_kills, "only {} kills", figures.kills());
    assert!(sampled.samples > 0, "the sampler never listed the leases");
    assert!(
        totals.deposits > 0 && totals.payouts > 0,
        "nothing was deposited or paid: the run exercised nothing"
    );
    if !problems.is_empty() {
        bail!(
            "the chaos run found {} problem(s) (environment in {}; keep it with GPUMARKET_KEEP_ENV=1):\n{}",
            problems.len(),
            env.dir().display(),
            problems.join("\n")
        );
    }
    Ok(())
}

/// One account's money, from its own history.
#[derive(Debug, Default)]
struct Book {
    deposits: i128,
    deposit_txs: usize,
    payouts: i128,
    payout_txs: usize,
    refunds: i128,
    refund_txs: usize,
    left: i128,
    open: bool,
}

#[derive(Debug, Default)]
struct Totals {
    deposits: i128,
    deposit_txs: usize,
    payouts: i128,
    refunds: i128,
    refund_txs: usize,
    left: i128,
}

impl Totals {
    fn add(&mut self, book: &Book) {
        self.deposits += book.deposits;
        self.deposit_txs += book.deposit_txs;
        self.payouts += book.payouts;
        self.refunds += book.refunds;
        self.refund_txs += book.refund_txs;
        self.left += book.left;
    }
}
