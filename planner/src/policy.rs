//! Scaling policies behind one trait, so that the simulator runs each on the same trace: the
//! planner, the rule pdfleet used before it, an HPA on queue depth, and a threshold load
//! planner. The oracle, which needs the future, lives in the simulator.

use std::collections::VecDeque;

use crate::planner::{Bounds, Planner, PlannerConfig};
use crate::signals::{RoleSignals, Signals};

/// Each role's replicas as a policy wants them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets {
    pub prefill: u32,
    pub decode: Option<u32>,
}

pub trait Policy {
    fn name(&self) -> &'static str;
    /// How often the policy runs, seconds.
    fn tick_s(&self) -> f64;
    fn decide(&mut self, s: &Signals) -> Targets;
}

impl Policy for Planner {
    fn name(&self) -> &'static str {
        "planner"
    }

    fn tick_s(&self) -> f64 {
        5.0
    }

    fn decide(&mut self, s: &Signals) -> Targets {
        let plan = self.plan(s);
        Targets {
            prefill: plan.prefill.desired,
            decode: plan.decode.map(|d| d.desired),
        }
    }
}

fn bounded(n: i64, b: Bounds) -> u32 {
    n.clamp(b.min as i64, b.max as i64) as u32
}

/// The rule before the planner: TTFT over its target adds a prefill worker, ITL over its
/// target a decode worker; under half the target removes one after 300 s; one last-change time
/// for the whole pool; it ran on every watch event (here: every second).
pub struct Current {
    pub cfg: PlannerConfig,
    last_change_s: f64,
}

impl Current {
    pub fn new(cfg: PlannerConfig) -> Self {
        Current {
            cfg,
            last_change_s: f64::NEG_INFINITY,
        }
    }

    fn step(&self, current: u32, observed: Option<f64>, target: f64, since: f64, b: Bounds) -> u32 {
        let Some(o) = observed else {
            return current;
        };
        let next = if o > target {
            current as i64 + 1
        } else if o < target / 2.0 && since >= 300.0 {
            current as i64 - 1
        } else {
            current as i64
        };
        bounded(next, b)
    }
}

impl Policy for Current {
    fn name(&self) -> &'static str {
        "current"
    }

    fn tick_s(&self) -> f64 {
        1.0
    }

    fn decide(&mut self, s: &Signals) -> Targets {
        let since = s.now_s - self.last_change_s;
        let c = &self.cfg;
        let prefill = self.step(
            s.prefill.desired,
            s.ttft_s,
            c.ttft_target_s,
            since,
            c.prefill,
        );
        let decode = s.decode.as_ref().map(|d| {
            self.step(
                d.desired,
                s.itl_s,
                c.itl_target_s,
                since,
                c.decode.expect("decode"),
            )
        });
        if prefill != s.prefill.desired || decode != s.decode.map(|d| d.desired) {
            self.last_change_s = s.now_s;
        }
        Targets { prefill, decode }
    }
}

/// The Kubernetes HPA's rule on a per-replica metric: `ceil(current * metric / target)` outside
/// a 10% tolerance, up by at most 100% or 4 pods per 15 s, down to the highest recommendation
/// of the last 300 s. Prefill's metric is queued prompts per replica, decode's is KV use.
pub struct Hpa {
    pub cfg: PlannerConfig,
    /// Queued requests per prefill replica the HPA aims at.
    pub queue_target: f64,
    /// KV use per decode replica the HPA aims at.
    pub kv_target: f64,
    history: [VecDeque<(f64, u32)>; 2],
    last_up_s: [f64; 2],
    mean_prompt: f64,
}

impl Hpa {
    pub fn new(cfg: PlannerConfig) -> Self {
        Hpa {
            cfg,
            queue_target: 2.0,
            kv_target: 0.7,
            history: [VecDeque::new(), VecDeque::new()],
            last_up_s: [f64::NEG_INFINITY; 2],
            mean_prompt: 1.0,
        }
    }

    fn one(
        &mut self,
        i: usize,
        now: f64,
        r: &RoleSignals,
        metric: Option<f64>,
        target: f64,
        b: Bounds,
    ) -> u32 {
        let current = r.desired.max(1);
        let Some(m) = metric else {
            return r.desired;
        };
        let ratio = m / target;
        let mut rec = if (ratio - 1.0).abs() <= 0.1 {
            current
        } else {
            (current as f64 * ratio).ceil() as u32
        };
        rec = bounded(rec as i64, b);
        let h = &mut self.history[i];
        h.push_back((now, rec));
        while h.front().is_some_and(|&(t, _)| t < now - 300.0) {
            h.pop_front();
        }
        if rec > current {
            if now - self.last_up_s[i] < 15.0 {
                return current;
            }
            self.last_up_s[i] = now;
            return rec.min((current * 2).max(current + 4));
        }
        let window_max = h.iter().map(|&(_, n)| n).max().unwrap_or(rec);
        window_max.min(current)
    }
}

/// The prefill backlog in prompts per replica (the queue depth the HPA and the load rule
/// react to), the mean prompt length remembered from the last window that had arrivals.
fn queued_prompts_per_replica(mean_prompt: &mut f64, s: &Signals) -> Option<f64> {
    if let Some(p) = s.demand.and_then(|d| d.mean_prompt_tokens()) {
        *mean_prompt = p;
    }
    s.prefill
        .backlog_tokens
        .map(|t| t / *mean_prompt / s.prefill.desired.max(1) as f64)
}

impl Policy for Hpa {
    fn name(&self) -> &'static str {
        "hpa"
    }

    fn tick_s(&self) -> f64 {
        15.0
    }

    fn decide(&mut self, s: &Signals) -> Targets {
        let queue = queued_prompts_per_replica(&mut self.mean_prompt, s);
        let prefill = self.one(
            0,
            s.now_s,
            &s.prefill,
            queue,
            self.queue_target,
            self.cfg.prefill,
        );
        let decode = s.decode.as_ref().map(|d| {
            let kv = match (d.kv_tokens_used, d.kv_tokens_per_replica) {
                (Some(u), Some(t)) if t > 0.0 => Some(u / (t * d.desired.max(1) as f64)),
                _ => None,
            };
            self.one(
                1,
                s.now_s,
                d,
                kv,
                self.kv_target,
                self.cfg.decode.expect("decode"),
            )
        });
        Targets { prefill, decode }
    }
}

/// A threshold load planner, as Dynamo's: every 5 s, one replica more when the role is over its
/// high threshold (prefill: queued prompts per replica; decode: KV use), one fewer under its low
/// one.
pub struct Load {
    pub cfg: PlannerConfig,
    mean_prompt: f64,
}

impl Load {
    pub fn new(cfg: PlannerConfig) -> Self {
        Load {
            cfg,
            mean_prompt: 1.0,
        }
    }
}

fn threshold(current: u32, metric: Option<f64>, up: f64, down: f64, b: Bounds) -> u32 {
    match metric {
        Some(m) if m > up => bounded(current as i64 + 1, b),
        Some(m) if m < down => bounded(current as i64 - 1, b),
        _ => current,
    }
}

impl Policy for Load {
    fn name(&self) -> &'static str {
        "load"
    }

    fn tick_s(&self) -> f64 {
        5.0
    }

    fn decide(&mut self, s: &Signals) -> Targets {
        let queue = queued_prompts_per_replica(&mut self.mean_prompt, s);
        let prefill = threshold(s.prefill.desired, queue, 5.0, 0.2, self.cfg.prefill);
        let decode = s.decode.as_ref().map(|d| {
            let kv = match (d.kv_tokens_used, d.kv_tokens_per_replica) {
                (Some(u), Some(t)) if t > 0.0 => Some(u / (t * d.desired.max(1) as f64)),
                _ => None,
            };
            threshold(d.desired, kv, 0.9, 0.5, self.cfg.decode.expect("decode"))
        });
        Targets { prefill, decode }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Demand;

    #[test]
    fn the_old_rule_runs_to_max_on_an_unreachable_target() {
        // What the planner replaces: a TTFT target the model cannot meet drives prefill up every
        // tick until max, and it stays there.
        let mut c = Current::new(PlannerConfig::new(0.001, 1.0, 0.99));
        let mut s = Signals {
            demand: Some(Demand::default()),
            ttft_s: Some(0.01),
            itl_s: Some(0.001),
            prefill: RoleSignals {
                desired: 1,
                ..Default::default()
            },
            decode: Some(RoleSignals {
                desired: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        for t in 0..30 {
            s.now_s = t as f64;
            let out = c.decide(&s);
            s.prefill.desired = out.prefill;
            s.decode.as_mut().unwrap().desired = out.decode.unwrap();
        }
        assert_eq!(s.prefill.desired, 16);
    }
}
