//! The worker's Prometheus metrics, labelled with its pool, role and pod.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub requests: IntCounterVec,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub blocks_used: IntGauge,
    pub blocks_total: IntGauge,
    pub prefix_hits: IntCounter,
    pub prefix_queries: IntCounter,
    pub preemptions: IntCounter,
    pub batch_tokens: Histogram,
    pub step_seconds: Histogram,
    pub kv_transfer_bytes: IntCounterVec,
    pub kv_transfer_seconds: prometheus::HistogramVec,
    pub kv_device_copy_seconds: Histogram,
}

/// Latency buckets from 1 ms to 60 s.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl WorkerMetrics {
    pub fn new(pool: &str, role: &str, pod: &str) -> Self {
        let labels = [("pool", pool), ("role", role), ("pod", pod)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let registry = Registry::new_custom(Some("pdfleet_worker".into()), Some(labels))
            .expect("valid registry");
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Sequences finished, by reason"),
            &["reason"],
        )
        .expect("valid");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        let kv_transfer_bytes = IntCounterVec::new(
            Opts::new("kv_transfer_bytes_total", "KV bytes moved between workers"),
            &["direction", "transport"],
        )
        .expect("valid");
        registry
            .register(Box::new(kv_transfer_bytes.clone()))
            .expect("unique metric");
        let kv_transfer_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new("kv_transfer_seconds", "Time to move one sequence's KV")
                // Device-to-device moves take well under a millisecond.
                .buckets(
                    [0.0001, 0.00025, 0.0005]
                        .into_iter()
                        .chain(latency_buckets())
                        .collect(),
                ),
            &["direction", "transport"],
        )
        .expect("valid");
        registry
            .register(Box::new(kv_transfer_seconds.clone()))
            .expect("unique metric");
        WorkerMetrics {
            ttft: hist(
                "time_to_first_token_seconds",
                "From admission to the first token, in this worker",
                latency_buckets(),
            ),
            itl: hist(
                "inter_token_latency_seconds",
                "Between successive tokens of a sequence",
                latency_buckets(),
            ),
            running: gauge("running_sequences", "Sequences in the running batch"),
            waiting: gauge("queue_depth", "Requests waiting to be admitted"),
            blocks_used: gauge("kv_blocks_used", "KV blocks referenced by sequences"),
            blocks_total: gauge("kv_blocks_total", "KV blocks in the cache"),
            prefix_hits: counter(
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache",
            ),
            prefix_queries: counter(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            ),
            preemptions: counter(
                "preemptions_total",
                "Sequences preempted for lack of KV blocks",
            ),
            batch_tokens: hist(
                "batch_tokens",
                "Tokens computed per engine step",
                vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0],
            ),
            step_seconds: hist(
                "step_seconds",
                "Duration of one engine step",
                latency_buckets(),
            ),
            kv_device_copy_seconds: hist(
                "kv_device_copy_seconds",
                "GPU time copying one sequence's KV into a decode worker's cache (sender)",
                [0.00001, 0.000025, 0.00005]
                    .into_iter()
                    .chain([0.0001, 0.00025, 0.0005])
                    .chain(latency_buckets())
                    .collect(),
            ),
            requests,
            kv_transfer_bytes,
            kv_transfer_seconds,
            registry,
        }
    }

    /// One sequence's KV moved: `direction` is "send" or "receive", `transport` "grpc" or
    /// "device".
    pub fn kv_moved(&self, direction: &str, transport: &str, bytes: u64, seconds: f64) {
        let labels = [direction, transport];
        self.kv_transfer_bytes
            .with_label_values(&labels)
            .inc_by(bytes);
        self.kv_transfer_seconds
            .with_label_values(&labels)
            .observe(seconds);
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// A registry in Prometheus' text format (the router's metrics use it too).
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}
