//! Ray jobs on a real node's Ray cluster, through its head's dashboard job API (what
//! `ray job submit` speaks), from the host as an in-cluster client would reach it: the head
//! Service's name resolved by the cluster's DNS (KubeRay's head Service is headless).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::dns::resolve_a;
use crate::real_node::{CLUSTER_DOMAIN, RealNode};

/// The dashboard's port on the head (KubeRay's default).
pub const DASHBOARD_PORT: u16 = 8265;
/// States a job does not leave.
const FINISHED: [&str; 3] = ["SUCCEEDED", "FAILED", "STOPPED"];

/// The job API of one Ray cluster's head.
pub struct Dashboard {
    /// `http://<head pod IP>:8265`.
    pub address: String,
}

/// A finished job: its final state and what it printed.
pub struct JobRun {
    pub status: String,
    pub logs: String,
}

impl Dashboard {
    /// The dashboard of the RayCluster `cluster` in `ns`, once its head Service resolves.
    pub async fn find(node: &RealNode, cluster: &str, ns: &str, timeout: Duration) -> Result<Self> {
        let name = format!("{cluster}-head-svc.{ns}.svc.{CLUSTER_DOMAIN}");
        let deadline = Instant::now() + timeout;
        loop {
            let found = resolve_a(node.dns(), &name, Duration::from_secs(2)).unwrap_or_default();
            if let Some(head) = found.first() {
                return Ok(Dashboard { address: format!("http://{head}:{DASHBOARD_PORT}") });
            }
            if Instant::now() > deadline {
                bail!("{name} did not resolve within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Submit `entrypoint` as the job `id`. The id is the caller's, so a submission whose
    /// answer was lost can be sent again without starting the job twice.
    pub fn submit(&self, id: &str, entrypoint: &str) {
        let body = json!({"entrypoint": entrypoint, "submission_id": id}).to_string();
        // Refused once the job exists: then only its status matters.
        let jobs = format!("{}/api/jobs/", self.address);
        curl(&["-X", "POST", "-H", "Content-Type: application/json", "-d", &body, &jobs]);
    }

    /// The job's state (`PENDING`, `RUNNING`, `SUCCEEDED`, ...); `None` while the dashboard
    /// does not answer or knows no such job.
    pub fn status(&self, id: &str) -> Option<String> {
        let status = curl(&[&format!("{}/api/jobs/{id}", self.address)])?;
        status["status"].as_str().map(str::to_owned)
    }

    /// Submit (again, until the dashboard takes it) and wait until the job has finished.
    pub async fn run(&self, id: &str, entrypoint: &str, timeout: Duration) -> Result<JobRun> {
        self.wait_for(id, entrypoint, &FINISHED, timeout).await?;
        let logs = curl(&[&format!("{}/api/jobs/{id}/logs", self.address)])
            .and_then(|l| l["logs"].as_str().map(str::to_owned))
            .context("the job's logs")?;
        Ok(JobRun { status: self.status(id).context("the job's status")?, logs })
    }

    /// Submit (again, until the dashboard takes it) and wait until the job is in one of
    /// `states`; returns that state.
    pub async fn wait_for(
        &self,
        id: &str,
        entrypoint: &str,
        states: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status(id).is_none() {
                self.submit(id, entrypoint);
            }
            match self.status(id) {
                Some(state) if states.contains(&state.as_str()) => return Ok(state),
                Some(state) if FINISHED.contains(&state.as_str()) => {
                    bail!("job {id} ended {state}, not {states:?}")
                }
                state if Instant::now() > deadline => {
                    bail!("job {id} not {states:?} within {timeout:?} (now {state:?})")
                }
                _ => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        }
    }
}

/// A Python program run as a job's entrypoint: `python -c '<program>'`, quoted for the shell
/// Ray runs it with.
pub fn python_entrypoint(program: &str) -> String {
    format!("python -c '{}'", program.replace('\'', r"'\''"))
}

/// A JSON answer from `curl -fsS <args>`; `None` until the server answers with success.
fn curl(args: &[&str]) -> Option<Value> {
    let output =
        Command::new("curl").args(["-fsS", "--max-time", "10"]).args(args).output().ok()?;
    output.status.success().then(|| serde_json::from_slice(&output.stdout).ok()).flatten()
}
