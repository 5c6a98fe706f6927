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
            .with_field_manager(crate::runtime::context::MANAGER)
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

/// Whether this replica still holds the election Lease, read from the API server: held by its
/// identity, renewed less than the Lease duration ago (by this replica's own clock, which wrote
/// the renew time). A leader that was paused (stopped, swapped out, partitioned) past its Lease
/// finds the fence gone before it signs or sends anything, even if its own election task has
/// not noticed yet.
#[derive(Clone)]
pub struct Fence {
    leases: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    name: String,
    identity: String,
    /// Kept before the Lease runs out: half the renewal grace, so the holder (which renews a
    /// grace before expiry) is never fenced between renewals, while a clock skew of up to this
    /// much between replicas cannot make two of them pay.
    margin: Duration,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("name", &self.name).field("identity", &self.identity).finish()
    }
}

impl Fence {
    pub fn new(client: Client, election: &LeaderElection) -> Self {
        Fence {
            leases: kube::Api::namespaced(client, &election.namespace),
            name: election.lease_name.clone(),
            identity: election.identity.clone(),
            margin: Duration::from_millis(election.grace_seconds() * 500),
        }
    }

    pub async fn holds(&self) -> bool {
        let lease = match self.leases.get_opt(&self.name).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "reading the leader election Lease; not paying meanwhile");
                return false;
            }
        };
        let Some(spec) = lease.spec else { return false };
        let renewed = spec.renew_time.map(|t| t.0);
        let duration = spec.lease_duration_seconds.and_then(|s| u64::try_from(s).ok());
        let now = jiff::Timestamp::now();
        fence_holds(
            spec.holder_identity.as_deref(),
            &self.identity,
            renewed,
            duration,
            self.margin,
            now,
        )
    }
}

/// Pure rule of [`Fence::holds`].
fn fence_holds(
    holder: Option<&str>,
    identity: &str,
    renewed: Option<jiff::Timestamp>,
    duration_seconds: Option<u64>,
    margin: Duration,
    now: jiff::Timestamp,
) -> bool {
    let (Some(renewed), Some(seconds)) = (renewed, duration_seconds) else { return false };
    let Ok(valid) =
        jiff::SignedDuration::try_from(Duration::from_secs(seconds).saturating_sub(margin))
    else {
        return false;
    };
    holder == Some(identity) && renewed.checked_add(valid).is_ok_and(|until| now < until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_holds_only_for_the_holder_within_its_lease() {
        let t = |s: i64| jiff::Timestamp::from_second(1_800_000_000 + s).expect("valid");
        let margin = Duration::from_secs(1);
        assert!(fence_holds(Some("me"), "me", Some(t(0)), Some(15), margin, t(13)));
        assert!(!fence_holds(Some("me"), "me", Some(t(0)), Some(15), margin, t(14)), "too close");
        assert!(!fence_holds(Some("other"), "me", Some(t(0)), Some(15), margin, t(1)));
        assert!(!fence_holds(None, "me", Some(t(0)), Some(15), margin, t(1)));
        assert!(!fence_holds(Some("me"), "me", None, Some(15), margin, t(1)));
    }

    /// The holder renews a grace before expiry: its fence must hold until then, whatever the
    /// duration (a 6 s Lease once fenced its own leader between renewals).
    #[test]
    fn the_holder_is_never_fenced_before_it_renews() {
        for seconds in [2, 6, 15, 30, 60] {
            let election = LeaderElection {
                namespace: "ns".into(),
                lease_name: "l".into(),
                identity: "me".into(),
                lease_duration: Duration::from_secs(seconds),
            };
            let grace = election.grace_seconds();
            let margin = Duration::from_millis(grace * 500);
            let t = |s: u64| jiff::Timestamp::from_second(1_800_000_000 + s as i64).expect("valid");
            let renews_at = t(seconds - grace);
            assert!(
                fence_holds(Some("me"), "me", Some(t(0)), Some(seconds), margin, renews_at),
                "{seconds} s Lease"
            );
        }
    }
}
