//! `pdfleet-worker bench`: the primer's measurements on our engine, plus a sweep of batch size and
//! context length. Figures, not assertions; ratios against a PyTorch baseline measured in the same
//! run when one is given (`seed_reference.py --out FILE`).

use serde::Serialize;

use crate::backend::{self, Backend, BackendKind, StaticBatch};
use crate::config::ModelConfig;
use crate::kv_cache::BlockManager;
use crate::weights::Weights;
use crate::EngineError;

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub backend: BackendKind,
    pub model: ModelConfig,
    pub block_size: usize,
    /// Divides the primer's batch sizes (10,000 and 50,000), for small machines.
    pub scale: usize,
    /// Peak memory bandwidth to compare decode's KV reads against, GB/s.
    pub bandwidth_gbs: f64,
    pub sweep: bool,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// For decode: KV bytes the attention must read, over all steps.
    pub kv_bytes: Option<f64>,
    pub kv_gbs: Option<f64>,
    /// Key in the PyTorch baseline's JSON this row compares with.
    pub baseline_key: Option<&'static str>,
}

fn prompts(batch: usize, len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = pdfleet_api::rng::SplitMix64::new(seed.wrapping_add(1));
    (0..batch * len)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Block tables for a static batch, taken from the real allocator.
fn tables(batch: usize, tokens: usize, block_size: usize) -> (Vec<u32>, usize, usize) {
    let per_seq = tokens.div_ceil(block_size);
    let mut m = BlockManager::new(batch * per_seq, block_size);
    let t = (0..batch * per_seq)
        .map(|_| m.allocate().expect("sized for the batch"))
        .collect();
    (t, per_seq, batch * per_seq)
}

type StaticSetup = (Box<dyn Backend>, Vec<u32>, usize);

fn static_batch<'a>(
    prompts: &'a [u32],
    batch: usize,
    new_tokens: usize,
    block_tables: &'a [u32],
    max_blocks: usize,
    recompute: bool,
) -> StaticBatch<'a> {
    StaticBatch {
        prompts,
        batch,
        new_tokens,
        block_tables,
        max_blocks,
        recompute,
    }
}

/// KV bytes decode reads over `steps` steps after a prompt of `prompt_len`: step i attends over
/// `prompt_len + i` cached tokens.
fn decode_kv_bytes(c: &ModelConfig, batch: usize, prompt_len: usize, steps: usize) -> f64 {
    let per_token = c.kv_bytes_per_token() as f64;
    (1..=steps)
        .map(|i| (batch * (prompt_len + i)) as f64 * per_token)
        .sum()
}

pub struct Bench {
    cfg: BenchConfig,
    weights: Weights,
    pub rows: Vec<BenchRow>,
    pub device: String,
}

impl Bench {
    pub fn new(cfg: BenchConfig) -> Result<Self, EngineError> {
        let weights = Weights::from_seed(&cfg.model, cfg.seed)?;
        Ok(Bench {
            cfg,
            weights,
            rows: Vec::new(),
            device: String::new(),
        })
    }

    /// A backend sized for a static batch, with the batch's block tables and blocks per sequence.
    fn backend(&mut self, batch: usize, tokens: usize) -> Result<StaticSetup, EngineError> {
        let (t, per_seq, blocks) = tables(batch, tokens, self.cfg.block_size);
        let b = backend::open(self.cfg.backend, &self.weights, self.cfg.block_size, blocks)?;
        Ok((b, t, per_seq))
    }

    fn push(&mut self, row: BenchRow) {
        let kv = match (row.kv_bytes, row.kv_gbs) {
            (Some(b), Some(g)) => format!(
                "  KV read {:.1} GB, {:.0} GB/s ({:.0}% of {:.0})",
                b / 1e9,
                g,
                100.0 * g / self.cfg.bandwidth_gbs,
                self.cfg.bandwidth_gbs
            ),
            _ => String::new(),
        };
        println!(
            "{:<34} {:>7} x {:<4} +{:<4} {:>10.3} ms {:>14.0} tok/s{kv}",
            row.name,
            row.batch,
            row.prompt_len,
            row.new_tokens,
            row.seconds * 1e3,
            row.tokens_per_s
        );
        self.rows.push(row);
    }

    /// The primer's shapes, batch sizes divided by `scale`.
    pub fn run_primer(&mut self) -> Result<(), EngineError> {
        let (s, v) = (self.cfg.scale, self.cfg.model.vocab_size);
        let (gen_batch, big_batch, plen, new) = (10_000 / s, 50_000 / s, 50, 100);
        println!(
            "backend {}, model dim {} heads {}/{} layers {} kv {}, block size {}, batch sizes / {s}",
            self.cfg.backend,
            self.cfg.model.dim,
            self.cfg.model.n_heads,
            self.cfg.model.n_kv_heads,
            self.cfg.model.n_layers,
            self.cfg.model.kv_dtype,
            self.cfg.block_size
        );
        // Warm-up: compiles and loads the kernels, touches the allocator.
        {
            let (mut b, t, per) = self.backend(64, plen + 4)?;
            let p = prompts(64, plen, v, 1);
            b.run_static(&static_batch(&p, 64, 4, &t, per, false))?;
        }
        let p = prompts(gen_batch, plen, v, self.cfg.seed);

        // KV cache: prefill once, then one token per step.
        let (mut b, t, per) = self.backend(gen_batch, plen + new)?;
        let cached = b.run_static(&static_batch(&p, gen_batch, new, &t, per, false))?;
        self.device = b.name().to_string();
        let secs = cached.prefill_secs + cached.decode_secs;
        self.push(BenchRow {
            name: "generate, KV cache".into(),
            batch: gen_batch,
            prompt_len: plen,
            new_tokens: new,
            seconds: secs,
            tokens_per_s: (gen_batch * new) as f64 / secs,
            kv_bytes: None,
            kv_gbs: None,
            baseline_key: Some("cached_10k_50_100_s"),
        });

        // No cache: every step recomputes the whole sequence, as the primer's first model does.
        let nocache = b.run_static(&static_batch(&p, gen_batch, new, &t, per, true))?;
        let secs = nocache.prefill_secs + nocache.decode_secs;
        let agree = nocache.tokens == cached.tokens;
        self.push(BenchRow {
            name: format!(
                "generate, no cache (same tokens: {})",
                if agree { "yes" } else { "NO" }
            ),
            batch: gen_batch,
            prompt_len: plen,
            new_tokens: new,
            seconds: secs,
            tokens_per_s: (gen_batch * new) as f64 / secs,
            kv_bytes: None,
            kv_gbs: None,
            baseline_key: Some("nocache_10k_50_100_s"),
        });
        drop(b);

        // Prefill and decode at the large batch.
        let (mut b, t, per) = self.backend(big_batch, plen + new)?;
        let p = prompts(big_batch, plen, v, self.cfg.seed + 1);
        let run = b.run_static(&static_batch(&p, big_batch, new, &t, per, false))?;
        self.push(BenchRow {
            name: "prefill".into(),
            batch: big_batch,
            prompt_len: plen,
            new_tokens: 1,
            seconds: run.prefill_secs,
            tokens_per_s: (big_batch * plen) as f64 / run.prefill_secs,
            kv_bytes: None,
            kv_gbs: None,
            baseline_key: Some("prefill_50k_50_s"),
        });
        let kv = decode_kv_bytes(&self.cfg.model, big_batch, plen, new - 1);
        self.push(BenchRow {
            name: format!("decode, {} steps", new - 1),
            batch: big_batch,
            prompt_len: plen,
            new_tokens: new - 1,
            seconds: run.decode_secs,
            tokens_per_s: (big_batch * (new - 1)) as f64 / run.decode_secs,
            kv_bytes: Some(kv),
            kv_gbs: Some(kv / run.decode_secs / 1e9),
            baseline_key: Some("decode_50k_99_s"),
        });
        let floor = kv / (self.cfg.bandwidth_gbs * 1e9);
        println!(
            "decode floor at {:.0} GB/s: {:.1} ms; measured / floor = {:.2}",
            self.cfg.bandwidth_gbs,
            floor * 1e3,
            run.decode_secs / floor
        );
        Ok(())
    }

    /// Decode step time across batch sizes and context lengths.
    pub fn run_sweep(&mut self) -> Result<(), EngineError> {
        let s = self.cfg.scale;
        let v = self.cfg.model.vocab_size;
        let steps = 8;
        for batch in [1_000 / s, 10_000 / s, 50_000 / s].map(|b| b.max(1)) {
            for ctx in [64usize, 256, 1024] {
                if ctx + steps + 1 > self.cfg.model.max_seq_len {
                    continue;
                }
                let (mut b, t, per) = self.backend(batch, ctx + steps + 1)?;
                let p = prompts(batch, ctx, v, 3);
                let run = b.run_static(&static_batch(&p, batch, steps + 1, &t, per, false))?;
                let kv = decode_kv_bytes(&self.cfg.model, batch, ctx, steps);
                self.push(BenchRow {
                    name: "sweep decode".into(),
                    batch,
                    prompt_len: ctx,
                    new_tokens: steps,
                    seconds: run.decode_secs,
                    tokens_per_s: (batch * steps) as f64 / run.decode_secs,
                    kv_bytes: Some(kv),
                    kv_gbs: Some(kv / run.decode_secs / 1e9),
                    baseline_key: None,
                });
                self.push(BenchRow {
                    name: "sweep prefill".into(),
                    batch,
                    prompt_len: ctx,
                    new_tokens: 1,
                    seconds: run.prefill_secs,
                    tokens_per_s: (batch * ctx) as f64 / run.prefill_secs,
                    kv_bytes: None,
                    kv_gbs: None,
                    baseline_key: None,
                });
            }
        }
        Ok(())
    }

    /// Ratios against a PyTorch baseline JSON from `seed_reference.py --out`.
    pub fn compare(&self, baseline: &serde_json::Value) {
        println!(
            "\n{:<34} {:>12} {:>12} {:>8}",
            "shape", "pdfleet ms", "PyTorch ms", "speedup"
        );
        for row in &self.rows {
            let Some(key) = row.baseline_key else {
                continue;
            };
            let Some(base) = baseline.get(key).and_then(|v| v.as_f64()) else {
                continue;
            };
            println!(
                "{:<34} {:>12.3} {:>12.3} {:>7.1}x",
                row.name,
                row.seconds * 1e3,
                base * 1e3,
                base / row.seconds
            );
        }
    }
}
