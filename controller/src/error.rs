//! The controller's one error type. Each variant has a stable `metric_label` used for the
//! Prometheus error counter and for Event reasons, so dashboards survive message changes.

use kube::runtime::finalizer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("finalizer: {0}")]
    Finalizer(Box<finalizer::Error<Error>>),

    #[error("invalid GpuCluster: {0}")]
    InvalidSpec(String),

    /// Another reconcile (or replica) changed an offer between our read and our write; the match
    /// is retried against fresh supply.
    #[error("offer {offer} changed while binding GPUs; matching again")]
    AllocationConflict { offer: String },

    #[error("serialising {what}: {source}")]
    Serialize { what: &'static str, source: serde_json::Error },

    /// The hub could not listen for buyers of a cluster running in a fleet.
    #[error("opening the tunnel's gateway: {0}")]
    Gateway(std::io::Error),
}

impl Error {
    /// Stable, low-cardinality label for metrics and Event reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(_) => "finalizer",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::AllocationConflict { .. } => "allocation_conflict",
            Error::Serialize { .. } => "serialize",
            Error::Gateway(_) => "gateway",
        }
    }
}

impl From<finalizer::Error<Error>> for Error {
    fn from(e: finalizer::Error<Error>) -> Self {
        Error::Finalizer(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
