//! The operator's own metrics: reconciles, their failures by kind, their duration, whether this
//! replica leads, and the planner's recommendations and decisions per pool and role.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use pdfleet_api::metrics::{encode, operator as names};
use pdfleet_api::Role;
use pdfleet_crds::SloSpec;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::error::Error;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub failures: IntCounterVec,
    pub duration: Histogram,
    pub leader: IntGauge,
    /// Children deleted because the pool no longer wants them, by kind.
    pub pruned: IntCounterVec,
    pub recommended: IntGaugeVec,
    pub desired: IntGaugeVec,
    ready: IntGaugeVec,
    slo_target: GaugeVec,
    slo_objective: GaugeVec,
    condition: IntGaugeVec,
    pub decisions: IntCounterVec,
    pub ticks: IntCounterVec,
    /// The pools with series, so that a deleted pool's go too.
    pools: Arc<Mutex<BTreeSet<(String, String)>>>,
}

const POOL_ROLE: [&str; 3] = ["namespace", "pool", "role"];

/// The pool conditions exported as metrics.
const CONDITIONS: [&str; 6] = [
    "Ready",
    "Placement",
    "MetricsAvailable",
    "ScalingActive",
    "ScalingLimited",
    "SLOAttainable",
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gauge_vec = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &POOL_ROLE).expect("valid");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let reconciles =
            IntCounter::new(names::RECONCILES, "Reconciliations started").expect("valid");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                names::RECONCILE_DURATION,
                "Duration of successful reconciliations",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid");
        let leader =
            IntGauge::new(names::LEADER, "1 while this replica holds the lease").expect("valid");
        let slo_target = GaugeVec::new(
            Opts::new(names::SLO_TARGET_SECONDS, "A pool's latency targets"),
            &["namespace", "pool", "target"],
        )
        .expect("valid");
        let slo_objective = GaugeVec::new(
            Opts::new(
                names::SLO_OBJECTIVE,
                "The share of a pool's requests that must meet each target",
            ),
            &["namespace", "pool"],
        )
        .expect("valid");
        let condition = IntGaugeVec::new(
            Opts::new(
                names::POOL_CONDITION,
                "A pool's status conditions: 1 True, 0 False",
            ),
            &["namespace", "pool", "type"],
        )
        .expect("valid");
        for c in [
            Box::new(slo_target.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(slo_objective.clone()),
            Box::new(condition.clone()),
        ] {
            registry.register(c).expect("unique");
        }
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("unique");
        }
        Metrics {
            failures: counter_vec(
                names::RECONCILE_FAILURES,
                "Reconciliations that failed, by the kind of error",
                &["error"],
            ),
            pruned: counter_vec(
                names::PRUNED,
                "Children deleted because their pool no longer wants them, by kind",
                &["kind"],
            ),
            recommended: gauge_vec(
                names::RECOMMENDED_REPLICAS,
                "The planner's recommendation for a role, whoever writes its replicas",
            ),
            desired: gauge_vec(names::DESIRED_REPLICAS, "The replicas a role runs"),
            ready: gauge_vec(names::READY_REPLICAS, "A role's ready pods"),
            slo_target,
            slo_objective,
            condition,
            pools: Arc::default(),
            decisions: counter_vec(
                names::SCALE_DECISIONS,
                "Changes of a role's replicas by the planner, by direction",
                &["namespace", "pool", "role", "direction"],
            ),
            ticks: counter_vec(
                names::PLANNER_TICKS,
                "Planner ticks, by outcome (planned, no_data)",
                &["outcome"],
            ),
            registry,
            reconciles,
            duration,
            leader,
        }
    }

    pub fn failed(&self, e: &Error) {
        self.failures.with_label_values(&[e.metric_label()]).inc();
    }

    /// A pool's replicas per role (desired, ready) as reconcile last saw them, and its SLO;
    /// roles it no longer runs lose their series.
    pub fn observe_pool(
        &self,
        namespace: &str,
        pool: &str,
        roles: &[(Role, i32, i32)],
        slo: Option<&SloSpec>,
        conditions: &[Condition],
    ) {
        for role in Role::ALL {
            let labels = [namespace, pool, role.as_str()];
            match roles.iter().find(|(r, ..)| r == role) {
                Some(&(_, desired, ready)) => {
                    self.desired.with_label_values(&labels).set(desired as i64);
                    self.ready.with_label_values(&labels).set(ready as i64);
                }
                None => {
                    let _ = self.desired.remove_label_values(&labels);
                    let _ = self.ready.remove_label_values(&labels);
                    let _ = self.recommended.remove_label_values(&labels);
                }
            }
        }
        for (target, ms) in [
            ("ttft", slo.map(|s| s.ttft_ms)),
            ("itl", slo.map(|s| s.itl_ms)),
        ] {
            let labels = [namespace, pool, target];
            match ms {
                Some(ms) => self
                    .slo_target
                    .with_label_values(&labels)
                    .set(ms as f64 / 1e3),
                None => {
                    let _ = self.slo_target.remove_label_values(&labels);
                }
            }
        }
        match slo {
            Some(s) => self
                .slo_objective
                .with_label_values(&[namespace, pool])
                .set(s.quantile),
            None => {
                let _ = self.slo_objective.remove_label_values(&[namespace, pool]);
            }
        }
        for type_ in CONDITIONS {
            let labels = [namespace, pool, type_];
            match conditions.iter().find(|c| c.type_ == type_) {
                Some(c) => self
                    .condition
                    .with_label_values(&labels)
                    .set((c.status == "True") as i64),
                None => {
                    let _ = self.condition.remove_label_values(&labels);
                }
            }
        }
        self.pools
            .lock()
            .expect("not poisoned")
            .insert((namespace.to_string(), pool.to_string()));
    }

    /// Drops the planner's recommendations for a pool that no longer autoscales.
    pub fn forget_planner(&self, namespace: &str, pool: &str) {
        for role in Role::ALL {
            let _ = self
                .recommended
                .remove_label_values(&[namespace, pool, role.as_str()]);
        }
    }

    /// Drops a deleted pool's series.
    fn forget_pool(&self, namespace: &str, pool: &str) {
        self.observe_pool(namespace, pool, &[], None, &[]);
        self.pools
            .lock()
            .expect("not poisoned")
            .remove(&(namespace.to_string(), pool.to_string()));
    }

    /// Drops the series of every pool not in `live` (namespace, name).
    pub fn retain_pools(&self, live: &BTreeSet<(String, String)>) {
        let gone: Vec<_> = self
            .pools
            .lock()
            .expect("not poisoned")
            .difference(live)
            .cloned()
            .collect();
        for (namespace, pool) in gone {
            self.forget_pool(&namespace, &pool);
        }
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pools_series_follow_its_roles_and_go_with_it() {
        let m = Metrics::new();
        let slo: SloSpec =
            serde_json::from_value(serde_json::json!({"ttftMs": 500, "itlMs": 50})).unwrap();
        let ready = Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "Rolling".into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Default::default(),
            ),
            observed_generation: None,
        };
        let roles = [(Role::Prefill, 2, 1), (Role::Decode, 3, 3)];
        m.observe_pool("ml", "chat", &roles, Some(&slo), &[ready]);
        let text = m.encode();
        for want in [
            r#"pdfleet_operator_ready_replicas{namespace="ml",pool="chat",role="prefill"} 1"#,
            r#"pdfleet_operator_desired_replicas{namespace="ml",pool="chat",role="decode"} 3"#,
            r#"pdfleet_operator_slo_target_seconds{namespace="ml",pool="chat",target="itl"} 0.05"#,
            r#"pdfleet_operator_slo_objective{namespace="ml",pool="chat"} 0.99"#,
            r#"pdfleet_operator_pool_condition{namespace="ml",pool="chat",type="Ready"} 0"#,
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        // Colocated now: prefill and decode go, unified comes.
        m.observe_pool("ml", "chat", &[(Role::Unified, 1, 1)], None, &[]);
        let text = m.encode();
        assert!(!text.contains(r#"role="prefill""#) && text.contains(r#"role="unified""#));
        assert!(!text.contains("pdfleet_operator_slo_objective{"));
        m.observe_pool("ml", "other", &[(Role::Unified, 1, 1)], None, &[]);
        m.retain_pools(&BTreeSet::from([("ml".to_string(), "other".to_string())]));
        let text = m.encode();
        assert!(!text.contains(r#"pool="chat""#) && text.contains(r#"pool="other""#));
    }
}
