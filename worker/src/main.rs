use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pdfleet_api::worker_args::{ModelArgs, WorkerArgs};
use pdfleet_worker::backend::{self, BackendKind};
use pdfleet_worker::bench::{Bench, BenchConfig};
use pdfleet_worker::config::{KvDtype, ModelConfig};
use pdfleet_worker::{serve, vectors, weights};

#[derive(Parser)]
#[command(
    name = "pdfleet-worker",
    version,
    about = "pdfleet worker: prefill, decode and unified LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves as a prefill, decode or unified worker (gRPC plus HTTP metrics and health).
    Serve(Box<WorkerArgs>),
    /// Generates from one prompt and prints the token ids (the reference e2e tests compare with).
    Generate {
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',')]
        prompt: Vec<u32>,
        #[arg(long, default_value_t = 16)]
        max_tokens: usize,
        #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
        backend: BackendKind,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Checks the engine against a golden-vector folder (cases.json + weights.safetensors).
    CheckVectors {
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
        backend: BackendKind,
        /// Largest allowed logit difference; also the margin under which a step is a near-tie.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
    },
    /// Measures the engine's serving costs through the scheduler (prefill tokens/s; a decode
    /// step's time by batch and KV) and prints them as the JSON `pdfleet simulate --profile`
    /// reads.
    Calibrate {
        #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
        backend: BackendKind,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 4096)]
        num_blocks: usize,
        #[arg(long, default_value_t = 512)]
        chunk_size: usize,
        #[arg(long, default_value_t = 2048)]
        max_batch_tokens: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,96")]
        batches: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        contexts: Vec<usize>,
    },
    /// Reproduces the primer's measurements (no cache vs KV cache, prefill, decode) and a sweep.
    Bench {
        #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
        backend: BackendKind,
        /// Divide the primer's batch sizes by this (default: 1 on CUDA, 20 on CPU).
        #[arg(long)]
        scale: Option<usize>,
        #[arg(long, default_value_t = 16)]
        block_size: usize,
        #[arg(long, default_value = "f32")]
        kv_dtype: KvDtype,
        #[arg(long, default_value_t = 1)]
        n_heads: usize,
        #[arg(long, default_value_t = 1)]
        n_kv_heads: usize,
        #[arg(long, default_value_t = 1)]
        n_layers: usize,
        #[arg(long, default_value_t = 32)]
        dim: usize,
        /// Peak memory bandwidth in GB/s for the decode floor (H200: 4800).
        #[arg(long, default_value_t = 4800.0)]
        bandwidth_gbs: f64,
        /// Also sweep batch size and context length.
        #[arg(long)]
        sweep: bool,
        /// PyTorch figures from `seed_reference.py --out FILE`, measured in the same run.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve::serve(*args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            prompt,
            max_tokens,
            backend,
            model,
        } => {
            let weights = weights::load(&model)?;
            let blocks = (prompt.len() + max_tokens).div_ceil(16) + 1;
            let b = backend::open(backend, &weights, 16, blocks)?;
            let mut engine = pdfleet_worker::engine::Engine::new(b, Default::default())?;
            let params = pdfleet_worker::engine::SamplingParams {
                max_tokens,
                ..Default::default()
            };
            let out = pdfleet_worker::engine::generate_all(&mut engine, vec![(prompt, params)])?;
            println!(
                "{}",
                out[0]
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Calibrate {
            backend,
            model,
            num_blocks,
            chunk_size,
            max_batch_tokens,
            batches,
            contexts,
        } => {
            let profile = pdfleet_worker::calibrate::calibrate(
                &pdfleet_worker::calibrate::CalibrateConfig {
                    backend,
                    model: ModelConfig::from(&model),
                    weights_seed: model.weights_seed.unwrap_or(1),
                    block_size: 16,
                    num_blocks,
                    chunk_size,
                    max_batch_tokens,
                    batches,
                    contexts,
                },
            )?;
            println!("{}", serde_json::to_string_pretty(&profile)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckVectors {
            dir,
            backend,
            tolerance,
        } => {
            let results = vectors::check_dir(&dir, backend, tolerance)?;
            let passed = results.iter().filter(|r| r.passed).count();
            for (i, r) in results.iter().enumerate() {
                println!(
                    "case {i:>2}: {} ({})",
                    if r.passed { "ok" } else { "FAILED" },
                    r.detail
                );
            }
            println!("{passed} passed, {} failed", results.len() - passed);
            Ok(if passed == results.len() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench {
            backend,
            scale,
            block_size,
            kv_dtype,
            n_heads,
            n_kv_heads,
            n_layers,
            dim,
            bandwidth_gbs,
            sweep,
            baseline,
            json,
        } => {
            let backend = match backend {
                BackendKind::Auto if backend::cuda::device_available() => BackendKind::Cuda,
                BackendKind::Auto => BackendKind::Cpu,
                chosen => chosen,
            };
            let scale = scale.unwrap_or(if backend == BackendKind::Cuda { 1 } else { 20 });
            let model = ModelConfig {
                dim,
                n_heads,
                n_kv_heads,
                n_layers,
                kv_dtype,
                ..Default::default()
            };
            let mut bench = Bench::new(BenchConfig {
                backend,
                model,
                block_size,
                scale,
                bandwidth_gbs,
                sweep,
                seed: 0,
            })?;
            bench.run_primer()?;
            if sweep {
                bench.run_sweep()?;
            }
            if let Some(path) = baseline {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                bench.compare(&v);
            }
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&bench.rows)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
