//! Leader election through a `coordination.k8s.io/v1` Lease (kube-lease-manager), so that only
//! one replica reconciles at a time.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the election Lease lives and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per replica (the pod name in a cluster).
    pub identity: String,
    /// How long a leader holds the Lease without renewing it.
    pub lease_duration: Duration,
}

impl LeaderElection {
    /// Renewal grace: a fifth of the duration, at least a second, always shorter than it.
    fn grace_seconds(&self) -> u64 {
        (self.lease_duration.as_secs() / 5).max(1)
    }
}

/// A running election. Dropping it (or [`Leadership::release`]) stops renewing and gives the
/// Lease up, so another replica takes over at once rather than after the Lease duration.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Leadership {
    pub async fn start(
        client: Client,
        election: &LeaderElection,
    ) -> Result<Self, LeaseManagerError> {
        let duration = election.lease_duration.as_secs().max(election.grace_seconds() + 1);
        let manager = LeaseManagerBuilder::new(client, &election.lease_name)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(duration)
            .with_grace(election.grace_seconds())
            .with_field_manager(crate::context::MANAGER)
            .build()
            .await?;
        let (state, task) = manager.watch().await;
        Ok(Leadership { state, task })
    }

    /// Resolves once this replica leads.
    pub async fn acquired(&mut self) {
        // An error means the manager stopped; `lost` reports that.
        let _ = self.state.wait_for(|leading| *leading).await;
    }

    /// Resolves when leadership is lost (or the election stopped).
    pub async fn lost(&mut self) {
        let _ = self.state.wait_for(|leading| !*leading).await;
    }

    /// Give the Lease up and wait (a few seconds at most) until the API server has it: the
    /// manager's task releases the Lease once no receiver of its state is left.
    pub async fn release(self) {
        let Leadership { state, task } = self;
        drop(state);
        match tokio::time::timeout(RELEASE_TIMEOUT, task).await {
            Ok(Ok(Ok(_))) => tracing::info!("leader election Lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader election Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election task failed"),
            Err(_) => tracing::warn!("leader election Lease not released in time; it expires"),
        }
    }
}

/// How long shutdown waits for the Lease release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
