//! Settlement against the real Solana test validator and a real API server: deposits, payouts
//! per period and at lease end to the base unit, exactly one payment across crashes, a
//! validator outage and an expired blockhash, refunds, slashing of a failed supplier's stake,
//! the reputation table anchored in a memo, and leases ended when the escrow runs dry.
//!
//! Each test has its own settlement authority (so its own escrow account). A settlement round
//! looks at every lease in the API server, so the tests take turns, and each test deletes its
//! leases when it is done.

#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use gpumarket_controller::settlement::{
    self, CrashPoint, DepositStatus, SettlementConfig, Settler, memo,
};
use gpumarket_crds::{
    ClusterRef, EndReason, GpuCluster, GpuClusterSpec, GpuLease, GpuLeaseSpec, GpuOffer,
    GpuSelector, LeasePhase, Payment, SettlementState,
};
use gpumarket_tests::relay::Relay;
use gpumarket_tests::solana::read_keypair;
use gpumarket_tests::{Env, Solana};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::{Keypair, Signer};

/// 1000 base units per GPU-second.
const PRICE_PER_GPU_HOUR: u64 = 3_600_000;
const PERIOD: Duration = Duration::from_secs(4);

/// The tests take turns (see the module comment).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Fixture {
    client: Client,
    ns: String,
    sol: &'static Solana,
    settler: Arc<Settler>,
    config: SettlementConfig,
    _keys: tempfile::TempDir,
}

impl Fixture {
    async fn new(name: &str) -> Result<Fixture> {
        let env = Env::shared().await;
        let client = env.client().await?;
        let ns = env.namespace(name).await?;
        let sol = env.solana().await?;
        let keys = tempfile::tempdir()?;
        let keypair_path = keys.path().join("settlement.json");
        sol.settlement_authority(&keypair_path).await?;
        let mut config =
            SettlementConfig::new(sol.rpc_url.clone(), keypair_path, sol.mint.to_string(), PERIOD);
        config.poll_interval = Duration::from_secs(1);
        let settler = Arc::new(Settler::new(config.clone())?);
        Ok(Fixture { client, ns, sol, settler, config, _keys: keys })
    }

    /// A settler as a restarted controller would have it: same key, nothing in memory.
    fn restarted(&self) -> Result<Arc<Settler>> {
        Ok(Arc::new(Settler::new(self.config.clone())?))
    }

    fn buyer(&self) -> Result<Keypair> {
        read_keypair(&self.sol.buyer)
    }

    fn supplier(&self, i: usize) -> Result<Pubkey> {
        Ok(read_keypair(&self.sol.suppliers[i])?.pubkey())
    }

    async fn balance(&self, wallet: &Pubkey) -> Result<u64> {
        self.sol.balance(wallet).await
    }

    /// A Running GpuCluster of this test (its phase is set by the test, no controller runs).
    async fn cluster(&self, name: &str, deposit: u64) -> Result<GpuCluster> {
        let api: Api<GpuCluster> = Api::namespaced(self.client.clone(), &self.ns);
        let spec = GpuClusterSpec {
            gpu: GpuSelector {
                models: Some(vec!["H100".into()]),
                min_tier: None,
                min_memory_mib: 0,
            },
            workers: 1,
            gpus_per_worker: 1,
            duration: "1h".into(),
            max_price_per_gpu_hour: PRICE_PER_GPU_HOUR,
            location: None,
            min_reputation: 0,
            placement: Default::default(),
            ray: Default::default(),
            payment: Payment { buyer_wallet: self.buyer()?.pubkey().to_string() },
        };
        let created = api.create(&PostParams::default(), &GpuCluster::new(name, spec)).await?;
        self.set_cluster_phase(&created, "Running").await?;
        Ok(api.get(name).await?)
    }

    async fn set_cluster_phase(&self, cluster: &GpuCluster, phase: &str) -> Result<()> {
        let api: Api<GpuCluster> = Api::namespaced(self.client.clone(), &self.ns);
        let patch = json!({"status": {"phase": phase}});
        api.patch_status(&cluster.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Deposit into this test's escrow from the buyer, with the cluster uid as memo.
    async fn deposit(&self, cluster: &GpuCluster, amount: u64) -> Result<()> {
        let escrow = self.settler.escrow().await?;
        let uid = cluster.uid().context("cluster uid")?;
        self.sol.deposit(&self.buyer()?, &escrow.authority, amount, &uid).await?;
        Ok(())
    }

    /// A lease of `gpus` GPUs of the cluster to supplier `supplier`, metered from `start`;
    /// ended at `end` when given.
    async fn lease(
        &self,
        cluster: &GpuCluster,
        name: &str,
        supplier: usize,
        gpus: usize,
        start: Timestamp,
        end: Option<Timestamp>,
    ) -> Result<GpuLease> {
        let api: Api<GpuLease> = Api::all(self.client.clone());
        let lease = GpuLease {
            metadata: ObjectMeta {
                name: Some(format!("{}-{name}", self.ns)),
                labels: Some([("test".to_string(), self.ns.clone())].into()),
                ..ObjectMeta::default()
            },
            spec: GpuLeaseSpec {
                cluster: ClusterRef {
                    namespace: self.ns.clone(),
                    name: cluster.name_any(),
                    uid: cluster.uid().context("cluster uid")?,
                },
                offer: format!("{}-node-{supplier}", self.ns),
                supplier_wallet: self.supplier(supplier)?.to_string(),
                gpus: (0..gpus).map(|i| format!("GPU-{name}-{i}")).collect(),
                workers: 1,
                price_per_gpu_hour: PRICE_PER_GPU_HOUR,
                start_time: Time(start),
            },
            status: None,
        };
        let created = api.create(&PostParams::default(), &lease).await?;
        let status = match end {
            None => json!({"status": {"phase": "Active"}}),
            Some(end) => {
                json!({"status": {"phase": "Ended", "endTime": end, "endReason": "Expired"}})
            }
        };
        Ok(api
            .patch_status(&created.name_any(), &PatchParams::default(), &Patch::Merge(&status))
            .await?)
    }

    async fn end_lease(&self, lease: &GpuLease, end: Timestamp) -> Result<()> {
        let api: Api<GpuLease> = Api::all(self.client.clone());
        let patch =
            json!({"status": {"phase": "Ended", "endTime": end, "endReason": EndReason::Expired}});
        api.patch_status(&lease.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    async fn leases(&self) -> Result<Vec<GpuLease>> {
        let api: Api<GpuLease> = Api::all(self.client.clone());
        Ok(api.list(&ListParams::default().labels(&format!("test={}", self.ns))).await?.items)
    }

    async fn get_cluster(&self, name: &str) -> Result<GpuCluster> {
        Ok(Api::<GpuCluster>::namespaced(self.client.clone(), &self.ns).get(name).await?)
    }

    /// Run rounds of `settler` until `done` holds for this test's leases.
    async fn settle_until(
        &self,
        settler: &Settler,
        what: &str,
        done: impl Fn(&[GpuLease]) -> bool,
    ) -> Result<Vec<GpuLease>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            settler.settle_round(&self.client).await?;
            let leases = self.leases().await?;
            if done(&leases) {
                return Ok(leases);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out waiting until {what}: {:#?}",
                    leases.iter().map(|l| &l.status).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Run rounds of `settler` until cluster `name` has its refund recorded.
    async fn settle_until_refunded(
        &self,
        settler: &Settler,
        name: &str,
    ) -> Result<gpumarket_crds::GpuClusterStatus> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            settler.settle_round(&self.client).await?;
            let status = self.get_cluster(name).await?.status.unwrap_or_default();
            if status.amount_refunded.is_some() {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no refund of {name} recorded after 60 s: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// (reason, note) of the Events in this test's namespace.
    async fn event_notes(&self) -> Result<Vec<(String, String)>> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        let events = api.list(&ListParams::default()).await?.items;
        Ok(events
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect())
    }

    /// Transactions on chain that carry this payout key in their memo.
    async fn payments_with_key(&self, key: &str) -> Result<usize> {
        let escrow = self.settler.escrow().await?.account();
        let config = solana_client::rpc_client::GetConfirmedSignaturesForAddress2Config {
            commitment: Some(solana_commitment_config::CommitmentConfig::confirmed()),
            ..Default::default()
        };
        let history =
            self.sol.rpc().get_signatures_for_address_with_config(&escrow, config).await?;
        Ok(history
            .iter()
            .filter_map(|entry| entry.memo.as_deref())
            .filter(|m| m.split_whitespace().any(|word| word == key))
            .count())
    }

    async fn cleanup(&self) -> Result<()> {
        let api: Api<GpuLease> = Api::all(self.client.clone());
        let params = ListParams::default().labels(&format!("test={}", self.ns));
        api.delete_collection(&DeleteParams::default(), &params).await?;
        Ok(())
    }
}

fn settled(lease: &GpuLease) -> bool {
    lease.status.as_ref().and_then(|s| s.phase) == Some(LeasePhase::Settled)
}

fn paid(lease: &GpuLease) -> u64 {
    lease.status.as_ref().and_then(|s| s.amount_settled).unwrap_or(0)
}

fn seconds_ago(s: i64) -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second() - s).expect("valid time")
}

#[tokio::test]
async fn leases_are_paid_per_period_and_at_their_end_and_the_rest_refunded() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-lifecycle").await?;
    let (s0, s1, buyer) = (fx.supplier(0)?, fx.supplier(1)?, fx.buyer()?.pubkey());
    let deposit = 100_000;
    let cluster = fx.cluster("lifecycle", deposit).await?;
    let uid = cluster.uid().context("uid")?;

    let required = fx.settler.required_deposit(3 * PRICE_PER_GPU_HOUR, Duration::from_secs(30));
    assert_eq!(required, 90_000);
    let short = fx.settler.deposit_status(&uid, required).await?;
    assert_eq!(short, DepositStatus::Short { deposited: 0, missing: 90_000 });
    fx.deposit(&cluster, deposit).await?;
    assert!(fx.settler.deposit_status(&uid, required).await?.is_covered());

    let (before0, before1, buyer_before) =
        (fx.balance(&s0).await?, fx.balance(&s1).await?, fx.balance(&buyer).await?);
    let start = seconds_ago(1);
    let one = fx.lease(&cluster, "one", 0, 1, start, None).await?;
    let two = fx.lease(&cluster, "two", 1, 2, start, None).await?;

    // A period passes: both leases are paid for it, on chain and in their status.
    let leases = fx
        .settle_until(&fx.settler, "the first period is paid", |ls| {
            ls.len() == 2 && ls.iter().all(|l| paid(l) > 0)
        })
        .await?;
    for lease in &leases {
        let first = &lease.status.as_ref().expect("status").settlements[0];
        assert_eq!((first.period.as_str(), first.state), ("0001", SettlementState::Confirmed));
        assert_eq!(
            first.amount,
            lease.spec.gpus.len() as u64 * 4 * 1000,
            "4 s at 1000 per GPU-second"
        );
    }
    assert_eq!(fx.balance(&s0).await? - before0, 4_000);
    assert_eq!(fx.balance(&s1).await? - before1, 8_000);

    // The leases end 10 s after their start; the cluster completes.
    let end = Timestamp::from_second(start.as_second() + 10)?;
    tokio::time::sleep(Duration::from_secs(u64::try_from(
        (end.as_second() - Timestamp::now().as_second()).max(0),
    )?))
    .await;
    fx.end_lease(&one, end).await?;
    fx.end_lease(&two, end).await?;
    fx.set_cluster_phase(&cluster, "Completed").await?;
    let leases =
        fx.settle_until(&fx.settler, "both leases settle", |ls| ls.iter().all(settled)).await?;
    assert_eq!(leases.iter().map(paid).sum::<u64>(), 30_000);
    assert_eq!(fx.balance(&s0).await? - before0, 10_000, "1 GPU × 10 s");
    assert_eq!(fx.balance(&s1).await? - before1, 20_000, "2 GPUs × 10 s");

    // Refund of what was not used.
    let status = fx.settle_until_refunded(&fx.settler, "lifecycle").await?;
    assert_eq!(status.amount_refunded, Some(70_000));
    assert_eq!(status.amount_settled, Some(30_000));
    assert_eq!(fx.balance(&buyer).await?, buyer_before + 70_000);
    assert_eq!(fx.balance(&fx.settler.authority()).await?, 0, "escrow ends empty");
    let told = fx.event_notes().await?;
    assert_eq!(told.iter().filter(|(reason, _)| reason == "Settled").count(), 2, "{told:?}");
    assert!(
        told.iter()
            .any(|(reason, note)| reason == "Refunded" && note.contains("refunded 0.070000")),
        "{told:?}"
    );
    fx.cleanup().await
}

#[tokio::test]
async fn a_crash_at_any_step_still_pays_exactly_once() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-crash").await?;
    let s2 = fx.supplier(2)?;
    let cluster = fx.cluster("crash", 1_000_000).await?;
    fx.deposit(&cluster, 1_000_000).await?;

    for (i, point) in [CrashPoint::AfterSign, CrashPoint::AfterRecord, CrashPoint::AfterSend]
        .into_iter()
        .enumerate()
    {
        let before = fx.balance(&s2).await?;
        // An ended lease of 1 GPU × 7 s: one payment of 7000 is due at once.
        let lease = fx
            .lease(&cluster, &format!("crash-{i}"), 2, 1, seconds_ago(20), Some(seconds_ago(13)))
            .await?;
        let crashing = fx.restarted()?;
        crashing.inject_crash(Some(point));
        let err = crashing.settle_round(&fx.client).await.expect_err("the round crashes");
        assert!(matches!(err, settlement::Error::InjectedCrash(p) if p == point), "{err}");

        let recovered = fx.restarted()?;
        let name = lease.name_any();
        let leases = fx
            .settle_until(&recovered, "the crashed payout settles", |ls| {
                ls.iter().any(|l| l.name_any() == name && settled(l))
            })
            .await?;
        let lease = leases.iter().find(|l| l.name_any() == name).context("lease")?;
        assert_eq!(paid(lease), 7_000, "{point:?}");
        assert_eq!(fx.balance(&s2).await? - before, 7_000, "{point:?}: paid once on chain");
        let records = &lease.status.as_ref().context("status")?.settlements;
        assert_eq!(records.len(), 1, "{point:?}: one payout record: {records:?}");
        let key = memo::payout_key(&lease.uid().context("uid")?, &records[0].period);
        assert_eq!(fx.payments_with_key(&key).await?, 1, "{point:?}: one transaction with the key");
    }
    fx.cleanup().await
}

#[tokio::test]
async fn leases_end_out_of_funds_when_the_escrow_runs_dry() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-dry").await?;
    let s0 = fx.supplier(0)?;
    // Enough for about 8 GPU-seconds.
    let cluster = fx.cluster("dry", 8_000).await?;
    fx.deposit(&cluster, 8_000).await?;
    let before = fx.balance(&s0).await?;
    fx.lease(&cluster, "dry", 0, 1, seconds_ago(0), None).await?;

    let leases = fx
        .settle_until(&fx.settler, "the lease ends and settles", |ls| ls.iter().all(settled))
        .await?;
    let status = leases[0].status.as_ref().context("status")?;
    assert_eq!(status.end_reason, Some(EndReason::OutOfFunds));
    let metered = status.served_gpu_seconds.context("metered")?;
    assert_eq!(paid(&leases[0]), metered * 1000, "everything metered is paid");
    assert!(paid(&leases[0]) <= 8_000, "never more than the deposit");
    assert_eq!(fx.balance(&s0).await? - before, paid(&leases[0]));
    fx.cleanup().await
}

#[tokio::test]
async fn a_supplier_failure_slashes_its_stake_to_the_buyer_and_the_rest_is_refunded() -> Result<()>
{
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-slash").await?;
    let mut config = fx.config.clone();
    config.stake.slash_permille = 250;
    let settler = Settler::new(config)?;
    let (buyer, s0) = (fx.buyer()?.pubkey(), fx.supplier(0)?);
    let escrow = fx.settler.escrow().await?.authority;
    let node = format!("{}-node-0", fx.ns);
    fx.sol
        .deposit(&fx.buyer()?, &escrow, 100_000, &format!("{}{node}", memo::STAKE_PREFIX))
        .await?;
    let cluster = fx.cluster("slash", 1_000_000).await?;
    fx.deposit(&cluster, 1_000_000).await?;
    let (buyer_before, supplier_before) = (fx.balance(&buyer).await?, fx.balance(&s0).await?);

    // 1 GPU for 9 s, then the node fails.
    let lease = fx.lease(&cluster, "slash", 0, 1, seconds_ago(9), None).await?;
    let failed = json!({"status": {"phase": "Ended", "endTime": Timestamp::now(), "endReason": "SupplierFailure"}});
    Api::<GpuLease>::all(fx.client.clone())
        .patch_status(&lease.name_any(), &PatchParams::default(), &Patch::Merge(&failed))
        .await?;
    let slashed = |l: &GpuLease| {
        l.status.as_ref().is_some_and(|s| {
            s.settlements
                .iter()
                .any(|r| r.period == "slash" && r.state == SettlementState::Confirmed)
        })
    };
    let leases = fx
        .settle_until(&settler, "paid and slashed", |ls| {
            ls.iter().all(|l| settled(l) && slashed(l))
        })
        .await?;
    fx.set_cluster_phase(&cluster, "Completed").await?;
    fx.settle_until_refunded(&settler, "slash").await?;

    let paid = paid(&leases[0]);
    let slash = leases[0]
        .status
        .as_ref()
        .context("status")?
        .settlements
        .iter()
        .find(|r| r.period == "slash")
        .context("slash record")?
        .amount;
    assert_eq!(slash, 25_000, "a quarter of the 100000 staked");
    assert_eq!(fx.balance(&s0).await? - supplier_before, paid, "the supplier is paid its time");
    assert_eq!(
        fx.balance(&buyer).await? - buyer_before,
        slash + 1_000_000 - paid,
        "the buyer gets the slash and the unused deposit"
    );
    assert_eq!(fx.balance(&escrow).await?, 100_000 - slash, "the escrow keeps the stake left");
    let told = fx.event_notes().await?;
    assert!(
        told.iter().any(|(reason, note)| reason == "Slashed" && note.contains("0.025000")),
        "{told:?}"
    );
    fx.cleanup().await
}

#[tokio::test]
async fn the_reputation_table_is_written_to_offers_and_anchored_on_chain() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-reputation").await?;
    let offers: Api<GpuOffer> = Api::all(fx.client.clone());
    let name = format!("{}-rep", fx.ns);
    let offer: GpuOffer = serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuOffer",
        "metadata": {"name": name},
        "spec": {"nodeName": name, "wallet": fx.supplier(2)?.to_string(), "pricePerGpuHour": 1,
                 "region": "rep", "gpus": [{"uuid": "GPU-rep-0", "model": "H100", "memoryMib": 81920}]},
    }))?;
    offers.create(&PostParams::default(), &offer).await?;
    let beat = json!({"status": {"lastHeartbeat": Timestamp::now()}});
    offers.patch_status(&name, &PatchParams::default(), &Patch::Merge(&beat)).await?;

    fx.settler.settle_round(&fx.client).await?;
    let listed = offers.list(&ListParams::default()).await?.items;
    let ours = listed.iter().find(|o| o.name_any() == name).context("offer")?;
    let reputation = ours.status.as_ref().and_then(|s| s.reputation.clone()).context("written")?;
    assert_eq!(reputation.uptime_permille, 1000, "heartbeating: {reputation:?}");
    let table: Vec<(String, gpumarket_crds::Reputation)> = listed
        .iter()
        .filter_map(|o| Some((o.name_any(), o.status.as_ref()?.reputation.clone()?)))
        .collect();
    let hash = settlement::reputation::table_hash(table.iter().map(|(n, r)| (n.as_str(), r)));
    let anchored = format!("gpumarket reputation {hash}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let history = fx.sol.rpc().get_signatures_for_address(&fx.settler.authority()).await?;
        if history.iter().filter_map(|e| e.memo.as_deref()).any(|m| m.contains(&anchored)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no memo {anchored:?} on chain");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    offers.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_validator_is_caught_up_with_without_duplicates() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-outage").await?;
    let validator: std::net::SocketAddr = fx.sol.rpc_url.trim_start_matches("http://").parse()?;
    let relay = Relay::start(validator).await?;
    let mut config = fx.config.clone();
    config.rpc_url = format!("http://{}", relay.addr);
    let settler = Settler::new(config)?;
    let s0 = fx.supplier(0)?;
    let cluster = fx.cluster("outage", 1_000_000).await?;
    fx.deposit(&cluster, 1_000_000).await?;
    let before = fx.balance(&s0).await?;
    let start = seconds_ago(10);
    let lease = fx.lease(&cluster, "outage", 0, 1, start, None).await?;
    // The periods due so far are recorded and sent; the outage may leave them in flight.
    settler.settle_round(&fx.client).await?;

    relay.cut();
    for _ in 0..3 {
        let err = settler.settle_round(&fx.client).await.expect_err("the validator is away");
        assert!(matches!(err, settlement::Error::Rpc(_)), "{err}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let end = Timestamp::now();
    fx.end_lease(&lease, end).await?;
    relay.restore();

    let leases = fx
        .settle_until(&settler, "the lease settles after the outage", |ls| ls.iter().all(settled))
        .await?;
    let expected = (end.as_second() - start.as_second()) as u64 * 1000;
    assert_eq!(paid(&leases[0]), expected, "every GPU-second paid");
    assert_eq!(fx.balance(&s0).await? - before, expected, "and paid once on chain");
    let uid = leases[0].uid().context("uid")?;
    let records = &leases[0].status.as_ref().context("status")?.settlements;
    assert!(records.len() >= 2, "periods before and after the outage: {records:?}");
    for record in records {
        let key = memo::payout_key(&uid, &record.period);
        assert_eq!(fx.payments_with_key(&key).await?, 1, "period {}", record.period);
    }
    fx.cleanup().await
}

#[tokio::test]
async fn a_payout_whose_blockhash_expired_unsent_is_re_signed_once() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-expiry").await?;
    let s1 = fx.supplier(1)?;
    let cluster = fx.cluster("expiry", 100_000).await?;
    fx.deposit(&cluster, 100_000).await?;
    let before = fx.balance(&s1).await?;
    // An ended lease of 1 GPU × 7 s: one payment of 7000.
    let lease = fx.lease(&cluster, "expiry", 1, 1, seconds_ago(20), Some(seconds_ago(13))).await?;
    let crashing = fx.restarted()?;
    crashing.inject_crash(Some(CrashPoint::AfterRecord));
    crashing.settle_round(&fx.client).await.expect_err("crashes before sending");
    let recorded = fx.leases().await?[0].status.clone().context("status")?.settlements[0].clone();
    let signature: solana_sdk::signature::Signature =
        recorded.signature.as_deref().context("signature recorded")?.parse()?;
    let last_valid = recorded.last_valid_block_height.context("last valid block height")?;

    // Nobody sends it while its blockhash is valid (the controller is down).
    let rpc = fx.sol.rpc();
    let finalized = solana_commitment_config::CommitmentConfig::finalized();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while rpc.get_block_height_with_commitment(finalized).await? <= last_valid {
        assert!(tokio::time::Instant::now() < deadline, "block height {last_valid} not reached");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let recovered = fx.restarted()?;
    let name = lease.name_any();
    let leases = fx
        .settle_until(&recovered, "the re-signed payout settles", |ls| {
            ls.iter().any(|l| l.name_any() == name && settled(l))
        })
        .await?;
    assert_eq!(paid(&leases[0]), 7_000);
    assert_eq!(fx.balance(&s1).await? - before, 7_000, "paid once on chain");
    let records = &leases[0].status.as_ref().context("status")?.settlements;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_ne!(records[0].signature, recorded.signature, "re-signed with a fresh blockhash");
    assert_eq!(rpc.get_signature_status(&signature).await?, None, "the expired one never landed");
    let key = memo::payout_key(&lease.uid().context("uid")?, &records[0].period);
    assert_eq!(fx.payments_with_key(&key).await?, 1);
    fx.cleanup().await
}

/// Figures for the notes (not a timed test): `cargo test -p gpumarket-tests --test settlement
/// -- --ignored --nocapture bench`. Settles `BENCH_LEASES` (default 10,000) ended leases spread
/// over the three suppliers and prints transactions, payouts per transaction, fee per payout
/// and wall time.
#[tokio::test]
#[ignore = "benchmark: run explicitly"]
async fn bench_settle_many_leases() -> Result<()> {
    let _turn = TURN.lock().await;
    let count: usize =
        std::env::var("BENCH_LEASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let fx = Fixture::new("settle-bench").await?;
    let cluster = fx.cluster("bench", 1).await?;
    let per_lease = 7_000;
    fx.deposit(&cluster, per_lease * count as u64).await?;
    let (start, end) = (seconds_ago(20), seconds_ago(13));
    futures::stream::iter(0..count)
        .map(|i| {
            let (fx, cluster) = (&fx, &cluster);
            async move { fx.lease(cluster, &format!("b{i}"), i % 3, 1, start, Some(end)).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let lamports_before = fx.sol.rpc().get_balance(&fx.settler.authority()).await?;
    let started = std::time::Instant::now();
    let (mut transactions, mut payouts) = (0, 0);
    loop {
        let report = fx.settler.settle_round(&fx.client).await?;
        transactions += report.transactions_sent;
        payouts += report.payouts_sent;
        let leases = fx.leases().await?;
        if leases.iter().all(settled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = started.elapsed();
    let fees = lamports_before - fx.sol.rpc().get_balance(&fx.settler.authority()).await?;
    println!(
        "settled {count} leases: {transactions} transactions, {:.1} payouts per transaction, {:.1} lamports fee per payout, {:.1} s",
        payouts as f64 / transactions.max(1) as f64,
        fees as f64 / payouts.max(1) as f64,
        wall.as_secs_f64()
    );
    fx.cleanup().await
}
