//! pdfleet worker engine: the primer's toy attention model on CPU and CUDA, a paged KV cache with
//! prefix reuse, and a continuous-batching scheduler with chunked prefill.

pub mod backend;
pub mod bench;
pub mod calibrate;
pub mod config;
pub mod engine;
pub mod kv_cache;
pub mod serve;
pub mod vectors;
pub mod weights;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("backend: {0}")]
    Backend(String),
    /// The KV cache cannot take this work now; another worker may.
    #[error("no room: {0}")]
    NoRoom(String),
    /// This worker holds nothing (any more) for the request: never here, finished, cancelled
    /// or expired.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is already here in another state (a duplicate or a replay).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A device-to-device write was due after the lease on its blocks had ended: nothing was
    /// written; reserve again.
    #[error("lease lapsed: {0}")]
    LeaseLapsed(String),
}
