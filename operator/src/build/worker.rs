//! A worker role's children: its Deployment (placed by the pool's topology), its headless
//! Service (the router finds the workers through its EndpointSlices) and its PDB.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    PersistentVolumeClaimVolumeSource, PodAffinity, PodAffinityTerm, PodSpec, PodTemplateSpec,
    Probe, Service, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use pdfleet_api::labels::{self, env};
use pdfleet_api::worker_args::{EngineArgs, ModelArgs, StepPad, WorkerArgs};
use pdfleet_api::{BackendKind, Role};
use pdfleet_crds::{InferencePool, RoleSpec, TopologyPolicy};

use super::{
    child_name, container_security, field_env, http_probe, meta, pod_security, resources,
    scrape_annotations, selector, with_pod_settings, Defaults, Part,
};

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
        // A pod that holds a GPU runs on it or fails its start; one without runs on the CPU.
        backend: e.backend.unwrap_or(if spec.resources.gpus > 0 {
            BackendKind::Cuda
        } else {
            BackendKind::Cpu
        }),
        kv_wire_f16: e.kv_wire_f16 && role == Role::Prefill,
        pad_step_ms: (e.pad_step_ms.is_some() || e.pad_step_per_sequence_ms.is_some()).then(|| {
            StepPad {
                fixed_ms: e.pad_step_ms.unwrap_or(0) as f64,
                per_sequence_ms: e.pad_step_per_sequence_ms.unwrap_or(0) as f64,
            }
        }),
        pool: pool.name_any(),
        grace_period_s: spec.grace_period_seconds as u64,
        ..WorkerArgs::new(role)
    }
}

/// The selector of a role's pods, as a LabelSelector.
fn role_pods(pool: &InferencePool, role: Role) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector(pool, Part::Worker(role))),
        ..Default::default()
    }
}

/// Where a role's pods go. Decode workers go next to a prefill worker (required or preferred,
/// by the policy), so KV always has a short path; every role spreads over the domains (and the
/// nodes in them), so a pool uses every domain instead of fitting in one. Prefill workers are
/// placed first and decode workers follow them.
pub fn placement(
    pool: &InferencePool,
    role: Role,
) -> (Option<Affinity>, Option<Vec<TopologySpreadConstraint>>) {
    let Some(topo) = &pool.spec.topology else {
        return (None, None);
    };
    let spread = |key: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(role_pods(pool, role)),
        ..Default::default()
    };
    let mut spreads = vec![spread(&topo.key)];
    if topo.key != "kubernetes.io/hostname" {
        spreads.push(spread("kubernetes.io/hostname"));
    }
    let affinity = (role == Role::Decode).then(|| {
        let near_prefill = PodAffinityTerm {
            label_selector: Some(role_pods(pool, Role::Prefill)),
            topology_key: topo.key.clone(),
            ..Default::default()
        };
        let pod_affinity = match topo.policy {
            TopologyPolicy::Required => PodAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![near_prefill]),
                ..Default::default()
            },
            TopologyPolicy::Preferred => PodAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: near_prefill,
                    },
                ]),
                ..Default::default()
            },
        };
        Affinity {
            pod_affinity: Some(pod_affinity),
            ..Default::default()
        }
    });
    (affinity, Some(spreads))
}

/// The weights volume, when the model's weights are a file.
fn weights_volume(pool: &InferencePool) -> Option<Volume> {
    let w = &pool.spec.model.weights;
    let pvc = w.persistent_volume_claim.as_ref().map(|claim| Volume {
        name: "weights".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.clone(),
            read_only: Some(true),
        }),
        ..Default::default()
    });
    pvc.or_else(|| {
        w.config_map.as_ref().map(|cm| Volume {
            name: "weights".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
    })
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
    let mut pod_labels = super::labels(pool, part);
    pod_labels.insert("app.kubernetes.io/component".into(), "worker".into());
    let mut env = vec![field_env(env::POD, "metadata.name")];
    // The domain the router pairs within: the node, when the topology key is the hostname (the
    // router reads other keys' domains from the pool's topology map).
    if pool
        .spec
        .topology
        .as_ref()
        .is_some_and(|t| t.key == "kubernetes.io/hostname")
    {
        env.push(field_env(env::DOMAIN, "spec.nodeName"));
    }
    let weights = weights_volume(pool);
    // The root filesystem is read-only; the CUDA driver's JIT cache and any scratch go here.
    let scratch = Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    if weights.is_some() {
        mounts.push(VolumeMount {
            name: "weights".into(),
            mount_path: "/weights".into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let image = spec
        .image
        .clone()
        .or_else(|| pool.spec.worker_image.clone())
        .unwrap_or_else(|| defaults.worker_image.clone());
    let container = Container {
        name: "worker".into(),
        image: Some(image),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![labels::WORKER_BINARY.into()]),
        args: Some(worker_config(pool, role, spec).to_args()),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(labels::GRPC_PORT_NAME.into()),
                container_port: labels::GRPC_PORT as i32,
                ..Default::default()
            },
            ContainerPort {
                name: Some(labels::METRICS_PORT_NAME.into()),
                container_port: labels::METRICS_PORT as i32,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", labels::METRICS_PORT, 2)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz", labels::METRICS_PORT, 10)
        }),
        resources: Some(resources(&spec.resources)),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let (affinity, spread) = placement(pool, role);
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
            template: with_pod_settings(
                PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(scrape_annotations(labels::METRICS_PORT)),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        affinity,
                        topology_spread_constraints: spread,
                        security_context: Some(pod_security()),
                        // Workers talk gRPC to each other, never to the API server.
                        automount_service_account_token: Some(false),
                        // The worker drains for its grace period; leave it a little more.
                        termination_grace_period_seconds: Some(spec.grace_period_seconds + 5),
                        volumes: Some(std::iter::once(scratch).chain(weights).collect()),
                        ..Default::default()
                    }),
                },
                spec.pod.as_ref(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Headless Service per role: its EndpointSlices are how the router finds the workers.
pub fn role_service(pool: &InferencePool, role: Role) -> Service {
    let part = Part::Worker(role);
    let port = |name: &str, port: u16| ServicePort {
        name: Some(name.into()),
        port: port as i32,
        target_port: Some(IntOrString::Int(port as i32)),
        ..Default::default()
    };
    Service {
        metadata: meta(pool, child_name(pool, part), part),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(pool, part)),
            ports: Some(vec![
                port(labels::GRPC_PORT_NAME, labels::GRPC_PORT),
                port(labels::METRICS_PORT_NAME, labels::METRICS_PORT),
            ]),
            publish_not_ready_addresses: Some(false),
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

#[cfg(test)]
mod tests {
    use super::super::tests::{defaults, pool};
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn a_disaggregated_pool_has_prefill_and_decode_with_their_knobs() {
        let p = pool(
            "chat",
            serde_json::json!({
                "model": {"weights": {"seed": 3}},
                "prefill": {"replicas": 2, "engine": {"chunkSize": 64, "kvWireF16": true}, "resources": {"gpus": 1}},
                "decode": {"replicas": 3, "engine": {"kvBlocks": 8192}},
            }),
        );
        let rs = super::super::roles(&p);
        assert_eq!(
            rs.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            vec![Role::Prefill, Role::Decode]
        );
        let d = worker_deployment(&p, Role::Prefill, rs[0].1, rs[0].1.replicas, &defaults());
        assert_eq!(d.metadata.name.as_deref(), Some("chat-prefill"));
        assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].uid, "1234");
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.command.as_ref().unwrap(), &[labels::WORKER_BINARY]);
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(args.starts_with("serve --role prefill"), "{args}");
        assert!(
            args.contains("--weights-seed 3")
                && args.contains("--chunk-size 64")
                && args.contains("--kv-wire-f16")
                && args.contains("--pool chat"),
            "{args}"
        );
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("1".into())
        );
        assert_eq!(c.image.as_deref(), Some("pdfleet/worker:dev"));
        // Restricted: non-root, no escalation, no capabilities, read-only root.
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.allow_privilege_escalation, sc.read_only_root_filesystem),
            (Some(false), Some(true))
        );
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
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
    fn a_role_with_gpus_runs_cuda_and_its_pods_carry_their_settings() {
        let p = pool(
            "chat",
            serde_json::json!({"model": {},
                "prefill": {"resources": {"gpus": 1}, "pod": {
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "nodeSelector": {"gpu": "h200"}, "runtimeClassName": "nvidia",
                    "priorityClassName": "inference", "imagePullSecrets": ["regcred"],
                    "labels": {"team": "ml", "pdfleet.dev/role": "mine"},
                    "annotations": {"prometheus.io/scrape": "false"}}},
                "decode": {"resources": {"gpus": 1}, "engine": {"backend": "cpu"}}}),
        );
        let rs = super::super::roles(&p);
        let args = |i: usize| worker_config(&p, rs[i].0, rs[i].1).to_args().join(" ");
        assert!(args(0).contains("--backend cuda"), "{}", args(0));
        assert!(
            args(1).contains("--backend cpu"),
            "an explicit backend wins"
        );
        let cpu_only = pool(
            "c",
            serde_json::json!({"model": {}, "prefill": {}, "decode": {}}),
        );
        let r = super::super::roles(&cpu_only);
        assert!(worker_config(&cpu_only, r[0].0, r[0].1)
            .to_args()
            .join(" ")
            .contains("--backend cpu"));

        let t = worker_deployment(&p, Role::Prefill, rs[0].1, 1, &defaults())
            .spec
            .unwrap()
            .template;
        let pod = t.spec.unwrap();
        assert_eq!(
            pod.tolerations.unwrap()[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        assert_eq!(pod.node_selector.unwrap()["gpu"], "h200");
        assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("inference"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
        let meta = t.metadata.unwrap();
        let labels = meta.labels.unwrap();
        assert_eq!(labels["team"], "ml");
        assert_eq!(
            labels["pdfleet.dev/role"], "prefill",
            "the selector's labels stay"
        );
        assert_eq!(meta.annotations.unwrap()["prometheus.io/scrape"], "false");
    }

    #[test]
    fn decode_workers_follow_prefill_workers_and_every_role_spreads() {
        let p = pool(
            "chat",
            serde_json::json!({"model": {}, "prefill": {}, "decode": {},
            "topology": {"key": "topology.kubernetes.io/zone", "policy": "Required"}}),
        );
        let (affinity, spread) = placement(&p, Role::Decode);
        let term = &affinity
            .unwrap()
            .pod_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert_eq!(term.topology_key, "topology.kubernetes.io/zone");
        let wanted = term
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(
            (wanted[labels::POOL].as_str(), wanted[labels::ROLE].as_str()),
            ("chat", "prefill"),
            "decode follows the pool's prefill workers, not the whole pool (router included)"
        );
        let keys: Vec<_> = spread
            .unwrap()
            .iter()
            .map(|s| s.topology_key.clone())
            .collect();
        assert_eq!(
            keys,
            ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        );
        let (affinity, spread) = placement(&p, Role::Prefill);
        assert!(affinity.is_none(), "prefill goes anywhere, spread out");
        assert_eq!(spread.unwrap()[0].when_unsatisfiable, "ScheduleAnyway");
        let p = pool(
            "chat",
            serde_json::json!({"model": {}, "prefill": {}, "decode": {},
            "topology": {"key": "example.com/rack", "policy": "Preferred"}}),
        );
        let a = placement(&p, Role::Decode).0.unwrap().pod_affinity.unwrap();
        assert_eq!(
            a.preferred_during_scheduling_ignored_during_execution
                .unwrap()[0]
                .weight,
            100
        );
        let none = pool(
            "chat",
            serde_json::json!({"model": {}, "prefill": {}, "decode": {}}),
        );
        assert_eq!(placement(&none, Role::Decode), (None, None));
    }

    #[test]
    fn weights_on_a_volume_are_mounted_and_passed() {
        let p = pool(
            "chat",
            serde_json::json!({"model": {"weights": {"file": "m/w.safetensors", "persistentVolumeClaim": "weights"}},
            "prefill": {}, "decode": {}}),
        );
        let (role, spec) = super::super::roles(&p)[0];
        let d = worker_deployment(&p, role, spec, spec.replicas, &defaults());
        let pod = d.spec.unwrap().template.spec.unwrap();
        let claim = pod
            .volumes
            .unwrap()
            .iter()
            .find_map(|v| v.persistent_volume_claim.clone())
            .unwrap();
        assert_eq!(claim.claim_name, "weights");
        assert!(pod.containers[0]
            .args
            .as_ref()
            .unwrap()
            .join(" ")
            .contains("--weights /weights/m/w.safetensors"));
    }

    #[test]
    fn images_come_from_the_role_then_the_pool_then_the_operator() {
        let p = pool(
            "chat",
            serde_json::json!({"model": {}, "prefill": {"image": "reg/p:1"}, "decode": {},
            "workerImage": "reg/w:1"}),
        );
        let rs = super::super::roles(&p);
        let image = |i: usize| {
            worker_deployment(&p, rs[i].0, rs[i].1, 1, &defaults())
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .image
                .clone()
                .unwrap()
        };
        assert_eq!(
            (image(0).as_str(), image(1).as_str()),
            ("reg/p:1", "reg/w:1")
        );
    }
}
