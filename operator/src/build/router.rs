//! The router's children: its Deployment, the pool's front-door Service, and the account and
//! binding that let it watch its pool's EndpointSlices and topology map.

use std::net::SocketAddr;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PodSpec, PodTemplateSpec, Probe, Service, ServiceAccount,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use pdfleet_api::labels::{self, env};
use pdfleet_api::worker_args::RouterArgs;
use pdfleet_crds::{InferencePool, ServiceType};

use super::{
    child_name, container_security, field_env, http_probe, meta, names, pod_security, resources,
    scrape_annotations, selector, with_pod_settings, Defaults, Part,
};

/// The router's configuration: it finds the workers of the pool's mode through the pool's
/// EndpointSlices.
pub fn router_config(pool: &InferencePool) -> RouterArgs {
    let m = &pool.spec.model;
    RouterArgs {
        metrics_addr: Some(SocketAddr::from((
            [0, 0, 0, 0],
            labels::ROUTER_METRICS_PORT,
        ))),
        discover_pool: Some(pool.name_any()),
        mode: Some(pool.spec.mode),
        model_name: m.name.clone(),
        vocab_size: m.vocab_size as usize,
        max_seq_len: m.max_seq_len as usize,
        topology_key: pool.spec.topology.as_ref().map(|t| t.key.clone()),
        topology_map: pool
            .spec
            .topology
            .as_ref()
            .map(|_| child_name(pool, Part::Topology)),
        pool: pool.name_any(),
        slo_ttft_ms: pool.spec.slo.as_ref().map(|s| s.ttft_ms),
        slo_itl_ms: pool.spec.slo.as_ref().map(|s| s.itl_ms),
        ..RouterArgs::new()
    }
}

pub fn router_service_account(pool: &InferencePool) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(pool, child_name(pool, Part::Router), Part::Router),
        ..Default::default()
    }
}

/// Binds the router to the ClusterRole (from the chart) that lets it watch its pool's
/// EndpointSlices and topology map, in the pool's namespace only.
pub fn router_role_binding(pool: &InferencePool, cluster_role: &str) -> RoleBinding {
    RoleBinding {
        metadata: meta(pool, child_name(pool, Part::Router), Part::Router),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: cluster_role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: child_name(pool, Part::Router),
            namespace: pool.namespace(),
            ..Default::default()
        }]),
    }
}

pub fn router_deployment(pool: &InferencePool, defaults: &Defaults) -> Deployment {
    let mut pod_labels = super::labels(pool, Part::Router);
    pod_labels.insert("app.kubernetes.io/component".into(), "router".into());
    let r = &pool.spec.router;
    let container = Container {
        name: "router".into(),
        image: Some(
            r.image
                .clone()
                .unwrap_or_else(|| defaults.router_image.clone()),
        ),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![labels::ROUTER_BINARY.into()]),
        // The namespace and the pod's name come from the pod itself (env).
        args: Some(router_config(pool).to_args()),
        env: Some(vec![
            field_env(env::POD, "metadata.name"),
            field_env(env::NAMESPACE, "metadata.namespace"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: labels::ROUTER_PORT as i32,
                ..Default::default()
            },
            ContainerPort {
                name: Some(labels::METRICS_PORT_NAME.into()),
                container_port: labels::ROUTER_METRICS_PORT as i32,
                ..Default::default()
            },
        ]),
        // Ready once it sees a healthy worker of every role the pool needs; alive while the
        // process answers.
        readiness_probe: Some(http_probe("/readyz", labels::ROUTER_PORT, 2)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(5),
            ..http_probe("/healthz", labels::ROUTER_PORT, 10)
        }),
        resources: Some(resources(&r.resources)),
        security_context: Some(container_security()),
        ..Default::default()
    };
    Deployment {
        metadata: meta(pool, child_name(pool, Part::Router), Part::Router),
        spec: Some(DeploymentSpec {
            replicas: Some(r.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(pool, Part::Router)),
                ..Default::default()
            },
            template: with_pod_settings(
                PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(scrape_annotations(labels::ROUTER_METRICS_PORT)),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        service_account_name: Some(child_name(pool, Part::Router)),
                        security_context: Some(pod_security()),
                        ..Default::default()
                    }),
                },
                r.pod.as_ref(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pool's front door on port 80: named after the pool when that is a valid Service name.
pub fn router_service(pool: &InferencePool) -> Service {
    let type_ = match pool.spec.router.service_type {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata: meta(pool, names(pool).front_door(), Part::Router),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(selector(pool, Part::Router)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(labels::ROUTER_PORT as i32)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{defaults, pool};
    use super::*;
    use pdfleet_api::{worker_args, PoolMode, Role};

    #[test]
    fn the_router_discovers_its_pool_and_is_reached_through_a_service() {
        let p = pool(
            "chat",
            serde_json::json!({"model": {"name": "toy-7"}, "prefill": {}, "decode": {},
            "router": {"serviceType": "NodePort", "replicas": 2, "image": "reg/router:1"}}),
        );
        let d = router_deployment(&p, &defaults());
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let c = &spec.template.spec.as_ref().unwrap().containers[0];
        let parsed = worker_args::parse_router(c.args.as_ref().unwrap()).unwrap();
        assert_eq!(
            (
                parsed.discover_pool.as_deref(),
                parsed.mode,
                parsed.model_name.as_str()
            ),
            (Some("chat"), Some(PoolMode::Disaggregated), "toy-7")
        );
        assert_eq!(c.image.as_deref(), Some("reg/router:1"));
        assert!(c.liveness_probe.is_some() && c.resources.is_some());
        let s = router_service(&p);
        assert_eq!(s.metadata.name.as_deref(), Some("chat"));
        assert_eq!(s.spec.unwrap().type_.as_deref(), Some("NodePort"));
        let h = super::super::role_service(&p, Role::Decode);
        assert_eq!(h.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"));
        assert_eq!(h.metadata.labels.unwrap()[labels::ROLE], "decode");
        assert_eq!(
            router_role_binding(&p, "rel-pdfleet-router").role_ref.name,
            "rel-pdfleet-router"
        );
    }

    #[test]
    fn a_pool_whose_name_is_no_service_name_gets_a_hashed_front_door() {
        let p = pool(
            "llama-3.1",
            serde_json::json!({"model": {}, "prefill": {}, "decode": {}}),
        );
        let name = router_service(&p).metadata.name.unwrap();
        assert!(name.starts_with("llama-3-1-"), "{name}");
        assert!(crate::names::is_dns1035_label(&name));
    }
}
