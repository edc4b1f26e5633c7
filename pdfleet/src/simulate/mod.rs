//! `pdfleet simulate`: the SLO planner and the policies it replaces, run on the same trace
//! through a simulated fleet ([`fleet`]) whose costs were measured on a real worker
//! (`pdfleet-worker calibrate`). The planner here is the operator's own code
//! (`pdfleet-planner`), fed from simulated Prometheus scrapes as the operator is fed from real
//! ones.

pub mod fleet;
pub mod metrics;
pub mod oracle;
pub mod plot;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use pdfleet_api::profile::ServingProfile;
use pdfleet_planner::planner::Bounds;
use pdfleet_planner::policy::{Current, Hpa, Load, Policy};
use pdfleet_planner::{Planner, PlannerConfig};
use serde::Serialize;

use crate::trace::{self, Lengths, Shape, TraceRequest};
use fleet::{Run, SimConfig};

/// Serving costs measured with `pdfleet-worker calibrate` (see docs/autoscaling.md for the
/// command and machine of each).
const CPU_PROFILE: &str = include_str!("../../profiles/cpu.json");

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// A trace: Azure LLM inference CSV or Mooncake JSONL (as in ../shared/traces)
    #[arg(long, conflicts_with = "shape")]
    pub trace: Option<PathBuf>,
    /// A generated load instead of a trace
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
    /// Base arrival rate of a generated shape, requests/s
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    /// Seconds of load (a trace is cut there)
    #[arg(long)]
    pub duration: Option<f64>,
    /// Policy: planner, current, hpa, load, oracle, or all (each on the same trace)
    #[arg(long, default_value = "all")]
    pub policy: String,
    /// Time compression of the trace (2: twice the arrival rate)
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Factor on every prompt and output length
    #[arg(long, default_value_t = 1.0)]
    pub length_scale: f64,
    /// Serving costs: "cpu" (measured here), or a JSON file from `pdfleet-worker calibrate`
    #[arg(long, default_value = "cpu")]
    pub profile: String,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: u32,
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_ms: f64,
    #[arg(long, default_value_t = 50.0)]
    pub itl_ms: f64,
    #[arg(long, default_value_t = 0.99)]
    pub quantile: f64,
    /// From a replica asked for to its being ready, seconds
    #[arg(long, default_value_t = 30.0)]
    pub start_delay_s: f64,
    /// Prometheus' scrape interval (the chart's monitors and the local cluster use 5 s)
    #[arg(long, default_value_t = 5.0)]
    pub scrape_s: f64,
    /// The planner's scale-down window (the HPA's is 300 s)
    #[arg(long, default_value_t = 300.0)]
    pub scale_down_window_s: f64,
    /// Within about how long the planner clears a prompt backlog (the pool's
    /// autoscaling.backlogClearSeconds)
    #[arg(long, default_value_t = 15.0)]
    pub backlog_clear_s: f64,
    #[arg(long, default_value_t = 16)]
    pub max_replicas: u32,
    #[arg(long, default_value_t = 1)]
    pub min_replicas: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the results as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the timelines (load, TTFT, ITL, replicas per role) here (PNG)
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// One policy's run, judged.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub requests: usize,
    /// Share of requests within both SLOs (refused ones are not).
    pub slo_attainment: f64,
    pub refused: usize,
    /// Served requests over their TTFT target, and over their ITL target.
    pub ttft_misses: usize,
    pub itl_misses: usize,
    pub replica_seconds: BTreeMap<String, f64>,
    pub scale_events: usize,
    /// Changes of direction within 300 s of the role's previous change, outside the 600 s
    /// after a sharp change of load (a steady phase's flapping, not a step's overshoot).
    pub reversals: usize,
    /// After each sharp change of load: seconds until 30 s of requests all meet the SLO again.
    pub recovery_s: Vec<f64>,
    /// After each sharp rise: seconds until the first replica was asked for.
    pub decision_s: Vec<f64>,
    /// (time, prefill replicas, decode replicas) at every change of either.
    pub changes: Vec<(f64, u32, u32)>,
}

pub fn load_profile(name: &str) -> anyhow::Result<ServingProfile> {
    let text = match name {
        "cpu" => CPU_PROFILE.to_string(),
        path => {
            std::fs::read_to_string(path).with_context(|| format!("reading the profile {path}"))?
        }
    };
    serde_json::from_str(&text).context("a profile from `pdfleet-worker calibrate`")
}

fn judge(run: &Run, cfg: &SimConfig, steps: &[f64]) -> Report {
    let ok = |o: &fleet::Outcome| {
        !o.refused
            && o.ttft_s.is_some_and(|t| t <= cfg.ttft_s)
            && o.mean_itl_s.is_none_or(|i| i <= cfg.itl_s)
            && o.done
    };
    let n = run.outcomes.len();
    let good = run.outcomes.iter().filter(|o| ok(o)).count();
    let mut reversals = 0;
    for role in 0..2 {
        let series: Vec<(f64, u32)> = run
            .changes
            .iter()
            .map(|&(t, p, d)| (t, if role == 0 { p } else { d }))
            .collect();
        let mut last: Option<(f64, i8)> = None;
        for w in series.windows(2) {
            let dir = (w[1].1 as i64 - w[0].1 as i64).signum() as i8;
            if dir == 0 {
                continue;
            }
            let transient = steps.iter().any(|&s| w[1].0 >= s && w[1].0 < s + 600.0);
            if let Some((t, d)) = last {
                if d != dir && w[1].0 - t < 300.0 && !transient {
                    reversals += 1;
                }
            }
            last = Some((w[1].0, dir));
        }
    }
    let recovery_s = steps
        .iter()
        .map(|&s| {
            let mut t = s;
            let end = run.outcomes.iter().map(|o| o.arrival_s).fold(s, f64::max);
            while t < end {
                let window: Vec<&fleet::Outcome> = run
                    .outcomes
                    .iter()
                    .filter(|o| o.arrival_s >= t && o.arrival_s < t + 30.0)
                    .collect();
                if !window.is_empty() && window.iter().all(|o| ok(o)) {
                    return t - s;
                }
                t += 5.0;
            }
            end - s
        })
        .collect();
    let decision_s = steps
        .iter()
        .filter_map(|&s| {
            let before = run.changes.iter().rev().find(|c| c.0 <= s).copied()?;
            run.changes
                .iter()
                .find(|c| c.0 > s && (c.1 > before.1 || c.2 > before.2))
                .map(|c| c.0 - s)
        })
        .collect();
    Report {
        requests: n,
        slo_attainment: if n > 0 { good as f64 / n as f64 } else { 1.0 },
        refused: run.outcomes.iter().filter(|o| o.refused).count(),
        ttft_misses: run
            .outcomes
            .iter()
            .filter(|o| o.ttft_s.is_some_and(|t| t > cfg.ttft_s))
            .count(),
        itl_misses: run
            .outcomes
            .iter()
            .filter(|o| o.mean_itl_s.is_some_and(|i| i > cfg.itl_s))
            .count(),
        replica_seconds: BTreeMap::from([
            ("prefill".to_string(), run.replica_seconds.0),
            ("decode".to_string(), run.replica_seconds.1),
            (
                "total".to_string(),
                run.replica_seconds.0 + run.replica_seconds.1,
            ),
        ]),
        scale_events: run.changes.len().saturating_sub(1),
        reversals,
        recovery_s,
        decision_s,
        changes: run.changes.clone(),
    }
}

/// The trace a run replays, and where its load changes sharply.
fn workload(args: &SimulateArgs) -> anyhow::Result<(String, Vec<TraceRequest>, Vec<f64>)> {
    match (&args.trace, args.shape) {
        (Some(path), _) => {
            let t = trace::read(path, None)?;
            let t = trace::rescale(
                &t,
                args.time_scale,
                args.length_scale,
                args.max_seq_len,
                args.duration,
            );
            Ok((path.display().to_string(), t, Vec::new()))
        }
        (None, Some(shape)) => {
            let duration = args.duration.unwrap_or(3600.0);
            let lengths = Lengths {
                prompt_median: 512.0 * args.length_scale,
                output_median: 128.0 * args.length_scale,
                sigma: 0.6,
                max_prompt: args.max_seq_len / 2,
                max_output: args.max_seq_len / 4,
            };
            let t = generate_scaled(shape, args, duration, lengths);
            Ok((
                format!("{shape:?}").to_lowercase(),
                t,
                shape.steps(duration),
            ))
        }
        (None, None) => bail!("give --trace FILE or --shape step|ramp|diurnal|burst"),
    }
}

fn generate_scaled(
    shape: Shape,
    args: &SimulateArgs,
    duration: f64,
    lengths: Lengths,
) -> Vec<TraceRequest> {
    trace::generate(
        shape,
        args.rate * args.time_scale,
        duration,
        lengths,
        args.seed,
    )
}

fn policy(name: &str, cfg: &PlannerConfig) -> anyhow::Result<Box<dyn Policy>> {
    Ok(match name {
        "planner" => Box::new(Planner::new(cfg.clone())),
        "current" => Box::new(Current::new(cfg.clone())),
        "hpa" => Box::new(Hpa::new(cfg.clone())),
        "load" => Box::new(Load::new(cfg.clone())),
        other => bail!("unknown policy {other:?}: planner, current, hpa, load, oracle or all"),
    })
}

pub const POLICIES: [&str; 5] = ["planner", "current", "hpa", "load", "oracle"];

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let profile = load_profile(&args.profile)?;
    let (name, trace, steps) = workload(&args)?;
    if trace.is_empty() {
        bail!("the workload has no request");
    }
    let last = trace.last().map(|r| r.at_s).unwrap_or(0.0);
    let bounds = Bounds {
        min: args.min_replicas,
        max: args.max_replicas,
    };
    let cfg = SimConfig {
        profile,
        ttft_s: args.ttft_ms / 1e3,
        itl_s: args.itl_ms / 1e3,
        quantile: args.quantile,
        start_delay_s: args.start_delay_s,
        scrape_s: args.scrape_s,
        rate_window_s: 60.0,
        quantile_window_s: 120.0,
        max_waiting: 1024,
        transfer_latency_s: 0.002,
        transfer_bytes_per_s: 1e9,
        initial: (bounds.min, bounds.min),
        end_s: last + 300.0,
        paid_until_s: last,
    };
    let cfg = SimConfig {
        initial: oracle::Oracle::new(&cfg, &trace, (bounds, bounds), 15.0).initial(),
        ..cfg
    };
    let pcfg = PlannerConfig {
        prefill: bounds,
        decode: Some(bounds),
        scale_down_window_s: args.scale_down_window_s,
        backlog_clear_s: args.backlog_clear_s,
        ..PlannerConfig::new(cfg.ttft_s, cfg.itl_s, cfg.quantile)
    };
    let names: Vec<&str> = if args.policy == "all" {
        POLICIES.to_vec()
    } else {
        vec![args.policy.as_str()]
    };
    eprintln!(
        "{name}: {} requests over {:.0} s ({:.2}/s), profile {}",
        trace.len(),
        last,
        trace.len() as f64 / last.max(1.0),
        cfg.profile.measured_on
    );
    let mut runs: Vec<(&str, Run, Report)> = Vec::new();
    for &p in &names {
        let run = if p == "oracle" {
            // Replays until at most 0.5% of requests miss, or nothing more helps.
            let mut o = oracle::Oracle::new(&cfg, &trace, (bounds, bounds), 15.0);
            let mut run = fleet::simulate(&cfg, &trace, &mut o.clone());
            for _ in 0..16 {
                if judge(&run, &cfg, &steps).slo_attainment >= 0.995 || !o.refine(&run, &cfg) {
                    break;
                }
                run = fleet::simulate(&cfg, &trace, &mut o.clone());
            }
            run
        } else {
            fleet::simulate(&cfg, &trace, policy(p, &pcfg)?.as_mut())
        };
        let report = judge(&run, &cfg, &steps);
        eprintln!("  {p}: done");
        runs.push((p, run, report));
    }
    print_table(&runs);
    let oracle = runs.iter().find(|r| r.0 == "oracle").map(|r| r.2.clone());
    let mut policies = serde_json::Map::new();
    for (p, _, report) in &runs {
        let mut v = serde_json::to_value(report)?;
        if let (Some(o), true) = (&oracle, *p != "oracle") {
            v["attainment_vs_oracle_points"] =
                serde_json::json!(100.0 * (report.slo_attainment - o.slo_attainment));
            v["replica_seconds_vs_oracle"] =
                serde_json::json!(report.replica_seconds["total"] / o.replica_seconds["total"]);
        }
        policies.insert(p.to_string(), v);
    }
    let out = if names.len() == 1 {
        policies.remove(names[0]).expect("the one run")
    } else {
        serde_json::json!({"workload": name, "requests": trace.len(), "policies": policies})
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        let series: Vec<(&str, &Run)> = runs.iter().map(|r| (r.0, &r.1)).collect();
        plot::timeline(path, &name, &series, &cfg)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print_table(runs: &[(&str, Run, Report)]) {
    let oracle = runs
        .iter()
        .find(|r| r.0 == "oracle")
        .map(|r| (r.2.slo_attainment, r.2.replica_seconds["total"]));
    println!(
        "{:<9} {:>10} {:>8} {:>11} {:>11} {:>9} {:>7} {:>9} {:>10} {:>9}",
        "policy",
        "attainment",
        "vs orac",
        "prefill r-s",
        "decode r-s",
        "vs orac",
        "events",
        "reversals",
        "recovery s",
        "refused"
    );
    for (p, _, r) in runs {
        let (va, vr) = match oracle {
            Some((a, rs)) => (
                format!("{:+.1}", 100.0 * (r.slo_attainment - a)),
                format!("{:.2}x", r.replica_seconds["total"] / rs),
            ),
            None => ("-".into(), "-".into()),
        };
        let recovery = if r.recovery_s.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{:.0}",
                r.recovery_s.iter().sum::<f64>() / r.recovery_s.len() as f64
            )
        };
        println!(
            "{:<9} {:>9.1}% {:>8} {:>11.0} {:>11.0} {:>9} {:>7} {:>9} {:>10} {:>9}",
            p,
            100.0 * r.slo_attainment,
            va,
            r.replica_seconds["prefill"],
            r.replica_seconds["decode"],
            vr,
            r.scale_events,
            r.reversals,
            recovery,
            r.refused
        );
    }
}
