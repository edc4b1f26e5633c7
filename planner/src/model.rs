//! The capacity model: how many replicas a role needs for a demand, from queueing theory for
//! prefill (M/M/c, the router sending each prompt to the least-loaded worker) and Little's law
//! for decode (concurrent sequences against the largest batch whose step meets the ITL target).

use crate::signals::StepSums;

/// Erlang C: the probability that an arrival waits, with `c` servers and offered load `a`
/// (arrival rate over one server's service rate). 1 when the servers cannot keep up.
pub fn erlang_c(c: u32, a: f64) -> f64 {
    if a <= 0.0 {
        return 0.0;
    }
    if a >= c as f64 {
        return 1.0;
    }
    // Erlang B by its stable recursion, then C from B.
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (k as f64 + a * b);
    }
    let c = c as f64;
    c * b / (c - a * (1.0 - b))
}

/// The `q` quantile of the waiting time in an M/M/c queue, seconds: arrivals at `lambda` per
/// second, each server serving `mu` per second. Infinite when the servers cannot keep up.
pub fn wait_quantile(c: u32, lambda: f64, mu: f64, q: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    let spare = c as f64 * mu - lambda;
    if spare <= 0.0 {
        return f64::INFINITY;
    }
    let waits = erlang_c(c, lambda / mu);
    if waits <= 1.0 - q {
        return 0.0;
    }
    (waits / (1.0 - q)).ln() / spare
}

/// What the model says a role needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sized {
    pub replicas: u32,
    /// Of those, what the steady demand needs (without the extra to clear a queue).
    pub steady: u32,
    /// The latency the model predicts at that size (TTFT for prefill, ITL for decode), seconds.
    pub predicted_s: f64,
    /// Whether the target can be met at all (e.g. not when it is below a prompt's own prefill).
    pub attainable: bool,
    /// Demand over capacity at that size.
    pub utilisation: f64,
}

/// Prefill: prompts arriving as a Poisson stream, served by `c` workers each computing
/// `capacity` prompt tokens per busy second; the time to first token is the wait, the prompt's
/// own prefill and the KV transfer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillDemand {
    pub prompt_tokens_per_s: f64,
    pub mean_prompt_tokens: f64,
    pub capacity_tokens_per_s: f64,
    pub backlog_tokens: f64,
    pub ttft_target_s: f64,
    pub quantile: f64,
    pub transfer_s: f64,
    /// How soon a queue already there should be cleared, seconds.
    pub clear_s: f64,
}

/// Highest utilisation the planner plans for: beyond it a queue grows on any burst.
pub const MAX_UTILISATION: f64 = 0.9;
/// Largest role the model will consider.
pub const MAX_REPLICAS: u32 = 10_000;

pub fn size_prefill(d: &PrefillDemand) -> Sized {
    let service_s = d.mean_prompt_tokens / d.capacity_tokens_per_s;
    let per_server = 1.0 / service_s;
    let lambda = d.prompt_tokens_per_s / d.mean_prompt_tokens;
    let budget = d.ttft_target_s - service_s - d.transfer_s;
    let attainable = budget > 0.0;
    // Unattainable: the wait cannot fit, so plan by demand alone at the highest utilisation.
    let budget = if attainable { budget } else { f64::INFINITY };
    let mut c = ((lambda / per_server) / MAX_UTILISATION).ceil().max(1.0) as u32;
    while c < MAX_REPLICAS && wait_quantile(c, lambda, per_server, d.quantile) > budget {
        c += 1;
    }
    // A queue already there is cleared within `clear_s`, by replicas on top of the steady
    // demand's.
    let extra = (d.backlog_tokens / (d.capacity_tokens_per_s * d.clear_s.max(1.0))).round() as u32;
    let replicas = (c + extra).min(MAX_REPLICAS);
    let wait = wait_quantile(replicas, lambda, per_server, d.quantile);
    Sized {
        replicas,
        steady: c,
        predicted_s: wait + service_s + d.transfer_s,
        attainable,
        utilisation: lambda / (replicas as f64 * per_server),
    }
}

/// A decode step's time as a function of its batch: `fixed + per_sequence * batch`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepModel {
    pub fixed_s: f64,
    pub per_sequence_s: f64,
}

impl StepModel {
    pub fn at(&self, batch: f64) -> f64 {
        self.fixed_s + self.per_sequence_s * batch
    }

    /// The largest batch whose step stays within `itl_s`; 0 when not even one sequence does.
    pub fn max_batch(&self, itl_s: f64) -> f64 {
        if self.at(1.0) > itl_s {
            return 0.0;
        }
        if self.per_sequence_s <= 0.0 {
            return f64::INFINITY;
        }
        ((itl_s - self.fixed_s) / self.per_sequence_s)
            .floor()
            .max(1.0)
    }

    /// Least squares of step time on batch over a window's steps (from their sums). Without
    /// enough spread in the batch to tell the fixed part from the rest, every step's time is
    /// taken to grow with its batch (the ratio of the sums): that errs toward more replicas.
    pub fn fit(s: &StepSums) -> Option<StepModel> {
        if s.n <= 0.0 || s.batch <= 0.0 {
            return None;
        }
        let proportional = StepModel {
            fixed_s: 0.0,
            per_sequence_s: s.seconds / s.batch,
        };
        let (mb, mt) = (s.batch / s.n, s.seconds / s.n);
        let var = s.batch_sq / s.n - mb * mb;
        let cov = s.batch_seconds / s.n - mb * mt;
        // A spread of at least a quarter of a sequence (or 5% of the mean batch).
        if var < (0.05 * mb).max(0.5).powi(2) {
            return Some(proportional);
        }
        let k = cov / var;
        let a = mt - k * mb;
        if k <= 0.0 || a < 0.0 || !k.is_finite() {
            return Some(proportional);
        }
        Some(StepModel {
            fixed_s: a,
            per_sequence_s: k,
        })
    }
}

/// Decode: sequences arriving at `requests_per_s`, each generating `mean_output_tokens`, one per
/// step of its worker's batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeDemand {
    pub requests_per_s: f64,
    pub mean_output_tokens: f64,
    pub step: StepModel,
    pub itl_target_s: f64,
    /// KV tokens one sequence holds on average (its prompt and half its output).
    pub kv_tokens_per_sequence: f64,
    /// KV tokens one replica's cache holds.
    pub kv_tokens_per_replica: f64,
    /// KV tokens the role's caches hold now, in all (what the model of occupancy may miss).
    pub kv_tokens_used: f64,
}

/// Leave this much of the ITL target for what the model does not see (a prefill chunk in the
/// same step, the network).
pub const ITL_HEADROOM: f64 = 0.85;
/// Plan to fill at most this much of a replica's KV cache.
pub const KV_FILL: f64 = 0.9;

pub fn size_decode(d: &DecodeDemand) -> Sized {
    let tokens_per_s = d.requests_per_s * d.mean_output_tokens;
    let target = d.itl_target_s * ITL_HEADROOM;
    let b_max = d.step.max_batch(target);
    let attainable = b_max >= 1.0;
    // Per replica, the token throughput at the largest batch that meets the target; when none
    // does, one sequence at a time.
    let b = if attainable { b_max } else { 1.0 };
    let per_replica = if b.is_infinite() {
        f64::INFINITY
    } else {
        b / d.step.at(b)
    };
    let c_itl = (tokens_per_s / per_replica).ceil().max(1.0);
    // Little's law: each sequence stays for its output's steps; how many are there at once.
    let running = |c: f64| {
        let load = tokens_per_s * d.step.per_sequence_s;
        if c <= load {
            return f64::INFINITY;
        }
        tokens_per_s * d.step.fixed_s / (c - load) * c
    };
    let c_kv = if d.kv_tokens_per_replica > 0.0 {
        let concurrent = running(c_itl).max(0.0);
        let modelled = concurrent * d.kv_tokens_per_sequence;
        (modelled.max(d.kv_tokens_used) / (d.kv_tokens_per_replica * KV_FILL)).ceil()
    } else {
        0.0
    };
    let replicas = c_itl.max(c_kv).min(MAX_REPLICAS as f64) as u32;
    Sized {
        replicas,
        steady: replicas,
        predicted_s: decode_itl(d, replicas),
        attainable,
        utilisation: tokens_per_s / (replicas as f64 * per_replica),
    }
}

/// The step time (ITL) `c` decode replicas would have under this demand; infinite when they
/// cannot keep up.
pub fn decode_itl(d: &DecodeDemand, c: u32) -> f64 {
    let tokens_per_s = d.requests_per_s * d.mean_output_tokens;
    if tokens_per_s <= 0.0 {
        return d.step.at(0.0);
    }
    let c = c as f64;
    let load = tokens_per_s * d.step.per_sequence_s;
    if c <= load {
        return f64::INFINITY;
    }
    // Little's law: b sequences per replica, each a token per step of `fixed + k b`.
    let batch = tokens_per_s * d.step.fixed_s / (c - load);
    d.step.at(batch.max(1.0))
}

/// The time to first token at quantile `q` that `c` prefill replicas would give this demand.
pub fn prefill_ttft(d: &PrefillDemand, c: u32) -> f64 {
    let service_s = d.mean_prompt_tokens / d.capacity_tokens_per_s;
    let lambda = d.prompt_tokens_per_s / d.mean_prompt_tokens.max(1.0);
    wait_quantile(c.max(1), lambda, 1.0 / service_s, d.quantile) + service_s + d.transfer_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erlang_c_matches_known_values() {
        // One server: P(wait) = utilisation.
        assert!((erlang_c(1, 0.7) - 0.7).abs() < 1e-12);
        // Two servers, a = 1: C = 1/3.
        assert!((erlang_c(2, 1.0) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(erlang_c(3, 3.0), 1.0);
    }

    #[test]
    fn more_prompt_tokens_never_need_fewer_prefill_replicas() {
        let mut last = 0;
        for rate in [0.0, 100.0, 1_000.0, 5_000.0, 20_000.0, 80_000.0] {
            let s = size_prefill(&PrefillDemand {
                prompt_tokens_per_s: rate,
                mean_prompt_tokens: 1_000.0,
                capacity_tokens_per_s: 10_000.0,
                backlog_tokens: 0.0,
                ttft_target_s: 0.5,
                quantile: 0.99,
                transfer_s: 0.01,
                clear_s: 5.0,
            });
            assert!(s.replicas >= last, "{rate}: {} < {last}", s.replicas);
            assert!(s.predicted_s <= 0.5, "{rate}: predicted {}", s.predicted_s);
            last = s.replicas;
        }
        assert!(
            last >= 9,
            "80k tokens/s over 10k per replica needs at least 9, got {last}"
        );
    }

    #[test]
    fn a_target_below_the_prompts_own_prefill_is_unattainable_and_sized_by_demand() {
        let s = size_prefill(&PrefillDemand {
            prompt_tokens_per_s: 20_000.0,
            mean_prompt_tokens: 1_000.0,
            capacity_tokens_per_s: 10_000.0,
            backlog_tokens: 0.0,
            ttft_target_s: 0.05, // a prompt alone takes 0.1 s
            quantile: 0.99,
            transfer_s: 0.0,
            clear_s: 5.0,
        });
        assert!(!s.attainable);
        assert_eq!(s.replicas, 3, "2 replicas of work at 90% utilisation");
    }

    #[test]
    fn a_backlog_adds_replicas_to_clear_it() {
        let base = PrefillDemand {
            prompt_tokens_per_s: 10_000.0,
            mean_prompt_tokens: 1_000.0,
            capacity_tokens_per_s: 10_000.0,
            backlog_tokens: 0.0,
            ttft_target_s: 2.0,
            quantile: 0.99,
            transfer_s: 0.0,
            clear_s: 5.0,
        };
        let steady = size_prefill(&base).replicas;
        let queued = size_prefill(&PrefillDemand {
            backlog_tokens: 200_000.0,
            ..base
        })
        .replicas;
        assert!(queued >= steady + 4, "{queued} vs {steady}");
    }

    #[test]
    fn decode_is_sized_by_the_batch_that_meets_the_itl_target_and_by_kv() {
        let step = StepModel {
            fixed_s: 0.005,
            per_sequence_s: 0.0005,
        };
        // Target 50 ms: with 85% headroom, batch 75; 75 sequences / 42.5 ms per replica.
        assert_eq!(step.max_batch(0.05 * ITL_HEADROOM), 75.0);
        let d = DecodeDemand {
            requests_per_s: 20.0,
            mean_output_tokens: 200.0,
            step,
            itl_target_s: 0.05,
            kv_tokens_per_sequence: 1_000.0,
            kv_tokens_per_replica: 10_000_000.0,
            kv_tokens_used: 0.0,
        };
        let s = size_decode(&d);
        assert_eq!(s.replicas, 3, "4,000 tokens/s at 1,765 per replica");
        assert!(s.predicted_s <= 0.05 * ITL_HEADROOM);
        // A small cache: KV decides.
        let small = size_decode(&DecodeDemand {
            kv_tokens_per_replica: 20_000.0,
            ..d
        });
        assert!(small.replicas > s.replicas, "{}", small.replicas);
        let mut last = 0;
        for rps in [0.0, 1.0, 10.0, 50.0, 200.0] {
            let n = size_decode(&DecodeDemand {
                requests_per_s: rps,
                ..d
            })
            .replicas;
            assert!(n >= last);
            last = n;
        }
    }

    fn sums(points: &[(f64, f64)]) -> StepSums {
        points
            .iter()
            .fold(StepSums::default(), |s, &(b, t)| StepSums {
                n: s.n + 1.0,
                batch: s.batch + b,
                seconds: s.seconds + t,
                batch_sq: s.batch_sq + b * b,
                batch_seconds: s.batch_seconds + b * t,
            })
    }

    #[test]
    fn the_step_model_is_fitted_from_step_sums() {
        let truth = StepModel {
            fixed_s: 0.004,
            per_sequence_s: 0.0002,
        };
        let pts: Vec<(f64, f64)> = [3.0, 5.0, 4.0, 8.0, 2.0]
            .iter()
            .map(|&b| (b, truth.at(b)))
            .collect();
        let fit = StepModel::fit(&sums(&pts)).unwrap();
        assert!((fit.fixed_s - 0.004).abs() < 1e-9 && (fit.per_sequence_s - 0.0002).abs() < 1e-9);
        // One batch size only: proportional, which overestimates larger batches.
        let flat = StepModel::fit(&sums(&[(16.0, truth.at(16.0)); 3])).unwrap();
        assert_eq!(flat.fixed_s, 0.0);
        assert!(flat.at(64.0) >= truth.at(64.0));
        assert_eq!(StepModel::fit(&StepSums::default()), None);
    }
}
