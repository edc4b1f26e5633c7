//! The router's Prometheus metrics: latencies as users feel them, labelled with pool and pod.
//! Names are the contract crate's ([`pdfleet_api::metrics::router`]).

use pdfleet_api::labels;
use pdfleet_api::metrics::{self, latency_buckets, router as names, TtftPart};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

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
    pub arrivals: IntCounter,
    pub prompt_tokens: IntCounter,
    pub requested_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    ttft_parts: HistogramVec,
}

/// Where one disaggregated request's time to first token went, in seconds.
pub struct TtftSplit {
    pub queue: f64,
    pub prefill: f64,
    pub transfer: f64,
    pub admission: f64,
}

impl RouterMetrics {
    pub fn new(pool: &str, pod: &str) -> Self {
        let registry = metrics::registry(pool, labels::ROUTER, pod);
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
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let ttft_parts = HistogramVec::new(
            HistogramOpts::new(
                names::TTFT_PART,
                "Where the time to first token went: queue, prefill, transfer, admission",
            )
            .buckets(latency_buckets()),
            &["part"],
        )
        .expect("valid histogram");
        registry
            .register(Box::new(ttft_parts.clone()))
            .expect("unique metric");
        let inflight =
            IntGauge::new(names::INFLIGHT, "Requests being served").expect("valid gauge");
        registry
            .register(Box::new(inflight.clone()))
            .expect("unique metric");
        RouterMetrics {
            ttft: hist(names::TTFT, "From the request's arrival to its first token"),
            itl: hist(names::ITL, "Between successive tokens sent to the client"),
            e2e: hist(names::E2E, "From the request's arrival to its last token"),
            kv_transfer_seconds: hist(
                names::KV_TRANSFER_SECONDS,
                "Prefill to decode KV transfer, as the prefill worker reports it",
            ),
            requests: counter_vec(names::REQUESTS, "Requests by outcome", "outcome"),
            retries: counter_vec(
                names::RETRIES,
                "Requests sent again to another worker, by the role replaced",
                "role",
            ),
            arrivals: counter(
                names::ARRIVALS,
                "Valid requests, on arrival (refused included)",
            ),
            prompt_tokens: counter(names::PROMPT_TOKENS, "Prompt tokens of arriving requests"),
            requested_tokens: counter(
                names::REQUESTED_TOKENS,
                "max_tokens asked for by arriving requests",
            ),
            generated_tokens: counter(names::GENERATED_TOKENS, "Tokens sent to clients"),
            ttft_parts,
            inflight,
            registry,
        }
    }

    pub fn ttft_split(&self, split: &TtftSplit) {
        for part in TtftPart::ALL {
            let v = match part {
                TtftPart::Queue => split.queue,
                TtftPart::Prefill => split.prefill,
                TtftPart::Transfer => split.transfer,
                TtftPart::Admission => split.admission,
            };
            self.ttft_parts
                .with_label_values(&[part.as_str()])
                .observe(v.max(0.0));
        }
    }

    pub fn encode(&self) -> String {
        metrics::encode(&self.registry)
    }
}
