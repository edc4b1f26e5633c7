//! The planner's signals from Prometheus: demand at the router (refused requests included),
//! each role's load and measured capacity from its workers, and the latencies users felt, with
//! the time to first token split into its parts. The same windows as `pdfleet simulate` uses.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use pdfleet_api::metrics::{bucket, count, router, sum, worker};
use pdfleet_api::Role;
use pdfleet_planner::{Demand, RoleSignals, Signals, StepSums, TtftParts};

use super::prometheus::{PromError, Prometheus, Sample};

/// Rates are taken over this window, quantiles over `QUANTILE_WINDOW`.
pub const RATE_WINDOW: &str = "1m";
/// Demand is its rate over `RATE_WINDOW`, or over this many seconds when that is
/// significantly higher ([`Demand::from_windows`]): a rate over a minute lags a rise by most of
/// the minute. It needs two scrapes within it (a scrape interval of 10 s or less); without,
/// the minute's rate stands alone. `pdfleet simulate` reads its demand the same way.
pub const SHORT_RATE_WINDOW_S: u32 = 20;
pub const QUANTILE_WINDOW: &str = "2m";
/// The prompt rate's short-term peak: the highest 15 s rate over the last 5 minutes.
const PEAK: (&str, &str) = ("15s", "5m");

/// Which pool, and what the cluster says of its roles.
pub struct PoolView<'a> {
    pub namespace: &'a str,
    pub pool: &'a str,
    pub quantile: f64,
    pub block_size: f64,
    /// Prefill (unified, colocated) first, then decode when disaggregated: replicas asked
    /// for, ready, and whether a rollout is under way.
    pub roles: Vec<(Role, RoleSignals)>,
}

/// One query's meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Q {
    Arrivals,
    PromptTokens,
    RequestedTokens,
    /// The same over the short window.
    Recent(Recent),
    PeakPromptTokens,
    Ttft,
    Itl,
    TtftParts,
    TransferSum,
    TransferCount,
    Role(Role, RoleQ),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Recent {
    Arrivals,
    PromptTokens,
    RequestedTokens,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum RoleQ {
    PrefillTokens,
    PrefillBusy,
    Busy,
    Backlog,
    Running,
    StepN,
    StepBatch,
    StepSeconds,
    StepBatchSq,
    StepBatchSeconds,
    KvUsed,
    KvTotal,
    Refusals,
}

fn queries(v: &PoolView) -> Vec<(Q, String)> {
    let sel = format!("namespace=\"{}\",pool=\"{}\"", v.namespace, v.pool);
    let rate = |m: &str, sel: &str| format!("sum(rate({m}{{{sel}}}[{RATE_WINDOW}]))");
    let recent = |m: &str| format!("sum(rate({m}{{{sel}}}[{SHORT_RATE_WINDOW_S}s]))");
    let quantile = |m: &str, by: &str| {
        format!(
            "histogram_quantile({}, sum by (le{by}) (rate({}{{{sel}}}[{QUANTILE_WINDOW}])))",
            v.quantile,
            bucket(m)
        )
    };
    let mut q = vec![
        (Q::Arrivals, rate(router::ARRIVALS, &sel)),
        (Q::PromptTokens, rate(router::PROMPT_TOKENS, &sel)),
        (Q::RequestedTokens, rate(router::REQUESTED_TOKENS, &sel)),
        (Q::Recent(Recent::Arrivals), recent(router::ARRIVALS)),
        (
            Q::Recent(Recent::PromptTokens),
            recent(router::PROMPT_TOKENS),
        ),
        (
            Q::Recent(Recent::RequestedTokens),
            recent(router::REQUESTED_TOKENS),
        ),
        (
            Q::PeakPromptTokens,
            format!(
                "max_over_time(sum(rate({}{{{sel}}}[{}]))[{}:])",
                router::PROMPT_TOKENS,
                PEAK.0,
                PEAK.1
            ),
        ),
        (Q::Ttft, quantile(router::TTFT, "")),
        (Q::Itl, quantile(router::ITL, "")),
        (Q::TtftParts, quantile(router::TTFT_PART, ", part")),
        (
            Q::TransferSum,
            rate(&sum(router::KV_TRANSFER_SECONDS), &sel),
        ),
        (
            Q::TransferCount,
            rate(&count(router::KV_TRANSFER_SECONDS), &sel),
        ),
    ];
    for (role, _) in &v.roles {
        let sel = format!("{sel},role=\"{role}\"");
        let gauge = |m: &str| format!("sum({m}{{{sel}}})");
        for (rq, promql) in [
            (RoleQ::PrefillTokens, rate(worker::PREFILL_TOKENS, &sel)),
            (RoleQ::PrefillBusy, rate(worker::PREFILL_BUSY_SECONDS, &sel)),
            (RoleQ::Busy, rate(&sum(worker::STEP_SECONDS), &sel)),
            (RoleQ::Backlog, gauge(worker::QUEUED_PROMPT_TOKENS)),
            (RoleQ::Running, gauge(worker::RUNNING)),
            (RoleQ::StepN, rate(worker::DECODE_STEPS, &sel)),
            (RoleQ::StepBatch, rate(worker::DECODE_STEP_BATCH, &sel)),
            (RoleQ::StepSeconds, rate(worker::DECODE_STEP_SECONDS, &sel)),
            (
                RoleQ::StepBatchSq,
                rate(worker::DECODE_STEP_BATCH_SQUARED, &sel),
            ),
            (
                RoleQ::StepBatchSeconds,
                rate(worker::DECODE_STEP_BATCH_SECONDS, &sel),
            ),
            (RoleQ::KvUsed, gauge(worker::KV_BLOCKS_USED)),
            (
                RoleQ::KvTotal,
                format!("max({}{{{sel}}})", worker::KV_BLOCKS_TOTAL),
            ),
            (RoleQ::Refusals, rate(worker::REFUSALS, &sel)),
        ] {
            q.push((Q::Role(*role, rq), promql));
        }
    }
    q
}

/// The answers, by query.
type Answers = BTreeMap<Q, Vec<Sample>>;

fn one(a: &Answers, q: Q) -> Option<f64> {
    a.get(&q)?.first().map(|s| s.value)
}

/// What the planner sees, from the answers. No router series at all is no data (`demand` is
/// `None`); a zero rate is no traffic.
fn assemble(v: &PoolView, a: &Answers, now_s: f64) -> Signals {
    let rates = |[r, p, g]: [Q; 3]| match (one(a, r), one(a, p), one(a, g)) {
        (Some(r), Some(p), Some(g)) => Some(Demand {
            requests_per_s: r,
            prompt_tokens_per_s: p,
            generated_tokens_per_s: g,
            peak_prompt_tokens_per_s: one(a, Q::PeakPromptTokens),
        }),
        _ => None,
    };
    let recent = rates([
        Q::Recent(Recent::Arrivals),
        Q::Recent(Recent::PromptTokens),
        Q::Recent(Recent::RequestedTokens),
    ]);
    let demand = rates([Q::Arrivals, Q::PromptTokens, Q::RequestedTokens])
        .map(|long| Demand::from_windows(long, recent, SHORT_RATE_WINDOW_S as f64));
    let parts: BTreeMap<&str, f64> = a
        .get(&Q::TtftParts)
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s.labels.get("part")?.as_str(), s.value)))
        .collect();
    let ttft_parts = match (
        parts.get("queue"),
        parts.get("prefill"),
        parts.get("transfer"),
        parts.get("admission"),
    ) {
        (Some(&queue), Some(&prefill), Some(&transfer), Some(&admission)) => Some(TtftParts {
            queue,
            prefill,
            transfer,
            admission,
        }),
        _ => None,
    };
    let transfer_s = match (one(a, Q::TransferSum), one(a, Q::TransferCount)) {
        (Some(s), Some(n)) if n > 0.0 => Some(s / n),
        _ => None,
    };
    let role_signals = |role: Role, base: &RoleSignals| {
        let r = |q: RoleQ| one(a, Q::Role(role, q));
        let tokens_per_busy_s = match (r(RoleQ::PrefillTokens), r(RoleQ::PrefillBusy)) {
            (Some(t), Some(b)) if b > 1e-9 && t > 0.0 => Some(t / b),
            _ => None,
        };
        let steps = StepSums::from_rates([
            r(RoleQ::StepN),
            r(RoleQ::StepBatch),
            r(RoleQ::StepSeconds),
            r(RoleQ::StepBatchSq),
            r(RoleQ::StepBatchSeconds),
        ]);
        RoleSignals {
            busy: r(RoleQ::Busy).map(|b| b / base.ready.max(1) as f64),
            tokens_per_busy_s,
            backlog_tokens: r(RoleQ::Backlog),
            running: r(RoleQ::Running),
            steps,
            kv_tokens_used: r(RoleQ::KvUsed).map(|b| b * v.block_size),
            kv_tokens_per_replica: r(RoleQ::KvTotal).map(|b| b * v.block_size),
            refusals_per_s: r(RoleQ::Refusals),
            ..*base
        }
    };
    let mut roles = v.roles.iter().map(|(role, base)| role_signals(*role, base));
    Signals {
        now_s,
        demand,
        prefill: roles.next().unwrap_or_default(),
        decode: roles.next(),
        ttft_s: one(a, Q::Ttft),
        itl_s: one(a, Q::Itl),
        ttft_parts,
        transfer_s,
    }
}

/// Reads the pool's signals. An unreachable or failing Prometheus is an error (the planner
/// then holds); a Prometheus with no series for the pool gives `demand: None`.
pub async fn read(prom: &Prometheus, v: &PoolView<'_>, now_s: f64) -> Result<Signals, PromError> {
    let qs = queries(v);
    let answers = join_all(qs.iter().map(|(_, promql)| prom.query(promql))).await;
    let mut a = Answers::new();
    for ((q, _), answer) in qs.into_iter().zip(answers) {
        a.insert(q, answer?);
    }
    Ok(assemble(v, &a, now_s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> PoolView<'static> {
        let role = |n| RoleSignals {
            desired: n,
            ready: n,
            ..Default::default()
        };
        PoolView {
            namespace: "ml",
            pool: "toy",
            quantile: 0.99,
            block_size: 16.0,
            roles: vec![(Role::Prefill, role(2)), (Role::Decode, role(3))],
        }
    }

    fn sample(value: f64, labels: &[(&str, &str)]) -> Vec<Sample> {
        vec![Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }]
    }

    #[test]
    fn every_query_is_scoped_to_the_pool_and_its_role() {
        let qs = queries(&view());
        for (q, promql) in &qs {
            assert!(
                promql.contains("namespace=\"ml\",pool=\"toy\""),
                "{q:?}: {promql}"
            );
            if let Q::Role(role, _) = q {
                assert!(promql.contains(&format!("role=\"{role}\"")), "{promql}");
            }
        }
        assert_eq!(
            qs.iter().filter(|(q, _)| matches!(q, Q::Role(..))).count(),
            26
        );
    }

    #[test]
    fn answers_become_signals_and_no_router_series_is_no_data() {
        let v = view();
        let mut a = Answers::new();
        a.insert(Q::Arrivals, sample(4.0, &[]));
        a.insert(Q::PromptTokens, sample(400.0, &[]));
        a.insert(Q::RequestedTokens, sample(64.0, &[]));
        for (part, s) in [
            ("queue", 0.1),
            ("prefill", 0.2),
            ("transfer", 0.01),
            ("admission", 0.5),
        ] {
            a.entry(Q::TtftParts)
                .or_default()
                .extend(sample(s, &[("part", part)]));
        }
        a.insert(
            Q::Role(Role::Prefill, RoleQ::PrefillTokens),
            sample(400.0, &[]),
        );
        a.insert(Q::Role(Role::Prefill, RoleQ::PrefillBusy), sample(0.5, &[]));
        a.insert(Q::Role(Role::Decode, RoleQ::KvUsed), sample(10.0, &[]));
        a.insert(Q::Role(Role::Decode, RoleQ::KvTotal), sample(100.0, &[]));
        let s = assemble(&v, &a, 7.0);
        let d = s.demand.unwrap();
        assert_eq!(
            (d.requests_per_s, d.mean_prompt_tokens()),
            (4.0, Some(100.0))
        );
        // A rise shows in the last seconds before the minute's rate catches up (at the
        // minute's mean lengths).
        a.insert(Q::Recent(Recent::Arrivals), sample(8.0, &[]));
        a.insert(Q::Recent(Recent::PromptTokens), sample(900.0, &[]));
        a.insert(Q::Recent(Recent::RequestedTokens), sample(100.0, &[]));
        let d = assemble(&v, &a, 7.0).demand.unwrap();
        assert_eq!((d.requests_per_s, d.prompt_tokens_per_s), (8.0, 800.0));
        assert_eq!(s.prefill.tokens_per_busy_s, Some(800.0));
        assert_eq!(s.prefill.desired, 2);
        let decode = s.decode.unwrap();
        assert_eq!(
            (decode.kv_tokens_used, decode.kv_tokens_per_replica),
            (Some(160.0), Some(1600.0))
        );
        assert!(s.ttft_parts.unwrap().decode_bound());
        a.remove(&Q::Arrivals);
        assert_eq!(assemble(&v, &a, 7.0).demand, None);
    }
}
