//! The planner's decision in the pool's status: per role what it recommends and the figures
//! behind it, and the conditions MetricsAvailable, ScalingActive, ScalingLimited and
//! SLOAttainable (the HPA's, plus the two a planner adds).

use pdfleet_api::Role;
use pdfleet_crds::{AutoscalingMode, InferencePool, InferencePoolStatus, RoleStatus};
use pdfleet_planner::planner::{Limit, RoleDecision};

use super::Decided;
use crate::build;
use crate::status::{condition, set_condition};

pub const CONDITIONS: [&str; 4] = [
    "MetricsAvailable",
    "ScalingActive",
    "ScalingLimited",
    "SLOAttainable",
];

fn round(v: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (v * k).round() / k
}

fn ms(s: Option<f64>) -> Option<f64> {
    s.filter(|v| v.is_finite()).map(|v| round(v * 1000.0, 2))
}

/// Why the SLO cannot be met, when it cannot: which role, its target and what the model says
/// the fewest possible wait is.
pub fn unattainable(decided: &Decided, pool: &InferencePool) -> Option<String> {
    let slo = pool.spec.slo.as_ref()?;
    let notes: Vec<String> = build::roles(pool)
        .into_iter()
        .filter_map(|(role, _)| {
            let d = decided.decision(role).filter(|d| !d.attainable)?;
            let (what, target) = match role {
                Role::Decode => ("ITL", slo.itl_ms),
                _ => ("TTFT", slo.ttft_ms),
            };
            let predicted = d
                .predicted_s
                .map(|p| format!("{:.1} ms", p * 1000.0))
                .unwrap_or_else(|| "more".into());
            Some(format!(
                "{role}: the {what} target of {target} ms is below what one request takes alone ({predicted}); sized by demand instead"
            ))
        })
        .collect();
    (!notes.is_empty()).then(|| notes.join("; "))
}

fn role_status(st: &mut InferencePoolStatus, role: Role) -> Option<&mut RoleStatus> {
    match role {
        Role::Prefill => st.prefill.as_mut(),
        Role::Decode => st.decode.as_mut(),
        Role::Unified => st.unified.as_mut(),
    }
}

fn limit_note(role: Role, d: &RoleDecision) -> Option<String> {
    match d.limit.as_ref()? {
        Limit::AtMax => Some(format!(
            "{role} needs more than its maxReplicas ({} now)",
            d.desired
        )),
        _ => None,
    }
}

/// Writes the planner's figures and conditions into `st` (which holds the roles' replicas as
/// the cluster has them); removes them from a pool that does not autoscale.
pub fn fill(st: &mut InferencePoolStatus, pool: &InferencePool, decided: Option<&Decided>) {
    let Some(a) = pool.spec.autoscaling.as_ref() else {
        st.conditions
            .retain(|c| !CONDITIONS.contains(&c.type_.as_str()));
        (st.ttft_ms, st.itl_ms, st.bottleneck) = (None, None, None);
        return;
    };
    let g = pool.metadata.generation;
    let prev = st.conditions.clone();
    let empty = Decided::default();
    let decided = decided.unwrap_or(&empty);
    (st.ttft_ms, st.itl_ms) = (ms(decided.ttft_s), ms(decided.itl_s));
    let roles = build::roles(pool);
    st.bottleneck = decided
        .plan
        .as_ref()
        .and_then(|p| p.bottleneck)
        .map(|b| match b {
            pdfleet_planner::planner::Which::Decode if roles.len() > 1 => Role::Decode,
            _ => roles.first().map_or(Role::Prefill, |(r, _)| *r),
        });
    let mut limits = Vec::new();
    for (role, _) in &roles {
        let Some(rs) = role_status(st, *role) else {
            continue;
        };
        rs.pending = Some((rs.desired - rs.ready).max(0));
        if let Some((at, why)) = decided.last_scale.get(role) {
            (rs.last_scale_time, rs.last_scale_reason) = (Some(at.clone()), Some(why.clone()));
        }
        let Some(d) = decided.decision(*role) else {
            continue;
        };
        rs.recommended = Some(d.recommended as i32);
        rs.demand = d.demand.map(|v| round(v, 2));
        rs.capacity_per_replica = d.capacity_per_replica.map(|v| round(v, 2));
        rs.utilisation = d.utilisation.filter(|u| u.is_finite()).map(|v| round(v, 3));
        rs.predicted_ms = ms(d.predicted_s);
        rs.observed_ms = ms(d.observed_s);
        limits.extend(limit_note(*role, d));
    }
    let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
        set_condition(
            &mut st.conditions,
            condition(type_, ok, reason, message, g, &prev),
        );
    };
    let metrics = decided.metrics.clone().unwrap_or(Err(super::NoMetrics {
        reason: "NotYetRead",
        message: "the planner has not looked at this pool yet".into(),
    }));
    match &metrics {
        Ok(()) => set(
            "MetricsAvailable",
            true,
            "SignalsRead",
            "request rates, worker load and latencies read from Prometheus".into(),
        ),
        Err(why) => set(
            "MetricsAvailable",
            false,
            why.reason,
            format!("{}; replicas are held", why.message),
        ),
    }
    let not_measured = decided.plan.as_ref().and_then(|p| p.no_data.clone());
    match (a.mode, &metrics, not_measured) {
        (AutoscalingMode::External, _, _) => set(
            "ScalingActive",
            false,
            "External",
            "each role's replicas follow its RoleScale, written by an HPA or KEDA; the planner only recommends".into(),
        ),
        (_, Err(_), _) => set(
            "ScalingActive",
            false,
            "NoMetrics",
            "holding: no signals to plan from".into(),
        ),
        (_, Ok(()), Some(what)) => set("ScalingActive", false, "NotMeasured", what),
        (_, Ok(()), None) => set(
            "ScalingActive",
            true,
            "Planning",
            "every role is sized from its measured demand and capacity".into(),
        ),
    }
    if limits.is_empty() {
        set(
            "ScalingLimited",
            false,
            "WithinBounds",
            "the recommendations are within minReplicas and maxReplicas".into(),
        );
    } else {
        set(
            "ScalingLimited",
            true,
            "TooFewReplicasAllowed",
            limits.join("; "),
        );
    }
    match unattainable(decided, pool) {
        Some(msg) => set("SLOAttainable", false, "TargetBelowServiceTime", msg),
        None => set(
            "SLOAttainable",
            true,
            "Attainable",
            "the model can meet every target with enough replicas".into(),
        ),
    }
}
