//! `pdfleet`: the fleet's command-line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod load;

#[derive(Debug, Parser)]
#[command(name = "pdfleet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open-loop Poisson load against a router's /v1/completions; prints latency
    /// percentiles, throughput and goodput
    Load(load::LoadArgs),
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
        Command::Load(args) => load::run_cli(args).await,
    }
}
