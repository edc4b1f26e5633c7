//! The planner: at each tick, each role's replicas from the model ([`crate::model`]) fed with
//! measured demand and capacity, corrected by the latency users felt, then acted on: up at once
//! (pending pods count as capacity), down only after the scale-down window agrees, one role at a
//! time, never during a rollout, never on missing data.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::{self, DecodeDemand, PrefillDemand, Sized, StepModel};
use crate::signals::{RoleSignals, Signals, StepSums};

/// Replicas a role may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannerConfig {
    pub ttft_target_s: f64,
    pub itl_target_s: f64,
    /// The SLO's quantile, e.g. 0.99.
    pub quantile: f64,
    /// Prefill (or, colocated, unified) and decode.
    pub prefill: Bounds,
    pub decode: Option<Bounds>,
    /// A scale-down takes the highest recommendation over this window (the HPA's rule).
    pub scale_down_window_s: f64,
    /// Most replicas one tick adds, as a share of the current count (at least one).
    pub max_up_share: f64,
    /// Roles that changed within this are left alone by the other role's scale-down.
    pub settle_s: f64,
    /// A prompt queue already there is cleared within about this (replicas take time to start).
    pub backlog_clear_s: f64,
    /// Latency corrects the model only for a role this long unchanged and all ready: the
    /// latency quantiles look back over a window, and a transient (a queue being cleared, pods
    /// starting) is not the model's error.
    pub correct_after_s: f64,
}

impl PlannerConfig {
    pub fn new(ttft_target_s: f64, itl_target_s: f64, quantile: f64) -> Self {
        PlannerConfig {
            ttft_target_s,
            itl_target_s,
            quantile,
            prefill: Bounds { min: 1, max: 16 },
            decode: Some(Bounds { min: 1, max: 16 }),
            scale_down_window_s: 300.0,
            max_up_share: 1.0,
            settle_s: 10.0,
            backlog_clear_s: 15.0,
            correct_after_s: 120.0,
        }
    }
}

/// Which role a decision is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Which {
    Prefill,
    Decode,
}

/// What limited the planner, when something did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Limit {
    AtMax,
    AtMin,
    /// Waiting for the scale-down window, pods to be ready, a rollout, or the other role.
    Holding(String),
}

/// One role's decision and the figures behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoleDecision {
    /// What the role should run now.
    pub desired: u32,
    /// What the model recommends (within the bounds), before the acting rules.
    pub recommended: u32,
    pub changed: bool,
    pub reason: String,
    /// Prefill: prompt tokens/s; decode: generated tokens/s.
    pub demand: Option<f64>,
    /// The same unit per replica.
    pub capacity_per_replica: Option<f64>,
    pub utilisation: Option<f64>,
    /// The latency the model predicts at `desired` (TTFT for prefill, ITL for decode), seconds.
    pub predicted_s: Option<f64>,
    pub observed_s: Option<f64>,
    pub attainable: bool,
    pub limit: Option<Limit>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub prefill: RoleDecision,
    pub decode: Option<RoleDecision>,
    /// `None` when the planner had what it needed; else why it held.
    pub no_data: Option<String>,
    /// Which role users' time to first token is mostly spent in.
    pub bottleneck: Option<Which>,
}

/// A role's memory across ticks.
#[derive(Clone, Debug, Default)]
struct RoleState {
    /// (time, what the steady demand needed): the scale-down window. Replicas added to clear a
    /// queue are not in it: they go when the queue does.
    history: VecDeque<(f64, u32)>,
    last_change_s: Option<f64>,
    /// Prefill: prompt tokens per busy second, smoothed. Decode: the last step sums.
    capacity: Option<f64>,
    steps: Option<StepSums>,
    /// Observed over predicted latency, smoothed and bounded.
    correction: f64,
    /// The first tick this role was planned at: no scale-down before a whole window is seen.
    first_s: Option<f64>,
}

pub struct Planner {
    pub cfg: PlannerConfig,
    prefill: RoleState,
    decode: RoleState,
}

/// How quickly measurements move the smoothed values (per tick).
const SMOOTHING: f64 = 0.3;
const CORRECTION_BOUNDS: (f64, f64) = (0.5, 2.0);

fn smooth(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + SMOOTHING * (new - o),
        None => new,
    }
}

impl Planner {
    pub fn new(cfg: PlannerConfig) -> Self {
        let fresh = RoleState {
            correction: 1.0,
            ..Default::default()
        };
        Planner {
            cfg,
            prefill: fresh.clone(),
            decode: fresh,
        }
    }

    /// Learns capacity from what the workers measured.
    fn learn(&mut self, s: &Signals) {
        if let Some(mu) = s.prefill.tokens_per_busy_s.filter(|m| *m > 0.0) {
            self.prefill.capacity = Some(smooth(self.prefill.capacity, mu));
        }
        let decode = s.decode.as_ref().unwrap_or(&s.prefill);
        if let Some(sums) = decode.steps.filter(|s| s.n > 0.0) {
            let state = if s.decode.is_some() {
                &mut self.decode
            } else {
                &mut self.prefill
            };
            state.steps = Some(sums);
        }
    }

    /// The fitted step model, as measured (uncorrected).
    fn step_model(&self, colocated: bool) -> Option<StepModel> {
        let state = if colocated {
            &self.prefill
        } else {
            &self.decode
        };
        state.steps.as_ref().and_then(StepModel::fit)
    }

    /// One tick: recommendations from the model, then the acting rules.
    pub fn plan(&mut self, s: &Signals) -> Plan {
        self.learn(s);
        let colocated = s.decode.is_none();
        let hold = |r: &RoleSignals, why: &str| RoleDecision {
            desired: r.desired,
            recommended: r.desired,
            changed: false,
            reason: why.to_string(),
            demand: None,
            capacity_per_replica: None,
            utilisation: None,
            predicted_s: None,
            observed_s: None,
            attainable: true,
            limit: Some(Limit::Holding(why.to_string())),
        };
        let Some(demand) = s.demand else {
            let why = "no metrics: holding";
            return Plan {
                prefill: hold(&s.prefill, why),
                decode: s.decode.as_ref().map(|d| hold(d, why)),
                no_data: Some("no request rates from the router".into()),
                bottleneck: None,
            };
        };
        let idle = demand.requests_per_s <= 0.0;
        let mean_prompt = demand.mean_prompt_tokens().unwrap_or(0.0);
        let mean_output = demand.mean_output_tokens().unwrap_or(0.0);
        // The demand against what was measured, before any correction.
        let prefill_demand = self.prefill.capacity.map(|mu| PrefillDemand {
            prompt_tokens_per_s: demand
                .peak_prompt_tokens_per_s
                .unwrap_or(0.0)
                .max(demand.prompt_tokens_per_s),
            mean_prompt_tokens: mean_prompt.max(1.0),
            capacity_tokens_per_s: mu,
            backlog_tokens: s.prefill.backlog_tokens.unwrap_or(0.0),
            ttft_target_s: self.cfg.ttft_target_s,
            quantile: self.cfg.quantile,
            transfer_s: s.transfer_s.unwrap_or(0.0),
            clear_s: self.cfg.backlog_clear_s,
        });
        let decode_role = s.decode.as_ref().unwrap_or(&s.prefill);
        let kv_per_replica = decode_role.kv_tokens_per_replica.unwrap_or(0.0);
        let decode_demand = self.step_model(colocated).map(|step| DecodeDemand {
            requests_per_s: demand.requests_per_s,
            mean_output_tokens: mean_output,
            step,
            itl_target_s: self.cfg.itl_target_s,
            kv_tokens_per_sequence: mean_prompt + mean_output / 2.0,
            kv_tokens_per_replica: kv_per_replica,
            kv_tokens_used: decode_role.kv_tokens_used.unwrap_or(0.0),
        });
        let bottleneck = s.ttft_parts.map(|p| {
            if p.decode_bound() {
                Which::Decode
            } else {
                Which::Prefill
            }
        });
        if !idle {
            self.correct(
                s,
                bottleneck,
                prefill_demand.as_ref(),
                decode_demand.as_ref(),
            );
        }
        for state in [&mut self.prefill, &mut self.decode] {
            state.first_s.get_or_insert(s.now_s);
        }
        // Prefill, from prompt tokens against the corrected capacity.
        let prefill_sized = match (idle, prefill_demand) {
            (true, _) => Some(zero()),
            (false, Some(d)) => Some(model::size_prefill(&PrefillDemand {
                capacity_tokens_per_s: d.capacity_tokens_per_s / self.prefill.correction,
                ..d
            })),
            (false, None) => None,
        };
        // Decode, from generated tokens against the batch that meets the ITL target.
        let decode_state = if colocated {
            &self.prefill
        } else {
            &self.decode
        };
        let k = decode_state.correction;
        let step = decode_demand.map(|d| StepModel {
            fixed_s: d.step.fixed_s * k,
            per_sequence_s: d.step.per_sequence_s * k,
        });
        let decode_sized = match (idle, decode_demand) {
            (true, _) => Some(zero()),
            (false, Some(d)) => Some(model::size_decode(&DecodeDemand {
                step: step.expect("with the demand"),
                ..d
            })),
            (false, None) => None,
        };
        let now = s.now_s;
        if colocated {
            // Unified workers do both: their engine time is shared, so the roles add up.
            let sized = match (prefill_sized, decode_sized) {
                (Some(p), Some(d)) => Some(Sized {
                    replicas: if idle { 0 } else { p.replicas + d.replicas },
                    steady: if idle { 0 } else { p.steady + d.steady },
                    predicted_s: p.predicted_s,
                    attainable: p.attainable && d.attainable,
                    utilisation: p.utilisation.max(d.utilisation),
                }),
                _ => None,
            };
            let mut d = self.decide(Which::Prefill, &s.prefill, sized, now, None, !idle);
            d.demand = Some(demand.prompt_tokens_per_s);
            d.observed_s = s.ttft_s;
            return Plan {
                prefill: d,
                decode: None,
                no_data: sized.is_none().then(|| "no capacity measured yet".into()),
                bottleneck,
            };
        }
        let decode_signals = s.decode.expect("disaggregated");
        let mut prefill = self.decide(Which::Prefill, &s.prefill, prefill_sized, now, None, !idle);
        prefill.demand = Some(demand.prompt_tokens_per_s);
        prefill.observed_s = s.ttft_s;
        prefill.capacity_per_replica = self.prefill.capacity;
        let mut decode = self.decide(
            Which::Decode,
            &decode_signals,
            decode_sized,
            now,
            prefill.changed.then_some(now),
            !idle,
        );
        decode.demand = Some(demand.generated_tokens_per_s);
        decode.observed_s = s.itl_s;
        decode.capacity_per_replica = step.map(|m| {
            let b = m
                .max_batch(self.cfg.itl_target_s * model::ITL_HEADROOM)
                .max(1.0);
            if b.is_finite() {
                b / m.at(b)
            } else {
                f64::INFINITY
            }
        });
        let missing = [
            prefill_sized.is_none().then_some("prefill capacity"),
            decode_sized.is_none().then_some("decode step times"),
        ];
        let missing: Vec<&str> = missing.into_iter().flatten().collect();
        Plan {
            prefill,
            decode: Some(decode),
            no_data: (!missing.is_empty())
                .then(|| format!("not measured yet: {}", missing.join(", "))),
            bottleneck,
        }
    }

    /// Moves each role's correction toward observed over predicted latency, the prediction
    /// being the model's for the replicas that are ready now: a breach the model explains (too
    /// few replicas for the demand) is not its error; one it does not explain is. Only for the
    /// role users' time is spent in, and only when latency matters (near or over its target).
    fn correct(
        &mut self,
        s: &Signals,
        bottleneck: Option<Which>,
        prefill: Option<&PrefillDemand>,
        decode: Option<&DecodeDemand>,
    ) {
        let (now, settle) = (s.now_s, self.cfg.correct_after_s);
        let toward = |state: &mut RoleState,
                      r: &RoleSignals,
                      observed: Option<f64>,
                      predicted: Option<f64>,
                      target: f64| {
            let settled = r.ready >= r.desired
                && !r.rolling
                && state.last_change_s.is_none_or(|t| now - t >= settle)
                && state.first_s.is_some_and(|t| now - t >= settle);
            if !settled {
                return;
            }
            let ratio = match (observed, predicted) {
                (Some(o), Some(p))
                    if p.is_finite() && p > 0.0 && p <= target && o > 0.8 * target =>
                {
                    (o / p).clamp(CORRECTION_BOUNDS.0, CORRECTION_BOUNDS.1)
                }
                _ => 1.0,
            };
            state.correction = (state.correction + SMOOTHING * (ratio - state.correction))
                .clamp(CORRECTION_BOUNDS.0, CORRECTION_BOUNDS.1);
        };
        if bottleneck != Some(Which::Decode) {
            let predicted = prefill.map(|d| model::prefill_ttft(d, s.prefill.ready));
            toward(
                &mut self.prefill,
                &s.prefill,
                s.ttft_s,
                predicted,
                self.cfg.ttft_target_s,
            );
        }
        let (state, role) = match &s.decode {
            Some(d) => (&mut self.decode, d),
            None => (&mut self.prefill, &s.prefill),
        };
        let predicted = decode.map(|d| model::decode_itl(d, role.ready));
        toward(state, role, s.itl_s, predicted, self.cfg.itl_target_s);
    }

    /// The acting rules for one role.
    fn decide(
        &mut self,
        which: Which,
        r: &RoleSignals,
        sized: Option<Sized>,
        now: f64,
        other_changed_at: Option<f64>,
        waking: bool,
    ) -> RoleDecision {
        let bounds = match which {
            Which::Prefill => self.cfg.prefill,
            Which::Decode => self.cfg.decode.expect("a decode role"),
        };
        let (window, max_up_share, settle) = (
            self.cfg.scale_down_window_s,
            self.cfg.max_up_share,
            self.cfg.settle_s,
        );
        let other_last = [
            match which {
                Which::Prefill => self.decode.last_change_s,
                Which::Decode => self.prefill.last_change_s,
            },
            other_changed_at,
        ]
        .into_iter()
        .flatten()
        .reduce(f64::max);
        let state = match which {
            Which::Prefill => &mut self.prefill,
            Which::Decode => &mut self.decode,
        };
        let current = r.desired;
        let mut d = RoleDecision {
            desired: current,
            recommended: current,
            changed: false,
            reason: String::new(),
            demand: None,
            capacity_per_replica: None,
            utilisation: sized.map(|s| s.utilisation),
            predicted_s: sized.map(|s| s.predicted_s),
            observed_s: None,
            attainable: sized.is_none_or(|s| s.attainable),
            limit: None,
        };
        // The bounds hold whatever the model says, at once (they may just have been edited).
        let bounded = current.clamp(bounds.min, bounds.max);
        if bounded != current {
            d.desired = bounded;
            d.recommended = bounded;
            d.changed = true;
            d.reason = format!(
                "{current} -> {bounded}: within the bounds {}-{}",
                bounds.min, bounds.max
            );
            state.last_change_s = Some(now);
            return d;
        }
        let Some(sized) = sized else {
            if current == 0 && waking {
                // Nothing runs to measure: one replica, and the model takes over from it.
                d.desired = 1.min(bounds.max);
                d.recommended = d.desired;
                d.changed = d.desired != current;
                d.reason = "up 0 -> 1: requests arrive and no replica runs".into();
                state.last_change_s = Some(now);
                return d;
            }
            d.reason = "capacity not measured yet: holding".into();
            d.limit = Some(Limit::Holding(d.reason.clone()));
            return d;
        };
        let rec = sized.replicas.clamp(bounds.min, bounds.max);
        let steady = sized.steady.clamp(bounds.min, bounds.max);
        d.recommended = rec;
        if sized.replicas > bounds.max {
            d.limit = Some(Limit::AtMax);
        } else if sized.replicas < bounds.min && current == bounds.min {
            d.limit = Some(Limit::AtMin);
        }
        state.history.push_back((now, steady));
        while state
            .history
            .front()
            .is_some_and(|&(t, _)| t < now - window)
        {
            state.history.pop_front();
        }
        if rec > current {
            let step = ((current as f64 * max_up_share).ceil() as u32).max(1);
            d.desired = rec.min(current + step);
            d.reason = format!(
                "up {current} -> {}: the model needs {} for the demand ({})",
                d.desired,
                sized.replicas,
                utilisation_note(sized.utilisation)
            );
        } else if rec < current {
            // The steady need over the window, and what clearing a queue still needs now.
            let window_max = state
                .history
                .iter()
                .map(|&(_, n)| n)
                .max()
                .unwrap_or(steady)
                .max(rec);
            let why_not = if state.first_s.is_none_or(|t| now - t < window) {
                Some(format!("not planning for {window:.0} s yet"))
            } else if r.ready < r.desired {
                Some("pods are not all ready".to_string())
            } else if r.rolling {
                Some("a rollout is under way".to_string())
            } else if other_last.is_some_and(|t| now - t < settle) {
                Some("the other role just changed".to_string())
            } else if window_max >= current {
                Some(format!(
                    "the last {window:.0} s recommended up to {window_max}"
                ))
            } else {
                None
            };
            match why_not {
                Some(why) => {
                    d.reason = format!("down to {rec} wanted, holding {current}: {why}");
                    d.limit = Some(Limit::Holding(why));
                }
                None => {
                    d.desired = window_max;
                    d.reason = format!(
                        "down {current} -> {window_max}: demand fits fewer for {window:.0} s ({})",
                        utilisation_note(sized.utilisation)
                    );
                }
            }
        } else {
            d.reason = format!("steady at {current}");
        }
        if d.desired != current {
            d.changed = true;
            state.last_change_s = Some(now);
        }
        d
    }
}

fn zero() -> Sized {
    Sized {
        replicas: 0,
        steady: 0,
        predicted_s: 0.0,
        attainable: true,
        utilisation: 0.0,
    }
}

fn utilisation_note(u: f64) -> String {
    format!("utilisation {:.0}%", 100.0 * u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::Demand;

    fn role(desired: u32) -> RoleSignals {
        RoleSignals {
            desired,
            ready: desired,
            ..Default::default()
        }
    }

    fn signals(t: f64, rps: f64, prefill: u32, decode: u32) -> Signals {
        Signals {
            now_s: t,
            demand: Some(Demand {
                requests_per_s: rps,
                prompt_tokens_per_s: rps * 1_000.0,
                generated_tokens_per_s: rps * 100.0,
                peak_prompt_tokens_per_s: None,
            }),
            prefill: RoleSignals {
                tokens_per_busy_s: Some(10_000.0),
                backlog_tokens: Some(0.0),
                ..role(prefill)
            },
            decode: Some(RoleSignals {
                steps: Some(StepSums {
                    n: 50.0,
                    batch: 800.0,
                    seconds: 1.0,
                    batch_sq: 12_800.0,
                    batch_seconds: 16.0,
                }),
                ..role(decode)
            }),
            ..Default::default()
        }
    }

    fn planner() -> Planner {
        Planner::new(PlannerConfig {
            scale_down_window_s: 60.0,
            ..PlannerConfig::new(1.0, 0.05, 0.99)
        })
    }

    #[test]
    fn more_load_never_gives_fewer_replicas_and_bounds_always_hold() {
        for seed in 0..20u64 {
            let mut last = (0, 0);
            let mut rng = pdfleet_api::rng::SplitMix64::new(seed);
            let mut rates: Vec<f64> = (0..10).map(|_| rng.uniform(1.0).abs() * 200.0).collect();
            rates.sort_by(f64::total_cmp);
            for (i, &rps) in rates.iter().enumerate() {
                // A fresh planner each time: the recommendation alone.
                let mut p = planner();
                let plan = p.plan(&signals(i as f64, rps, 1, 1));
                let (pr, dr) = (plan.prefill.recommended, plan.decode.unwrap().recommended);
                assert!(pr >= last.0 && dr >= last.1, "{rps}: {pr}/{dr} < {last:?}");
                assert!((1..=16).contains(&pr) && (1..=16).contains(&dr));
                last = (pr, dr);
            }
        }
    }

    #[test]
    fn pending_pods_are_not_added_twice() {
        let mut p = Planner::new(PlannerConfig {
            max_up_share: 100.0,
            ..PlannerConfig::new(1.0, 0.05, 0.99)
        });
        let first = p.plan(&signals(0.0, 60.0, 1, 1));
        let want = first.prefill.desired;
        assert!(want > 1);
        // The new pods are pending: desired is already there, ready is not.
        let mut s = signals(5.0, 60.0, want, first.decode.as_ref().unwrap().desired);
        s.prefill.ready = 1;
        let second = p.plan(&s);
        assert_eq!(second.prefill.desired, want, "{}", second.prefill.reason);
        assert!(!second.prefill.changed);
    }

    #[test]
    fn missing_data_holds_and_never_scales_down() {
        let mut p = planner();
        let mut s = signals(0.0, 0.0, 5, 5);
        s.demand = None;
        for t in 0..100 {
            s.now_s = t as f64 * 5.0;
            let plan = p.plan(&s);
            assert_eq!((plan.prefill.desired, plan.decode.unwrap().desired), (5, 5));
            assert!(plan.no_data.is_some());
        }
    }

    #[test]
    fn no_traffic_goes_to_min_after_the_window_and_not_before() {
        let mut p = planner();
        let mut t = 0.0;
        for _ in 0..3 {
            p.plan(&signals(t, 100.0, 8, 8));
            t += 5.0;
        }
        let (mut prefill, mut decode) = (8, 8);
        let mut down_at = None;
        while t < 200.0 {
            let plan = p.plan(&signals(t, 0.0, prefill, decode));
            let next = (plan.prefill.desired, plan.decode.unwrap().desired);
            if next.0 < prefill || next.1 < decode {
                down_at.get_or_insert(t);
            }
            (prefill, decode) = next;
            t += 5.0;
        }
        let down_at = down_at.expect("it scaled down");
        assert!(
            down_at >= 60.0,
            "scaled down at {down_at} s, inside the 60 s window"
        );
        assert_eq!((prefill, decode), (1, 1));
    }

    #[test]
    fn one_role_scales_down_at_a_time() {
        let mut p = Planner::new(PlannerConfig {
            scale_down_window_s: 0.0,
            ..PlannerConfig::new(1.0, 0.05, 0.99)
        });
        let plan = p.plan(&signals(0.0, 0.0, 4, 4));
        let (pd, dd) = (plan.prefill.changed, plan.decode.unwrap().changed);
        assert!(pd && !dd, "prefill went down, decode waits");
    }

    #[test]
    fn edited_bounds_hold_at_once_and_a_role_at_zero_comes_back() {
        let mut p = planner();
        p.cfg.prefill = Bounds { min: 2, max: 3 };
        let plan = p.plan(&signals(0.0, 1.0, 1, 5));
        assert_eq!(plan.prefill.desired, 2, "{}", plan.prefill.reason);
        p.cfg.decode = Some(Bounds { min: 0, max: 3 });
        let plan = p.plan(&signals(5.0, 1.0, 2, 5));
        assert_eq!(plan.decode.unwrap().desired, 3);
        // At zero nothing measures capacity; requests arriving bring one replica back.
        let mut p = planner();
        p.cfg.prefill = Bounds { min: 0, max: 4 };
        let mut s = signals(0.0, 2.0, 0, 1);
        s.prefill.tokens_per_busy_s = None;
        let plan = p.plan(&s);
        assert_eq!(plan.prefill.desired, 1, "{}", plan.prefill.reason);
        s.demand = Some(Demand::default());
        assert_eq!(p.plan(&s).prefill.desired, 0, "no requests: stays at zero");
    }

    #[test]
    fn an_unattainable_target_is_reported_and_does_not_drive_to_max() {
        let mut p = Planner::new(PlannerConfig::new(0.001, 0.05, 0.99));
        let plan = p.plan(&signals(0.0, 20.0, 1, 1));
        assert!(!plan.prefill.attainable);
        assert!(
            plan.prefill.recommended < 16,
            "sized by demand: {}",
            plan.prefill.recommended
        );
    }
}
