//! Proof of compute, what it costs each side: `cargo bench -p gpumarket-controller --bench
//! proof_of_compute`.
//!
//! For products of side 64 to 1024 on one GPU, and for an 8-GPU node at the default side (512):
//! the agent's time to compute and commit (on this CPU, through the fake device source, as the
//! NVML source does until it has a GPU kernel), the controller's CPU time to verify the revealed
//! rows (Merkle proofs and Freivalds' test), their ratio, and how many answers one core
//! verifies per second. Then the challenge overhead on an idle node per hour at the default
//! interval.

// A bench whose honest answer does not verify must stop, loudly.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use gpumarket_controller::market::proof::{ProofSettings, REVEALED_ROWS, verify};
use gpumarket_crds::proof::{ProductSize, RowPick};
use gpumarket_crds::{ComputeAnswer, ComputeChallenge};
use gpumarket_device_plugin::proof::{answer, compute};
use gpumarket_device_plugin::source::fake::FakeSource;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use rand::SeedableRng;
use rand::rngs::StdRng;

const OFFER: &str = "bench-node";

fn challenge(gpus: usize, n: u32) -> ComputeChallenge {
    let products: Vec<ProductSize> =
        (0..gpus).map(|i| ProductSize { uuid: format!("GPU-{i}"), dimension: n }).collect();
    // The rows the controller would pick, spread over the GPUs as evenly as they come.
    let reveal = (0..REVEALED_ROWS)
        .map(|i| RowPick { uuid: format!("GPU-{}", i % gpus), row: (i as u32 * 7919) % n })
        .collect();
    ComputeChallenge {
        nonce: "5a".repeat(32),
        products,
        issued: MicroTime(jiff::Timestamp::UNIX_EPOCH),
        deadline: MicroTime(jiff::Timestamp::UNIX_EPOCH),
        committed: None,
        reveal,
        reveal_deadline: None,
    }
}

fn fake(gpus: usize) -> FakeSource {
    let listed: Vec<String> = (0..gpus)
        .map(|i| format!("  - {{uuid: GPU-{i}, productName: NVIDIA H100, memoryMib: 81559}}"))
        .collect();
    FakeSource::from_yaml(&format!("gpus:\n{}", listed.join("\n"))).expect("a valid fake")
}

/// The agent's time to compute and commit, and its answer with the rows revealed.
fn agent(challenge: &ComputeChallenge, gpus: usize) -> (Duration, ComputeAnswer) {
    let source = fake(gpus);
    let started = Instant::now();
    let products = compute(OFFER, challenge, &source).ok().flatten().expect("an answer");
    let committed = answer(challenge, &products);
    let elapsed = started.elapsed();
    let revealed = answer(challenge, &products);
    assert_eq!(committed.commitments, revealed.commitments);
    (elapsed, revealed)
}

/// The controller's mean time to verify `answer`, over enough runs to measure.
fn controller(challenge: &ComputeChallenge, answer: &ComputeAnswer) -> Duration {
    let mut rng = StdRng::seed_from_u64(1);
    let started = Instant::now();
    let mut runs = 0u32;
    while started.elapsed() < Duration::from_millis(500) || runs < 3 {
        verify(OFFER, challenge, answer, &mut rng).expect("an honest answer verifies");
        runs += 1;
    }
    started.elapsed() / runs
}

fn main() {
    println!(
        "{:>6} {:>5} {:>14} {:>14} {:>8} {:>14}",
        "side", "GPUs", "agent", "controller", "ratio", "verifies/s"
    );
    for (gpus, n) in [(1, 64), (1, 256), (1, 512), (1, 1024), (8, 512)] {
        let challenge = challenge(gpus, n);
        let (agent_time, answer) = agent(&challenge, gpus);
        let verify_time = controller(&challenge, &answer);
        println!(
            "{n:>6} {gpus:>5} {:>12.2}ms {:>12.3}ms {:>7.0}x {:>14.0}",
            agent_time.as_secs_f64() * 1e3,
            verify_time.as_secs_f64() * 1e3,
            agent_time.as_secs_f64() / verify_time.as_secs_f64(),
            1.0 / verify_time.as_secs_f64(),
        );
    }
    let defaults = ProofSettings::default();
    let (agent_time, _) = agent(&challenge(8, defaults.max_dimension), 8);
    let per_hour = 3600.0 / defaults.interval.as_secs_f64();
    println!(
        "idle 8-GPU node, one challenge every {:?}: {:.2}s of CPU per hour for its agent (on this CPU)",
        defaults.interval,
        agent_time.as_secs_f64() * per_hour
    );
}
