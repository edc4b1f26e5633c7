//! Golden-vector checks against the primer's PyTorch model (layout: `testdata/toy-seed7/`).
//!
//! A case passes when its first-step logits agree within the tolerance and its greedy tokens equal
//! the reference at every step up to the first near-tie (reference margin below the tolerance);
//! at that step either of the two top tokens is right, and the comparison of the case ends.

use std::path::Path;

use serde::Deserialize;

use crate::backend::{self, BackendKind};
use crate::config::ModelConfig;
use crate::engine::{Engine, SamplingParams, SchedulerConfig};
use crate::weights::Weights;
use crate::EngineError;

#[derive(Deserialize)]
struct CasesFile {
    model: ModelConfig,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    margins: Vec<f32>,
    first_step_logits: Vec<f32>,
}

#[derive(Debug)]
pub struct CaseResult {
    pub passed: bool,
    pub detail: String,
}

/// Checks every case of `dir` on the named backend; all cases run together in one engine, so
/// the check also covers continuous batching of prompts of different lengths.
pub fn check_dir(
    dir: &Path,
    backend: BackendKind,
    tolerance: f32,
) -> Result<Vec<CaseResult>, EngineError> {
    let text = std::fs::read_to_string(dir.join("cases.json")).map_err(|e| {
        EngineError::Weights(format!("cannot read {}/cases.json: {e}", dir.display()))
    })?;
    let file: CasesFile = serde_json::from_str(&text)
        .map_err(|e| EngineError::Weights(format!("{}/cases.json: {e}", dir.display())))?;
    let weights = Weights::load_safetensors(&dir.join("weights.safetensors"), &file.model)?;
    let block_size = 16;
    let blocks: usize = file
        .cases
        .iter()
        .map(|c| (c.prompt.len() + c.tokens.len()).div_ceil(block_size))
        .sum();
    let backend = backend::open(backend, &weights, block_size, blocks + 1)?;
    let mut engine = Engine::new(backend, SchedulerConfig::default())?;
    engine.set_capture_logits(true);
    for (i, case) in file.cases.iter().enumerate() {
        let params = SamplingParams {
            max_tokens: case.tokens.len(),
            ..Default::default()
        };
        engine.add_request(i as u64, case.prompt.clone(), params)?;
    }
    let mut got: Vec<Vec<(u32, Vec<f32>)>> = vec![Vec::new(); file.cases.len()];
    while engine.has_work() {
        for e in engine.step()?.tokens {
            got[e.id as usize].push((e.token, e.logits.expect("logits captured")));
        }
    }
    Ok(file
        .cases
        .iter()
        .zip(got)
        .map(|(case, got)| compare(case, &got, tolerance))
        .collect())
}

fn compare(case: &Case, got: &[(u32, Vec<f32>)], tol: f32) -> CaseResult {
    let fail = |detail: String| CaseResult {
        passed: false,
        detail,
    };
    if got.len() != case.tokens.len() {
        return fail(format!(
            "generated {} tokens, expected {}",
            got.len(),
            case.tokens.len()
        ));
    }
    let max_err = got[0]
        .1
        .iter()
        .zip(&case.first_step_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    if max_err > tol {
        return fail(format!(
            "first-step logits differ by {max_err:.2e} (bound {tol:.0e})"
        ));
    }
    for (step, ((token, logits), (&want, &margin))) in got
        .iter()
        .zip(case.tokens.iter().zip(&case.margins))
        .enumerate()
    {
        if margin < tol {
            // A near-tie: the reference's token must be one of ours within the bound too.
            let ours = logits[*token as usize];
            let theirs = logits[want as usize];
            if ours - theirs > 2.0 * tol {
                return fail(format!(
                    "step {step}: near-tie (margin {margin:.2e}) but token {token} beats the reference's {want} by {:.2e}",
                    ours - theirs
                ));
            }
            return CaseResult {
                passed: true,
                detail: format!(
                    "logits within {max_err:.1e}; tokens equal up to a near-tie at step {step}"
                ),
            };
        }
        if *token != want {
            return fail(format!(
                "step {step}: token {token}, expected {want} (margin {margin:.2e})"
            ));
        }
    }
    CaseResult {
        passed: true,
        detail: format!(
            "logits within {max_err:.1e}; all {} tokens equal",
            got.len()
        ),
    }
}
