//! Reconcile, as a pipeline: validate the pool, see where its pods are, decide each role's
//! replicas, build the children it wants, apply them, delete those it no longer wants, and write
//! a status that says what is really there. A step that fails says so in the pool's Ready
//! condition and an Event, not only in the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use pdfleet_api::Role;
use pdfleet_crds::{InferencePool, InferencePoolStatus, PoolMode, RoleSpec};

use crate::apply::{self, FIELD_MANAGER};
use crate::apply::{report_scales, scaled_replicas};
use crate::autoscale::{self, Autoscaler};
use crate::build::{self, Defaults};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::observe;
use crate::status;

pub struct Context {
    pub client: Client,
    pub autoscaler: Autoscaler,
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

async fn write_status(
    pool: &InferencePool,
    ctx: &Context,
    status: &InferencePoolStatus,
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

pub async fn event(
    ctx: &Context,
    pool: &InferencePool,
    type_: EventType,
    reason: &str,
    note: String,
) {
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

/// Each worker role's replicas: the spec's without autoscaling; the planner's decision in
/// Builtin mode (the Deployment's count until its first, so a restarted operator changes
/// nothing); the RoleScale's in External mode. Always within the role's bounds.
fn replicas_for(
    pool: &InferencePool,
    role: Role,
    spec: &RoleSpec,
    decided: Option<&autoscale::Decided>,
    running: &BTreeMap<Role, status::Rollout>,
    scaled: &BTreeMap<Role, i32>,
) -> i32 {
    if pool.spec.autoscaling.is_none() {
        return spec.replicas;
    }
    let current = running.get(&role).map_or(spec.replicas, |r| r.desired);
    let n = if build::external_scaling(pool) {
        scaled.get(&role).copied().unwrap_or(current)
    } else {
        decided
            .and_then(|d| d.decision(role))
            .map_or(current, |d| d.desired as i32)
    };
    let b = autoscale::bounds(spec);
    n.clamp(b.min as i32, b.max as i32)
}

/// One pass of the pipeline.
async fn run(pool: &InferencePool, ctx: &Context) -> Result<Action, Error> {
    validate(pool)?;
    let pods = observe::pods(&ctx.client, pool).await?;
    let running = observe::workloads(&ctx.client, pool).await?;
    let scaled = if build::external_scaling(pool) {
        scaled_replicas(&ctx.client, pool).await?
    } else {
        BTreeMap::new()
    };
    let decided = ctx.autoscaler.decided(pool);
    let count = |role: Role, spec: &RoleSpec| {
        replicas_for(pool, role, spec, decided.as_ref(), &running, &scaled)
    };
    let children = build::children(pool, count, &ctx.defaults, &pods.domains);
    let applied = apply::apply(&ctx.client, pool, &children).await?;
    let pruned = apply::prune(&ctx.client, pool, &children).await?;
    if !pruned.is_empty() {
        for kind_name in &pruned {
            let kind = kind_name.split('/').next().unwrap_or_default();
            ctx.metrics.pruned.with_label_values(&[kind]).inc();
        }
        event(
            ctx,
            pool,
            EventType::Normal,
            "Pruned",
            format!(
                "deleted what the pool no longer runs: {}",
                pruned.join(", ")
            ),
        )
        .await;
    }
    let first_time =
        pool.status.as_ref().and_then(|s| s.observed_generation) != pool.metadata.generation;
    if first_time {
        event(
            ctx,
            pool,
            EventType::Normal,
            "Applied",
            format!(
                "applied the children of generation {}",
                pool.metadata.generation.unwrap_or(0)
            ),
        )
        .await;
    }
    let mut st = status::compute(pool, &applied, &pods.unplaced);
    autoscale::report::fill(&mut st, pool, decided.as_ref());
    if build::external_scaling(pool) {
        let mut ready = BTreeMap::new();
        let mut recommended = BTreeMap::new();
        for (role, _) in build::roles(pool) {
            let rs = st.role(role);
            ready.insert(role, rs.map_or(0, |r| r.ready));
            if let Some(r) = rs.and_then(|r| r.recommended) {
                recommended.insert(role, r);
            }
        }
        report_scales(&ctx.client, pool, &ready, &recommended).await?;
    }
    let roles: Vec<(Role, i32, i32)> = build::roles(pool)
        .into_iter()
        .map(|(role, _)| {
            let rs = st.role(role);
            (role, rs.map_or(0, |r| r.desired), rs.map_or(0, |r| r.ready))
        })
        .collect();
    ctx.metrics.observe_pool(
        &pool.namespace().unwrap_or_default(),
        &pool.name_any(),
        &roles,
        pool.spec.slo.as_ref(),
        &st.conditions,
    );
    let settled = st.conditions.iter().all(|c| match c.type_.as_str() {
        "Ready" | "Placement" => c.status == "True",
        _ => true,
    });
    write_status(pool, ctx, &st).await?;
    // Children changes wake us through the watches, and the planner wakes us when it decides;
    // pods and nodes do not, so an unsettled pool is looked at again soon. Otherwise this is a
    // safety net.
    let every = if settled { 300 } else { 10 };
    Ok(Action::requeue(Duration::from_secs(every)))
}

pub async fn reconcile(pool: Arc<InferencePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = run(&pool, &ctx).await;
    match &result {
        Ok(_) => ctx.metrics.duration.observe(start.elapsed().as_secs_f64()),
        // What a person must act on goes into the pool's status and events.
        Err(e @ (Error::Invalid(_) | Error::Apply { .. })) => {
            event(&ctx, &pool, EventType::Warning, e.reason(), e.to_string()).await;
            let st = status::failed(&pool, e.reason(), e.to_string());
            if let Err(w) = write_status(&pool, &ctx, &st).await {
                tracing::warn!(error = %w, "could not write the failure into the status");
            }
        }
        Err(_) => {}
    }
    result
}

pub fn error_policy(pool: Arc<InferencePool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error);
    tracing::warn!(pool = %pool.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(match error {
        Error::Invalid(_) => 60,
        Error::Apply { .. } => 15,
        Error::Kube(_) => 5,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::prometheus::Prometheus;
    use crate::autoscale::PromConfig;
    use crate::fake_api::FakeApi;
    use http::Method;
    use kube::runtime::events::Reporter;
    use serde_json::{json, Value};

    const POOL: &str = "/apis/pdfleet.dev/v1alpha1/namespaces/ml/inferencepools/chat";
    const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/ml/deployments/";

    fn context(api: &FakeApi) -> Arc<Context> {
        context_with(api, None)
    }

    /// A context whose planner reads the Prometheus at `prom`.
    fn context_with(api: &FakeApi, prom: Option<&str>) -> Arc<Context> {
        let client = api.client();
        let plain = reqwest::Client::new();
        let prom = PromConfig {
            operator: prom.map(|url| Prometheus::new(plain.clone(), url, None)),
            plain,
            allow_pool_override: false,
        };
        Arc::new(Context {
            client: client.clone(),
            autoscaler: Autoscaler::new(prom, tokio::sync::mpsc::unbounded_channel().0),
            defaults: crate::build::tests::defaults(),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
            metrics: Metrics::new(),
        })
    }

    /// Stores the pool as the API server would, with a new generation for a new spec.
    fn put_pool(api: &FakeApi, spec: Value, generation: i64) {
        let status = api.get(POOL).and_then(|p| p.get("status").cloned());
        let mut pool = json!({"apiVersion": "pdfleet.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "pool-uid", "generation": generation},
            "spec": spec});
        if let Some(s) = status {
            pool["status"] = s;
        }
        api.put(POOL, pool);
    }

    async fn reconcile_once(api: &FakeApi, ctx: &Arc<Context>) -> Result<Action, Error> {
        let pool: InferencePool = serde_json::from_value(api.get(POOL).unwrap()).unwrap();
        reconcile(Arc::new(pool), ctx.clone()).await
    }

    fn names(api: &FakeApi, prefix: &str) -> Vec<String> {
        api.paths(prefix)
            .into_iter()
            .map(|p| p.rsplit('/').next().unwrap().to_string())
            .collect()
    }

    fn condition(api: &FakeApi, type_: &str) -> (String, String, String) {
        let pool = api.get(POOL).unwrap();
        let c = pool["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap()
            .clone();
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        (s("status"), s("reason"), s("message"))
    }

    fn event_reasons(api: &FakeApi) -> Vec<String> {
        api.paths("/apis/events.k8s.io/v1/namespaces/ml/events/")
            .into_iter()
            .map(|p| api.get(&p).unwrap()["reason"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn children_the_pool_no_longer_wants_are_deleted_and_only_those() {
        let api = FakeApi::default();
        let ctx = context(&api);
        put_pool(
            &api,
            json!({"model": {}, "prefill": {}, "decode": {}, "router": {"replicas": 1}}),
            1,
        );
        reconcile_once(&api, &ctx).await.unwrap();
        assert_eq!(
            names(&api, DEPLOYMENTS),
            ["chat-decode", "chat-prefill", "chat-router"]
        );
        // Someone else's Deployment that carries the pool's labels is not ours to delete.
        let mut foreign = api.get(&format!("{DEPLOYMENTS}chat-prefill")).unwrap();
        foreign["metadata"]["name"] = json!("chat-extra");
        foreign["metadata"]["ownerReferences"][0]["uid"] = json!("another-pool");
        api.put(&format!("{DEPLOYMENTS}chat-extra"), foreign);

        put_pool(
            &api,
            json!({"model": {}, "mode": "Colocated", "unified": {"replicas": 2}}),
            2,
        );
        reconcile_once(&api, &ctx).await.unwrap();
        assert_eq!(
            names(&api, DEPLOYMENTS),
            ["chat-extra", "chat-router", "chat-unified"]
        );
        assert_eq!(
            names(&api, "/api/v1/namespaces/ml/services/"),
            ["chat", "chat-unified"]
        );
        assert_eq!(
            names(&api, "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/"),
            ["chat-unified"]
        );
        assert!(event_reasons(&api).contains(&"Pruned".to_string()));

        put_pool(
            &api,
            json!({"model": {}, "mode": "Colocated", "unified": {"replicas": 2}, "router": {"replicas": 0}}),
            3,
        );
        reconcile_once(&api, &ctx).await.unwrap();
        assert_eq!(names(&api, DEPLOYMENTS), ["chat-extra", "chat-unified"]);
        assert_eq!(
            names(&api, "/api/v1/namespaces/ml/services/"),
            ["chat-unified"]
        );
        assert!(names(&api, "/api/v1/namespaces/ml/serviceaccounts/").is_empty());
        assert!(names(
            &api,
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/rolebindings/"
        )
        .is_empty());
    }

    fn finish_rollouts(api: &FakeApi) {
        for path in api.paths(DEPLOYMENTS) {
            api.edit(&path, |d| {
                let n = d["spec"]["replicas"].clone();
                d["status"] = json!({"observedGeneration": d["metadata"]["generation"], "replicas": n,
                    "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n});
            });
        }
    }

    #[tokio::test]
    async fn ready_reports_the_rollout_of_the_current_generation() {
        let api = FakeApi::default();
        let ctx = context(&api);
        let spec = |decode: i32| json!({"model": {}, "prefill": {}, "decode": {"replicas": decode}, "router": {"replicas": 1}});
        put_pool(&api, spec(1), 1);
        reconcile_once(&api, &ctx).await.unwrap();
        let (status, reason, _) = condition(&api, "Ready");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "RollingOut"));
        finish_rollouts(&api);
        reconcile_once(&api, &ctx).await.unwrap();
        assert_eq!(condition(&api, "Ready").0, "True");
        assert_eq!(api.get(POOL).unwrap()["status"]["observedGeneration"], 1);
        // A new generation: the decode Deployment changes, its controller has not caught up.
        put_pool(&api, spec(2), 2);
        reconcile_once(&api, &ctx).await.unwrap();
        let (status, reason, message) = condition(&api, "Ready");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "RollingOut"));
        assert!(message.contains("decode"), "{message}");
        let pool = api.get(POOL).unwrap();
        assert_eq!(pool["status"]["observedGeneration"], 2);
        let ready = pool["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(
            ready["observedGeneration"], 2,
            "kubectl wait compares the condition's generation with the pool's"
        );
        finish_rollouts(&api);
        reconcile_once(&api, &ctx).await.unwrap();
        assert_eq!(condition(&api, "Ready").0, "True");
        assert_eq!(api.get(POOL).unwrap()["status"]["decodeReplicas"], "2/2");
    }

    #[tokio::test]
    async fn a_refused_child_is_an_event_and_a_ready_condition_with_the_reason() {
        let api = FakeApi::default();
        let ctx = context(&api);
        put_pool(&api, json!({"model": {}, "prefill": {}, "decode": {}}), 1);
        api.refuse(
            Method::PATCH,
            "/deployments/chat-decode",
            403,
            "exceeded quota: gpus, requested: nvidia.com/gpu=1",
        );
        let e = reconcile_once(&api, &ctx).await.unwrap_err();
        assert_eq!(e.metric_label(), "apply");
        let (status, reason, message) = condition(&api, "Ready");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "ApplyFailed"));
        assert!(
            message.contains("Deployment chat-decode") && message.contains("exceeded quota"),
            "{message}"
        );
        assert!(event_reasons(&api).contains(&"ApplyFailed".to_string()));
        let tried = api
            .requests()
            .iter()
            .filter(|(m, p)| *m == Method::PATCH && p.ends_with("/deployments/chat-decode"))
            .count();
        assert_eq!(tried, 1);
    }
}
