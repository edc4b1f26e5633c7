//! The `InferencePool` API: a pool of prefill and decode workers (or unified ones) and a router,
//! for one model. Validation lives in the schema and in CEL rules, so that an invalid pool is
//! refused at `kubectl apply` with a message a person understands.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
pub use pdfleet_api::{BackendKind, KvDtype, PoolMode, Role};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pdfleet.dev",
    version = "v1alpha1",
    kind = "InferencePool",
    namespaced,
    shortname = "ipool",
    category = "pdfleet",
    validation = Rule::new("size(self.metadata.name) <= 63").message("an InferencePool's name is at most 63 characters: it is the pdfleet.dev/pool label of everything the pool runs"),
    status = "InferencePoolStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Prefill","type":"string","jsonPath":".status.prefillReplicas"}"#,
    printcolumn = r#"{"name":"Decode","type":"string","jsonPath":".status.decodeReplicas"}"#,
    printcolumn = r#"{"name":"TTFT ms","type":"number","jsonPath":".status.ttftMs"}"#,
    printcolumn = r#"{"name":"ITL ms","type":"number","jsonPath":".status.itlMs"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'Disaggregated' || (has(self.prefill) && has(self.decode))").message("a Disaggregated pool needs both prefill and decode"))]
#[x_kube(validation = Rule::new("self.mode != 'Disaggregated' || !has(self.unified)").message("a Disaggregated pool runs prefill and decode workers; remove unified"))]
#[x_kube(validation = Rule::new("self.mode != 'Colocated' || has(self.unified)").message("a Colocated pool needs unified"))]
#[x_kube(validation = Rule::new("self.mode != 'Colocated' || (!has(self.prefill) && !has(self.decode))").message("a Colocated pool runs unified workers only; remove prefill and decode"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || has(self.slo)").message("autoscaling needs slo targets to scale against"))]
pub struct InferencePoolSpec {
    pub model: ModelSpec,
    #[serde(default)]
    pub mode: PoolMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<RoleSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<RoleSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<RoleSpec>,
    #[serde(default)]
    pub router: RouterSpec,
    /// Where prefill and decode are co-located so that KV moves over the shortest path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// The workers' image unless a role names its own (the router's is `router.image`); both
    /// default to the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub worker_image: Option<String>,
}

/// The engine's model. With the defaults it is the primer's toy attention model.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.dim % self.nHeads == 0").message("nHeads must divide dim"))]
#[x_kube(validation = Rule::new("self.nHeads % self.nKvHeads == 0").message("nKvHeads must divide nHeads"))]
#[x_kube(validation = Rule::new("self.dim / self.nHeads <= 256").message("the head size (dim / nHeads) must be at most 256"))]
#[x_kube(validation = Rule::new("(has(self.weights) && (has(self.weights.seed) || has(self.weights.file))) || (self.vocabSize == 100 && self.dim == 32 && self.nHeads == 1 && self.nKvHeads == 1 && self.nLayers == 1 && self.maxSeqLen == 2048)").message("the embedded weights are the primer's shape (vocabSize 100, dim 32, one head, one layer, maxSeqLen 2048): give weights.seed or weights.file for another shape"))]
pub struct ModelSpec {
    /// The name clients ask for in requests.
    #[serde(default = "default_model_name")]
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    #[serde(default = "default_vocab")]
    #[schemars(range(min = 1, max = 1000000))]
    pub vocab_size: u32,
    #[serde(default = "default_dim")]
    #[schemars(range(min = 1, max = 65536))]
    pub dim: u32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub n_heads: u32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub n_kv_heads: u32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 256))]
    pub n_layers: u32,
    #[serde(default = "default_max_seq_len")]
    #[schemars(range(min = 2, max = 1048576))]
    pub max_seq_len: u32,
    #[serde(default)]
    pub kv_dtype: KvDtype,
    #[serde(default)]
    pub weights: WeightsSpec,
}

fn default_model_name() -> String {
    "toy".into()
}
fn default_vocab() -> u32 {
    100
}
fn default_dim() -> u32 {
    32
}
fn one() -> u32 {
    1
}
fn default_max_seq_len() -> u32 {
    2048
}

/// Weights drawn from a seed, or read from a safetensors file on a volume; with neither, the
/// primer's seed-7 model that every worker embeds.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.seed) && has(self.file))").message("weights come from a seed or a file, not both"))]
#[x_kube(validation = Rule::new("!has(self.file) || has(self.persistentVolumeClaim) || has(self.configMap)").message("a weights file needs the volume it is on: persistentVolumeClaim or configMap"))]
pub struct WeightsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Path of the safetensors file inside the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.replicas").message("minReplicas must not exceed replicas"))]
#[x_kube(validation = Rule::new("!has(self.maxReplicas) || self.replicas <= self.maxReplicas").message("replicas must not exceed maxReplicas"))]
pub struct RoleSpec {
    #[serde(default = "one_i32")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: Option<i32>,
    #[serde(default)]
    pub resources: ResourceSpec,
    #[serde(default)]
    pub engine: EngineSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How long a worker may take to finish in-flight work when stopped.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 0, max = 3600))]
    pub grace_period_seconds: i64,
    /// Where and how the role's pods run: GPU taints, node pools, runtime class, priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodSettings>,
}

/// Scheduling and metadata for a part's pods, passed through to their pod template. GPU nodes
/// are usually tainted (`nvidia.com/gpu:NoSchedule`): a GPU role tolerates that taint here.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.labels) || self.labels.all(k, !k.startsWith('pdfleet.dev/') && !k.startsWith('app.kubernetes.io/'))").message("labels under pdfleet.dev/ and app.kubernetes.io/ are the operator's: the pool's selectors use them"))]
pub struct PodSettings {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// e.g. `nvidia` where the NVIDIA runtime is not the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Extra pod labels (the operator's own keys are refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations; they win over the operator's scrape annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Secrets in the pool's namespace to pull the images with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<String>,
}

fn one_i32() -> i32 {
    1
}
fn default_grace() -> i64 {
    30
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSpec {
    /// CPU request, e.g. "500m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("cpu must be a Kubernetes quantity, e.g. 500m or 2"))]
    pub cpu: Option<String>,
    /// Memory request and limit, e.g. "1Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("memory must be a Kubernetes quantity, e.g. 512Mi or 2Gi"))]
    pub memory: Option<String>,
    /// nvidia.com/gpu per pod.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: u32,
}

/// Engine knobs; unset ones take the worker's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.maxBatchTokens) ? self.maxBatchTokens : 2048) >= (has(self.maxRunning) ? self.maxRunning : 256)").message("maxBatchTokens must be at least maxRunning (2048 and 256 when unset): every running sequence decodes a token per step"))]
pub struct EngineSpec {
    /// Where the model runs: `cuda` whenever the role has GPUs, else `cpu`, unless set here.
    /// A `cuda` worker that finds no GPU fails its start, never falls back to the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_backend")]
    pub backend: Option<BackendKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_blocks: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batch_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub chunk_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_running: Option<u32>,
    /// Send KV to decode workers as f16 (halves the bytes of an f32 cache).
    #[serde(default)]
    pub kv_wire_f16: bool,
    /// Test knob: every engine step lasts at least `padStepMs` plus `padStepPerSequenceMs`
    /// per sequence in it, so that capacity is known in advance on any machine (the
    /// autoscaling e2e uses it). Leave unset in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub pad_step_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub pad_step_per_sequence_ms: Option<u32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus == 0").message("a router needs no GPU"))]
pub struct RouterSpec {
    /// 0 runs no router: its Deployment and Service go away (the workers' Services stay).
    #[serde(default = "one_i32")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    #[serde(default)]
    pub service_type: ServiceType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Requests (and the memory limit) of each router pod.
    #[serde(default = "router_resources")]
    pub resources: ResourceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodSettings>,
}

fn router_resources() -> ResourceSpec {
    ResourceSpec {
        cpu: Some("100m".into()),
        memory: Some("128Mi".into()),
        gpus: 0,
    }
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            replicas: 1,
            service_type: ServiceType::ClusterIP,
            image: None,
            resources: router_resources(),
            pod: None,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpec {
    /// Node label whose value is a domain: kubernetes.io/hostname, a rack label, or
    /// topology.kubernetes.io/zone.
    #[schemars(length(min = 1, max = 316))]
    pub key: String,
    #[serde(default)]
    pub policy: TopologyPolicy,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TopologyPolicy {
    /// Prefill and decode pods must share a domain (pods stay Pending otherwise).
    #[default]
    Required,
    /// Share a domain when there is room; otherwise run elsewhere.
    Preferred,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.quantile > 0.0 && self.quantile < 1.0").message("quantile must be between 0 and 1, e.g. 0.99"))]
pub struct SloSpec {
    /// Time to first token target, milliseconds.
    #[schemars(range(min = 1))]
    pub ttft_ms: u32,
    /// Inter-token latency target, milliseconds.
    #[schemars(range(min = 1))]
    pub itl_ms: u32,
    #[serde(default = "default_quantile")]
    pub quantile: f64,
}

fn default_quantile() -> f64 {
    0.99
}

/// Who writes the roles' replicas.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AutoscalingMode {
    /// The operator's planner.
    #[default]
    Builtin,
    /// Something else (an HPA, KEDA) through each role's `RoleScale` and its scale subresource;
    /// the planner only recommends.
    External,
}

/// The SLO planner: each role sized from its measured demand and capacity against `slo`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.prometheusUrl) || self.prometheusUrl.startsWith('http://') || self.prometheusUrl.startsWith('https://')").message("prometheusUrl must be an http:// or https:// URL"))]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub mode: AutoscalingMode,
    /// This pool's Prometheus, instead of the operator's; refused unless the operator allows
    /// pools to name their own (the chart's `prometheus.allowPoolOverride`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_url: Option<String>,
    /// How often the planner looks at the pool.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub interval_seconds: u32,
    /// A role shrinks only to the highest recommendation over this window (the HPA's rule).
    #[serde(default = "default_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_window_seconds: u32,
    /// A prompt backlog is to be cleared within about this.
    #[serde(default = "default_backlog_clear")]
    #[schemars(range(min = 1, max = 3600))]
    pub backlog_clear_seconds: u32,
}

fn default_interval() -> u32 {
    5
}
fn default_down_window() -> u32 {
    300
}
fn default_backlog_clear() -> u32 {
    15
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    pub ready: i32,
    pub desired: i32,
    /// Asked for but not ready yet (pending or starting): capacity on the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<i32>,
    /// What the planner recommends (in External mode, for the HPA or KEDA to weigh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended: Option<i32>,
    /// Prefill: prompt tokens per second; decode: generated tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<f64>,
    /// The same unit, per replica, as measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_per_replica: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilisation: Option<f64>,
    /// The model's TTFT (prefill) or ITL (decode) at the desired replicas, and what users saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_ms: Option<f64>,
    /// When the planner last changed this role's replicas (RFC 3339), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<RoleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<RoleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<RoleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RoleStatus>,
    /// "ready/desired" of the prefill role (the unified role in a Colocated pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_replicas: Option<String>,
    /// "ready/desired" of the decode role (the unified role in a Colocated pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_replicas: Option<String>,
    /// Observed time to first token at the SLO's quantile, from Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// Observed inter-token latency at the SLO's quantile, from Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itl_ms: Option<f64>,
    /// The role most of the time to first token is spent in (prefill or decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_role")]
    pub bottleneck: Option<Role>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl InferencePoolStatus {
    pub fn role(&self, role: Role) -> Option<&RoleStatus> {
        match role {
            Role::Prefill => self.prefill.as_ref(),
            Role::Decode => self.decode.as_ref(),
            Role::Unified => self.unified.as_ref(),
        }
    }
}

/// An optional role as a structural schema (a plain string enum, not `anyOf` with null).
fn optional_role(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
    schemars::json_schema!({"type": "string", "enum": names, "nullable": true})
}

/// An optional backend as a structural schema, like [`optional_role`].
fn optional_backend(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = BackendKind::ALL.iter().map(|b| b.as_str()).collect();
    schemars::json_schema!({"type": "string", "enum": names, "nullable": true,
        "description": "Where the model runs: cuda whenever the role has GPUs, else cpu, unless set here. A cuda worker that finds no GPU fails its start, never falls back to the CPU."})
}

/// One role's replicas, as an object with a scale subresource, for an HPA or KEDA to drive
/// in External mode. The operator creates one per worker role and runs what `spec.replicas`
/// says.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pdfleet.dev",
    version = "v1alpha1",
    kind = "RoleScale",
    namespaced,
    category = "pdfleet",
    status = "RoleScaleStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Recommended","type":"integer","jsonPath":".status.recommended"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.replicas"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RoleScaleSpec {
    pub pool: String,
    pub role: Role,
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleScaleStatus {
    /// Ready replicas.
    pub replicas: i32,
    /// The role's pods, for an HPA's pod metrics.
    pub selector: String,
    /// The planner's recommendation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended: Option<i32>,
}

impl InferencePoolSpec {
    /// The spec of a worker role, when the pool names one.
    pub fn role(&self, role: Role) -> Option<&RoleSpec> {
        match role {
            Role::Prefill => self.prefill.as_ref(),
            Role::Decode => self.decode.as_ref(),
            Role::Unified => self.unified.as_ref(),
        }
    }
}

/// The CRDs as YAML, as committed in `crds/inferencepool.yaml` and the chart: the pool, and
/// the per-role scale objects of External autoscaling.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = |crd| serde_yaml::to_string(&crd).expect("the CRD serialises");
    format!(
        "{}---\n{}",
        yaml(InferencePool::crd()),
        yaml(RoleScale::crd())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_crd_yaml_is_current() {
        let committed = include_str!("../inferencepool.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/inferencepool.yaml is stale: run `cargo run -p pdfleet-crds --bin crdgen > crds/inferencepool.yaml` and copy it to charts/pdfleet/crds/"
        );
        let chart = include_str!("../../charts/pdfleet/crds/inferencepool.yaml");
        assert!(
            chart == committed,
            "charts/pdfleet/crds/inferencepool.yaml differs from crds/inferencepool.yaml"
        );
    }

    #[test]
    fn the_schema_carries_the_cel_rules_and_defaults() {
        let yaml = crd_yaml();
        for rule in [
            "nHeads must divide dim",
            "minReplicas must not exceed replicas",
            "a Disaggregated pool needs both prefill and decode",
        ] {
            assert!(yaml.contains(rule), "missing rule {rule}");
        }
        // An API server refuses a schema that is not structural; Option<enum> is the usual way
        // to make one (anyOf with null).
        assert!(!yaml.contains("anyOf"), "a non-structural schema");
    }

    #[test]
    fn a_minimal_pool_takes_the_primer_model() {
        let spec: InferencePoolSpec = serde_json::from_value(serde_json::json!({
            "model": {}, "prefill": {}, "decode": {"replicas": 2}
        }))
        .unwrap();
        assert_eq!(
            (spec.model.dim, spec.model.vocab_size, spec.mode),
            (32, 100, PoolMode::Disaggregated)
        );
        assert_eq!(spec.decode.unwrap().replicas, 2);
        assert_eq!(spec.router.replicas, 1);
    }
}
