//! What the cluster says about a pool's pods: which ones the scheduler cannot place (and why),
//! and the topology domain of each node they run on.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use pdfleet_api::{labels, Role};
use pdfleet_crds::InferencePool;

use crate::build::{pool_selector, Part};
use crate::error::Error;
use crate::status::{part_of, rollout, Rollout};

/// Pods of one worker role the scheduler cannot place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub role: Role,
    pub count: usize,
    /// The scheduler's message for one of them, e.g. "0/4 nodes are available: ...".
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodsSeen {
    pub unplaced: Vec<Unplaced>,
    /// For each node the pool's pods run on, its value of the pool's topology key.
    pub domains: BTreeMap<String, String>,
}

/// The pods of each role that the scheduler marked unschedulable, with its message.
pub fn unplaced(pods: &[Pod]) -> Vec<Unplaced> {
    let mut by_role: BTreeMap<Role, Unplaced> = BTreeMap::new();
    for pod in pods {
        let Some(role) = pod
            .labels()
            .get(labels::ROLE)
            .and_then(|r| r.parse::<Role>().ok())
        else {
            continue;
        };
        let unschedulable = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .filter(|c| c.reason.as_deref() == Some("Unschedulable"));
        if let Some(c) = unschedulable {
            let e = by_role.entry(role).or_insert_with(|| Unplaced {
                role,
                count: 0,
                reason: c.message.clone().unwrap_or_default(),
            });
            e.count += 1;
        }
    }
    by_role.into_values().collect()
}

/// Each worker role's Deployment, as the cluster has it now.
pub async fn workloads(
    client: &Client,
    pool: &InferencePool,
) -> Result<BTreeMap<Role, Rollout>, Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let list = api
        .list(&ListParams::default().labels(&pool_selector(pool)))
        .await?;
    Ok(list
        .items
        .iter()
        .filter_map(|d| match part_of(d)? {
            Part::Worker(role) => Some((role, rollout(d))),
            _ => None,
        })
        .collect())
}

pub async fn pods(client: &Client, pool: &InferencePool) -> Result<PodsSeen, Error> {
    let ns = pool.namespace().expect("pools are namespaced");
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = format!("{}={}", labels::POOL, pool.name_any());
    let pods = api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let mut seen = PodsSeen {
        unplaced: unplaced(&pods),
        ..Default::default()
    };
    if let Some(topo) = &pool.spec.topology {
        let nodes: Api<Node> = Api::all(client.clone());
        let mut names: Vec<String> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            if let Some(node) = nodes.get_opt(&name).await? {
                if let Some(domain) = node.labels().get(&topo.key) {
                    seen.domains.insert(name, domain.clone());
                }
            }
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn pod(role: &str, scheduled: Option<(&str, &str)>) -> Pod {
        let mut p = Pod::default();
        p.metadata.labels = Some([(labels::ROLE.to_string(), role.to_string())].into());
        p.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: if scheduled.is_some() { "False" } else { "True" }.into(),
                reason: scheduled.map(|s| s.0.to_string()),
                message: scheduled.map(|s| s.1.to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    #[test]
    fn unschedulable_pods_are_counted_by_role_with_the_schedulers_reason() {
        let why = "0/4 nodes are available: 4 node(s) didn't match pod affinity rules.";
        let pods = [
            pod("decode", Some(("Unschedulable", why))),
            pod("decode", Some(("Unschedulable", why))),
            pod("decode", None),
            pod("prefill", None),
            pod("router", Some(("Unschedulable", "x"))),
            pod("decode", Some(("SchedulerError", "y"))),
        ];
        assert_eq!(
            unplaced(&pods),
            vec![Unplaced {
                role: Role::Decode,
                count: 2,
                reason: why.into()
            }]
        );
    }
}
