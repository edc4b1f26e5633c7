//! Finds a pool's workers in Kubernetes: the EndpointSlices of its per-role headless Services,
//! selected by the pool label and read by the role label (which EndpointSlices inherit from
//! their Service), ready endpoints only. Object names are never parsed.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use pdfleet_api::{labels, PoolMode, Role};

use crate::pool::{Pool, WorkerAddr};

/// What discovery looks for.
#[derive(Clone, Debug)]
pub struct Target {
    pub pool: String,
    /// Only the roles of this mode (a pool switched to another mode may still have the old
    /// roles' workers for a moment).
    pub mode: Option<PoolMode>,
    pub topology_key: Option<String>,
}

/// Worker addresses in one slice, with their role and their topology domain under the key.
fn slice_workers(slice: &EndpointSlice, t: &Target) -> Vec<WorkerAddr> {
    let slice_labels = slice.labels();
    if slice_labels.get(labels::POOL) != Some(&t.pool) {
        return Vec::new();
    }
    let Some(role) = slice_labels
        .get(labels::ROLE)
        .and_then(|r| r.parse::<Role>().ok())
        .filter(|r| t.mode.is_none_or(|m| m.roles().contains(r)))
    else {
        // The router's own Service, or a role the pool does not run now.
        return Vec::new();
    };
    let key = t.topology_key.as_deref();
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(labels::GRPC_PORT_NAME))
        .and_then(|p| p.port)
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| {
            let domain = match key {
                Some("kubernetes.io/hostname") => e.node_name.clone(),
                Some("topology.kubernetes.io/zone") => e.zone.clone(),
                _ => None,
            }
            .unwrap_or_default();
            e.addresses.iter().map(move |ip| {
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip.clone()
                };
                WorkerAddr {
                    addr: format!("http://{host}:{port}"),
                    role,
                    domain: domain.clone(),
                    node: e.node_name.clone(),
                }
            })
        })
        .collect()
}

/// Watches the pool's slices and keeps the router's worker list in step.
pub async fn watch(client: Client, namespace: String, target: Target, pool: Arc<Pool>) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{}={}", labels::POOL, target.pool));
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    // Backs off on API errors instead of retrying in a hot loop.
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut pending: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(s)) => {
                slices.insert(s.name_any(), s);
            }
            Ok(Event::Delete(s)) => {
                slices.remove(&s.name_any());
            }
            Ok(Event::Init) => pending.clear(),
            Ok(Event::InitApply(s)) => {
                pending.insert(s.name_any(), s);
            }
            Ok(Event::InitDone) => slices = std::mem::take(&mut pending),
            Err(e) => {
                tracing::warn!(error = %e, "watching EndpointSlices");
                continue;
            }
        }
        let workers: Vec<WorkerAddr> = slices
            .values()
            .flat_map(|s| slice_workers(s, &target))
            .collect();
        tracing::info!(workers = workers.len(), "worker set changed");
        if let Err(e) = pool.set_workers(&workers) {
            tracing::warn!(error = %e, "bad worker address");
        }
        pool.poll_once().await;
    }
}

/// Keeps the pool's node-to-domain map (the operator's topology ConfigMap) in step: read every
/// few seconds, so a new node's domain reaches pairing soon after its first pod.
pub async fn follow_topology_map(client: Client, namespace: String, name: String, pool: Arc<Pool>) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    loop {
        match api.get_opt(&name).await {
            Ok(Some(cm)) => pool.set_node_domains(cm.data.unwrap_or_default()),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, configmap = %name, "reading the topology map"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    /// A slice of `pool`'s Service for `role` (none: the router's), endpoints on node-1 in
    /// zone-a.
    fn slice(pool: &str, role: Option<&str>, ready: &[(&str, bool)]) -> EndpointSlice {
        let mut s = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: ready
                .iter()
                .map(|(ip, r)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*r),
                        ..Default::default()
                    }),
                    node_name: Some("node-1".into()),
                    zone: Some("zone-a".into()),
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![
                EndpointPort {
                    name: Some("metrics".into()),
                    port: Some(9090),
                    ..Default::default()
                },
                EndpointPort {
                    name: Some("grpc".into()),
                    port: Some(50051),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let mut l = BTreeMap::from([
            (labels::POOL.to_string(), pool.to_string()),
            // Any Service name: names are never parsed.
            (labels::SERVICE_NAME.to_string(), "x-3f9a1c".to_string()),
        ]);
        l.insert(
            labels::ROLE.to_string(),
            role.unwrap_or(labels::ROUTER).to_string(),
        );
        s.metadata.labels = Some(l);
        s
    }

    fn target(pool: &str, key: Option<&str>) -> Target {
        Target {
            pool: pool.into(),
            mode: None,
            topology_key: key.map(String::from),
        }
    }

    #[test]
    fn ready_endpoints_become_workers_of_the_slices_role() {
        let s = slice(
            "llama-3.1",
            Some("decode"),
            &[("10.0.0.5", true), ("10.0.0.6", false)],
        );
        let w = slice_workers(
            &s,
            &target("llama-3.1", Some("topology.kubernetes.io/zone")),
        );
        assert_eq!(
            w,
            vec![WorkerAddr {
                addr: "http://10.0.0.5:50051".to_string(),
                role: Role::Decode,
                domain: "zone-a".to_string(),
                node: Some("node-1".into()),
            }]
        );
        assert_eq!(
            slice_workers(&s, &target("llama-3.1", Some("kubernetes.io/hostname")))[0].domain,
            "node-1"
        );
        assert_eq!(
            slice_workers(&s, &target("llama-3.1", Some("example.com/rack")))[0].domain,
            "",
            "other keys: the topology map says, by node"
        );
        assert!(
            slice_workers(
                &slice("chat", None, &[("10.0.0.7", true)]),
                &target("chat", None)
            )
            .is_empty(),
            "the router's own Service is not a worker"
        );
        assert!(
            slice_workers(
                &slice("other", Some("prefill"), &[("10.0.0.8", true)]),
                &target("chat", None)
            )
            .is_empty(),
            "another pool's slice"
        );
    }

    #[test]
    fn only_the_roles_of_the_pools_mode_are_taken() {
        let prefill = slice("chat", Some("prefill"), &[("10.0.0.5", true)]);
        let unified = slice("chat", Some("unified"), &[("10.0.0.6", true)]);
        let colocated = Target {
            mode: Some(PoolMode::Colocated),
            ..target("chat", None)
        };
        assert!(slice_workers(&prefill, &colocated).is_empty());
        assert_eq!(slice_workers(&unified, &colocated).len(), 1);
    }
}
