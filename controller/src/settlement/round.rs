//! One settlement round, the Kubernetes wiring around the pure plan: resolve recorded
//! transactions, end leases whose escrow ran dry, record and send due payouts, refund ended
//! clusters, publish cluster totals and supplier reputation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use futures::TryStreamExt;
use gpumarket_crds::{
    EndReason, GpuCluster, GpuLease, GpuLeaseStatus, GpuOffer, LeasePhase, SettlementRecord,
    SettlementState,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use solana_pubkey::Pubkey;
use solana_signer::Signer;
use solana_transaction::Signature;

use super::events::ClusterEvents;
use super::meter::{Meter, confirmed_paid, fully_settled, is_payout_period};
use super::plan::{self, Inputs, Planned, REFUND_ANNOTATION, REFUND_PERIOD};
use super::protocol::{Step, decide};
use super::stake::SLASH_PERIOD;
use super::transaction::{self, Escrow, Payment};
use super::{CrashPoint, Error, Settler, chain, memo, reputation};

/// Field manager of settlement's writes.
pub const MANAGER: &str = "gpumarket-settlement";
/// Settlement's merge patches, under its own field manager (the controller applies the rest of
/// the status).
fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() }
}

/// Lease status writes in flight at once.
const CONCURRENT_WRITES: usize = 16;

/// What a round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Payouts and refunds found confirmed on chain.
    pub confirmed: usize,
    pub rebroadcast: usize,
    /// Payouts and refunds whose transaction expired or failed, to be re-signed.
    pub expired: usize,
    pub ended_out_of_funds: usize,
    /// Payouts recorded and sent this round, and the transactions they went in.
    pub payouts_sent: usize,
    pub transactions_sent: usize,
    pub refunds_sent: usize,
    /// Deleted clusters let go once refunded.
    pub released: usize,
}

impl RoundReport {
    pub fn is_idle(&self) -> bool {
        *self == RoundReport::default()
    }
}

/// Who recorded a transaction.
#[derive(Clone, Debug)]
enum Holder {
    Lease { name: String, period: String },
    Refund { namespace: String, name: String },
}

/// A recorded, unconfirmed transaction and everyone who recorded it.
#[derive(Debug, Default)]
struct Flight {
    last_valid_block_height: u64,
    wire: Option<String>,
    recorded_keys: HashSet<String>,
    holders: Vec<Holder>,
}

impl Settler {
    /// One round; safe to repeat and to interrupt anywhere (see [`super::protocol`]).
    pub async fn settle_round(&self, client: &Client) -> Result<RoundReport, Error> {
        let leases_api: Api<GpuLease> = Api::all(client.clone());
        let clusters_api: Api<GpuCluster> = Api::all(client.clone());
        let escrow = self.escrow().await?;
        let mut report = RoundReport::default();
        let events = ClusterEvents::new(client.clone());

        let leases = leases_api.list(&ListParams::default()).await?.items;
        let clusters = clusters_api.list(&ListParams::default()).await?.items;
        let apis = (&leases_api, &clusters_api);
        self.resolve_in_flight(apis, &events, &leases, &clusters, &mut report).await?;

        let mut leases = leases_api.list(&ListParams::default()).await?.items;
        let clusters = clusters_api.list(&ListParams::default()).await?.items;
        release_refunded(clusters_api.clone().into_client(), &clusters, &mut report).await?;
        let deposits = {
            let mut index = self.deposits.lock().await;
            chain::scan_deposits(&self.rpc, &escrow.account(), &mut index).await?;
            index.by_memo().clone()
        };
        let now = Timestamp::now();
        let ending = plan::out_of_funds(&self.inputs(&leases, &clusters, &deposits, now));
        for lease in leases.iter_mut().filter(|l| ending.contains(&l.name_any())) {
            *lease = update_lease(&leases_api, lease, |status| end_now(status, now)).await?;
            tracing::info!(lease = %lease.name_any(), "escrow exhausted: lease ended (OutOfFunds)");
            report.ended_out_of_funds += 1;
        }
        let inputs = self.inputs(&leases, &clusters, &deposits, now);

        let payouts = plan::payouts(&inputs);
        let by_name: HashMap<String, &GpuLease> =
            leases.iter().map(|l| (l.name_any(), l)).collect();
        for (name, record) in payouts.without_transfer {
            if let Some(lease) = by_name.get(&name) {
                let meter = Meter::of(lease);
                let after =
                    update_lease(&leases_api, lease, |s| confirm(s, &meter, record.clone()))
                        .await?;
                events.lease_changed(lease, &after).await;
            }
        }
        self.send_payouts(&leases_api, &by_name, &escrow, payouts.to_send, &mut report).await?;

        for refund in plan::refunds(&inputs) {
            self.refund(&clusters_api, &events, &escrow, refund, &mut report).await?;
        }
        publish_cluster_totals(&clusters_api, &leases, &clusters).await?;
        self.update_reputation(client, &escrow, &leases, &deposits).await?;
        Ok(report)
    }

    fn inputs<'a>(
        &'a self,
        leases: &'a [GpuLease],
        clusters: &'a [GpuCluster],
        deposits: &'a HashMap<String, u64>,
        now: Timestamp,
    ) -> Inputs<'a> {
        Inputs {
            leases,
            clusters,
            deposits,
            period: self.config.period,
            // Two rounds ahead: a round may itself take a while.
            lookahead: self.config.poll_interval * 2,
            stake: &self.config.stake,
            now,
        }
    }

    async fn resolve_in_flight(
        &self,
        (leases_api, clusters_api): (&Api<GpuLease>, &Api<GpuCluster>),
        events: &ClusterEvents,
        leases: &[GpuLease],
        clusters: &[GpuCluster],
        report: &mut RoundReport,
    ) -> Result<(), Error> {
        let flights = in_flight(leases, clusters);
        if flights.is_empty() {
            return Ok(());
        }
        let signatures: Vec<Signature> = flights.keys().copied().collect();
        let observed = chain::observe(&self.rpc, &signatures).await?;
        let finalized = chain::finalized_block_height(&self.rpc).await?;
        let by_name: HashMap<String, &GpuLease> =
            leases.iter().map(|l| (l.name_any(), l)).collect();
        for (flight, observed) in flights.values().zip(observed) {
            let step =
                decide(&observed, flight.last_valid_block_height, finalized, is_complete(flight));
            match step {
                Step::Wait => {}
                Step::Rebroadcast => {
                    if let Some(wire) = &flight.wire {
                        chain::send_wire(&self.rpc, wire).await?;
                        report.rebroadcast += 1;
                    }
                }
                Step::Confirm | Step::Resign => {
                    if let Some(e) = landed_error(&observed) {
                        tracing::warn!(error = %e, "settlement transaction failed on chain; re-signing");
                    }
                    futures::stream::iter(flight.holders.iter().map(Ok::<_, Error>))
                        .try_for_each_concurrent(CONCURRENT_WRITES, |holder| {
                            let apis = (leases_api, clusters_api);
                            self.settle_holder(apis, events, &by_name, holder, step)
                        })
                        .await?;
                    if step == Step::Confirm {
                        report.confirmed += flight.holders.len();
                    } else {
                        report.expired += flight.holders.len();
                    }
                }
            }
        }
        Ok(())
    }

    async fn settle_holder(
        &self,
        (leases_api, clusters_api): (&Api<GpuLease>, &Api<GpuCluster>),
        events: &ClusterEvents,
        leases: &HashMap<String, &GpuLease>,
        holder: &Holder,
        step: Step,
    ) -> Result<(), Error> {
        match holder {
            Holder::Lease { name, period } => {
                let Some(lease) = leases.get(name) else { return Ok(()) };
                let meter = Meter::of(lease);
                let after = update_lease(leases_api, lease, |status| {
                    let Some(record) =
                        status.settlements.iter().find(|r| &r.period == period).cloned()
                    else {
                        return;
                    };
                    if record.state != SettlementState::Signed {
                        return;
                    }
                    match step {
                        Step::Confirm => confirm(status, &meter, record),
                        _ => expire(status, period),
                    }
                })
                .await?;
                events.lease_changed(lease, &after).await;
            }
            Holder::Refund { namespace, name } => {
                let api: Api<GpuCluster> =
                    Api::namespaced(clusters_api.clone().into_client(), namespace);
                let cluster = api.get(name).await?;
                let Some(mut record) = plan::refund_record(&cluster) else { return Ok(()) };
                record.transaction = None;
                record.state = if step == Step::Confirm {
                    SettlementState::Confirmed
                } else {
                    SettlementState::Expired
                };
                write_refund_record(&api, name, &record).await?;
                if step == Step::Confirm {
                    let patch = json!({"status": {"amountRefunded": record.amount}});
                    api.patch_status(name, &patch_params(), &Patch::Merge(&patch)).await?;
                    events.refunded(&cluster, &record).await;
                }
            }
        }
        Ok(())
    }

    async fn send_payouts(
        &self,
        leases_api: &Api<GpuLease>,
        leases: &HashMap<String, &GpuLease>,
        escrow: &Escrow,
        planned: Vec<Planned>,
        report: &mut RoundReport,
    ) -> Result<(), Error> {
        if planned.is_empty() {
            return Ok(());
        }
        let mut wallets: Vec<Pubkey> = planned.iter().map(|p| p.payment.wallet).collect();
        wallets.sort();
        wallets.dedup();
        let missing =
            chain::wallets_without_token_account(&self.rpc, &wallets, &escrow.mint).await?;
        let payments: Vec<Payment> = planned.iter().map(|p| p.payment.clone()).collect();
        let batches = transaction::batches(escrow, payments, &missing)?;
        let (blockhash, last_valid_block_height) = chain::latest_blockhash(&self.rpc).await?;
        let mut planned = planned.into_iter();
        for batch in batches {
            let members: Vec<Planned> = planned.by_ref().take(batch.len()).collect();
            let tx = transaction::sign(
                &transaction::payout_instructions(escrow, &batch, &missing)?,
                &self.authority,
                blockhash,
            )?;
            let wire = transaction::wire_base64(&tx)?;
            let signature = tx.signatures.first().map(ToString::to_string);
            self.crash_if(CrashPoint::AfterSign)?;
            futures::stream::iter(members.iter().map(Ok::<_, Error>))
                .try_for_each_concurrent(CONCURRENT_WRITES, |member| {
                    let mut record = member.record.clone();
                    record.signature = signature.clone();
                    record.last_valid_block_height = Some(last_valid_block_height);
                    record.transaction = Some(wire.clone());
                    async move {
                        let Some(lease) = leases.get(&member.lease) else { return Ok(()) };
                        update_lease(leases_api, lease, |s| upsert(s, record.clone()))
                            .await
                            .map(drop)
                    }
                })
                .await?;
            self.crash_if(CrashPoint::AfterRecord)?;
            chain::send_wire(&self.rpc, &wire).await?;
            self.crash_if(CrashPoint::AfterSend)?;
            report.transactions_sent += 1;
            report.payouts_sent += members.len();
        }
        Ok(())
    }

    async fn refund(
        &self,
        clusters_api: &Api<GpuCluster>,
        events: &ClusterEvents,
        escrow: &Escrow,
        refund: plan::Refund,
        report: &mut RoundReport,
    ) -> Result<(), Error> {
        let api: Api<GpuCluster> =
            Api::namespaced(clusters_api.clone().into_client(), &refund.namespace);
        let mut record = SettlementRecord {
            period: REFUND_PERIOD.into(),
            through: Time(Timestamp::now()),
            amount: refund.amount,
            signature: None,
            last_valid_block_height: None,
            signed_slot: None,
            transaction: None,
            state: SettlementState::Confirmed,
        };
        if refund.amount == 0 {
            write_refund_record(&api, &refund.name, &record).await?;
            let patch = json!({"status": {"amountRefunded": 0}});
            let cluster =
                api.patch_status(&refund.name, &patch_params(), &Patch::Merge(&patch)).await?;
            events.refunded(&cluster, &record).await;
            return Ok(());
        }
        let missing =
            chain::wallets_without_token_account(&self.rpc, &[refund.buyer], &escrow.mint).await?;
        let payment =
            Payment { key: refund.uid.clone(), wallet: refund.buyer, amount: refund.amount };
        let ixs = transaction::instructions(
            escrow,
            &[payment],
            &missing,
            &memo::refund_memo(&refund.uid),
        )?;
        let (blockhash, last_valid_block_height) = chain::latest_blockhash(&self.rpc).await?;
        let tx = transaction::sign(&ixs, &self.authority, blockhash)?;
        let wire = transaction::wire_base64(&tx)?;
        record.signature = tx.signatures.first().map(ToString::to_string);
        record.last_valid_block_height = Some(last_valid_block_height);
        record.transaction = Some(wire.clone());
        record.state = SettlementState::Signed;
        write_refund_record(&api, &refund.name, &record).await?;
        chain::send_wire(&self.rpc, &wire).await?;
        report.refunds_sent += 1;
        Ok(())
    }

    /// Once per settlement period: sample each offer's heartbeat, write its reputation and
    /// stake, and anchor the hash of the reputation table in a memo when it changed.
    async fn update_reputation(
        &self,
        client: &Client,
        escrow: &Escrow,
        leases: &[GpuLease],
        deposits: &HashMap<String, u64>,
    ) -> Result<(), Error> {
        let due =
            self.lock_state().last_reputation.is_none_or(|at| at.elapsed() >= self.config.period);
        if !due {
            return Ok(());
        }
        let offers_api: Api<GpuOffer> = Api::all(client.clone());
        let offers = offers_api.list(&ListParams::default()).await?.items;
        let now = Timestamp::now();
        let mut table: BTreeMap<String, gpumarket_crds::Reputation> = BTreeMap::new();
        for offer in &offers {
            let name = offer.name_any();
            let status = offer.status.as_ref();
            let fresh = status.and_then(|s| s.last_heartbeat.as_ref()).is_some_and(|hb| {
                now.duration_since(hb.0).unsigned_abs() <= self.config.heartbeat_timeout
            });
            let rep = reputation::assess(
                status.and_then(|s| s.reputation.as_ref()),
                fresh,
                reputation::outcomes(&name, leases),
            );
            let stake = node_stake(&name, leases, deposits);
            if status.and_then(|s| s.reputation.as_ref()) != Some(&rep)
                || offer.bonded_stake() != stake
            {
                let patch = json!({"status": {"reputation": rep, "stake": {"account": "", "bonded": stake}}});
                offers_api.patch_status(&name, &patch_params(), &Patch::Merge(&patch)).await?;
            }
            table.insert(name, rep);
        }
        let hash = reputation::table_hash(table.iter().map(|(n, r)| (n.as_str(), r)));
        let anchored = self.lock_state().anchored_hash.clone();
        if !table.is_empty() && anchored.as_deref() != Some(hash.as_str()) {
            // An anchor needs no exactly-once: a repeated memo of the same hash is harmless.
            let ixs = [spl_memo_interface::instruction::build_memo(
                &spl_memo_interface::v3::id(),
                memo::reputation_memo(&hash).as_bytes(),
                &[&escrow.authority],
            )];
            let (blockhash, _) = chain::latest_blockhash(&self.rpc).await?;
            let tx = transaction::sign(&ixs, &self.authority, blockhash)?;
            chain::send_wire(&self.rpc, &transaction::wire_base64(&tx)?).await?;
            tracing::info!(%hash, authority = %self.authority.pubkey(), "reputation table anchored");
        }
        let mut state = self.lock_state();
        state.anchored_hash = Some(hash);
        state.last_reputation = Some(Instant::now());
        Ok(())
    }
}

/// Stake a node has left: its `stake:<node>` deposits less what was slashed.
fn node_stake(node: &str, leases: &[GpuLease], deposits: &HashMap<String, u64>) -> u64 {
    let bonded = deposits.get(&format!("{}{node}", memo::STAKE_PREFIX)).copied().unwrap_or(0);
    let slashed: u64 = leases
        .iter()
        .filter(|l| l.spec.offer == node)
        .flat_map(|l| l.status.iter().flat_map(|s| &s.settlements))
        .filter(|r| r.period == SLASH_PERIOD && r.state != SettlementState::Expired)
        .map(|r| r.amount)
        .sum();
    bonded.saturating_sub(slashed)
}

fn landed_error(observed: &super::protocol::Observed) -> Option<String> {
    match observed {
        super::protocol::Observed::Landed { error } => error.clone(),
        _ => None,
    }
}

/// Every recorded, unconfirmed transaction, by signature.
fn in_flight(leases: &[GpuLease], clusters: &[GpuCluster]) -> BTreeMap<Signature, Flight> {
    let mut flights: BTreeMap<Signature, Flight> = BTreeMap::new();
    let mut add = |record: &SettlementRecord, holder: Holder, key: Option<String>| {
        let Some(signature) = record.signature.as_deref().and_then(|s| s.parse::<Signature>().ok())
        else {
            return;
        };
        let flight = flights.entry(signature).or_default();
        flight.last_valid_block_height = record.last_valid_block_height.unwrap_or(0);
        flight.wire = flight.wire.take().or_else(|| record.transaction.clone());
        flight.recorded_keys.extend(key);
        flight.holders.push(holder);
    };
    for lease in leases {
        let uid = lease.uid().unwrap_or_default();
        for record in lease.status.iter().flat_map(|s| &s.settlements) {
            if record.state == SettlementState::Signed {
                let holder =
                    Holder::Lease { name: lease.name_any(), period: record.period.clone() };
                add(record, holder, Some(memo::payout_key(&uid, &record.period)));
            }
        }
    }
    for cluster in clusters {
        if let Some(record) =
            plan::refund_record(cluster).filter(|r| r.state == SettlementState::Signed)
        {
            let holder = Holder::Refund {
                namespace: cluster.namespace().unwrap_or_default(),
                name: cluster.name_any(),
            };
            add(&record, holder, None);
        }
    }
    flights
}

/// Whether every payout a transaction's memo names is recorded with its signature (a refund
/// names none). A transaction without recorded bytes is never complete: it can only expire.
fn is_complete(flight: &Flight) -> bool {
    let Some(memo_text) = flight.wire.as_deref().and_then(transaction::memo_of_wire) else {
        return false;
    };
    match memo::payout_keys(&memo_text) {
        Some(keys) => keys.iter().all(|k| flight.recorded_keys.contains(*k)),
        None => true,
    }
}

/// Insert or replace the record of its period.
fn upsert(status: &mut GpuLeaseStatus, record: SettlementRecord) {
    match status.settlements.iter_mut().find(|r| r.period == record.period) {
        Some(existing) => *existing = record,
        None => status.settlements.push(record),
    }
}

/// A payout landed: the record is confirmed and the lease's totals follow.
fn confirm(status: &mut GpuLeaseStatus, meter: &Meter, mut record: SettlementRecord) {
    record.state = SettlementState::Confirmed;
    record.transaction = None;
    upsert(status, record);
    status.amount_settled = Some(confirmed_paid(&status.settlements));
    status.settled_through = status
        .settlements
        .iter()
        .filter(|r| r.state == SettlementState::Confirmed && is_payout_period(&r.period))
        .map(|r| r.through.clone())
        .max_by_key(|t| t.0);
    if let Some(end) = meter.end {
        status.served_gpu_seconds = Some(meter.gpu_seconds_through(end));
        if fully_settled(meter, &status.settlements) {
            status.phase = Some(LeasePhase::Settled);
        }
    }
}

/// A recorded transaction can never land: its payouts are due again.
fn expire(status: &mut GpuLeaseStatus, period: &str) {
    if let Some(record) = status.settlements.iter_mut().find(|r| r.period == period) {
        record.state = SettlementState::Expired;
        record.transaction = None;
    }
}

/// Close an active lease's meter now, for lack of funds.
fn end_now(status: &mut GpuLeaseStatus, now: Timestamp) {
    if status.end_time.is_none() {
        status.phase = Some(LeasePhase::Ended);
        status.end_time = Some(Time(now));
        status.end_reason = Some(EndReason::OutOfFunds);
    }
}

/// Apply `change` to the lease's status and write it, conditional on the version read; on a
/// conflict, read again and re-apply (every change here is idempotent).
async fn update_lease(
    api: &Api<GpuLease>,
    lease: &GpuLease,
    change: impl Fn(&mut GpuLeaseStatus),
) -> Result<GpuLease, Error> {
    let name = lease.name_any();
    let mut current = lease.clone();
    loop {
        let mut next = current.clone();
        change(next.status.get_or_insert_default());
        let meter = Meter::of(&next);
        if let (Some(status), Some(end)) = (next.status.as_mut(), meter.end) {
            status.served_gpu_seconds.get_or_insert(meter.gpu_seconds_through(end));
        }
        if next.status == current.status {
            return Ok(current);
        }
        let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        match api.replace_status(&name, &params, &next).await {
            Ok(updated) => return Ok(updated),
            Err(kube::Error::Api(e)) if e.code == 409 => current = api.get_status(&name).await?,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn write_refund_record(
    api: &Api<GpuCluster>,
    name: &str,
    record: &SettlementRecord,
) -> Result<(), Error> {
    let value = serde_json::to_string(record).map_err(kube::Error::SerdeError)?;
    let patch = json!({"metadata": {"annotations": {REFUND_ANNOTATION: value}}});
    api.patch(name, &patch_params(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Deleted clusters whose refund is confirmed are let go (the settlement finalizer removed).
async fn release_refunded(
    client: Client,
    clusters: &[GpuCluster],
    report: &mut RoundReport,
) -> Result<(), Error> {
    let done = clusters.iter().filter(|c| {
        c.metadata.deletion_timestamp.is_some()
            && c.finalizers().iter().any(|f| f == super::FINALIZER)
            && super::refunded(c)
    });
    for cluster in done {
        let api: Api<GpuCluster> =
            Api::namespaced(client.clone(), &cluster.namespace().unwrap_or_default());
        super::set_finalizer(&api, cluster, false).await?;
        report.released += 1;
    }
    Ok(())
}

/// Each cluster's amountSettled: the confirmed payouts of all its leases.
async fn publish_cluster_totals(
    api: &Api<GpuCluster>,
    leases: &[GpuLease],
    clusters: &[GpuCluster],
) -> Result<(), Error> {
    let mut settled: HashMap<&str, u64> = HashMap::new();
    for lease in leases {
        let paid = lease.status.as_ref().and_then(|s| s.amount_settled).unwrap_or(0);
        *settled.entry(lease.spec.cluster.uid.as_str()).or_default() += paid;
    }
    for cluster in clusters {
        let uid = cluster.metadata.uid.as_deref().unwrap_or_default();
        let Some(total) = settled.get(uid).copied() else { continue };
        if cluster.status.as_ref().and_then(|s| s.amount_settled) != Some(total) {
            let ns_api: Api<GpuCluster> = Api::namespaced(
                api.clone().into_client(),
                &cluster.namespace().unwrap_or_default(),
            );
            let patch = json!({"status": {"amountSettled": total}});
            ns_api
                .patch_status(&cluster.name_any(), &patch_params(), &Patch::Merge(&patch))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease, now};
    use solana_keypair::Keypair;
    use solana_transaction::Hash;

    fn signed_payout(keys: &[String]) -> (String, String) {
        let authority = Keypair::new();
        let escrow =
            Escrow { authority: authority.pubkey(), mint: Keypair::new().pubkey(), decimals: 6 };
        let payments: Vec<Payment> = keys
            .iter()
            .map(|k| Payment { key: k.clone(), wallet: Keypair::new().pubkey(), amount: 5 })
            .collect();
        let ixs =
            transaction::payout_instructions(&escrow, &payments, &HashSet::new()).expect("ixs");
        let tx = transaction::sign(&ixs, &authority, Hash::default()).expect("signed");
        (tx.signatures[0].to_string(), transaction::wire_base64(&tx).expect("wire"))
    }

    fn lease_with(name: &str, record: Option<SettlementRecord>) -> GpuLease {
        let mut lease = mk_lease(&mk_cluster("c", 1, 1), name, &["g0"], 1);
        lease.metadata.name = Some(name.into());
        lease.metadata.uid = Some(format!("{name}-uid"));
        lease.status = Some(GpuLeaseStatus {
            settlements: record.into_iter().collect(),
            ..Default::default()
        });
        lease
    }

    fn signed(period: &str, signature: &str, wire: &str) -> SettlementRecord {
        SettlementRecord {
            period: period.into(),
            through: Time(now()),
            amount: 5,
            signature: Some(signature.into()),
            last_valid_block_height: Some(77),
            signed_slot: None,
            transaction: Some(wire.into()),
            state: SettlementState::Signed,
        }
    }

    #[test]
    fn a_batch_is_complete_only_when_every_payout_in_it_is_recorded() {
        let keys = [memo::payout_key("a-uid", "0001"), memo::payout_key("b-uid", "0001")];
        let (signature, wire) = signed_payout(&keys);
        let both = [
            lease_with("a", Some(signed("0001", &signature, &wire))),
            lease_with("b", Some(signed("0001", &signature, &wire))),
        ];
        let flights = in_flight(&both, &[]);
        assert_eq!(flights.len(), 1);
        let flight = flights.values().next().expect("one flight");
        assert_eq!((flight.holders.len(), flight.last_valid_block_height), (2, 77));
        assert!(is_complete(flight));

        // A crash between the two records: b's payout is unrecorded and will be planned again,
        // so this transaction must never be sent.
        let partial =
            [lease_with("a", Some(signed("0001", &signature, &wire))), lease_with("b", None)];
        let flights = in_flight(&partial, &[]);
        assert!(!is_complete(flights.values().next().expect("one flight")));
    }

    #[test]
    fn confirming_the_last_payout_settles_an_ended_lease() {
        let mut lease = lease_with("a", None);
        lease.spec.price_per_gpu_hour = 3600;
        let status = lease.status.get_or_insert_default();
        status.phase = Some(LeasePhase::Ended);
        status.end_time =
            Some(Time(Timestamp::from_second(now().as_second() + 90).expect("valid")));
        let meter = Meter::of(&lease);
        let status = lease.status.get_or_insert_default();
        let mut first = signed("0001", "s1", "w1");
        first.through = Time(Timestamp::from_second(now().as_second() + 60).expect("valid"));
        first.amount = 60;
        confirm(status, &meter, first);
        assert_eq!(status.amount_settled, Some(60));
        assert_eq!(status.phase, Some(LeasePhase::Ended));
        assert_eq!(status.settlements[0].transaction, None, "bytes dropped once confirmed");

        let mut last = signed("0002", "s2", "w2");
        last.through = status.end_time.clone().expect("ended");
        last.amount = 30;
        upsert(status, last.clone());
        confirm(status, &meter, last);
        assert_eq!(status.amount_settled, Some(90));
        assert_eq!(status.served_gpu_seconds, Some(90));
        assert_eq!(status.phase, Some(LeasePhase::Settled));
        assert_eq!(status.settlements.len(), 2);
    }

    #[test]
    fn expiring_keeps_the_record_for_re_signing() {
        let mut status = GpuLeaseStatus::default();
        upsert(&mut status, signed("0001", "s1", "w1"));
        expire(&mut status, "0001");
        assert_eq!(status.settlements[0].state, SettlementState::Expired);
        assert_eq!(status.settlements[0].transaction, None);
        assert_eq!(status.settlements[0].amount, 5);
    }

    #[test]
    fn out_of_funds_closes_the_meter_once() {
        let mut status = GpuLeaseStatus { phase: Some(LeasePhase::Active), ..Default::default() };
        end_now(&mut status, now());
        assert_eq!(status.end_reason, Some(EndReason::OutOfFunds));
        let later = Timestamp::from_second(now().as_second() + 5).expect("valid");
        end_now(&mut status, later);
        assert_eq!(status.end_time, Some(Time(now())), "an ended meter never moves");
    }
}
