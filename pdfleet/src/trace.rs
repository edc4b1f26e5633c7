//! Requests to simulate (or send): read from the public traces' formats (Azure LLM inference CSV,
//! Mooncake JSONL), or generated in a shape (step, ramp, diurnal, burst), then time-compressed
//! and length-scaled as an experiment asks.

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context};
use pdfleet_api::rng::SplitMix64;

/// One request: when it arrives (seconds from the start) and its lengths in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TraceRequest {
    pub at_s: f64,
    pub prompt: u32,
    pub output: u32,
}

/// A generated arrival-rate shape, as a factor of the base rate over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Base rate for the first third, three times it after.
    Step,
    /// From the base rate to four times it, linearly.
    Ramp,
    /// A day compressed into the run: the base rate swinging +-80% (one period).
    Diurnal,
    /// The base rate, with a five-fold burst of 60 s every 10 minutes.
    Burst,
}

impl Shape {
    /// The rate factor at `t` of a run of `duration` seconds.
    pub fn factor(self, t: f64, duration: f64) -> f64 {
        match self {
            Shape::Step => {
                if t < duration / 3.0 {
                    1.0
                } else {
                    3.0
                }
            }
            Shape::Ramp => 1.0 + 3.0 * t / duration,
            Shape::Diurnal => {
                1.0 + 0.8
                    * (std::f64::consts::TAU * t / duration - std::f64::consts::FRAC_PI_2).sin()
            }
            Shape::Burst => {
                if t % 600.0 >= 300.0 && t % 600.0 < 360.0 {
                    5.0
                } else {
                    1.0
                }
            }
        }
    }

    /// When the load changes sharply (steps and burst edges), for recovery times.
    pub fn steps(self, duration: f64) -> Vec<f64> {
        match self {
            Shape::Step => vec![duration / 3.0],
            Shape::Burst => (0..)
                .map(|k| 600.0 * k as f64 + 300.0)
                .take_while(|&t| t < duration)
                .collect(),
            Shape::Ramp | Shape::Diurnal => Vec::new(),
        }
    }
}

/// Lengths of generated requests: log-normal by median and spread, capped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lengths {
    pub prompt_median: f64,
    pub output_median: f64,
    pub sigma: f64,
    pub max_prompt: u32,
    pub max_output: u32,
}

/// Poisson arrivals at `base_rate` times the shape's factor (by thinning), for `duration` s.
pub fn generate(
    shape: Shape,
    base_rate: f64,
    duration: f64,
    lengths: Lengths,
    seed: u64,
) -> Vec<TraceRequest> {
    let mut arrivals = SplitMix64::new(seed ^ 0xA771_7A15);
    let mut sizes = SplitMix64::new(seed ^ 0x5A1E_5000);
    let peak = base_rate
        * (0..=1000)
            .map(|i| shape.factor(duration * i as f64 / 1000.0, duration))
            .fold(0.0, f64::max);
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += arrivals.exp(peak);
        if t >= duration {
            break;
        }
        if arrivals.next_f64() * peak > base_rate * shape.factor(t, duration) {
            continue;
        }
        let draw = |median: f64, max: u32, r: &mut SplitMix64| {
            ((median * (lengths.sigma * r.normal()).exp()).round() as u32).clamp(1, max)
        };
        out.push(TraceRequest {
            at_s: t,
            prompt: draw(lengths.prompt_median, lengths.max_prompt, &mut sizes),
            output: draw(lengths.output_median, lengths.max_output, &mut sizes),
        });
    }
    out
}

/// The formats of `../shared/traces/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `TIMESTAMP,ContextTokens,GeneratedTokens` with wall-clock timestamps.
    AzureCsv,
    /// One JSON object a line: `timestamp` (ms), `input_length`, `output_length`.
    MooncakeJsonl,
}

impl FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "azure" => Ok(Format::AzureCsv),
            "mooncake" => Ok(Format::MooncakeJsonl),
            other => bail!("unknown trace format {other:?}: azure or mooncake"),
        }
    }
}

/// Seconds since midnight of an Azure timestamp `2023-11-16 18:15:46.6805900` (the traces span
/// one hour of one day).
fn azure_seconds(ts: &str) -> Option<f64> {
    let time = ts.split_whitespace().nth(1)?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

pub fn read(path: &Path, format: Option<Format>) -> anyhow::Result<Vec<TraceRequest>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let format = match format {
        Some(f) => f,
        None if path.extension().is_some_and(|e| e == "jsonl") => Format::MooncakeJsonl,
        None => Format::AzureCsv,
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || format!("{}:{}: {line:?}", path.display(), i + 1);
        match format {
            Format::AzureCsv => {
                if i == 0 && line.starts_with("TIMESTAMP") {
                    continue;
                }
                let f: Vec<&str> = line.split(',').collect();
                if f.len() < 3 {
                    bail!(
                        "{}: expected TIMESTAMP,ContextTokens,GeneratedTokens",
                        bad()
                    );
                }
                out.push(TraceRequest {
                    at_s: azure_seconds(f[0]).with_context(bad)?,
                    prompt: f[1].trim().parse().with_context(bad)?,
                    output: f[2].trim().parse().with_context(bad)?,
                });
            }
            Format::MooncakeJsonl => {
                let v: serde_json::Value = serde_json::from_str(line).with_context(bad)?;
                let num = |k: &str| v[k].as_f64().with_context(|| format!("{}: no {k}", bad()));
                out.push(TraceRequest {
                    at_s: num("timestamp")? / 1000.0,
                    prompt: num("input_length")? as u32,
                    output: num("output_length")? as u32,
                });
            }
        }
    }
    if out.is_empty() {
        bail!("{} holds no requests", path.display());
    }
    out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let t0 = out[0].at_s;
    for r in &mut out {
        r.at_s -= t0;
    }
    Ok(out)
}

/// Compresses time (`time_scale` 2: twice the rate), scales lengths, caps them to the model's
/// context (`max_seq_len`) and keeps `[0, duration)` of the result.
pub fn rescale(
    trace: &[TraceRequest],
    time_scale: f64,
    length_scale: f64,
    max_seq_len: u32,
    duration: Option<f64>,
) -> Vec<TraceRequest> {
    trace
        .iter()
        .map(|r| {
            let output =
                ((r.output as f64 * length_scale).round() as u32).clamp(1, max_seq_len / 2);
            let prompt =
                ((r.prompt as f64 * length_scale).round() as u32).clamp(1, max_seq_len - output);
            TraceRequest {
                at_s: r.at_s / time_scale,
                prompt,
                output,
            }
        })
        .filter(|r| duration.is_none_or(|d| r.at_s < d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_and_mooncake_lines_are_read_and_start_at_zero() {
        let dir = std::env::temp_dir().join(format!("pdfleet-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("a.csv");
        std::fs::write(
            &csv,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n2023-11-16 18:15:50.0,396,109\n",
        )
        .unwrap();
        let t = read(&csv, None).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].at_s, t[0].prompt, t[0].output), (0.0, 374, 44));
        assert!((t[1].at_s - 3.5).abs() < 1e-9);
        let jsonl = dir.join("m.jsonl");
        std::fs::write(
            &jsonl,
            "{\"timestamp\": 1000, \"input_length\": 9000, \"output_length\": 5, \"hash_ids\": [0]}\n{\"timestamp\": 3000, \"input_length\": 10, \"output_length\": 2}\n",
        )
        .unwrap();
        let t = read(&jsonl, None).unwrap();
        assert_eq!((t[1].at_s, t[0].prompt), (2.0, 9000));
        let r = rescale(&t, 2.0, 0.5, 2048, None);
        assert_eq!((r[1].at_s, r[0].prompt, r[0].output), (1.0, 2045, 3));
        assert!(read(&csv.with_extension("nope"), None).is_err());
    }

    #[test]
    fn shapes_follow_their_rate() {
        let lengths = Lengths {
            prompt_median: 100.0,
            output_median: 10.0,
            sigma: 0.5,
            max_prompt: 1000,
            max_output: 100,
        };
        let t = generate(Shape::Step, 10.0, 3000.0, lengths, 1);
        let before = t.iter().filter(|r| r.at_s < 1000.0).count() as f64 / 1000.0;
        let after = t.iter().filter(|r| r.at_s >= 1000.0).count() as f64 / 2000.0;
        assert!(
            (before - 10.0).abs() < 1.0 && (after - 30.0).abs() < 2.0,
            "{before} {after}"
        );
        assert_eq!(
            generate(Shape::Diurnal, 5.0, 600.0, lengths, 3),
            generate(Shape::Diurnal, 5.0, 600.0, lengths, 3)
        );
    }
}
