//! The SLO autoscaler: reads the pool's TTFT and ITL at the SLO's quantile from Prometheus (as
//! the router measured them, i.e. as users feel them) and moves replicas one step at a time:
//! TTFT over target adds a prefill worker, ITL over target a decode worker (both drive unified
//! workers); well under target (half) removes one, after the stabilisation windows.

use std::time::Duration;

use pdfleet_api::metrics::{self, router};
use pdfleet_api::Role;
use pdfleet_crds::{AutoscalingSpec, SloSpec};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observed {
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
}

/// The PromQL for a router latency histogram at quantile `q`, in milliseconds.
pub fn query(histogram: &str, namespace: &str, pool: &str, q: f64) -> String {
    format!(
        "1000 * histogram_quantile({q}, sum by (le) (rate({}{{namespace=\"{namespace}\",pool=\"{pool}\"}}[2m])))",
        metrics::bucket(histogram)
    )
}

/// The single value of an instant-query answer; none when there is no data (or NaN).
pub fn scalar(body: &serde_json::Value) -> Option<f64> {
    let v = body["data"]["result"].get(0)?["value"]
        .get(1)?
        .as_str()?
        .parse::<f64>()
        .ok()?;
    v.is_finite().then_some(v)
}

pub async fn observe(
    client: &reqwest::Client,
    url: &str,
    namespace: &str,
    pool: &str,
    q: f64,
) -> Result<Observed, reqwest::Error> {
    let mut out = Observed::default();
    for (metric, slot) in [
        (router::TTFT, &mut out.ttft_ms),
        (router::ITL, &mut out.itl_ms),
    ] {
        let body: serde_json::Value = client
            .get(format!("{}/api/v1/query", url.trim_end_matches('/')))
            .query(&[("query", query(metric, namespace, pool, q))])
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .json()
            .await?;
        *slot = scalar(&body);
    }
    Ok(out)
}

/// One role's scaling step.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub current: i32,
    pub min: i32,
    pub max: i32,
    pub observed_ms: Option<f64>,
    pub target_ms: f64,
    /// Seconds since this pool last changed its replicas.
    pub since_change_s: f64,
}

pub fn decide(step: Step, a: &AutoscalingSpec) -> i32 {
    let Some(observed) = step.observed_ms else {
        return step.current.clamp(step.min, step.max);
    };
    let next = if observed > step.target_ms
        && step.since_change_s >= a.scale_up_stabilization_seconds as f64
    {
        step.current + 1
    } else if observed < step.target_ms / 2.0
        && step.since_change_s >= a.scale_down_stabilization_seconds as f64
    {
        step.current - 1
    } else {
        step.current
    };
    next.clamp(step.min, step.max)
}

/// The SLO target that drives a role: TTFT for prefill, ITL for decode, the tighter of the two
/// (relative to its target) for unified workers.
pub fn driver(role: Role, slo: &SloSpec, seen: &Observed) -> (Option<f64>, f64) {
    match role {
        Role::Prefill => (seen.ttft_ms, slo.ttft_ms as f64),
        Role::Decode => (seen.itl_ms, slo.itl_ms as f64),
        Role::Unified => {
            let ttft = seen.ttft_ms.map(|v| v / slo.ttft_ms as f64);
            let itl = seen.itl_ms.map(|v| v / slo.itl_ms as f64);
            // Express the worse ratio against a target of 1.
            (ttft.into_iter().chain(itl).reduce(f64::max), 1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AutoscalingSpec {
        AutoscalingSpec {
            enabled: true,
            prometheus_url: "http://prometheus:9090".into(),
            interval_seconds: 15,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
        }
    }

    fn step(observed: Option<f64>, since: f64) -> Step {
        Step {
            current: 2,
            min: 1,
            max: 3,
            observed_ms: observed,
            target_ms: 100.0,
            since_change_s: since,
        }
    }

    #[test]
    fn scales_up_over_target_down_well_under_it_within_bounds() {
        let a = spec();
        assert_eq!(decide(step(Some(150.0), 0.0), &a), 3);
        assert_eq!(
            decide(
                Step {
                    current: 3,
                    ..step(Some(150.0), 0.0)
                },
                &a
            ),
            3,
            "never above max"
        );
        assert_eq!(
            decide(step(Some(80.0), 1000.0), &a),
            2,
            "under target but not by half: hold"
        );
        assert_eq!(
            decide(step(Some(30.0), 100.0), &a),
            2,
            "inside the scale-down window: hold"
        );
        assert_eq!(decide(step(Some(30.0), 400.0), &a), 1);
        assert_eq!(
            decide(
                Step {
                    current: 1,
                    ..step(Some(30.0), 400.0)
                },
                &a
            ),
            1,
            "never below min"
        );
        assert_eq!(decide(step(None, 400.0), &a), 2, "no data: hold");
    }

    #[test]
    fn reads_prometheus_answers() {
        let ok = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "42.5"]}]}});
        assert_eq!(scalar(&ok), Some(42.5));
        let nan = serde_json::json!({"data": {"result": [{"value": [1.0, "NaN"]}]}});
        assert_eq!(scalar(&nan), None);
        assert_eq!(scalar(&serde_json::json!({"data": {"result": []}})), None);
        let q = query(router::TTFT, "ml", "chat", 0.99);
        assert!(
            q.contains(
                r#"pdfleet_router_time_to_first_token_seconds_bucket{namespace="ml",pool="chat"}"#
            ),
            "{q}"
        );
    }

    #[test]
    fn unified_workers_follow_the_worse_of_ttft_and_itl() {
        let slo = SloSpec {
            ttft_ms: 500,
            itl_ms: 50,
            quantile: 0.99,
        };
        let seen = Observed {
            ttft_ms: Some(250.0),
            itl_ms: Some(75.0),
        };
        assert_eq!(driver(Role::Unified, &slo, &seen), (Some(1.5), 1.0));
        assert_eq!(driver(Role::Prefill, &slo, &seen), (Some(250.0), 500.0));
    }
}
