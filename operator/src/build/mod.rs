//! The desired children of a pool: pure functions of its spec (and, for the topology map, of
//! where its pods run), so they are tested without a cluster. Every child carries the pool's
//! labels and an owner reference to it; what is not in [`Children`] is pruned.

mod router;
mod worker;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, EnvVar, EnvVarSource, HTTPGetAction, LocalObjectReference,
    ObjectFieldSelector, PodSecurityContext, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use pdfleet_api::labels;
use pdfleet_api::Role;
use pdfleet_crds::{
    AutoscalingMode, InferencePool, PodSettings, ResourceSpec, RoleScale, RoleScaleSpec, RoleSpec,
};

pub use router::{router_deployment, router_role_binding, router_service, router_service_account};
pub use worker::{pdb, role_service, worker_deployment};

use crate::names::Names;

/// Images used when the pool names none.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub worker_image: String,
    pub router_image: String,
    /// The ClusterRole routers are bound to (named by the chart's release).
    pub router_cluster_role: String,
}

/// What a child of a pool is for: a worker role's, the router's, or the pool's config maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Worker(Role),
    Router,
    Model,
    Topology,
}

impl Part {
    /// Its value of the role label, and its children's name suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Worker(role) => role.as_str(),
            Part::Router => labels::ROUTER,
            Part::Model => "model",
            Part::Topology => "topology",
        }
    }
}

/// The worker roles a pool runs in its mode, with their specs.
pub fn roles(pool: &InferencePool) -> Vec<(Role, &RoleSpec)> {
    let s = &pool.spec;
    s.mode
        .roles()
        .iter()
        .filter_map(|&r| s.role(r).map(|spec| (r, spec)))
        .collect()
}

pub fn names(pool: &InferencePool) -> Names {
    Names::new(&pool.name_any())
}

pub fn child_name(pool: &InferencePool, part: Part) -> String {
    names(pool).child(part.as_str())
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

/// The labels that select a part's pods.
pub fn selector(pool: &InferencePool, part: Part) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::POOL.to_string(), pool.name_any()),
        (labels::ROLE.to_string(), part.as_str().to_string()),
    ])
}

/// The label selector of everything the operator made for a pool (for pruning).
pub fn pool_selector(pool: &InferencePool) -> String {
    format!(
        "{}={},{}={}",
        labels::MANAGED_BY,
        labels::OPERATOR,
        labels::POOL,
        pool.name_any()
    )
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

fn http_probe(path: &str, port: u16, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port as i32),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

fn resources(r: &ResourceSpec) -> ResourceRequirements {
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

/// The user every pdfleet container runs as (the images need no root).
const RUN_AS: i64 = 65532;

/// Pods that pass the `restricted` Pod Security level.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A part's pod settings on its pod template: the scheduling fields, extra labels (the
/// operator's own keys are refused by the CRD and would lose here anyway) and annotations (which
/// win, so users can change how their Prometheus scrapes).
fn with_pod_settings(
    mut template: PodTemplateSpec,
    settings: Option<&PodSettings>,
) -> PodTemplateSpec {
    let Some(s) = settings else {
        return template;
    };
    let meta = template.metadata.get_or_insert_with(Default::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    for (k, v) in &s.labels {
        labels.entry(k.clone()).or_insert_with(|| v.clone());
    }
    if !s.annotations.is_empty() {
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        annotations.extend(s.annotations.clone());
    }
    let pod = template.spec.get_or_insert_with(Default::default);
    if !s.tolerations.is_empty() {
        pod.tolerations = Some(s.tolerations.clone());
    }
    if !s.node_selector.is_empty() {
        pod.node_selector = Some(s.node_selector.clone());
    }
    pod.runtime_class_name = s.runtime_class_name.clone();
    pod.priority_class_name = s.priority_class_name.clone();
    if !s.image_pull_secrets.is_empty() {
        pod.image_pull_secrets = Some(
            s.image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect(),
        );
    }
    template
}

fn scrape_annotations(port: u16) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), port.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ])
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

/// The topology domain of each node the pool's pods run on (its value of the pool's topology
/// key): the router pairs prefill and decode workers by it, for any key.
pub fn topology_config_map(pool: &InferencePool, domains: &BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: meta(pool, child_name(pool, Part::Topology), Part::Topology),
        data: Some(domains.clone()),
        ..Default::default()
    }
}

/// Everything a pool should have in the cluster now.
#[derive(Clone, Debug, Default)]
pub struct Children {
    pub config_maps: Vec<ConfigMap>,
    pub services: Vec<Service>,
    pub deployments: Vec<Deployment>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub service_accounts: Vec<ServiceAccount>,
    pub role_bindings: Vec<RoleBinding>,
    /// External autoscaling: one per worker role. Created once with the role's replicas, then
    /// scaled by others; the operator never writes their spec again.
    pub role_scales: Vec<RoleScale>,
}

/// The scale object of one worker role (External autoscaling).
pub fn role_scale(pool: &InferencePool, role: Role, replicas: i32) -> RoleScale {
    let mut rs = RoleScale::new(
        &child_name(pool, Part::Worker(role)),
        RoleScaleSpec {
            pool: pool.name_any(),
            role,
            replicas,
        },
    );
    rs.metadata = meta(pool, rs.name_any(), Part::Worker(role));
    rs
}

/// Whether the pool's replicas are written by something else, through its RoleScales.
pub fn external_scaling(pool: &InferencePool) -> bool {
    pool.spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.mode == AutoscalingMode::External)
}

/// The pool's children: a Deployment, a headless Service and a PDB per worker role of its mode
/// (`replicas` gives each role's count), the router's Deployment, Service, account and binding
/// when it runs one, and the model and topology ConfigMaps.
pub fn children(
    pool: &InferencePool,
    replicas: impl Fn(Role, &RoleSpec) -> i32,
    defaults: &Defaults,
    domains: &BTreeMap<String, String>,
) -> Children {
    let mut c = Children {
        config_maps: vec![model_config_map(pool)],
        ..Default::default()
    };
    if pool.spec.topology.is_some() {
        c.config_maps.push(topology_config_map(pool, domains));
    }
    for (role, spec) in roles(pool) {
        let n = replicas(role, spec);
        c.services.push(role_service(pool, role));
        c.deployments
            .push(worker_deployment(pool, role, spec, n, defaults));
        c.pdbs.push(pdb(pool, role));
        if external_scaling(pool) {
            c.role_scales.push(role_scale(pool, role, n));
        }
    }
    if pool.spec.router.replicas > 0 {
        c.service_accounts.push(router_service_account(pool));
        c.role_bindings
            .push(router_role_binding(pool, &defaults.router_cluster_role));
        c.deployments.push(router_deployment(pool, defaults));
        c.services.push(router_service(pool));
    }
    c
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pdfleet_crds::InferencePoolSpec;

    pub fn pool(name: &str, spec: serde_json::Value) -> InferencePool {
        let spec: InferencePoolSpec = serde_json::from_value(spec).unwrap();
        let mut p = InferencePool::new(name, spec);
        p.metadata.namespace = Some("ml".into());
        p.metadata.uid = Some("1234".into());
        p
    }

    pub fn defaults() -> Defaults {
        Defaults {
            worker_image: "pdfleet/worker:dev".into(),
            router_image: "pdfleet/router:dev".into(),
            router_cluster_role: "pdfleet-router".into(),
        }
    }

    fn names_of(c: &Children) -> Vec<String> {
        let mut n: Vec<String> = c
            .deployments
            .iter()
            .map(|d| format!("deployment/{}", d.name_any()))
            .chain(
                c.services
                    .iter()
                    .map(|s| format!("service/{}", s.name_any())),
            )
            .chain(c.pdbs.iter().map(|s| format!("pdb/{}", s.name_any())))
            .chain(
                c.config_maps
                    .iter()
                    .map(|s| format!("configmap/{}", s.name_any())),
            )
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_pools_children_follow_its_mode_and_its_router() {
        let spec = |mode: &str, router: i32| {
            serde_json::json!({"model": {}, "mode": mode, "prefill": {}, "decode": {}, "unified": {},
                "router": {"replicas": router}})
        };
        let n = |mode, router| {
            names_of(&children(
                &pool("chat", spec(mode, router)),
                |_, s| s.replicas,
                &defaults(),
                &BTreeMap::new(),
            ))
        };
        assert_eq!(
            n("Disaggregated", 1),
            [
                "configmap/chat-model",
                "deployment/chat-decode",
                "deployment/chat-prefill",
                "deployment/chat-router",
                "pdb/chat-decode",
                "pdb/chat-prefill",
                "service/chat",
                "service/chat-decode",
                "service/chat-prefill",
            ]
        );
        let colocated = n("Colocated", 0);
        assert_eq!(
            colocated,
            [
                "configmap/chat-model",
                "deployment/chat-unified",
                "pdb/chat-unified",
                "service/chat-unified"
            ],
            "no prefill, decode or router children"
        );
    }

    #[test]
    fn a_dotted_pool_name_gives_valid_child_names() {
        let p = pool(
            "llama-3.1",
            serde_json::json!({"model": {}, "prefill": {}, "decode": {}, "topology": {"key": "example.com/rack"}}),
        );
        let c = children(&p, |_, s| s.replicas, &defaults(), &BTreeMap::new());
        for name in names_of(&c) {
            let name = name.split('/').nth(1).unwrap();
            assert!(crate::names::is_dns1035_label(name), "{name}");
        }
        // Labels keep the pool's own name.
        assert_eq!(c.deployments[0].labels()[labels::POOL], "llama-3.1");
    }
}
