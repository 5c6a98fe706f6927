//! One settlement round, the Kubernetes wiring around the pure plan: resolve recorded
//! transactions, read what each escrow and stake account holds, end leases whose escrow ran
//! dry, record and send due payments, refund ended clusters, publish totals and reputation.
//!
//! Every write that records money is conditional on the version read (a lost race is never
//! overwritten), a payment is sent only once every payment in its transaction is recorded, and
//! an error writing one object is counted and logged without stopping the round for the others.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use gpumarket_crds::policy::POLICY_NAME;
use gpumarket_crds::{
    EndReason, GpuCluster, GpuLease, GpuLeaseStatus, GpuOffer, LeasePhase, MarketPolicy,
    SettlementRecord, SettlementState,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use solana_pubkey::Pubkey;
use solana_signer::Signer;
use solana_transaction::Signature;

use super::escrow::EscrowAccount;
use super::events::ClusterEvents;
use super::meter::{Meter, Paid, compact, fully_settled, is_payout_period, next_due};
use super::plan::{self, Holder, Inputs, Planned};
use super::pricing::Conversion;
use super::protocol::{Step, after_history, decide};
use super::stake::{SLASH_PERIOD, StakeBook};
use super::transaction::{self, Custody, Payment};
use super::{CrashPoint, Error, Settler, accounts, chain, memo, reputation};

/// Field manager of settlement's writes.
pub const MANAGER: &str = "gpumarket-settlement";
/// Settlement's merge patches, under its own field manager (the controller applies the rest of
/// the status).
fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() }
}

/// Writes in flight at once.
const CONCURRENT_WRITES: usize = 16;
/// Payout transactions signed, recorded and sent at once.
const CONCURRENT_TRANSACTIONS: usize = 8;
/// Attempts of a conditional write that lost a race to an unrelated change.
const WRITE_ATTEMPTS: usize = 5;

/// What a round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Payments found confirmed on chain.
    pub confirmed: usize,
    pub rebroadcast: usize,
    /// Payments whose transaction failed, or expired and is provably absent: to be re-signed.
    pub expired: usize,
    /// Expired payments whose absence the node's history could not prove (they wait).
    pub unproven: usize,
    /// Payments found already made (their key in the source account's history) and confirmed
    /// instead of being paid again.
    pub already_paid: usize,
    pub ended_out_of_funds: usize,
    /// Payments recorded and sent this round, and the transactions they went in.
    pub payouts_sent: usize,
    pub transactions_sent: usize,
    /// Transactions signed whose payments could not all be recorded: never sent, left to expire.
    pub transactions_held: usize,
    pub refunds_sent: usize,
    /// Deleted clusters let go once refunded.
    pub released: usize,
    /// Writes to single objects that failed (logged; the round went on).
    pub failed_writes: usize,
    /// 1 when the price feed could not be paid at: payouts and running out of funds waited.
    pub paused_by_price_feed: usize,
}

impl RoundReport {
    pub fn is_idle(&self) -> bool {
        *self == RoundReport::default()
    }

    /// Each count by its metric label.
    pub fn actions(&self) -> [(&'static str, usize); 13] {
        [
            ("confirmed", self.confirmed),
            ("rebroadcast", self.rebroadcast),
            ("expired", self.expired),
            ("unproven", self.unproven),
            ("already_paid", self.already_paid),
            ("ended_out_of_funds", self.ended_out_of_funds),
            ("payouts_sent", self.payouts_sent),
            ("transactions_sent", self.transactions_sent),
            ("transactions_held", self.transactions_held),
            ("refunds_sent", self.refunds_sent),
            ("clusters_released", self.released),
            ("failed_writes", self.failed_writes),
            ("paused_by_price_feed", self.paused_by_price_feed),
        ]
    }
}

impl std::ops::AddAssign for RoundReport {
    fn add_assign(&mut self, other: RoundReport) {
        let RoundReport {
            confirmed,
            rebroadcast,
            expired,
            unproven,
            already_paid,
            ended_out_of_funds,
            payouts_sent,
            transactions_sent,
            transactions_held,
            refunds_sent,
            released,
            failed_writes,
            paused_by_price_feed,
        } = other;
        self.confirmed += confirmed;
        self.rebroadcast += rebroadcast;
        self.expired += expired;
        self.unproven += unproven;
        self.already_paid += already_paid;
        self.ended_out_of_funds += ended_out_of_funds;
        self.payouts_sent += payouts_sent;
        self.transactions_sent += transactions_sent;
        self.transactions_held += transactions_held;
        self.refunds_sent += refunds_sent;
        self.released += released;
        self.failed_writes += failed_writes;
        self.paused_by_price_feed += paused_by_price_feed;
    }
}

/// A recorded, unconfirmed transaction and everyone who recorded it.
#[derive(Debug, Default)]
struct Flight {
    last_valid_block_height: u64,
    signed_slot: u64,
    wire: Option<String>,
    recorded_keys: HashSet<String>,
    /// Each payment in it: who holds its record, its key, the account it is paid from.
    payments: Vec<(Holder, String, Pubkey)>,
}

/// A holder written with how its payment ended, or the error of that write.
type Settled<'a> = (&'a Holder, Outcome, Result<(), Error>);

/// How a recorded payment ends.
#[derive(Clone, Debug)]
enum Outcome {
    /// Paid, by this signature.
    Confirmed(String),
    /// Provably never paid.
    Expired,
}

/// What a round read of the chain: escrows, stake books and each mint's rate.
struct Books<'a> {
    escrows: &'a HashMap<String, EscrowAccount>,
    stakes: &'a HashMap<String, StakeBook>,
    conversions: &'a HashMap<Pubkey, Conversion>,
}

/// The three listings a round works from.
struct Listed {
    leases: Vec<GpuLease>,
    clusters: Vec<GpuCluster>,
    offers: Vec<GpuOffer>,
}

impl Settler {
    /// One round; safe to repeat and to interrupt anywhere (see [`super::protocol`]).
    pub async fn settle_round(&self, client: &Client) -> Result<RoundReport, Error> {
        let events = ClusterEvents::new(client.clone());
        let round = self.round(client, &events).await;
        // What was written is told even when the round stopped on an error later.
        events.flush().await;
        round
    }

    async fn round(&self, client: &Client, events: &ClusterEvents) -> Result<RoundReport, Error> {
        let custody = self.custody().await?;
        let mut report = RoundReport::default();

        let policy = Api::<MarketPolicy>::all(client.clone()).get_opt(POLICY_NAME).await?;
        let in_force =
            crate::policy::effective_settlement(&self.config, policy.map(|p| p.spec).as_ref());
        self.lock_state().in_force = Some(in_force);

        let listed = list(client).await?;
        let resolved = self.resolve_in_flight(client, events, &listed, &mut report).await?;
        // Listed again only when resolving wrote (nothing in flight: the same listing).
        let Listed { mut leases, clusters, offers } =
            if resolved { list(client).await? } else { listed };
        let escrows = self.read_escrows(client, events, &clusters, &mut report).await?;
        self.release_refunded(client, &clusters, &escrows, &mut report).await;
        let stakes = self.read_stakes(client, &custody, &leases, &offers, &mut report).await?;

        let mut conversions = HashMap::new();
        for mint in self.mints.all() {
            // A mint whose rate cannot be read holds up its own payouts, not the others'.
            let conversion = self.conversion_of(mint).await.unwrap_or_else(|e| {
                Conversion::Paused(format!("mint {mint}: {}", e.public_message()))
            });
            if let Some(why) = conversion.paused() {
                tracing::warn!(%mint, %why, "payouts in this mint wait for a rate to pay at");
                report.paused_by_price_feed = 1;
            }
            conversions.insert(mint, conversion);
        }
        let now = Timestamp::now();
        let books = Books { escrows: &escrows, stakes: &stakes, conversions: &conversions };
        let ending = plan::out_of_funds(&self.inputs(&leases, &clusters, &offers, &books, now));
        let leases_api: Api<GpuLease> = Api::all(client.clone());
        let ending: Vec<(&GpuLease, _)> = leases
            .iter()
            .filter(|l| ending.contains(&l.name_any()))
            .map(|l| (l, move |s: &mut GpuLeaseStatus, _: &Meter| end_now(s, now)))
            .collect();
        let mut ended: HashMap<String, GpuLease> = HashMap::new();
        for (_, lease) in update_leases(&leases_api, ending, &mut report).await {
            tracing::info!(lease = %lease.name_any(), "escrow exhausted: lease ended (OutOfFunds)");
            report.ended_out_of_funds += 1;
            ended.insert(lease.name_any(), lease);
        }
        for lease in &mut leases {
            if let Some(now_ended) = ended.remove(&lease.name_any()) {
                *lease = now_ended;
            }
        }
        let inputs = self.inputs(&leases, &clusters, &offers, &books, now);
        let by_name: HashMap<String, &GpuLease> =
            leases.iter().map(|l| (l.name_any(), l)).collect();
        let closing: Vec<(&GpuLease, _)> = plan::closed(&inputs)
            .iter()
            .filter_map(|name| Some((*by_name.get(name)?, close)))
            .collect();
        for (before, after) in update_leases(&leases_api, closing, &mut report).await {
            events.lease_changed(&before, &after);
        }
        let payouts = plan::payouts(&inputs);
        let free: Vec<(&GpuLease, _)> = payouts
            .without_transfer
            .into_iter()
            .filter_map(|(name, record)| {
                let confirm = move |s: &mut GpuLeaseStatus, meter: &Meter| {
                    confirm_free(s, meter, &record);
                };
                Some((*by_name.get(&name)?, confirm))
            })
            .collect();
        for (before, after) in update_leases(&leases_api, free, &mut report).await {
            events.lease_changed(&before, &after);
        }
        self.send_payouts(
            client,
            events,
            &by_name,
            &escrows,
            &stakes,
            payouts.to_send,
            &mut report,
        )
        .await?;
        for refund in plan::refunds(&inputs) {
            self.refund(client, events, refund, &mut report).await?;
        }
        publish_cluster_totals(client, &leases, &clusters, now, &mut report).await;
        self.update_reputation(client, &custody, &leases, &offers, &mut report).await?;
        Ok(report)
    }

    fn inputs<'a>(
        &'a self,
        leases: &'a [GpuLease],
        clusters: &'a [GpuCluster],
        offers: &'a [GpuOffer],
        books: &Books<'a>,
        now: Timestamp,
    ) -> Inputs<'a> {
        Inputs {
            leases,
            clusters,
            offers,
            escrows: books.escrows,
            stakes: books.stakes,
            conversions: books.conversions,
            market_mint: self.mints.market,
            authority: self.authority(),
            period: self.in_force().period,
            // Two rounds ahead: a round may itself take a while.
            lookahead: self.config.poll_interval * 2,
            stake: &self.config.stake,
            now,
        }
    }

    /// Confirm, rebroadcast or expire each recorded payment by what the chain says. Returns
    /// whether any was in flight (its holder may have been written).
    async fn resolve_in_flight(
        &self,
        client: &Client,
        events: &ClusterEvents,
        listed: &Listed,
        report: &mut RoundReport,
    ) -> Result<bool, Error> {
        let flights = in_flight(listed, &self.authority());
        if flights.is_empty() {
            return Ok(false);
        }
        let signatures: Vec<Signature> = flights.keys().copied().collect();
        let observed = chain::observe(&self.rpc, &signatures).await?;
        let finalized = chain::finalized_block_height(&self.rpc).await?;
        // What each payment's holder is to record, with the signature it was recorded under.
        let mut settling: Vec<(&Holder, String, Outcome)> = Vec::new();
        for ((signature, flight), observed) in flights.iter().zip(observed) {
            let recorded = signature.to_string();
            let step =
                decide(&observed, flight.last_valid_block_height, finalized, is_complete(flight));
            let mut outcomes: Vec<(&Holder, Outcome)> = Vec::new();
            match step {
                Step::Wait => {}
                Step::Rebroadcast => {
                    if let Some(wire) = &flight.wire {
                        self.check_fence().await?;
                        chain::send_wire(&self.rpc, wire).await?;
                        report.rebroadcast += 1;
                    }
                }
                Step::Confirm => outcomes.extend(
                    flight
                        .payments
                        .iter()
                        .map(|(h, _, _)| (h, Outcome::Confirmed(recorded.clone()))),
                ),
                Step::Resign => {
                    tracing::warn!(%signature, ?observed, "settlement transaction failed on chain; re-signing");
                    outcomes.extend(flight.payments.iter().map(|(h, _, _)| (h, Outcome::Expired)));
                }
                Step::CheckHistory => {
                    for (holder, key, source) in &flight.payments {
                        let history =
                            chain::prove(&self.rpc, source, key, flight.signed_slot).await?;
                        match (after_history(&history), history) {
                            (Step::Confirm, super::protocol::History::Paid { signature }) => {
                                outcomes.push((holder, Outcome::Confirmed(signature)));
                            }
                            (Step::Resign, _) => outcomes.push((holder, Outcome::Expired)),
                            _ => {
                                tracing::warn!(%signature, %source, "expired transaction not found, but the node's history does not reach back to its signing: waiting");
                                report.unproven += 1;
                            }
                        }
                    }
                }
            }
            settling.extend(outcomes.into_iter().map(|(h, o)| (h, recorded.clone(), o)));
        }
        // Each holder is its own object (a lease's holders write conditionally and retry).
        let leases: HashMap<&str, &GpuLease> = listed
            .leases
            .iter()
            .map(|l| (l.metadata.name.as_deref().unwrap_or_default(), l))
            .collect();
        let leases = &leases;
        let settling: Vec<BoxFuture<'_, Settled<'_>>> = settling
            .into_iter()
            .map(|(holder, recorded, outcome)| {
                async move {
                    let known = match holder {
                        Holder::Lease { name, .. } => leases.get(name.as_str()).copied(),
                        _ => None,
                    };
                    let result =
                        settle_holder(client, events, known, holder, &recorded, &outcome).await;
                    (holder, outcome, result)
                }
                .boxed()
            })
            .collect();
        let settled: Vec<_> =
            futures::stream::iter(settling).buffer_unordered(CONCURRENT_WRITES).collect().await;
        for (holder, outcome, result) in settled {
            match result {
                Ok(()) => match outcome {
                    Outcome::Confirmed(_) => report.confirmed += 1,
                    Outcome::Expired => report.expired += 1,
                },
                Err(e) => failed_write(report, &format!("{holder:?}"), &e),
            }
        }
        Ok(true)
    }

    /// What each cluster's escrow holds, by cluster uid, written to `status.escrow` when it
    /// changed. Only accounts that are token accounts of the cluster's mint owned by the
    /// authority count.
    async fn read_escrows(
        &self,
        client: &Client,
        events: &ClusterEvents,
        clusters: &[GpuCluster],
        report: &mut RoundReport,
    ) -> Result<HashMap<String, EscrowAccount>, Error> {
        let authority = self.authority();
        let addressed: Vec<(&GpuCluster, Pubkey)> = clusters
            .iter()
            .filter_map(|c| {
                Some((c, accounts::escrow_address(&authority, c.metadata.uid.as_deref()?)?))
            })
            .collect();
        let addresses: Vec<Pubkey> = addressed.iter().map(|(_, a)| *a).collect();
        let held = chain::token_accounts(&self.rpc, &addresses).await?;
        let mut balances = HashMap::new();
        let mut closed = Vec::new();
        for (cluster, address) in addressed {
            let Some(account) = held.get(&address).copied().flatten() else {
                let recorded = cluster.status.as_ref().and_then(|s| s.escrow.as_ref()).is_some();
                let refund = plan::refund_record(cluster).map(|r| r.state);
                if recorded && matches!(refund, None | Some(SettlementState::Expired)) {
                    closed.push((cluster, address));
                }
                continue;
            };
            if self.mints.of(cluster) != Ok(account.mint) || account.owner != authority {
                tracing::warn!(%address, "an escrow address holds a foreign account; ignored");
                continue;
            }
            let held = EscrowAccount { mint: account.mint, balance: account.amount };
            balances.insert(cluster.uid().unwrap_or_default(), held);
            let recorded = cluster.status.as_ref().and_then(|s| s.escrow.as_ref());
            let current = (recorded.map(|e| e.account.clone()), recorded.and_then(|e| e.balance));
            if current != (Some(address.to_string()), Some(account.amount)) {
                let patch = json!({"status": {"escrow": {"account": address.to_string(), "balance": account.amount}}});
                let api = cluster_api(client, cluster);
                if let Err(e) = api
                    .patch_status(&cluster.name_any(), &patch_params(), &Patch::Merge(&patch))
                    .await
                {
                    failed_write(report, &cluster.name_any(), &e.into());
                }
            }
        }
        // An escrow that was opened and is gone was closed by its refund: its record (lost,
        // or wiped by hand) is restored from the chain, and nothing is paid again.
        for (cluster, address) in closed {
            let uid = cluster.uid().unwrap_or_default();
            let paid = self.paid_keys(&HashMap::from([(address, None)])).await?;
            let Some(signature) = paid.get(&uid) else {
                tracing::warn!(cluster = %cluster.name_any(), %address, "escrow recorded but not found on chain, and no refund in its history: waiting");
                continue;
            };
            let last_seen =
                cluster.status.as_ref().and_then(|s| s.escrow.as_ref()).and_then(|e| e.balance);
            let found = FoundRefund { address, signature, amount: last_seen.unwrap_or(0) };
            let holder = (cluster.namespace().unwrap_or_default(), cluster.name_any());
            match confirm_found_refund(client, events, &holder, &found).await {
                Ok(()) => {
                    tracing::warn!(cluster = %cluster.name_any(), "refund record restored from the chain");
                    report.already_paid += 1;
                }
                Err(e) => failed_write(report, &cluster.name_any(), &e),
            }
        }
        Ok(balances)
    }

    /// Deleted clusters whose refund is confirmed, or whose escrow was never opened, are let go
    /// (the settlement finalizer removed).
    async fn release_refunded(
        &self,
        client: &Client,
        clusters: &[GpuCluster],
        escrows: &HashMap<String, EscrowAccount>,
        report: &mut RoundReport,
    ) {
        let held: Vec<&GpuCluster> = clusters
            .iter()
            .filter(|c| {
                c.metadata.deletion_timestamp.is_some()
                    && c.finalizers().iter().any(|f| f == super::FINALIZER)
            })
            .collect();
        for cluster in held {
            let never_opened = cluster.status.as_ref().and_then(|s| s.escrow.as_ref()).is_none()
                && !escrows.contains_key(&cluster.uid().unwrap_or_default());
            if !super::refunded(cluster) && !never_opened {
                continue;
            }
            match super::set_finalizer(&cluster_api(client, cluster), cluster, false).await {
                Ok(()) => report.released += 1,
                Err(e) => failed_write(report, &cluster.name_any(), &e.into()),
            }
        }
    }

    /// Each offer's stake account (opened if it is not yet), read: balance, history, book;
    /// `status.stake` written when it changed.
    async fn read_stakes(
        &self,
        client: &Client,
        custody: &Custody,
        leases: &[GpuLease],
        offers: &[GpuOffer],
        report: &mut RoundReport,
    ) -> Result<HashMap<String, StakeBook>, Error> {
        let authority = self.authority();
        let live: Vec<&GpuOffer> =
            offers.iter().filter(|o| o.metadata.deletion_timestamp.is_none()).collect();
        let addressed: Vec<(&GpuOffer, Pubkey)> = live
            .iter()
            .filter_map(|o| Some((*o, accounts::stake_address(&authority, &o.name_any())?)))
            .collect();
        let addresses: Vec<Pubkey> = addressed.iter().map(|(_, a)| *a).collect();
        let mut held = chain::token_accounts(&self.rpc, &addresses).await?;
        let missing: Vec<&GpuOffer> = addressed
            .iter()
            .filter(|(_, a)| held.get(a).is_none_or(Option::is_none))
            .map(|(o, _)| *o)
            .collect();
        if !missing.is_empty() {
            self.check_fence().await?;
            let opening: Vec<BoxFuture<'_, Result<Pubkey, Error>>> = missing
                .iter()
                .map(|offer| {
                    let seed = accounts::stake_seed(&offer.name_any());
                    async move {
                            chain::open_account(&self.rpc, &self.authority, custody, &seed).await
                        }
                        .boxed()
                })
                .collect();
            let opened: Vec<Result<Pubkey, Error>> =
                futures::stream::iter(opening).buffer_unordered(CONCURRENT_WRITES).collect().await;
            for result in opened {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "opening a stake account");
                }
            }
            held = chain::token_accounts(&self.rpc, &addresses).await?;
        }
        let in_flight = plan::stake_in_flight(leases, offers);
        let mut books = HashMap::new();
        let mut histories = self.histories.lock().await;
        for (offer, address) in addressed {
            let Some(account) = held.get(&address).copied().flatten() else { continue };
            if account.mint != custody.mint || account.owner != authority {
                continue;
            }
            let history = histories.entry(address).or_default();
            if history.scanned_balance != Some(account.amount) {
                chain::scan(&self.rpc, &address, &custody.mint, history, true).await?;
                history.scanned_balance = Some(account.amount);
            }
            let node = offer.name_any();
            let wallet = Pubkey::from_str(&offer.spec.wallet).ok();
            let flying = in_flight.get(&node).copied().unwrap_or(0);
            let book = super::stake::book(
                &node,
                address,
                wallet,
                account.amount,
                &history.transfers,
                &history.paid,
                flying,
            );
            let previous = offer.status.as_ref().and_then(|s| s.stake.as_ref());
            let unbond_requested = book.unbond.as_ref().map(|_| {
                previous.and_then(|s| s.unbond_requested.clone()).unwrap_or(Time(Timestamp::now()))
            });
            let current =
                previous.map(|s| (s.account.clone(), s.bonded, s.unbond_requested.clone()));
            if current != Some((address.to_string(), book.bonded, unbond_requested.clone())) {
                let patch = json!({"status": {"stake": {
                    "account": address.to_string(),
                    "bonded": book.bonded,
                    "unbondRequested": unbond_requested,
                }}});
                let api: Api<GpuOffer> = Api::all(client.clone());
                if let Err(e) =
                    api.patch_status(&node, &patch_params(), &Patch::Merge(&patch)).await
                {
                    failed_write(report, &node, &e.into());
                }
            }
            books.insert(node, book);
        }
        Ok(books)
    }

    /// The keys already paid from `sources` (their histories read again when their balance moved
    /// since last read; a closed account's, whose balance is `None`, always).
    async fn paid_keys(
        &self,
        sources: &HashMap<Pubkey, Option<u64>>,
    ) -> Result<HashMap<String, String>, Error> {
        let mut histories = self.histories.lock().await;
        let mut paid = HashMap::new();
        for (source, balance) in sources {
            let history = histories.entry(*source).or_default();
            if balance.is_none() || history.scanned_balance != *balance {
                chain::scan(&self.rpc, source, &self.mints.market, history, false).await?;
                history.scanned_balance = *balance;
            }
            paid.extend(history.paid.iter().map(|(k, s)| (k.clone(), s.clone())));
        }
        Ok(paid)
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_payouts(
        &self,
        client: &Client,
        events: &ClusterEvents,
        leases: &HashMap<String, &GpuLease>,
        escrows: &HashMap<String, EscrowAccount>,
        stakes: &HashMap<String, StakeBook>,
        planned: Vec<Planned>,
        report: &mut RoundReport,
    ) -> Result<(), Error> {
        if planned.is_empty() {
            return Ok(());
        }
        self.check_fence().await?;
        // A key already in its source account's history was paid (its record lost): it is
        // confirmed, never paid again.
        let authority = self.authority();
        let mut balances: HashMap<Pubkey, u64> =
            stakes.values().map(|b| (b.account, b.balance)).collect();
        for (uid, escrow) in escrows {
            if let Some(address) = accounts::escrow_address(&authority, uid) {
                balances.insert(address, escrow.balance);
            }
        }
        let used: HashMap<Pubkey, Option<u64>> = planned
            .iter()
            .map(|p| (p.payment.source, balances.get(&p.payment.source).copied()))
            .collect();
        let paid = self.paid_keys(&used).await?;
        let (done, planned): (Vec<Planned>, Vec<Planned>) =
            planned.into_iter().partition(|p| paid.contains_key(&p.payment.key));
        for p in done {
            tracing::warn!(key = %p.payment.key, holder = ?p.holder, "payment already on chain without its record: confirmed, not paid again");
            let outcome = Outcome::Confirmed(paid[&p.payment.key].clone());
            let period = self.in_force().period;
            let recorded = record_new(client, leases, &p, period, None, None).await;
            let settled = match recorded {
                Ok(true) => settle_holder(client, events, None, &p.holder, "", &outcome).await,
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
            match settled {
                Ok(()) => report.already_paid += 1,
                Err(e) => failed_write(report, &format!("{:?}", p.holder), &e),
            }
        }
        if planned.is_empty() {
            return Ok(());
        }
        // A transaction moves one mint: each mint's payments are batched apart, with the
        // recipients' token accounts of that mint that are still missing.
        let mut by_mint: BTreeMap<Pubkey, Vec<Planned>> = BTreeMap::new();
        for p in planned {
            by_mint.entry(p.mint).or_default().push(p);
        }
        let mut mints: Vec<(Custody, HashSet<Pubkey>)> = Vec::new();
        let mut groups: Vec<(usize, Vec<Planned>)> = Vec::new();
        for (mint, planned) in by_mint {
            let custody = self.custody_of(mint).await?;
            let mut wallets: Vec<Pubkey> = planned
                .iter()
                .flat_map(|p| transaction::recipients(&custody.authority, &p.payment))
                .collect();
            wallets.sort();
            wallets.dedup();
            let missing = chain::wallets_without_token_account(&self.rpc, &wallets, &mint).await?;
            let payments: Vec<Payment> = planned.iter().map(|p| p.payment.clone()).collect();
            let batches = transaction::batches(&custody, payments, &missing)?;
            let mut planned = planned.into_iter();
            for batch in batches {
                groups.push((mints.len(), planned.by_ref().take(batch.len()).collect()));
            }
            mints.push((custody, missing));
        }
        // Transactions are independent (each pays what was planned for it out of what its
        // sources hold), so several go at once; every one still records before it sends.
        let sent: Vec<(Result<(), Error>, RoundReport)> = futures::stream::iter(groups)
            .map(|(mint, members)| {
                let (custody, missing) = &mints[mint];
                async move {
                    let mut part = RoundReport::default();
                    let result =
                        self.sign_record_send(client, custody, leases, members, missing, &mut part);
                    (result.await, part)
                }
            })
            .buffer_unordered(CONCURRENT_TRANSACTIONS)
            .collect()
            .await;
        let mut outcome = Ok(());
        for (result, part) in sent {
            *report += part;
            outcome = outcome.and(result);
        }
        outcome
    }

    /// Sign one transaction of `members`, record every payment in it, send it once all are
    /// recorded. When some could not be recorded (a lost race, an unwritable object), that
    /// transaction is never sent, and the ones recorded are signed again at once without the
    /// others (their records, naming a transaction nobody can send, are rewritten), so that one
    /// bad object does not hold up the payments it shares a transaction with.
    async fn sign_record_send(
        &self,
        client: &Client,
        custody: &Custody,
        leases: &HashMap<String, &GpuLease>,
        mut members: Vec<Planned>,
        missing: &HashSet<Pubkey>,
        report: &mut RoundReport,
    ) -> Result<(), Error> {
        let mut unsent: Option<String> = None;
        loop {
            let (blockhash, last_valid_block_height, slot) =
                chain::latest_blockhash_and_slot(&self.rpc).await?;
            let payments: Vec<Payment> = members.iter().map(|p| p.payment.clone()).collect();
            let tx = transaction::sign(
                &transaction::payout_instructions(custody, &payments, missing)?,
                &self.authority,
                blockhash,
            )?;
            let wire = transaction::wire_base64(&tx)?;
            let signature = tx.signatures.first().map(ToString::to_string);
            self.crash_if(CrashPoint::AfterSign)?;
            let recording: Vec<BoxFuture<'_, Result<bool, Error>>> = members
                .iter()
                .map(|member| {
                    let signed = SettlementRecord {
                        signature: signature.clone(),
                        last_valid_block_height: Some(last_valid_block_height),
                        signed_slot: Some(slot),
                        transaction: Some(wire.clone()),
                        ..member.record.clone()
                    };
                    let period = self.in_force().period;
                    record_new(client, leases, member, period, Some(signed), unsent.as_deref())
                        .boxed()
                })
                .collect();
            let results: Vec<Result<bool, Error>> =
                futures::stream::iter(recording).buffered(CONCURRENT_WRITES).collect().await;
            let mut recorded = Vec::new();
            for (member, result) in members.into_iter().zip(results) {
                match result {
                    Ok(true) => recorded.push(member),
                    Ok(false) => {}
                    Err(e) => failed_write(report, &format!("{:?}", member.holder), &e),
                }
            }
            self.crash_if(CrashPoint::AfterRecord)?;
            if recorded.len() == payments.len() {
                self.check_fence().await?;
                chain::send_wire(&self.rpc, &wire).await?;
                self.crash_if(CrashPoint::AfterSend)?;
                report.transactions_sent += 1;
                report.payouts_sent += recorded.len();
                return Ok(());
            }
            // Some payment of it is recorded elsewhere or not at all: this transaction must
            // never land (its recorded payments expire with it if nothing replaces them).
            tracing::warn!(
                ?signature,
                recorded = recorded.len(),
                of = payments.len(),
                "not every payment of a transaction could be recorded: not sent"
            );
            report.transactions_held += 1;
            if recorded.is_empty() || unsent.is_some() {
                return Ok(());
            }
            members = recorded;
            unsent = signature;
        }
    }

    async fn refund(
        &self,
        client: &Client,
        events: &ClusterEvents,
        refund: plan::Refund,
        report: &mut RoundReport,
    ) -> Result<(), Error> {
        self.check_fence().await?;
        let api: Api<GpuCluster> = Api::namespaced(client.clone(), &refund.namespace);
        let sources = HashMap::from([(refund.escrow, Some(refund.balance))]);
        if let Some(signature) = self.paid_keys(&sources).await?.get(&refund.uid) {
            tracing::warn!(cluster = %refund.name, "refund already on chain without its record: confirmed, not paid again");
            let found = FoundRefund { address: refund.escrow, signature, amount: refund.balance };
            let holder = (refund.namespace.clone(), refund.name.clone());
            match confirm_found_refund(client, events, &holder, &found).await {
                Ok(()) => report.already_paid += 1,
                Err(e) => failed_write(report, &refund.name, &e),
            }
            return Ok(());
        }
        let custody = self.custody_of(refund.mint).await?;
        let missing =
            chain::wallets_without_token_account(&self.rpc, &[refund.buyer], &refund.mint).await?;
        let ixs = transaction::refund_instructions(
            &custody,
            &refund.escrow,
            &refund.buyer,
            refund.balance,
            !missing.contains(&refund.buyer),
            &refund.uid,
        )?;
        let (blockhash, last_valid_block_height, slot) =
            chain::latest_blockhash_and_slot(&self.rpc).await?;
        let tx = transaction::sign(&ixs, &self.authority, blockhash)?;
        let wire = transaction::wire_base64(&tx)?;
        let record = SettlementRecord {
            signature: tx.signatures.first().map(ToString::to_string),
            last_valid_block_height: Some(last_valid_block_height),
            signed_slot: Some(slot),
            transaction: Some(wire.clone()),
            ..plan::new_record(REFUND_PERIOD.into(), Timestamp::now(), refund.balance)
        };
        match record_refund(&api, &refund.name, &refund.escrow, record).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                failed_write(report, &refund.name, &e);
                return Ok(());
            }
        }
        self.crash_if(CrashPoint::AfterRecord)?;
        self.check_fence().await?;
        chain::send_wire(&self.rpc, &wire).await?;
        report.refunds_sent += 1;
        Ok(())
    }

    /// Once per settlement period: sample each offer's heartbeat, write its reputation, and
    /// anchor the hash of the reputation table in a memo when it changed.
    async fn update_reputation(
        &self,
        client: &Client,
        custody: &Custody,
        leases: &[GpuLease],
        offers: &[GpuOffer],
        report: &mut RoundReport,
    ) -> Result<(), Error> {
        let in_force = self.in_force(); // before the state is locked again below
        let due =
            self.lock_state().last_reputation.is_none_or(|at| at.elapsed() >= in_force.period);
        if !due {
            return Ok(());
        }
        let offers_api: Api<GpuOffer> = Api::all(client.clone());
        let now = Timestamp::now();
        let heartbeat_timeout = in_force.heartbeat_timeout;
        let mut table: BTreeMap<String, gpumarket_crds::Reputation> = BTreeMap::new();
        for offer in offers {
            let name = offer.name_any();
            let status = offer.status.as_ref();
            // A node quarantined for offering a GPU another node offers too is sampled as
            // down: its reputation falls for as long as the clash lasts.
            let fresh = crate::market::supply::heartbeat_fresh(offer, now, heartbeat_timeout)
                && !crate::verification::quarantined(offer);
            let rep = reputation::assess(
                status.and_then(|s| s.reputation.as_ref()),
                fresh,
                reputation::outcomes(&name, leases),
                status.and_then(|s| s.proof_of_compute.as_ref()).map_or(0, |p| p.failed),
            );
            if status.and_then(|s| s.reputation.as_ref()) != Some(&rep) {
                let patch = json!({"status": {"reputation": rep}});
                if let Err(e) =
                    offers_api.patch_status(&name, &patch_params(), &Patch::Merge(&patch)).await
                {
                    failed_write(report, &name, &e.into());
                }
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
                &[&custody.authority],
            )];
            let (blockhash, _) = chain::latest_blockhash(&self.rpc).await?;
            let tx = transaction::sign(&ixs, &self.authority, blockhash)?;
            self.check_fence().await?;
            chain::send_wire(&self.rpc, &transaction::wire_base64(&tx)?).await?;
            tracing::info!(%hash, authority = %self.authority.pubkey(), "reputation table anchored");
        }
        let mut state = self.lock_state();
        state.anchored_hash = Some(hash);
        state.last_reputation = Some(Instant::now());
        Ok(())
    }
}

/// Record period of a refund.
pub const REFUND_PERIOD: &str = "refund";

async fn list(client: &Client) -> Result<Listed, Error> {
    let params = ListParams::default();
    Ok(Listed {
        leases: Api::<GpuLease>::all(client.clone()).list(&params).await?.items,
        clusters: Api::<GpuCluster>::all(client.clone()).list(&params).await?.items,
        offers: Api::<GpuOffer>::all(client.clone()).list(&params).await?.items,
    })
}

fn cluster_api(client: &Client, cluster: &GpuCluster) -> Api<GpuCluster> {
    Api::namespaced(client.clone(), &cluster.namespace().unwrap_or_default())
}

fn failed_write(report: &mut RoundReport, object: &str, error: &Error) {
    tracing::warn!(%object, error = %error, "settlement write failed; the round goes on");
    report.failed_writes += 1;
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(e) if e.code == 409)
}

/// Every recorded, unconfirmed transaction, by signature.
fn in_flight(listed: &Listed, authority: &Pubkey) -> BTreeMap<Signature, Flight> {
    let mut flights: BTreeMap<Signature, Flight> = BTreeMap::new();
    let mut add =
        |record: &SettlementRecord, holder: Holder, key: String, source: Option<Pubkey>| {
            let (Some(signature), Some(source)) =
                (record.signature.as_deref().and_then(|s| s.parse::<Signature>().ok()), source)
            else {
                return;
            };
            let flight = flights.entry(signature).or_default();
            flight.last_valid_block_height = record.last_valid_block_height.unwrap_or(0);
            flight.signed_slot = record.signed_slot.unwrap_or(0);
            flight.wire = flight.wire.take().or_else(|| record.transaction.clone());
            flight.recorded_keys.insert(key.clone());
            flight.payments.push((holder, key, source));
        };
    for lease in &listed.leases {
        let uid = lease.uid().unwrap_or_default();
        for record in lease
            .status
            .iter()
            .flat_map(|s| &s.settlements)
            .filter(|r| r.state == SettlementState::Signed)
        {
            let source = if record.period == SLASH_PERIOD {
                accounts::stake_address(authority, &lease.spec.offer)
            } else {
                accounts::escrow_address(authority, &lease.spec.cluster.uid)
            };
            let holder = Holder::Lease { name: lease.name_any(), period: record.period.clone() };
            add(record, holder, memo::payout_key(&uid, &record.period), source);
        }
    }
    for cluster in &listed.clusters {
        let Some(record) =
            plan::refund_record(cluster).filter(|r| r.state == SettlementState::Signed)
        else {
            continue;
        };
        let uid = cluster.uid().unwrap_or_default();
        let holder = Holder::Refund {
            namespace: cluster.namespace().unwrap_or_default(),
            name: cluster.name_any(),
        };
        add(record, holder, uid.clone(), accounts::escrow_address(authority, &uid));
    }
    for offer in &listed.offers {
        let node = offer.name_any();
        let records =
            offer.status.as_ref().and_then(|s| s.stake.as_ref()).map(|s| s.returns.as_slice());
        for record in
            records.unwrap_or_default().iter().filter(|r| r.state == SettlementState::Signed)
        {
            let holder = Holder::Stake { offer: node.clone(), period: record.period.clone() };
            add(
                record,
                holder,
                memo::stake_key(&node, &record.period),
                accounts::stake_address(authority, &node),
            );
        }
    }
    flights
}

/// Whether every payment a transaction's memo names is recorded with its signature (a
/// refund's memo names its own). A transaction without recorded bytes is never complete: it
/// can only expire.
fn is_complete(flight: &Flight) -> bool {
    let Some(memo_text) = flight.wire.as_deref().and_then(transaction::memo_of_wire) else {
        return false;
    };
    memo::settlement_keys(&memo_text)
        .is_some_and(|keys| keys.iter().all(|k| flight.recorded_keys.contains(*k)))
}

/// Record a planned payment where its holder keeps it, conditionally: only if the holder, read
/// fresh, still plans exactly this payment (no other record for it that may still pay, and for
/// a lease payout the same period and time, for no more than is due). `signed` is the record
/// to write (its transaction signed); `None` writes the planned record itself (a payment found
/// already made). A record of this settler's own naming `unsent` (a transaction it signed and
/// never sent, which nobody can send: see [`is_complete`]) may be replaced. Returns whether it
/// was written.
async fn record_new(
    client: &Client,
    leases: &HashMap<String, &GpuLease>,
    planned: &Planned,
    period: std::time::Duration,
    signed: Option<SettlementRecord>,
    unsent: Option<&str>,
) -> Result<bool, Error> {
    let record = signed.unwrap_or_else(|| planned.record.clone());
    let own = |r: &SettlementRecord| {
        unsent.is_some() && r.state == SettlementState::Signed && r.signature.as_deref() == unsent
    };
    match &planned.holder {
        Holder::Lease { name, .. } => {
            let Some(lease) = leases.get(name) else { return Ok(false) };
            let api: Api<GpuLease> = Api::all(client.clone());
            let mut current = (*lease).clone();
            for _ in 0..WRITE_ATTEMPTS {
                let mut view = current.clone();
                if let Some(status) = view.status.as_mut() {
                    status.settlements.retain(|r| !own(r));
                }
                if !still_due(&view, &record, period) {
                    return Ok(false);
                }
                let mut next = current.clone();
                upsert(next.status.get_or_insert_default(), record.clone());
                match replace_lease_status(&api, &next).await {
                    Ok(_) => return Ok(true),
                    Err(e) if is_conflict(&e) => current = api.get_status(name).await?,
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(false)
        }
        Holder::Stake { offer, period: what } => {
            let api: Api<GpuOffer> = Api::all(client.clone());
            for _ in 0..WRITE_ATTEMPTS {
                let current = api.get_status(offer).await?;
                let stake =
                    current.status.as_ref().and_then(|s| s.stake.clone()).unwrap_or_default();
                if stake
                    .returns
                    .iter()
                    .any(|r| &r.period == what && r.state != SettlementState::Expired && !own(r))
                {
                    return Ok(false);
                }
                let mut returns = stake.returns.clone();
                returns.retain(|r| &r.period != what);
                returns.push(record.clone());
                match patch_stake_returns(&api, &current, &returns).await {
                    Ok(()) => return Ok(true),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(false)
        }
        Holder::Refund { .. } => Ok(false),
    }
}

/// Whether a lease, read fresh, still plans `record`: no record of its period that may still
/// pay, and (for a payout) the same period and time due now, for at least its amount. `period`
/// is the one in force, for a lease without its own in its terms.
fn still_due(lease: &GpuLease, record: &SettlementRecord, period: std::time::Duration) -> bool {
    let period = crate::policy::terms::settlement_period(lease, period);
    let records = lease.status.as_ref().map_or(&[][..], |s| &s.settlements);
    if records.iter().any(|r| r.period == record.period && r.state != SettlementState::Expired) {
        return false;
    }
    if !is_payout_period(&record.period) {
        return true;
    }
    let due = next_due(
        &Meter::of(lease),
        &Paid::of(lease),
        period,
        record.through.0.max(Timestamp::now()),
    );
    due.is_some_and(|d| {
        d.period == record.period && d.through == record.through.0 && record.amount <= d.amount
    })
}

/// A refund on chain (its key in the escrow's history) that its cluster has no record of.
struct FoundRefund<'a> {
    address: Pubkey,
    signature: &'a str,
    amount: u64,
}

/// Record a refund found on chain as confirmed on the cluster (namespace, name): never paid
/// again.
async fn confirm_found_refund(
    client: &Client,
    events: &ClusterEvents,
    (namespace, name): &(String, String),
    found: &FoundRefund<'_>,
) -> Result<(), Error> {
    let api: Api<GpuCluster> = Api::namespaced(client.clone(), namespace);
    let record = SettlementRecord {
        signature: Some(found.signature.to_owned()),
        ..plan::new_record(REFUND_PERIOD.into(), Timestamp::now(), found.amount)
    };
    if !record_refund(&api, name, &found.address, record).await? {
        return Ok(());
    }
    let holder = Holder::Refund { namespace: namespace.clone(), name: name.clone() };
    let outcome = Outcome::Confirmed(found.signature.to_owned());
    settle_holder(client, events, None, &holder, found.signature, &outcome).await
}

/// Write a refund record on the cluster, conditionally: only while it has none that may still
/// pay. Returns whether it was written.
async fn record_refund(
    api: &Api<GpuCluster>,
    name: &str,
    escrow: &Pubkey,
    record: SettlementRecord,
) -> Result<bool, Error> {
    for _ in 0..WRITE_ATTEMPTS {
        let current = api.get_status(name).await?;
        if plan::refund_record(&current).is_some_and(|r| r.state != SettlementState::Expired) {
            return Ok(false);
        }
        match patch_refund(api, &current, &escrow.to_string(), &record, None).await {
            Ok(()) => return Ok(true),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Confirm or expire the record of `holder` made with `recorded` (its signature; empty for a
/// record written already confirmed), re-reading on conflicts. A record that has meanwhile
/// changed (another signature, no longer `Signed`) is left alone. `known` is a lease holder's
/// lease as last read, if the caller has it (one read less per payment when it is current).
async fn settle_holder(
    client: &Client,
    events: &ClusterEvents,
    known: Option<&GpuLease>,
    holder: &Holder,
    recorded: &str,
    outcome: &Outcome,
) -> Result<(), Error> {
    let matches = |r: &SettlementRecord| {
        r.state == SettlementState::Signed
            && (recorded.is_empty() || r.signature.as_deref() == Some(recorded))
    };
    let settled = |r: &SettlementRecord| match outcome {
        Outcome::Confirmed(signature) => SettlementRecord {
            state: SettlementState::Confirmed,
            signature: Some(signature.clone()),
            transaction: None,
            ..r.clone()
        },
        Outcome::Expired => {
            SettlementRecord { state: SettlementState::Expired, transaction: None, ..r.clone() }
        }
    };
    match holder {
        Holder::Lease { name, period } => {
            let api: Api<GpuLease> = Api::all(client.clone());
            let lease = match known {
                Some(lease) => lease.clone(),
                None => match api.get_opt(name).await? {
                    Some(lease) => lease,
                    None => return Ok(()),
                },
            };
            let (before, after) = match update_lease(&api, &lease, |status, meter| {
                let Some(record) =
                    status.settlements.iter().find(|r| &r.period == period && matches(r)).cloned()
                else {
                    return;
                };
                let record = settled(&record);
                match outcome {
                    Outcome::Confirmed(_) => confirm(status, meter, record),
                    Outcome::Expired => upsert(status, record),
                }
            })
            .await
            {
                Ok(updated) => updated,
                // Gone since it was listed: nothing left to record.
                Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => return Ok(()),
                Err(e) => return Err(e),
            };
            events.lease_changed(&before, &after);
        }
        Holder::Refund { namespace, name } => {
            let api: Api<GpuCluster> = Api::namespaced(client.clone(), namespace);
            for _ in 0..WRITE_ATTEMPTS {
                let Some(cluster) = api.get_opt(name).await? else { return Ok(()) };
                let Some(record) = plan::refund_record(&cluster).filter(|r| matches(r)).cloned()
                else {
                    return Ok(());
                };
                let record = settled(&record);
                let refunded = matches!(outcome, Outcome::Confirmed(_)).then_some(record.amount);
                let account = cluster
                    .status
                    .as_ref()
                    .and_then(|s| s.escrow.as_ref())
                    .map(|e| e.account.clone())
                    .unwrap_or_default();
                match patch_refund(&api, &cluster, &account, &record, refunded).await {
                    Ok(()) => {
                        if refunded.is_some() {
                            events.refunded(&cluster, &record).await;
                        }
                        return Ok(());
                    }
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Holder::Stake { offer, period } => {
            let api: Api<GpuOffer> = Api::all(client.clone());
            for _ in 0..WRITE_ATTEMPTS {
                let Some(current) = api.get_opt(offer).await? else { return Ok(()) };
                let Some(stake) = current.status.as_ref().and_then(|s| s.stake.clone()) else {
                    return Ok(());
                };
                let returns: Vec<SettlementRecord> = stake
                    .returns
                    .iter()
                    .map(|r| if &r.period == period && matches(r) { settled(r) } else { r.clone() })
                    .collect();
                if returns == stake.returns {
                    return Ok(());
                }
                match patch_stake_returns(&api, &current, &returns).await {
                    Ok(()) => return Ok(()),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// Merge-patch the cluster's refund record (and `amountRefunded`), conditional on the version
/// read.
async fn patch_refund(
    api: &Api<GpuCluster>,
    cluster: &GpuCluster,
    account: &str,
    record: &SettlementRecord,
    refunded: Option<u64>,
) -> Result<(), kube::Error> {
    let mut status = json!({"escrow": {"account": account, "refund": record}});
    if let Some(amount) = refunded {
        status["amountRefunded"] = json!(amount);
    }
    let patch = json!({"metadata": {"resourceVersion": cluster.metadata.resource_version}, "status": status});
    api.patch_status(&cluster.name_any(), &patch_params(), &Patch::Merge(&patch)).await.map(drop)
}

/// Merge-patch the offer's stake records, conditional on the version read.
async fn patch_stake_returns(
    api: &Api<GpuOffer>,
    offer: &GpuOffer,
    returns: &[SettlementRecord],
) -> Result<(), kube::Error> {
    let stake = offer.status.as_ref().and_then(|s| s.stake.clone()).unwrap_or_default();
    let patch = json!({
        "metadata": {"resourceVersion": offer.metadata.resource_version},
        "status": {"stake": {"account": stake.account, "bonded": stake.bonded, "returns": returns}},
    });
    api.patch_status(&offer.name_any(), &patch_params(), &Patch::Merge(&patch)).await.map(drop)
}

/// Insert the record of its period, or replace one that expired.
fn upsert(status: &mut GpuLeaseStatus, record: SettlementRecord) {
    match status.settlements.iter_mut().find(|r| r.period == record.period) {
        Some(existing) => *existing = record,
        None => status.settlements.push(record),
    }
}

/// A payment landed: the record is confirmed, the lease's totals follow and old confirmed
/// records are compacted.
fn confirm(status: &mut GpuLeaseStatus, meter: &Meter, record: SettlementRecord) {
    upsert(status, record);
    compact(status);
    let (confirmed, through) = {
        let paid = Paid::of_status(status);
        (paid.confirmed(), paid.confirmed_through())
    };
    status.amount_settled = Some(confirmed);
    status.settled_through = through.map(Time);
    if let Some(end) = meter.end {
        if fully_settled(meter, &Paid::of_status(status)) {
            status.phase = Some(LeasePhase::Settled);
        }
        status.served_gpu_seconds = Some(meter.gpu_seconds_through(end));
    }
}

/// An ended lease with nothing more to pay: Settled, with its meter's totals.
fn close(status: &mut GpuLeaseStatus, meter: &Meter) {
    if status.phase == Some(LeasePhase::Ended) && fully_settled(meter, &Paid::of_status(status)) {
        status.phase = Some(LeasePhase::Settled);
        status.amount_settled.get_or_insert(0);
    }
}

/// A record that moves no tokens, confirmed as it is written (if it is still due).
fn confirm_free(status: &mut GpuLeaseStatus, meter: &Meter, record: &SettlementRecord) {
    if status
        .settlements
        .iter()
        .any(|r| r.period == record.period && r.state != SettlementState::Expired)
    {
        return;
    }
    confirm(status, meter, record.clone());
}

/// Close an active lease's meter now, for lack of funds (an ended meter never moves).
fn end_now(status: &mut GpuLeaseStatus, now: Timestamp) {
    if status.end_time.is_none() {
        status.phase = Some(LeasePhase::Ended);
        status.end_time = Some(Time(now));
        status.end_reason = Some(EndReason::OutOfFunds);
    }
}

async fn replace_lease_status(
    api: &Api<GpuLease>,
    lease: &GpuLease,
) -> Result<GpuLease, kube::Error> {
    let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    let mut lease = lease.clone();
    lease.metadata.managed_fields = None;
    api.replace_status(&lease.name_any(), &params, &lease).await
}

/// Apply `change` to the lease's status (with the meter of the version it applies to) and
/// write it, conditional on the version read; on a conflict, read again and re-apply (every
/// change passed here is idempotent and checks what it changes). `lease` may be stale (from a
/// listing): a conflict is one more read. Returns the version changed and the one written.
async fn update_lease(
    api: &Api<GpuLease>,
    lease: &GpuLease,
    change: impl Fn(&mut GpuLeaseStatus, &Meter),
) -> Result<(GpuLease, GpuLease), Error> {
    let name = lease.name_any();
    let mut current = lease.clone();
    loop {
        let mut next = current.clone();
        change(next.status.get_or_insert_default(), &Meter::of(&current));
        let meter = Meter::of(&next);
        if let (Some(status), Some(end)) = (next.status.as_mut(), meter.end) {
            status.served_gpu_seconds.get_or_insert(meter.gpu_seconds_through(end));
            status.hired_gpu_seconds.get_or_insert(meter.hired_gpu_seconds_through(end));
        }
        if next.status == current.status {
            return Ok((current.clone(), current));
        }
        match replace_lease_status(api, &next).await {
            Ok(updated) => return Ok((current, updated)),
            Err(e) if is_conflict(&e) => current = api.get_status(&name).await?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A lease's name, and the versions its change applied to and wrote, or the error.
type LeaseWrite = (String, Result<(GpuLease, GpuLease), Error>);

/// [`update_lease`] on many leases at once, each with its own change: the versions changed and
/// written, the failures counted in `report`.
async fn update_leases<'a, C>(
    api: &'a Api<GpuLease>,
    changes: Vec<(&'a GpuLease, C)>,
    report: &mut RoundReport,
) -> Vec<(GpuLease, GpuLease)>
where
    C: Fn(&mut GpuLeaseStatus, &Meter) + Send + 'a,
{
    // Boxed, so that the round stays `Send` (see `a_round_is_send`).
    let writes: Vec<BoxFuture<'a, LeaseWrite>> = changes
        .into_iter()
        .map(|(lease, change)| {
            async move { (lease.name_any(), update_lease(api, lease, change).await) }.boxed()
        })
        .collect();
    let written: Vec<LeaseWrite> =
        futures::stream::iter(writes).buffer_unordered(CONCURRENT_WRITES).collect().await;
    let mut updated = Vec::new();
    for (name, result) in written {
        match result {
            Ok(versions) => updated.push(versions),
            Err(e) => failed_write(report, &name, &e),
        }
    }
    updated
}

/// Each cluster's amountSettled: the confirmed payouts of all its leases; its costAccrued is
/// raised with it to the cost through `now`, so that what the buyer was charged never reads
/// higher than what it cost (the reconcile refreshes the cost only every few minutes).
async fn publish_cluster_totals(
    client: &Client,
    leases: &[GpuLease],
    clusters: &[GpuCluster],
    now: Timestamp,
    report: &mut RoundReport,
) {
    let mut totals: HashMap<&str, (u64, u64)> = HashMap::new();
    for lease in leases {
        let (settled, cost) = totals.entry(lease.spec.cluster.uid.as_str()).or_default();
        *settled += Paid::of(lease).confirmed();
        *cost += crate::cluster::status::lease_cost(lease, now);
    }
    for cluster in clusters {
        let uid = cluster.metadata.uid.as_deref().unwrap_or_default();
        let Some((total, cost)) = totals.get(uid).copied() else { continue };
        let status = cluster.status.as_ref();
        if status.and_then(|s| s.amount_settled) != Some(total) {
            let cost = cost.max(status.and_then(|s| s.cost_accrued).unwrap_or(0));
            let patch = json!({"status": {"amountSettled": total, "costAccrued": cost}});
            let api = cluster_api(client, cluster);
            if let Err(e) =
                api.patch_status(&cluster.name_any(), &patch_params(), &Patch::Merge(&patch)).await
            {
                failed_write(report, &cluster.name_any(), &e.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease, now};

    /// A round runs on any runtime thread (`tokio::spawn`): its future is `Send`.
    #[allow(dead_code)]
    fn a_round_is_send(settler: &'static Settler, client: &'static Client) {
        fn send<T: Send>(_: T) {}
        send(settler.settle_round(client));
    }
    use solana_keypair::Keypair;
    use solana_transaction::Hash;

    fn signed_payout(keys: &[String]) -> (String, String) {
        let authority = Keypair::new();
        let custody =
            Custody { authority: authority.pubkey(), mint: Keypair::new().pubkey(), decimals: 6 };
        let payments: Vec<Payment> = keys
            .iter()
            .map(|k| Payment {
                key: k.clone(),
                source: Pubkey::new_unique(),
                wallet: Keypair::new().pubkey(),
                amount: 5,
                fee: 0,
            })
            .collect();
        let ixs =
            transaction::payout_instructions(&custody, &payments, &HashSet::new()).expect("ixs");
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
            conversion: None,
            signature: Some(signature.into()),
            last_valid_block_height: Some(77),
            signed_slot: Some(70),
            transaction: Some(wire.into()),
            state: SettlementState::Signed,
        }
    }

    fn listed(leases: Vec<GpuLease>) -> Listed {
        Listed { leases, clusters: Vec::new(), offers: Vec::new() }
    }

    #[test]
    fn a_batch_is_complete_only_when_every_payout_in_it_is_recorded() {
        let keys = [memo::payout_key("a-uid", "0001"), memo::payout_key("b-uid", "0001")];
        let (signature, wire) = signed_payout(&keys);
        let authority = Pubkey::new_unique();
        let both = listed(vec![
            lease_with("a", Some(signed("0001", &signature, &wire))),
            lease_with("b", Some(signed("0001", &signature, &wire))),
        ]);
        let flights = in_flight(&both, &authority);
        assert_eq!(flights.len(), 1);
        let flight = flights.values().next().expect("one flight");
        assert_eq!(
            (flight.payments.len(), flight.last_valid_block_height, flight.signed_slot),
            (2, 77, 70)
        );
        assert!(is_complete(flight));
        let escrow = accounts::escrow_address(&authority, "c-0000-uid");
        assert!(flight.payments.iter().all(|(_, _, source)| Some(*source) == escrow));

        // A crash (or a lost write race) between the two records: b's payout is unrecorded and
        // will be planned again, so this transaction must never be sent.
        let partial = listed(vec![
            lease_with("a", Some(signed("0001", &signature, &wire))),
            lease_with("b", None),
        ]);
        let flights = in_flight(&partial, &authority);
        assert!(!is_complete(flights.values().next().expect("one flight")));
    }

    #[test]
    fn confirming_the_last_payout_settles_an_ended_lease() {
        let mut lease = lease_with("a", None);
        lease.spec.price_per_gpu_hour = 3600;
        let status = lease.status.get_or_insert_default();
        status.phase = Some(LeasePhase::Ended);
        status.serving_since = Some(Time(now()));
        status.end_time =
            Some(Time(Timestamp::from_second(now().as_second() + 90).expect("valid")));
        let meter = Meter::of(&lease);
        let status = lease.status.get_or_insert_default();
        let mut first = signed("0001", "s1", "w1");
        first.through = Time(Timestamp::from_second(now().as_second() + 60).expect("valid"));
        first.amount = 60;
        confirm(
            status,
            &meter,
            SettlementRecord { state: SettlementState::Confirmed, transaction: None, ..first },
        );
        assert_eq!(status.amount_settled, Some(60));
        assert_eq!(status.phase, Some(LeasePhase::Ended));

        let mut last = signed("0002", "s2", "w2");
        last.through = status.end_time.clone().expect("ended");
        last.amount = 30;
        confirm(
            status,
            &meter,
            SettlementRecord { state: SettlementState::Confirmed, transaction: None, ..last },
        );
        assert_eq!(status.amount_settled, Some(90));
        assert_eq!(status.served_gpu_seconds, Some(90));
        assert_eq!(status.phase, Some(LeasePhase::Settled));
        assert_eq!(status.settlements.len(), 2);
    }

    #[test]
    fn a_record_is_written_only_while_the_fresh_lease_still_plans_it() {
        let period = std::time::Duration::from_secs(60);
        let mut lease = lease_with("a", None);
        lease.spec.price_per_gpu_hour = 3600;
        let start = Timestamp::from_second(Timestamp::now().as_second() - 100).expect("valid");
        lease.spec.start_time = Time(start);
        lease.status.get_or_insert_default().serving_since = Some(Time(start));
        let due =
            next_due(&Meter::of(&lease), &Paid::of(&lease), period, Timestamp::now()).expect("due");
        let record = plan::new_record(due.period.clone(), due.through, due.amount);
        assert!(still_due(&lease, &record, period));

        // Another settler recorded it first: never replaced.
        let mut raced = lease.clone();
        raced
            .status
            .get_or_insert_default()
            .settlements
            .push(SettlementRecord { signature: Some("other".into()), ..record.clone() });
        assert!(!still_due(&raced, &record, period));
        // ...unless that record provably expired.
        raced.status.get_or_insert_default().settlements[0].state = SettlementState::Expired;
        assert!(still_due(&raced, &record, period));

        // The lease ended meanwhile, before the period boundary: the planned amount is stale.
        let mut ended = lease.clone();
        ended.status.get_or_insert_default().end_time =
            Some(Time(Timestamp::from_second(start.as_second() + 30).expect("valid")));
        assert!(!still_due(&ended, &record, period));
    }

    #[test]
    fn out_of_funds_closes_the_meter_once() {
        let mut status = GpuLeaseStatus { phase: Some(LeasePhase::Active), ..Default::default() };
        end_now(&mut status, now());
        assert_eq!(status.end_reason, Some(EndReason::OutOfFunds));
        let later = Timestamp::from_second(now().as_second() + 5).expect("valid");
        end_now(&mut status, later);
        assert_eq!(status.end_time, Some(Time(now())), "an ended meter never moves");
        let mut failed = GpuLeaseStatus {
            end_reason: Some(EndReason::SupplierFailure),
            end_time: Some(Time(now())),
            ..Default::default()
        };
        end_now(&mut failed, later);
        assert_eq!(failed.end_reason, Some(EndReason::SupplierFailure), "never flips a reason");
    }
}
