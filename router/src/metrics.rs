//! The router's Prometheus metrics: latencies as users feel them, labelled with pool and pod.

use pdfleet_worker::serve::metrics::latency_buckets;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct RouterMetrics {
    registry: Registry,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub requests: IntCounterVec,
    pub inflight: IntGauge,
    pub kv_transfer_seconds: Histogram,
    pub retries: IntCounterVec,
}

impl RouterMetrics {
    pub fn new(pool: &str, pod: &str) -> Self {
        let labels = [("pool", pool), ("role", "router"), ("pod", pod)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let registry = Registry::new_custom(Some("pdfleet_router".into()), Some(labels))
            .expect("valid registry");
        let hist = |name: &str, help: &str| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
                .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let inflight =
            IntGauge::new("inflight_requests", "Requests being served").expect("valid gauge");
        registry
            .register(Box::new(inflight.clone()))
            .expect("unique metric");
        RouterMetrics {
            ttft: hist(
                "time_to_first_token_seconds",
                "From the request's arrival to its first token",
            ),
            itl: hist(
                "inter_token_latency_seconds",
                "Between successive tokens sent to the client",
            ),
            e2e: hist(
                "e2e_request_latency_seconds",
                "From the request's arrival to its last token",
            ),
            kv_transfer_seconds: hist(
                "kv_transfer_seconds",
                "Prefill to decode KV transfer, as the prefill worker reports it",
            ),
            requests: counter_vec("requests_total", "Requests by outcome", "outcome"),
            retries: counter_vec(
                "retries_total",
                "Requests sent again to another worker, by role",
                "role",
            ),
            inflight,
            registry,
        }
    }

    pub fn encode(&self) -> String {
        pdfleet_worker::serve::metrics::encode(&self.registry)
    }
}
