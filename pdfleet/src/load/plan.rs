//! The deterministic schedule of a run: arrival times and request shapes, from the seed.

use std::fmt;
use std::str::FromStr;

use anyhow::bail;
use pdfleet_api::rng::SplitMix64;
use serde::Serialize;

use super::config::VOCAB;
use super::LoadConfig;

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
                let x = median * (sigma * rng.normal()).exp();
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
    if let Some(schedule) = &cfg.schedule {
        // Replayed: the schedule's times and lengths, prompt tokens drawn from the seed.
        return schedule
            .iter()
            .enumerate()
            .map(|(id, r)| PlannedRequest {
                id,
                at_s: r.at_s,
                prompt: (0..r.prompt).map(|_| shapes.below(VOCAB) as u32).collect(),
                max_tokens: r.output as usize,
            })
            .collect();
    }
    let mut t = 0.0;
    (0..cfg.num_requests)
        .map(|id| {
            t += arrivals.exp(cfg.rate);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceRequest;

    #[test]
    fn a_schedule_is_replayed_with_its_times_and_lengths() {
        let schedule = vec![
            TraceRequest {
                at_s: 0.5,
                prompt: 3,
                output: 7,
            },
            TraceRequest {
                at_s: 2.0,
                prompt: 40,
                output: 1,
            },
        ];
        let cfg = LoadConfig {
            schedule: Some(schedule.clone()),
            num_requests: 99,
            ..Default::default()
        };
        let plan = plan_requests(&cfg);
        assert_eq!(plan.len(), 2);
        for (p, s) in plan.iter().zip(&schedule) {
            assert_eq!(
                (p.at_s, p.prompt.len(), p.max_tokens),
                (s.at_s, s.prompt as usize, s.output as usize)
            );
            assert!(p.prompt.iter().all(|&t| (t as u64) < VOCAB));
        }
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
}
