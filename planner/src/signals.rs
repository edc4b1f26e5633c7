//! What a policy sees at a tick: the pool's demand as the router measured it, each role's
//! replicas and load as its workers report them, and the latencies users felt. Every field that
//! comes from metrics is an `Option`: `None` is "no data", which is not zero.

use serde::{Deserialize, Serialize};

/// Demand at the front door, refused requests included (they are demand the fleet did not
/// serve, not demand that was not there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    pub requests_per_s: f64,
    pub prompt_tokens_per_s: f64,
    pub generated_tokens_per_s: f64,
    /// The highest prompt-token rate over short spans (15 s) within the window: prompts come in
    /// bursts, and the time to first token at a high quantile is set by them, not by the mean.
    pub peak_prompt_tokens_per_s: Option<f64>,
}

impl Demand {
    /// Demand from the rates over a long window and over the last `recent_s` seconds. When
    /// arrivals in the recent window are significantly above what the long window's rate
    /// explains (Poisson, 4 standard deviations: about once in 30,000 windows by chance), the long window's demand is scaled up to the
    /// recent arrival rate (its lengths, over many more requests, stay); else it stands. A rate
    /// over a minute lags a rise by most of the minute; a short window alone is noise.
    pub fn from_windows(long: Demand, recent: Option<Demand>, recent_s: f64) -> Demand {
        let Some(r) = recent else {
            return long;
        };
        let expected = long.requests_per_s * recent_s;
        let seen = r.requests_per_s * recent_s;
        if seen <= expected + 4.0 * expected.max(1.0).sqrt() {
            return long;
        }
        if long.requests_per_s <= 0.0 {
            return Demand {
                peak_prompt_tokens_per_s: long.peak_prompt_tokens_per_s,
                ..r
            };
        }
        let k = r.requests_per_s / long.requests_per_s;
        Demand {
            requests_per_s: r.requests_per_s,
            prompt_tokens_per_s: long.prompt_tokens_per_s * k,
            generated_tokens_per_s: long.generated_tokens_per_s * k,
            peak_prompt_tokens_per_s: long.peak_prompt_tokens_per_s,
        }
    }

    pub fn mean_prompt_tokens(&self) -> Option<f64> {
        (self.requests_per_s > 0.0).then(|| self.prompt_tokens_per_s / self.requests_per_s)
    }

    pub fn mean_output_tokens(&self) -> Option<f64> {
        (self.requests_per_s > 0.0).then(|| self.generated_tokens_per_s / self.requests_per_s)
    }
}

/// Where the time to first token went, at the SLO's quantile, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TtftParts {
    /// Waiting in the prefill worker's queue.
    pub queue: f64,
    /// Computing the prompt.
    pub prefill: f64,
    /// Moving the KV to the decode worker.
    pub transfer: f64,
    /// Finding a decode worker with room (retries included).
    pub admission: f64,
}

impl TtftParts {
    /// Whether the decode side (KV transfer, admission) is most of the time to first token.
    pub fn decode_bound(&self) -> bool {
        self.transfer + self.admission > self.queue + self.prefill
    }
}

/// Sums over engine steps (per second, over the window): steps, their batches, their times,
/// batches squared and batch times step time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepSums {
    pub n: f64,
    pub batch: f64,
    pub seconds: f64,
    pub batch_sq: f64,
    pub batch_seconds: f64,
}

impl StepSums {
    /// The sums from their rates, in the order of the fields; none while any is missing or no
    /// step ran (the operator reads them from Prometheus, the simulator from its own counters).
    pub fn from_rates(rates: [Option<f64>; 5]) -> Option<StepSums> {
        match rates {
            [Some(n), Some(batch), Some(seconds), Some(batch_sq), Some(batch_seconds)]
                if n > 0.0 =>
            {
                Some(StepSums {
                    n,
                    batch,
                    seconds,
                    batch_sq,
                    batch_seconds,
                })
            }
            _ => None,
        }
    }
}

/// One role: its replicas as the cluster has them, and its load as its workers report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleSignals {
    /// The replicas asked for (pending and starting pods included: they are capacity on the way).
    pub desired: u32,
    pub ready: u32,
    /// A rollout is under way (pods of an older template still run).
    pub rolling: bool,
    /// Mean fraction of each second a replica's engine was stepping.
    pub busy: Option<f64>,
    /// Prompt tokens computed per busy second, per replica (prefill capacity, measured).
    pub tokens_per_busy_s: Option<f64>,
    /// Prompt tokens waiting in the replicas' queues, in all.
    pub backlog_tokens: Option<f64>,
    /// Sequences in the running batches, in all.
    pub running: Option<f64>,
    /// The role's engine steps over the window, as sums: enough to fit step time against
    /// batch by least squares.
    pub steps: Option<StepSums>,
    /// KV cache tokens in use, in all, and each replica's capacity (blocks times block size).
    pub kv_tokens_used: Option<f64>,
    pub kv_tokens_per_replica: Option<f64>,
    /// Refusals per second for lack of room (queue full, KV full).
    pub refusals_per_s: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Seconds on the policy's clock.
    pub now_s: f64,
    /// `None`: no data (metrics unreachable, or no series yet).
    pub demand: Option<Demand>,
    /// Prefill (or unified) and decode roles; a Colocated pool has only `prefill`, standing for
    /// its unified workers.
    pub prefill: RoleSignals,
    pub decode: Option<RoleSignals>,
    /// At the SLO's quantile, as users felt them.
    pub ttft_s: Option<f64>,
    pub itl_s: Option<f64>,
    pub ttft_parts: Option<TtftParts>,
    /// Mean KV transfer time per request.
    pub transfer_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(r: f64) -> Demand {
        Demand {
            requests_per_s: r,
            prompt_tokens_per_s: 100.0 * r,
            generated_tokens_per_s: 10.0 * r,
            peak_prompt_tokens_per_s: None,
        }
    }

    #[test]
    fn recent_rates_count_only_when_significantly_higher() {
        // 20 s at 5 req/s expects 100 arrivals; 110 is noise, 150 a rise (at the long
        // window's lengths).
        assert_eq!(
            Demand::from_windows(rate(5.0), Some(rate(5.5)), 20.0),
            rate(5.0)
        );
        let longer = Demand {
            prompt_tokens_per_s: 1.0,
            ..rate(7.5)
        };
        assert_eq!(
            Demand::from_windows(rate(5.0), Some(longer), 20.0),
            rate(7.5)
        );
        assert_eq!(
            Demand::from_windows(rate(5.0), Some(rate(2.0)), 20.0),
            rate(5.0)
        );
        assert_eq!(Demand::from_windows(rate(5.0), None, 20.0), rate(5.0));
        // From nothing, ten arrivals are a rise.
        assert_eq!(
            Demand::from_windows(rate(0.0), Some(rate(0.5)), 20.0),
            rate(0.5)
        );
    }
}
