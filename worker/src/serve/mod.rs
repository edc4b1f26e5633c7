//! `pdfleet-worker serve`: the gRPC worker (prefill, decode or unified) with HTTP metrics and
//! health endpoints, and a drain on SIGTERM that loses no request.

pub mod actor;
pub mod grpc;
pub mod metrics;
pub mod transfer;

pub mod proto {
    tonic::include_proto!("pdfleet.v1");
}

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;

use crate::config::{KvDtype, ModelConfig};
use crate::engine::{Engine, SchedulerConfig};
use crate::weights::Weights;
use crate::{backend, EngineError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Prefill,
    Decode,
    Unified,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Unified => "unified",
        })
    }
}

/// How a prefill worker moves KV to a decode worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvTransport {
    /// Device to device when the decode worker's cache can be opened (same host, both CUDA),
    /// otherwise over gRPC.
    Auto,
    /// Device to device (CUDA IPC) only; a push that cannot go this way fails.
    Device,
    /// Over gRPC: read out to the host, streamed, written on the other side.
    Grpc,
}

impl KvTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            KvTransport::Auto => "auto",
            KvTransport::Device => "device",
            KvTransport::Grpc => "grpc",
        }
    }
}

/// The model's shape and weights, as flags (the operator renders these from the pool's spec).
#[derive(Clone, Debug, clap::Args)]
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
    #[arg(long, default_value = "f32")]
    pub kv_dtype: KvDtype,
    /// safetensors file with the primer's tensor names.
    #[arg(long, conflicts_with = "weights_seed")]
    pub weights: Option<PathBuf>,
    /// Draw the weights from this seed instead. With neither, the primer's seed-7 model (the
    /// golden vectors' weights) is used.
    #[arg(long)]
    pub weights_seed: Option<u64>,
}

impl ModelArgs {
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            vocab_size: self.vocab_size,
            dim: self.dim,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            n_layers: self.n_layers,
            max_seq_len: self.max_seq_len,
            kv_dtype: self.kv_dtype,
        }
    }

    pub fn load(&self) -> Result<Weights, EngineError> {
        let config = self.config();
        match (&self.weights, self.weights_seed) {
            (Some(path), _) => Weights::load_safetensors(path, &config),
            (None, Some(seed)) => Weights::from_seed(&config, seed),
            // The embedded weights fit the primer's shape, with any KV dtype.
            (None, None) => {
                let primer_shape = ModelConfig {
                    kv_dtype: KvDtype::F32,
                    ..config.clone()
                } == ModelConfig::default();
                if !primer_shape {
                    return Err(EngineError::InvalidConfig(
                        "the embedded weights are the primer's shape; give --weights or --weights-seed for other shapes".into(),
                    ));
                }
                Ok(Weights {
                    config,
                    ..Weights::embedded_primer()
                })
            }
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub http_addr: SocketAddr,
    /// cpu, cuda, or auto (CUDA when a GPU is present).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Ordinal of the CUDA device to run on, among those visible. Device-to-device KV moves
    /// need the prefill worker to see the decode worker's GPU, so pick devices with this rather
    /// than by hiding the others.
    #[arg(long, default_value_t = 0)]
    pub cuda_device: usize,
    #[command(flatten)]
    pub model: ModelArgs,
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
    /// Send KV as f16 on the wire (prefill role, f32 cache, gRPC transport).
    #[arg(long)]
    pub kv_wire_f16: bool,
    /// How KV goes to decode workers (prefill role).
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_transport: KvTransport,
    #[arg(long, env = "PDFLEET_POOL", default_value = "local")]
    pub pool: String,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod: String,
    /// Topology domain (node, rack or zone) this worker runs in.
    #[arg(long, env = "PDFLEET_DOMAIN", default_value = "")]
    pub domain: String,
    /// On SIGTERM, how long in-flight work may take to finish.
    #[arg(long, default_value_t = 30)]
    pub grace_period_s: u64,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let weights = args.model.load()?;
    let backend = backend::open_on(
        &args.backend,
        &weights,
        args.block_size,
        args.num_blocks,
        args.cuda_device,
    )?;
    let backend_name = backend.name();
    let sched = SchedulerConfig {
        max_batch_tokens: args.max_batch_tokens,
        chunk_size: args.chunk_size,
        max_running: args.max_running,
    };
    let engine = Engine::new(backend, sched)?;
    // Only a decode worker's cache is written by others.
    let shared_cache = if args.role == Role::Decode {
        engine.backend().shared_cache()
    } else {
        None
    };
    let pod = if args.pod.is_empty() {
        format!("{}-{}", args.role, args.grpc_addr.port())
    } else {
        args.pod.clone()
    };
    let metrics = metrics::WorkerMetrics::new(&args.pool, &args.role.to_string(), &pod);
    let parked_ttl = Duration::from_secs(60);
    let limits = actor::ActorLimits {
        max_waiting: args.max_waiting,
        parked_ttl,
    };
    let handle = actor::spawn(engine, limits, metrics.clone());
    let draining = Arc::new(AtomicBool::new(false));
    let service = grpc::WorkerService::new(
        handle.clone(),
        args.role,
        weights.config.clone(),
        args.block_size,
        metrics.clone(),
        draining.clone(),
        pod.clone(),
        args.domain.clone(),
        grpc::KvMoves {
            wire_f16: args.kv_wire_f16,
            transport: args.kv_transport,
            shared_cache,
            host_id: grpc::host_id(),
            reserve_ttl: parked_ttl,
        },
    );

    let http = {
        let (metrics, draining) = (metrics.clone(), draining.clone());
        axum::Router::new()
            .route("/metrics", get(move || async move { metrics.encode() }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || async move {
                    if draining.load(Ordering::SeqCst) {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining")
                    } else {
                        (StatusCode::OK, "ready")
                    }
                }),
            )
    };
    let http_listener = tokio::net::TcpListener::bind(args.http_addr).await?;
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr).await?;
    tracing::info!(role = %args.role, grpc = %grpc_listener.local_addr()?, http = %http_listener.local_addr()?, backend = backend_name, pod, "worker serving");

    // Tokens and KV chunks are small writes: no Nagle delay on them.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
        |s| {
            s.inspect(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut grpc_stop = stop_rx.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                proto::worker_server::WorkerServer::new(service)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            }),
    );
    let mut http_stop = stop_rx;
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener, http)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    shutdown_signal().await;
    // Drain: refuse new work, let what is admitted (and transfers under way) finish.
    draining.store(true, Ordering::SeqCst);
    tracing::info!(grace_s = args.grace_period_s, "draining");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.grace_period_s);
    loop {
        let idle = handle.status().await.map(|s| s.idle()).unwrap_or(true);
        if idle || tokio::time::Instant::now() >= deadline {
            if !idle {
                tracing::warn!("grace period over with work in flight");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Streams already open still flush their last messages before the servers stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(true);
    let _ = grpc.await;
    let _ = http_task.await;
    tracing::info!("worker stopped");
    Ok(())
}
