//! Proof of compute, the controller's side: idle offers are challenged every interval to
//! multiply seeded matrices on each GPU (`gpumarket_crds::proof`), within a deadline the claimed
//! models' throughput allows; the controller picks rows to reveal only after the agent
//! committed, and checks them by Merkle proof and Freivalds' test. A late, incomplete or wrong
//! answer sets `ComputeVerified` to False (the offer is then not matched), counts as a failure
//! in the tally that lowers reputation, and raises a Warning Event. GPUs under a lease are never
//! challenged: a challenge in flight when a lease arrives is withdrawn without a verdict.
//!
//! [`next_step`] and [`verify`] are pure; [`advance`] is the wiring, called from the offer
//! reconcile, which runs again whenever the agent writes its answer.

use std::collections::BTreeMap;
use std::time::Duration;

use gpumarket_crds::proof::{
    COMPUTE_VERIFIED, ProductSize, ProductTask, RowPick, decode_row, freivalds, verify_row,
};
use gpumarket_crds::{ComputeAnswer, ComputeChallenge, GpuOffer, ProofOfCompute};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use rand::Rng;
use serde_json::json;

use crate::cluster::status::set_condition;
use crate::error::Result;
use crate::market::supply::{free_gpus, gpu_lease};
use crate::runtime::context::Context;

/// Field manager of the proof-of-compute writes: apart from the offer controller's, so that
/// neither's apply drops the other's fields.
pub const PROOF_MANAGER: &str = "gpumarket-controller-proof";

/// Rows revealed per challenge. An agent that computed a share f of the rows and made up the
/// rest passes with probability f^8 (half the rows: 1 in 256).
pub const REVEALED_ROWS: usize = 8;

/// How often and how hard offers are challenged.
#[derive(Clone, Debug, PartialEq)]
pub struct ProofSettings {
    /// An idle offer is challenged again this long after its last verdict.
    pub interval: Duration,
    /// Added to every deadline: the round trips through the API server.
    pub grace: Duration,
    /// Multiply-adds per second of the fastest model (relative throughput 1000): deadlines
    /// scale from it by the claimed model's [`relative_throughput`].
    pub reference_ops_per_second: u64,
    /// Largest matrix side asked for, whatever the GPU's memory.
    pub max_dimension: u32,
    /// Challenges failed in a row before the offer is refused (`ComputeVerified=False`).
    pub failures_before_unverified: u32,
    /// Relative throughput of models, per mille of an H100, where the market's policy gives it
    /// (its accepted models); other models' come from [`relative_throughput`]'s table.
    pub throughput_permille: BTreeMap<String, u32>,
}

impl Default for ProofSettings {
    fn default() -> Self {
        ProofSettings {
            interval: Duration::from_secs(3600),
            grace: Duration::from_secs(10),
            // An H100 multiplies 16-bit integer matrices at roughly this rate.
            reference_ops_per_second: 50_000_000_000_000,
            max_dimension: 512,
            failures_before_unverified: 1,
            throughput_permille: BTreeMap::new(),
        }
    }
}

/// Dense FP16 tensor throughput of a model, in per mille of an H100 SXM (989 TFLOPS): the
/// claimed model's deadline stretches by its inverse. Unknown models get the most lenient.
pub fn relative_throughput(model: &str) -> u32 {
    match model.to_ascii_uppercase().as_str() {
        "H100" | "H200" | "GH200" | "B200" => 1000,
        "L40S" => 366,
        "A100" => 315,
        "L40" => 183,
        "RTX4090" => 167,
        "A6000" => 157,
        "A10" | "A10G" => 126,
        "RTX3090" => 72,
        _ => 50,
    }
}

/// Matrix side for a GPU of `memory_mib`: 64 per 8 GiB, at least 64, at most `max`.
pub fn dimension(memory_mib: u64, max: u32) -> u32 {
    let by_memory = u32::try_from(memory_mib.div_ceil(8 * 1024) * 64).unwrap_or(u32::MAX);
    by_memory.max(64).min(max.clamp(1, gpumarket_crds::proof::MAX_DIMENSION))
}

/// How long a GPU of `model` takes for a product of side `n` at the claimed throughput (the
/// policy's for the model, else the table's).
pub fn compute_time(model: &str, n: u32, settings: &ProofSettings) -> Duration {
    let operations = 2.0 * f64::from(n).powi(3);
    let permille = settings
        .throughput_permille
        .get(model)
        .copied()
        .unwrap_or_else(|| relative_throughput(model));
    let rate = settings.reference_ops_per_second as f64 * f64::from(permille) / 1000.0;
    Duration::try_from_secs_f64(operations / rate.max(1.0)).unwrap_or(Duration::MAX)
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d).ok().and_then(|d| t.checked_add(d).ok()).unwrap_or(Timestamp::MAX)
}

/// A verdict on a challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub passed: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    fn fail(reason: &'static str, message: String) -> Self {
        Verdict { passed: false, reason, message }
    }
}

/// What to do about an offer's proof of compute now.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing in flight; the next challenge is due at the time given (never when `None`).
    Idle(Option<Timestamp>),
    /// Issue this challenge.
    Issue(ComputeChallenge),
    /// The agent committed in time: ask for these rows (the challenge with `reveal` set).
    Reveal(ComputeChallenge),
    /// Waiting for the agent until this deadline.
    Waiting(Timestamp),
    /// The challenge is decided.
    Decide(Verdict),
    /// Drop the challenge, no verdict: a lease arrived while it was in flight, or its deadline
    /// passed while no controller watched (a leader down or changing), so whether the agent
    /// was late cannot be told; the next one is issued as if it had passed.
    Withdraw,
}

/// Whether the offer's GPUs are all unleased (a leased GPU is checked by its served uptime).
fn idle(offer: &GpuOffer) -> bool {
    offer.spec.gpus.iter().all(|g| gpu_lease(offer, &g.uuid).is_none())
}

/// Whether the offer failed its last challenge: it is then not matched.
pub fn compute_refused(offer: &GpuOffer) -> bool {
    offer.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| c.type_ == COMPUTE_VERIFIED && c.status == "False")
    })
}

/// A new challenge for every free GPU of the offer, its deadline set by the slowest claimed
/// model among them.
pub fn challenge(
    offer: &GpuOffer,
    now: Timestamp,
    settings: &ProofSettings,
    rng: &mut impl Rng,
) -> ComputeChallenge {
    let free = free_gpus(offer);
    let gpus = offer.spec.gpus.iter().filter(|g| free.contains(&g.uuid));
    let mut slowest = Duration::ZERO;
    let products = gpus
        .map(|g| {
            let n = dimension(g.memory_mib, settings.max_dimension);
            slowest = slowest.max(compute_time(&g.model, n, settings));
            ProductSize { uuid: g.uuid.clone(), dimension: n }
        })
        .collect();
    let nonce: String = (0..32).map(|_| format!("{:02x}", rng.random::<u8>())).collect();
    ComputeChallenge {
        nonce,
        products,
        issued: MicroTime(now),
        deadline: MicroTime(after(now, settings.grace.saturating_add(slowest))),
        committed: None,
        reveal: Vec::new(),
        reveal_deadline: None,
    }
}

/// The step the offer's proof of compute is at. `available` is the offer's `Available`
/// verdict of this reconcile; `watched_since` is when this controller started watching offers:
/// a deadline that passed before then is not held against the agent (when it answered is
/// known only from watching; the object keeps no time the agent cannot write).
pub fn next_step(
    offer: &GpuOffer,
    available: bool,
    now: Timestamp,
    watched_since: Timestamp,
    settings: &ProofSettings,
    rng: &mut impl Rng,
) -> Step {
    let status = offer.status.as_ref();
    let proof = status.and_then(|s| s.proof_of_compute.as_ref());
    let Some(challenge) = proof.and_then(|p| p.challenge.as_ref()) else {
        if !available || !idle(offer) || free_gpus(offer).is_empty() {
            return Step::Idle(None);
        }
        let due =
            proof.and_then(|p| p.last_verdict.as_ref()).map(|t| after(t.0, settings.interval));
        return match due {
            Some(due) if due > now => Step::Idle(Some(due)),
            _ => Step::Issue(self::challenge(offer, now, settings, rng)),
        };
    };
    if !idle(offer) {
        return Step::Withdraw;
    }
    let answer =
        status.and_then(|s| s.compute_answer.as_ref()).filter(|a| a.nonce == challenge.nonce);
    let unwatched = |deadline: &MicroTime| deadline.0 < watched_since;
    if challenge.reveal.is_empty() {
        let late = now > challenge.deadline.0;
        if late && unwatched(&challenge.deadline) {
            return Step::Withdraw;
        }
        let allowed = challenge.deadline.0.duration_since(challenge.issued.0);
        return match answer {
            None if late => Step::Decide(Verdict::fail(
                "Late",
                format!(
                    "no commitment to the challenge's products within {:.1}s (the time its \
                     claimed GPUs need, plus grace)",
                    allowed.as_secs_f64()
                ),
            )),
            None => Step::Waiting(challenge.deadline.0),
            Some(_) if late => Step::Decide(Verdict::fail(
                "Late",
                format!(
                    "the commitment came after the {:.1}s its claimed GPUs need (plus grace)",
                    allowed.as_secs_f64()
                ),
            )),
            Some(answer) => match missing_commitment(challenge, answer) {
                Some(uuid) => Step::Decide(Verdict::fail(
                    "Incomplete",
                    format!("the answer commits to no product of GPU {uuid}"),
                )),
                None => Step::Reveal(ComputeChallenge {
                    committed: Some(MicroTime(now)),
                    reveal: pick_rows(challenge, rng),
                    reveal_deadline: Some(MicroTime(after(now, settings.grace))),
                    ..challenge.clone()
                }),
            },
        };
    }
    let revealed = answer.filter(|a| !a.rows.is_empty());
    match revealed {
        Some(answer) => Step::Decide(match verify(&offer.name_any(), challenge, answer, rng) {
            Ok(()) => Verdict {
                passed: true,
                reason: "Verified",
                message: format!(
                    "{} GPUs computed their products in time; {} revealed rows checked",
                    challenge.products.len(),
                    challenge.reveal.len()
                ),
            },
            Err(why) => Verdict::fail("WrongAnswer", why),
        }),
        None => match &challenge.reveal_deadline {
            Some(deadline) if now <= deadline.0 => Step::Waiting(deadline.0),
            Some(deadline) if unwatched(deadline) => Step::Withdraw,
            _ => Step::Decide(Verdict::fail(
                "Late",
                "the rows asked for were not revealed in time".into(),
            )),
        },
    }
}

fn missing_commitment<'a>(
    challenge: &'a ComputeChallenge,
    answer: &ComputeAnswer,
) -> Option<&'a str> {
    challenge
        .products
        .iter()
        .find(|p| !answer.commitments.iter().any(|c| c.uuid == p.uuid))
        .map(|p| p.uuid.as_str())
}

/// [`REVEALED_ROWS`] rows picked at random among all products (distinct).
fn pick_rows(challenge: &ComputeChallenge, rng: &mut impl Rng) -> Vec<RowPick> {
    let total: u64 = challenge.products.iter().map(|p| u64::from(p.dimension)).sum();
    let mut picks = std::collections::BTreeSet::new();
    let wanted = REVEALED_ROWS.min(usize::try_from(total).unwrap_or(usize::MAX));
    while picks.len() < wanted {
        let mut index = rng.random_range(0..total);
        for product in &challenge.products {
            let n = u64::from(product.dimension);
            if index < n {
                let row = u32::try_from(index).unwrap_or(0);
                picks.insert(RowPick { uuid: product.uuid.clone(), row });
                break;
            }
            index -= n;
        }
    }
    picks.into_iter().collect()
}

/// Checks the revealed rows of `answer` against its commitments and, by Freivalds' test with a
/// fresh random vector, against the matrices of `offer`'s challenge. The error says what failed.
pub fn verify(
    offer: &str,
    challenge: &ComputeChallenge,
    answer: &ComputeAnswer,
    rng: &mut impl Rng,
) -> std::result::Result<(), String> {
    let mut by_gpu: BTreeMap<&str, Vec<(usize, Vec<u64>)>> = BTreeMap::new();
    for pick in &challenge.reveal {
        let RowPick { uuid, row } = pick;
        let product = challenge
            .products
            .iter()
            .find(|p| p.uuid == *uuid)
            .ok_or_else(|| format!("row {row} of GPU {uuid}: no such product"))?;
        let n = product.dimension as usize;
        let root = answer
            .commitments
            .iter()
            .find(|c| c.uuid == *uuid)
            .ok_or_else(|| format!("no commitment for GPU {uuid}"))?;
        let revealed = answer
            .rows
            .iter()
            .find(|r| r.uuid == *uuid && r.row == *row)
            .ok_or_else(|| format!("row {row} of GPU {uuid} was asked for and not revealed"))?;
        if !verify_row(&root.root, n, *row, &revealed.values, &revealed.proof) {
            return Err(format!("row {row} of GPU {uuid} does not match its commitment"));
        }
        let values = decode_row(&revealed.values, n)
            .ok_or_else(|| format!("row {row} of GPU {uuid} is not {n} entries"))?;
        by_gpu.entry(uuid).or_default().push((*row as usize, values));
    }
    for (uuid, rows) in by_gpu {
        let n = rows.first().map_or(0, |(_, v)| v.len());
        let task = ProductTask::new(&challenge.nonce, offer, uuid, n as u32);
        let r: Vec<u64> =
            (0..n).map(|_| rng.random_range(0..gpumarket_crds::proof::MODULUS)).collect();
        if !freivalds(&task, &rows, &r) {
            let listed: Vec<String> = rows.iter().map(|(i, _)| i.to_string()).collect();
            return Err(format!(
                "rows {} of GPU {uuid} are not rows of this challenge's product for this node",
                listed.join(", ")
            ));
        }
    }
    Ok(())
}

/// The offer's proof-of-compute status after `step`, with its `ComputeVerified` condition:
/// everything this manager owns, as every apply must carry it. `None` when nothing changes. A
/// failure refuses the offer once `failures_before_unverified` came in a row.
fn next_status(
    offer: &GpuOffer,
    step: &Step,
    now: Timestamp,
    failures_before_unverified: u32,
) -> Option<(ProofOfCompute, Option<Condition>)> {
    let status = offer.status.clone().unwrap_or_default();
    let mut proof = status.proof_of_compute.clone().unwrap_or_default();
    let mut conditions: Vec<Condition> =
        status.conditions.into_iter().filter(|c| c.type_ == COMPUTE_VERIFIED).collect();
    match step {
        Step::Idle(_) | Step::Waiting(_) => return None,
        Step::Issue(challenge) | Step::Reveal(challenge) => {
            proof.challenge = Some(challenge.clone())
        }
        Step::Withdraw => proof.challenge = None,
        Step::Decide(verdict) => {
            proof.challenge = None;
            proof.last_verdict = Some(Time(now));
            if verdict.passed {
                proof.passed += 1;
                proof.failed_in_a_row = 0;
            } else {
                proof.failed += 1;
                proof.failed_in_a_row += 1;
            }
            let allowed = u64::from(failures_before_unverified.max(1));
            let refused = !verdict.passed && proof.failed_in_a_row >= allowed;
            let (reason, message) = if verdict.passed || refused {
                (verdict.reason, verdict.message.clone())
            } else {
                let message = format!(
                    "{}; {} of the {allowed} failed challenges in a row the market allows",
                    verdict.message, proof.failed_in_a_row
                );
                ("FailureTolerated", message)
            };
            let generation = offer.metadata.generation;
            set_condition(
                &mut conditions,
                COMPUTE_VERIFIED,
                !refused,
                reason,
                message,
                now,
                generation,
            );
        }
    }
    Some((proof, conditions.pop()))
}

/// Moves the offer's proof of compute one step; when to look again (the pending deadline or the
/// next challenge), if ever. Off without proof settings.
pub async fn advance(offer: &GpuOffer, available: bool, ctx: &Context) -> Result<Option<Duration>> {
    let Some(settings) = ctx.settings().proof_of_compute else { return Ok(None) };
    let settings = &settings;
    let now = Timestamp::now();
    let step = next_step(offer, available, now, ctx.started, settings, &mut rand::rng());
    let wake = |at: Timestamp| at.duration_since(now).unsigned_abs() + Duration::from_millis(100);
    let allowed = settings.failures_before_unverified;
    if let Some((proof, condition)) = next_status(offer, &step, now, allowed) {
        let patch = json!({
            "apiVersion": "gpumarket.io/v1alpha1",
            "kind": "GpuOffer",
            "status": {"proofOfCompute": proof, "conditions": condition.into_iter().collect::<Vec<_>>()},
        });
        Api::<GpuOffer>::all(ctx.client.clone())
            .patch_status(
                &offer.name_any(),
                &PatchParams::apply(PROOF_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        if let Step::Decide(verdict) = &step {
            tracing::info!(offer = %offer.name_any(), passed = verdict.passed, reason = verdict.reason, "proof of compute decided");
            if !verdict.passed {
                let reason = format!("ComputeChallenge{}", verdict.reason);
                let note = verdict.message.clone();
                ctx.event(offer, EventType::Warning, &reason, "VerifyCompute", note).await;
            }
        }
    }
    Ok(match step {
        Step::Idle(due) => due.map(wake),
        Step::Waiting(deadline) => Some(wake(deadline)),
        Step::Issue(challenge) => Some(wake(challenge.deadline.0)),
        Step::Reveal(challenge) => challenge.reveal_deadline.map(|t| wake(t.0)),
        Step::Decide(_) | Step::Withdraw => Some(settings.interval),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_offer, now};
    use gpumarket_crds::proof::{Commitment, RevealedRow, RowTree, encode_row};
    use gpumarket_crds::{GpuHealth, GpuState};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// The controller of most tests watched every deadline.
    const WATCHED: Timestamp = Timestamp::MIN;

    fn settings() -> ProofSettings {
        ProofSettings {
            interval: Duration::from_secs(60),
            grace: Duration::from_secs(2),
            reference_ops_per_second: 1_000_000,
            max_dimension: 32,
            ..ProofSettings::default()
        }
    }

    fn secs(s: i64) -> Timestamp {
        now() + SignedDuration::from_secs(s)
    }

    /// An agent's answer: computed for `as_offer` (the offer challenged, or another one), its
    /// rows then changed by `cheat`, and committed to.
    fn commit(
        challenge: &ComputeChallenge,
        as_offer: &str,
        cheat: impl Fn(&mut Vec<Vec<String>>),
    ) -> (ComputeAnswer, Vec<Vec<String>>) {
        let mut products: Vec<Vec<String>> = challenge
            .products
            .iter()
            .map(|p| {
                let task = ProductTask::new(&challenge.nonce, as_offer, &p.uuid, p.dimension);
                task.multiply().iter().map(|r| encode_row(r)).collect()
            })
            .collect();
        cheat(&mut products);
        let commitments = (challenge.products.iter().zip(&products))
            .map(|(p, rows)| Commitment { uuid: p.uuid.clone(), root: RowTree::new(rows).root() })
            .collect();
        (ComputeAnswer { nonce: challenge.nonce.clone(), commitments, rows: Vec::new() }, products)
    }

    fn reveal(challenge: &ComputeChallenge, answer: &mut ComputeAnswer, products: &[Vec<String>]) {
        for pick in &challenge.reveal {
            let index =
                challenge.products.iter().position(|p| p.uuid == pick.uuid).expect("a product");
            let rows = &products[index];
            answer.rows.push(RevealedRow {
                uuid: pick.uuid.clone(),
                row: pick.row,
                values: rows[pick.row as usize].clone(),
                proof: RowTree::new(rows).proof(pick.row as usize),
            });
        }
    }

    /// Runs `offer` through issue → commit at `commit_at` → reveal, with `cheat` applied to
    /// the answer before the rows are revealed; the verdict.
    fn run(
        offer: &mut GpuOffer,
        commit_at: i64,
        as_offer: &str,
        cheat: impl Fn(&mut Vec<Vec<String>>),
    ) -> Verdict {
        let mut rng = StdRng::seed_from_u64(7);
        let s = settings();
        let Step::Issue(challenge) = next_step(offer, true, now(), WATCHED, &s, &mut rng) else {
            panic!("no challenge")
        };
        let status = offer.status.get_or_insert_default();
        status.proof_of_compute =
            Some(ProofOfCompute { challenge: Some(challenge.clone()), ..Default::default() });
        let (mut answer, products) = commit(&challenge, as_offer, cheat);
        let status = offer.status.get_or_insert_default();
        status.compute_answer = Some(answer.clone());
        let challenge = match next_step(offer, true, secs(commit_at), WATCHED, &s, &mut rng) {
            Step::Reveal(c) => c,
            Step::Decide(verdict) => return verdict,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(challenge.reveal.len(), REVEALED_ROWS);
        reveal(&challenge, &mut answer, &products);
        let status = offer.status.get_or_insert_default();
        status.proof_of_compute =
            Some(ProofOfCompute { challenge: Some(challenge), ..Default::default() });
        status.compute_answer = Some(answer);
        match next_step(offer, true, secs(commit_at + 1), WATCHED, &s, &mut rng) {
            Step::Decide(verdict) => verdict,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_honest_answer_in_time_is_verified() {
        let mut offer = mk_offer("n", "H100", 2, now());
        let verdict = run(&mut offer, 1, "n", |_| {});
        assert_eq!((verdict.passed, verdict.reason), (true, "Verified"), "{}", verdict.message);
    }

    #[test]
    fn a_wrong_product_fails_even_when_its_commitment_is_consistent() {
        let mut offer = mk_offer("n", "H100", 1, now());
        // Every row made up (the commitment is over the made-up rows).
        let verdict = run(&mut offer, 1, "n", |products| {
            for row in products.iter_mut().flatten() {
                *row = encode_row(&vec![1; row.len() / 4]);
            }
        });
        assert_eq!(verdict.reason, "WrongAnswer");
        assert!(
            verdict.message.contains("not rows of this challenge's product"),
            "{}",
            verdict.message
        );
    }

    #[test]
    fn a_row_changed_after_the_commitment_fails_its_merkle_proof() {
        let offer = mk_offer("n", "H100", 1, now());
        let mut rng = StdRng::seed_from_u64(1);
        let Step::Issue(mut challenge) =
            next_step(&offer, true, now(), WATCHED, &settings(), &mut rng)
        else {
            panic!()
        };
        let (mut answer, products) = commit(&challenge, "n", |_| {});
        challenge.reveal = vec![RowPick { uuid: challenge.products[0].uuid.clone(), row: 3 }];
        reveal(&challenge, &mut answer, &products);
        answer.rows[0].values = encode_row(&vec![0; challenge.products[0].dimension as usize]);
        let error = verify("n", &challenge, &answer, &mut rng).expect_err("tampered");
        assert!(error.contains("does not match its commitment"), "{error}");
    }

    #[test]
    fn another_nodes_answer_fails() {
        let mut offer = mk_offer("n", "H100", 1, now());
        let verdict = run(&mut offer, 1, "other-node", |_| {});
        assert_eq!(verdict.reason, "WrongAnswer", "{}", verdict.message);
    }

    #[test]
    fn a_late_or_missing_commitment_fails() {
        // 32³·2 operations at 1e6/s take 0.07s on an H100; with the grace the deadline is ~2.1s.
        let mut offer = mk_offer("n", "H100", 1, now());
        let verdict = run(&mut offer, 3, "n", |_| {});
        assert_eq!(verdict.reason, "Late");
        assert!(verdict.message.contains("came after"), "{}", verdict.message);

        let mut silent = mk_offer("n", "H100", 1, now());
        let mut rng = StdRng::seed_from_u64(1);
        let Step::Issue(challenge) =
            next_step(&silent, true, now(), WATCHED, &settings(), &mut rng)
        else {
            panic!()
        };
        let deadline = challenge.deadline.0;
        silent.status.get_or_insert_default().proof_of_compute =
            Some(ProofOfCompute { challenge: Some(challenge), ..Default::default() });
        assert_eq!(
            next_step(&silent, true, secs(1), WATCHED, &settings(), &mut rng),
            Step::Waiting(deadline)
        );
        let Step::Decide(verdict) =
            next_step(&silent, true, secs(3), WATCHED, &settings(), &mut rng)
        else {
            panic!()
        };
        assert!(verdict.message.starts_with("no commitment"), "{}", verdict.message);
    }

    #[test]
    fn a_deadline_that_passed_while_no_controller_watched_is_not_held_against_the_agent() {
        let mut offer = mk_offer("n", "H100", 1, now());
        let mut rng = StdRng::seed_from_u64(1);
        let Step::Issue(challenge) = next_step(&offer, true, now(), WATCHED, &settings(), &mut rng)
        else {
            panic!()
        };
        offer.status.get_or_insert_default().proof_of_compute =
            Some(ProofOfCompute { challenge: Some(challenge), ..Default::default() });
        // The leader that issued it went away; the next started after the deadline (~2.1s).
        let restarted = secs(60);
        let step = next_step(&offer, true, secs(61), restarted, &settings(), &mut rng);
        assert_eq!(step, Step::Withdraw, "no verdict: whether the agent was late is unknown");
        // A deadline that passed while it watched is held against the agent, as always.
        let step = next_step(&offer, true, secs(61), secs(1), &settings(), &mut rng);
        assert!(matches!(step, Step::Decide(Verdict { reason: "Late", .. })), "{step:?}");

        // The same for the rows asked for: their deadline passed before the restart.
        let mut revealing = mk_offer("n", "H100", 1, now());
        let Step::Issue(challenge) =
            next_step(&revealing, true, now(), WATCHED, &settings(), &mut rng)
        else {
            panic!()
        };
        let (answer, _) = commit(&challenge, "n", |_| {});
        let status = revealing.status.get_or_insert_default();
        status.proof_of_compute =
            Some(ProofOfCompute { challenge: Some(challenge), ..Default::default() });
        status.compute_answer = Some(answer);
        let Step::Reveal(asked) =
            next_step(&revealing, true, secs(1), WATCHED, &settings(), &mut rng)
        else {
            panic!()
        };
        revealing.status.get_or_insert_default().proof_of_compute =
            Some(ProofOfCompute { challenge: Some(asked), ..Default::default() });
        let step = next_step(&revealing, true, secs(61), restarted, &settings(), &mut rng);
        assert_eq!(step, Step::Withdraw);
    }

    #[test]
    fn deadlines_follow_the_claimed_model_and_the_gpu_memory() {
        let s = ProofSettings { max_dimension: 512, ..settings() };
        assert_eq!(dimension(81_559, 512), 512);
        assert_eq!(dimension(24_576, 512), 192);
        assert_eq!(dimension(1, 512), 64);
        assert_eq!(dimension(81_559, 32), 32);
        let h100 = compute_time("H100", 512, &s);
        let rtx = compute_time("RTX3090", 512, &s);
        assert!(rtx > h100 * 13 && rtx < h100 * 14, "{h100:?} {rtx:?}");
        let unknown = compute_time("Whatever", 512, &s);
        assert!(unknown > h100 * 19 && unknown < h100 * 21, "{unknown:?}");
    }

    #[test]
    fn leased_or_unavailable_offers_are_not_challenged_and_a_lease_withdraws_a_challenge() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut offer = mk_offer("n", "H100", 2, now());
        assert_eq!(
            next_step(&offer, false, now(), WATCHED, &settings(), &mut rng),
            Step::Idle(None)
        );
        let Step::Issue(challenge) = next_step(&offer, true, now(), WATCHED, &settings(), &mut rng)
        else {
            panic!()
        };
        let status = offer.status.get_or_insert_default();
        status.proof_of_compute =
            Some(ProofOfCompute { challenge: Some(challenge), ..Default::default() });
        status.gpus = vec![GpuState {
            uuid: "n-gpu-1".into(),
            health: Some(GpuHealth::Healthy),
            reason: None,
            lease: Some("lease-1".into()),
        }];
        assert_eq!(next_step(&offer, true, now(), WATCHED, &settings(), &mut rng), Step::Withdraw);
        offer.status.get_or_insert_default().proof_of_compute = None;
        assert_eq!(
            next_step(&offer, true, now(), WATCHED, &settings(), &mut rng),
            Step::Idle(None)
        );
    }

    #[test]
    fn the_next_challenge_waits_for_the_interval_and_a_failure_refuses_the_offer() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut offer = mk_offer("n", "H100", 1, now());
        let verdict = Step::Decide(Verdict::fail("Late", "too slow".into()));
        let (proof, condition) = next_status(&offer, &verdict, now(), 1).expect("a change");
        assert_eq!((proof.passed, proof.failed, &proof.challenge), (0, 1, &None));
        let status = offer.status.get_or_insert_default();
        status.proof_of_compute = Some(proof);
        status.conditions.extend(condition);
        assert!(compute_refused(&offer));
        let timeout = Duration::from_secs(30);
        assert_eq!(
            crate::market::supply::market_offer(&offer, now(), timeout),
            None,
            "not matched"
        );
        assert_eq!(
            next_step(&offer, true, secs(59), WATCHED, &settings(), &mut rng),
            Step::Idle(Some(secs(60)))
        );
        assert!(matches!(
            next_step(&offer, true, secs(60), WATCHED, &settings(), &mut rng),
            Step::Issue(_)
        ));
    }

    #[test]
    fn the_market_may_allow_failures_in_a_row_before_refusing_an_offer() {
        let mut offer = mk_offer("n", "H100", 1, now());
        let failed = Step::Decide(Verdict::fail("Late", "too slow".into()));
        let passed =
            Step::Decide(Verdict { passed: true, reason: "Verified", message: "ok".into() });
        let decide = |offer: &mut GpuOffer, step: &Step| {
            let (proof, condition) = next_status(offer, step, now(), 2).expect("a change");
            let status = offer.status.get_or_insert_default();
            status.proof_of_compute = Some(proof);
            status.conditions.retain(|c| c.type_ != COMPUTE_VERIFIED);
            status.conditions.extend(condition);
            crate::market::proof::compute_refused(offer)
        };
        assert!(!decide(&mut offer, &failed), "the first failure is tolerated");
        let condition = offer.status.as_ref().and_then(|s| s.conditions.first()).expect("one");
        assert_eq!(condition.reason, "FailureTolerated");
        assert!(condition.message.contains("too slow; 1 of the 2"), "{}", condition.message);
        assert!(decide(&mut offer, &failed), "the second in a row refuses the offer");
        assert!(!decide(&mut offer, &passed));
        assert!(!decide(&mut offer, &failed), "a pass starts the count again");
        let proof = offer.status.as_ref().and_then(|s| s.proof_of_compute.as_ref()).expect("set");
        assert_eq!((proof.passed, proof.failed, proof.failed_in_a_row), (1, 3, 1));
    }

    #[test]
    fn the_policys_throughput_of_a_model_sets_its_deadline() {
        let mut s = ProofSettings { max_dimension: 512, ..settings() };
        let h100 = compute_time("H100", 512, &s);
        assert!(compute_time("A100", 512, &s) > h100 * 3, "the table's A100: 315 ‰");
        s.throughput_permille.insert("A100".into(), 1000);
        assert_eq!(compute_time("A100", 512, &s), h100, "the policy's A100: as fast as an H100");
    }
}
