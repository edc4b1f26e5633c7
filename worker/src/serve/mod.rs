//! `pdfleet-worker serve`: the gRPC worker (prefill, decode or unified) with HTTP metrics and
//! health endpoints, and a drain on SIGTERM that loses no request.

pub mod actor;
pub mod grpc;
pub mod metrics;
pub mod receiver;
pub mod sender;
pub mod table;
pub mod transfer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use pdfleet_api::worker_args::WorkerArgs;
use pdfleet_api::Role;

use crate::config::ModelConfig;
use crate::engine::{Engine, SchedulerConfig};
use crate::{backend, weights};

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let weights = weights::load(&args.model)?;
    let e = &args.engine;
    let backend = backend::open_on(
        args.backend,
        &weights,
        e.block_size,
        e.num_blocks,
        args.cuda_device,
    )?;
    let backend_name = backend.name();
    let sched = SchedulerConfig {
        max_batch_tokens: e.max_batch_tokens,
        chunk_size: e.chunk_size,
        max_running: e.max_running,
    };
    let engine = Engine::new(backend, sched)?;
    // Only a decode worker's cache is written by others.
    let shared_cache = if args.role == Role::Decode {
        engine.backend().shared_cache()
    } else {
        None
    };
    let pod = args
        .pod
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| format!("{}-{}", args.role, args.grpc_addr.port()));
    let metrics = metrics::WorkerMetrics::new(&args.pool, args.role.as_str(), &pod);
    let limits = actor::ActorLimits {
        max_waiting: e.max_waiting,
        handoff_ttl: Duration::from_secs(args.handoff_ttl_s),
        fault: args.inject_fault,
        pad: args.pad_step_ms,
    };
    let handle = actor::spawn(engine, limits, metrics.clone());
    let health = handle.health().clone();
    let draining = Arc::new(AtomicBool::new(false));
    let service = grpc::WorkerService {
        handle: handle.clone(),
        role: args.role,
        model: ModelConfig::from(&args.model),
        block_size: e.block_size,
        metrics: metrics.clone(),
        draining: draining.clone(),
        pod: pod.clone(),
        domain: args.domain.clone().unwrap_or_default(),
        kv: sender::KvMoves {
            wire_f16: args.kv_wire_f16,
            policy: args.kv_transport,
            host_id: sender::host_id(),
        },
        peers: sender::Peers::default(),
        shared_cache,
        epoch: pdfleet_api::RequestId::random().uuid as u64,
    };

    let http = {
        let (metrics, draining) = (metrics.clone(), draining.clone());
        let live = health.clone();
        // Liveness is the engine thread's: a worker whose engine died or keeps failing is
        // restarted, not left answering 200.
        axum::Router::new()
            .route("/metrics", get(move || async move { metrics.encode() }))
            .route(
                "/healthz",
                get(move || async move {
                    if live.ok() {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "the engine is not healthy")
                    }
                }),
            )
            .route(
                "/readyz",
                get(move || async move {
                    if !health.ok() {
                        (StatusCode::SERVICE_UNAVAILABLE, "the engine is not healthy")
                    } else if draining.load(Ordering::SeqCst) {
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
                pdfleet_api::proto::worker_server::WorkerServer::new(service)
                    .max_decoding_message_size(pdfleet_api::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(pdfleet_api::MAX_MESSAGE_BYTES),
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
