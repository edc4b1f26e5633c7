//! `pdfleet load` on the command line.

use std::io::IsTerminal;
use std::path::PathBuf;

use super::{run_load, LenDist, LoadConfig};

/// `pdfleet load`: open-loop Poisson load against a router's /v1/completions.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Base URL of the router, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
    /// Model name sent in each request
    #[arg(long, default_value = "toy")]
    pub model: String,
    /// Mean arrival rate, requests/s (Poisson, open loop; "inf" sends all at once)
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Number of requests to send
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
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
    pub fn to_config(&self) -> LoadConfig {
        LoadConfig {
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
        }
    }
}

/// Runs `pdfleet load`: prints the summary table to stdout, writes the CSV if asked,
/// and returns failure when no request succeeded.
pub async fn run_cli(args: LoadArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = args.to_config();
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
