//! `pdfleet load`: an open-loop load generator for the router's OpenAI-compatible
//! streaming completions endpoint (`POST {url}/v1/completions`, server-sent events).
//!
//! Requests arrive as a Poisson process (exponential inter-arrival times at
//! [`LoadConfig::rate`]); each is spawned at its arrival time whatever happened to the
//! earlier ones, and each has a client timeout, so a run is bounded: it sends exactly
//! [`LoadConfig::num_requests`] requests and ends when all have finished or timed out.
//! Everything random (arrival times, prompt lengths, prompt token ids, output lengths)
//! comes from [`LoadConfig::seed`] through `pdfleet_api::rng::SplitMix64`, so a run's offered load is
//! reproducible. Arrivals and request shapes use separate streams derived from the
//! seed: changing the length distributions does not move the arrival times.
//!
//! Library entry point: [`run_load`] → [`LoadReport`] (records, percentiles,
//! throughput, goodput, [`LoadReport::summary_table`], [`LoadReport::write_csv`]).
//! CLI: [`LoadArgs`] and [`run_cli`].

//!
//! One module per concern: [`config`] (what to send), [`plan`] (when and what, from the seed),
//! [`sse`] (reading the stream), [`client`] (sending and timing), [`report`] (percentiles,
//! goodput, CSV) and [`cli`].

mod cli;
mod client;
mod config;
mod plan;
mod report;
mod sse;

pub use cli::{run_cli, LoadArgs};
pub use client::run_load;
pub use config::LoadConfig;
pub use plan::{plan_requests, LenDist, PlannedRequest};
pub use report::{LoadReport, LoadSummary, Outcome, Percentiles, RequestRecord};
pub use sse::{parse_event, SseParser, StreamEvent};
