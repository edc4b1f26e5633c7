//! The worker's and the router's command lines as types. The binaries parse them with these
//! definitions and the operator, `pdfleet local` and the experiments render them with
//! [`WorkerArgs::to_args`] and [`RouterArgs::to_args`], so a flag is spelled in one place.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::labels::{self, env};
use crate::{BackendKind, KvDtype, KvTransportPolicy, PoolMode, Role};

/// The model's shape and weights.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct ModelArgs {
    #[arg(long, default_value_t = 100)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 32)]
    pub dim: usize,
    #[arg(long, default_value_t = 1)]
    pub n_heads: usize,
    #[arg(long, default_value_t = 1)]
    pub n_kv_heads: usize,
    #[arg(long, default_value_t = 1)]
    pub n_layers: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    #[arg(long, value_enum, default_value_t = KvDtype::F32)]
    pub kv_dtype: KvDtype,
    /// safetensors file with the primer's tensor names.
    #[arg(long, conflicts_with = "weights_seed")]
    pub weights: Option<PathBuf>,
    /// Draw the weights from this seed instead. With neither, the primer's seed-7 model (the
    /// golden vectors' weights) is used.
    #[arg(long)]
    pub weights_seed: Option<u64>,
}

impl Default for ModelArgs {
    /// The primer's toy model with its embedded weights.
    fn default() -> Self {
        ModelArgs {
            vocab_size: 100,
            dim: 32,
            n_heads: 1,
            n_kv_heads: 1,
            n_layers: 1,
            max_seq_len: 2048,
            kv_dtype: KvDtype::F32,
            weights: None,
            weights_seed: None,
        }
    }
}

impl ModelArgs {
    fn render(&self, a: &mut Args) {
        a.flag("--vocab-size", self.vocab_size);
        a.flag("--dim", self.dim);
        a.flag("--n-heads", self.n_heads);
        a.flag("--n-kv-heads", self.n_kv_heads);
        a.flag("--n-layers", self.n_layers);
        a.flag("--max-seq-len", self.max_seq_len);
        a.flag("--kv-dtype", self.kv_dtype);
        if let Some(w) = &self.weights {
            a.flag("--weights", w.display());
        }
        if let Some(s) = self.weights_seed {
            a.flag("--weights-seed", s);
        }
    }
}

/// The scheduler and the KV cache.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct EngineArgs {
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[arg(long, default_value_t = 4096)]
    pub num_blocks: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Prompt tokens of one sequence per step (chunked prefill).
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// Requests queued beyond this are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            block_size: 16,
            num_blocks: 4096,
            max_batch_tokens: 2048,
            chunk_size: 512,
            max_running: 256,
            max_waiting: 1024,
        }
    }
}

impl EngineArgs {
    fn render(&self, a: &mut Args) {
        a.flag("--block-size", self.block_size);
        a.flag("--num-blocks", self.num_blocks);
        a.flag("--max-batch-tokens", self.max_batch_tokens);
        a.flag("--chunk-size", self.chunk_size);
        a.flag("--max-running", self.max_running);
        a.flag("--max-waiting", self.max_waiting);
    }
}

/// `pdfleet-worker serve`.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], labels::GRPC_PORT)))]
    pub grpc_addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], labels::METRICS_PORT)))]
    pub http_addr: SocketAddr,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Ordinal of the CUDA device to run on, among those visible. Device-to-device KV moves
    /// need the prefill worker to see the decode worker's GPU, so pick devices with this rather
    /// than by hiding the others.
    #[arg(long, default_value_t = 0)]
    pub cuda_device: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Send KV as f16 on the wire (prefill role, f32 cache, gRPC transport).
    #[arg(long)]
    pub kv_wire_f16: bool,
    /// How KV goes to decode workers (prefill role).
    #[arg(long, value_enum, default_value_t = KvTransportPolicy::Auto)]
    pub kv_transport: KvTransportPolicy,
    /// A handoff that makes no progress for this long is dropped and its blocks freed: KV held
    /// for a decode worker, blocks reserved for arriving KV, KV nobody attaches to.
    #[arg(long, default_value_t = 30)]
    pub handoff_ttl_s: u64,
    #[arg(long, default_value = "local")]
    pub pool: String,
    #[arg(long, env = env::POD)]
    pub pod: Option<String>,
    /// Topology domain (node, rack or zone) this worker runs in.
    #[arg(long, env = env::DOMAIN)]
    pub domain: Option<String>,
    /// On SIGTERM, how long in-flight work may take to finish.
    #[arg(long, default_value_t = 30)]
    pub grace_period_s: u64,
    /// A fault to inject into the engine, for tests of what users see when it breaks:
    /// `panic-at-step:N` or `fail-steps-from:N`.
    #[arg(long, hide = true)]
    pub inject_fault: Option<EngineFault>,
    /// Test knob: every engine step lasts at least `FIXED+PER_SEQ` milliseconds (FIXED plus
    /// PER_SEQ per sequence in the step), so that a worker's capacity is known in advance on
    /// any machine (the autoscaling e2e runs on two cores). Not for production.
    #[arg(long, value_name = "FIXED+PER_SEQ")]
    pub pad_step_ms: Option<StepPad>,
}

/// The least time of an engine step, for tests: `fixed_ms + per_sequence_ms` x sequences.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPad {
    pub fixed_ms: f64,
    pub per_sequence_ms: f64,
}

impl StepPad {
    pub fn seconds(&self, sequences: usize) -> f64 {
        (self.fixed_ms + self.per_sequence_ms * sequences as f64) / 1000.0
    }
}

impl std::fmt::Display for StepPad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.fixed_ms, self.per_sequence_ms)
    }
}

impl std::str::FromStr for StepPad {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (fixed, per) = s.split_once('+').unwrap_or((s, "0"));
        let ms = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{s:?}: expected FIXED+PER_SEQ milliseconds, e.g. 10+5"))
        };
        Ok(StepPad {
            fixed_ms: ms(fixed)?,
            per_sequence_ms: ms(per)?,
        })
    }
}

/// A fault the engine thread injects into itself (tests only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineFault {
    /// The engine thread panics at its N-th step.
    PanicAtStep(u64),
    /// Every step from the N-th on fails.
    FailStepsFrom(u64),
}

impl std::fmt::Display for EngineFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineFault::PanicAtStep(n) => write!(f, "panic-at-step:{n}"),
            EngineFault::FailStepsFrom(n) => write!(f, "fail-steps-from:{n}"),
        }
    }
}

impl std::str::FromStr for EngineFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, n) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected panic-at-step:N or fail-steps-from:N"))?;
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{s:?}: N must be a whole number"))?;
        match kind {
            "panic-at-step" => Ok(EngineFault::PanicAtStep(n)),
            "fail-steps-from" => Ok(EngineFault::FailStepsFrom(n)),
            _ => Err(format!(
                "{s:?}: expected panic-at-step:N or fail-steps-from:N"
            )),
        }
    }
}

impl WorkerArgs {
    /// A worker of this role with every default.
    pub fn new(role: Role) -> Self {
        WorkerArgs {
            role,
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], labels::GRPC_PORT)),
            http_addr: SocketAddr::from(([0, 0, 0, 0], labels::METRICS_PORT)),
            backend: BackendKind::Auto,
            cuda_device: 0,
            model: ModelArgs::default(),
            engine: EngineArgs::default(),
            kv_wire_f16: false,
            kv_transport: KvTransportPolicy::Auto,
            handoff_ttl_s: 30,
            pool: "local".into(),
            pod: None,
            domain: None,
            grace_period_s: 30,
            inject_fault: None,
            pad_step_ms: None,
        }
    }

    /// The command line (after the binary's name) that parses back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Args(vec!["serve".into()]);
        a.flag("--role", self.role);
        a.flag("--grpc-addr", self.grpc_addr);
        a.flag("--http-addr", self.http_addr);
        a.flag("--backend", self.backend);
        a.flag("--cuda-device", self.cuda_device);
        self.model.render(&mut a);
        self.engine.render(&mut a);
        if self.kv_wire_f16 {
            a.0.push("--kv-wire-f16".into());
        }
        a.flag("--kv-transport", self.kv_transport);
        a.flag("--handoff-ttl-s", self.handoff_ttl_s);
        a.flag("--pool", &self.pool);
        if let Some(p) = &self.pod {
            a.flag("--pod", p);
        }
        if let Some(d) = &self.domain {
            a.flag("--domain", d);
        }
        a.flag("--grace-period-s", self.grace_period_s);
        if let Some(f) = self.inject_fault {
            a.flag("--inject-fault", f);
        }
        if let Some(p) = self.pad_step_ms {
            a.flag("--pad-step-ms", p);
        }
        a.0
    }
}

/// `pdfleet-router`.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct RouterArgs {
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], labels::ROUTER_PORT)))]
    pub listen: SocketAddr,
    /// `/metrics` on its own address (default: on `--listen`).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Prefill worker gRPC address (repeatable), e.g. http://127.0.0.1:50051.
    #[arg(long = "prefill")]
    pub prefill: Vec<String>,
    /// Decode worker gRPC address (repeatable).
    #[arg(long = "decode")]
    pub decode: Vec<String>,
    /// Unified worker gRPC address (repeatable).
    #[arg(long = "unified")]
    pub unified: Vec<String>,
    /// Find the workers of this InferencePool through its EndpointSlices (in-cluster).
    #[arg(long)]
    pub discover_pool: Option<String>,
    /// The pool's mode: discovery takes only the roles it runs (a pool switched to another mode
    /// may still have the old roles' workers for a moment).
    #[arg(long, value_enum)]
    pub mode: Option<PoolMode>,
    /// A ConfigMap in the pool's namespace mapping node names to topology domains, kept by the
    /// operator for any topology key.
    #[arg(long)]
    pub topology_map: Option<String>,
    /// The pool's namespace (default: the pod's own, else "default").
    #[arg(long, env = env::NAMESPACE)]
    pub discover_namespace: Option<String>,
    /// The pool's topology key: a discovered worker's domain is its node's value of this label
    /// unless the worker reports its own.
    #[arg(long)]
    pub topology_key: Option<String>,
    /// Model name clients must ask for (or omit).
    #[arg(long, default_value = "toy")]
    pub model_name: String,
    #[arg(long, default_value_t = 100)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Requests in flight per worker before the router answers 429.
    #[arg(long, default_value_t = 256)]
    pub max_inflight_per_worker: usize,
    /// Other workers to try after one fails before any token.
    #[arg(long, default_value_t = 3)]
    pub max_retries: usize,
    #[arg(long, default_value = "local")]
    pub pool: String,
    /// This router's name in its metrics (default: the pod's, else "router").
    #[arg(long, env = env::POD)]
    pub pod: Option<String>,
    /// The pool's time-to-first-token target: each request is counted as meeting its SLO or
    /// not (`pdfleet_router_slo_requests_total`), for attainment and burn-rate alerts.
    #[arg(long)]
    pub slo_ttft_ms: Option<u32>,
    /// The pool's inter-token latency target (the request's mean), with `--slo-ttft-ms`.
    #[arg(long, requires = "slo_ttft_ms")]
    pub slo_itl_ms: Option<u32>,
    /// A client must send its request headers within this many seconds (slowloris).
    #[arg(long, default_value_t = 10)]
    pub header_timeout_s: u64,
    /// ... and its request body within this many.
    #[arg(long, default_value_t = 30)]
    pub body_timeout_s: u64,
    /// Connections served at once; more wait in the kernel's backlog.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
}

impl RouterArgs {
    /// A router with every default and no workers.
    pub fn new() -> Self {
        RouterArgs {
            listen: SocketAddr::from(([0, 0, 0, 0], labels::ROUTER_PORT)),
            metrics_addr: None,
            prefill: Vec::new(),
            decode: Vec::new(),
            unified: Vec::new(),
            discover_pool: None,
            mode: None,
            topology_map: None,
            discover_namespace: None,
            topology_key: None,
            model_name: "toy".into(),
            vocab_size: 100,
            max_seq_len: 2048,
            max_inflight_per_worker: 256,
            max_retries: 3,
            pool: "local".into(),
            pod: None,
            slo_ttft_ms: None,
            slo_itl_ms: None,
            header_timeout_s: 10,
            body_timeout_s: 30,
            max_connections: 4096,
        }
    }

    /// The workers given by address, with their roles.
    pub fn static_workers(&self) -> Vec<(String, Role)> {
        [
            (&self.prefill, Role::Prefill),
            (&self.decode, Role::Decode),
            (&self.unified, Role::Unified),
        ]
        .into_iter()
        .flat_map(|(list, role)| list.iter().map(move |a| (a.clone(), role)))
        .collect()
    }

    /// Adds a worker by address.
    pub fn add_worker(&mut self, role: Role, addr: String) {
        match role {
            Role::Prefill => self.prefill.push(addr),
            Role::Decode => self.decode.push(addr),
            Role::Unified => self.unified.push(addr),
        }
    }

    /// The command line (after the binary's name) that parses back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Args(Vec::new());
        a.flag("--listen", self.listen);
        if let Some(m) = self.metrics_addr {
            a.flag("--metrics-addr", m);
        }
        for (addr, role) in self.static_workers() {
            a.flag(&format!("--{role}"), addr);
        }
        if let Some(p) = &self.discover_pool {
            a.flag("--discover-pool", p);
        }
        if let Some(m) = self.mode {
            a.flag("--mode", m);
        }
        if let Some(t) = &self.topology_map {
            a.flag("--topology-map", t);
        }
        if let Some(ns) = &self.discover_namespace {
            a.flag("--discover-namespace", ns);
        }
        if let Some(k) = &self.topology_key {
            a.flag("--topology-key", k);
        }
        a.flag("--model-name", &self.model_name);
        a.flag("--vocab-size", self.vocab_size);
        a.flag("--max-seq-len", self.max_seq_len);
        a.flag("--max-inflight-per-worker", self.max_inflight_per_worker);
        a.flag("--max-retries", self.max_retries);
        a.flag("--pool", &self.pool);
        if let Some(p) = &self.pod {
            a.flag("--pod", p);
        }
        if let Some(t) = self.slo_ttft_ms {
            a.flag("--slo-ttft-ms", t);
        }
        if let Some(t) = self.slo_itl_ms {
            a.flag("--slo-itl-ms", t);
        }
        a.flag("--header-timeout-s", self.header_timeout_s);
        a.flag("--body-timeout-s", self.body_timeout_s);
        a.flag("--max-connections", self.max_connections);
        a.0
    }
}

impl Default for RouterArgs {
    fn default() -> Self {
        RouterArgs::new()
    }
}

struct Args(Vec<String>);

impl Args {
    fn flag(&mut self, name: &str, value: impl std::fmt::Display) {
        self.0.push(name.to_string());
        self.0.push(value.to_string());
    }
}

/// Parses a worker command line as `pdfleet-worker` does (tests and tools).
pub fn parse_worker(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> Result<WorkerArgs, clap::Error> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }
    #[derive(clap::Subcommand)]
    enum Command {
        Serve(WorkerArgs),
    }
    use clap::Parser;
    let argv =
        std::iter::once(OsString::from("pdfleet-worker")).chain(args.into_iter().map(Into::into));
    let Command::Serve(w) = Cli::try_parse_from(argv)?.command;
    Ok(w)
}

/// Parses a router command line as `pdfleet-router` does.
pub fn parse_router(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> Result<RouterArgs, clap::Error> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        router: RouterArgs,
    }
    use clap::Parser;
    let argv =
        std::iter::once(OsString::from("pdfleet-router")).chain(args.into_iter().map(Into::into));
    Ok(Cli::try_parse_from(argv)?.router)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn pick<T: Copy>(r: &mut SplitMix64, xs: &[T]) -> T {
        xs[r.below(xs.len() as u64) as usize]
    }

    #[test]
    fn defaults_are_what_the_binary_parses() {
        for role in Role::ALL {
            let mut parsed = parse_worker(["serve", "--role", role.as_str()]).unwrap();
            // The environment may name a pod or a domain; the defaults do not.
            (parsed.pod, parsed.domain) = (None, None);
            assert_eq!(parsed, WorkerArgs::new(*role));
        }
        let mut parsed = parse_router(Vec::<String>::new()).unwrap();
        (parsed.pod, parsed.discover_namespace) = (None, None);
        assert_eq!(parsed, RouterArgs::new());
    }

    #[test]
    fn rendered_worker_arguments_parse_back_to_the_same_config() {
        let mut r = SplitMix64::new(5);
        for _ in 0..300 {
            let mut w = WorkerArgs::new(pick(&mut r, Role::ALL));
            w.grpc_addr = SocketAddr::from(([127, 0, 0, 1], r.below(60000) as u16 + 1));
            w.backend = pick(&mut r, BackendKind::ALL);
            w.cuda_device = r.below(8) as usize;
            w.model.dim = 8 * (1 + r.below(64) as usize);
            w.model.kv_dtype = pick(&mut r, KvDtype::ALL);
            match r.below(3) {
                0 => w.model.weights = Some(PathBuf::from("/weights/m w.safetensors")),
                1 => w.model.weights_seed = Some(r.next_u64()),
                _ => {}
            }
            w.engine.num_blocks = 1 + r.below(10_000) as usize;
            w.engine.chunk_size = 1 + r.below(4096) as usize;
            w.kv_wire_f16 = r.below(2) == 0;
            w.kv_transport = pick(&mut r, KvTransportPolicy::ALL);
            w.handoff_ttl_s = r.below(100);
            w.pool = format!("pool-{}", r.below(9));
            w.inject_fault = match r.below(3) {
                0 => Some(EngineFault::PanicAtStep(r.below(100))),
                1 => Some(EngineFault::FailStepsFrom(r.below(100))),
                _ => None,
            };
            w.pad_step_ms = (r.below(2) == 0).then(|| StepPad {
                fixed_ms: r.below(50) as f64,
                per_sequence_ms: r.below(8) as f64 / 2.0,
            });
            if r.below(2) == 0 {
                w.pod = Some("pod-1".into());
                w.domain = Some("zone-b".into());
            }
            let args = w.to_args();
            let back = parse_worker(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            if w.pod.is_none() {
                // Unset, the environment decides; only compare what was rendered.
                assert_eq!(
                    WorkerArgs {
                        pod: None,
                        domain: None,
                        ..back
                    },
                    w
                );
            } else {
                assert_eq!(back, w);
            }
        }
    }

    #[test]
    fn rendered_router_arguments_parse_back_to_the_same_config() {
        let mut a = RouterArgs::new();
        a.add_worker(Role::Prefill, "http://127.0.0.1:1".into());
        a.add_worker(Role::Decode, "http://127.0.0.1:2".into());
        a.add_worker(Role::Decode, "http://127.0.0.1:3".into());
        a.discover_pool = Some("chat".into());
        a.discover_namespace = Some("ml".into());
        a.mode = Some(PoolMode::Colocated);
        a.topology_map = Some("chat-topology".into());
        a.metrics_addr = Some(SocketAddr::from(([0, 0, 0, 0], 9090)));
        a.pod = Some("router-0".into());
        a.topology_key = Some("example.com/rack".into());
        a.max_retries = 0;
        a.slo_ttft_ms = Some(500);
        a.slo_itl_ms = Some(50);
        a.header_timeout_s = 3;
        a.body_timeout_s = 7;
        a.max_connections = 12;
        assert_eq!(parse_router(a.to_args()).unwrap(), a);
    }
}
