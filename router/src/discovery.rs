//! Finds a pool's workers in Kubernetes: the EndpointSlices of its per-role headless Services
//! (`<pool>-prefill`, `<pool>-decode`, `<pool>-unified`), ready endpoints only.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use pdfleet_worker::serve::Role;

use crate::pool::Pool;

/// Worker addresses in one slice, with their role and their topology domain under `key`.
fn slice_workers(slice: &EndpointSlice, pool: &str, key: &str) -> Vec<(String, Role, String)> {
    let service = slice
        .labels()
        .get("kubernetes.io/service-name")
        .cloned()
        .unwrap_or_default();
    let role = match service.strip_prefix(pool).and_then(|s| s.strip_prefix('-')) {
        Some("prefill") => Role::Prefill,
        Some("decode") => Role::Decode,
        Some("unified") => Role::Unified,
        _ => return Vec::new(),
    };
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("grpc"))
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
                "kubernetes.io/hostname" => e.node_name.clone(),
                "topology.kubernetes.io/zone" => e.zone.clone(),
                _ => None,
            }
            .unwrap_or_default();
            e.addresses.iter().map(move |ip| {
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip.clone()
                };
                (format!("http://{host}:{port}"), role, domain.clone())
            })
        })
        .collect()
}

/// Watches the pool's slices and keeps the router's worker list in step.
pub async fn watch(
    client: Client,
    namespace: String,
    pool_name: String,
    key: String,
    pool: Arc<Pool>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let services = ["prefill", "decode", "unified"]
        .map(|r| format!("{pool_name}-{r}"))
        .join(",");
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name in ({services})"));
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut stream = watcher::watcher(api, config).boxed();
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
        let workers: Vec<(String, Role, String)> = slices
            .values()
            .flat_map(|s| slice_workers(s, &pool_name, &key))
            .collect();
        tracing::info!(workers = workers.len(), "worker set changed");
        if let Err(e) = pool.set_workers(&workers) {
            tracing::warn!(error = %e, "bad worker address");
        }
        pool.poll_once().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(service: &str, ready: &[(&str, bool)]) -> EndpointSlice {
        // Endpoints on node-1 in zone-a.
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
        s.metadata.labels = Some(
            [(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )]
            .into(),
        );
        s
    }

    #[test]
    fn ready_endpoints_become_workers_of_the_services_role() {
        let s = slice("chat-decode", &[("10.0.0.5", true), ("10.0.0.6", false)]);
        let w = slice_workers(&s, "chat", "topology.kubernetes.io/zone");
        assert_eq!(
            w,
            vec![(
                "http://10.0.0.5:50051".to_string(),
                Role::Decode,
                "zone-a".to_string()
            )]
        );
        assert_eq!(
            slice_workers(&s, "chat", "kubernetes.io/hostname")[0].2,
            "node-1"
        );
        assert_eq!(
            slice_workers(&s, "chat", "example.com/rack")[0].2,
            "",
            "other keys: the worker says"
        );
        assert!(
            slice_workers(&slice("chat", &[("10.0.0.7", true)]), "chat", "").is_empty(),
            "the router's own Service is not a worker"
        );
        assert!(
            slice_workers(&slice("other-prefill", &[("10.0.0.8", true)]), "chat", "").is_empty()
        );
    }
}
