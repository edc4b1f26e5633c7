//! Why a reconcile failed, with a short label for the failure metric.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid pool: {0}")]
    Invalid(String),
    /// The API server refused a child (a webhook, a quota, an invalid object).
    #[error("could not apply {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        source: Box<kube::Error>,
    },
}

impl Error {
    /// The `error` label of `pdfleet_operator_reconcile_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Invalid(_) => "invalid",
            Error::Apply { .. } => "apply",
        }
    }

    /// What a person reads in the pool's Ready condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "APIError",
            Error::Invalid(_) => "InvalidSpec",
            Error::Apply { .. } => "ApplyFailed",
        }
    }
}
