//! What a run measured: one record per request, percentiles, throughput, goodput, CSV.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use std::io::Write;

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

pub(super) fn percentile_of_unsorted(v: &mut [f64], p: f64) -> Option<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
