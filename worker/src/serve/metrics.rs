//! The worker's Prometheus metrics, labelled with its pool, role and pod. Names are the contract
//! crate's ([`pdfleet_api::metrics::worker`]).

use pdfleet_api::metrics::{self, latency_buckets, worker as names};
use prometheus::{
    Counter, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use super::table::{HandoffCounts, Outcome};

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
    pub handoffs: IntGaugeVec,
    pub handoffs_ended: IntCounterVec,
    pub prefix_hits: IntCounter,
    pub prefix_queries: IntCounter,
    pub preemptions: IntCounter,
    pub batch_tokens: Histogram,
    pub step_seconds: Histogram,
    pub engine_healthy: IntGauge,
    pub kv_transfer_bytes: IntCounterVec,
    pub kv_transfer_seconds: HistogramVec,
    pub kv_device_copy_seconds: Histogram,
    pub refusals: IntCounterVec,
    pub queued_prompt_tokens: IntGauge,
    pub steps: StepCounters,
}

/// What the planner learns capacity from: prompt tokens per busy second, and decode step time
/// against batch (as least-squares sums).
#[derive(Clone)]
pub struct StepCounters {
    pub prefill_tokens: IntCounter,
    pub prefill_busy_seconds: Counter,
    pub decode_steps: IntCounter,
    pub decode_batch: IntCounter,
    pub decode_seconds: Counter,
    pub decode_batch_squared: IntCounter,
    pub decode_batch_seconds: Counter,
}

impl StepCounters {
    /// One engine step that computed `prefill_tokens` of prompts and `decode_sequences`
    /// next tokens in `seconds`. Steps with prompt tokens are prefill time; the decode fit takes
    /// only steps without (a prompt chunk would make a step look slow for its batch).
    pub fn step(&self, prefill_tokens: usize, decode_sequences: usize, seconds: f64) {
        if prefill_tokens > 0 {
            self.prefill_tokens.inc_by(prefill_tokens as u64);
            self.prefill_busy_seconds.inc_by(seconds);
        } else if decode_sequences > 0 {
            let b = decode_sequences as u64;
            self.decode_steps.inc();
            self.decode_batch.inc_by(b);
            self.decode_seconds.inc_by(seconds);
            self.decode_batch_squared.inc_by(b * b);
            self.decode_batch_seconds.inc_by(b as f64 * seconds);
        }
    }
}

/// Device-to-device copies take microseconds: finer buckets below the latency ones.
fn transfer_buckets(finest: &[f64]) -> Vec<f64> {
    finest.iter().copied().chain(latency_buckets()).collect()
}

impl WorkerMetrics {
    pub fn new(pool: &str, role: &str, pod: &str) -> Self {
        let registry = metrics::registry(pool, role, pod);
        let register = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("unique metric");
        };
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid histogram");
            register(Box::new(h.clone()));
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            register(Box::new(g.clone()));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let float_counter = |name: &str, help: &str| {
            let c = Counter::new(name, help).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let steps = StepCounters {
            prefill_tokens: counter(names::PREFILL_TOKENS, "Prompt tokens computed"),
            prefill_busy_seconds: float_counter(
                names::PREFILL_BUSY_SECONDS,
                "Engine seconds of the steps that computed prompt tokens",
            ),
            decode_steps: counter(names::DECODE_STEPS, "Engine steps with no prompt tokens"),
            decode_batch: counter(
                names::DECODE_STEP_BATCH,
                "Sum over decode steps of the sequences in each",
            ),
            decode_seconds: float_counter(
                names::DECODE_STEP_SECONDS,
                "Sum over decode steps of their seconds",
            ),
            decode_batch_squared: counter(
                names::DECODE_STEP_BATCH_SQUARED,
                "Sum over decode steps of the batch squared",
            ),
            decode_batch_seconds: float_counter(
                names::DECODE_STEP_BATCH_SECONDS,
                "Sum over decode steps of batch times seconds",
            ),
        };
        let handoffs = IntGaugeVec::new(
            Opts::new(
                names::KV_HANDOFFS,
                "KV handoffs held by this worker, by state",
            ),
            &["state"],
        )
        .expect("valid gauge");
        register(Box::new(handoffs.clone()));
        let kv_transfer_seconds = HistogramVec::new(
            HistogramOpts::new(names::KV_TRANSFER_SECONDS, "Time to move one sequence's KV")
                .buckets(transfer_buckets(&[0.0001, 0.00025, 0.0005])),
            &["direction", "transport"],
        )
        .expect("valid histogram");
        register(Box::new(kv_transfer_seconds.clone()));
        WorkerMetrics {
            ttft: hist(
                names::TTFT,
                "From admission to the first token, in this worker",
                latency_buckets(),
            ),
            itl: hist(
                names::ITL,
                "Between successive tokens of a sequence",
                latency_buckets(),
            ),
            requests: counter_vec(
                names::REQUESTS,
                "Sequences finished, by reason",
                &["reason"],
            ),
            running: gauge(names::RUNNING, "Sequences in the running batch"),
            waiting: gauge(names::QUEUE_DEPTH, "Requests waiting to be admitted"),
            blocks_used: gauge(names::KV_BLOCKS_USED, "KV blocks referenced by sequences"),
            blocks_total: gauge(names::KV_BLOCKS_TOTAL, "KV blocks in the cache"),
            handoffs,
            handoffs_ended: counter_vec(
                names::KV_HANDOFFS_ENDED,
                "KV handoffs that left this worker, by how",
                &["outcome"],
            ),
            prefix_hits: counter(
                names::PREFIX_HITS,
                "Prompt tokens found in the prefix cache",
            ),
            prefix_queries: counter(
                names::PREFIX_QUERIES,
                "Prompt tokens looked up in the prefix cache",
            ),
            preemptions: counter(
                names::PREEMPTIONS,
                "Sequences preempted for lack of KV blocks",
            ),
            batch_tokens: hist(
                names::BATCH_TOKENS,
                "Tokens computed per engine step",
                vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0],
            ),
            step_seconds: hist(
                names::STEP_SECONDS,
                "Duration of one engine step",
                latency_buckets(),
            ),
            engine_healthy: gauge(
                names::ENGINE_HEALTHY,
                "1 while the engine thread runs and its steps succeed",
            ),
            kv_device_copy_seconds: hist(
                names::KV_DEVICE_COPY_SECONDS,
                "GPU time copying one sequence's KV into a decode worker's cache (sender)",
                transfer_buckets(&[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005]),
            ),
            kv_transfer_bytes: counter_vec(
                names::KV_TRANSFER_BYTES,
                "KV bytes moved between workers",
                &["direction", "transport"],
            ),
            kv_transfer_seconds,
            refusals: counter_vec(
                names::REFUSALS,
                "Work refused for lack of room, by reason (queue_full, kv_full)",
                &["reason"],
            ),
            queued_prompt_tokens: gauge(
                names::QUEUED_PROMPT_TOKENS,
                "Prompt tokens not yet computed (queued or part-way)",
            ),
            steps,
            registry,
        }
    }

    /// One sequence's KV moved: `direction` is "send" or "receive".
    pub fn kv_moved(
        &self,
        direction: &str,
        transport: pdfleet_api::KvTransport,
        bytes: u64,
        seconds: f64,
    ) {
        let labels = [direction, transport.as_str()];
        self.kv_transfer_bytes
            .with_label_values(&labels)
            .inc_by(bytes);
        self.kv_transfer_seconds
            .with_label_values(&labels)
            .observe(seconds);
    }

    pub fn handoff_counts(&self, c: &HandoffCounts) {
        for (state, n) in [
            ("held", c.held),
            ("reserved", c.reserved),
            ("committed", c.committed),
            ("quarantined", c.quarantined),
        ] {
            self.handoffs.with_label_values(&[state]).set(n as i64);
        }
    }

    pub fn handoff_ended(&self, outcome: Outcome) {
        self.handoffs_ended
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    pub fn encode(&self) -> String {
        metrics::encode(&self.registry)
    }
}
