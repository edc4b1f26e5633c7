//! The operator's own metrics: reconciles, their failures by kind, their duration, whether this
//! replica leads, and the planner's recommendations and decisions per pool and role.

use pdfleet_api::metrics::{encode, operator as names};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
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
    pub decisions: IntCounterVec,
    pub ticks: IntCounterVec,
}

const POOL_ROLE: [&str; 3] = ["namespace", "pool", "role"];

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

    /// Drops a deleted pool's series.
    pub fn forget_pool(&self, namespace: &str, pool: &str) {
        for role in pdfleet_api::Role::ALL {
            let labels = [namespace, pool, role.as_str()];
            let _ = self.recommended.remove_label_values(&labels);
            let _ = self.desired.remove_label_values(&labels);
        }
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}
