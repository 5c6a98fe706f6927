//! Proof of compute, the agent's side: when the controller puts a challenge in the offer's
//! status, every GPU it names computes its seeded product through the [`DeviceSource`], the
//! agent commits to the Merkle root of each product's rows in `status.computeAnswer`, and once
//! the controller names rows to reveal, it writes those rows with their proofs. Written with
//! a field manager of its own, so the heartbeat's apply never drops the answer.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gpumarket_crds::proof::{Commitment, ProductTask, RevealedRow, RowTree, encode_row};
use gpumarket_crds::{ComputeAnswer, ComputeChallenge, GpuOffer};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::source::{DeviceSource, SourceError};

pub const PROOF_FIELD_MANAGER: &str = "gpumarket-device-plugin-proof";

/// The products computed for one challenge: each GPU's rows, encoded as the answer carries them.
#[derive(Clone, Debug, PartialEq)]
pub struct Products {
    pub nonce: String,
    rows: BTreeMap<String, Vec<String>>,
}

/// Computes every product of `challenge` for `offer` on `source`; `None` when the source does
/// not answer. Blocks for as long as the GPUs compute.
pub fn compute(
    offer: &str,
    challenge: &ComputeChallenge,
    source: &dyn DeviceSource,
) -> Result<Option<Products>, SourceError> {
    let mut rows = BTreeMap::new();
    for product in &challenge.products {
        let task = ProductTask::new(&challenge.nonce, offer, &product.uuid, product.dimension);
        let Some(c) = source.multiply(&task)? else { return Ok(None) };
        rows.insert(product.uuid.clone(), c.iter().map(|r| encode_row(r)).collect());
    }
    Ok(Some(Products { nonce: challenge.nonce.clone(), rows }))
}

/// The answer committing to `products`, with the rows `challenge.reveal` asks for when it
/// asks for any (rows of GPUs or indices the products lack are left out: the controller then
/// says which are missing).
pub fn answer(challenge: &ComputeChallenge, products: &Products) -> ComputeAnswer {
    let trees: BTreeMap<&str, RowTree> =
        products.rows.iter().map(|(uuid, rows)| (uuid.as_str(), RowTree::new(rows))).collect();
    let commitments = trees
        .iter()
        .map(|(uuid, tree)| Commitment { uuid: (*uuid).to_owned(), root: tree.root() })
        .collect();
    let rows = challenge
        .reveal
        .iter()
        .filter_map(|pick| {
            let values = products.rows.get(&pick.uuid)?.get(pick.row as usize)?;
            Some(RevealedRow {
                uuid: pick.uuid.clone(),
                row: pick.row,
                values: values.clone(),
                proof: trees.get(pick.uuid.as_str())?.proof(pick.row as usize),
            })
        })
        .collect();
    ComputeAnswer { nonce: products.nonce.clone(), commitments, rows }
}

/// What the agent last did about a challenge.
#[derive(Default)]
struct Progress {
    /// The products of the challenge in flight (none computed when the source stays silent).
    computed: Option<(String, Option<Products>)>,
    /// The answer last written, so an unchanged one is not written again.
    written: Option<ComputeAnswer>,
}

/// Answers the challenges the controller puts in the node's offer until the future is dropped.
/// API errors are logged and retried on the offer's next change (every heartbeat).
pub async fn answer_challenges(
    client: Client,
    node: String,
    source: Arc<dyn DeviceSource>,
) -> Infallible {
    let offers: Api<GpuOffer> = Api::all(client);
    let selector = format!("metadata.name={node}");
    let mut progress = Progress::default();
    loop {
        let mut changes = watcher(offers.clone(), watcher::Config::default().fields(&selector))
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(change) = changes.next().await {
            match change {
                Ok(offer) => step(&offers, &offer, &source, &mut progress).await,
                Err(e) => tracing::warn!(error = %e, "watching this node's GpuOffer"),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn step(
    offers: &Api<GpuOffer>,
    offer: &GpuOffer,
    source: &Arc<dyn DeviceSource>,
    progress: &mut Progress,
) {
    let challenge = offer.status.as_ref().and_then(|s| s.proof_of_compute.as_ref());
    let Some(challenge) = challenge.and_then(|p| p.challenge.clone()) else { return };
    if progress.computed.as_ref().is_none_or(|(nonce, _)| *nonce != challenge.nonce) {
        let (name, source, asked) = (offer.name_any(), source.clone(), challenge.clone());
        let started = std::time::Instant::now();
        let computed =
            tokio::task::spawn_blocking(move || compute(&name, &asked, source.as_ref())).await;
        let products = match computed {
            Ok(Ok(products)) => products,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "computing the proof-of-compute products");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "the proof-of-compute computation stopped");
                None
            }
        };
        tracing::info!(nonce = %challenge.nonce, gpus = challenge.products.len(), seconds = started.elapsed().as_secs_f64(), answered = products.is_some(), "proof-of-compute challenge computed");
        progress.computed = Some((challenge.nonce.clone(), products));
    }
    let Some((_, Some(products))) = &progress.computed else { return };
    let answer = answer(&challenge, products);
    if progress.written.as_ref() == Some(&answer) {
        return;
    }
    let patch = json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "status": {"computeAnswer": answer},
    });
    let apply = PatchParams::apply(PROOF_FIELD_MANAGER).force();
    match offers.patch_status(&offer.name_any(), &apply, &Patch::Apply(&patch)).await {
        Ok(_) => progress.written = Some(answer),
        Err(e) => tracing::warn!(error = %e, "writing the proof-of-compute answer; retrying"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::fake::FakeSource;
    use gpumarket_crds::proof::{ProductSize, RowPick, verify_row};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn challenge(reveal: Vec<RowPick>) -> ComputeChallenge {
        ComputeChallenge {
            nonce: "ab".repeat(32),
            products: vec![ProductSize { uuid: "GPU-0".into(), dimension: 16 }],
            issued: MicroTime(jiff::Timestamp::UNIX_EPOCH),
            deadline: MicroTime(jiff::Timestamp::UNIX_EPOCH),
            committed: None,
            reveal,
            reveal_deadline: None,
        }
    }

    fn source(knobs: &str) -> FakeSource {
        FakeSource::from_yaml(&format!(
            "gpus: [{{uuid: GPU-0, productName: NVIDIA H100, memoryMib: 81559}}]\n{knobs}"
        ))
        .expect("a valid fake")
    }

    #[test]
    fn the_answer_commits_first_and_reveals_the_rows_asked_for() {
        let products = compute("node-a", &challenge(vec![]), &source("")).unwrap_or_default();
        let products = products.expect("the fake answers");
        let committed = answer(&challenge(vec![]), &products);
        assert_eq!(committed.commitments.len(), 1);
        assert!(committed.rows.is_empty());
        let picks = vec![
            RowPick { uuid: "GPU-0".into(), row: 3 },
            RowPick { uuid: "GPU-0".into(), row: 99 },
            RowPick { uuid: "GPU-9".into(), row: 0 },
        ];
        let revealed = answer(&challenge(picks), &products);
        assert_eq!(revealed.commitments, committed.commitments);
        let [row] = revealed.rows.as_slice() else { panic!("{:?}", revealed.rows) };
        assert_eq!(row.row, 3);
        let root = &committed.commitments[0].root;
        assert!(verify_row(root, 16, 3, &row.values, &row.proof));
        let task = ProductTask::new(&"ab".repeat(32), "node-a", "GPU-0", 16);
        assert_eq!(row.values, encode_row(&task.multiply()[3]));
    }

    #[test]
    fn a_silent_fake_gives_no_answer_and_a_wrong_one_a_different_product() {
        let silent = compute("node-a", &challenge(vec![]), &source("challenges: {answer: silent}"));
        assert_eq!(silent.ok(), Some(None));
        let honest = compute("node-a", &challenge(vec![]), &source("")).ok().flatten();
        let wrong = compute("node-a", &challenge(vec![]), &source("challenges: {answer: wrong}"));
        let wrong = wrong.ok().flatten();
        assert!(honest.is_some() && wrong.is_some());
        assert_ne!(honest, wrong);
    }
}
