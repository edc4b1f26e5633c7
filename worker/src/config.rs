//! Model configuration: the primer's toy attention model, generalised to heads, KV heads and layers.

use serde::{Deserialize, Serialize};

use crate::EngineError;

use pdfleet_api::worker_args::ModelArgs;
/// Element type of the KV cache. Weights and activations stay f32; only the cache (the bytes that
/// decode streams and that move between workers) is narrowed.
pub use pdfleet_api::KvDtype;

/// With the defaults this is exactly the primer's `ToyLLMWithCaching`: vocabulary 100, width 32,
/// one head, one layer, 2048 positions, no residual or norm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub n_layers: usize,
    pub max_seq_len: usize,
    pub kv_dtype: KvDtype,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            vocab_size: 100,
            dim: 32,
            n_heads: 1,
            n_kv_heads: 1,
            n_layers: 1,
            max_seq_len: 2048,
            kv_dtype: KvDtype::F32,
        }
    }
}

/// The CUDA kernels keep a head's vector in registers; this bounds it.
pub const MAX_HEAD_DIM: usize = 256;

impl From<&ModelArgs> for ModelConfig {
    fn from(a: &ModelArgs) -> Self {
        ModelConfig {
            vocab_size: a.vocab_size,
            dim: a.dim,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            n_layers: a.n_layers,
            max_seq_len: a.max_seq_len,
            kv_dtype: a.kv_dtype,
        }
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Width of one token's K (or V) in one layer.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }

    /// Bytes of K and V that one token keeps in the cache, over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.kv_dim() * self.n_layers * self.kv_dtype.bytes()
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        let fail = |m: String| Err(EngineError::InvalidConfig(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("dim", self.dim),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("n_layers", self.n_layers),
            ("max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return fail(format!(
                "n_heads ({}) must divide dim ({})",
                self.n_heads, self.dim
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return fail(format!(
                "n_kv_heads ({}) must divide n_heads ({})",
                self.n_kv_heads, self.n_heads
            ));
        }
        if self.head_dim() > MAX_HEAD_DIM {
            return fail(format!(
                "head_dim (dim / n_heads = {}) must be at most {MAX_HEAD_DIM}",
                self.head_dim()
            ));
        }
        if self.vocab_size > u32::MAX as usize || self.max_seq_len > u32::MAX as usize / 2 {
            return fail("vocab_size and max_seq_len must fit in 32 bits".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_primer_model() {
        let c = ModelConfig::default();
        c.validate().unwrap();
        assert_eq!(
            (c.vocab_size, c.dim, c.head_dim(), c.kv_dim()),
            (100, 32, 32, 32)
        );
        assert_eq!(c.kv_bytes_per_token(), 2 * 32 * 4);
    }

    #[test]
    fn gqa_and_mqa_shrink_the_cache() {
        let gqa = ModelConfig {
            dim: 64,
            n_heads: 8,
            n_kv_heads: 2,
            ..Default::default()
        };
        gqa.validate().unwrap();
        assert_eq!(gqa.kv_dim(), 16);
        let mqa = ModelConfig {
            n_kv_heads: 1,
            ..gqa.clone()
        };
        assert_eq!(mqa.kv_dim(), 8);
    }

    #[test]
    fn invalid_shapes_are_refused_with_a_reason() {
        let bad = ModelConfig {
            dim: 30,
            n_heads: 4,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("n_heads (4) must divide dim (30)"));
        let bad = ModelConfig {
            n_heads: 4,
            n_kv_heads: 3,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("n_kv_heads (3) must divide n_heads (4)"));
        let bad = ModelConfig {
            n_layers: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("n_layers must be positive"));
    }
}
