//! `pdfleet`: the fleet's command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pdfleet::fleet::{worker_from_flags, Fleet, FleetConfig, PoolMode};
use pdfleet::load::{self, LenDist, LoadConfig};
use pdfleet_api::BackendKind;

#[derive(Debug, Parser)]
#[command(name = "pdfleet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct LocalArgs {
    /// disaggregated (prefill + decode workers) or colocated (unified workers)
    #[arg(long, value_enum, default_value_t = PoolMode::Disaggregated)]
    mode: PoolMode,
    #[arg(long, default_value_t = 1)]
    prefill: usize,
    #[arg(long, default_value_t = 1)]
    decode: usize,
    #[arg(long, default_value_t = 2)]
    unified: usize,
    /// The router's port
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Where workers run the model (auto: CUDA when a GPU is present)
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    backend: BackendKind,
    /// safetensors weights (default: the primer's seed-7 model, embedded)
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Send a short mixed load, print TTFT/ITL, then stop everything
    #[arg(long)]
    demo: bool,
    /// Worker and router logs go to this folder
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Extra flags for every worker, e.g. --worker-arg=--chunk-size --worker-arg=64
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    worker_args: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A router with prefill and decode (or unified) workers as processes on loopback
    Local(LocalArgs),
    /// Open-loop Poisson load against a router's /v1/completions; prints latency
    /// percentiles, throughput and goodput
    Load(load::LoadArgs),
    /// Colocated against disaggregated serving, with and without chunked prefill, under the
    /// same load on the same cores; writes CSVs and a summary to --out
    Experiment(pdfleet::experiment::ExperimentArgs),
    /// The SLO planner against the policies it replaces and a hindsight oracle, on a trace or a
    /// generated load, through a simulated fleet with measured costs; prints the table, writes
    /// JSON and a timeline plot
    Simulate(pdfleet::simulate::SimulateArgs),
}

async fn local(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let mut worker = worker_from_flags(&args.worker_args)?;
    worker.backend = args.backend;
    if args.weights.is_some() {
        worker.model.weights = args.weights;
    }
    let cfg = FleetConfig {
        mode: args.mode,
        prefill: args.prefill,
        decode: args.decode,
        unified: args.unified,
        port: args.port,
        worker,
        log_dir: args.log_dir,
        ..FleetConfig::default()
    };
    let mut fleet = Fleet::start(&cfg)?;
    eprintln!(
        "starting {} workers ({:?}) and a router on {} ...",
        fleet.workers.len(),
        cfg.mode,
        fleet.url
    );
    fleet.wait_ready(Duration::from_secs(60)).await?;
    for w in &fleet.workers {
        eprintln!(
            "  {:<10} grpc {}  metrics {}/metrics",
            w.name,
            w.addr,
            w.http.as_deref().unwrap_or("")
        );
    }
    eprintln!(
        "  router     {}/v1/completions  metrics {}/metrics",
        fleet.url, fleet.url
    );
    if !args.demo {
        eprintln!("serving; Ctrl-C (or SIGTERM) stops the fleet (workers drain first)");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        fleet.stop();
        return Ok(ExitCode::SUCCESS);
    }
    // A short mixed load: mostly short prompts, some long ones that stress prefill.
    let cfg = LoadConfig {
        url: fleet.url.clone(),
        rate: 20.0,
        num_requests: 60,
        prompt_len: LenDist::LogNormal {
            median: 48.0,
            sigma: 1.0,
            max: 800,
        },
        output_len: LenDist::LogNormal {
            median: 24.0,
            sigma: 0.5,
            max: 64,
        },
        seed: 7,
        label: format!("demo, {:?}", cfg.mode),
        progress: true,
        ..LoadConfig::default()
    };
    eprintln!(
        "sending {} requests at {} req/s ...",
        cfg.num_requests, cfg.rate
    );
    let report = load::run_load(&cfg).await?;
    println!("{}", report.summary_table());
    fleet.stop();
    Ok(if report.ok_count() == cfg.num_requests {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Local(args) => local(args).await,
        Command::Load(args) => load::run_cli(args).await,
        Command::Simulate(args) => {
            pdfleet::simulate::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Experiment(args) => {
            pdfleet::experiment::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
