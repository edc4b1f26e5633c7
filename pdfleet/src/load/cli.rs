//! `pdfleet load` on the command line.

use std::io::IsTerminal;
use std::path::PathBuf;

use pdfleet_api::rng::SplitMix64;

use super::{run_load, LenDist, LoadConfig};
use crate::trace::{self, Lengths, Shape, TraceRequest};

/// `pdfleet load`: open-loop load against a router's /v1/completions: Poisson arrivals, a
/// generated shape, or a replayed trace.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Base URL of the router, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
    /// Model name sent in each request
    #[arg(long, default_value = "toy")]
    pub model: String,
    /// Mean arrival rate, requests/s (Poisson, open loop; "inf" sends all at once); the base
    /// rate of a --shape
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Number of requests to send (Poisson arrivals)
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Replay a trace: Azure LLM inference CSV or Mooncake JSONL (as in ../shared/traces)
    #[arg(long, conflicts_with = "shape")]
    pub trace: Option<PathBuf>,
    /// Arrivals in a shape around --rate for --duration seconds, lengths from --prompt-len
    /// and --output-len
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
    /// Seconds of a --shape (default 600), or where a --trace is cut
    #[arg(long)]
    pub duration: Option<f64>,
    /// Time compression of a --trace (2: twice its arrival rate)
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Factor on every length of a --trace
    #[arg(long, default_value_t = 1.0)]
    pub length_scale: f64,
    /// Longest sequence the pool serves: a trace's lengths are capped to it
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: u32,
    /// Prompt length in tokens: N or lognormal:MEDIAN,SIGMA,MAX
    #[arg(long, default_value = "64")]
    pub prompt_len: LenDist,
    /// max_tokens per request: N or lognormal:MEDIAN,SIGMA,MAX
    #[arg(long, default_value = "32")]
    pub output_len: LenDist,
    /// Seed for arrivals, lengths and prompt tokens
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Time-to-first-token SLO, ms (goodput)
    #[arg(long, default_value_t = 500.0)]
    pub slo_ttft_ms: f64,
    /// Mean inter-token-latency SLO, ms (goodput)
    #[arg(long, default_value_t = 50.0)]
    pub slo_itl_ms: f64,
    /// Client timeout per request, seconds (whole request including the stream)
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,
    /// Write one CSV row per request here
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// No live progress line (it is also off when stderr is not a terminal)
    #[arg(long)]
    pub no_progress: bool,
    /// Label carried into the summary
    #[arg(long, default_value = "")]
    pub label: String,
}

impl LoadArgs {
    /// The arrivals to replay, when a trace or a shape is asked for.
    fn schedule(&self) -> anyhow::Result<Option<Vec<TraceRequest>>> {
        if let Some(path) = &self.trace {
            let t = trace::read(path, None)?;
            return Ok(Some(trace::rescale(
                &t,
                self.time_scale,
                self.length_scale,
                self.max_seq_len,
                self.duration,
            )));
        }
        let Some(shape) = self.shape else {
            return Ok(None);
        };
        let duration = self.duration.unwrap_or(600.0);
        // Arrivals from the shape; each request's lengths from the distributions asked for.
        let lengths = Lengths {
            prompt_median: 1.0,
            output_median: 1.0,
            sigma: 0.0,
            max_prompt: 1,
            max_output: 1,
        };
        let mut sizes = SplitMix64::new(self.seed ^ 0x5AA9_E500_0000_0003);
        let mut t = trace::generate(shape, self.rate, duration, lengths, self.seed);
        for r in &mut t {
            r.prompt = self.prompt_len.sample(&mut sizes) as u32;
            r.output = self.output_len.sample(&mut sizes) as u32;
        }
        Ok(Some(t))
    }

    pub fn to_config(&self) -> anyhow::Result<LoadConfig> {
        Ok(LoadConfig {
            url: self.url.clone(),
            model: self.model.clone(),
            rate: self.rate,
            num_requests: self.requests,
            prompt_len: self.prompt_len,
            output_len: self.output_len,
            seed: self.seed,
            slo_ttft_ms: self.slo_ttft_ms,
            slo_itl_ms: self.slo_itl_ms,
            timeout_s: self.timeout_s,
            progress: !self.no_progress && std::io::stderr().is_terminal(),
            label: self.label.clone(),
            schedule: self.schedule()?,
        })
    }
}

/// Runs `pdfleet load`: prints the summary table to stdout, writes the CSV if asked,
/// and returns failure when no request succeeded.
pub async fn run_cli(args: LoadArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = args.to_config()?;
    let report = run_load(&cfg).await?;
    print!("{}", report.summary_table());
    if let Some(path) = &args.csv {
        report.write_csv(path)?;
        eprintln!("wrote {} rows to {}", report.records.len(), path.display());
    }
    if report.ok_count() == 0 {
        eprintln!("error: every request failed");
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}
