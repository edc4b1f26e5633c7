//! Reconcile: validate, build the children, apply them (server-side apply, one field manager),
//! then write the status from what is really there. One step per function.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use pdfleet_crds::{InferencePool, InferencePoolStatus, PoolMode, RoleStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::autoscale;
use crate::build::{self, Defaults, Part};
use crate::error::Error;
use crate::metrics::Metrics;
use pdfleet_api::Role;

pub const FIELD_MANAGER: &str = "pdfleet-operator";

pub struct Context {
    pub client: Client,
    /// For Prometheus.
    pub http: reqwest::Client,
    pub defaults: Defaults,
    pub recorder: Recorder,
    pub metrics: Metrics,
}

/// Checks that CEL cannot express, or that an old API server did not enforce.
pub fn validate(pool: &InferencePool) -> Result<(), Error> {
    if build::roles(pool).is_empty() {
        return Err(Error::Invalid(match pool.spec.mode {
            PoolMode::Disaggregated => "a Disaggregated pool needs both prefill and decode".into(),
            PoolMode::Colocated => "a Colocated pool needs unified".into(),
        }));
    }
    let m = &pool.spec.model;
    if m.n_heads == 0
        || m.n_kv_heads == 0
        || !m.dim.is_multiple_of(m.n_heads)
        || !m.n_heads.is_multiple_of(m.n_kv_heads)
    {
        return Err(Error::Invalid(
            "nHeads must divide dim and nKvHeads must divide nHeads".into(),
        ));
    }
    Ok(())
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().expect("built objects are named");
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// Applies every child of the pool; `replicas` gives each worker role's count.
async fn apply_children(
    pool: &InferencePool,
    ctx: &Context,
    replicas: &[(Role, i32)],
) -> Result<(), Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    let c = &ctx.client;
    apply::<ConfigMap>(c, &ns, &build::model_config_map(pool)).await?;
    for (role, spec) in build::roles(pool) {
        let n = replicas
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, n)| *n)
            .unwrap_or(spec.replicas);
        apply::<Service>(c, &ns, &build::role_service(pool, role)).await?;
        apply::<Deployment>(
            c,
            &ns,
            &build::worker_deployment(pool, role, spec, n, &ctx.defaults),
        )
        .await?;
        apply::<PodDisruptionBudget>(c, &ns, &build::pdb(pool, role)).await?;
    }
    apply::<ServiceAccount>(c, &ns, &build::router_service_account(pool)).await?;
    apply::<RoleBinding>(c, &ns, &build::router_role_binding(pool)).await?;
    apply::<Deployment>(c, &ns, &build::router_deployment(pool, &ctx.defaults)).await?;
    apply::<Service>(c, &ns, &build::router_service(pool)).await?;
    Ok(())
}

async fn role_status(deployments: &Api<Deployment>, name: &str) -> Result<RoleStatus, Error> {
    let d = deployments.get_opt(name).await?;
    let desired = d
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(0);
    let ready = d
        .as_ref()
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0);
    Ok(RoleStatus { ready, desired })
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // The transition time moves only when the status does.
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(chrono::Utc::now()));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

fn ratio(s: &Option<RoleStatus>) -> Option<String> {
    s.as_ref().map(|s| format!("{}/{}", s.ready, s.desired))
}

/// The status as the cluster shows it: replicas ready per role, and conditions.
async fn observe(pool: &InferencePool, ctx: &Context) -> Result<InferencePoolStatus, Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let mut st = InferencePoolStatus {
        observed_generation: pool.metadata.generation,
        ..Default::default()
    };
    for (role, _) in build::roles(pool) {
        let s =
            Some(role_status(&deployments, &build::child_name(pool, Part::Worker(role))).await?);
        match role {
            Role::Prefill => st.prefill = s,
            Role::Decode => st.decode = s,
            Role::Unified => st.unified = s,
        }
    }
    st.router = Some(role_status(&deployments, &build::child_name(pool, Part::Router)).await?);
    (st.prefill_replicas, st.decode_replicas) = match pool.spec.mode {
        PoolMode::Disaggregated => (ratio(&st.prefill), ratio(&st.decode)),
        PoolMode::Colocated => (ratio(&st.unified), ratio(&st.unified)),
    };
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if let Some(p) = &pool.status {
        (st.ttft_ms, st.itl_ms) = (p.ttft_ms, p.itl_ms);
    }
    let all: Vec<(&str, &RoleStatus)> = [
        (Part::Worker(Role::Prefill), &st.prefill),
        (Part::Worker(Role::Decode), &st.decode),
        (Part::Worker(Role::Unified), &st.unified),
        (Part::Router, &st.router),
    ]
    .into_iter()
    .filter_map(|(part, s)| s.as_ref().map(|s| (part.as_str(), s)))
    .collect();
    let short: Vec<String> = all
        .iter()
        .filter(|(_, s)| s.ready < s.desired)
        .map(|(n, s)| format!("{n} {}/{}", s.ready, s.desired))
        .collect();
    let empty: Vec<&str> = all
        .iter()
        .filter(|(_, s)| s.desired > 0 && s.ready == 0)
        .map(|(n, _)| *n)
        .collect();
    let g = pool.metadata.generation;
    let ready = short.is_empty() && all.iter().all(|(_, s)| s.desired > 0 || s.ready == 0);
    st.conditions = vec![
        condition(
            "Ready",
            ready,
            if ready {
                "AllReplicasReady"
            } else {
                "ReplicasNotReady"
            },
            if ready {
                "every role has its replicas ready".into()
            } else {
                format!("waiting for {}", short.join(", "))
            },
            g,
            &previous,
        ),
        condition(
            "Progressing",
            !short.is_empty(),
            if short.is_empty() {
                "Stable"
            } else {
                "RollingOut"
            },
            if short.is_empty() {
                "no rollout in progress".into()
            } else {
                format!("bringing up {}", short.join(", "))
            },
            g,
            &previous,
        ),
        condition(
            "Degraded",
            !empty.is_empty(),
            if empty.is_empty() {
                "Serving"
            } else {
                "RoleUnavailable"
            },
            if empty.is_empty() {
                "every role has a ready replica".into()
            } else {
                format!("no ready replica for {}", empty.join(", "))
            },
            g,
            &previous,
        ),
    ];
    Ok(st)
}

async fn write_status(
    pool: &InferencePool,
    ctx: &Context,
    status: InferencePoolStatus,
) -> Result<(), Error> {
    let api: Api<InferencePool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().expect("namespaced"));
    let patch = serde_json::json!({"apiVersion": "pdfleet.dev/v1alpha1", "kind": "InferencePool", "status": status});
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn event(ctx: &Context, pool: &InferencePool, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &pool.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

/// Reads the pool's latencies from Prometheus when it names one, and, when autoscaling is
/// enabled, picks each worker role's replicas. Returns what it saw, the replicas (empty: the
/// spec's), and the time of the last change.
async fn autoscale(
    pool: &InferencePool,
    ctx: &Context,
) -> (autoscale::Observed, Vec<(Role, i32)>, Option<String>) {
    let previous = pool.status.as_ref().and_then(|s| s.last_scale_time.clone());
    let Some(a) = &pool.spec.autoscaling else {
        return (Default::default(), Vec::new(), previous);
    };
    let q = pool.spec.slo.as_ref().map(|s| s.quantile).unwrap_or(0.99);
    let ns = pool.namespace().expect("pools are namespaced");
    let seen = match autoscale::observe(&ctx.http, &a.prometheus_url, &ns, &pool.name_any(), q)
        .await
    {
        Ok(seen) => seen,
        Err(e) => {
            tracing::warn!(pool = %pool.name_any(), error = %e, "cannot read latencies from Prometheus");
            Default::default()
        }
    };
    let Some(slo) = pool.spec.slo.as_ref().filter(|_| a.enabled) else {
        return (seen, Vec::new(), previous);
    };
    let since = previous
        .as_ref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds() as f64)
        .unwrap_or(f64::INFINITY);
    let current = |role: Role| {
        let s = pool.status.as_ref();
        match role {
            Role::Prefill => s.and_then(|s| s.prefill.as_ref()),
            Role::Decode => s.and_then(|s| s.decode.as_ref()),
            Role::Unified => s.and_then(|s| s.unified.as_ref()),
        }
        .map(|r| r.desired)
    };
    let mut replicas = Vec::new();
    let mut changes = Vec::new();
    for (role, spec) in build::roles(pool) {
        let now = current(role).unwrap_or(spec.replicas);
        let (observed_ms, target_ms) = autoscale::driver(role, slo, &seen);
        let step = autoscale::Step {
            current: now,
            min: spec.min_replicas.unwrap_or(spec.replicas),
            max: spec.max_replicas.unwrap_or(spec.replicas),
            observed_ms,
            target_ms,
            since_change_s: since,
        };
        let next = autoscale::decide(step, a);
        if next != now {
            changes.push(format!("{role} {now} -> {next}"));
        }
        replicas.push((role, next));
    }
    if changes.is_empty() {
        return (seen, replicas, previous);
    }
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{v:.1} ms"))
            .unwrap_or_else(|| "no data".into())
    };
    let note = format!(
        "scaled {} (TTFT {}, ITL {})",
        changes.join(", "),
        ms(seen.ttft_ms),
        ms(seen.itl_ms)
    );
    event(ctx, pool, EventType::Normal, "Scaled", note).await;
    (seen, replicas, Some(chrono::Utc::now().to_rfc3339()))
}

pub async fn reconcile(pool: Arc<InferencePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics.reconciles.inc();
    if let Err(e) = validate(&pool) {
        event(
            &ctx,
            &pool,
            EventType::Warning,
            "InvalidSpec",
            e.to_string(),
        )
        .await;
        return Err(e);
    }
    let first_time =
        pool.status.as_ref().and_then(|s| s.observed_generation) != pool.metadata.generation;
    let (seen, replicas, scaled_at) = autoscale(&pool, &ctx).await;
    apply_children(&pool, &ctx, &replicas).await?;
    if first_time {
        event(
            &ctx,
            &pool,
            EventType::Normal,
            "Applied",
            format!(
                "applied the children of generation {}",
                pool.metadata.generation.unwrap_or(0)
            ),
        )
        .await;
    }
    let mut status = observe(&pool, &ctx).await?;
    if pool.spec.autoscaling.is_some() {
        let round = |v: Option<f64>| v.map(|v| (v * 100.0).round() / 100.0);
        (status.ttft_ms, status.itl_ms) = (round(seen.ttft_ms), round(seen.itl_ms));
    }
    status.last_scale_time = scaled_at;
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    write_status(&pool, &ctx, status).await?;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    // Children changes wake us through the watches; otherwise this is a safety net, or the
    // autoscaler's interval.
    let every = match &pool.spec.autoscaling {
        Some(a) => a.interval_seconds as u64,
        None if ready => 300,
        None => 15,
    };
    Ok(Action::requeue(Duration::from_secs(every)))
}

pub fn error_policy(pool: Arc<InferencePool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.inc();
    tracing::warn!(pool = %pool.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(match error {
        Error::Invalid(_) => 60,
        Error::Kube(_) => 5,
    }))
}
