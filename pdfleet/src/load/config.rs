//! What a load run sends, where, and how its requests are judged.

use anyhow::bail;
use serde::Serialize;

use super::LenDist;
use crate::trace::TraceRequest;

/// Size of the toy model's vocabulary: prompt token ids are drawn from `0..VOCAB`.
pub const VOCAB: u64 = 100;

/// What to send, where, and how to judge it.
#[derive(Debug, Clone, Serialize)]
pub struct LoadConfig {
    /// Base URL of the router, e.g. `http://127.0.0.1:8080` (no trailing path).
    pub url: String,
    /// `model` field of each request.
    pub model: String,
    /// Mean arrival rate in requests/s (Poisson, open loop). `f64::INFINITY` sends
    /// every request at t = 0.
    pub rate: f64,
    /// Exactly this many requests are sent.
    pub num_requests: usize,
    /// Prompt length in tokens.
    pub prompt_len: LenDist,
    /// `max_tokens` of each request.
    pub output_len: LenDist,
    pub seed: u64,
    /// Time-to-first-token SLO in milliseconds (for goodput).
    pub slo_ttft_ms: f64,
    /// Inter-token-latency SLO in milliseconds (for goodput; compared with a request's
    /// mean ITL).
    pub slo_itl_ms: f64,
    /// Client timeout per request in seconds, covering connect, headers and the whole
    /// stream.
    pub timeout_s: f64,
    /// Live single-line progress on stderr (`\r`, about twice a second).
    pub progress: bool,
    /// Free-form name carried into the report (e.g. an experiment arm).
    pub label: String,
    /// Arrivals and lengths to replay (a trace, a generated shape) instead of `rate`,
    /// `num_requests` and the length distributions.
    #[serde(skip)]
    pub schedule: Option<Vec<TraceRequest>>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            url: "http://127.0.0.1:8080".into(),
            model: "toy".into(),
            rate: 10.0,
            num_requests: 200,
            prompt_len: LenDist::Fixed(64),
            output_len: LenDist::Fixed(32),
            seed: 1,
            slo_ttft_ms: 500.0,
            slo_itl_ms: 50.0,
            timeout_s: 60.0,
            progress: false,
            label: String::new(),
            schedule: None,
        }
    }
}

impl LoadConfig {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.rate.is_nan() || self.rate <= 0.0 {
            bail!("rate must be > 0 requests/s (or inf), got {}", self.rate);
        }
        match &self.schedule {
            Some(s) if s.is_empty() => bail!("the trace or shape gives no request"),
            None if self.num_requests == 0 => bail!("number of requests must be at least 1"),
            _ => {}
        }
        if !self.timeout_s.is_finite() || self.timeout_s <= 0.0 {
            bail!(
                "timeout must be a positive number of seconds, got {}",
                self.timeout_s
            );
        }
        if self.slo_ttft_ms.is_nan()
            || self.slo_ttft_ms < 0.0
            || self.slo_itl_ms.is_nan()
            || self.slo_itl_ms < 0.0
        {
            bail!("SLOs must be >= 0 ms");
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            bail!("url must start with http:// (got {:?})", self.url);
        }
        Ok(())
    }

    pub(super) fn endpoint(&self) -> String {
        format!("{}/v1/completions", self.url.trim_end_matches('/'))
    }
}
