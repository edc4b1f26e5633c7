//! `pdfleet-worker calibrate`: the engine's serving costs, through the real scheduler: how many
//! prompt tokens it prefills per second, and a decode step's time against its batch and the KV
//! it reads, fitted by least squares. `pdfleet simulate` models a fleet with the result.

use pdfleet_api::profile::ServingProfile;
use pdfleet_api::rng::SplitMix64;

use crate::backend::{self, BackendKind};
use crate::config::ModelConfig;
use crate::engine::{Engine, SamplingParams, SchedulerConfig};
use crate::weights::Weights;
use crate::EngineError;

pub struct CalibrateConfig {
    pub backend: BackendKind,
    pub model: ModelConfig,
    pub weights_seed: u64,
    pub block_size: usize,
    pub num_blocks: usize,
    pub chunk_size: usize,
    pub max_batch_tokens: usize,
    /// Decode batches to time.
    pub batches: Vec<usize>,
    /// Contexts (prompt lengths) to time them at.
    pub contexts: Vec<usize>,
}

fn prompt(rng: &mut SplitMix64, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|_| rng.below(vocab as u64) as u32).collect()
}

/// Least squares of `t = a + b x + c y` (normal equations, 3x3).
fn fit3(points: &[(f64, f64, f64)]) -> (f64, f64, f64) {
    let mut m = [[0.0f64; 4]; 3];
    for &(x, y, t) in points {
        let v = [1.0, x, y];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += v[i] * v[j];
            }
            m[i][3] += v[i] * t;
        }
    }
    // Gauss-Jordan with partial pivoting.
    for col in 0..3 {
        let pivot = (col..3)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .expect("rows");
        m.swap(col, pivot);
        let p = m[col][col];
        if p.abs() < 1e-300 {
            return (0.0, 0.0, 0.0);
        }
        for v in &mut m[col][col..] {
            *v /= p;
        }
        let pivot_row = m[col];
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col];
                for (v, pv) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * pv;
                }
            }
        }
    }
    (m[0][3], m[1][3], m[2][3])
}

pub fn calibrate(cfg: &CalibrateConfig) -> Result<ServingProfile, EngineError> {
    let weights = Weights::from_seed(&cfg.model, cfg.weights_seed)?;
    let b = backend::open(cfg.backend, &weights, cfg.block_size, cfg.num_blocks)?;
    let measured_on = format!(
        "{} backend, dim {}, {} heads ({} KV), {} layers, KV {}",
        b.name(),
        cfg.model.dim,
        cfg.model.n_heads,
        cfg.model.n_kv_heads,
        cfg.model.n_layers,
        cfg.model.kv_dtype
    );
    let sched = SchedulerConfig {
        max_batch_tokens: cfg.max_batch_tokens,
        chunk_size: cfg.chunk_size,
        max_running: 512,
    };
    let mut engine = Engine::new(b, sched)?;
    let mut rng = SplitMix64::new(7);
    let vocab = cfg.model.vocab_size;
    let mut next_id = 0u64;
    let mut id = || {
        next_id += 1;
        next_id
    };
    // Prefill: prompts back to back, one token each; every step is prompt work.
    let plen = *cfg.contexts.iter().max().unwrap_or(&512);
    let n = (8 * cfg.max_batch_tokens / plen).max(4);
    for _ in 0..n {
        let p = prompt(&mut rng, plen, vocab);
        engine.add_request(
            id(),
            p,
            SamplingParams {
                max_tokens: 1,
                ..Default::default()
            },
        )?;
    }
    let (mut tokens, mut seconds) = (0usize, 0.0f64);
    while engine.has_work() {
        let out = engine.step()?;
        tokens += out.prefill_tokens;
        seconds += out.seconds;
    }
    let prefill_tokens_per_s = tokens as f64 / seconds;
    eprintln!(
        "prefill: {tokens} prompt tokens in {seconds:.3} s of steps: {prefill_tokens_per_s:.0} tokens/s"
    );
    // Decode: a batch of sequences at a context, timed once every prompt is in.
    let mut points = Vec::new();
    for &ctx in &cfg.contexts {
        for &batch in &cfg.batches {
            let steps = 12;
            // Enough tokens that the first sequences still decode when the last prompt is in.
            let prefill_steps =
                (batch * ctx).div_ceil(cfg.max_batch_tokens.min(cfg.chunk_size)) + 2;
            for _ in 0..batch {
                let p = prompt(&mut rng, ctx, vocab);
                engine.add_request(
                    id(),
                    p,
                    SamplingParams {
                        max_tokens: prefill_steps + steps + 8,
                        ..Default::default()
                    },
                )?;
            }
            // Until every sequence decodes (its prompt done).
            loop {
                let out = engine.step()?;
                if out.prefill_tokens == 0 && out.decode_tokens == batch {
                    break;
                }
                if !engine.has_work() {
                    return Err(EngineError::InvalidConfig(format!(
                        "batch {batch} at context {ctx} never decoded all at once: raise --num-blocks"
                    )));
                }
            }
            let mut step_s = 0.0;
            for _ in 0..steps {
                step_s += engine.step()?.seconds;
            }
            let t = step_s / steps as f64;
            let kv = (batch * (ctx + 4)) as f64;
            eprintln!(
                "decode: batch {batch:>4} context {ctx:>5}: {:.3} ms a step",
                1e3 * t
            );
            points.push((batch as f64, kv, t));
            while engine.has_work() {
                engine.step()?;
            }
        }
    }
    let (a, b, c) = fit3(&points);
    eprintln!(
        "fit: step = {:.3} ms + {:.4} ms x batch + {:.3} us x 1k KV tokens",
        1e3 * a,
        1e3 * b,
        1e6 * c * 1e3
    );
    Ok(ServingProfile {
        measured_on,
        prefill_tokens_per_s,
        step_fixed_s: a.max(0.0),
        step_per_sequence_s: b.max(0.0),
        step_per_kv_token_s: c.max(0.0),
        kv_tokens: (cfg.num_blocks * cfg.block_size) as f64,
        kv_bytes_per_token: cfg.model.kv_bytes_per_token() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_plane() {
        let pts: Vec<(f64, f64, f64)> =
            [(1.0, 100.0), (8.0, 900.0), (32.0, 5000.0), (64.0, 3000.0)]
                .iter()
                .map(|&(x, y)| (x, y, 0.002 + 0.0001 * x + 1e-6 * y))
                .collect();
        let (a, b, c) = fit3(&pts);
        assert!((a - 0.002).abs() < 1e-9 && (b - 0.0001).abs() < 1e-9 && (c - 1e-6).abs() < 1e-12);
    }
}
