//! The SLO planner in the operator. It runs on its own clock: every second a ticker looks at
//! the pools whose interval is due, reads their signals from Prometheus, and runs the planner
//! crate's decision code (the same code `pdfleet simulate` runs) on them. Reconcile only applies
//! what it decided: the replicas in Builtin mode, the recommendation always, and the status.
//! A change of replicas, of a condition, or 30 s without a status update wakes the pool's
//! reconcile.

pub mod prometheus;
pub mod report;
pub mod signals;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use pdfleet_api::metrics::worker;
use pdfleet_api::{labels, Role};
use pdfleet_crds::{AutoscalingMode, InferencePool, RoleSpec};
use pdfleet_planner::planner::{Bounds, Plan, RoleDecision};
use pdfleet_planner::{Planner, PlannerConfig, RoleSignals, Signals};
use tokio::sync::mpsc;

use self::prometheus::{PromError, Prometheus};
use self::signals::PoolView;
use crate::build;
use crate::observe;
use crate::reconcile::{event, Context};
use crate::status::Rollout;

/// Why the planner has no signals for a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct NoMetrics {
    pub reason: &'static str,
    pub message: String,
}

/// What the planner last decided for a pool, as reconcile reads it.
#[derive(Clone, Debug, Default)]
pub struct Decided {
    pub plan: Option<Plan>,
    /// `None` until the first tick.
    pub metrics: Option<Result<(), NoMetrics>>,
    pub ttft_s: Option<f64>,
    pub itl_s: Option<f64>,
    /// Per role: when the planner last changed its replicas (RFC 3339), and why.
    pub last_scale: BTreeMap<Role, (String, String)>,
}

impl Decided {
    /// A role's decision: the plan's prefill stands for the unified role of a Colocated pool.
    pub fn decision(&self, role: Role) -> Option<&RoleDecision> {
        let plan = self.plan.as_ref()?;
        match role {
            Role::Decode => plan.decode.as_ref(),
            Role::Prefill | Role::Unified => Some(&plan.prefill),
        }
    }

    /// What reconcile compares to decide whether the status needs writing.
    fn summary(&self) -> String {
        let plan = self.plan.as_ref();
        let role = |d: Option<&RoleDecision>| {
            d.map(|d| {
                format!(
                    "{}/{}/{}/{:?}",
                    d.desired, d.recommended, d.attainable, d.limit
                )
            })
        };
        format!(
            "{:?} {:?} {:?} {:?} {:?}",
            self.metrics,
            plan.map(|p| role(Some(&p.prefill))),
            plan.map(|p| role(p.decode.as_ref())),
            plan.and_then(|p| p.no_data.clone()),
            plan.and_then(|p| p.bottleneck),
        )
    }
}

struct PoolState {
    /// Namespace and name, to drop its metric series once it is gone.
    pool: (String, String),
    planner: Planner,
    next_tick: Instant,
    last_wake: Instant,
    decided: Decided,
}

/// Where the operator's Prometheus is, and whether pools may name their own.
pub struct PromConfig {
    pub operator: Option<Prometheus>,
    /// For pools' own URLs: no credentials of the operator's go there.
    pub plain: reqwest::Client,
    pub allow_pool_override: bool,
}

pub struct Autoscaler {
    prom: PromConfig,
    start: Instant,
    pools: Mutex<HashMap<String, PoolState>>,
    wake: mpsc::UnboundedSender<ObjectRef<InferencePool>>,
}

/// A status is written at least this often while a pool autoscales.
const REFRESH: Duration = Duration::from_secs(30);

fn key(pool: &InferencePool) -> String {
    pool.uid().unwrap_or_else(|| {
        format!(
            "{}/{}",
            pool.namespace().unwrap_or_default(),
            pool.name_any()
        )
    })
}

/// A role's bounds: without `minReplicas`/`maxReplicas` the role stays at `replicas`.
pub fn bounds(spec: &RoleSpec) -> Bounds {
    let min = spec.min_replicas.unwrap_or(spec.replicas).max(0) as u32;
    let max = spec.max_replicas.unwrap_or(spec.replicas).max(0) as u32;
    Bounds {
        min,
        max: max.max(min),
    }
}

/// The planner's configuration from the pool's spec; `None` when it does not autoscale.
pub fn config(pool: &InferencePool) -> Option<PlannerConfig> {
    let a = pool.spec.autoscaling.as_ref()?;
    let slo = pool.spec.slo.as_ref()?;
    let roles = build::roles(pool);
    let mut cfg = PlannerConfig::new(
        slo.ttft_ms as f64 / 1000.0,
        slo.itl_ms as f64 / 1000.0,
        slo.quantile,
    );
    cfg.prefill = bounds(roles.first()?.1);
    cfg.decode = roles.get(1).map(|(_, spec)| bounds(spec));
    cfg.scale_down_window_s = a.scale_down_window_seconds as f64;
    cfg.backlog_clear_s = a.backlog_clear_seconds as f64;
    Some(cfg)
}

impl Autoscaler {
    pub fn new(prom: PromConfig, wake: mpsc::UnboundedSender<ObjectRef<InferencePool>>) -> Self {
        Autoscaler {
            prom,
            start: Instant::now(),
            pools: Mutex::new(HashMap::new()),
            wake,
        }
    }

    /// What the planner last decided for the pool.
    pub fn decided(&self, pool: &InferencePool) -> Option<Decided> {
        let pools = self.pools.lock().expect("not poisoned");
        pools.get(&key(pool)).map(|s| s.decided.clone())
    }

    fn prometheus(&self, pool: &InferencePool) -> Result<Prometheus, NoMetrics> {
        let own = pool
            .spec
            .autoscaling
            .as_ref()
            .and_then(|a| a.prometheus_url.as_deref());
        match (own, &self.prom.operator) {
            (Some(url), _) if self.prom.allow_pool_override => {
                Ok(Prometheus::new(self.prom.plain.clone(), url, None))
            }
            (Some(_), _) => Err(NoMetrics {
                reason: "PoolPrometheusRefused",
                message: "this operator does not let pools name their own Prometheus (chart value prometheus.allowPoolOverride); remove spec.autoscaling.prometheusUrl".into(),
            }),
            (None, Some(p)) => Ok(p.clone()),
            (None, None) => Err(NoMetrics {
                reason: "NoPrometheus",
                message: "the operator has no Prometheus to read (flag --prometheus-url, chart value prometheus.url)".into(),
            }),
        }
    }

    /// Runs the ticker until the process ends.
    pub async fn run(ctx: Arc<Context>, pools: Store<InferencePool>) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let pools = pools.state();
            let me = &ctx.autoscaler;
            me.forget_all_but(&ctx, &pools);
            ctx.metrics.retain_pools(
                &pools
                    .iter()
                    .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
                    .collect(),
            );
            let now = Instant::now();
            let due: Vec<Arc<InferencePool>> =
                pools.into_iter().filter(|p| me.due(&ctx, p, now)).collect();
            futures_util::stream::iter(due)
                .for_each_concurrent(8, |pool| {
                    let ctx = ctx.clone();
                    async move { ctx.autoscaler.tick(&ctx, &pool).await }
                })
                .await;
        }
    }

    /// Drops the planners of pools that are gone, and their metric series.
    fn forget_all_but(&self, ctx: &Context, pools: &[Arc<InferencePool>]) {
        let live: HashSet<String> = pools.iter().map(|p| key(p)).collect();
        let mut states = self.pools.lock().expect("not poisoned");
        states.retain(|k, state| {
            let keep = live.contains(k);
            if !keep {
                ctx.metrics.forget_planner(&state.pool.0, &state.pool.1);
            }
            keep
        });
    }

    /// Whether the pool's interval is up (a new autoscaling pool is due at once); keeps its
    /// planner's bounds and targets as the spec says now, and what it learned.
    pub fn due(&self, ctx: &Context, pool: &InferencePool, now: Instant) -> bool {
        let mut states = self.pools.lock().expect("not poisoned");
        let Some(cfg) = config(pool) else {
            if let Some(gone) = states.remove(&key(pool)) {
                ctx.metrics.forget_planner(&gone.pool.0, &gone.pool.1);
            }
            return false;
        };
        let interval = Duration::from_secs(
            pool.spec
                .autoscaling
                .as_ref()
                .map_or(5, |a| a.interval_seconds) as u64,
        );
        let state = states.entry(key(pool)).or_insert_with(|| PoolState {
            pool: (pool.namespace().unwrap_or_default(), pool.name_any()),
            planner: Planner::new(cfg.clone()),
            next_tick: now,
            last_wake: now,
            decided: Decided::default(),
        });
        state.planner.cfg = cfg;
        if state.next_tick > now {
            return false;
        }
        state.next_tick = now + interval;
        true
    }

    /// One planning step for one pool.
    pub async fn tick(&self, ctx: &Context, pool: &InferencePool) {
        let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
        let Some(a) = pool.spec.autoscaling.as_ref() else {
            return;
        };
        let workloads = match observe::workloads(&ctx.client, pool).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(pool = %name, error = %e, "cannot read the pool's Deployments");
                return;
            }
        };
        let roles: Vec<(Role, RoleSignals)> = build::roles(pool)
            .into_iter()
            .map(|(role, spec)| {
                let r = workloads.get(&role).copied().unwrap_or(Rollout {
                    desired: spec.replicas,
                    ..Default::default()
                });
                let base = RoleSignals {
                    desired: r.desired.max(0) as u32,
                    ready: r.ready.max(0) as u32,
                    rolling: r.rolling,
                    ..Default::default()
                };
                (role, base)
            })
            .collect();
        let now_s = self.start.elapsed().as_secs_f64();
        let view = PoolView {
            namespace: &ns,
            pool: &name,
            quantile: pool.spec.slo.as_ref().map_or(0.99, |s| s.quantile),
            block_size: pool
                .spec
                .prefill
                .as_ref()
                .or(pool.spec.unified.as_ref())
                .and_then(|r| r.engine.block_size)
                .unwrap_or(16) as f64,
            roles: roles.clone(),
        };
        let (signals, metrics) = match self.prometheus(pool) {
            Ok(prom) => match signals::read(&prom, &view, now_s).await {
                Ok(s) if s.demand.is_some() => (s, Ok(())),
                Ok(s) => (
                    s,
                    Err(NoMetrics {
                        reason: "NoSeries",
                        message: format!(
                            "Prometheus at {} has no request series of pool {name} in {ns} yet (is the router scraped?)",
                            prom.url
                        ),
                    }),
                ),
                Err(e) => (no_signals(&roles, now_s), Err(e.into())),
            },
            Err(why) => (no_signals(&roles, now_s), Err(why)),
        };
        let outcome = if metrics.is_ok() {
            "planned"
        } else {
            "no_data"
        };
        ctx.metrics.ticks.with_label_values(&[outcome]).inc();
        let (plan, previous) = {
            let mut pools = self.pools.lock().expect("not poisoned");
            let Some(state) = pools.get_mut(&key(pool)) else {
                return;
            };
            let plan = state.planner.plan(&signals);
            (plan, state.decided.clone())
        };
        tracing::debug!(
            pool = %name,
            demand = ?signals.demand,
            prefill = %plan.prefill.reason,
            decode = %plan.decode.as_ref().map_or("", |d| d.reason.as_str()),
            no_data = ?plan.no_data,
            "planned"
        );
        let builtin = a.mode == AutoscalingMode::Builtin;
        let mut decided = Decided {
            plan: Some(plan.clone()),
            metrics: Some(metrics.clone()),
            ttft_s: signals.ttft_s,
            itl_s: signals.itl_s,
            last_scale: previous.last_scale.clone(),
        };
        let decisions: Vec<(Role, RoleDecision)> = roles
            .iter()
            .filter_map(|(role, _)| decided.decision(*role).map(|d| (*role, d.clone())))
            .collect();
        let mut changed = false;
        for (role, d) in &decisions {
            let labels = [ns.as_str(), name.as_str(), role.as_str()];
            ctx.metrics
                .recommended
                .with_label_values(&labels)
                .set(d.recommended as i64);
            if !builtin || !d.changed {
                let current = roles
                    .iter()
                    .find(|(r, _)| r == role)
                    .map_or(0, |(_, s)| s.desired);
                ctx.metrics
                    .desired
                    .with_label_values(&labels)
                    .set(current as i64);
                continue;
            }
            changed = true;
            ctx.metrics
                .desired
                .with_label_values(&labels)
                .set(d.desired as i64);
            let current = roles
                .iter()
                .find(|(r, _)| r == role)
                .map_or(0, |(_, s)| s.desired);
            let direction = if d.desired > current { "up" } else { "down" };
            ctx.metrics
                .decisions
                .with_label_values(&[ns.as_str(), name.as_str(), role.as_str(), direction])
                .inc();
            decided
                .last_scale
                .insert(*role, (chrono::Utc::now().to_rfc3339(), d.reason.clone()));
            tracing::info!(pool = %name, %role, from = current, to = d.desired, reason = %d.reason, "scaling");
            event(
                ctx,
                pool,
                EventType::Normal,
                "Scaled",
                format!("{role} {current} -> {}: {}", d.desired, d.reason),
            )
            .await;
            if direction == "down" {
                if let Ok(prom) = self.prometheus(pool) {
                    mark_deletion_costs(ctx, &prom, pool, *role).await;
                }
            }
        }
        // Events on the transitions people act on: metrics lost or back, a target that cannot
        // be met.
        let had_metrics = previous.metrics.as_ref().map(|m| m.is_ok());
        match (&metrics, had_metrics) {
            (Err(why), Some(true) | None) => {
                event(
                    ctx,
                    pool,
                    EventType::Warning,
                    "MetricsUnavailable",
                    format!("holding replicas: {}", why.message),
                )
                .await;
            }
            (Ok(()), Some(false)) => {
                event(
                    ctx,
                    pool,
                    EventType::Normal,
                    "MetricsAvailable",
                    "signals read again; planning".into(),
                )
                .await;
            }
            _ => {}
        }
        let unattainable = report::unattainable(&decided, pool);
        let was = report::unattainable(&previous, pool);
        if let Some(msg) = unattainable.as_ref().filter(|_| was.is_none()) {
            event(
                ctx,
                pool,
                EventType::Warning,
                "SLOUnattainable",
                msg.clone(),
            )
            .await;
        }
        let wake = {
            let mut pools = self.pools.lock().expect("not poisoned");
            let Some(state) = pools.get_mut(&key(pool)) else {
                return;
            };
            let wake = changed
                || decided.summary() != state.decided.summary()
                || state.last_wake.elapsed() >= REFRESH;
            if wake {
                state.last_wake = Instant::now();
            }
            state.decided = decided;
            wake
        };
        if wake {
            let _ = self.wake.send(ObjectRef::from_obj(pool));
        }
    }
}

/// The replicas as the cluster has them, and nothing measured.
fn no_signals(roles: &[(Role, RoleSignals)], now_s: f64) -> Signals {
    let mut r = roles.iter().map(|(_, s)| *s);
    Signals {
        now_s,
        prefill: r.next().unwrap_or_default(),
        decode: r.next(),
        ..Default::default()
    }
}

/// The annotation by which a ReplicaSet picks which pods to remove first (lowest first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Before a role shrinks: each of its pods' cost is its in-flight work (running and queued
/// sequences), so the idlest pods go first and the fewest requests wait on a drain.
async fn mark_deletion_costs(ctx: &Context, prom: &Prometheus, pool: &InferencePool, role: Role) {
    let ns = pool.namespace().unwrap_or_default();
    let sel = format!(
        "namespace=\"{ns}\",pool=\"{}\",role=\"{role}\"",
        pool.name_any()
    );
    let q = format!(
        "sum by (pod) ({r}{{{sel}}}) + sum by (pod) ({w}{{{sel}}})",
        r = worker::RUNNING,
        w = worker::QUEUE_DEPTH
    );
    let work: BTreeMap<String, f64> = match prom.query(&q).await {
        Ok(v) => v
            .into_iter()
            .filter_map(|s| Some((s.labels.get("pod")?.clone(), s.value)))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "no in-flight work per pod; the ReplicaSet picks");
            return;
        }
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!(
        "{}={},{}={role}",
        labels::POOL,
        pool.name_any(),
        labels::ROLE
    );
    let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await else {
        return;
    };
    for pod in list {
        let cost = work.get(&pod.name_any()).copied().unwrap_or(0.0).round() as i64;
        let patch =
            serde_json::json!({"metadata": {"annotations": {DELETION_COST: cost.to_string()}}});
        if let Err(e) = pods
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(pod = %pod.name_any(), error = %e, "cannot set the pod's deletion cost");
        }
    }
}

/// Errors reading Prometheus are reported through the pool's conditions, not as failures.
impl From<PromError> for NoMetrics {
    fn from(e: PromError) -> Self {
        NoMetrics {
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
