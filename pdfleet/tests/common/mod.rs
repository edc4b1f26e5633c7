//! Helpers of the real-process tests: fleets on loopback, requests, the engine's own
//! reference tokens, and the workers' metrics.
#![allow(dead_code)]

use std::time::Duration;

use pdfleet::fleet::{router_from_flags, worker_from_flags, Fleet, FleetConfig};
use pdfleet::load::{parse_event, SseParser, StreamEvent};
use pdfleet_api::metrics::{sum_in_text, worker};
use pdfleet_api::{BackendKind, PoolMode as Mode};
use pdfleet_worker::backend;
use pdfleet_worker::config::ModelConfig;
use pdfleet_worker::engine::{generate_all, Engine, SamplingParams, SchedulerConfig};
use pdfleet_worker::weights::Weights;
use serde_json::Value;

pub fn prompts() -> Vec<Vec<u32>> {
    (0..6u64)
        .map(|i| {
            (0..(3 + i * 41))
                .map(|j| ((i * 31 + j * 7) % 100) as u32)
                .collect()
        })
        .collect()
}

/// A model large enough that decoding on the CPU lasts long enough to interrupt.
pub const BIG: [&str; 8] = [
    "--weights-seed",
    "3",
    "--dim",
    "256",
    "--n-heads",
    "4",
    "--n-layers",
    "6",
];

pub fn big_weights() -> Weights {
    let c = ModelConfig {
        dim: 256,
        n_heads: 4,
        n_layers: 6,
        ..Default::default()
    };
    Weights::from_seed(&c, 3).unwrap()
}

/// What the engine itself generates for these prompts, greedy, with the default weights.
pub fn expected(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    expected_with(&Weights::embedded_primer(), prompts, max_tokens)
}

pub fn expected_with(w: &Weights, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let b = backend::open(BackendKind::Cpu, w, 16, 512).unwrap();
    let mut e = Engine::new(b, SchedulerConfig::default()).unwrap();
    let reqs = prompts
        .iter()
        .map(|p| {
            (
                p.clone(),
                SamplingParams {
                    max_tokens,
                    ..Default::default()
                },
            )
        })
        .collect();
    generate_all(&mut e, reqs).unwrap()
}

/// A CPU fleet configured by worker and router flags.
pub fn config(mode: Mode, worker_args: &[&str], router_args: &[&str]) -> FleetConfig {
    let mut worker = worker_from_flags(worker_args).unwrap();
    worker.backend = BackendKind::Cpu;
    FleetConfig {
        mode,
        worker,
        router: router_from_flags(router_args).unwrap(),
        ..FleetConfig::default()
    }
}

pub async fn start(mode: Mode, worker_args: &[&str], router_args: &[&str]) -> Fleet {
    let mut fleet = Fleet::start(&config(mode, worker_args, router_args)).unwrap();
    fleet.wait_ready(Duration::from_secs(60)).await.unwrap();
    fleet
}

pub async fn complete(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Streams a completion: returns the tokens and how the stream ended.
pub async fn stream(url: &str, body: Value) -> (Vec<u32>, StreamEnd) {
    stream_notify(url, body, None).await
}

/// Like [`stream`], and tells `first` when the first token has arrived.
pub async fn stream_notify(
    url: &str,
    body: Value,
    mut first: Option<tokio::sync::oneshot::Sender<()>>,
) -> (Vec<u32>, StreamEnd) {
    let mut r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (mut parser, mut events, mut tokens) = (SseParser::new(), Vec::new(), Vec::new());
    let mut end = StreamEnd::Closed;
    while let Ok(Some(chunk)) = r.chunk().await {
        parser.push(&chunk, &mut events);
        for data in events.drain(..) {
            match parse_event(&data) {
                StreamEvent::Tokens {
                    finish_reason,
                    token_ids,
                    ..
                } => {
                    tokens.extend(token_ids);
                    if !tokens.is_empty() {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                    if let Some(f) = finish_reason {
                        end = StreamEnd::Finished(f);
                    }
                }
                StreamEvent::Done => return (tokens, end),
                StreamEvent::Error(m) => return (tokens, StreamEnd::Error(m)),
            }
        }
    }
    (tokens, end)
}

#[derive(Debug, PartialEq)]
pub enum StreamEnd {
    Finished(String),
    Error(String),
    Closed,
}

pub fn tokens_of(v: &Value) -> Vec<u32> {
    v["choices"][0]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// What a worker holds, from its `/metrics`: KV blocks in use, handoffs (held, reserved,
/// committed, quarantined), running and queued sequences.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Holding {
    pub blocks_used: f64,
    pub handoffs: f64,
    pub running: f64,
    pub waiting: f64,
}

impl Holding {
    pub fn nothing(&self) -> bool {
        *self == Holding::default()
    }
}

pub async fn holding(http: &str) -> Holding {
    let text = reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    Holding {
        blocks_used: sum_in_text(&text, worker::KV_BLOCKS_USED, &[]),
        handoffs: sum_in_text(&text, worker::KV_HANDOFFS, &[]),
        running: sum_in_text(&text, worker::RUNNING, &[]),
        waiting: sum_in_text(&text, worker::QUEUE_DEPTH, &[]),
    }
}

/// Waits until no worker holds anything; returns how long that took, or what each still held
/// when `within` ran out.
pub async fn until_nothing_held(
    fleet: &Fleet,
    within: Duration,
) -> Result<Duration, Vec<(String, Holding)>> {
    let start = std::time::Instant::now();
    loop {
        let mut held = Vec::new();
        for w in &fleet.workers {
            let h = holding(w.http.as_deref().unwrap()).await;
            if !h.nothing() {
                held.push((w.name.clone(), h));
            }
        }
        if held.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            return Err(held);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
