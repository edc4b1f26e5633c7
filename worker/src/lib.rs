//! pdfleet worker engine: the primer's toy attention model on CPU and CUDA, a paged KV cache with
//! prefix reuse, and a continuous-batching scheduler with chunked prefill.

pub mod backend;
pub mod bench;
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
}
