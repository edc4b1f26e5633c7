//! A pool's status from what the cluster holds: each role's replicas as its Deployment reports
//! them, and conditions that say what a person needs to know: Ready (every role rolled out to
//! this generation and ready), Progressing, Degraded, Placement (pods the scheduler cannot
//! place, with its reason).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use pdfleet_api::labels;
use pdfleet_api::{PoolMode, Role};
use pdfleet_crds::{InferencePool, InferencePoolStatus, RoleStatus};

use crate::build::Part;
use crate::observe::Unplaced;

/// A Deployment's rollout as its controller reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    pub desired: i32,
    pub ready: i32,
    /// The controller has seen the latest spec and every replica runs it.
    pub done: bool,
    /// A template change is being rolled out: pods of an older one still run.
    pub rolling: bool,
}

pub fn rollout(d: &Deployment) -> Rollout {
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let s = d.status.clone().unwrap_or_default();
    let seen = s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let ready = s.ready_replicas.unwrap_or(0);
    let done = seen
        && s.updated_replicas.unwrap_or(0) >= desired
        && ready >= desired
        && s.available_replicas.unwrap_or(0) >= desired
        // Old pods gone too.
        && s.replicas.unwrap_or(0) <= desired;
    let rolling = !seen || s.updated_replicas.unwrap_or(0) < s.replicas.unwrap_or(0).min(desired);
    Rollout {
        desired,
        ready: ready.min(desired),
        done,
        rolling,
    }
}

pub fn part_of(d: &Deployment) -> Option<Part> {
    let role = d.labels().get(labels::ROLE)?;
    if role == labels::ROUTER {
        return Some(Part::Router);
    }
    role.parse::<Role>().ok().map(Part::Worker)
}

pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // The transition time moves only when the status does.
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(chrono::Utc::now()));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

fn previous(pool: &InferencePool) -> Vec<Condition> {
    pool.status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// Replaces (or adds) one condition.
pub fn set_condition(conditions: &mut Vec<Condition>, c: Condition) {
    conditions.retain(|x| x.type_ != c.type_);
    conditions.push(c);
}

/// The status after the pool's children were applied for its current generation: `applied`
/// holds the Deployments as the API server returned them.
pub fn compute(
    pool: &InferencePool,
    applied: &[Deployment],
    unplaced: &[Unplaced],
) -> InferencePoolStatus {
    let g = pool.metadata.generation;
    let prev = previous(pool);
    let mut st = InferencePoolStatus {
        observed_generation: g,
        ..pool.status.clone().unwrap_or_default()
    };
    (st.prefill, st.decode, st.unified, st.router) = (None, None, None, None);
    let mut parts: Vec<(Part, Rollout)> = Vec::new();
    for d in applied {
        let Some(part) = part_of(d) else { continue };
        let r = rollout(d);
        let rs = Some(RoleStatus {
            ready: r.ready,
            desired: r.desired,
            ..Default::default()
        });
        match part {
            Part::Worker(Role::Prefill) => st.prefill = rs,
            Part::Worker(Role::Decode) => st.decode = rs,
            Part::Worker(Role::Unified) => st.unified = rs,
            Part::Router => st.router = rs,
            Part::Model | Part::Topology => {}
        }
        parts.push((part, r));
    }
    let ratio = |s: &Option<RoleStatus>| s.as_ref().map(|s| format!("{}/{}", s.ready, s.desired));
    (st.prefill_replicas, st.decode_replicas) = match pool.spec.mode {
        PoolMode::Disaggregated => (ratio(&st.prefill), ratio(&st.decode)),
        PoolMode::Colocated => (ratio(&st.unified), ratio(&st.unified)),
    };
    let rolling: Vec<String> = parts
        .iter()
        .filter(|(_, r)| !r.done)
        .map(|(p, r)| format!("{} {}/{}", p.as_str(), r.ready, r.desired))
        .collect();
    let empty: Vec<&str> = parts
        .iter()
        .filter(|(_, r)| r.desired > 0 && r.ready == 0)
        .map(|(p, _)| p.as_str())
        .collect();
    let ready = rolling.is_empty();
    let mut conditions = prev.clone();
    set_condition(
        &mut conditions,
        condition(
            "Ready",
            ready,
            if ready {
                "AllReplicasReady"
            } else {
                "RollingOut"
            },
            if ready {
                "every role runs this generation with all its replicas ready".into()
            } else {
                format!("waiting for {}", rolling.join(", "))
            },
            g,
            &prev,
        ),
    );
    set_condition(
        &mut conditions,
        condition(
            "Progressing",
            !ready,
            if ready { "Stable" } else { "RollingOut" },
            if ready {
                "no rollout in progress".into()
            } else {
                format!("bringing up {}", rolling.join(", "))
            },
            g,
            &prev,
        ),
    );
    set_condition(
        &mut conditions,
        condition(
            "Degraded",
            !empty.is_empty(),
            if empty.is_empty() {
                "Serving"
            } else {
                "RoleUnavailable"
            },
            if empty.is_empty() {
                "every role has a ready replica".into()
            } else {
                format!("no ready replica for {}", empty.join(", "))
            },
            g,
            &prev,
        ),
    );
    let placed = unplaced.is_empty();
    let pending: Vec<String> = unplaced
        .iter()
        .map(|u| format!("{}: {} pod(s) pending: {}", u.role, u.count, u.reason))
        .collect();
    set_condition(
        &mut conditions,
        condition(
            "Placement",
            placed,
            if placed { "Placed" } else { "Unschedulable" },
            if placed {
                "every pod is placed".into()
            } else {
                pending.join("; ")
            },
            g,
            &prev,
        ),
    );
    st.conditions = conditions;
    st
}

/// The status when the pool's children could not be applied: the replicas stay as they were,
/// Ready turns False with the error, observedGeneration stays at the last applied generation.
pub fn failed(pool: &InferencePool, reason: &str, message: String) -> InferencePoolStatus {
    let prev = previous(pool);
    let mut st = pool.status.clone().unwrap_or_default();
    let mut conditions = prev.clone();
    set_condition(
        &mut conditions,
        condition(
            "Ready",
            false,
            reason,
            message,
            pool.metadata.generation,
            &prev,
        ),
    );
    st.conditions = conditions;
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use pdfleet_crds::InferencePoolSpec;

    fn pool() -> InferencePool {
        let spec: InferencePoolSpec =
            serde_json::from_value(serde_json::json!({"model": {}, "prefill": {}, "decode": {}}))
                .unwrap();
        let mut p = InferencePool::new("chat", spec);
        p.metadata.generation = Some(2);
        p
    }

    fn deployment(role: &str, generation: i64, status: DeploymentStatus) -> Deployment {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(status),
            ..Default::default()
        };
        d.metadata.generation = Some(generation);
        d.metadata.labels = Some([(labels::ROLE.to_string(), role.to_string())].into());
        d
    }

    fn done(generation: i64) -> DeploymentStatus {
        DeploymentStatus {
            observed_generation: Some(generation),
            replicas: Some(2),
            updated_replicas: Some(2),
            ready_replicas: Some(2),
            available_replicas: Some(2),
            ..Default::default()
        }
    }

    fn cond<'a>(st: &'a InferencePoolStatus, t: &str) -> &'a Condition {
        st.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn ready_waits_for_the_new_pods_of_a_rollout() {
        let p = pool();
        let all_done = [
            deployment("prefill", 3, done(3)),
            deployment("decode", 3, done(3)),
        ];
        let st = compute(&p, &all_done, &[]);
        assert_eq!(cond(&st, "Ready").status, "True");
        assert_eq!(cond(&st, "Ready").observed_generation, Some(2));
        assert_eq!(st.observed_generation, Some(2));
        // A template change: the controller has not seen it yet, or old pods still serve.
        let unseen = deployment("decode", 4, done(3));
        let surging = deployment(
            "decode",
            4,
            DeploymentStatus {
                replicas: Some(3),
                updated_replicas: Some(1),
                ..done(4)
            },
        );
        for d in [unseen, surging] {
            let st = compute(&p, &[deployment("prefill", 3, done(3)), d], &[]);
            let ready = cond(&st, "Ready");
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                ("False", "RollingOut")
            );
            assert!(ready.message.contains("decode"), "{}", ready.message);
            assert_eq!(cond(&st, "Progressing").status, "True");
            assert_eq!(
                cond(&st, "Degraded").status,
                "False",
                "old pods still serve"
            );
        }
    }

    #[test]
    fn unplaced_pods_are_a_condition_with_the_schedulers_reason() {
        let st = compute(
            &pool(),
            &[deployment("prefill", 1, done(1))],
            &[Unplaced {
                role: Role::Decode,
                count: 2,
                reason: "0/4 nodes are available: insufficient nvidia.com/gpu".into(),
            }],
        );
        let c = cond(&st, "Placement");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Unschedulable")
        );
        assert_eq!(
            c.message,
            "decode: 2 pod(s) pending: 0/4 nodes are available: insufficient nvidia.com/gpu"
        );
    }

    #[test]
    fn an_apply_failure_turns_ready_false_and_keeps_the_last_generation() {
        let mut p = pool();
        p.status = Some(compute(&p, &[deployment("prefill", 1, done(1))], &[]));
        p.metadata.generation = Some(3);
        let st = failed(&p, "ApplyFailed", "quota exceeded".into());
        let ready = cond(&st, "Ready");
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            ("False", "ApplyFailed", "quota exceeded")
        );
        assert_eq!(st.observed_generation, Some(2));
    }
}
