//! The oracle: the cheapest replica schedule that meets the SLO, computed with hindsight. For
//! each interval of the trace it sizes each role with the planner's own model fed the interval's
//! true demand and the profile's true capacity, has the replicas ready a start delay before they
//! are needed, and lets them go the moment they are not. Where the model was optimistic (bursts
//! inside an interval, long prompts), replaying the trace shows it: [`Oracle::refine`] adds a
//! replica to the intervals whose requests missed, and the replay repeats.

use pdfleet_planner::model::{self, DecodeDemand, PrefillDemand, StepModel};
use pdfleet_planner::planner::Bounds;
use pdfleet_planner::policy::{Policy, Targets};
use pdfleet_planner::signals::Signals;

use super::fleet::{Run, SimConfig};
use crate::trace::TraceRequest;

#[derive(Clone)]
pub struct Oracle {
    /// (start time, prefill, decode) per interval.
    schedule: Vec<(f64, u32, u32)>,
    /// What each interval needs (before the start-delay lead).
    need: Vec<(u32, u32)>,
    bounds: (Bounds, Bounds),
    lead: usize,
    interval_s: f64,
}

impl Oracle {
    pub fn new(
        cfg: &SimConfig,
        trace: &[TraceRequest],
        bounds: (Bounds, Bounds),
        interval_s: f64,
    ) -> Self {
        let end = trace.last().map(|r| r.at_s).unwrap_or(0.0) + interval_s;
        let n = (end / interval_s).ceil() as usize;
        let p = &cfg.profile;
        let need: Vec<(u32, u32)> = (0..n)
            .map(|k| {
                let (t0, t1) = (k as f64 * interval_s, (k + 1) as f64 * interval_s);
                let reqs: Vec<&TraceRequest> = trace
                    .iter()
                    .filter(|r| r.at_s >= t0 && r.at_s < t1)
                    .collect();
                if reqs.is_empty() {
                    return (bounds.0.min, bounds.1.min);
                }
                let count = reqs.len() as f64;
                let prompt: f64 = reqs.iter().map(|r| r.prompt as f64).sum();
                let output: f64 = reqs.iter().map(|r| r.output as f64).sum();
                let (mean_prompt, mean_output) = (prompt / count, output / count);
                let transfer = cfg.transfer_latency_s
                    + mean_prompt * p.kv_bytes_per_token / cfg.transfer_bytes_per_s;
                let pre = model::size_prefill(&PrefillDemand {
                    prompt_tokens_per_s: prompt / interval_s,
                    mean_prompt_tokens: mean_prompt,
                    capacity_tokens_per_s: p.prefill_tokens_per_s,
                    backlog_tokens: 0.0,
                    ttft_target_s: cfg.ttft_s,
                    quantile: cfg.quantile,
                    transfer_s: transfer,
                    clear_s: 30.0,
                });
                // The KV term as a per-sequence cost at this interval's mean context.
                let ctx = mean_prompt + mean_output / 2.0;
                let dec = model::size_decode(&DecodeDemand {
                    requests_per_s: count / interval_s,
                    mean_output_tokens: mean_output,
                    step: StepModel {
                        fixed_s: p.step_fixed_s,
                        per_sequence_s: p.step_per_sequence_s + p.step_per_kv_token_s * ctx,
                    },
                    itl_target_s: cfg.itl_s,
                    kv_tokens_per_sequence: mean_prompt + mean_output / 2.0,
                    kv_tokens_per_replica: p.kv_tokens,
                    kv_tokens_used: 0.0,
                });
                (
                    pre.replicas.clamp(bounds.0.min, bounds.0.max),
                    dec.replicas.clamp(bounds.1.min, bounds.1.max),
                )
            })
            .collect();
        let lead = (cfg.start_delay_s / interval_s).ceil() as usize;
        let mut o = Oracle {
            schedule: Vec::new(),
            need,
            bounds,
            lead,
            interval_s,
        };
        o.reschedule();
        o
    }

    /// Ready when needed: ask a start delay ahead, for as long as any interval it overlaps
    /// needs them.
    fn reschedule(&mut self) {
        let n = self.need.len();
        self.schedule = (0..n)
            .map(|k| {
                let ahead = &self.need[k..(k + self.lead + 1).min(n)];
                let p = ahead.iter().map(|x| x.0).max().unwrap_or(self.bounds.0.min);
                let d = ahead.iter().map(|x| x.1).max().unwrap_or(self.bounds.1.min);
                (k as f64 * self.interval_s, p, d)
            })
            .collect();
    }

    /// One more replica of the role at fault for every interval whose requests missed the SLO
    /// in `run` (prefill for a late first token, decode for slow tokens or no room). Returns
    /// whether anything could still change.
    pub fn refine(&mut self, run: &Run, cfg: &SimConfig) -> bool {
        let mut changed = false;
        let n = self.need.len();
        let mut late = vec![false; n];
        let mut slow = vec![false; n];
        for o in &run.outcomes {
            let k = ((o.arrival_s / self.interval_s) as usize).min(n.saturating_sub(1));
            if o.ttft_s.is_some_and(|t| t > cfg.ttft_s) || (o.refused && o.ttft_s.is_none()) {
                late[k] = true;
            }
            if o.mean_itl_s.is_some_and(|i| i > cfg.itl_s) {
                slow[k] = true;
            }
        }
        for k in 0..n {
            let (p, d) = &mut self.need[k];
            if late[k] && *p < self.bounds.0.max {
                *p += 1;
                changed = true;
            }
            if slow[k] && *d < self.bounds.1.max {
                *d += 1;
                changed = true;
            }
        }
        self.reschedule();
        changed
    }
}

impl Oracle {
    /// What the start of the trace needs: every policy starts there, warm, so that runs differ
    /// by how they follow the load, not by a cold start.
    pub fn initial(&self) -> (u32, u32) {
        self.schedule
            .first()
            .map(|&(_, p, d)| (p, d))
            .unwrap_or((1, 1))
    }
}

impl Policy for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn tick_s(&self) -> f64 {
        1.0
    }

    fn decide(&mut self, s: &Signals) -> Targets {
        let k = (s.now_s / self.interval_s) as usize;
        let (_, p, d) = self.schedule.get(k).copied().unwrap_or((
            0.0,
            s.prefill.desired,
            s.decode.map(|d| d.desired).unwrap_or(1),
        ));
        Targets {
            prefill: p,
            decode: Some(d),
        }
    }
}
