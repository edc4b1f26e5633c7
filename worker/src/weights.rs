//! Model weights: loaded from safetensors with the primer's tensor names, or drawn from a seed.

use std::path::Path;

use pdfleet_api::rng::SplitMix64;
use safetensors::{Dtype, SafeTensors};

use pdfleet_api::worker_args::ModelArgs;

use crate::config::{KvDtype, ModelConfig};
use crate::EngineError;

/// One attention block. Matrices are row-major in PyTorch's Linear layout: `y = x · Wᵀ`, so `wq` is
/// `[dim, dim]` and `wk`, `wv` are `[kv_dim, dim]`.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct Weights {
    pub config: ModelConfig,
    /// `[vocab_size, dim]`
    pub tok_embed: Vec<f32>,
    /// `[max_seq_len, dim]`
    pub pos_embed: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    /// `[vocab_size, dim]`
    pub out: Vec<f32>,
}

impl Weights {
    /// Draws weights the way PyTorch initialises the primer's modules: embeddings from N(0, 1),
    /// Linear weights from U(-1/√in, 1/√in).
    pub fn from_seed(config: &ModelConfig, seed: u64) -> Result<Self, EngineError> {
        config.validate()?;
        let mut rng = SplitMix64::new(seed);
        let (d, kv) = (config.dim, config.kv_dim());
        let bound = 1.0 / (d as f32).sqrt();
        let mut normal = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>();
        let tok_embed = normal(config.vocab_size * d);
        let pos_embed = normal(config.max_seq_len * d);
        let mut linear = |n: usize| {
            (0..n)
                .map(|_| rng.uniform(1.0) as f32 * bound)
                .collect::<Vec<_>>()
        };
        let layers = (0..config.n_layers)
            .map(|_| LayerWeights {
                wq: linear(d * d),
                wk: linear(kv * d),
                wv: linear(kv * d),
            })
            .collect();
        let out = linear(config.vocab_size * d);
        Ok(Weights {
            config: config.clone(),
            tok_embed,
            pos_embed,
            layers,
            out,
        })
    }

    /// Loads a safetensors file. A one-layer model uses the primer's names (`q_proj.weight`, ...);
    /// deeper ones prefix each block's tensors with `layers.N.`.
    pub fn load_safetensors(path: &Path, config: &ModelConfig) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path)
            .map_err(|e| EngineError::Weights(format!("cannot read {}: {e}", path.display())))?;
        Self::from_safetensors_bytes(&bytes, config, &path.display().to_string())
    }

    /// The primer's model with seed 7, the one the golden vectors come from: the default weights
    /// of every worker, so a fleet started with no weights file still agrees with itself.
    pub fn embedded_primer() -> Self {
        const BYTES: &[u8] = include_bytes!("../testdata/toy-seed7/weights.safetensors");
        Self::from_safetensors_bytes(BYTES, &ModelConfig::default(), "embedded toy-seed7")
            .expect("embedded weights load")
    }

    /// Parses safetensors bytes; `origin` names them in errors.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
        config: &ModelConfig,
        origin: &str,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| EngineError::Weights(format!("{origin}: {e}")))?;
        let (d, kv, v) = (config.dim, config.kv_dim(), config.vocab_size);
        let read = |name: &str, shape: [usize; 2]| -> Result<Vec<f32>, EngineError> {
            let t = file
                .tensor(name)
                .map_err(|_| EngineError::Weights(format!("{origin}: no tensor named {name}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(EngineError::Weights(format!(
                    "{origin}: tensor {name} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let layer_name = |i: usize, name: &str| {
            if config.n_layers == 1 {
                name.to_string()
            } else {
                format!("layers.{i}.{name}")
            }
        };
        let layers = (0..config.n_layers)
            .map(|i| {
                Ok(LayerWeights {
                    wq: read(&layer_name(i, "q_proj.weight"), [d, d])?,
                    wk: read(&layer_name(i, "k_proj.weight"), [kv, d])?,
                    wv: read(&layer_name(i, "v_proj.weight"), [kv, d])?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Weights {
            config: config.clone(),
            tok_embed: read("tok_embed.weight", [v, d])?,
            pos_embed: read("pos_embed.weight", [config.max_seq_len, d])?,
            layers,
            out: read("out.weight", [v, d])?,
        })
    }
}

/// Row-major transpose of a `[rows, cols]` matrix; the CUDA kernels read weights column-wise so
/// that a warp's lanes touch consecutive addresses.
/// The weights a worker's flags name: a safetensors file, a seed, or (with neither) the primer's
/// seed-7 model that every worker embeds, which only fits the primer's shape.
pub fn load(args: &ModelArgs) -> Result<Weights, EngineError> {
    let config = ModelConfig::from(args);
    match (&args.weights, args.weights_seed) {
        (Some(path), _) => Weights::load_safetensors(path, &config),
        (None, Some(seed)) => Weights::from_seed(&config, seed),
        (None, None) => {
            // Any KV dtype goes with the embedded weights.
            let primer_shape = ModelConfig {
                kv_dtype: KvDtype::F32,
                ..config.clone()
            } == ModelConfig::default();
            if !primer_shape {
                return Err(EngineError::InvalidConfig(
                    "the embedded weights are the primer's shape; give --weights or --weights-seed for other shapes".into(),
                ));
            }
            Ok(Weights {
                config,
                ..Weights::embedded_primer()
            })
        }
    }
}

pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_weights_are_reproducible_and_shaped() {
        let c = ModelConfig {
            dim: 16,
            n_heads: 4,
            n_kv_heads: 2,
            n_layers: 2,
            ..Default::default()
        };
        let a = Weights::from_seed(&c, 3).unwrap();
        let b = Weights::from_seed(&c, 3).unwrap();
        assert_eq!(a.out, b.out);
        assert_eq!(a.layers[1].wk.len(), 8 * 16);
        assert_ne!(a.out, Weights::from_seed(&c, 4).unwrap().out);
        let bound = 1.0 / 4.0;
        assert!(a.layers[0].wq.iter().all(|w| w.abs() <= bound));
    }

    #[test]
    fn loads_the_golden_vector_weights() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/toy-seed7/weights.safetensors");
        let w = Weights::load_safetensors(&path, &ModelConfig::default()).unwrap();
        assert_eq!(w.pos_embed.len(), 2048 * 32);
        assert_eq!(w.layers.len(), 1);
    }

    #[test]
    fn a_shape_mismatch_names_the_tensor() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/toy-seed7/weights.safetensors");
        let c = ModelConfig {
            dim: 64,
            ..Default::default()
        };
        let err = Weights::load_safetensors(&path, &c)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected F32 [100, 64]") || err.contains("[64, 64]"),
            "{err}"
        );
    }

    #[test]
    fn transpose_swaps_axes() {
        assert_eq!(
            transpose(&[1., 2., 3., 4., 5., 6.], 2, 3),
            vec![1., 4., 2., 5., 3., 6.]
        );
    }
}
