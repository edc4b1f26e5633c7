//! What the simulated fleet exports and how Prometheus would see it: cumulative counters,
//! gauges and histograms with the real buckets, scraped every interval, read back as rates over a
//! window and as `histogram_quantile` over another, into the planner's [`Signals`].

use pdfleet_api::metrics::latency_buckets;
use pdfleet_planner::signals::{Demand, RoleSignals, Signals, StepSums, TtftParts};

/// A histogram with Prometheus's cumulative buckets.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// Per bucket (and a last one for +Inf), observations at most its bound.
    counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn latency() -> Self {
        let bounds = latency_buckets();
        Histogram {
            counts: vec![0; bounds.len() + 1],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        for c in &mut self.counts[i..] {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// `histogram_quantile(q, later - earlier)`: linear within the bucket, as Prometheus does;
    /// `None` without observations.
    pub fn quantile_between(earlier: &Histogram, later: &Histogram, q: f64) -> Option<f64> {
        let d: Vec<u64> = later
            .counts
            .iter()
            .zip(&earlier.counts)
            .map(|(l, e)| l - e)
            .collect();
        let total = *d.last()?;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let i = d.iter().position(|&c| c as f64 >= rank)?;
        if i == later.bounds.len() {
            // In +Inf: Prometheus answers the highest finite bound.
            return later.bounds.last().copied();
        }
        let (lo, below) = if i == 0 {
            (0.0, 0)
        } else {
            (later.bounds[i - 1], d[i - 1])
        };
        let hi = later.bounds[i];
        let in_bucket = (d[i] - below) as f64;
        Some(lo + (hi - lo) * (rank - below as f64) / in_bucket.max(1.0))
    }
}

/// Everything the fleet exports, at one moment.
#[derive(Clone, Debug)]
pub struct Exported {
    pub t: f64,
    // Router.
    pub arrivals: f64,
    pub prompt_tokens: f64,
    pub requested_tokens: f64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub queue: Histogram,
    pub prefill: Histogram,
    pub transfer: Histogram,
    pub admission: Histogram,
    // Prefill workers (sums over them).
    pub prefill_busy_s: f64,
    pub prefill_tokens_done: f64,
    pub backlog_tokens: f64,
    pub prefill_refusals: f64,
    // Decode workers.
    pub steps: f64,
    pub step_s_sum: f64,
    pub batch_sum: f64,
    pub batch_sq_sum: f64,
    pub batch_step_s_sum: f64,
    pub running: f64,
    pub kv_used_tokens: f64,
    pub decode_refusals: f64,
    // The roles' replicas as the cluster has them.
    pub prefill_replicas: (u32, u32),
    pub decode_replicas: (u32, u32),
}

impl Default for Exported {
    fn default() -> Self {
        Exported {
            t: 0.0,
            arrivals: 0.0,
            prompt_tokens: 0.0,
            requested_tokens: 0.0,
            ttft: Histogram::latency(),
            itl: Histogram::latency(),
            queue: Histogram::latency(),
            prefill: Histogram::latency(),
            transfer: Histogram::latency(),
            admission: Histogram::latency(),
            prefill_busy_s: 0.0,
            prefill_tokens_done: 0.0,
            backlog_tokens: 0.0,
            prefill_refusals: 0.0,
            steps: 0.0,
            step_s_sum: 0.0,
            batch_sum: 0.0,
            batch_sq_sum: 0.0,
            batch_step_s_sum: 0.0,
            running: 0.0,
            kv_used_tokens: 0.0,
            decode_refusals: 0.0,
            prefill_replicas: (0, 0),
            decode_replicas: (0, 0),
        }
    }
}

/// The span over which the planner takes the highest short-term prompt rate.
pub const PEAK_WINDOW_S: f64 = 300.0;
/// The operator's short demand window (`SHORT_RATE_WINDOW` in operator/src/autoscale/signals.rs).
pub const SHORT_RATE_WINDOW_S: f64 = 20.0;

/// Prometheus' view: the scrapes so far.
pub struct Scrapes {
    samples: Vec<Exported>,
    pub rate_window_s: f64,
    pub quantile_window_s: f64,
    pub quantile: f64,
    /// KV tokens a decode replica holds (the workers' `kv_blocks_total`, in tokens).
    pub kv_tokens_per_replica: f64,
}

impl Scrapes {
    pub fn new(
        rate_window_s: f64,
        quantile_window_s: f64,
        quantile: f64,
        kv_tokens_per_replica: f64,
    ) -> Self {
        Scrapes {
            samples: Vec::new(),
            rate_window_s,
            quantile_window_s,
            quantile,
            kv_tokens_per_replica,
        }
    }

    pub fn scrape(&mut self, e: Exported) {
        self.samples.push(e);
    }

    /// The sample at the start of a window ending at the last scrape.
    fn window_start(&self, window: f64) -> Option<&Exported> {
        let last = self.samples.last()?;
        self.samples
            .iter()
            .rev()
            .find(|s| s.t <= last.t - window + 1e-9)
            .or_else(|| self.samples.first())
            .filter(|s| s.t < last.t)
    }

    /// The signals a policy sees now (from the last scrape); `demand` is `None` until two
    /// scrapes make a rate.
    pub fn signals(&self, now: f64, prefill_desired: u32, decode_desired: u32) -> Signals {
        let Some(last) = self.samples.last() else {
            // Nothing scraped yet: the replicas as asked for, and no data.
            let role = |desired| RoleSignals {
                desired,
                ready: desired,
                ..Default::default()
            };
            return Signals {
                now_s: now,
                prefill: role(prefill_desired),
                decode: Some(role(decode_desired)),
                ..Default::default()
            };
        };
        let rate = |f: fn(&Exported) -> f64| {
            self.window_start(self.rate_window_s)
                .map(|first| (f(last) - f(first)) / (last.t - first.t))
        };
        let qstart = self.window_start(self.quantile_window_s);
        let quant = |f: fn(&Exported) -> &Histogram| {
            qstart.and_then(|s| Histogram::quantile_between(f(s), f(last), self.quantile))
        };
        // max_over_time(rate(prompt_tokens[15s])[5m]).
        let short = 15.0;
        let peak = self
            .samples
            .iter()
            .filter(|s| s.t >= last.t - PEAK_WINDOW_S - 1e-9)
            .filter_map(|s| {
                let from = self
                    .samples
                    .iter()
                    .rev()
                    .find(|e| e.t <= s.t - short + 1e-9)?;
                (s.t > from.t).then(|| (s.prompt_tokens - from.prompt_tokens) / (s.t - from.t))
            })
            .reduce(f64::max);
        // As the operator reads demand: the window's rates, or the last 20 s's when
        // significantly higher.
        let recent_rate = |f: fn(&Exported) -> f64| {
            self.window_start(SHORT_RATE_WINDOW_S)
                .map(|first| (f(last) - f(first)) / (last.t - first.t))
        };
        let read = |rate: &dyn Fn(fn(&Exported) -> f64) -> Option<f64>| match (
            rate(|e| e.arrivals),
            rate(|e| e.prompt_tokens),
            rate(|e| e.requested_tokens),
        ) {
            (Some(r), Some(p), Some(g)) => Some(Demand {
                requests_per_s: r,
                prompt_tokens_per_s: p,
                generated_tokens_per_s: g,
                peak_prompt_tokens_per_s: peak,
            }),
            _ => None,
        };
        let demand = read(&rate)
            .map(|long| Demand::from_windows(long, read(&recent_rate), SHORT_RATE_WINDOW_S));
        let busy = rate(|e| e.prefill_busy_s);
        let done = rate(|e| e.prefill_tokens_done);
        let tokens_per_busy_s = match (busy, done) {
            (Some(b), Some(d)) if b > 1e-6 => Some(d / b),
            _ => None,
        };
        let steps = StepSums::from_rates([
            rate(|e| e.steps),
            rate(|e| e.batch_sum),
            rate(|e| e.step_s_sum),
            rate(|e| e.batch_sq_sum),
            rate(|e| e.batch_step_s_sum),
        ]);
        let ttft_parts = match (
            quant(|e| &e.queue),
            quant(|e| &e.prefill),
            quant(|e| &e.transfer),
            quant(|e| &e.admission),
        ) {
            (Some(queue), Some(prefill), Some(transfer), Some(admission)) => Some(TtftParts {
                queue,
                prefill,
                transfer,
                admission,
            }),
            _ => None,
        };
        let transfer_s = self.window_start(self.rate_window_s).and_then(|first| {
            let n = (last.transfer.count - first.transfer.count) as f64;
            (n > 0.0).then(|| (last.transfer.sum - first.transfer.sum) / n)
        });
        Signals {
            now_s: now,
            demand,
            prefill: RoleSignals {
                desired: prefill_desired,
                ready: last.prefill_replicas.1,
                rolling: false,
                busy: busy.map(|b| b / last.prefill_replicas.1.max(1) as f64),
                tokens_per_busy_s,
                backlog_tokens: Some(last.backlog_tokens),
                refusals_per_s: rate(|e| e.prefill_refusals),
                ..Default::default()
            },
            decode: Some(RoleSignals {
                desired: decode_desired,
                ready: last.decode_replicas.1,
                rolling: false,
                running: Some(last.running),
                steps,
                kv_tokens_used: Some(last.kv_used_tokens),
                kv_tokens_per_replica: Some(self.kv_tokens_per_replica),
                refusals_per_s: rate(|e| e.decode_refusals),
                ..Default::default()
            }),
            ttft_s: quant(|e| &e.ttft),
            itl_s: quant(|e| &e.itl),
            ttft_parts,
            transfer_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets_like_prometheus() {
        let before = Histogram::latency();
        let mut after = Histogram::latency();
        for _ in 0..100 {
            after.observe(0.035); // in (0.03, 0.04]
        }
        let q = Histogram::quantile_between(&before, &after, 0.5).unwrap();
        assert!((q - 0.035).abs() < 1e-9, "{q}");
        assert_eq!(Histogram::quantile_between(&after, &after, 0.5), None);
    }
}
