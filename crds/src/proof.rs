//! Proof of compute, the part both sides must agree on: the challenge and answer as they travel
//! in a GpuOffer's status, the seeded matrices, the product and the Merkle commitment over its
//! rows. The controller (`controller/src/market/proof.rs`) issues and checks; the agent
//! (`device-plugin/src/proof.rs`) computes and answers.
//!
//! A challenge asks every GPU of the offer for `C = A·B`, with `A` and `B` (n×n, entries below
//! [`MODULUS`]) generated from a seed bound to the challenge's nonce, the offer and the GPU, so
//! no other node's answer fits. The agent commits to the Merkle root of each product's rows;
//! only then does the controller name a few rows to reveal, and checks them against the root
//! and, with Freivalds' test, against `A` and `B`: O(n²) for the controller against O(n³) for
//! the agent.

// Deadlines in microseconds: `Time` keeps whole seconds, which would cut a deadline short.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Condition of a GpuOffer: whether its GPUs answered the last challenge correctly in time.
pub const COMPUTE_VERIFIED: &str = "ComputeVerified";

/// Products are computed modulo this prime: every entry fits in 16 bits, a product of two in
/// 32, and a row's sum of n ≤ [`MAX_DIMENSION`] products in 64, so the arithmetic is exact on
/// any hardware and the controller's check is Freivalds' test over a field.
pub const MODULUS: u64 = 65_521;

/// Largest matrix side a challenge may ask for (bounds the answer's size and the agent's work).
pub const MAX_DIMENSION: u32 = 4096;

/// The challenge in flight, written by the controller only.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComputeChallenge {
    /// Random nonce (64 hex digits) that seeds the matrices together with the offer and GPU.
    #[schemars(length(max = 64))]
    pub nonce: String,
    /// One product per GPU of the offer.
    #[schemars(length(max = 64))]
    pub products: Vec<ProductSize>,
    /// When the challenge was issued.
    #[schemars(length(max = 64))]
    pub issued: MicroTime,
    /// The commitments must be in the answer by then (the claimed models' time plus a grace).
    #[schemars(length(max = 64))]
    pub deadline: MicroTime,
    /// When the controller saw the commitments; set together with `reveal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub committed: Option<MicroTime>,
    /// Rows to reveal, picked at random once the commitments were seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub reveal: Vec<RowPick>,
    /// The revealed rows must be in the answer by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub reveal_deadline: Option<MicroTime>,
}

/// The product one GPU computes: n×n matrices.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProductSize {
    #[schemars(length(max = 128))]
    pub uuid: String,
    #[schemars(range(min = 1, max = 4096))]
    pub dimension: u32,
}

/// One row of one GPU's product.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct RowPick {
    #[schemars(length(max = 128))]
    pub uuid: String,
    #[schemars(range(max = 4095))]
    pub row: u32,
}

/// Proof-of-compute state of an offer, written by the controller only.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProofOfCompute {
    /// The challenge in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<ComputeChallenge>,
    /// Challenges answered correctly in time.
    #[serde(default)]
    pub passed: u64,
    /// Challenges answered late, wrong or not at all.
    #[serde(default)]
    pub failed: u64,
    /// Challenges failed since the last one passed.
    #[serde(default)]
    pub failed_in_a_row: u64,
    /// When the last challenge was decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub last_verdict: Option<Time>,
}

/// The agent's answer to the challenge with `nonce`, written by the agent.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComputeAnswer {
    #[schemars(length(max = 64))]
    pub nonce: String,
    /// Merkle root (64 hex digits) of each GPU's product rows.
    #[schemars(length(max = 64))]
    pub commitments: Vec<Commitment>,
    /// The rows the challenge's `reveal` asked for, with their Merkle proofs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub rows: Vec<RevealedRow>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Commitment {
    #[schemars(length(max = 128))]
    pub uuid: String,
    #[schemars(length(max = 64))]
    pub root: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevealedRow {
    #[schemars(length(max = 128))]
    pub uuid: String,
    #[schemars(range(max = 4095))]
    pub row: u32,
    /// The row's entries, 4 hex digits each.
    #[schemars(length(max = 16384))]
    pub values: String,
    /// Sibling hashes from the leaf up (64 hex digits each; a level without one is skipped).
    #[schemars(length(max = 16), inner(length(max = 64)))]
    pub proof: Vec<String>,
}

/// What one GPU is asked to compute: the seeds of `A` and `B` and their side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductTask {
    pub uuid: String,
    pub dimension: usize,
    seed_a: u64,
    seed_b: u64,
}

impl ProductTask {
    /// The task of GPU `uuid` of `offer` for `nonce`: the seeds hash all three, so an answer
    /// fits only the node, GPU and challenge it was computed for.
    pub fn new(nonce: &str, offer: &str, uuid: &str, dimension: u32) -> Self {
        let mut hash = Sha256::new();
        for part in ["gpumarket proof-of-compute v1", nonce, offer, uuid] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&digest[i..i + 8]);
            u64::from_le_bytes(bytes)
        };
        ProductTask {
            uuid: uuid.to_owned(),
            dimension: dimension.clamp(1, MAX_DIMENSION) as usize,
            seed_a: word(0),
            seed_b: word(8),
        }
    }

    /// Row `i` of `A`.
    pub fn a_row(&self, i: usize) -> Vec<u64> {
        let n = self.dimension;
        (0..n).map(|k| entry(self.seed_a, (i * n + k) as u64)).collect()
    }

    /// `B`, row-major.
    pub fn b(&self) -> Vec<u64> {
        let n = self.dimension;
        (0..n * n).map(|idx| entry(self.seed_b, idx as u64)).collect()
    }

    /// Multiply-adds of the whole product (what the deadline is sized by).
    pub fn operations(&self) -> u64 {
        2 * (self.dimension as u64).pow(3)
    }

    /// `C = A·B` on the CPU, row by row.
    pub fn multiply(&self) -> Vec<Vec<u64>> {
        let n = self.dimension;
        let b = self.b();
        (0..n)
            .map(|i| {
                let mut acc = vec![0u64; n];
                for (k, a) in self.a_row(i).into_iter().enumerate() {
                    for (sum, b) in acc.iter_mut().zip(&b[k * n..(k + 1) * n]) {
                        *sum += a * b;
                    }
                }
                acc.into_iter().map(|s| s % MODULUS).collect()
            })
            .collect()
    }
}

/// Entry `index` of the matrix seeded by `seed`: splitmix64, reduced below [`MODULUS`] (simple
/// enough for a GPU kernel to produce the same).
fn entry(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % MODULUS
}

/// A row as the answer carries it: 4 hex digits per entry.
pub fn encode_row(row: &[u64]) -> String {
    row.iter().map(|v| format!("{:04x}", v % MODULUS)).collect()
}

/// The entries of an encoded row; `None` unless it is exactly `n` entries below [`MODULUS`].
pub fn decode_row(values: &str, n: usize) -> Option<Vec<u64>> {
    if values.len() != 4 * n || !values.is_ascii() {
        return None;
    }
    (0..n)
        .map(|i| u64::from_str_radix(&values[4 * i..4 * i + 4], 16).ok().filter(|v| *v < MODULUS))
        .collect()
}

/// Merkle tree over a product's rows; a level with an odd number of nodes carries its last one
/// up unchanged.
pub struct RowTree {
    levels: Vec<Vec<[u8; 32]>>,
}

fn leaf(row: u32, values: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update([0u8]);
    hash.update(row.to_le_bytes());
    hash.update(values.as_bytes());
    hash.finalize().into()
}

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update([1u8]);
    hash.update(left);
    hash.update(right);
    hash.finalize().into()
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl RowTree {
    /// The tree of encoded rows (row i at leaf i).
    pub fn new(rows: &[String]) -> Self {
        let mut levels = vec![(0..).zip(rows).map(|(i, r)| leaf(i, r)).collect::<Vec<_>>()];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let up = below
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node(left, right),
                    single => single[0],
                })
                .collect();
            levels.push(up);
        }
        RowTree { levels }
    }

    pub fn root(&self) -> String {
        self.levels.last().and_then(|l| l.first()).map(hex).unwrap_or_default()
    }

    /// Sibling hashes of leaf `row`, from the bottom.
    pub fn proof(&self, row: usize) -> Vec<String> {
        let mut index = row;
        let mut proof = Vec::new();
        for level in &self.levels[..self.levels.len().saturating_sub(1)] {
            if let Some(sibling) = level.get(index ^ 1) {
                proof.push(hex(sibling));
            }
            index /= 2;
        }
        proof
    }
}

/// Whether `values` is row `row` of the `n` rows committed to by `root`.
pub fn verify_row(root: &str, n: usize, row: u32, values: &str, proof: &[String]) -> bool {
    let (Some(root), true) = (unhex(root), (row as usize) < n) else { return false };
    let mut hash = leaf(row, values);
    let (mut index, mut width) = (row as usize, n);
    let mut siblings = proof.iter();
    while width > 1 {
        let has_sibling = index ^ 1 < width;
        if has_sibling {
            let Some(sibling) = siblings.next().and_then(|s| unhex(s)) else { return false };
            hash = if index % 2 == 0 { node(&hash, &sibling) } else { node(&sibling, &hash) };
        }
        index /= 2;
        width = width.div_ceil(2);
    }
    siblings.next().is_none() && hash == root
}

/// Freivalds' test of revealed rows of one product: with `r` random, row i of `C` is right
/// when `C[i]·r = A[i]·(B·r)` (mod [`MODULUS`]); a wrong row passes with probability 1/MODULUS.
/// `rows` are (row index, entries). O(n²) for `B·r`, O(n) per row.
pub fn freivalds(task: &ProductTask, rows: &[(usize, Vec<u64>)], r: &[u64]) -> bool {
    let n = task.dimension;
    if r.len() != n {
        return false;
    }
    let b = task.b();
    let br: Vec<u64> = (0..n)
        .map(|k| b[k * n..(k + 1) * n].iter().zip(r).map(|(b, r)| b * r).sum::<u64>() % MODULUS)
        .collect();
    let dot = |x: &[u64], y: &[u64]| x.iter().zip(y).map(|(x, y)| x * y % MODULUS).sum::<u64>();
    rows.iter().all(|(i, c)| {
        *i < n && c.len() == n && dot(c, r) % MODULUS == dot(&task.a_row(*i), &br) % MODULUS
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn seeds_bind_nonce_offer_and_gpu() {
        let task = ProductTask::new("n1", "node-a", "GPU-0", 8);
        assert_eq!(task, ProductTask::new("n1", "node-a", "GPU-0", 8));
        for other in [
            ProductTask::new("n2", "node-a", "GPU-0", 8),
            ProductTask::new("n1", "node-b", "GPU-0", 8),
            ProductTask::new("n1", "node-a", "GPU-1", 8),
            // Parts are length-prefixed: moving a character from one to the next changes it.
            ProductTask::new("n1n", "ode-a", "GPU-0", 8),
        ] {
            assert_ne!((task.seed_a, task.seed_b), (other.seed_a, other.seed_b));
        }
    }

    #[test]
    fn the_product_passes_freivalds_and_a_changed_entry_does_not() {
        let task = ProductTask::new("nonce", "node-a", "GPU-0", 33);
        let c = task.multiply();
        // Checked against a plain triple loop.
        let b = task.b();
        let a5 = task.a_row(5);
        let c5_7: u64 = (0..33).map(|k| a5[k] * b[k * 33 + 7]).sum::<u64>() % MODULUS;
        assert_eq!(c[5][7], c5_7);
        let r: Vec<u64> = (0..33).map(|i| (i * 7919 + 13) % MODULUS).collect();
        assert!(freivalds(&task, &[(5, c[5].clone()), (32, c[32].clone())], &r));
        let mut wrong = c[5].clone();
        wrong[7] = (wrong[7] + 1) % MODULUS;
        assert!(!freivalds(&task, &[(5, wrong)], &r));
        assert!(!freivalds(&task, &[(33, c[5].clone())], &r), "a row beyond the matrix");
        let other = ProductTask::new("nonce", "node-b", "GPU-0", 33);
        assert!(!freivalds(&other, &[(5, c[5].clone())], &r), "another node's row");
    }

    #[test]
    fn every_row_proves_against_the_root_and_nothing_else_does() {
        for n in [1usize, 2, 5, 8, 13] {
            let rows: Vec<String> = (0..n).map(|i| encode_row(&[i as u64, 7])).collect();
            let tree = RowTree::new(&rows);
            for (i, row) in rows.iter().enumerate() {
                let proof = tree.proof(i);
                assert!(verify_row(&tree.root(), n, i as u32, row, &proof), "n={n} row {i}");
                let other = encode_row(&[i as u64 + 1, 7]);
                assert!(!verify_row(&tree.root(), n, i as u32, &other, &proof));
                if n > 1 {
                    let j = (i + 1) % n;
                    assert!(!verify_row(&tree.root(), n, j as u32, row, &proof), "moved row");
                }
            }
            assert!(!verify_row(&tree.root(), n, n as u32, &rows[0], &tree.proof(0)));
        }
    }

    #[test]
    fn rows_round_trip_and_bad_encodings_are_refused() {
        let row = vec![0, 1, MODULUS - 1];
        assert_eq!(decode_row(&encode_row(&row), 3), Some(row));
        assert_eq!(decode_row("0000", 2), None);
        assert_eq!(decode_row("fff1", 1), None, "not below the modulus");
        assert_eq!(decode_row("zzzz", 1), None);
    }
}
