//! The planner in the operator against an in-memory API server and a fake Prometheus that
//! answers each query by the metric and role it names: decisions reach the Deployments, the
//! status and the events; no metrics holds; External mode leaves replicas to the RoleScale.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::Query;
use axum::routing::get;
use kube::runtime::events::{Recorder, Reporter};
use pdfleet_api::metrics::{router, worker};
use pdfleet_crds::InferencePool;
use serde_json::{json, Value};

use super::prometheus::Prometheus;
use super::{Autoscaler, PromConfig};
use crate::fake_api::FakeApi;
use crate::metrics::Metrics;
use crate::reconcile::{reconcile, Context};

const POOL: &str = "/apis/pdfleet.dev/v1alpha1/namespaces/ml/inferencepools/chat";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/ml/deployments/";
const SCALES: &str = "/apis/pdfleet.dev/v1alpha1/namespaces/ml/rolescales/";

/// Answers: the value of the first rule whose fragments are all in the query.
type Rules = Arc<Mutex<Vec<(Vec<String>, f64)>>>;

async fn fake_prometheus(rules: Rules) -> String {
    let app = axum::Router::new().route(
        "/api/v1/query",
        get(move |Query(q): Query<std::collections::HashMap<String, String>>| {
            let rules = rules.clone();
            async move {
                let query = q.get("query").cloned().unwrap_or_default();
                let rules = rules.lock().unwrap();
                let hit = rules
                    .iter()
                    .find(|(frags, _)| frags.iter().all(|f| query.contains(f.as_str())));
                let result: Vec<Value> = match hit {
                    Some((_, v)) if query.contains("by (le, part)") => ["queue", "prefill", "transfer", "admission"]
                        .iter()
                        .map(|p| json!({"metric": {"part": p}, "value": [0, (v / 4.0).to_string()]}))
                        .collect(),
                    Some((_, v)) => vec![json!({"metric": {}, "value": [0, v.to_string()]})],
                    None => vec![],
                };
                axum::Json(json!({"status": "success", "data": {"resultType": "vector", "result": result}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn rule(fragments: &[&str], v: f64) -> (Vec<String>, f64) {
    (fragments.iter().map(|f| f.to_string()).collect(), v)
}

/// A pool whose prompts need about three prefill replicas and whose decode needs one.
fn prefill_bound() -> Vec<(Vec<String>, f64)> {
    let p = "role=\"prefill\"";
    let d = "role=\"decode\"";
    vec![
        rule(&["max_over_time"], 10_000.0),
        rule(&[router::ARRIVALS], 10.0),
        rule(&[router::PROMPT_TOKENS], 10_000.0),
        rule(&[router::REQUESTED_TOKENS], 160.0),
        rule(&[router::TTFT_PART], 0.4),
        rule(&[router::TTFT], 0.4),
        rule(&[router::ITL], 0.01),
        rule(&[worker::PREFILL_TOKENS, p], 4_000.0),
        rule(&[worker::PREFILL_BUSY_SECONDS, p], 1.0),
        rule(&[worker::QUEUED_PROMPT_TOKENS], 0.0),
        rule(&[worker::DECODE_STEPS, d], 50.0),
        rule(&[worker::DECODE_STEP_BATCH_SQUARED, d], 3_200.0),
        rule(&[worker::DECODE_STEP_BATCH_SECONDS, d], 4.0),
        rule(&[worker::DECODE_STEP_BATCH, d], 400.0),
        rule(&[worker::DECODE_STEP_SECONDS, d], 0.5),
        rule(&[worker::KV_BLOCKS_TOTAL, d], 4096.0),
        rule(&[worker::KV_BLOCKS_USED, d], 100.0),
    ]
}

fn context(api: &FakeApi, prom: Option<&str>) -> Arc<Context> {
    let client = api.client();
    let plain = reqwest::Client::new();
    Arc::new(Context {
        client: client.clone(),
        autoscaler: Autoscaler::new(
            PromConfig {
                operator: prom.map(|url| Prometheus::new(plain.clone(), url, None)),
                plain,
                allow_pool_override: false,
            },
            tokio::sync::mpsc::unbounded_channel().0,
        ),
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

fn put_pool(api: &FakeApi, autoscaling: Value) {
    let status = api.get(POOL).and_then(|p| p.get("status").cloned());
    let mut pool = json!({"apiVersion": "pdfleet.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "chat", "namespace": "ml", "uid": "pool-uid", "generation": 1},
        "spec": {"model": {}, "router": {"replicas": 0},
            "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
            "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
            "slo": {"ttftMs": 500, "itlMs": 50}, "autoscaling": autoscaling}});
    if let Some(s) = status {
        pool["status"] = s;
    }
    api.put(POOL, pool);
}

fn pool(api: &FakeApi) -> InferencePool {
    serde_json::from_value(api.get(POOL).unwrap()).unwrap()
}

/// The Deployments' controller: every replica asked for is ready.
fn all_ready(api: &FakeApi) {
    for path in api.paths(DEPLOYMENTS) {
        api.edit(&path, |d| {
            let n = d["spec"]["replicas"].clone();
            d["status"] = json!({"observedGeneration": d["metadata"]["generation"], "replicas": n,
                "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n});
        });
    }
}

fn replicas(api: &FakeApi, role: &str) -> i64 {
    api.get(&format!("{DEPLOYMENTS}chat-{role}")).unwrap()["spec"]["replicas"]
        .as_i64()
        .unwrap()
}

fn condition(api: &FakeApi, type_: &str) -> (String, String, String) {
    let pool = api.get(POOL).unwrap();
    let c = pool["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
        .clone();
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (s("status"), s("reason"), s("message"))
}

fn events(api: &FakeApi) -> Vec<(String, String)> {
    api.paths("/apis/events.k8s.io/v1/namespaces/ml/events/")
        .into_iter()
        .map(|p| {
            let e = api.get(&p).unwrap();
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("reason"), s("note"))
        })
        .collect()
}

/// One planner tick, then one reconcile, as the ticker and the controller would run them.
async fn tick_and_reconcile(api: &FakeApi, ctx: &Arc<Context>) {
    let p = pool(api);
    ctx.autoscaler.due(ctx, &p, Instant::now());
    ctx.autoscaler.tick(ctx, &p).await;
    reconcile(Arc::new(pool(api)), ctx.clone()).await.unwrap();
    all_ready(api);
}

#[tokio::test]
async fn a_prefill_bound_pool_grows_prefill_only_and_says_why() {
    let api = FakeApi::default();
    let rules: Rules = Arc::new(Mutex::new(prefill_bound()));
    let url = fake_prometheus(rules.clone()).await;
    let ctx = context(&api, Some(&url));
    put_pool(&api, json!({}));
    reconcile(Arc::new(pool(&api)), ctx.clone()).await.unwrap();
    all_ready(&api);
    for _ in 0..3 {
        tick_and_reconcile(&api, &ctx).await;
    }
    assert!(
        replicas(&api, "prefill") >= 3,
        "{}",
        replicas(&api, "prefill")
    );
    assert_eq!(replicas(&api, "decode"), 1);
    let status = api.get(POOL).unwrap()["status"].clone();
    assert_eq!(status["prefill"]["demand"], 10_000.0);
    assert_eq!(status["prefill"]["capacityPerReplica"], 4_000.0);
    assert!(status["prefill"]["lastScaleReason"]
        .as_str()
        .unwrap()
        .starts_with("up "));
    assert_eq!(condition(&api, "MetricsAvailable").0, "True");
    assert_eq!(condition(&api, "ScalingActive").0, "True");
    assert_eq!(condition(&api, "SLOAttainable").0, "True");
    let scaled: Vec<String> = events(&api)
        .into_iter()
        .filter(|(r, _)| r == "Scaled")
        .map(|(_, n)| n)
        .collect();
    assert!(
        !scaled.is_empty()
            && scaled
                .iter()
                .all(|n| n.starts_with("prefill 1 -> 2") || n.starts_with("prefill 2 -> ")),
        "{scaled:?}"
    );
    let m = ctx.metrics.encode();
    assert!(m.contains(
        "pdfleet_operator_recommended_replicas{namespace=\"ml\",pool=\"chat\",role=\"prefill\"}"
    ));

    // Prometheus goes away: the replicas hold, the condition and an event say why.
    let before = (replicas(&api, "prefill"), replicas(&api, "decode"));
    rules.lock().unwrap().clear();
    put_pool(&api, json!({"prometheusUrl": "http://127.0.0.1:9/"}));
    tick_and_reconcile(&api, &ctx).await;
    let (status, reason, _) = condition(&api, "MetricsAvailable");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "PoolPrometheusRefused")
    );
    put_pool(&api, json!({}));
    for _ in 0..3 {
        tick_and_reconcile(&api, &ctx).await;
    }
    assert_eq!(
        (replicas(&api, "prefill"), replicas(&api, "decode")),
        before,
        "no metrics: no change"
    );
    let (status, reason, message) = condition(&api, "MetricsAvailable");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NoSeries"),
        "{message}"
    );
    assert_eq!(condition(&api, "ScalingActive").1, "NoMetrics");
    assert!(events(&api).iter().any(|(r, _)| r == "MetricsUnavailable"));
}

#[tokio::test]
async fn an_unreachable_prometheus_holds_and_an_unattainable_target_is_reported() {
    let api = FakeApi::default();
    let ctx = context(&api, Some("http://127.0.0.1:9"));
    put_pool(&api, json!({}));
    reconcile(Arc::new(pool(&api)), ctx.clone()).await.unwrap();
    all_ready(&api);
    tick_and_reconcile(&api, &ctx).await;
    assert_eq!(
        condition(&api, "MetricsAvailable").1,
        "PrometheusUnreachable"
    );
    assert_eq!(
        (replicas(&api, "prefill"), replicas(&api, "decode")),
        (1, 1)
    );

    // A TTFT target below one prompt's own prefill time (1000 tokens at 4000 tokens/s).
    let api = FakeApi::default();
    let url = fake_prometheus(Arc::new(Mutex::new(prefill_bound()))).await;
    let ctx = context(&api, Some(&url));
    put_pool(&api, json!({}));
    api.edit(POOL, |p| p["spec"]["slo"]["ttftMs"] = json!(100));
    reconcile(Arc::new(pool(&api)), ctx.clone()).await.unwrap();
    all_ready(&api);
    for _ in 0..4 {
        tick_and_reconcile(&api, &ctx).await;
    }
    let (status, _, message) = condition(&api, "SLOAttainable");
    assert_eq!(status, "False");
    assert!(
        message.contains("prefill") && message.contains("100 ms"),
        "{message}"
    );
    assert!(replicas(&api, "prefill") < 4 || message.contains("sized by demand"));
    assert!(events(&api).iter().any(|(r, _)| r == "SLOUnattainable"));
}

#[tokio::test]
async fn in_external_mode_the_role_scale_sets_the_replicas_and_the_planner_only_recommends() {
    let api = FakeApi::default();
    let url = fake_prometheus(Arc::new(Mutex::new(prefill_bound()))).await;
    let ctx = context(&api, Some(&url));
    put_pool(&api, json!({"mode": "External"}));
    reconcile(Arc::new(pool(&api)), ctx.clone()).await.unwrap();
    all_ready(&api);
    let scale = api
        .get(&format!("{SCALES}chat-prefill"))
        .expect("a RoleScale per role");
    assert_eq!(scale["spec"]["replicas"], 1);
    assert!(api.get(&format!("{SCALES}chat-decode")).is_some());
    tick_and_reconcile(&api, &ctx).await;
    assert_eq!(
        replicas(&api, "prefill"),
        1,
        "the planner does not write replicas"
    );
    let scale = api.get(&format!("{SCALES}chat-prefill")).unwrap();
    assert!(
        scale["status"]["recommended"].as_i64().unwrap() >= 3,
        "{scale}"
    );
    assert_eq!(
        scale["status"]["selector"],
        "pdfleet.dev/pool=chat,pdfleet.dev/role=prefill"
    );
    assert_eq!(condition(&api, "ScalingActive").1, "External");
    // An HPA scales the RoleScale: the Deployment follows, within the role's bounds.
    api.edit(&format!("{SCALES}chat-prefill"), |s| {
        s["spec"]["replicas"] = json!(9)
    });
    tick_and_reconcile(&api, &ctx).await;
    assert_eq!(replicas(&api, "prefill"), 4);
    // Back to Builtin: the RoleScales go.
    put_pool(&api, json!({}));
    tick_and_reconcile(&api, &ctx).await;
    assert!(api.paths(SCALES).is_empty());
}
