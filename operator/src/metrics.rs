//! The operator's own metrics: reconciles, their failures by kind, their duration, and whether
//! this replica leads.

use pdfleet_api::metrics::encode;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounter::new(
            "pdfleet_operator_reconciles_total",
            "Reconciliations started",
        )
        .expect("valid");
        let failures = IntCounterVec::new(
            Opts::new(
                "pdfleet_operator_reconcile_failures_total",
                "Reconciliations that failed, by the kind of error",
            ),
            &["error"],
        )
        .expect("valid");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "pdfleet_operator_reconcile_duration_seconds",
                "Duration of successful reconciliations",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid");
        let leader = IntGauge::new(
            "pdfleet_operator_leader",
            "1 while this replica holds the lease",
        )
        .expect("valid");
        let pruned = IntCounterVec::new(
            Opts::new(
                "pdfleet_operator_pruned_total",
                "Children deleted because their pool no longer wants them, by kind",
            ),
            &["kind"],
        )
        .expect("valid");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
            Box::new(pruned.clone()),
        ] {
            registry.register(c).expect("unique");
        }
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            pruned,
        }
    }

    pub fn failed(&self, e: &Error) {
        self.failures.with_label_values(&[e.metric_label()]).inc();
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}
