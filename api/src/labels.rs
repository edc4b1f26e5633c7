//! Kubernetes names both sides rely on: the labels the operator puts on a pool's children (the
//! router discovers its workers by them, never by parsing object names) and the ports.

/// The pool a child belongs to (its name).
pub const POOL: &str = "pdfleet.dev/pool";
/// The worker role of a child (`prefill`, `decode`, `unified`), or [`ROUTER`].
pub const ROLE: &str = "pdfleet.dev/role";
/// The [`ROLE`] label's value on router children.
pub const ROUTER: &str = "router";
/// Set by the EndpointSlice controller: the Service a slice belongs to.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// [`MANAGED_BY`]'s value on everything the operator creates.
pub const OPERATOR: &str = "pdfleet-operator";

/// Workers' gRPC port, named [`GRPC_PORT_NAME`] in their Services.
pub const GRPC_PORT: u16 = 50051;
pub const GRPC_PORT_NAME: &str = "grpc";
/// Workers' `/metrics`, `/healthz` and `/readyz`.
pub const METRICS_PORT: u16 = 9090;
pub const METRICS_PORT_NAME: &str = "metrics";
/// The router's OpenAI-compatible API.
pub const ROUTER_PORT: u16 = 8080;
/// The router's `/metrics` in a pod (workers use [`METRICS_PORT`] too; a pod has one of each).
pub const ROUTER_METRICS_PORT: u16 = 9090;

/// Where the images put the binaries (the pods name them, so one image may hold several).
pub const WORKER_BINARY: &str = "/usr/local/bin/pdfleet-worker";
pub const ROUTER_BINARY: &str = "/usr/local/bin/pdfleet-router";

/// Environment variables the operator sets on worker and router pods.
pub mod env {
    pub const POOL: &str = "PDFLEET_POOL";
    pub const POD: &str = "POD_NAME";
    pub const NAMESPACE: &str = "POD_NAMESPACE";
    /// The worker's topology domain (a node, rack or zone label value).
    pub const DOMAIN: &str = "PDFLEET_DOMAIN";
}
