//! The compute backends behind one trait: the CPU reference and CUDA.
//!
//! A backend owns the weights and the paged KV cache (per layer, K and V of shape
//! `[num_blocks * block_size, kv_dim]`). The engine decides which tokens run and where their K/V
//! live; the backend computes.

pub mod cpu;
pub mod cuda;

use pdfleet_api::rng::mix64;
pub use pdfleet_api::BackendKind;

use crate::config::ModelConfig;
use crate::EngineError;

/// One forward step over a flattened batch of new tokens from several sequences.
#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Cache slot (`block * block_size + offset`) where each token's K and V are written.
    pub slots: Vec<u32>,
    /// Index into the batch's sequences for each token.
    pub token_seq: Vec<u32>,
    /// Per sequence, `max_blocks` entries of its block table (unused tail entries are 0).
    pub block_tables: Vec<u32>,
    pub max_blocks: usize,
    /// Tokens whose logits are turned into a next token, in output order.
    pub samples: Vec<Sample>,
    /// Also return the logits of every sampled token.
    pub want_logits: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Index of the token (into `tokens`) whose logits are sampled.
    pub token_index: u32,
    /// 0 is greedy.
    pub temperature: f32,
    pub seed: u64,
    /// Position of the token being generated; keys the random draw so a preempted and recomputed
    /// sequence draws the same tokens again.
    pub position: u32,
}

#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
    pub tokens: Vec<u32>,
    /// `[samples, vocab_size]` when asked for.
    pub logits: Option<Vec<f32>>,
}

/// The primer's measurement shape: `batch` sequences, all with a prompt of the same length,
/// generating `new_tokens` together with no scheduler in the loop.
pub struct StaticBatch<'a> {
    /// `[batch, prompt_len]`, row-major.
    pub prompts: &'a [u32],
    pub batch: usize,
    pub new_tokens: usize,
    /// `[batch, max_blocks]`: where each sequence's K/V live.
    pub block_tables: &'a [u32],
    pub max_blocks: usize,
    /// Recompute the whole sequence at every step instead of reading the cache: the primer's
    /// first, cache-less model.
    pub recompute: bool,
}

pub struct StaticRun {
    /// `[batch, new_tokens]`
    pub tokens: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn config(&self) -> &ModelConfig;
    fn block_size(&self) -> usize;
    fn num_blocks(&self) -> usize;

    fn forward(&mut self, batch: &ForwardBatch) -> Result<ForwardOutput, EngineError>;

    /// Copies the K/V of whole blocks out, layer by layer: for each layer, K of every block then V
    /// of every block, in the cache's dtype. This is what a prefill worker ships to a decode worker.
    fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, EngineError>;

    /// The inverse of [`Backend::read_blocks`].
    fn write_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<(), EngineError>;

    /// Runs a static batch: prefill, then `new_tokens - 1` decode steps. Timings exclude moving
    /// the prompts to the device, as the primer's do.
    fn run_static(&mut self, run: &StaticBatch) -> Result<StaticRun, EngineError>;

    /// This backend's KV cache as another process on the same host can open it and write into it
    /// directly (device to device), if the backend allows that.
    fn shared_cache(&self) -> Option<SharedKvCache> {
        None
    }

    /// Copies this cache's blocks `src[i]` into blocks `dst[i]` of another worker's cache, every
    /// layer's K and V, device to device; returns once the copy has completed.
    fn copy_blocks_to(
        &mut self,
        target: &SharedKvCache,
        src: &[u32],
        dst: &[u32],
    ) -> Result<(), EngineError> {
        let _ = (target, src, dst);
        Err(EngineError::Backend(format!(
            "the {} backend cannot write into another worker's KV cache",
            self.name()
        )))
    }
}

/// A KV cache shared across processes: the CUDA IPC handle of its one allocation and its layout
/// (pool `p` = layer `p / 2`, K then V, starts at `p * pool_bytes`; block `b` at `b * block_bytes`
/// within it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SharedKvCache {
    pub ipc_handle: Vec<u8>,
    /// UUID of the GPU the cache lives on.
    pub device: String,
    pub pool_bytes: u64,
    pub n_pools: u32,
    pub block_bytes: u32,
}

impl SharedKvCache {
    /// Bytes that `blocks` blocks hold over every pool.
    pub fn bytes(&self, blocks: usize) -> u64 {
        blocks as u64 * self.block_bytes as u64 * self.n_pools as u64
    }
}

/// Bytes one block occupies in one layer's K (or V) pool.
pub fn block_bytes(config: &ModelConfig, block_size: usize) -> usize {
    block_size * config.kv_dim() * config.kv_dtype.bytes()
}

/// The Gumbel noise added to `token`'s logit when sampling position `position` of a sequence
/// (the CUDA kernel computes the same from the same mix).
pub fn gumbel(seed: u64, position: u32, token: u32) -> f32 {
    let h = mix64(seed ^ mix64(((position as u64) << 32) | token as u64));
    let u = ((h >> 40) as f32 + 0.5) / (1u64 << 24) as f32;
    -(-u.ln()).ln()
}

/// Greedy (first maximum, like `torch.argmax`) or Gumbel-max sampling over one row of logits.
pub fn sample_row(logits: &[f32], s: &Sample) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, &l) in logits.iter().enumerate() {
        let v = if s.temperature > 0.0 {
            l / s.temperature + gumbel(s.seed, s.position, i as u32)
        } else {
            l
        };
        if v > best.0 {
            best = (v, i as u32);
        }
    }
    best.1
}

/// Opens a backend; `Auto` is CUDA when a device is present.
pub fn open(
    kind: BackendKind,
    weights: &crate::weights::Weights,
    block_size: usize,
    num_blocks: usize,
) -> Result<Box<dyn Backend>, EngineError> {
    open_on(kind, weights, block_size, num_blocks, 0)
}

/// [`open`] on the CUDA device with this ordinal.
pub fn open_on(
    kind: BackendKind,
    weights: &crate::weights::Weights,
    block_size: usize,
    num_blocks: usize,
    cuda_device: usize,
) -> Result<Box<dyn Backend>, EngineError> {
    let on_cuda = || -> Result<Box<dyn Backend>, EngineError> {
        Ok(Box::new(cuda::CudaBackend::new(
            weights,
            block_size,
            num_blocks,
            cuda_device,
        )?))
    };
    let on_cpu = || -> Result<Box<dyn Backend>, EngineError> {
        Ok(Box::new(cpu::CpuBackend::new(
            weights, block_size, num_blocks,
        )?))
    };
    match kind {
        BackendKind::Cpu => on_cpu(),
        BackendKind::Cuda => on_cuda(),
        BackendKind::Auto if cuda::device_available() => on_cuda(),
        BackendKind::Auto => on_cpu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let s = Sample {
            token_index: 0,
            temperature: 0.0,
            seed: 0,
            position: 0,
        };
        assert_eq!(sample_row(&[0.1, 0.9, 0.9, -1.0], &s), 1);
    }

    #[test]
    fn temperature_sampling_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut ones = 0;
        for seed in 0..4000u64 {
            let s = Sample {
                token_index: 0,
                temperature: 1.0,
                seed,
                position: 5,
            };
            let t = sample_row(&logits, &s);
            assert_eq!(t, sample_row(&logits, &s));
            ones += t;
        }
        let p = ones as f64 / 4000.0;
        assert!((p - 0.75).abs() < 0.03, "p(1) = {p}");
    }
}
