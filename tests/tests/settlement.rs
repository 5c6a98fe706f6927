//! Settlement against the real Solana test validator and a real API server: each cluster's own
//! escrow account and each node's own stake account, payouts per period and at lease end to the
//! base unit, exactly one payment across crashes, two settlers at once, a validator outage, an
//! expired blockhash and a lost record, refunds that close the escrow once and for all, slashing
//! and unbonding of a supplier's own stake, stake sent by others returned, the reputation table
//! anchored in a memo, leases ended when the escrow runs dry, and one unwritable lease that does
//! not stop the others.
//!
//! Each test has its own settlement authority (so its own escrows). A settlement round looks at
//! every lease in the API server, so the tests take turns, and each test deletes its leases when
//! it is done.

#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use gpumarket_controller::LeaderElection;
use gpumarket_controller::runtime::leader::Fence;
use gpumarket_controller::settlement::{
    self, CrashPoint, DepositStatus, SettlementConfig, Settler, accounts, memo,
};
use gpumarket_crds::{
    ClusterRef, EndReason, GpuCluster, GpuClusterSpec, GpuLease, GpuLeaseSpec, GpuOffer,
    GpuSelector, LeasePhase, LeaseTerms, MarketPolicy, Payment, SettlementState,
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

    fn supplier_keypair(&self, i: usize) -> Result<Keypair> {
        read_keypair(&self.sol.suppliers[i])
    }

    fn supplier(&self, i: usize) -> Result<Pubkey> {
        Ok(self.supplier_keypair(i)?.pubkey())
    }

    async fn balance(&self, wallet: &Pubkey) -> Result<u64> {
        self.sol.balance(wallet).await
    }

    fn escrow_of(&self, cluster: &GpuCluster) -> Result<Pubkey> {
        let uid = cluster.uid().context("cluster uid")?;
        accounts::escrow_address(&self.settler.authority(), &uid).context("escrow address")
    }

    /// A Running GpuCluster of this test (its phase is set by the test, no controller runs).
    async fn cluster(&self, name: &str) -> Result<GpuCluster> {
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
            per_worker: None,
            ray: Default::default(),
            payment: Payment { buyer_wallet: self.buyer()?.pubkey().to_string(), mint: None },
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

    /// Deposit from the buyer into the cluster's escrow (opened by the settler, as the
    /// controller's funding check does), with a memo as the buyer's receipt.
    async fn deposit(&self, cluster: &GpuCluster, amount: u64) -> Result<Pubkey> {
        let (escrow, _) = self
            .settler
            .deposit_status(&cluster.uid().context("uid")?, self.settler.mints().market, u64::MAX)
            .await?;
        self.sol.transfer(&self.buyer()?, &escrow, amount, Some("receipt")).await?;
        Ok(escrow)
    }

    /// A lease of `gpus` GPUs of the cluster to supplier `supplier`, bound and serving from
    /// `start`; ended at `end` when given. Bound without terms: the rules in force apply.
    async fn lease(
        &self,
        cluster: &GpuCluster,
        name: &str,
        supplier: usize,
        gpus: usize,
        start: Timestamp,
        end: Option<Timestamp>,
    ) -> Result<GpuLease> {
        self.lease_on(cluster, name, supplier, gpus, (start, end), None).await
    }

    /// [`Fixture::lease`] bound on `terms`, as the controller freezes them at binding.
    async fn lease_on(
        &self,
        cluster: &GpuCluster,
        name: &str,
        supplier: usize,
        gpus: usize,
        (start, end): (Timestamp, Option<Timestamp>),
        terms: Option<LeaseTerms>,
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
                worker_resources: None,
                start_time: Time(start),
                terms,
            },
            status: None,
        };
        let created = api.create(&PostParams::default(), &lease).await?;
        let (start, end) = (Time(start), end.map(Time));
        let status = match end {
            None => json!({"status": {"phase": "Active", "servingSince": start}}),
            Some(end) => json!({"status": {"phase": "Ended", "servingSince": start,
                "endTime": end, "endReason": "Expired"}}),
        };
        Ok(api
            .patch_status(&created.name_any(), &PatchParams::default(), &Patch::Merge(&status))
            .await?)
    }

    /// End the lease at `end` (whole seconds, as Kubernetes times are written).
    async fn end_lease(&self, lease: &GpuLease, end: Timestamp, reason: EndReason) -> Result<()> {
        let api: Api<GpuLease> = Api::all(self.client.clone());
        let end = Time(Timestamp::from_second(end.as_second())?);
        let patch = json!({"status": {"phase": "Ended", "endTime": end, "endReason": reason}});
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

    /// Run rounds of `settler` until cluster `name` has its refund confirmed.
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

    /// Successful transactions in `account`'s history whose memo carries `key`.
    async fn payments_with_key(&self, account: &Pubkey, key: &str) -> Result<usize> {
        let config = solana_client::rpc_client::GetConfirmedSignaturesForAddress2Config {
            commitment: Some(solana_commitment_config::CommitmentConfig::confirmed()),
            ..Default::default()
        };
        let history =
            self.sol.rpc().get_signatures_for_address_with_config(account, config).await?;
        Ok(history
            .iter()
            .filter(|entry| entry.err.is_none())
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
async fn leases_are_paid_from_their_clusters_own_escrow_and_the_rest_refunded_closing_it()
-> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-lifecycle").await?;
    let (s0, s1, buyer) = (fx.supplier(0)?, fx.supplier(1)?, fx.buyer()?.pubkey());
    let deposit = 100_000;
    let cluster = fx.cluster("lifecycle").await?;
    let uid = cluster.uid().context("uid")?;

    let required = fx.settler.required_deposit(3 * PRICE_PER_GPU_HOUR, Duration::from_secs(30));
    assert_eq!(required, 90_000);
    let (escrow, short) =
        fx.settler.deposit_status(&uid, fx.settler.mints().market, required).await?;
    assert_eq!(escrow, fx.escrow_of(&cluster)?, "the address anyone derives from the uid");
    assert_eq!(short, DepositStatus::Short { deposited: 0, missing: 90_000 });
    fx.deposit(&cluster, deposit).await?;
    assert!(
        fx.settler.deposit_status(&uid, fx.settler.mints().market, required).await?.1.is_covered()
    );
    // Another cluster's escrow is another account, empty.
    let other = fx.cluster("other").await?;
    let (other_escrow, other_status) = fx
        .settler
        .deposit_status(&other.uid().context("uid")?, fx.settler.mints().market, 1)
        .await?;
    assert_ne!(other_escrow, escrow);
    assert_eq!(other_status, DepositStatus::Short { deposited: 0, missing: 1 });

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
    let recorded = fx.get_cluster("lifecycle").await?.status.and_then(|s| s.escrow);
    assert_eq!(recorded.map(|e| e.account), Some(escrow.to_string()), "status.escrow shows it");

    // The leases end 10 s after their start; the cluster completes.
    let end = Timestamp::from_second(start.as_second() + 10)?;
    tokio::time::sleep(Duration::from_secs(u64::try_from(
        (end.as_second() - Timestamp::now().as_second()).max(0),
    )?))
    .await;
    fx.end_lease(&one, end, EndReason::Expired).await?;
    fx.end_lease(&two, end, EndReason::Expired).await?;
    fx.set_cluster_phase(&cluster, "Completed").await?;
    let leases =
        fx.settle_until(&fx.settler, "both leases settle", |ls| ls.iter().all(settled)).await?;
    assert_eq!(leases.iter().map(paid).sum::<u64>(), 30_000);
    assert_eq!(fx.balance(&s0).await? - before0, 10_000, "1 GPU × 10 s");
    assert_eq!(fx.balance(&s1).await? - before1, 20_000, "2 GPUs × 10 s");

    // Refund of what was not used: the escrow is emptied and closed.
    let status = fx.settle_until_refunded(&fx.settler, "lifecycle").await?;
    assert_eq!(status.amount_refunded, Some(70_000));
    assert_eq!(status.amount_settled, Some(30_000));
    assert_eq!(fx.balance(&buyer).await?, buyer_before + 70_000);
    assert_eq!(fx.sol.account_balance(&escrow).await?, None, "the escrow is closed");
    let told = fx.event_notes().await?;
    // Told once per lease, in one Event when both settled in the same round.
    let settled_notes: Vec<&String> =
        told.iter().filter(|(reason, _)| reason == "Settled").map(|(_, note)| note).collect();
    for lease in [&one, &two] {
        let named = format!("{} on ", lease.name_any());
        let telling = settled_notes.iter().filter(|n| n.contains(&named)).count();
        assert_eq!(telling, 1, "{} in {told:?}", lease.name_any());
    }
    assert!(
        told.iter()
            .any(|(reason, note)| reason == "Refunded" && note.contains("refunded 0.070000")),
        "{told:?}"
    );
    fx.cleanup().await
}

/// Terms a lease is bound on: this file's settlement period, no deposit margin, and these fee
/// and slash rates (per mille).
fn frozen_terms(market_fee_permille: u32, slash_permille: u32) -> LeaseTerms {
    LeaseTerms {
        heartbeat_timeout_seconds: 60,
        provisioning_timeout_seconds: 600,
        settlement_period_seconds: Some(PERIOD.as_secs()),
        deposit_margin_percent: Some(0),
        market_fee_permille: Some(market_fee_permille),
        slash_permille: Some(slash_permille),
        mint: None,
    }
}

/// Issue 17: a lease is paid on the terms frozen in it at binding (its settlement period and
/// market fee), whatever the MarketPolicy in force says after.
#[tokio::test]
async fn a_running_lease_is_paid_on_its_frozen_terms_when_the_policy_changes() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-terms").await?;
    let (supplier, market) = (fx.supplier(0)?, fx.settler.authority());
    let cluster = fx.cluster("terms").await?;
    fx.deposit(&cluster, 100_000).await?;
    let terms = frozen_terms(100, 0);
    let (before, market_before) = (fx.balance(&supplier).await?, fx.balance(&market).await?);
    let start = seconds_ago(1);
    let lease = fx.lease_on(&cluster, "frozen", 0, 1, (start, None), Some(terms)).await?;
    fx.settle_until(&fx.settler, "the first period is paid", |ls| ls.iter().all(|l| paid(l) > 0))
        .await?;
    assert_eq!(fx.balance(&supplier).await? - before, 3_600, "4 s at 1000, less 10 %");
    assert_eq!(fx.balance(&market).await? - market_before, 400, "the market's 10 %");

    // The market triples its fee and pays hourly: not this lease, which runs on.
    let policies: Api<MarketPolicy> = Api::all(fx.client.clone());
    let policy = json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "MarketPolicy",
        "metadata": {"name": "default"},
        "spec": {"marketFeePermille": 300, "settlementPeriod": "1h"},
    });
    policies.patch("default", &PatchParams::apply("market-admin"), &Patch::Apply(&policy)).await?;
    let end = Timestamp::from_second(start.as_second() + 10)?;
    let outcome = async {
        fx.settle_until(&fx.settler, "a second period is paid", |ls| {
            ls.iter().all(|l| l.status.as_ref().is_some_and(|s| s.settlements.len() >= 2))
        })
        .await?;
        let left = end.as_second() - Timestamp::now().as_second();
        tokio::time::sleep(Duration::from_secs(u64::try_from(left.max(0))?)).await;
        fx.end_lease(&lease, end, EndReason::Expired).await?;
        fx.settle_until(&fx.settler, "the lease settles", |ls| ls.iter().all(settled)).await
    }
    .await;
    policies.delete("default", &DeleteParams::default()).await?;
    let leases = outcome?;
    assert_eq!(leases.iter().map(paid).sum::<u64>(), 10_000, "10 s at 1000 out of the escrow");
    assert_eq!(fx.balance(&supplier).await? - before, 9_000, "the supplier's 90 % throughout");
    assert_eq!(fx.balance(&market).await? - market_before, 1_000, "the fee frozen at 10 %");
    fx.cleanup().await
}

/// Issue 13, 1 and 11: a refund record that disappears (the old annotation was the buyer's to
/// delete) never brings a second refund, deposits after the refund bounce instead of being
/// stranded, and a deposit counts by what it moved, whatever its memos.
#[tokio::test]
async fn a_cluster_is_refunded_once_whatever_its_record_says_later() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-refund-once").await?;
    let buyer = fx.buyer()?;
    let cluster = fx.cluster("once").await?;
    let escrow = fx.deposit(&cluster, 30_000).await?;
    // A second deposit with two memos: counted by the balance change like any other.
    let two_memos = [
        spl_token_interface::instruction::transfer_checked(
            &spl_token_interface::id(),
            &fx.sol.token_account(&buyer.pubkey()),
            &fx.sol.mint,
            &escrow,
            &buyer.pubkey(),
            &[],
            12_345,
            gpumarket_tests::solana::MINT_DECIMALS,
        )?,
        spl_memo_interface::instruction::build_memo(&spl_memo_interface::v3::id(), b"first", &[]),
        spl_memo_interface::instruction::build_memo(&spl_memo_interface::v3::id(), b"second", &[]),
    ];
    gpumarket_tests::solana::send_with_retry(&fx.sol.rpc(), &two_memos, &buyer, &[&buyer]).await?;
    fx.set_cluster_phase(&cluster, "Completed").await?;
    let before = fx.balance(&buyer.pubkey()).await?;
    let status = fx.settle_until_refunded(&fx.settler, "once").await?;
    assert_eq!(status.amount_refunded, Some(42_345), "both deposits, to the base unit");
    assert_eq!(fx.balance(&buyer.pubkey()).await?, before + 42_345);

    // The record is wiped (as the annotation once could be): rounds restore it from the chain
    // and pay nothing again.
    let api: Api<GpuCluster> = Api::namespaced(fx.client.clone(), &fx.ns);
    let wipe = json!({"status": {"escrow": {"account": escrow.to_string(), "refund": null}, "amountRefunded": null}});
    api.patch_status("once", &PatchParams::default(), &Patch::Merge(&wipe)).await?;
    let restarted = fx.restarted()?;
    for _ in 0..3 {
        restarted.settle_round(&fx.client).await?;
    }
    let after = fx.get_cluster("once").await?;
    let refund = settlement::plan::refund_record(&after).cloned().context("record restored")?;
    assert_eq!(refund.state, SettlementState::Confirmed);
    assert_eq!(fx.balance(&buyer.pubkey()).await?, before + 42_345, "refunded once");
    assert_eq!(fx.payments_with_key(&escrow, &cluster.uid().context("uid")?).await?, 1);

    // The escrow is closed: a late deposit fails and the buyer keeps the tokens.
    let late = fx.sol.transfer(&buyer, &escrow, 5_000, None).await;
    assert!(late.is_err(), "a transfer into a closed escrow must fail");
    assert_eq!(fx.balance(&buyer.pubkey()).await?, before + 42_345);

    // Deleted, the cluster is let go: its refund is confirmed.
    api.delete("once", &DeleteParams::default()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while api.get_opt("once").await?.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the refunded cluster is not released");
        restarted.settle_round(&fx.client).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    fx.cleanup().await
}

#[tokio::test]
async fn a_crash_at_any_step_still_pays_exactly_once() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-crash").await?;
    let s2 = fx.supplier(2)?;
    let cluster = fx.cluster("crash").await?;
    let escrow = fx.deposit(&cluster, 1_000_000).await?;

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
        assert_eq!(fx.payments_with_key(&escrow, &key).await?, 1, "{point:?}: one transaction");
    }
    fx.cleanup().await
}

/// Issue 13, 2: two settlers (a rolling update's old and new pod) settle the same leases at
/// the same time: every key is paid once; and a settler fenced off its Lease pays nothing.
#[tokio::test]
async fn two_settlers_at_once_pay_every_key_once_and_a_fenced_one_pays_nothing() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-two").await?;
    let suppliers = [fx.supplier(0)?, fx.supplier(1)?, fx.supplier(2)?];
    let cluster = fx.cluster("two").await?;
    let escrow = fx.deposit(&cluster, 1_000_000).await?;
    let mut before = Vec::new();
    for s in &suppliers {
        before.push(fx.balance(s).await?);
    }
    // Six leases of 1 GPU, 7 s each, spread over the three suppliers: 7000 each.
    for i in 0..6 {
        fx.lease(&cluster, &format!("two-{i}"), i % 3, 1, seconds_ago(20), Some(seconds_ago(13)))
            .await?;
    }
    let (a, b) = (fx.restarted()?, fx.restarted()?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        // Both rounds run at once; each may lose races (conflicts) to the other.
        let _ = tokio::join!(a.settle_round(&fx.client), b.settle_round(&fx.client));
        if fx.leases().await?.iter().all(settled) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the leases never settled");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (i, s) in suppliers.iter().enumerate() {
        assert_eq!(fx.balance(s).await? - before[i], 14_000, "supplier {i}: two leases, once");
    }
    for lease in fx.leases().await? {
        let uid = lease.uid().context("uid")?;
        for record in &lease.status.as_ref().context("status")?.settlements {
            let key = memo::payout_key(&uid, &record.period);
            assert_eq!(fx.payments_with_key(&escrow, &key).await?, 1, "{}", lease.name_any());
        }
    }

    // A replica whose election Lease is held by another pays nothing, even with work due.
    fx.lease(&cluster, "fenced", 0, 1, seconds_ago(20), Some(seconds_ago(13))).await?;
    let election = LeaderElection {
        namespace: fx.ns.clone(),
        lease_name: "gpumarket-controller".into(),
        identity: "paused-old-leader".into(),
        lease_duration: Duration::from_secs(15),
    };
    let lease: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(json!({
        "metadata": {"name": "gpumarket-controller"},
        "spec": {"holderIdentity": "new-leader", "leaseDurationSeconds": 15,
                 "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now())},
    }))?;
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(fx.client.clone(), &fx.ns)
        .create(&PostParams::default(), &lease)
        .await?;
    let fenced =
        Settler::new(fx.config.clone())?.fence_with(Fence::new(fx.client.clone(), &election));
    let before0 = fx.balance(&suppliers[0]).await?;
    let err = fenced.settle_round(&fx.client).await.expect_err("fenced");
    assert!(matches!(err, settlement::Error::Fenced), "{err}");
    assert_eq!(fx.balance(&suppliers[0]).await?, before0);
    let unpaid = fx.leases().await?.into_iter().find(|l| l.name_any().ends_with("fenced"));
    let records = unpaid.and_then(|l| l.status).map(|s| s.settlements).unwrap_or_default();
    assert!(records.is_empty(), "nothing recorded by a fenced settler: {records:?}");
    fx.cleanup().await
}

/// Issue 13, 4: "not found" is no proof a payout never landed. A recorded payout whose
/// signature the node does not know (as a lagging or pruned node would answer), although its
/// key was paid, is confirmed from the escrow's own history, never paid again.
#[tokio::test]
async fn a_payout_the_node_cannot_find_but_the_history_shows_is_never_paid_again() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-absent").await?;
    let s1 = fx.supplier(1)?;
    let cluster = fx.cluster("absent").await?;
    let escrow = fx.deposit(&cluster, 100_000).await?;
    let before = fx.balance(&s1).await?;
    let lease = fx.lease(&cluster, "absent", 1, 1, seconds_ago(20), Some(seconds_ago(13))).await?;
    let name = lease.name_any();
    fx.settle_until(&fx.settler, "the payout settles", |ls| ls.iter().all(settled)).await?;
    assert_eq!(fx.balance(&s1).await? - before, 7_000);

    // The record now names a signature nobody knows, signed long ago and expired, still Signed.
    let api: Api<GpuLease> = Api::all(fx.client.clone());
    let mut tampered = api.get_status(&name).await?;
    let status = tampered.status.get_or_insert_default();
    status.phase = Some(LeasePhase::Ended);
    let record = &mut status.settlements[0];
    record.signature = Some(solana_sdk::signature::Signature::new_unique().to_string());
    record.state = SettlementState::Signed;
    record.last_valid_block_height = Some(1);
    record.signed_slot = Some(1);
    record.transaction = None;
    api.replace_status(&name, &PostParams::default(), &tampered).await?;

    let restarted = fx.restarted()?;
    let leases = fx
        .settle_until(&restarted, "the payout is confirmed again", |ls| ls.iter().all(settled))
        .await?;
    let record = &leases[0].status.as_ref().context("status")?.settlements[0];
    assert_eq!(record.state, SettlementState::Confirmed);
    assert_eq!(fx.balance(&s1).await? - before, 7_000, "not paid a second time");
    let key = memo::payout_key(&lease.uid().context("uid")?, &record.period);
    assert_eq!(fx.payments_with_key(&escrow, &key).await?, 1);
    fx.cleanup().await
}

#[tokio::test]
async fn leases_end_out_of_funds_when_the_escrow_runs_dry() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-dry").await?;
    let s0 = fx.supplier(0)?;
    // Enough for about 8 GPU-seconds.
    let cluster = fx.cluster("dry").await?;
    fx.deposit(&cluster, 8_000).await?;
    let before = fx.balance(&s0).await?;
    fx.lease(&cluster, "dry", 0, 1, seconds_ago(0), None).await?;

    let leases = fx
        .settle_until(&fx.settler, "the lease ends and settles", |ls| ls.iter().all(settled))
        .await?;
    let status = leases[0].status.as_ref().context("status")?;
    assert_eq!(status.end_reason, Some(EndReason::OutOfFunds));
    let served = status.served_gpu_seconds.context("served")?;
    assert_eq!(paid(&leases[0]), served * 1000, "everything served is paid");
    assert!(paid(&leases[0]) <= 8_000, "never more than the deposit");
    assert_eq!(fx.balance(&s0).await? - before, paid(&leases[0]));

    // Issue 13, 9: the end is written once; a later end (a supplier failure noticed after the
    // escrow ran dry) cannot rewrite it, so nothing is slashed for it.
    let api: Api<GpuLease> = Api::all(fx.client.clone());
    let flip = json!({"status": {"endReason": "SupplierFailure", "endTime": Timestamp::now()}});
    let refused = api
        .patch_status(&leases[0].name_any(), &PatchParams::default(), &Patch::Merge(&flip))
        .await
        .expect_err("an ended meter never moves");
    assert!(refused.to_string().contains("written once"), "{refused}");
    fx.cleanup().await
}

/// Issue 13, 12 and 3: stake counts only when it comes from the offer's own wallet; anything
/// else sent to a node's stake account (a burst of tiny deposits among it) goes back to its
/// sender, once each; a failure slashes a share of the bond to the buyer; the wallet unbonds
/// after the cooldown.
#[tokio::test]
async fn stake_is_the_offer_wallets_own_slashed_on_failure_and_unbonded_after_the_cooldown()
-> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-stake").await?;
    let mut config = fx.config.clone();
    config.stake.slash_permille = 250;
    config.stake.unbond_cooldown = Duration::from_secs(3);
    let settler = Settler::new(config)?;
    let (buyer, supplier) = (fx.buyer()?, fx.supplier_keypair(0)?);
    let node = format!("{}-node-0", fx.ns);
    let offers: Api<GpuOffer> = Api::all(fx.client.clone());
    let offer: GpuOffer = serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuOffer",
        "metadata": {"name": node},
        "spec": {"nodeName": node, "wallet": supplier.pubkey().to_string(), "pricePerGpuHour": 1,
                 "region": "stake", "gpus": [{"uuid": "GPU-stake-0", "model": "H100", "memoryMib": 81920}]},
    }))?;
    offers.create(&PostParams::default(), &offer).await?;
    settler.settle_round(&fx.client).await?; // opens the node's stake account
    let stake = accounts::stake_address(&settler.authority(), &node).context("stake address")?;
    let bonded = |o: &GpuOffer| o.status.as_ref().and_then(|s| s.stake.as_ref()).map(|s| s.bonded);
    assert_eq!(bonded(&offers.get(&node).await?), Some(0));

    // The supplier bonds 100000; a stranger (the buyer's wallet) sends 20 tiny transfers.
    // The supplier's wallet has no tokens in this environment: the buyer funds it first.
    fx.sol.transfer(&buyer, &fx.sol.token_account(&supplier.pubkey()), 100_001, None).await?;
    fx.sol.transfer(&supplier, &stake, 100_000, Some("bond")).await?;
    let buyer_before = fx.balance(&buyer.pubkey()).await?;
    futures::stream::iter(0..20)
        .map(|_| fx.sol.transfer(&buyer, &stake, 7, Some(node.as_str())))
        .buffer_unordered(4)
        .try_collect::<Vec<_>>()
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        settler.settle_round(&fx.client).await?;
        let returned = fx.balance(&buyer.pubkey()).await? == buyer_before;
        if returned && bonded(&offers.get(&node).await?) == Some(100_000) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stranger's tokens not returned");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(fx.sol.account_balance(&stake).await?, Some(100_000), "only the bond is left");

    // A lease bound at a quarter fails after the market raised its slash rate to all of the
    // bond: the lease's frozen quarter goes to the buyer (issue 17: a policy change applies to
    // new leases only).
    let cluster = fx.cluster("stake").await?;
    fx.deposit(&cluster, 1_000_000).await?;
    let terms = frozen_terms(0, 250);
    let lease = fx.lease_on(&cluster, "stake", 0, 1, (seconds_ago(9), None), Some(terms)).await?;
    let policies: Api<MarketPolicy> = Api::all(fx.client.clone());
    let policy = json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "MarketPolicy",
        "metadata": {"name": "default"},
        "spec": {"slashPermille": 1000},
    });
    policies.patch("default", &PatchParams::apply("market-admin"), &Patch::Apply(&policy)).await?;
    fx.end_lease(&lease, Timestamp::now(), EndReason::SupplierFailure).await?;
    let buyer_before = fx.balance(&buyer.pubkey()).await?;
    let slashed = |l: &GpuLease| {
        l.status.as_ref().is_some_and(|s| {
            s.settlements
                .iter()
                .any(|r| r.period == "slash" && r.state == SettlementState::Confirmed)
        })
    };
    let outcome = fx
        .settle_until(&settler, "paid and slashed", |ls| {
            ls.iter().all(|l| settled(l) && slashed(l))
        })
        .await;
    policies.delete("default", &DeleteParams::default()).await?;
    outcome?;
    assert_eq!(fx.balance(&buyer.pubkey()).await? - buyer_before, 25_000, "a quarter of 100000");
    let told = fx.event_notes().await?;
    assert!(told.iter().any(|(r, n)| r == "Slashed" && n.contains("0.025000")), "{told:?}");

    // The wallet asks to unbond (a transfer of one base unit with the memo); after the
    // cooldown, with no lease active on the node, the bond goes back to it.
    let supplier_before = fx.balance(&supplier.pubkey()).await?;
    fx.sol.transfer(&supplier, &stake, 1, Some(memo::UNBOND)).await?;
    settler.settle_round(&fx.client).await?;
    let asked = offers.get(&node).await?;
    assert!(asked.unbonding(), "the offer is no longer matched while unbonding");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fx.sol.account_balance(&stake).await? != Some(0) {
        assert!(tokio::time::Instant::now() < deadline, "the stake was not unbonded");
        settler.settle_round(&fx.client).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(fx.balance(&supplier.pubkey()).await? - supplier_before, 75_000, "the rest, once");
    offers.delete(&node, &DeleteParams::default()).await?;
    fx.cleanup().await
}

/// Issue 13, 10: one lease whose status cannot be written (here an admission policy refuses it;
/// an oversized object does the same) does not stop settlement for the others.
#[tokio::test]
async fn a_lease_that_cannot_be_written_does_not_stop_the_others() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-stuck").await?;
    let (s0, s1) = (fx.supplier(0)?, fx.supplier(1)?);
    let cluster = fx.cluster("stuck").await?;
    fx.deposit(&cluster, 100_000).await?;
    let stuck = fx.lease(&cluster, "stuck", 0, 1, seconds_ago(20), Some(seconds_ago(13))).await?;
    let fine = fx.lease(&cluster, "fine", 1, 1, seconds_ago(20), Some(seconds_ago(13))).await?;
    let policy: k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy =
        serde_json::from_value(json!({
            "metadata": {"name": format!("{}-refuse", fx.ns)},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": ["gpumarket.io"],
                    "apiVersions": ["*"], "operations": ["UPDATE"], "resources": ["gpuleases/status"]}]},
                "validations": [{"expression": format!("object.metadata.name != '{}'", stuck.name_any()),
                    "message": "refused for the test"}],
            },
        }))?;
    let binding: k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding =
        serde_json::from_value(json!({
            "metadata": {"name": format!("{}-refuse", fx.ns)},
            "spec": {"policyName": format!("{}-refuse", fx.ns), "validationActions": ["Deny"]},
        }))?;
    let policies =
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy>::all(
            fx.client.clone(),
        );
    let bindings = Api::<
        k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding,
    >::all(fx.client.clone());
    policies.create(&PostParams::default(), &policy).await?;
    bindings.create(&PostParams::default(), &binding).await?;
    // Policies take effect within a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (before0, before1) = (fx.balance(&s0).await?, fx.balance(&s1).await?);
    let name = fine.name_any();
    fx.settle_until(&fx.settler, "the other lease settles", |ls| {
        ls.iter().any(|l| l.name_any() == name && settled(l))
    })
    .await?;
    assert_eq!(fx.balance(&s1).await? - before1, 7_000);
    assert_eq!(fx.balance(&s0).await?, before0, "the unrecordable payout is never sent");

    bindings.delete(&format!("{}-refuse", fx.ns), &DeleteParams::default()).await?;
    policies.delete(&format!("{}-refuse", fx.ns), &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fx.settle_until(&fx.settler, "the stuck lease settles once writable", |ls| {
        ls.iter().all(settled)
    })
    .await?;
    assert_eq!(fx.balance(&s0).await? - before0, 7_000, "paid once it could be recorded");
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
    let cluster = fx.cluster("outage").await?;
    let escrow = fx.deposit(&cluster, 1_000_000).await?;
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
    fx.end_lease(&lease, end, EndReason::Expired).await?;
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
        assert_eq!(fx.payments_with_key(&escrow, &key).await?, 1, "period {}", record.period);
    }
    fx.cleanup().await
}

#[tokio::test]
async fn a_payout_whose_blockhash_expired_unsent_is_re_signed_once() -> Result<()> {
    let _turn = TURN.lock().await;
    let fx = Fixture::new("settle-expiry").await?;
    let s1 = fx.supplier(1)?;
    let cluster = fx.cluster("expiry").await?;
    let escrow = fx.deposit(&cluster, 100_000).await?;
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
    assert_eq!(fx.payments_with_key(&escrow, &key).await?, 1);
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
    let cluster = fx.cluster("bench").await?;
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
        let round = std::time::Instant::now();
        let report = fx.settler.settle_round(&fx.client).await?;
        println!("round in {:.1} s: {report:?}", round.elapsed().as_secs_f64());
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
