//! A worker's serving costs, as `pdfleet-worker calibrate` measures them on a machine and
//! `pdfleet simulate` models a fleet with them.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServingProfile {
    /// Where and what was measured (backend, device, model shape).
    pub measured_on: String,
    /// Prompt tokens one worker computes per second of engine time, prompts back to back.
    pub prefill_tokens_per_s: f64,
    /// A decode step's time: `fixed + per_sequence * batch + per_kv_token * tokens in the batch`.
    pub step_fixed_s: f64,
    pub step_per_sequence_s: f64,
    pub step_per_kv_token_s: f64,
    /// KV tokens one worker's cache holds.
    pub kv_tokens: f64,
    /// KV bytes per token (for transfer times).
    pub kv_bytes_per_token: f64,
}

impl ServingProfile {
    pub fn step_s(&self, batch: usize, kv_tokens: f64) -> f64 {
        self.step_fixed_s
            + self.step_per_sequence_s * batch as f64
            + self.step_per_kv_token_s * kv_tokens
    }
}
