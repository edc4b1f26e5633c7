//! pdfleet-router: the OpenAI-compatible front door of a pool. It pairs a prefill worker (by
//! prefix-cache affinity and load) with a decode worker (by free KV, same topology domain first),
//! or sends whole requests to unified workers.

mod api;
mod discovery;
mod listen;
mod metrics;
mod pool;
mod server;
mod tokenizer;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::Parser;
use pdfleet_api::worker_args::RouterArgs;

#[derive(Parser, Debug)]
#[command(name = "pdfleet-router", version, about)]
struct Cli {
    #[command(flatten)]
    args: RouterArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Cli::parse().args;
    let pool = Arc::new(pool::Pool::new(args.max_inflight_per_worker, args.mode));
    let workers: Vec<pool::WorkerAddr> = args
        .static_workers()
        .into_iter()
        .map(|(addr, role)| pool::WorkerAddr {
            addr,
            role,
            domain: String::new(),
            node: None,
        })
        .collect();
    if let Some(name) = &args.discover_pool {
        let client = kube::Client::try_default().await?;
        let namespace = args
            .discover_namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let target = discovery::Target {
            pool: name.clone(),
            mode: args.mode,
            topology_key: args.topology_key.clone(),
        };
        tokio::spawn(discovery::watch(
            client.clone(),
            namespace.clone(),
            target,
            pool.clone(),
        ));
        if let Some(map) = &args.topology_map {
            tokio::spawn(discovery::follow_topology_map(
                client,
                namespace,
                map.clone(),
                pool.clone(),
            ));
        }
    } else if workers.is_empty() {
        anyhow::bail!("no workers: give --prefill and --decode, or --unified, or --discover-pool");
    }
    if !workers.is_empty() {
        pool.set_workers(&workers)?;
        pool.poll_once().await;
    }
    tokio::spawn(pool.clone().poll_forever(Duration::from_millis(500)));

    let pod = args.pod.clone().unwrap_or_else(|| "router".into());
    let slo = args.slo_ttft_ms.map(|ttft| metrics::Slo {
        ttft_s: ttft as f64 / 1e3,
        itl_s: args.slo_itl_ms.map(|itl| itl as f64 / 1e3),
    });
    let metrics = metrics::RouterMetrics::new(&args.pool, &pod, slo);
    let app = Arc::new(server::App {
        pool: pool.clone(),
        limits: api::ModelLimits {
            name: args.model_name,
            vocab_size: args.vocab_size,
            max_seq_len: args.max_seq_len,
        },
        metrics: metrics.clone(),
        max_retries: args.max_retries,
        body_timeout: Duration::from_secs(args.body_timeout_s),
    });
    let metrics_routes =
        axum::Router::new().route("/metrics", get(move || async move { metrics.encode() }));
    let mut routes = axum::Router::new()
        .route("/v1/completions", post(server::completions))
        .route("/v1/models", get(server::models))
        .route("/healthz", get(|| async { "ok" }))
        // Ready once a healthy worker of every role the pool needs is there.
        .route(
            "/readyz",
            get(move || async move {
                if pool.serving() {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no healthy worker of every role yet",
                    )
                }
            }),
        )
        .with_state(app)
        // The completion handler reads its body itself, with a deadline and a limit.
        .layer(axum::extract::DefaultBodyLimit::disable());
    match args.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tokio::spawn(async move { axum::serve(listener, metrics_routes).await });
        }
        None => routes = routes.merge(metrics_routes),
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %args.listen, workers = workers.len(), "router serving");
    let limits = listen::ConnLimits {
        header_timeout: Duration::from_secs(args.header_timeout_s),
        max_connections: args.max_connections,
        // Inside the pod's default grace period of 30 s.
        drain: Duration::from_secs(25),
    };
    listen::serve(listener, routes, limits, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
    })
    .await;
    Ok(())
}
