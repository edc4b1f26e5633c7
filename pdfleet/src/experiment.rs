//! `pdfleet experiment`: the same load against the same two cores, colocated (two unified
//! workers) against disaggregated (one prefill, one decode worker), with and without chunked
//! prefill. Writes one CSV per arm and a summary JSON, and prints a table.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::fleet::{Fleet, FleetConfig, Mode};
use crate::load::{self, LenDist, LoadConfig, LoadSummary};

#[derive(Debug, Clone, clap::Args)]
pub struct ExperimentArgs {
    #[arg(long, default_value_t = 160)]
    pub requests: usize,
    /// Mean arrival rate, requests/s
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Mixed short and long prompts: N or lognormal:MEDIAN,SIGMA,MAX
    #[arg(long, default_value = "lognormal:96,1.3,1800")]
    pub prompt_len: LenDist,
    #[arg(long, default_value = "48")]
    pub output_len: LenDist,
    #[arg(long, default_value_t = 3000.0)]
    pub slo_ttft_ms: f64,
    /// The ITL SLO goodput is judged by (a request's mean inter-token latency)
    #[arg(long, default_value_t = 25.0)]
    pub slo_itl_ms: f64,
    /// Prompt tokens per step when prefill is chunked
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Model flags for every worker: a model heavier than the toy default, so that prefill
    /// costs what it does in real models relative to decode
    #[arg(
        long,
        default_value = "--dim 128 --n-heads 4 --n-layers 4 --weights-seed 1",
        allow_hyphen_values = true
    )]
    pub model: String,
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    #[arg(long, default_value = "docs/data/serving-experiment")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
}

#[derive(Serialize)]
struct Arm {
    name: String,
    mode: String,
    chunked: bool,
    worker_args: Vec<String>,
    csv: String,
    summary: LoadSummary,
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .replace("--", "-")
}

fn ms(p: &Option<load::Percentiles>, f: impl Fn(&load::Percentiles) -> f64) -> String {
    p.as_ref()
        .map(|p| format!("{:.1}", f(p)))
        .unwrap_or_else(|| "-".into())
}

pub async fn run(args: ExperimentArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let model: Vec<String> = args.model.split_whitespace().map(String::from).collect();
    let big = ["--chunk-size", "4096", "--max-batch-tokens", "4096"]
        .map(String::from)
        .to_vec();
    let chunk = args.chunk.to_string();
    let chunked = vec![
        "--chunk-size".to_string(),
        chunk.clone(),
        "--max-batch-tokens".into(),
        (args.chunk * 4).to_string(),
    ];
    let mut arms = Vec::new();
    for (mode, mode_name) in [
        (Mode::Colocated, "colocated: 2 unified"),
        (Mode::Disaggregated, "disaggregated: 1 prefill + 1 decode"),
    ] {
        for (is_chunked, knobs) in [(false, &big), (true, &chunked)] {
            let name = format!(
                "{mode_name}, {}",
                if is_chunked {
                    format!("chunked prefill {chunk}")
                } else {
                    "whole prefill".into()
                }
            );
            let worker_args: Vec<String> = model.iter().chain(knobs.iter()).cloned().collect();
            let cfg = FleetConfig {
                mode,
                prefill: 1,
                decode: 1,
                unified: 2,
                backend: args.backend.clone(),
                worker_args: worker_args.clone(),
                log_dir: Some(args.out.join("logs").join(slug(&name))),
                ..FleetConfig::default()
            };
            eprintln!("== {name}");
            let mut fleet = Fleet::start(&cfg)?;
            fleet.wait_ready(Duration::from_secs(120)).await?;
            let load = LoadConfig {
                url: fleet.url.clone(),
                rate: args.rate,
                num_requests: args.requests,
                prompt_len: args.prompt_len,
                output_len: args.output_len,
                seed: args.seed,
                slo_ttft_ms: args.slo_ttft_ms,
                slo_itl_ms: args.slo_itl_ms,
                timeout_s: 300.0,
                progress: true,
                label: name.clone(),
                ..LoadConfig::default()
            };
            let report = load::run_load(&load).await?;
            fleet.stop();
            eprintln!("{}", report.summary_table());
            let csv = args.out.join(format!("{}.csv", slug(&name)));
            report.write_csv(&csv)?;
            arms.push(Arm {
                name,
                mode: format!("{mode:?}"),
                chunked: is_chunked,
                worker_args,
                csv: csv.display().to_string(),
                summary: report.summary(),
            });
        }
    }
    let summary = serde_json::json!({
        "machine": format!("{} CPUs", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
        "requests": args.requests, "rate": args.rate, "prompt_len": args.prompt_len.to_string(),
        "output_len": args.output_len.to_string(), "slo_ttft_ms": args.slo_ttft_ms, "slo_itl_ms": args.slo_itl_ms,
        "arms": arms,
    });
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!(
        "\n{:<52} {:>9} {:>9} {:>8} {:>8} {:>8} {:>14}",
        "arm", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "ITL max", "goodput"
    );
    for a in &arms {
        let s = &a.summary;
        println!(
            "{:<52} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6.2}/s {:>4.0}%",
            a.name,
            ms(&s.ttft_ms, |p| p.p50),
            ms(&s.ttft_ms, |p| p.p99),
            ms(&s.itl_ms, |p| p.p50),
            ms(&s.itl_ms, |p| p.p99),
            ms(&s.itl_ms, |p| p.max),
            s.goodput,
            100.0 * s.goodput_fraction
        );
    }
    println!(
        "(milliseconds; goodput: requests with TTFT <= {} ms and mean ITL <= {} ms)",
        args.slo_ttft_ms, args.slo_itl_ms
    );
    Ok(())
}
