//! `pdfleet experiment`: the same load against the same two cores, colocated (two unified
//! workers) against disaggregated (one prefill, one decode worker), with and without chunked
//! prefill. Writes one CSV per arm and a summary JSON, and prints a table.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use pdfleet_api::metrics::{self, sum_in_text, worker};
use pdfleet_api::{BackendKind, KvTransport, KvTransportPolicy, PoolMode, Role};

use crate::fleet::{worker_from_flags, Fleet, FleetConfig};
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
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[arg(long, default_value = "docs/data/serving-experiment")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// GPUs to spread the workers over (one each when there are as many); 0 leaves them be
    #[arg(long, default_value_t = 0)]
    pub gpus: usize,
    /// KV transports to run the disaggregated arms with, one arm pair each
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    pub kv_transport: Vec<KvTransportPolicy>,
    /// Which deployments to run
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "colocated,disaggregated"
    )]
    pub modes: Vec<PoolMode>,
    /// Which prefill schedules to run: whole, chunked
    #[arg(long, value_delimiter = ',', default_value = "whole,chunked")]
    pub prefill: Vec<PrefillSchedule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrefillSchedule {
    /// A prompt in one step
    Whole,
    /// A prompt in chunks of `--chunk` tokens, interleaved with decodes
    Chunked,
}

/// KV transfer totals over a run, read from the workers' and the router's metrics.
#[derive(Serialize, Default, Debug)]
struct Transfer {
    bytes: f64,
    seconds: f64,
    transfers: f64,
    /// Mean transfer time over mean TTFT.
    share_of_ttft: Option<f64>,
    gb_per_s: Option<f64>,
    /// The transports the bytes actually went by ("device", "grpc").
    transports: Vec<String>,
    /// Device to device: GPU time of the copies themselves (the rest of a transfer is waiting
    /// for engine steps and the RPCs around them).
    device_copy_seconds: f64,
    device_copy_gb_per_s: Option<f64>,
}

async fn transfer_totals(fleet: &Fleet) -> Transfer {
    let client = reqwest::Client::new();
    let mut t = Transfer::default();
    let sent = "direction=\"send\"";
    for w in fleet
        .workers
        .iter()
        .filter(|w| w.name.starts_with(Role::Prefill.as_str()))
    {
        let Some(http) = &w.http else { continue };
        if let Ok(r) = client.get(format!("{http}/metrics")).send().await {
            let text = r.text().await.unwrap_or_default();
            t.bytes += sum_in_text(&text, worker::KV_TRANSFER_BYTES, &[sent]);
            t.seconds += sum_in_text(&text, &metrics::sum(worker::KV_TRANSFER_SECONDS), &[sent]);
            t.transfers +=
                sum_in_text(&text, &metrics::count(worker::KV_TRANSFER_SECONDS), &[sent]);
            t.device_copy_seconds +=
                sum_in_text(&text, &metrics::sum(worker::KV_DEVICE_COPY_SECONDS), &[]);
            for transport in [KvTransport::Device, KvTransport::Grpc] {
                let label = format!("transport=\"{transport}\"");
                let used = sum_in_text(&text, worker::KV_TRANSFER_BYTES, &[sent, &label]) > 0.0;
                if used && !t.transports.iter().any(|x| x == transport.as_str()) {
                    t.transports.push(transport.to_string());
                }
            }
        }
    }
    if t.seconds > 0.0 {
        t.gb_per_s = Some(t.bytes / t.seconds / 1e9);
    }
    if t.device_copy_seconds > 0.0 && t.transports == ["device"] {
        t.device_copy_gb_per_s = Some(t.bytes / t.device_copy_seconds / 1e9);
    }
    t
}

#[derive(Serialize)]
struct Arm {
    name: String,
    mode: String,
    chunked: bool,
    worker_args: Vec<String>,
    csv: String,
    summary: LoadSummary,
    kv_transfer: Transfer,
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
    let model: Vec<&str> = args.model.split_whitespace().collect();
    let base = worker_from_flags(&model)?;
    let chunk = args.chunk;
    let mut arms = Vec::new();
    let name_transports = args.kv_transport != [KvTransportPolicy::Auto];
    let plan = std::iter::once((PoolMode::Colocated, None))
        .chain(
            args.kv_transport
                .iter()
                .map(|&t| (PoolMode::Disaggregated, Some(t))),
        )
        .filter(|(mode, _)| args.modes.contains(mode));
    for (mode, transport) in plan {
        let mode_name = match (mode, transport) {
            (PoolMode::Colocated, _) => "colocated: 2 unified".to_string(),
            (_, Some(t)) if name_transports => {
                format!("disaggregated: 1 prefill + 1 decode, KV {t}")
            }
            _ => "disaggregated: 1 prefill + 1 decode".to_string(),
        };
        let schedules = [PrefillSchedule::Whole, PrefillSchedule::Chunked]
            .into_iter()
            .filter(|s| args.prefill.contains(s));
        for schedule in schedules {
            let is_chunked = schedule == PrefillSchedule::Chunked;
            let name = format!(
                "{mode_name}, {}",
                if is_chunked {
                    format!("chunked prefill {chunk}")
                } else {
                    "whole prefill".into()
                }
            );
            let mut worker = base.clone();
            worker.backend = args.backend;
            (worker.engine.chunk_size, worker.engine.max_batch_tokens) = if is_chunked {
                (chunk, chunk * 4)
            } else {
                (4096, 4096)
            };
            if let Some(t) = transport {
                worker.kv_transport = t;
            }
            let worker_args = worker.to_args();
            let cfg = FleetConfig {
                mode,
                prefill: 1,
                decode: 1,
                unified: 2,
                worker,
                log_dir: Some(args.out.join("logs").join(slug(&name))),
                gpus: args.gpus,
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
            let mut transfer = transfer_totals(&fleet).await;
            fleet.stop();
            if let (Some(ttft), true) = (report.ttft_percentiles(), transfer.transfers > 0.0) {
                transfer.share_of_ttft = Some(transfer.seconds / transfer.transfers / ttft.mean);
            }
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
                kv_transfer: transfer,
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
        "\n{:<68} {:>9} {:>9} {:>8} {:>8} {:>8} {:>14}",
        "arm", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "ITL max", "goodput"
    );
    for a in &arms {
        let s = &a.summary;
        println!(
            "{:<68} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6.2}/s {:>4.0}%",
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
    for a in arms.iter().filter(|a| a.kv_transfer.transfers > 0.0) {
        let t = &a.kv_transfer;
        println!(
            "{}: {} KV transfers ({}), {:.1} MB, {:.3} GB/s, mean {:.2} ms each, {:.1}% of mean TTFT",
            a.name,
            t.transfers,
            t.transports.join("+"),
            t.bytes / 1e6,
            t.gb_per_s.unwrap_or(0.0),
            1e3 * t.seconds / t.transfers,
            100.0 * t.share_of_ttft.unwrap_or(0.0)
        );
        if let Some(gbs) = t.device_copy_gb_per_s {
            println!(
                "    of which the GPU copies: mean {:.3} ms each, {gbs:.1} GB/s",
                1e3 * t.device_copy_seconds / t.transfers
            );
        }
    }
    Ok(())
}
