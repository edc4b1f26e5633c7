//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use pdfleet_api::rng::mix64;
use pdfleet_worker::backend::{self, BackendKind};
use pdfleet_worker::config::ModelConfig;
use pdfleet_worker::engine::{Engine, SamplingParams, SchedulerConfig};
use pdfleet_worker::weights::Weights;

/// A deterministic stream of token ids below `vocab`.
pub fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (mix64(seed * 7919 + i) % vocab as u64) as u32)
        .collect()
}

pub fn engine(
    kind: BackendKind,
    config: &ModelConfig,
    blocks: usize,
    block_size: usize,
    sched: SchedulerConfig,
) -> Engine {
    let weights = Weights::from_seed(config, 11).unwrap();
    let b = backend::open(kind, &weights, block_size, blocks).unwrap();
    Engine::new(b, sched).unwrap()
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..Default::default()
    }
}

/// Runs every request to completion; returns per request its (token, logits) in order.
pub fn run_with_logits(
    engine: &mut Engine,
    requests: &[(Vec<u32>, SamplingParams)],
) -> Vec<Vec<(u32, Vec<f32>)>> {
    engine.set_capture_logits(true);
    for (i, (p, s)) in requests.iter().enumerate() {
        engine.add_request(i as u64, p.clone(), s.clone()).unwrap();
    }
    let mut out = vec![Vec::new(); requests.len()];
    while engine.has_work() {
        for e in engine.step().unwrap().tokens {
            out[e.id as usize].push((e.token, e.logits.unwrap()));
        }
    }
    out
}
