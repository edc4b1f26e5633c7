//! pdfleet-router: the OpenAI-compatible front door of a pool. It pairs a prefill worker (by
//! prefix-cache affinity and load) with a decode worker (by free KV, same topology domain first),
//! or sends whole requests to unified workers.

mod api;
mod discovery;
mod metrics;
mod pool;
mod server;
mod tokenizer;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::serve::ListenerExt;
use clap::Parser;
use pdfleet_worker::serve::Role;

#[derive(Parser, Debug)]
#[command(name = "pdfleet-router", version, about)]
struct Args {
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Prefill worker gRPC address (repeatable), e.g. http://127.0.0.1:50051.
    #[arg(long = "prefill")]
    prefill: Vec<String>,
    /// Decode worker gRPC address (repeatable).
    #[arg(long = "decode")]
    decode: Vec<String>,
    /// Unified worker gRPC address (repeatable).
    #[arg(long = "unified")]
    unified: Vec<String>,
    /// Find the workers of this InferencePool through its EndpointSlices (in-cluster).
    #[arg(long)]
    discover_pool: Option<String>,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    discover_namespace: String,
    /// The pool's topology key: discovered workers on kubernetes.io/hostname are placed by
    /// node, on topology.kubernetes.io/zone by zone (other keys rely on the workers' --domain).
    #[arg(long, default_value = "")]
    topology_key: String,
    /// Model name clients must ask for (or omit).
    #[arg(long, default_value = "toy")]
    model_name: String,
    #[arg(long, default_value_t = 100)]
    vocab_size: usize,
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Requests in flight per worker before the router answers 429.
    #[arg(long, default_value_t = 256)]
    max_inflight_per_worker: usize,
    #[arg(long, default_value_t = 3)]
    max_retries: usize,
    #[arg(long, env = "PDFLEET_POOL", default_value = "local")]
    pool: String,
    #[arg(long, env = "POD_NAME", default_value = "router")]
    pod: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let pool = Arc::new(pool::Pool::new(args.max_inflight_per_worker));
    let mut workers = Vec::new();
    for (list, role) in [
        (&args.prefill, Role::Prefill),
        (&args.decode, Role::Decode),
        (&args.unified, Role::Unified),
    ] {
        workers.extend(list.iter().map(|a| (a.clone(), role, String::new())));
    }
    if let Some(name) = &args.discover_pool {
        let client = kube::Client::try_default().await?;
        tokio::spawn(discovery::watch(
            client,
            args.discover_namespace.clone(),
            name.clone(),
            args.topology_key.clone(),
            pool.clone(),
        ));
    } else if workers.is_empty() {
        anyhow::bail!("no workers: give --prefill and --decode, or --unified, or --discover-pool");
    }
    if !workers.is_empty() {
        pool.set_workers(&workers)?;
        pool.poll_once().await;
    }
    tokio::spawn(pool.clone().poll_forever(Duration::from_millis(500)));

    let metrics = metrics::RouterMetrics::new(&args.pool, &args.pod);
    let app = Arc::new(server::App {
        pool,
        limits: api::ModelLimits {
            name: args.model_name,
            vocab_size: args.vocab_size,
            max_seq_len: args.max_seq_len,
        },
        metrics: metrics.clone(),
        next_id: AtomicU64::new(1),
        max_retries: args.max_retries,
    });
    let routes = axum::Router::new()
        .route("/v1/completions", post(server::completions))
        .route("/v1/models", get(server::models))
        .route("/metrics", get(move || async move { metrics.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app);
    // Tokens go out as small writes: without TCP_NODELAY, Nagle's algorithm holds them back.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    tracing::info!(addr = %args.listen, workers = workers.len(), "router serving");
    axum::serve(listener, routes)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        })
        .await?;
    Ok(())
}
