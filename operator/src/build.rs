//! The desired children of a pool: pure functions of its spec, so they are tested without a
//! cluster. Every child carries the pool's labels and an owner reference to it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodAffinity,
    PodAffinityTerm, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use pdfleet_api::labels::{self, env};
use pdfleet_api::worker_args::{EngineArgs, ModelArgs, RouterArgs, WorkerArgs};
use pdfleet_api::Role;
use pdfleet_crds::{InferencePool, RoleSpec, ServiceType, TopologyPolicy};

const GRPC_PORT: i32 = labels::GRPC_PORT as i32;
const METRICS_PORT: i32 = labels::METRICS_PORT as i32;
const ROUTER_PORT: i32 = labels::ROUTER_PORT as i32;
/// The ClusterRole (from the chart) that lets a router watch its pool's EndpointSlices.
pub const ROUTER_CLUSTER_ROLE: &str = "pdfleet-router";

/// Images used when neither the pool nor the role names one.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub worker_image: String,
    pub router_image: String,
}

/// What a child of a pool is for: a worker role's, the router's, or the pool's model config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Worker(Role),
    Router,
    Model,
}

impl Part {
    /// Its value of the role label, and its children's name suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Worker(role) => role.as_str(),
            Part::Router => labels::ROUTER,
            Part::Model => "model",
        }
    }
}

/// The worker roles a pool runs, with their specs.
pub fn roles(pool: &InferencePool) -> Vec<(Role, &RoleSpec)> {
    let s = &pool.spec;
    s.mode
        .roles()
        .iter()
        .filter_map(|&r| s.role(r).map(|spec| (r, spec)))
        .collect()
}

pub fn labels(pool: &InferencePool, part: Part) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "pdfleet".to_string()),
        ("app.kubernetes.io/instance".to_string(), pool.name_any()),
        (labels::MANAGED_BY.to_string(), labels::OPERATOR.to_string()),
        (labels::POOL.to_string(), pool.name_any()),
        (labels::ROLE.to_string(), part.as_str().to_string()),
    ])
}

fn selector(pool: &InferencePool, part: Part) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::POOL.to_string(), pool.name_any()),
        (labels::ROLE.to_string(), part.as_str().to_string()),
    ])
}

fn owner(pool: &InferencePool) -> OwnerReference {
    pool.controller_owner_ref(&())
        .expect("a stored pool has a name and uid")
}

fn meta(pool: &InferencePool, name: String, part: Part) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pool.namespace(),
        labels: Some(labels(pool, part)),
        owner_references: Some(vec![owner(pool)]),
        ..Default::default()
    }
}

pub fn child_name(pool: &InferencePool, part: Part) -> String {
    format!("{}-{}", pool.name_any(), part.as_str())
}

/// The worker's configuration, from the model and the role's engine knobs (unset ones take the
/// worker's defaults).
pub fn worker_config(pool: &InferencePool, role: Role, spec: &RoleSpec) -> WorkerArgs {
    let m = &pool.spec.model;
    let e = &spec.engine;
    let defaults = EngineArgs::default();
    let knob = |v: Option<u32>, default: usize| v.map_or(default, |v| v as usize);
    WorkerArgs {
        model: ModelArgs {
            vocab_size: m.vocab_size as usize,
            dim: m.dim as usize,
            n_heads: m.n_heads as usize,
            n_kv_heads: m.n_kv_heads as usize,
            n_layers: m.n_layers as usize,
            max_seq_len: m.max_seq_len as usize,
            kv_dtype: m.kv_dtype,
            weights: m
                .weights
                .file
                .as_ref()
                .map(|f| format!("/weights/{}", f.trim_start_matches('/')).into()),
            weights_seed: m.weights.seed,
        },
        engine: EngineArgs {
            block_size: knob(e.block_size, defaults.block_size),
            num_blocks: knob(e.kv_blocks, defaults.num_blocks),
            max_batch_tokens: knob(e.max_batch_tokens, defaults.max_batch_tokens),
            chunk_size: knob(e.chunk_size, defaults.chunk_size),
            max_running: knob(e.max_running, defaults.max_running),
            max_waiting: defaults.max_waiting,
        },
        kv_wire_f16: e.kv_wire_f16 && role == Role::Prefill,
        pool: pool.name_any(),
        grace_period_s: spec.grace_period_seconds as u64,
        ..WorkerArgs::new(role)
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

fn resources(spec: &RoleSpec) -> ResourceRequirements {
    let r = &spec.resources;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &r.cpu {
        requests.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(mem) = &r.memory {
        requests.insert("memory".to_string(), Quantity(mem.clone()));
        limits.insert("memory".to_string(), Quantity(mem.clone()));
    }
    if r.gpus > 0 {
        limits.insert("nvidia.com/gpu".to_string(), Quantity(r.gpus.to_string()));
        requests.insert("nvidia.com/gpu".to_string(), Quantity(r.gpus.to_string()));
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    }
}

/// Prefill and decode of one pool share a topology domain: pod affinity to the pool's other
/// pods on the topology key, required or preferred by the policy.
pub fn affinity(pool: &InferencePool) -> Option<Affinity> {
    let topo = pool.spec.topology.as_ref()?;
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                labels::POOL.to_string(),
                pool.name_any(),
            )])),
            ..Default::default()
        }),
        topology_key: topo.key.clone(),
        ..Default::default()
    };
    let pod_affinity = match topo.policy {
        TopologyPolicy::Required => PodAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..Default::default()
        },
        TopologyPolicy::Preferred => PodAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..Default::default()
        },
    };
    Some(Affinity {
        pod_affinity: Some(pod_affinity),
        ..Default::default()
    })
}

fn image(pool: &InferencePool, role_image: &Option<String>, default: &str) -> String {
    role_image
        .clone()
        .or_else(|| pool.spec.image.clone())
        .unwrap_or_else(|| default.to_string())
}

/// `replicas` is the spec's, or the autoscaler's when it runs.
pub fn worker_deployment(
    pool: &InferencePool,
    role: Role,
    spec: &RoleSpec,
    replicas: i32,
    defaults: &Defaults,
) -> Deployment {
    let part = Part::Worker(role);
    let mut pod_labels = labels(pool, part);
    pod_labels.insert("app.kubernetes.io/component".into(), "worker".into());
    let mut env = vec![field_env(env::POD, "metadata.name")];
    // The domain the router pairs within: the node, when the topology key is the hostname.
    if pool
        .spec
        .topology
        .as_ref()
        .is_some_and(|t| t.key == "kubernetes.io/hostname")
    {
        env.push(field_env(env::DOMAIN, "spec.nodeName"));
    }
    let w = &pool.spec.model.weights;
    let volume = w.persistent_volume_claim.as_ref().map(|claim| Volume {
        name: "weights".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.clone(),
            read_only: Some(true),
        }),
        ..Default::default()
    });
    let volume = volume.or_else(|| {
        w.config_map.as_ref().map(|cm| Volume {
            name: "weights".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    let container = Container {
        name: "worker".into(),
        image: Some(image(pool, &spec.image, &defaults.worker_image)),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(worker_config(pool, role, spec).to_args()),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(labels::GRPC_PORT_NAME.into()),
                container_port: GRPC_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some(labels::METRICS_PORT_NAME.into()),
                container_port: METRICS_PORT,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", METRICS_PORT, 2)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz", METRICS_PORT, 10)
        }),
        resources: Some(resources(spec)),
        volume_mounts: volume.as_ref().map(|_| {
            vec![VolumeMount {
                name: "weights".into(),
                mount_path: "/weights".into(),
                read_only: Some(true),
                ..Default::default()
            }]
        }),
        ..Default::default()
    };
    Deployment {
        metadata: meta(pool, child_name(pool, part), part),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector(pool, part)),
                ..Default::default()
            },
            // Never below the desired count while rolling: a new pod is ready before an old one
            // drains.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
                        ("prometheus.io/path".to_string(), "/metrics".to_string()),
                    ])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    affinity: affinity(pool),
                    // The worker drains for its grace period; leave it a little more.
                    termination_grace_period_seconds: Some(spec.grace_period_seconds + 5),
                    volumes: volume.map(|v| vec![v]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Headless Service per role: its EndpointSlices are how the router finds the workers.
pub fn role_service(pool: &InferencePool, role: Role) -> Service {
    let part = Part::Worker(role);
    Service {
        metadata: meta(pool, child_name(pool, part), part),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(pool, part)),
            ports: Some(vec![
                ServicePort {
                    name: Some(labels::GRPC_PORT_NAME.into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::Int(GRPC_PORT)),
                    ..Default::default()
                },
                ServicePort {
                    name: Some(labels::METRICS_PORT_NAME.into()),
                    port: METRICS_PORT,
                    target_port: Some(IntOrString::Int(METRICS_PORT)),
                    ..Default::default()
                },
            ]),
            publish_not_ready_addresses: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn router_service_account(pool: &InferencePool) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(pool, child_name(pool, Part::Router), Part::Router),
        ..Default::default()
    }
}

/// Lets the pool's router watch EndpointSlices in its namespace.
pub fn router_role_binding(pool: &InferencePool) -> RoleBinding {
    RoleBinding {
        metadata: meta(pool, child_name(pool, Part::Router), Part::Router),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: ROUTER_CLUSTER_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: child_name(pool, Part::Router),
            namespace: pool.namespace(),
            ..Default::default()
        }]),
    }
}

/// The router's configuration: it finds its workers through the pool's EndpointSlices.
pub fn router_config(pool: &InferencePool) -> RouterArgs {
    let m = &pool.spec.model;
    RouterArgs {
        discover_pool: Some(pool.name_any()),
        model_name: m.name.clone(),
        vocab_size: m.vocab_size as usize,
        max_seq_len: m.max_seq_len as usize,
        topology_key: pool.spec.topology.as_ref().map(|t| t.key.clone()),
        pool: pool.name_any(),
        ..RouterArgs::new()
    }
}

pub fn router_deployment(pool: &InferencePool, defaults: &Defaults) -> Deployment {
    let mut pod_labels = labels(pool, Part::Router);
    pod_labels.insert("app.kubernetes.io/component".into(), "router".into());
    // The namespace and the pod's name come from the pod itself (env).
    let args = router_config(pool).to_args();
    let container = Container {
        name: "router".into(),
        image: Some(image(pool, &pool.spec.router.image, &defaults.router_image)),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(args),
        env: Some(vec![
            field_env(env::POD, "metadata.name"),
            field_env(env::NAMESPACE, "metadata.namespace"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ROUTER_PORT,
            ..Default::default()
        }]),
        readiness_probe: Some(http_probe("/healthz", ROUTER_PORT, 2)),
        ..Default::default()
    };
    Deployment {
        metadata: meta(pool, child_name(pool, Part::Router), Part::Router),
        spec: Some(DeploymentSpec {
            replicas: Some(pool.spec.router.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(pool, Part::Router)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), ROUTER_PORT.to_string()),
                        ("prometheus.io/path".to_string(), "/metrics".to_string()),
                    ])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    service_account_name: Some(child_name(pool, Part::Router)),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pool's front door: `<pool>` on port 80.
pub fn router_service(pool: &InferencePool) -> Service {
    let type_ = match pool.spec.router.service_type {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata: meta(pool, pool.name_any(), Part::Router),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(selector(pool, Part::Router)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(ROUTER_PORT)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// At most one pod of a role down at a time for voluntary disruptions.
pub fn pdb(pool: &InferencePool, role: Role) -> PodDisruptionBudget {
    let part = Part::Worker(role);
    PodDisruptionBudget {
        metadata: meta(pool, child_name(pool, part), part),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(pool, part)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The model as the workers run it, for people and tools to read.
pub fn model_config_map(pool: &InferencePool) -> ConfigMap {
    let json = serde_json::to_string_pretty(&pool.spec.model).expect("the model serialises");
    ConfigMap {
        metadata: meta(pool, child_name(pool, Part::Model), Part::Model),
        data: Some(BTreeMap::from([("model.json".to_string(), json)])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdfleet_crds::InferencePoolSpec;

    fn pool(spec: serde_json::Value) -> InferencePool {
        let spec: InferencePoolSpec = serde_json::from_value(spec).unwrap();
        let mut p = InferencePool::new("chat", spec);
        p.metadata.namespace = Some("ml".into());
        p.metadata.uid = Some("1234".into());
        p
    }

    fn defaults() -> Defaults {
        Defaults {
            worker_image: "pdfleet/worker:dev".into(),
            router_image: "pdfleet/router:dev".into(),
        }
    }

    #[test]
    fn a_disaggregated_pool_has_prefill_and_decode_with_their_knobs() {
        let p = pool(serde_json::json!({
            "model": {"weights": {"seed": 3}},
            "prefill": {"replicas": 2, "engine": {"chunkSize": 64, "kvWireF16": true}, "resources": {"gpus": 1}},
            "decode": {"replicas": 3, "engine": {"kvBlocks": 8192}},
        }));
        let rs = roles(&p);
        assert_eq!(
            rs.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            vec![Role::Prefill, Role::Decode]
        );
        let d = worker_deployment(&p, Role::Prefill, rs[0].1, rs[0].1.replicas, &defaults());
        assert_eq!(d.metadata.name.as_deref(), Some("chat-prefill"));
        assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].uid, "1234");
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let c = &spec.template.spec.as_ref().unwrap().containers[0];
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(args.starts_with("serve --role prefill"), "{args}");
        assert!(
            args.contains("--weights-seed 3")
                && args.contains("--chunk-size 64")
                && args.contains("--kv-wire-f16"),
            "{args}"
        );
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("1".into())
        );
        assert_eq!(c.image.as_deref(), Some("pdfleet/worker:dev"));
        let annotations = spec.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        let decode = worker_deployment(&p, Role::Decode, rs[1].1, 7, &defaults());
        let args = decode.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
            .join(" ");
        assert!(
            args.contains("--num-blocks 8192") && !args.contains("--kv-wire-f16"),
            "{args}"
        );
    }

    #[test]
    fn a_colocated_pool_runs_unified_workers_only() {
        let p =
            pool(serde_json::json!({"model": {}, "mode": "Colocated", "unified": {"replicas": 2}}));
        let rs = roles(&p);
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].0, Role::Unified);
    }

    #[test]
    fn topology_becomes_pod_affinity_required_or_preferred() {
        let p = pool(serde_json::json!({"model": {}, "prefill": {}, "decode": {},
            "topology": {"key": "topology.kubernetes.io/zone", "policy": "Required"}}));
        let a = affinity(&p).unwrap().pod_affinity.unwrap();
        let term = &a
            .required_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert_eq!(term.topology_key, "topology.kubernetes.io/zone");
        assert_eq!(
            term.label_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()[labels::POOL],
            "chat"
        );
        let p = pool(serde_json::json!({"model": {}, "prefill": {}, "decode": {},
            "topology": {"key": "example.com/rack", "policy": "Preferred"}}));
        let a = affinity(&p).unwrap().pod_affinity.unwrap();
        assert_eq!(
            a.preferred_during_scheduling_ignored_during_execution
                .unwrap()[0]
                .weight,
            100
        );
        assert!(affinity(&pool(
            serde_json::json!({"model": {}, "prefill": {}, "decode": {}})
        ))
        .is_none());
    }

    #[test]
    fn the_router_discovers_its_pool_and_is_reached_through_a_service() {
        let p = pool(
            serde_json::json!({"model": {"name": "toy-7"}, "prefill": {}, "decode": {},
            "router": {"serviceType": "NodePort", "replicas": 2}, "image": "reg/pdfleet:1"}),
        );
        let d = router_deployment(&p, &defaults());
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let c = &spec.template.spec.as_ref().unwrap().containers[0];
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(
            args.contains("--discover-pool chat") && args.contains("--model-name toy-7"),
            "{args}"
        );
        assert_eq!(
            c.image.as_deref(),
            Some("reg/pdfleet:1"),
            "the pool's image overrides the default"
        );
        let s = router_service(&p);
        assert_eq!(s.metadata.name.as_deref(), Some("chat"));
        assert_eq!(s.spec.unwrap().type_.as_deref(), Some("NodePort"));
        let h = role_service(&p, Role::Decode);
        assert_eq!(h.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"));
        assert_eq!(h.metadata.labels.unwrap()[labels::ROLE], "decode");
        assert_eq!(router_role_binding(&p).role_ref.name, ROUTER_CLUSTER_ROLE);
        assert_eq!(
            pdb(&p, Role::Decode).spec.unwrap().max_unavailable,
            Some(IntOrString::Int(1))
        );
    }

    #[test]
    fn weights_on_a_volume_are_mounted_and_passed() {
        let p = pool(
            serde_json::json!({"model": {"weights": {"file": "m/w.safetensors", "persistentVolumeClaim": "weights"}},
            "prefill": {}, "decode": {}}),
        );
        let (role, spec) = roles(&p)[0];
        let d = worker_deployment(&p, role, spec, spec.replicas, &defaults());
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.volumes.unwrap()[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "weights"
        );
        assert!(pod.containers[0]
            .args
            .as_ref()
            .unwrap()
            .join(" ")
            .contains("--weights /weights/m/w.safetensors"));
    }
}
