//! Metric names, as the workers and the router export them and as the experiments, the
//! autoscaler and the dashboards query them. Every series carries the labels [`POOL`], [`ROLE`]
//! and [`POD`].

use prometheus::{Encoder, Registry, TextEncoder};

pub const POOL: &str = "pool";
pub const ROLE: &str = "role";
pub const POD: &str = "pod";

/// Worker metrics.
pub mod worker {
    pub const TTFT: &str = "pdfleet_worker_time_to_first_token_seconds";
    pub const ITL: &str = "pdfleet_worker_inter_token_latency_seconds";
    /// Label `reason`: a finish reason, or `cancelled`.
    pub const REQUESTS: &str = "pdfleet_worker_requests_total";
    pub const RUNNING: &str = "pdfleet_worker_running_sequences";
    pub const QUEUE_DEPTH: &str = "pdfleet_worker_queue_depth";
    pub const KV_BLOCKS_USED: &str = "pdfleet_worker_kv_blocks_used";
    pub const KV_BLOCKS_TOTAL: &str = "pdfleet_worker_kv_blocks_total";
    /// Label `state`: held, reserved, committed.
    pub const KV_HANDOFFS: &str = "pdfleet_worker_kv_handoffs";
    /// Label `outcome`: how a handoff left this worker (sent, attached, cancelled, expired).
    pub const KV_HANDOFFS_ENDED: &str = "pdfleet_worker_kv_handoffs_ended_total";
    pub const PREFIX_HITS: &str = "pdfleet_worker_prefix_cache_hits_total";
    pub const PREFIX_QUERIES: &str = "pdfleet_worker_prefix_cache_queries_total";
    pub const PREEMPTIONS: &str = "pdfleet_worker_preemptions_total";
    pub const BATCH_TOKENS: &str = "pdfleet_worker_batch_tokens";
    pub const STEP_SECONDS: &str = "pdfleet_worker_step_seconds";
    /// 1 while the engine thread runs and its steps succeed.
    pub const ENGINE_HEALTHY: &str = "pdfleet_worker_engine_healthy";
    /// Labels `direction` (send, receive) and `transport` (grpc, device).
    pub const KV_TRANSFER_BYTES: &str = "pdfleet_worker_kv_transfer_bytes_total";
    pub const KV_TRANSFER_SECONDS: &str = "pdfleet_worker_kv_transfer_seconds";
    pub const KV_DEVICE_COPY_SECONDS: &str = "pdfleet_worker_kv_device_copy_seconds";
    /// Label `reason`: `queue_full` (a new request), `kv_full` (a KV import or reservation).
    pub const REFUSALS: &str = "pdfleet_worker_refusals_total";
    /// Prompt tokens not yet computed, queued or part-way through a chunked prefill: the
    /// prefill backlog the planner clears.
    pub const QUEUED_PROMPT_TOKENS: &str = "pdfleet_worker_queued_prompt_tokens";
    /// Prompt tokens computed, and the engine seconds of the steps that computed them: their
    /// ratio is a replica's prefill capacity, measured.
    pub const PREFILL_TOKENS: &str = "pdfleet_worker_prefill_tokens_total";
    pub const PREFILL_BUSY_SECONDS: &str = "pdfleet_worker_prefill_busy_seconds_total";
    /// Sums over decode-only steps (batch = sequences in the step, seconds = its time): enough
    /// for the planner to fit step time = a + b x batch by least squares from Prometheus.
    pub const DECODE_STEPS: &str = "pdfleet_worker_decode_steps_total";
    pub const DECODE_STEP_BATCH: &str = "pdfleet_worker_decode_step_batch_total";
    pub const DECODE_STEP_SECONDS: &str = "pdfleet_worker_decode_step_seconds_total";
    pub const DECODE_STEP_BATCH_SQUARED: &str = "pdfleet_worker_decode_step_batch_squared_total";
    pub const DECODE_STEP_BATCH_SECONDS: &str = "pdfleet_worker_decode_step_batch_seconds_total";
}

/// Router metrics.
pub mod router {
    pub const TTFT: &str = "pdfleet_router_time_to_first_token_seconds";
    pub const ITL: &str = "pdfleet_router_inter_token_latency_seconds";
    pub const E2E: &str = "pdfleet_router_e2e_request_latency_seconds";
    pub const KV_TRANSFER_SECONDS: &str = "pdfleet_router_kv_transfer_seconds";
    /// Label `outcome`.
    pub const REQUESTS: &str = "pdfleet_router_requests_total";
    /// Label `role`: the role of the worker that was replaced.
    pub const RETRIES: &str = "pdfleet_router_retries_total";
    pub const INFLIGHT: &str = "pdfleet_router_inflight_requests";
    /// Counted on arrival, refused ones included: demand, whether or not it was served.
    pub const ARRIVALS: &str = "pdfleet_router_arrivals_total";
    pub const PROMPT_TOKENS: &str = "pdfleet_router_prompt_tokens_total";
    /// The `max_tokens` asked for on arrival: the decode demand known before it is generated.
    pub const REQUESTED_TOKENS: &str = "pdfleet_router_requested_tokens_total";
    pub const GENERATED_TOKENS: &str = "pdfleet_router_generated_tokens_total";
    /// Label `part`: where a disaggregated request's time to first token went ([`TtftPart`]).
    pub const TTFT_PART: &str = "pdfleet_router_ttft_part_seconds";
    /// Labels `target` (ttft, itl, both) and `result` (met, missed): requests judged against
    /// the pool's SLO (`--slo-ttft-ms`, `--slo-itl-ms`), `both` as `pdfleet load` judges
    /// goodput. Served ones by their TTFT and mean ITL; overloaded (429) and failed ones miss
    /// every target; ones refused as invalid are not counted.
    pub const SLO_REQUESTS: &str = "pdfleet_router_slo_requests_total";
}

/// Operator metrics. The planner's carry the labels `namespace`, `pool` and `role`.
pub mod operator {
    pub const RECONCILES: &str = "pdfleet_operator_reconciles_total";
    /// Label `error`.
    pub const RECONCILE_FAILURES: &str = "pdfleet_operator_reconcile_failures_total";
    pub const RECONCILE_DURATION: &str = "pdfleet_operator_reconcile_duration_seconds";
    pub const LEADER: &str = "pdfleet_operator_leader";
    /// Label `kind`.
    pub const PRUNED: &str = "pdfleet_operator_pruned_total";
    /// What the planner recommends for a role, whoever writes its replicas.
    pub const RECOMMENDED_REPLICAS: &str = "pdfleet_operator_recommended_replicas";
    /// What the role runs (asked for).
    pub const DESIRED_REPLICAS: &str = "pdfleet_operator_desired_replicas";
    /// Its pods that are ready.
    pub const READY_REPLICAS: &str = "pdfleet_operator_ready_replicas";
    /// Label `target` (ttft, itl) besides `namespace` and `pool`: the pool's SLO, for
    /// dashboards to draw against.
    pub const SLO_TARGET_SECONDS: &str = "pdfleet_operator_slo_target_seconds";
    /// The share of a pool's requests that must meet each target (`slo.quantile`): its error
    /// budget is the rest, which the burn-rate alerts measure against.
    pub const SLO_OBJECTIVE: &str = "pdfleet_operator_slo_objective";
    /// Label `type`: a pool's status conditions, 1 when True and 0 when False (for alerts on
    /// Ready and MetricsAvailable).
    pub const POOL_CONDITION: &str = "pdfleet_operator_pool_condition";
    /// Label `direction` (up, down) besides the role's: each change of replicas.
    pub const SCALE_DECISIONS: &str = "pdfleet_operator_scale_decisions_total";
    /// Label `outcome`: planned, no_data.
    pub const PLANNER_TICKS: &str = "pdfleet_operator_planner_ticks_total";
}

/// The parts of a disaggregated time to first token: so the role that causes a breach is the
/// one that grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtftPart {
    /// In the prefill worker's queue.
    Queue,
    /// Computing the prompt.
    Prefill,
    /// Moving the KV to the decode worker.
    Transfer,
    /// The rest: finding a decode worker with room, retries, the network.
    Admission,
}

impl TtftPart {
    pub const ALL: [TtftPart; 4] = [
        TtftPart::Queue,
        TtftPart::Prefill,
        TtftPart::Transfer,
        TtftPart::Admission,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TtftPart::Queue => "queue",
            TtftPart::Prefill => "prefill",
            TtftPart::Transfer => "transfer",
            TtftPart::Admission => "admission",
        }
    }
}

/// The series of a histogram.
pub fn bucket(histogram: &str) -> String {
    format!("{histogram}_bucket")
}
pub fn sum(histogram: &str) -> String {
    format!("{histogram}_sum")
}
pub fn count(histogram: &str) -> String {
    format!("{histogram}_count")
}

/// Latency buckets from 1 ms to 60 s, for every latency histogram. The planner reads its
/// quantiles from them, and `histogram_quantile` interpolates linearly inside a bucket: they
/// are about 25-50% apart wherever an SLO target may lie, so a quantile read back is off by
/// less than that.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1,
        0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0,
        20.0, 30.0, 60.0,
    ]
}

/// A registry whose series all carry `pool`, `role` and `pod`.
pub fn registry(pool: &str, role: &str, pod: &str) -> Registry {
    let labels = [(POOL, pool), (ROLE, role), (POD, pod)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Registry::new_custom(None, Some(labels)).expect("valid registry")
}

/// A registry in Prometheus' text format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}

/// Sums the samples of one series in Prometheus text over the label sets that contain every one
/// of `labels` (e.g. `transport="device"`; none: all of them).
pub fn sum_in_text(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_name_and_labels() {
        let text = "# HELP x\nx_total{a=\"1\",t=\"grpc\"} 2\nx_total{a=\"1\",t=\"device\"} 3\nx_total_other 9\nx_total 1\n";
        assert_eq!(sum_in_text(text, "x_total", &[]), 6.0);
        assert_eq!(sum_in_text(text, "x_total", &["t=\"device\""]), 3.0);
        assert_eq!(
            sum(worker::TTFT),
            "pdfleet_worker_time_to_first_token_seconds_sum"
        );
    }
}
