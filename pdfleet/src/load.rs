//! `pdfleet load`: an open-loop load generator for the router's OpenAI-compatible
//! streaming completions endpoint (`POST {url}/v1/completions`, server-sent events).
//!
//! Requests arrive as a Poisson process (exponential inter-arrival times at
//! [`LoadConfig::rate`]); each is spawned at its arrival time whatever happened to the
//! earlier ones, and each has a client timeout, so a run is bounded: it sends exactly
//! [`LoadConfig::num_requests`] requests and ends when all have finished or timed out.
//! Everything random (arrival times, prompt lengths, prompt token ids, output lengths)
//! comes from [`LoadConfig::seed`] through [`SplitMix64`], so a run's offered load is
//! reproducible. Arrivals and request shapes use separate streams derived from the
//! seed: changing the length distributions does not move the arrival times.
//!
//! Library entry point: [`run_load`] → [`LoadReport`] (records, percentiles,
//! throughput, goodput, [`LoadReport::summary_table`], [`LoadReport::write_csv`]).
//! CLI: [`LoadArgs`] and [`run_cli`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde::Serialize;

/// Size of the toy model's vocabulary: prompt token ids are drawn from `0..VOCAB`.
pub const VOCAB: u64 = 100;

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

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
        }
    }
}

impl LoadConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.rate.is_nan() || self.rate <= 0.0 {
            bail!("rate must be > 0 requests/s (or inf), got {}", self.rate);
        }
        if self.num_requests == 0 {
            bail!("number of requests must be at least 1");
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

    fn endpoint(&self) -> String {
        format!("{}/v1/completions", self.url.trim_end_matches('/'))
    }
}

/// A distribution of lengths in tokens. Parses from `"64"` (fixed) or
/// `"lognormal:MEDIAN,SIGMA,MAX"` (e.g. `"lognormal:128,0.8,1024"`): `exp(N(ln MEDIAN,
/// SIGMA²))` rounded to the nearest integer and clamped to `1..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum LenDist {
    Fixed(usize),
    LogNormal { median: f64, sigma: f64, max: usize },
}

impl LenDist {
    /// One sample, always in `1..=max` (or exactly the fixed value).
    pub fn sample(&self, rng: &mut SplitMix64) -> usize {
        match *self {
            LenDist::Fixed(n) => n,
            LenDist::LogNormal { median, sigma, max } => {
                let x = median * (sigma * rng.next_normal()).exp();
                // `as usize` saturates (and maps NaN to 0); the clamp does the rest.
                (x.round() as usize).clamp(1, max)
            }
        }
    }
}

impl fmt::Display for LenDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LenDist::Fixed(n) => write!(f, "{n}"),
            LenDist::LogNormal { median, sigma, max } => {
                write!(f, "lognormal:{median},{sigma},{max}")
            }
        }
    }
}

impl FromStr for LenDist {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        const FORMS: &str = "expected a length like \"64\" or \"lognormal:MEDIAN,SIGMA,MAX\" \
                             (e.g. \"lognormal:128,0.8,1024\")";
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("lognormal:") {
            let parts: Vec<&str> = rest.split(',').map(str::trim).collect();
            if parts.len() != 3 {
                bail!("{s:?}: lognormal needs 3 comma-separated parameters MEDIAN,SIGMA,MAX, got {}; {FORMS}", parts.len());
            }
            let median: f64 = parts[0]
                .parse()
                .map_err(|_| anyhow::anyhow!("{s:?}: MEDIAN {:?} is not a number", parts[0]))?;
            let sigma: f64 = parts[1]
                .parse()
                .map_err(|_| anyhow::anyhow!("{s:?}: SIGMA {:?} is not a number", parts[1]))?;
            let max: usize = parts[2]
                .parse()
                .map_err(|_| anyhow::anyhow!("{s:?}: MAX {:?} is not a whole number", parts[2]))?;
            if !median.is_finite() || median <= 0.0 {
                bail!("{s:?}: MEDIAN must be a positive number, got {median}");
            }
            if !sigma.is_finite() || sigma < 0.0 {
                bail!("{s:?}: SIGMA must be >= 0, got {sigma}");
            }
            if max == 0 {
                bail!("{s:?}: MAX must be at least 1");
            }
            Ok(LenDist::LogNormal { median, sigma, max })
        } else if let Ok(n) = s.parse::<usize>() {
            if n == 0 {
                bail!("{s:?}: a length must be at least 1");
            }
            Ok(LenDist::Fixed(n))
        } else {
            bail!("{s:?}: {FORMS}")
        }
    }
}

// ---------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, good enough for workloads.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (n > 0); multiply-shift, bias < n / 2^64.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box–Muller, one of the pair).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Exponential with the given rate (mean 1 / rate); 0 when the rate is infinite.
    pub fn next_exp(&mut self, rate: f64) -> f64 {
        if rate.is_infinite() {
            return 0.0;
        }
        let u = 1.0 - self.next_f64(); // (0, 1]
        -u.ln() / rate
    }
}

/// One planned request: when it is sent (seconds after the start) and what it asks.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    pub id: usize,
    pub at_s: f64,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
}

/// The deterministic schedule [`run_load`] follows: arrival times (cumulative
/// exponential gaps; the first request also waits one gap) and request shapes.
pub fn plan_requests(cfg: &LoadConfig) -> Vec<PlannedRequest> {
    let mut arrivals = SplitMix64::new(cfg.seed ^ 0xA771_7A15_0000_0001);
    let mut shapes = SplitMix64::new(cfg.seed ^ 0x5AA9_E500_0000_0002);
    let mut t = 0.0;
    (0..cfg.num_requests)
        .map(|id| {
            t += arrivals.next_exp(cfg.rate);
            let plen = cfg.prompt_len.sample(&mut shapes);
            let max_tokens = cfg.output_len.sample(&mut shapes);
            let prompt = (0..plen).map(|_| shapes.below(VOCAB) as u32).collect();
            PlannedRequest {
                id,
                at_s: t,
                prompt,
                max_tokens,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------------

/// Incremental SSE parser: feed it the body's chunks as they come (split anywhere, even
/// inside a line or a `\r\n`) and it returns the `data` of each complete event. Lines
/// end with `\n` or `\r\n`; several `data:` lines in one event are joined with `\n`;
/// comments (`:` lines) and other fields (`event:`, `id:`, `retry:`) are ignored.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk; appends the data of every event it completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<String>) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..i]);
            self.end_line(out);
            rest = &rest[i + 1..];
        }
        self.line.extend_from_slice(rest);
    }

    /// End of the body: an unterminated last event is dispatched anyway (lenient).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        if !self.line.is_empty() {
            self.end_line(out);
        }
        self.dispatch(out);
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return; // comment
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, out: &mut Vec<String>) {
        if self.has_data {
            out.push(std::mem::take(&mut self.data));
            self.has_data = false;
        }
    }
}

/// What one SSE event of the completions stream means.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// `data: [DONE]`.
    Done,
    /// A choices event: how many tokens it carries (length of `token_ids`, summed over
    /// choices; a choice without `token_ids` but with non-empty `text` counts as one)
    /// and its `finish_reason` if any.
    Tokens {
        n: usize,
        finish_reason: Option<String>,
        /// The ids themselves, where the event carries `token_ids`.
        token_ids: Vec<u32>,
    },
    /// `{"error": {"message": ..}}`, or an event that is not valid JSON.
    Error(String),
}

pub fn parse_event(data: &str) -> StreamEvent {
    let data = data.trim();
    if data == "[DONE]" {
        return StreamEvent::Done;
    }
    let v: serde_json::Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            let head: String = data.chars().take(80).collect();
            return StreamEvent::Error(format!("malformed stream event ({e}): {head}"));
        }
    };
    if let Some(err) = v.get("error") {
        let msg = match err.get("message").and_then(|m| m.as_str()) {
            Some(m) => m.to_string(),
            None => err.to_string(),
        };
        let kind = err.get("type").and_then(|t| t.as_str());
        return StreamEvent::Error(match kind {
            Some(k) => format!("{k}: {msg}"),
            None => msg,
        });
    }
    let mut n = 0;
    let mut finish_reason = None;
    let mut token_ids = Vec::new();
    if let Some(choices) = v.get("choices").and_then(|c| c.as_array()) {
        for c in choices {
            match c.get("token_ids").and_then(|t| t.as_array()) {
                Some(ids) => {
                    n += ids.len();
                    token_ids.extend(ids.iter().filter_map(|t| t.as_u64()).map(|t| t as u32));
                }
                None => {
                    if c.get("text")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| !t.is_empty())
                    {
                        n += 1;
                    }
                }
            }
            if let Some(r) = c.get("finish_reason").and_then(|r| r.as_str()) {
                finish_reason = Some(r.to_string());
            }
        }
    }
    StreamEvent::Tokens {
        n,
        finish_reason,
        token_ids,
    }
}

// ---------------------------------------------------------------------------------
// Records and report
// ---------------------------------------------------------------------------------

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Outcome {
    /// 2xx and a complete stream (`[DONE]`, or a `finish_reason` before the body ended).
    Ok,
    /// A non-2xx response (e.g. 400, 429, 503); not retried.
    HttpStatus(u16),
    /// Connection failure, client timeout (message starts with `timeout`), an error
    /// event in the stream, a malformed event, or a stream cut short.
    Error(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }

    /// The CSV spelling: `ok`, `http_429`, `error:<message>` (commas, quotes and
    /// newlines in the message replaced so the field needs no quoting).
    pub fn csv_label(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::HttpStatus(c) => format!("http_{c}"),
            Outcome::Error(m) => {
                let m: String = m
                    .chars()
                    .map(|c| match c {
                        ',' => ';',
                        '"' => '\'',
                        '\n' | '\r' => ' ',
                        c => c,
                    })
                    .collect();
                format!("error:{m}")
            }
        }
    }
}

/// One request's measurements. Times are seconds; `sent_at_s` is relative to the
/// start of the run, the others to the moment the request was sent.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub id: usize,
    pub sent_at_s: f64,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub outcome: Outcome,
    /// Time to the first event carrying tokens (also kept for failed requests that
    /// streamed something before failing).
    pub ttft_s: Option<f64>,
    /// Inter-token gaps: each token-bearing event after the first contributes `k` gaps
    /// of `(its time − previous event's time) / k`, `k` its token count. Extra tokens
    /// in the first event contribute none (the time they took is inside TTFT).
    pub itl_s: Vec<f64>,
    /// Send to end of stream; only for `Ok`.
    pub e2e_s: Option<f64>,
    /// Tokens received (sum of `token_ids` lengths).
    pub tokens: usize,
}

impl RequestRecord {
    pub fn mean_itl_s(&self) -> Option<f64> {
        if self.itl_s.is_empty() {
            None
        } else {
            Some(self.itl_s.iter().sum::<f64>() / self.itl_s.len() as f64)
        }
    }

    pub fn p99_itl_s(&self) -> Option<f64> {
        let mut v = self.itl_s.clone();
        percentile_of_unsorted(&mut v, 99.0)
    }

    /// Good = `Ok` and TTFT <= `slo_ttft_s` and mean ITL <= `slo_itl_s`. The ITL test
    /// uses the request's *mean* inter-token latency (one slow gap, e.g. a decode
    /// batch hiccup, does not by itself make a request bad); a request with no gaps
    /// (one output token) passes it.
    pub fn is_good(&self, slo_ttft_s: f64, slo_itl_s: f64) -> bool {
        self.outcome.is_ok()
            && self.ttft_s.is_some_and(|t| t <= slo_ttft_s)
            && self.mean_itl_s().is_none_or(|m| m <= slo_itl_s)
    }
}

/// Distribution summary (same unit as the samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for no samples. Percentiles interpolate linearly between order
    /// statistics (numpy's default).
    pub fn of(samples: &[f64]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Percentiles {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile_sorted(&v, 50.0),
            p90: percentile_sorted(&v, 90.0),
            p99: percentile_sorted(&v, 99.0),
            max: v[v.len() - 1],
        })
    }

    fn scaled(self, k: f64) -> Percentiles {
        Percentiles {
            n: self.n,
            mean: self.mean * k,
            p50: self.p50 * k,
            p90: self.p90 * k,
            p99: self.p99 * k,
            max: self.max * k,
        }
    }
}

fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    let pos = (p / 100.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

fn percentile_of_unsorted(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(percentile_sorted(v, p))
}

/// The result of a run. Latency percentiles are over `Ok` requests only.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// One per request, in id (= arrival) order.
    pub records: Vec<RequestRecord>,
    /// From the start of the run until the last request finished.
    pub wall_s: f64,
    pub label: String,
    /// Offered load (the configured rate), requests/s.
    pub offered_rate: f64,
    pub slo_ttft_ms: f64,
    pub slo_itl_ms: f64,
}

/// Every number of a report, flat and serializable (latencies in milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct LoadSummary {
    pub label: String,
    pub requests: usize,
    pub ok: usize,
    /// Non-2xx responses by status code.
    pub http: BTreeMap<u16, usize>,
    /// Outcome::Error count (timeouts included).
    pub errors: usize,
    /// Of which client timeouts.
    pub timeouts: usize,
    pub wall_s: f64,
    pub offered_rate: f64,
    /// Ok requests/s.
    pub request_throughput: f64,
    /// Output tokens/s of Ok requests.
    pub output_throughput: f64,
    /// Good requests/s (see [`RequestRecord::is_good`]).
    pub goodput: f64,
    /// Good requests / all requests sent.
    pub goodput_fraction: f64,
    pub slo_ttft_ms: f64,
    pub slo_itl_ms: f64,
    pub ttft_ms: Option<Percentiles>,
    pub itl_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
}

impl LoadReport {
    fn ok_records(&self) -> impl Iterator<Item = &RequestRecord> {
        self.records.iter().filter(|r| r.outcome.is_ok())
    }

    pub fn ok_count(&self) -> usize {
        self.ok_records().count()
    }

    /// Counts by outcome: `(ok, non-2xx by status, errors)`.
    pub fn outcome_counts(&self) -> (usize, BTreeMap<u16, usize>, usize) {
        let mut ok = 0;
        let mut http = BTreeMap::new();
        let mut err = 0;
        for r in &self.records {
            match r.outcome {
                Outcome::Ok => ok += 1,
                Outcome::HttpStatus(c) => *http.entry(c).or_insert(0) += 1,
                Outcome::Error(_) => err += 1,
            }
        }
        (ok, http, err)
    }

    /// TTFT of Ok requests, seconds.
    pub fn ttft_percentiles(&self) -> Option<Percentiles> {
        let v: Vec<f64> = self.ok_records().filter_map(|r| r.ttft_s).collect();
        Percentiles::of(&v)
    }

    /// Every inter-token gap of every Ok request, seconds.
    pub fn itl_percentiles(&self) -> Option<Percentiles> {
        let v: Vec<f64> = self
            .ok_records()
            .flat_map(|r| r.itl_s.iter().copied())
            .collect();
        Percentiles::of(&v)
    }

    /// End-to-end latency of Ok requests, seconds.
    pub fn e2e_percentiles(&self) -> Option<Percentiles> {
        let v: Vec<f64> = self.ok_records().filter_map(|r| r.e2e_s).collect();
        Percentiles::of(&v)
    }

    fn per_s(&self, x: f64) -> f64 {
        if self.wall_s > 0.0 {
            x / self.wall_s
        } else {
            0.0
        }
    }

    /// Output tokens/s (Ok requests' tokens over the wall time).
    pub fn output_throughput(&self) -> f64 {
        self.per_s(self.ok_records().map(|r| r.tokens).sum::<usize>() as f64)
    }

    /// Completed (Ok) requests/s.
    pub fn request_throughput(&self) -> f64 {
        self.per_s(self.ok_count() as f64)
    }

    /// Requests meeting both SLOs ([`RequestRecord::is_good`]: TTFT <= `slo_ttft_ms`
    /// and *mean* ITL <= `slo_itl_ms`).
    pub fn good_count(&self) -> usize {
        let (t, i) = (self.slo_ttft_ms / 1e3, self.slo_itl_ms / 1e3);
        self.records.iter().filter(|r| r.is_good(t, i)).count()
    }

    /// Good requests/s.
    pub fn goodput(&self) -> f64 {
        self.per_s(self.good_count() as f64)
    }

    /// Good requests as a fraction of all requests sent.
    pub fn goodput_fraction(&self) -> f64 {
        if self.records.is_empty() {
            0.0
        } else {
            self.good_count() as f64 / self.records.len() as f64
        }
    }

    pub fn summary(&self) -> LoadSummary {
        let (ok, http, errors) = self.outcome_counts();
        let timeouts = self
            .records
            .iter()
            .filter(|r| matches!(&r.outcome, Outcome::Error(m) if m.starts_with("timeout")))
            .count();
        LoadSummary {
            label: self.label.clone(),
            requests: self.records.len(),
            ok,
            http,
            errors,
            timeouts,
            wall_s: self.wall_s,
            offered_rate: self.offered_rate,
            request_throughput: self.request_throughput(),
            output_throughput: self.output_throughput(),
            goodput: self.goodput(),
            goodput_fraction: self.goodput_fraction(),
            slo_ttft_ms: self.slo_ttft_ms,
            slo_itl_ms: self.slo_itl_ms,
            ttft_ms: self.ttft_percentiles().map(|p| p.scaled(1e3)),
            itl_ms: self.itl_percentiles().map(|p| p.scaled(1e3)),
            e2e_ms: self.e2e_percentiles().map(|p| p.scaled(1e3)),
        }
    }

    /// A human-readable, aligned text table (ends with a newline).
    pub fn summary_table(&self) -> String {
        let s = self.summary();
        let mut out = String::new();
        let title = if s.label.is_empty() {
            "pdfleet load".to_string()
        } else {
            format!("pdfleet load [{}]", s.label)
        };
        out.push_str(&format!("{title}\n"));
        let mut outcomes = format!("{} ok", s.ok);
        for (code, n) in &s.http {
            outcomes.push_str(&format!(", {n} http {code}"));
        }
        outcomes.push_str(&format!(", {} errors", s.errors));
        if s.timeouts > 0 {
            outcomes.push_str(&format!(" ({} timeouts)", s.timeouts));
        }
        let rows: [(&str, String); 6] = [
            ("requests", format!("{} sent: {outcomes}", s.requests)),
            ("wall time", format!("{:.2} s", s.wall_s)),
            ("offered load", format!("{:.2} req/s", s.offered_rate)),
            (
                "throughput",
                format!(
                    "{:.2} req/s, {:.1} output tok/s",
                    s.request_throughput, s.output_throughput
                ),
            ),
            (
                "goodput",
                format!(
                    "{:.2} req/s ({:.1}% of requests)",
                    s.goodput,
                    100.0 * s.goodput_fraction
                ),
            ),
            (
                "SLO",
                format!(
                    "TTFT <= {} ms and mean ITL <= {} ms",
                    s.slo_ttft_ms, s.slo_itl_ms
                ),
            ),
        ];
        for (k, v) in rows {
            out.push_str(&format!("  {k:<13} {v}\n"));
        }
        // The most frequent error messages, so a failing run says why.
        let mut msgs: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &self.records {
            if let Outcome::Error(m) = &r.outcome {
                *msgs.entry(m.as_str()).or_insert(0) += 1;
            }
        }
        let mut msgs: Vec<(&str, usize)> = msgs.into_iter().collect();
        msgs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (m, n) in msgs.iter().take(3) {
            let m: String = m.chars().take(160).collect();
            out.push_str(&format!("  {:<13} {n}x {m}\n", "error"));
        }
        out.push_str(&format!(
            "  {:<13} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "latency (ms)", "n", "mean", "p50", "p90", "p99", "max"
        ));
        for (name, p) in [("TTFT", s.ttft_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)] {
            match p {
                Some(p) => out.push_str(&format!(
                    "  {:<13} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}\n",
                    name, p.n, p.mean, p.p50, p.p90, p.p99, p.max
                )),
                None => out.push_str(&format!(
                    "  {:<13} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
                    name, 0, "-", "-", "-", "-", "-"
                )),
            }
        }
        out
    }

    /// One row per request: `id,sent_at_s,prompt_tokens,max_tokens,outcome,ttft_ms,
    /// mean_itl_ms,p99_itl_ms,e2e_ms,tokens` (empty field where there is no value;
    /// outcome as in [`Outcome::csv_label`]).
    pub fn write_csv(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        let ms = |x: Option<f64>| x.map(|x| format!("{:.3}", x * 1e3)).unwrap_or_default();
        writeln!(
            w,
            "id,sent_at_s,prompt_tokens,max_tokens,outcome,ttft_ms,mean_itl_ms,p99_itl_ms,e2e_ms,tokens"
        )?;
        for r in &self.records {
            writeln!(
                w,
                "{},{:.6},{},{},{},{},{},{},{},{}",
                r.id,
                r.sent_at_s,
                r.prompt_tokens,
                r.max_tokens,
                r.outcome.csv_label(),
                ms(r.ttft_s),
                ms(r.mean_itl_s()),
                ms(r.p99_itl_s()),
                ms(r.e2e_s),
                r.tokens
            )?;
        }
        w.flush()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------

/// Shared live counters for the progress line.
#[derive(Default)]
struct Live {
    sent: AtomicUsize,
    done: AtomicUsize,
    ok: AtomicUsize,
    http: AtomicUsize,
    errors: AtomicUsize,
    ttfts: Mutex<Vec<f64>>,
}

impl Live {
    fn line(&self, total: usize, label: &str) -> String {
        let p50 = {
            let mut v = self.ttfts.lock().unwrap().clone();
            percentile_of_unsorted(&mut v, 50.0)
        };
        let p50 = p50.map_or("-".to_string(), |t| format!("{:.1} ms", t * 1e3));
        let label = if label.is_empty() {
            String::new()
        } else {
            format!("[{label}] ")
        };
        format!(
            "{label}sent {}/{total}  done {}  ok {}  http-err {}  err {}  p50 TTFT {p50}",
            self.sent.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.http.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

fn print_progress(line: &str) {
    let mut e = std::io::stderr().lock();
    // Pad so a shorter line fully overwrites a longer one.
    let _ = write!(e, "\r{line:<100}");
    let _ = e.flush();
}

/// Runs the load described by `cfg` against `cfg.url` and returns every request's
/// record. Fails only on a bad configuration; request failures are recorded.
pub async fn run_load(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    cfg.validate()?;
    let plan = plan_requests(cfg);
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs_f64(cfg.timeout_s.min(10.0)))
        .build()
        .context("building the HTTP client")?;
    let endpoint: Arc<str> = cfg.endpoint().into();
    let model: Arc<str> = cfg.model.as_str().into();
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    let live = Arc::new(Live::default());
    let total = plan.len();

    let start = tokio::time::Instant::now();
    let progress_task = cfg.progress.then(|| {
        let live = live.clone();
        let label = cfg.label.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                print_progress(&live.line(total, &label));
            }
        })
    });

    let mut handles = Vec::with_capacity(total);
    let mut meta = Vec::with_capacity(total);
    for req in plan {
        tokio::time::sleep_until(start + Duration::from_secs_f64(req.at_s)).await;
        meta.push((req.id, req.prompt.len(), req.max_tokens));
        let sent_at_s = start.elapsed().as_secs_f64();
        live.sent.fetch_add(1, Ordering::Relaxed);
        let (client, endpoint, model, live) = (
            client.clone(),
            endpoint.clone(),
            model.clone(),
            live.clone(),
        );
        handles.push(tokio::spawn(async move {
            let rec = one_request(&client, &endpoint, &model, req, sent_at_s, timeout).await;
            live.done.fetch_add(1, Ordering::Relaxed);
            match rec.outcome {
                Outcome::Ok => {
                    live.ok.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = rec.ttft_s {
                        live.ttfts.lock().unwrap().push(t);
                    }
                }
                Outcome::HttpStatus(_) => {
                    live.http.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Error(_) => {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            rec
        }));
    }

    let mut records = Vec::with_capacity(total);
    for (h, (id, prompt_tokens, max_tokens)) in handles.into_iter().zip(meta) {
        records.push(match h.await {
            Ok(r) => r,
            Err(e) => RequestRecord {
                id,
                sent_at_s: 0.0,
                prompt_tokens,
                max_tokens,
                outcome: Outcome::Error(format!("request task failed: {e}")),
                ttft_s: None,
                itl_s: Vec::new(),
                e2e_s: None,
                tokens: 0,
            },
        });
    }
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(t) = progress_task {
        t.abort();
        print_progress(&live.line(total, &cfg.label));
        eprintln!();
    }
    Ok(LoadReport {
        records,
        wall_s,
        label: cfg.label.clone(),
        offered_rate: cfg.rate,
        slo_ttft_ms: cfg.slo_ttft_ms,
        slo_itl_ms: cfg.slo_itl_ms,
    })
}

/// What a request has seen so far (kept across a timeout).
#[derive(Default)]
struct StreamState {
    ttft_s: Option<f64>,
    last_token: Option<Instant>,
    itl_s: Vec<f64>,
    tokens: usize,
    finish_reason: Option<String>,
}

impl StreamState {
    fn on_tokens(&mut self, n: usize, now: Instant, sent: Instant) {
        if n == 0 {
            return;
        }
        match self.last_token {
            None => self.ttft_s = Some((now - sent).as_secs_f64()),
            Some(prev) => {
                let gap = (now - prev).as_secs_f64() / n as f64;
                self.itl_s.extend(std::iter::repeat_n(gap, n));
            }
        }
        self.last_token = Some(now);
        self.tokens += n;
    }
}

/// Joins an error with its sources (`reqwest` puts the useful part in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

async fn stream_request(
    client: &reqwest::Client,
    endpoint: &str,
    body: &serde_json::Value,
    sent: Instant,
    st: &mut StreamState,
) -> Outcome {
    let resp = match client.post(endpoint).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Error(error_chain(&e)),
    };
    let status = resp.status();
    if !status.is_success() {
        return Outcome::HttpStatus(status.as_u16());
    }
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut ended = false;
    loop {
        let next = stream.next().await;
        let now = Instant::now();
        match next {
            Some(Ok(chunk)) => parser.push(&chunk, &mut events),
            Some(Err(e)) => return Outcome::Error(format!("reading stream: {}", error_chain(&e))),
            None => {
                parser.finish(&mut events);
                ended = true;
            }
        }
        for data in events.drain(..) {
            match parse_event(&data) {
                StreamEvent::Done => return Outcome::Ok,
                StreamEvent::Error(m) => return Outcome::Error(m),
                StreamEvent::Tokens {
                    n, finish_reason, ..
                } => {
                    st.on_tokens(n, now, sent);
                    if finish_reason.is_some() {
                        st.finish_reason = finish_reason;
                    }
                }
            }
        }
        if ended {
            return if st.finish_reason.is_some() {
                Outcome::Ok
            } else {
                Outcome::Error("stream ended before [DONE]".into())
            };
        }
    }
}

async fn one_request(
    client: &reqwest::Client,
    endpoint: &str,
    model: &str,
    req: PlannedRequest,
    sent_at_s: f64,
    timeout: Duration,
) -> RequestRecord {
    let body = serde_json::json!({
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": true,
    });
    let sent = Instant::now();
    let mut st = StreamState::default();
    let outcome = match tokio::time::timeout(
        timeout,
        stream_request(client, endpoint, &body, sent, &mut st),
    )
    .await
    {
        Ok(o) => o,
        Err(_) => Outcome::Error(format!("timeout after {} s", timeout.as_secs_f64())),
    };
    let e2e_s = outcome.is_ok().then(|| sent.elapsed().as_secs_f64());
    RequestRecord {
        id: req.id,
        sent_at_s,
        prompt_tokens: req.prompt.len(),
        max_tokens: req.max_tokens,
        outcome,
        ttft_s: st.ttft_s,
        itl_s: st.itl_s,
        e2e_s,
        tokens: st.tokens,
    }
}

// ---------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------

/// `pdfleet load`: open-loop Poisson load against a router's /v1/completions.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Base URL of the router, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
    /// Model name sent in each request
    #[arg(long, default_value = "toy")]
    pub model: String,
    /// Mean arrival rate, requests/s (Poisson, open loop; "inf" sends all at once)
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Number of requests to send
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Prompt length in tokens: N or lognormal:MEDIAN,SIGMA,MAX
    #[arg(long, default_value = "64")]
    pub prompt_len: LenDist,
    /// max_tokens per request: N or lognormal:MEDIAN,SIGMA,MAX
    #[arg(long, default_value = "32")]
    pub output_len: LenDist,
    /// Seed for arrivals, lengths and prompt tokens
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Time-to-first-token SLO, ms (goodput)
    #[arg(long, default_value_t = 500.0)]
    pub slo_ttft_ms: f64,
    /// Mean inter-token-latency SLO, ms (goodput)
    #[arg(long, default_value_t = 50.0)]
    pub slo_itl_ms: f64,
    /// Client timeout per request, seconds (whole request including the stream)
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,
    /// Write one CSV row per request here
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// No live progress line (it is also off when stderr is not a terminal)
    #[arg(long)]
    pub no_progress: bool,
    /// Label carried into the summary
    #[arg(long, default_value = "")]
    pub label: String,
}

impl LoadArgs {
    pub fn to_config(&self) -> LoadConfig {
        LoadConfig {
            url: self.url.clone(),
            model: self.model.clone(),
            rate: self.rate,
            num_requests: self.requests,
            prompt_len: self.prompt_len,
            output_len: self.output_len,
            seed: self.seed,
            slo_ttft_ms: self.slo_ttft_ms,
            slo_itl_ms: self.slo_itl_ms,
            timeout_s: self.timeout_s,
            progress: !self.no_progress && std::io::stderr().is_terminal(),
            label: self.label.clone(),
        }
    }
}

/// Runs `pdfleet load`: prints the summary table to stdout, writes the CSV if asked,
/// and returns failure when no request succeeded.
pub async fn run_cli(args: LoadArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = args.to_config();
    let report = run_load(&cfg).await?;
    print!("{}", report.summary_table());
    if let Some(path) = &args.csv {
        report.write_csv(path)?;
        eprintln!("wrote {} rows to {}", report.records.len(), path.display());
    }
    if report.ok_count() == 0 {
        eprintln!("error: every request failed");
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn feed_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out);
        }
        p.finish(&mut out);
        out
    }

    const EV1: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"toy","choices":[{"index":0,"text":"a","token_ids":[12],"finish_reason":null}]}"#;
    const EV2: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"toy","choices":[{"index":0,"text":"bc","token_ids":[3,4],"finish_reason":"length"}]}"#;

    #[test]
    fn sse_parser_handles_any_split() {
        let body =
            format!("data: {EV1}\r\n\r\n: keep-alive comment\n\ndata: {EV2}\n\ndata: [DONE]\n\n");
        let bytes = body.as_bytes();
        let want = vec![EV1.to_string(), EV2.to_string(), "[DONE]".to_string()];
        assert_eq!(feed_all(&[bytes]), want);
        // Every two-way split, including inside "\r\n" and inside "data:".
        for i in 0..=bytes.len() {
            assert_eq!(feed_all(&[&bytes[..i], &bytes[i..]]), want, "split at {i}");
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(feed_all(&singles), want);
        // Multi-line data, other fields ignored, missing final blank line tolerated.
        assert_eq!(
            feed_all(&[b"event: x\nid: 7\ndata:a\ndata: b\n\ndata: [DONE]"]),
            vec!["a\nb".to_string(), "[DONE]".to_string()]
        );
    }

    #[test]
    fn events_are_classified() {
        assert_eq!(
            parse_event(EV1),
            StreamEvent::Tokens {
                n: 1,
                finish_reason: None,
                token_ids: vec![12],
            }
        );
        assert_eq!(
            parse_event(EV2),
            StreamEvent::Tokens {
                n: 2,
                finish_reason: Some("length".into()),
                token_ids: vec![3, 4],
            }
        );
        assert_eq!(parse_event(" [DONE] "), StreamEvent::Done);
        let body = "data: {\"error\":{\"message\":\"decode worker lost\",\"type\":\"upstream_error\"}}\n\n";
        let evs = feed_all(&[&body.as_bytes()[..20], &body.as_bytes()[20..]]);
        assert_eq!(evs.len(), 1);
        assert_eq!(
            parse_event(&evs[0]),
            StreamEvent::Error("upstream_error: decode worker lost".into())
        );
        assert!(matches!(parse_event("{not json"), StreamEvent::Error(_)));
    }

    #[test]
    fn lendist_parses_and_samples() {
        assert_eq!("64".parse::<LenDist>().unwrap(), LenDist::Fixed(64));
        let d: LenDist = "lognormal:128,0.8,1024".parse().unwrap();
        assert_eq!(
            d,
            LenDist::LogNormal {
                median: 128.0,
                sigma: 0.8,
                max: 1024
            }
        );
        assert_eq!(d.to_string().parse::<LenDist>().unwrap(), d);
        for bad in [
            "",
            "0",
            "-3",
            "abc",
            "lognormal:",
            "lognormal:128,0.8",
            "lognormal:0,0.8,10",
            "lognormal:128,-1,10",
            "lognormal:128,0.8,0",
            "lognormal:128,x,10",
            "normal:1,2,3",
        ] {
            let e = bad.parse::<LenDist>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }

        let d = LenDist::LogNormal {
            median: 100.0,
            sigma: 1.0,
            max: 300,
        };
        let draw = |seed| {
            let mut r = SplitMix64::new(seed);
            (0..20_000).map(|_| d.sample(&mut r)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7), "same seed, same samples");
        assert_ne!(a, draw(8));
        assert!(a.iter().all(|&x| (1..=300).contains(&x)));
        assert!(a.contains(&300), "the tail is clamped to max");
        let mut s = a.clone();
        s.sort();
        let median = s[s.len() / 2] as f64;
        assert!((median - 100.0).abs() < 5.0, "median {median}");
    }

    #[test]
    fn poisson_arrivals_have_the_right_mean() {
        let cfg = LoadConfig {
            rate: 50.0,
            num_requests: 20_000,
            prompt_len: LenDist::Fixed(1),
            output_len: LenDist::Fixed(1),
            seed: 3,
            ..LoadConfig::default()
        };
        let plan = plan_requests(&cfg);
        assert_eq!(plan, plan_requests(&cfg));
        let gaps: Vec<f64> = std::iter::once(plan[0].at_s)
            .chain(plan.windows(2).map(|w| w[1].at_s - w[0].at_s))
            .collect();
        assert!(gaps.iter().all(|&g| g >= 0.0));
        let n = gaps.len() as f64;
        let mean = gaps.iter().sum::<f64>() / n;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n).sqrt();
        // Standard error of the mean is 0.02 / sqrt(20000) = 1.4e-4; allow ~7 of them.
        assert!((mean - 0.02).abs() < 0.001, "mean gap {mean}");
        assert!(
            (sd / mean - 1.0).abs() < 0.05,
            "coefficient of variation {}",
            sd / mean
        );
        // Prompt token ids are within the vocabulary.
        let cfg = LoadConfig {
            num_requests: 50,
            prompt_len: "lognormal:32,0.5,64".parse().unwrap(),
            ..cfg
        };
        for r in plan_requests(&cfg) {
            assert!((1..=64).contains(&r.prompt.len()));
            assert!(r.prompt.iter().all(|&t| (t as u64) < VOCAB));
        }
    }

    #[test]
    fn goodput_uses_ttft_and_mean_itl() {
        let rec = |outcome, ttft: f64, itl: Vec<f64>| RequestRecord {
            id: 0,
            sent_at_s: 0.0,
            prompt_tokens: 1,
            max_tokens: 1,
            outcome,
            ttft_s: Some(ttft),
            tokens: itl.len() + 1,
            itl_s: itl,
            e2e_s: Some(1.0),
        };
        let report = LoadReport {
            records: vec![
                rec(Outcome::Ok, 0.1, vec![0.01, 0.09]), // mean 50 ms: good
                rec(Outcome::Ok, 0.6, vec![0.01]),       // TTFT too slow
                rec(Outcome::Ok, 0.1, vec![0.06, 0.06]), // ITL too slow
                rec(Outcome::Ok, 0.1, vec![]),           // one token: good
                rec(Outcome::Error("x".into()), 0.1, vec![]),
            ],
            wall_s: 2.0,
            label: String::new(),
            offered_rate: 1.0,
            slo_ttft_ms: 500.0,
            slo_itl_ms: 50.0,
        };
        assert_eq!(report.good_count(), 2);
        assert!((report.goodput() - 1.0).abs() < 1e-12);
        assert!((report.goodput_fraction() - 0.4).abs() < 1e-12);
        assert_eq!(report.itl_percentiles().unwrap().n, 5);
        let p = Percentiles::of(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!((p.p50, p.max, p.mean), (3.0, 5.0, 3.0));
        assert!((p.p90 - 4.6).abs() < 1e-12);
    }

    /// A tiny HTTP/1.1 server standing in for the router. By the prompt's first token
    /// id `f`: f < 25 → 429; 25 <= f < 30 → two tokens then an error event;
    /// 30 <= f < 33 → headers then silence (client timeout); else `max_tokens` tokens,
    /// the first after 20 ms, then one per 5 ms, the last event carrying two tokens,
    /// with writes split mid-event.
    async fn fake_router() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(sock));
            }
        });
        format!("http://{addr}/")
    }

    async fn serve(mut sock: TcpStream) {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let head_end = loop {
            let n = sock.read(&mut tmp).await.unwrap();
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&tmp[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        assert!(head.starts_with("post /v1/completions "), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        while buf.len() < head_end + len {
            let n = sock.read(&mut tmp).await.unwrap();
            buf.extend_from_slice(&tmp[..n]);
        }
        let req: serde_json::Value = serde_json::from_slice(&buf[head_end..]).unwrap();
        assert_eq!(req["model"], "toy");
        assert_eq!(req["stream"], true);
        let first = req["prompt"][0].as_u64().unwrap();
        let max_tokens = req["max_tokens"].as_u64().unwrap() as usize;

        if first < 25 {
            let body = r#"{"error":{"message":"busy","type":"rate_limited"}}"#;
            let resp = format!(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            return;
        }
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let ev = |ids: &[usize], finish: Option<&str>| {
            let v = serde_json::json!({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "toy",
                "choices": [{"index": 0, "text": "t", "token_ids": ids, "finish_reason": finish}]});
            format!("data: {v}\n\n")
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        if (30..33).contains(&first) {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let mut out: Vec<String> = Vec::new();
        if (25..30).contains(&first) {
            out.push(ev(&[1], None));
            out.push(ev(&[2], None));
            out.push(
                "data: {\"error\":{\"message\":\"decode worker lost\",\"type\":\"upstream_error\"}}\n\n"
                    .into(),
            );
        } else {
            let mut i = 0;
            while i < max_tokens {
                let k = if max_tokens - i == 2 { 2 } else { 1 };
                let ids: Vec<usize> = (i..i + k).collect();
                i += k;
                out.push(ev(&ids, (i == max_tokens).then_some("length")));
            }
            out.push("data: [DONE]\n\n".into());
        }
        for (j, e) in out.iter().enumerate() {
            if j > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (a, b) = e.as_bytes().split_at(e.len() / 2);
            if sock.write_all(a).await.is_err() || sock.flush().await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
            if sock.write_all(b).await.is_err() {
                return;
            }
        }
        let _ = sock.shutdown().await;
    }

    #[tokio::test]
    async fn end_to_end_against_a_fake_router() {
        let url = fake_router().await;
        let cfg = LoadConfig {
            url,
            rate: 400.0,
            num_requests: 40,
            prompt_len: "lognormal:16,0.5,64".parse().unwrap(),
            output_len: LenDist::Fixed(5),
            seed: 11,
            slo_ttft_ms: 10_000.0,
            slo_itl_ms: 10_000.0,
            timeout_s: 0.7,
            label: "test".into(),
            ..LoadConfig::default()
        };
        let plan = plan_requests(&cfg);
        let class = |f: u32| match f {
            0..25 => "429",
            25..30 => "err",
            30..33 => "hang",
            _ => "ok",
        };
        let want = |c: &str| plan.iter().filter(|r| class(r.prompt[0]) == c).count();
        let (want_ok, want_429, want_err, want_hang) =
            (want("ok"), want("429"), want("err"), want("hang"));
        assert!(want_ok > 10 && want_429 > 0 && want_err > 0 && want_hang > 0);

        let report = run_load(&cfg).await.unwrap();
        assert_eq!(report.records.len(), 40);
        let (ok, http, errors) = report.outcome_counts();
        assert_eq!(ok, want_ok);
        assert_eq!(http.get(&429).copied().unwrap_or(0), want_429);
        assert_eq!(http.len(), 1);
        assert_eq!(errors, want_err + want_hang);
        assert_eq!(report.summary().timeouts, want_hang);
        assert!(
            report.wall_s >= 0.7 && report.wall_s < 2.5,
            "{}",
            report.wall_s
        );

        for (r, p) in report.records.iter().zip(&plan) {
            assert_eq!(
                (r.id, r.prompt_tokens, r.max_tokens),
                (p.id, p.prompt.len(), 5)
            );
            match class(p.prompt[0]) {
                "ok" => {
                    assert_eq!(r.outcome, Outcome::Ok);
                    assert_eq!(r.tokens, 5);
                    assert!(r.ttft_s.unwrap() >= 0.019, "{r:?}");
                    // Events of 1, 1, 1, 2 tokens: the first is TTFT, then 1 + 1 + 2 gaps.
                    assert_eq!(r.itl_s.len(), 4);
                    assert!(r.itl_s.iter().all(|&g| g >= 0.0), "{r:?}");
                    // The server sleeps 20 ms, then 5 ms before each of 4 more events.
                    assert!(r.e2e_s.unwrap() >= 0.039, "{r:?}");
                }
                "429" => assert_eq!(r.outcome, Outcome::HttpStatus(429)),
                "err" => {
                    assert_eq!(
                        r.outcome,
                        Outcome::Error("upstream_error: decode worker lost".into())
                    );
                    assert_eq!(r.tokens, 2);
                    assert!(r.ttft_s.is_some() && r.e2e_s.is_none());
                }
                _ => assert!(
                    matches!(&r.outcome, Outcome::Error(m) if m.starts_with("timeout")),
                    "{r:?}"
                ),
            }
        }
        let ttft = report.ttft_percentiles().unwrap();
        assert_eq!(ttft.n, want_ok);
        assert!(ttft.p50 >= 0.019 && ttft.p50 < 0.4);
        let itl = report.itl_percentiles().unwrap();
        assert_eq!(itl.n, want_ok * 4);
        // Gaps are 5 ms (2.5 ms for the two-token event) unless the machine stalls.
        assert!(itl.p50 > 0.001, "{itl:?}");
        assert!(report.output_throughput() > 0.0);
        assert_eq!(report.good_count(), want_ok);

        let table = report.summary_table();
        assert!(
            table.contains("TTFT") && table.contains("http 429"),
            "{table}"
        );

        let path =
            std::env::temp_dir().join(format!("pdfleet-load-test-{}.csv", std::process::id()));
        report.write_csv(&path).unwrap();
        let csv = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 41);
        assert!(lines[0].starts_with("id,sent_at_s,prompt_tokens,max_tokens,outcome,ttft_ms"));
        assert!(lines.iter().all(|l| l.split(',').count() == 10), "{csv}");
        assert_eq!(lines.iter().filter(|l| l.contains(",ok,")).count(), want_ok);
        assert_eq!(
            lines.iter().filter(|l| l.contains(",http_429,")).count(),
            want_429
        );
    }

    #[tokio::test]
    async fn connection_refused_is_recorded_not_fatal() {
        // Bind then drop to get a port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = LoadConfig {
            url: format!("http://127.0.0.1:{port}"),
            rate: f64::INFINITY,
            num_requests: 3,
            timeout_s: 1.0,
            ..LoadConfig::default()
        };
        let report = run_load(&cfg).await.unwrap();
        assert_eq!(report.ok_count(), 0);
        assert!(report
            .records
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Error(_))));
        assert!(report.ttft_percentiles().is_none());
        assert!(report.summary_table().contains("3 errors"));
        assert!(run_load(&LoadConfig { rate: 0.0, ..cfg }).await.is_err());
    }
}
