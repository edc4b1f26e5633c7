//! pdfleet-operator: reconciles InferencePools into prefill, decode (or unified) and router
//! workloads co-located by topology, and reports their status.

mod apply;
mod autoscale;
mod build;
mod error;
#[cfg(test)]
mod fake_api;
mod lease;
mod metrics;
mod names;
mod observe;
mod reconcile;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{predicates, reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use pdfleet_crds::{InferencePool, RoleScale};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::autoscale::prometheus::Prometheus;
use crate::autoscale::{Autoscaler, PromConfig};

#[derive(Parser, Debug)]
#[command(name = "pdfleet-operator", version, about)]
struct Args {
    /// Image for workers when a pool names none.
    #[arg(
        long,
        env = "PDFLEET_WORKER_IMAGE",
        default_value = "pdfleet/worker:dev"
    )]
    worker_image: String,
    /// Image for routers when a pool names none.
    #[arg(
        long,
        env = "PDFLEET_ROUTER_IMAGE",
        default_value = "pdfleet/router:dev"
    )]
    router_image: String,
    /// `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, default_value = "0.0.0.0:8081")]
    http_addr: SocketAddr,
    /// Elect a leader through a Lease so that several replicas can run.
    #[arg(long)]
    leader_elect: bool,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "POD_NAME", default_value = "pdfleet-operator")]
    identity: String,
    /// The Lease the replicas of one installation elect their leader with.
    #[arg(long, default_value = "pdfleet-operator")]
    lease_name: String,
    /// Watch pools in this namespace only (a Role there is then enough); every namespace when
    /// unset.
    #[arg(long, env = "PDFLEET_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The ClusterRole each pool's router is bound to, in the pool's namespace.
    #[arg(long, default_value = "pdfleet-router")]
    router_cluster_role: String,
    /// Logs as JSON lines.
    #[arg(long)]
    json_logs: bool,
    /// The Prometheus the planner reads (http or https), for every pool.
    #[arg(long, env = "PDFLEET_PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// A bearer token for it, read from this file on each query.
    #[arg(long, env = "PDFLEET_PROMETHEUS_TOKEN_FILE")]
    prometheus_bearer_token_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign its certificate, besides the system's.
    #[arg(long, env = "PDFLEET_PROMETHEUS_CA_FILE")]
    prometheus_ca_file: Option<PathBuf>,
    /// Let a pool name its own Prometheus (`spec.autoscaling.prometheusUrl`): the operator
    /// then fetches URLs that anyone who can write a pool chooses. Off by default.
    #[arg(long, env = "PDFLEET_ALLOW_POOL_PROMETHEUS")]
    allow_pool_prometheus: bool,
}

/// The API of a kind in the watched namespace, or in all of them.
fn watched<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

const CRD_NAMES: [&str; 2] = ["inferencepools.pdfleet.dev", "rolescales.pdfleet.dev"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if args.json_logs {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let client = Client::try_default().await?;
    // Fail at start, clearly, rather than watch a type the API server does not know.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in CRD_NAMES {
        if crds.get_opt(name).await?.is_none() {
            anyhow::bail!("the CRD {name} is not installed: kubectl apply --server-side -f crds/inferencepool.yaml (the Helm chart installs it)");
        }
    }
    let plain = Prometheus::client(None)?;
    let prom = PromConfig {
        operator: match &args.prometheus_url {
            Some(url) => Some(Prometheus::new(
                Prometheus::client(args.prometheus_ca_file.as_ref())?,
                url,
                args.prometheus_bearer_token_file.clone(),
            )),
            None => None,
        },
        plain,
        allow_pool_override: args.allow_pool_prometheus,
    };
    match &args.prometheus_url {
        Some(url) => tracing::info!(%url, "the planner reads Prometheus"),
        None => tracing::warn!("no --prometheus-url: pools that autoscale hold their replicas"),
    }

    let metrics = metrics::Metrics::new();
    // Ready as soon as it can serve: a standby replica waiting for the lease is ready too, so
    // a rolling `helm upgrade` can bring up the new pod while the old one still leads.
    let http = {
        let metrics = metrics.clone();
        axum::Router::new()
            .route("/metrics", get(move || async move { metrics.encode() }))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { (StatusCode::OK, "ready") }))
    };
    let listener = tokio::net::TcpListener::bind(args.http_addr).await?;
    tokio::spawn(async move { axum::serve(listener, http).await });

    let election = args.leader_elect.then(|| {
        // The pod's name and a per-process suffix: a leader that crashed and restarted in the
        // same pod is another holder, and waits for its predecessor's lease to end.
        let suffix = pdfleet_api::RequestId::random().uuid as u32;
        lease::LeaderElection::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &format!("{}_{suffix:08x}", args.identity),
        )
    });
    if let Some(e) = &election {
        e.acquire().await?;
    }
    metrics.leader.set(1);

    let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(reconcile::Context {
        client: client.clone(),
        autoscaler: Autoscaler::new(prom, wake),
        defaults: build::Defaults {
            worker_image: args.worker_image,
            router_image: args.router_image,
            router_cluster_role: args.router_cluster_role,
        },
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "pdfleet-operator".into(),
                instance: Some(args.identity.clone()),
            },
        ),
        metrics,
    });
    // Pools wake the controller when their spec changes (a new generation), not when the
    // operator writes their status.
    let pools: Api<InferencePool> = watched(&client, &args.watch_namespace);
    let (reader, writer) = reflector::store();
    let pool_changes = watcher(pools, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation);
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        pdfleet_api::labels::MANAGED_BY,
        pdfleet_api::labels::OPERATOR
    ));
    // The planner runs on its own clock and wakes a pool's reconcile when it decides.
    tokio::spawn(Autoscaler::run(ctx.clone(), reader.clone()));
    let ns = &args.watch_namespace;
    let controller = Controller::for_stream(pool_changes, reader)
        .reconcile_on(UnboundedReceiverStream::new(woken))
        .owns(watched::<Deployment>(&client, ns), owned.clone())
        .owns(watched::<Service>(&client, ns), owned.clone())
        .owns(watched::<ConfigMap>(&client, ns), owned.clone())
        .owns(watched::<PodDisruptionBudget>(&client, ns), owned.clone())
        .owns(watched::<RoleScale>(&client, ns), owned)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        });
    tracing::info!("operator running");
    match &election {
        Some(e) => {
            tokio::select! {
                _ = controller => e.release().await,
                // Leadership lost: stop at once so that two leaders never act together.
                _ = e.hold() => anyhow::bail!("leadership lost"),
            }
        }
        None => controller.await,
    }
    tracing::info!("operator stopped");
    Ok(())
}
