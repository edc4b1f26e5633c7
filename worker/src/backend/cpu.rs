//! The CPU backend: the reference implementation, parallel over tokens with rayon.

use half::{bf16, f16};
use rayon::prelude::*;
use std::time::Instant;

use super::{sample_row, Backend, ForwardBatch, ForwardOutput, Sample, StaticBatch, StaticRun};
use crate::config::{KvDtype, ModelConfig};
use crate::weights::Weights;
use crate::EngineError;

/// One layer's K or V pool, `[num_blocks * block_size, kv_dim]` in the cache's dtype.
enum KvPool {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl KvPool {
    fn new(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvPool::F32(vec![0.0; len]),
            KvDtype::F16 => KvPool::F16(vec![f16::ZERO; len]),
            KvDtype::Bf16 => KvPool::Bf16(vec![bf16::ZERO; len]),
        }
    }

    fn write(&mut self, start: usize, src: &[f32]) {
        match self {
            KvPool::F32(v) => v[start..start + src.len()].copy_from_slice(src),
            KvPool::F16(v) => {
                for (d, s) in v[start..].iter_mut().zip(src) {
                    *d = f16::from_f32(*s)
                }
            }
            KvPool::Bf16(v) => {
                for (d, s) in v[start..].iter_mut().zip(src) {
                    *d = bf16::from_f32(*s)
                }
            }
        }
    }

    /// `buf.len()` values from `start`, as f32; borrows the pool directly when it is f32.
    fn read<'a>(&'a self, start: usize, buf: &'a mut [f32]) -> &'a [f32] {
        match self {
            KvPool::F32(v) => &v[start..start + buf.len()],
            KvPool::F16(v) => {
                for (d, s) in buf.iter_mut().zip(&v[start..]) {
                    *d = s.to_f32()
                }
                buf
            }
            KvPool::Bf16(v) => {
                for (d, s) in buf.iter_mut().zip(&v[start..]) {
                    *d = s.to_f32()
                }
                buf
            }
        }
    }

    fn bytes_of(&self, start: usize, len: usize, out: &mut Vec<u8>) {
        match self {
            KvPool::F32(v) => v[start..start + len]
                .iter()
                .for_each(|x| out.extend(x.to_le_bytes())),
            KvPool::F16(v) => v[start..start + len]
                .iter()
                .for_each(|x| out.extend(x.to_le_bytes())),
            KvPool::Bf16(v) => v[start..start + len]
                .iter()
                .for_each(|x| out.extend(x.to_le_bytes())),
        }
    }

    fn set_bytes(&mut self, start: usize, data: &[u8]) {
        match self {
            KvPool::F32(v) => {
                for (d, b) in v[start..].iter_mut().zip(data.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]])
                }
            }
            KvPool::F16(v) => {
                for (d, b) in v[start..].iter_mut().zip(data.chunks_exact(2)) {
                    *d = f16::from_le_bytes([b[0], b[1]])
                }
            }
            KvPool::Bf16(v) => {
                for (d, b) in v[start..].iter_mut().zip(data.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([b[0], b[1]])
                }
            }
        }
    }
}

pub struct CpuBackend {
    weights: Weights,
    block_size: usize,
    num_blocks: usize,
    /// Per layer, (K, V).
    cache: Vec<(KvPool, KvPool)>,
}

/// `y = W · x` for a row-major `[rows, x.len()]` matrix.
fn matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    for (row, out) in w.chunks_exact(x.len()).zip(y.iter_mut()) {
        *out = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

impl CpuBackend {
    pub fn new(
        weights: &Weights,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, EngineError> {
        weights.config.validate()?;
        if block_size == 0 || num_blocks == 0 {
            return Err(EngineError::InvalidConfig(
                "block_size and num_blocks must be positive".into(),
            ));
        }
        let c = &weights.config;
        let len = num_blocks * block_size * c.kv_dim();
        let cache = (0..c.n_layers)
            .map(|_| (KvPool::new(c.kv_dtype, len), KvPool::new(c.kv_dtype, len)))
            .collect();
        Ok(CpuBackend {
            weights: weights.clone(),
            block_size,
            num_blocks,
            cache,
        })
    }

    /// Causal attention of one query row over its sequence's cached keys, all heads.
    fn attend(&self, layer: usize, q: &[f32], pos: usize, table: &[u32], out: &mut [f32]) {
        let c = &self.weights.config;
        let (hd, kvd) = (c.head_dim(), c.kv_dim());
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let (kpool, vpool) = &self.cache[layer];
        let mut scores = vec![0.0f32; pos + 1];
        let mut kbuf = vec![0.0f32; hd];
        let mut vbuf = vec![0.0f32; hd];
        let slot =
            |p: usize| table[p / self.block_size] as usize * self.block_size + p % self.block_size;
        for h in 0..c.n_heads {
            let kv_off = (h / group) * hd;
            let qh = &q[h * hd..(h + 1) * hd];
            for (p, s) in scores.iter_mut().enumerate() {
                let k = kpool.read(slot(p) * kvd + kv_off, &mut kbuf);
                *s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut out[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            for (p, s) in scores.iter().enumerate() {
                let v = vpool.read(slot(p) * kvd + kv_off, &mut vbuf);
                let w = s / sum;
                oh.iter_mut().zip(v).for_each(|(o, x)| *o += w * x);
            }
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn config(&self) -> &ModelConfig {
        &self.weights.config
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<ForwardOutput, EngineError> {
        let c = self.weights.config.clone();
        let (d, kvd, v) = (c.dim, c.kv_dim(), c.vocab_size);
        let n = batch.tokens.len();
        let w = &self.weights;
        // Layer input: token plus learned position embedding.
        let mut x: Vec<f32> = vec![0.0; n * d];
        x.par_chunks_mut(d).enumerate().for_each(|(t, row)| {
            let (tok, pos) = (batch.tokens[t] as usize, batch.positions[t] as usize);
            for (i, r) in row.iter_mut().enumerate() {
                *r = w.tok_embed[tok * d + i] + w.pos_embed[pos * d + i];
            }
        });
        let sample_rows: Vec<usize> = batch
            .samples
            .iter()
            .map(|s| s.token_index as usize)
            .collect();
        let mut hidden = Vec::new();
        for layer in 0..c.n_layers {
            let lw = &self.weights.layers[layer];
            let mut kv = vec![0.0f32; n * 2 * kvd];
            kv.par_chunks_mut(2 * kvd)
                .zip(x.par_chunks(d))
                .for_each(|(out, xr)| {
                    let (k, vv) = out.split_at_mut(kvd);
                    matvec(&lw.wk, xr, k);
                    matvec(&lw.wv, xr, vv);
                });
            let (kpool, vpool) = &mut self.cache[layer];
            for (t, row) in kv.chunks_exact(2 * kvd).enumerate() {
                let slot = batch.slots[t] as usize;
                kpool.write(slot * kvd, &row[..kvd]);
                vpool.write(slot * kvd, &row[kvd..]);
            }
            // Only the sampled tokens need attention in the last layer; earlier layers feed all.
            let last = layer + 1 == c.n_layers;
            let rows: Vec<usize> = if last {
                sample_rows.clone()
            } else {
                (0..n).collect()
            };
            let this = &*self;
            let lw = &this.weights.layers[layer];
            let mut out = vec![0.0f32; rows.len() * d];
            out.par_chunks_mut(d)
                .zip(rows.par_iter())
                .for_each(|(o, &t)| {
                    let mut q = vec![0.0f32; d];
                    matvec(&lw.wq, &x[t * d..(t + 1) * d], &mut q);
                    let s = batch.token_seq[t] as usize;
                    let table =
                        &batch.block_tables[s * batch.max_blocks..(s + 1) * batch.max_blocks];
                    this.attend(layer, &q, batch.positions[t] as usize, table, o);
                });
            if last {
                hidden = out;
            } else {
                x = out;
            }
        }
        let mut logits = vec![0.0f32; batch.samples.len() * v];
        logits
            .par_chunks_mut(v)
            .zip(hidden.par_chunks(d))
            .for_each(|(l, h)| matvec(&w.out, h, l));
        let tokens = logits
            .chunks_exact(v)
            .zip(&batch.samples)
            .map(|(row, s)| sample_row(row, s))
            .collect();
        Ok(ForwardOutput {
            tokens,
            logits: batch.want_logits.then_some(logits),
        })
    }

    fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, EngineError> {
        let per_block = self.block_size * self.weights.config.kv_dim();
        let mut out = Vec::new();
        for (k, v) in &self.cache {
            for pool in [k, v] {
                for &b in blocks {
                    pool.bytes_of(b as usize * per_block, per_block, &mut out);
                }
            }
        }
        Ok(out)
    }

    fn write_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<(), EngineError> {
        let c = &self.weights.config;
        let per_block = self.block_size * c.kv_dim();
        let block_bytes = per_block * c.kv_dtype.bytes();
        if data.len() != block_bytes * blocks.len() * 2 * c.n_layers {
            return Err(EngineError::Backend(format!(
                "KV data of {} bytes does not fill {} blocks",
                data.len(),
                blocks.len()
            )));
        }
        let mut chunks = data.chunks_exact(block_bytes);
        for (k, v) in &mut self.cache {
            for pool in [k, v] {
                for &b in blocks {
                    pool.set_bytes(
                        b as usize * per_block,
                        chunks.next().expect("length checked"),
                    );
                }
            }
        }
        Ok(())
    }

    fn run_static(&mut self, run: &StaticBatch) -> Result<StaticRun, EngineError> {
        run_static_with_forward(self, run)
    }
}

/// A static batch driven through [`Backend::forward`], one call per step.
pub(crate) fn run_static_with_forward(
    backend: &mut dyn Backend,
    run: &StaticBatch,
) -> Result<StaticRun, EngineError> {
    let (batch, new_tokens, max_blocks) = (run.batch, run.new_tokens, run.max_blocks);
    let prompt_len = run.prompts.len() / batch;
    let stride = prompt_len + new_tokens;
    let mut matrix = vec![0u32; batch * stride];
    for s in 0..batch {
        matrix[s * stride..s * stride + prompt_len]
            .copy_from_slice(&run.prompts[s * prompt_len..(s + 1) * prompt_len]);
    }
    let bs = backend.block_size() as u32;
    // Lays out positions start..start+count of every sequence; the last one is sampled.
    let layout = |matrix: &[u32], start: usize, count: usize| {
        let mut fb = ForwardBatch {
            block_tables: run.block_tables.to_vec(),
            max_blocks,
            ..Default::default()
        };
        for s in 0..batch {
            for p in start as u32..(start + count) as u32 {
                fb.tokens.push(matrix[s * stride + p as usize]);
                fb.positions.push(p);
                fb.slots
                    .push(run.block_tables[s * max_blocks + (p / bs) as usize] * bs + p % bs);
                fb.token_seq.push(s as u32);
            }
            let last = fb.tokens.len() as u32 - 1;
            fb.samples.push(Sample {
                token_index: last,
                temperature: 0.0,
                seed: 0,
                position: (start + count) as u32,
            });
        }
        fb
    };
    let mut prefill_secs = 0.0;
    let start = Instant::now();
    for step in 0..new_tokens {
        let len = prompt_len + step;
        let fb = if step == 0 || run.recompute {
            layout(&matrix, 0, len)
        } else {
            layout(&matrix, len - 1, 1)
        };
        let tokens = backend.forward(&fb)?.tokens;
        for (s, t) in tokens.into_iter().enumerate() {
            matrix[s * stride + len] = t;
        }
        if step == 0 {
            prefill_secs = start.elapsed().as_secs_f64();
        }
    }
    let decode_secs = start.elapsed().as_secs_f64() - prefill_secs;
    let tokens = (0..batch)
        .flat_map(|s| matrix[s * stride + prompt_len..(s + 1) * stride].to_vec())
        .collect();
    Ok(StaticRun {
        tokens,
        prefill_secs,
        decode_secs,
    })
}
