//! `hack/dev.sh demo`'s environment (`gpumarket-env up --demo`): the buyer's example cluster
//! runs on the real node, the first job on it succeeds, and the job API the demo prints
//! answers. A binary of its own: Ray on the real node is slow enough without the environment
//! tests' validators and control planes beside it. Needs root (the real node).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use gpumarket_tests::up::Up;

const UP: &str = env!("CARGO_BIN_EXE_gpumarket-env");

#[tokio::test]
async fn up_demo_runs_the_buyers_ray_cluster_and_a_first_job_on_the_real_node() {
    let scratch = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut up =
        Up::start(UP, scratch.path(), &["--demo", "--nodes", "a100=2x8,rtx4090=1x1"]).unwrap();
    let log = up
        .until("the demo's first job and how to submit more", Duration::from_secs(1500), || {
            let log = std::fs::read_to_string(scratch.path().join("up.log")).ok()?;
            log.contains("demo: submit your jobs").then_some(log)
        })
        .await;
    eprintln!("{log}\ndemo's first job done {:.1} s after up", started.elapsed().as_secs_f64());
    // Its progress was printed on the way, matched before it ran, and the job saw both GPUs.
    let matched = log.find("GpuCluster default/ray-local: Provisioning").expect("progress printed");
    assert!(matched < log.find("default/ray-local is Running").unwrap(), "{log}");
    assert!(log.contains("demo: Ray job demo-first-job on default/ray-local: SUCCEEDED"), "{log}");
    let seen = log.lines().find(|l| l.contains("market GPUs seen by each task"));
    let seen = seen.unwrap_or_else(|| panic!("{log}"));
    assert_eq!(seen.matches("GPU-real").count(), 4, "two tasks, each told both GPUs: {seen}");
    let address = log
        .split_once("ray job submit --address ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .expect("the job API printed");
    let answer = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "10", &format!("{address}/api/jobs/")])
        .output()
        .unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&answer.stdout).unwrap();
    assert!(jobs.to_string().contains("demo-first-job"), "{jobs}");
    up.stop().await.unwrap();
}
