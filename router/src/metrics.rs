//! The router's Prometheus metrics: latencies as users feel them, labelled with pool and pod.
//! Names are the contract crate's ([`pdfleet_api::metrics::router`]).

use pdfleet_api::labels;
use pdfleet_api::metrics::{self, latency_buckets, router as names, TtftPart};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct RouterMetrics {
    registry: Registry,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub requests: IntCounterVec,
    pub inflight: IntGauge,
    pub kv_transfer_seconds: Histogram,
    pub retries: IntCounterVec,
    pub arrivals: IntCounter,
    pub prompt_tokens: IntCounter,
    pub requested_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    ttft_parts: HistogramVec,
    slo: Option<Slo>,
    slo_requests: IntCounterVec,
}

/// The pool's latency targets, in seconds: a request meets them when its time to first token
/// and its mean inter-token latency are both within.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    pub ttft_s: f64,
    pub itl_s: Option<f64>,
}

/// How one request fared against each target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ttft: bool,
    pub itl: bool,
}

impl Verdict {
    pub const MISSED: Verdict = Verdict {
        ttft: false,
        itl: false,
    };
}

impl Slo {
    pub fn judge(&self, ttft_s: f64, mean_itl_s: Option<f64>) -> Verdict {
        Verdict {
            ttft: ttft_s <= self.ttft_s,
            itl: match (self.itl_s, mean_itl_s) {
                (Some(target), Some(itl)) => itl <= target,
                _ => true,
            },
        }
    }
}

/// Where one disaggregated request's time to first token went, in seconds.
pub struct TtftSplit {
    pub queue: f64,
    pub prefill: f64,
    pub transfer: f64,
    pub admission: f64,
}

impl RouterMetrics {
    pub fn new(pool: &str, pod: &str, slo: Option<Slo>) -> Self {
        let registry = metrics::registry(pool, labels::ROUTER, pod);
        let hist = |name: &str, help: &str| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
                .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let ttft_parts = HistogramVec::new(
            HistogramOpts::new(
                names::TTFT_PART,
                "Where the time to first token went: queue, prefill, transfer, admission",
            )
            .buckets(latency_buckets()),
            &["part"],
        )
        .expect("valid histogram");
        registry
            .register(Box::new(ttft_parts.clone()))
            .expect("unique metric");
        let slo_requests = IntCounterVec::new(
            Opts::new(
                names::SLO_REQUESTS,
                "Requests judged against the pool's SLO, per target: met or missed",
            ),
            &["target", "result"],
        )
        .expect("valid counter");
        registry
            .register(Box::new(slo_requests.clone()))
            .expect("unique metric");
        if slo.is_some() {
            // Every series exists from the start, so a ratio is defined before the first miss.
            for target in ["ttft", "itl", "both"] {
                for result in ["met", "missed"] {
                    slo_requests.with_label_values(&[target, result]);
                }
            }
        }
        let inflight =
            IntGauge::new(names::INFLIGHT, "Requests being served").expect("valid gauge");
        registry
            .register(Box::new(inflight.clone()))
            .expect("unique metric");
        RouterMetrics {
            ttft: hist(names::TTFT, "From the request's arrival to its first token"),
            itl: hist(names::ITL, "Between successive tokens sent to the client"),
            e2e: hist(names::E2E, "From the request's arrival to its last token"),
            kv_transfer_seconds: hist(
                names::KV_TRANSFER_SECONDS,
                "Prefill to decode KV transfer, as the prefill worker reports it",
            ),
            requests: counter_vec(names::REQUESTS, "Requests by outcome", "outcome"),
            retries: counter_vec(
                names::RETRIES,
                "Requests sent again to another worker, by the role replaced",
                "role",
            ),
            arrivals: counter(
                names::ARRIVALS,
                "Valid requests, on arrival (refused included)",
            ),
            prompt_tokens: counter(names::PROMPT_TOKENS, "Prompt tokens of arriving requests"),
            requested_tokens: counter(
                names::REQUESTED_TOKENS,
                "max_tokens asked for by arriving requests",
            ),
            generated_tokens: counter(names::GENERATED_TOKENS, "Tokens sent to clients"),
            ttft_parts,
            inflight,
            registry,
            slo,
            slo_requests,
        }
    }

    pub fn slo(&self) -> Option<Slo> {
        self.slo
    }

    /// Counts a request as meeting each target or not (nothing without targets).
    pub fn judged(&self, v: Verdict) {
        if self.slo.is_none() {
            return;
        }
        for (target, met) in [("ttft", v.ttft), ("itl", v.itl), ("both", v.ttft && v.itl)] {
            let result = if met { "met" } else { "missed" };
            self.slo_requests.with_label_values(&[target, result]).inc();
        }
    }

    pub fn ttft_split(&self, split: &TtftSplit) {
        for part in TtftPart::ALL {
            let v = match part {
                TtftPart::Queue => split.queue,
                TtftPart::Prefill => split.prefill,
                TtftPart::Transfer => split.transfer,
                TtftPart::Admission => split.admission,
            };
            self.ttft_parts
                .with_label_values(&[part.as_str()])
                .observe(v.max(0.0));
        }
    }

    pub fn encode(&self) -> String {
        metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_judged_by_their_first_token_and_mean_gap() {
        let slo = Slo {
            ttft_s: 0.5,
            itl_s: Some(0.05),
        };
        let v = |ttft, itl| {
            let v = slo.judge(ttft, itl);
            (v.ttft, v.itl)
        };
        assert_eq!(v(0.5, Some(0.05)), (true, true));
        assert_eq!(v(0.51, Some(0.01)), (false, true), "late first token");
        assert_eq!(v(0.1, Some(0.06)), (true, false), "slow stream");
        assert_eq!(v(0.1, None), (true, true), "one token: no gap to judge");
        let no_itl = Slo {
            ttft_s: 0.5,
            itl_s: None,
        };
        assert!(no_itl.judge(0.2, Some(9.0)).itl);

        // The value of a series (label order is the registry's).
        let count = |m: &RouterMetrics, target: &str, result: &str| -> Option<u64> {
            m.encode()
                .lines()
                .find(|l| {
                    l.starts_with("pdfleet_router_slo_requests_total{")
                        && l.contains(&format!("target=\"{target}\""))
                        && l.contains(&format!("result=\"{result}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        };
        let m = RouterMetrics::new("chat", "router-0", Some(slo));
        assert_eq!(
            count(&m, "both", "missed"),
            Some(0),
            "every series exists before any request"
        );
        m.judged(slo.judge(0.1, Some(0.01)));
        m.judged(slo.judge(0.9, Some(0.01)));
        m.judged(Verdict::MISSED);
        let counts: Vec<_> = ["ttft", "itl", "both"]
            .iter()
            .map(|t| {
                (
                    count(&m, t, "met").unwrap(),
                    count(&m, t, "missed").unwrap(),
                )
            })
            .collect();
        assert_eq!(counts, [(1, 2), (2, 1), (1, 2)]);
        let without = RouterMetrics::new("chat", "router-0", None);
        without.judged(Verdict::MISSED);
        assert_eq!(
            count(&without, "both", "met"),
            None,
            "no targets, no series"
        );
    }
}
