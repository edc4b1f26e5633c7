//! What crosses pdfleet's process boundaries, in one place: the workers' gRPC protocol, the
//! shared types (roles, pool modes, KV dtypes, finish reasons), request ids, the prefix-block
//! hashing the router and the workers must agree on, Kubernetes label keys and ports, metric
//! names, and the worker's command line. The router and the operator depend on this crate, never
//! on the engine.

pub mod failure;
pub mod labels;
pub mod metrics;
pub mod prefix;
pub mod profile;
pub mod request_id;
pub mod rng;
mod types;
pub mod worker_args;

pub use request_id::RequestId;
pub use types::{
    BackendKind, FinishReason, KvDtype, KvTransport, KvTransportPolicy, PoolMode, Role,
};

/// The generated gRPC code (`pdfleet.v1`).
pub mod proto {
    tonic::include_proto!("pdfleet.v1");
}

/// Largest gRPC message either side accepts (a KV chunk, a long prompt).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
