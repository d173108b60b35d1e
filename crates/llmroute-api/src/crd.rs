//! The custom resources `LLMRoute` and `LLMPolicy` (group `llmroute.dev`, version `v1alpha1`).
//!
//! The spec types are plain serde and schemars data, so `llmroute standalone` reads the same
//! `LLMRoute` from YAML files without linking Kubernetes. With the `crd` feature, kube's
//! `CustomResource` derive adds the resource types (`LlmRoute`, `LlmPolicy`) and their
//! `CustomResourceDefinition`s. Every constraint the OpenAPI schema can state is in the schema;
//! what it cannot state is a CEL rule (`x-kubernetes-validations`), and [`LlmRouteSpec::check`]
//! repeats every rule, because servers before 1.25 drop CEL rules without a word.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Preference;
use crate::config::Exploration;
pub use crate::rollout::{
    CanaryStep, EstimateFigures, GateFigures, GateSpec, LiveFigures, RetentionSpec, RolloutSpec,
    TrainingData, TrainingSpec,
};

/// API group of the resources.
pub const GROUP: &str = "llmroute.dev";
/// Version of the resources.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of the resources.
pub const API_VERSION: &str = "llmroute.dev/v1alpha1";

/// Largest number of models in one route.
pub const MAX_MODELS: usize = 32;
/// Largest number of attempts of one request, across models.
pub const MAX_ATTEMPTS: u32 = 8;

/// The route a user declares: its model pool with prices, the default preference, exploration,
/// the fallback model and the policy to serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "crd", derive(kube::CustomResource))]
#[cfg_attr(
    feature = "crd",
    kube(
        group = "llmroute.dev",
        version = "v1alpha1",
        kind = "LLMRoute",
        root = "LlmRoute",
        plural = "llmroutes",
        singular = "llmroute",
        shortname = "llmr",
        category = "llmroute",
        namespaced,
        status = "LlmRouteStatus",
        doc = "A route: a pool of OpenAI-compatible models with prices, served to applications through the llmroute sidecar by a learned routing policy.",
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
        printcolumn = r#"{"name":"Stable","type":"string","jsonPath":".status.stablePolicy"}"#,
        printcolumn = r#"{"name":"Canary","type":"string","jsonPath":".status.canaryPolicy"}"#,
        printcolumn = r#"{"name":"Weight","type":"number","jsonPath":".status.canaryWeight"}"#,
        printcolumn = r#"{"name":"Models","type":"integer","jsonPath":".status.models"}"#,
        printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.injectedPods"}"#,
        printcolumn = r#"{"name":"Fallback","type":"string","priority":1,"jsonPath":".spec.fallback"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.models.all(m, self.models.exists_one(n, n.name == m.name))",
        "message": "model names must be unique within a route"
    },
    {
        "rule": "self.models.exists(m, m.name == self.fallback)",
        "message": "spec.fallback must name one of spec.models",
        "fieldPath": ".fallback"
    },
    {
        "rule": "!has(self.maxAttempts) || self.maxAttempts <= size(self.models)",
        "message": "spec.maxAttempts cannot exceed the number of models",
        "fieldPath": ".maxAttempts"
    }
]))]
pub struct LlmRouteSpec {
    /// The model pool. The policy's outputs follow this order, so reordering models calls for a
    /// new policy.
    #[schemars(length(min = 1, max = 32))]
    pub models: Vec<RouteModel>,
    /// Preference of requests that do not send one: `{quality, cost}` summing to 1.
    pub default_preference: Preference,
    /// How a decision is drawn from the policy's probabilities (default: greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exploration: Option<ExplorationSpec>,
    /// Model served when no policy can run. Must be one of `models`.
    #[schemars(length(min = 1, max = 253))]
    pub fallback: String,
    /// Maximum number of models one request is tried on (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub max_attempts: Option<u32>,
    /// Cost scale τ of the reward, in USD per request: a request costing τ counts as cost 1.
    /// When absent it is calibrated from observed costs (the 95th percentile); until then,
    /// the initial policy uses the price of 1 000 tokens on the most expensive model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub cost_scale_usd: Option<f64>,
    /// Which policy to serve: a pinned version, and the policy new routes start with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySpec>,
    /// Settings of the sidecar injected into this route's pods, over the operator's defaults;
    /// pod annotations override them in turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
    /// When to train candidate policies from the route's events, and the off-policy gate
    /// they must pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSpec>,
    /// Canary rollout of a candidate that passed the gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// How long the route's events are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
}

/// Sidecar settings of a route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarSpec {
    /// Container image of the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^\S+$"))]
    pub image: Option<String>,
    /// CPU request, such as `100m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9.]+(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"))]
    pub cpu_request: Option<String>,
    /// Memory request, such as `256Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9.]+(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"))]
    pub memory_request: Option<String>,
    /// Memory limit, such as `512Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9.]+(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"))]
    pub memory_limit: Option<String>,
}

/// One model of a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteModel {
    /// The name applications and the policy use for this model.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9._:/]*[A-Za-z0-9])?$")
    )]
    pub name: String,
    /// Base URL of an OpenAI-compatible API, up to and including `/v1`.
    #[schemars(
        length(min = 8, max = 2048),
        regex(pattern = r"^https?://[^\s/]+(/\S*)?$")
    )]
    pub endpoint: String,
    /// Model id sent upstream.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// Secret key holding the upstream API key; none for endpoints without authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// List prices of the model.
    pub pricing: RoutePricing,
    /// Timeout for the response headers and each gap between streamed chunks, in seconds
    /// (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001, max = 3600.0))]
    pub timeout_seconds: Option<f64>,
}

/// A key of a Secret in the route's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A key of a ConfigMap in the route's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key within the ConfigMap's `binaryData`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// List prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePricing {
    /// USD per million prompt tokens.
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub input_usd_per_million_tokens: f64,
    /// USD per million completion tokens.
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub output_usd_per_million_tokens: f64,
}

/// Exploration rule as the resource states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ExplorationMode {
    /// The model of maximum probability (propensity 1).
    Greedy,
    /// A model drawn from the policy's probabilities.
    Sample,
    /// The greedy model with probability `1 - epsilon`, otherwise a uniformly drawn one.
    EpsilonGreedy,
}

/// How a decision is drawn from the policy's probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.mode == 'epsilonGreedy' ? has(self.epsilon) : !has(self.epsilon)",
        "message": "epsilon is required with mode epsilonGreedy and not allowed otherwise"
    }
]))]
pub struct ExplorationSpec {
    /// `greedy`, `sample` or `epsilonGreedy`.
    pub mode: ExplorationMode,
    /// Probability of a uniformly drawn model, with `epsilonGreedy` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub epsilon: Option<f64>,
}

/// The policy a route serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Pins the stable policy to this published version; the newest stable one otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub version: Option<String>,
    /// A pretrained policy (an ONNX file written by `llmroute train`, in a ConfigMap's
    /// `binaryData`) to start from. Without it a new route starts from the pricing prior.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<ConfigMapKeyRef>,
}

/// Status of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A status condition, as in `metav1.Condition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `PolicyReady`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// One CamelCase word naming why the condition has this status.
    pub reason: String,
    /// What happened and what to do about it.
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation of the spec this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What the operator observed of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmRouteStatus {
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `PolicyReady`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Version of the policy that serves the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_policy: Option<String>,
    /// sha256 of the stable policy's ONNX file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_policy_sha256: Option<String>,
    /// Number of models in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<u32>,
    /// Version of the sidecar configuration; it grows by one at every change sidecars see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<u64>,
    /// sha256 of the sidecar configuration of `configVersion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Pods of the route that run the injected sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected_pods: Option<u32>,
    /// Pods that ask for the route but were not injected; each has an Event with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_pods: Option<u32>,
    /// Version of the policy under canary analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_policy: Option<String>,
    /// sha256 of the canary policy's ONNX file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_policy_sha256: Option<String>,
    /// Share of routed requests the canary decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<f64>,
    /// Index of the canary step, from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_step: Option<u32>,
    /// The last training run: when, on what, and what became of its candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_training: Option<LastTraining>,
    /// Why the last canary was aborted, with its figures; the route is `Degraded` until a
    /// later candidate is promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_abort: Option<String>,
    /// The highest policy version the route has had, deleted ones included. New versions are
    /// numbered above it, so no version name is given twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_policy_version: Option<String>,
}

/// The last training run of a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastTraining {
    /// When the run ended (RFC 3339).
    pub time: String,
    /// The candidate version it produced, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// Outcome of the run, such as `GatePassed`, `GateRejected` or `TrainingFailed`.
    pub result: String,
    /// One sentence with the run's figures.
    pub message: String,
}

/// Lifecycle phase of a policy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyPhase {
    /// Trained, waiting for its off-policy gate.
    Candidate,
    /// Serving a share of the route's traffic.
    Canary,
    /// Serving the route.
    Stable,
    /// Served before, replaced since.
    Retired,
    /// Failed its off-policy gate or its canary.
    Rejected,
}

/// Where a policy version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PolicyOrigin {
    /// Built from the route's prices: see the operator's documentation.
    PricingPrior,
    /// A pretrained policy the route references.
    Pretrained,
    /// Trained by the operator on the route's events.
    Trained,
}

/// One immutable policy version of a route, made by the operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "crd", derive(kube::CustomResource))]
#[cfg_attr(
    feature = "crd",
    kube(
        group = "llmroute.dev",
        version = "v1alpha1",
        kind = "LLMPolicy",
        root = "LlmPolicy",
        plural = "llmpolicies",
        singular = "llmpolicy",
        shortname = "llmp",
        category = "llmroute",
        namespaced,
        status = "LlmPolicyStatus",
        doc = "One immutable policy version of an LLMRoute, made by the llmroute operator.",
        printcolumn = r#"{"name":"Route","type":"string","jsonPath":".spec.route"}"#,
        printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
        printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
        printcolumn = r#"{"name":"Origin","type":"string","jsonPath":".spec.origin"}"#,
        printcolumn = r#"{"name":"Parent","type":"string","jsonPath":".spec.parent"}"#,
        printcolumn = r#"{"name":"Gate","type":"number","description":"Doubly robust estimate of the reward difference to the parent","jsonPath":".status.offPolicy.differenceDr.mean"}"#,
        printcolumn = r#"{"name":"Reward","type":"number","description":"Mean live reward","jsonPath":".status.live.meanReward"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "an LLMPolicy's spec is immutable; publish a new version instead"}
]))]
pub struct LlmPolicySpec {
    /// Name of the route in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub route: String,
    /// Version name, unique within the route (`v1`, `v2`, …).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub version: String,
    /// sha256 of the ONNX file, 64 lowercase hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// The ConfigMap key holding the ONNX file.
    pub artifact: ConfigMapKeyRef,
    /// The policy's output order.
    #[schemars(length(min = 1, max = 32))]
    pub models: Vec<String>,
    /// Digest of the prompt encoder the policy expects.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub encoder: String,
    /// Cost scale τ the policy was built with, in USD per request.
    pub cost_scale_usd: f64,
    /// Where the policy came from.
    pub origin: PolicyOrigin,
    /// The version this one was trained from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For a pretrained policy, the ConfigMap key it was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ConfigMapKeyRef>,
}

/// What the operator observed of a policy version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PolicyPhase>,
    /// Why the policy is in its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Training data of a trained policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingData>,
    /// The off-policy gate's estimates against the parent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_policy: Option<GateFigures>,
    /// Live figures over the requests the version decided in the last canary step it took part
    /// in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveFigures>,
    /// When the version became `Retired` or `Rejected` (RFC 3339). The history limit keeps the
    /// versions that ended last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
}

/// A rule of [`LlmRouteSpec::check`] that a spec breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// JSON path of the offending field, such as `spec.models[1].pricing`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl LlmRouteSpec {
    /// Checks every rule of the schema and the CEL rules, for servers that enforce neither.
    /// Returns every broken rule, in field order.
    pub fn check(&self) -> Vec<SpecError> {
        let mut errors = Vec::new();
        let mut error = |field: String, message: String| errors.push(SpecError { field, message });
        if self.models.is_empty() || self.models.len() > MAX_MODELS {
            error(
                "spec.models".into(),
                format!(
                    "has {} models; a route needs 1 to {MAX_MODELS}",
                    self.models.len()
                ),
            );
        }
        let mut names = BTreeSet::new();
        for (index, model) in self.models.iter().enumerate() {
            let at = format!("spec.models[{index}]");
            if !is_model_name(&model.name) {
                error(
                    format!("{at}.name"),
                    format!(
                        "{:?} is not a valid model name: use 1 to 253 letters, digits, '-', '.', '_', ':' or '/', starting and ending with a letter or digit",
                        model.name
                    ),
                );
            }
            if !names.insert(model.name.as_str()) {
                error(
                    format!("{at}.name"),
                    format!(
                        "model {:?} is listed twice; model names must be unique",
                        model.name
                    ),
                );
            }
            let endpoint = model.endpoint.as_str();
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            let host_ok = rest.is_some_and(|rest| {
                let host = rest.split('/').next().unwrap_or("");
                !host.is_empty() && !rest.chars().any(char::is_whitespace)
            });
            if !host_ok || endpoint.len() > 2048 {
                error(
                    format!("{at}.endpoint"),
                    format!(
                        "{endpoint:?} is not an http:// or https:// URL with a host, such as https://api.openai.com/v1"
                    ),
                );
            }
            if model.model.is_empty() || model.model.len() > 256 {
                error(
                    format!("{at}.model"),
                    "the upstream model id must have 1 to 256 characters".into(),
                );
            }
            for (which, price) in [
                (
                    "inputUsdPerMillionTokens",
                    model.pricing.input_usd_per_million_tokens,
                ),
                (
                    "outputUsdPerMillionTokens",
                    model.pricing.output_usd_per_million_tokens,
                ),
            ] {
                if !(0.0..=100_000.0).contains(&price) {
                    error(
                        format!("{at}.pricing.{which}"),
                        format!("{price} is not a price in [0, 100000] USD per million tokens"),
                    );
                }
            }
            if let Some(seconds) = model.timeout_seconds
                && !(0.001..=3600.0).contains(&seconds)
            {
                error(
                    format!("{at}.timeoutSeconds"),
                    format!("{seconds} is outside [0.001, 3600] seconds"),
                );
            }
            if let Some(secret) = &model.api_key_secret_ref {
                if !is_dns_subdomain(&secret.name) {
                    error(
                        format!("{at}.apiKeySecretRef.name"),
                        format!("{:?} is not a valid Secret name", secret.name),
                    );
                }
                if !is_config_key(&secret.key) {
                    error(
                        format!("{at}.apiKeySecretRef.key"),
                        format!(
                            "{:?} is not a valid Secret key (letters, digits, '-', '.', '_')",
                            secret.key
                        ),
                    );
                }
            }
        }
        if !self.models.iter().any(|m| m.name == self.fallback) {
            error(
                "spec.fallback".into(),
                format!(
                    "{:?} is not one of spec.models ({}); name a model of the pool",
                    self.fallback,
                    self.models
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if let Some(attempts) = self.max_attempts
            && (attempts == 0
                || attempts > MAX_ATTEMPTS
                || attempts as usize > self.models.len().max(1))
        {
            error(
                "spec.maxAttempts".into(),
                format!(
                    "{attempts} is outside [1, {}]: at least one attempt, at most one per model and {MAX_ATTEMPTS} in all",
                    self.models.len().min(MAX_ATTEMPTS as usize).max(1)
                ),
            );
        }
        if let Some(tau) = self.cost_scale_usd
            && !(tau > 0.0 && tau <= 1000.0)
        {
            error(
                "spec.costScaleUsd".into(),
                format!(
                    "{tau} is not a cost scale in (0, 1000] USD; leave it out to calibrate it from observed costs"
                ),
            );
        }
        if let Some(exploration) = &self.exploration
            && let Err(message) = exploration.to_exploration()
        {
            error("spec.exploration".into(), message);
        }
        if let Some(policy) = &self.policy {
            if let Some(version) = &policy.version
                && !is_version_name(version)
            {
                error(
                    "spec.policy.version".into(),
                    format!("{version:?} is not a version name such as v3"),
                );
            }
            if let Some(initial) = &policy.initial {
                if !is_dns_subdomain(&initial.name) {
                    error(
                        "spec.policy.initial.name".into(),
                        format!("{:?} is not a valid ConfigMap name", initial.name),
                    );
                }
                if !is_config_key(&initial.key) {
                    error(
                        "spec.policy.initial.key".into(),
                        format!("{:?} is not a valid ConfigMap key", initial.key),
                    );
                }
            }
        }
        if let Some(sidecar) = &self.sidecar {
            if let Some(image) = &sidecar.image
                && (image.is_empty() || image.len() > 512 || image.contains(char::is_whitespace))
            {
                error(
                    "spec.sidecar.image".into(),
                    format!("{image:?} is not an image reference such as llmroute:0.1.0"),
                );
            }
            for (field, value) in [
                ("cpuRequest", &sidecar.cpu_request),
                ("memoryRequest", &sidecar.memory_request),
                ("memoryLimit", &sidecar.memory_limit),
            ] {
                if let Some(value) = value
                    && !is_quantity(value)
                {
                    error(
                        format!("spec.sidecar.{field}"),
                        format!("{value:?} is not a Kubernetes quantity such as 100m or 256Mi"),
                    );
                }
            }
        }
        crate::rollout::check(
            self.training.as_ref(),
            self.rollout.as_ref(),
            self.retention.as_ref(),
            &mut errors,
        );
        errors
    }

    /// The exploration rule of the sidecar configuration.
    pub fn exploration(&self) -> Exploration {
        self.exploration
            .and_then(|e| e.to_exploration().ok())
            .unwrap_or_default()
    }
}

impl ExplorationSpec {
    /// The sidecar's exploration rule, or why this one is invalid.
    pub fn to_exploration(&self) -> Result<Exploration, String> {
        match (self.mode, self.epsilon) {
            (ExplorationMode::Greedy, None) => Ok(Exploration::Greedy),
            (ExplorationMode::Sample, None) => Ok(Exploration::Sample),
            (ExplorationMode::EpsilonGreedy, Some(epsilon)) if (0.0..=1.0).contains(&epsilon) => {
                Ok(Exploration::EpsilonGreedy { epsilon })
            }
            (ExplorationMode::EpsilonGreedy, Some(epsilon)) => {
                Err(format!("epsilon {epsilon} is outside [0, 1]"))
            }
            (ExplorationMode::EpsilonGreedy, None) => {
                Err("mode epsilonGreedy needs epsilon, such as epsilon: 0.1".into())
            }
            (mode, Some(_)) => Err(format!(
                "epsilon is only allowed with mode epsilonGreedy, not {mode:?}"
            )),
        }
    }
}

fn is_model_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._:/".contains(&b))
}

fn is_version_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
}

/// A Kubernetes resource quantity: a decimal number with an optional unit suffix, small enough
/// for an `f64`.
pub fn is_quantity(value: &str) -> bool {
    quantity_value(value).is_some()
}

/// Parses a resource quantity such as `256Mi` or `100m` into base units (bytes or cores).
/// Returns `None` for other text and for values too large for an `f64`.
pub fn quantity_value(quantity: &str) -> Option<f64> {
    let digits_end = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(digits_end);
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    let value = number.parse::<f64>().ok()? * scale;
    value.is_finite().then_some(value)
}

/// A Kubernetes object name (RFC 1123 subdomain).
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// The schema of a preference: `{quality, cost}`, each in [0, 1], summing to 1.
impl JsonSchema for Preference {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Preference".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "A preference w = (quality, cost): weights in [0, 1] summing to 1. Either may be left out; it is then 1 minus the other.",
            "properties": {
                "quality": {"type": "number", "minimum": 0.0, "maximum": 1.0, "description": "Weight of the quality score in the reward."},
                "cost": {"type": "number", "minimum": 0.0, "maximum": 1.0, "description": "Weight of the normalised cost in the reward."}
            },
            "x-kubernetes-validations": [
                {"rule": "has(self.quality) || has(self.cost)", "message": "give quality, cost or both"},
                {"rule": "!has(self.quality) || !has(self.cost) || (self.quality + self.cost >= 0.999 && self.quality + self.cost <= 1.001)", "message": "quality + cost must be 1"}
            ]
        })
    }
}

/// The CustomResourceDefinitions of both resources, routes first.
#[cfg(feature = "crd")]
pub fn definitions()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![LlmRoute::crd(), LlmPolicy::crd()]
}

/// The CRDs as one YAML stream, the form `llmroute crd` prints and `crds/` holds.
#[cfg(feature = "crd")]
pub fn definitions_yaml() -> String {
    let mut out = String::from(
        "# Generated by `llmroute crd` from the Rust types in crates/llmroute-api/src/crd.rs.\n# Do not edit: change the types and run `llmroute crd > crds/llmroute.yaml`.\n",
    );
    for crd in definitions() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd).expect("a CRD serialises to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantity_values_in_base_units() {
        assert_eq!(quantity_value("256Mi"), Some(256.0 * 1024.0 * 1024.0));
        assert_eq!(quantity_value("100m"), Some(0.1));
        assert_eq!(quantity_value("1.5G"), Some(1.5e9));
        assert_eq!(quantity_value("2"), Some(2.0));
        assert_eq!(quantity_value("Mi"), None);
        assert_eq!(quantity_value("1Qi"), None);
        assert_eq!(quantity_value(&"9".repeat(400)), None, "beyond f64");
        assert!(!is_quantity(&"9".repeat(400)));
    }

    fn spec() -> LlmRouteSpec {
        serde_json::from_value(serde_json::json!({
            "models": [
                {"name": "small", "endpoint": "http://127.0.0.1:9000/v1", "model": "s",
                 "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.4}},
                {"name": "large", "endpoint": "https://127.0.0.1:9001/v1", "model": "l",
                 "apiKeySecretRef": {"name": "keys", "key": "large"},
                 "pricing": {"inputUsdPerMillionTokens": 2.5, "outputUsdPerMillionTokens": 10}}
            ],
            "defaultPreference": {"quality": 0.7},
            "exploration": {"mode": "epsilonGreedy", "epsilon": 0.05},
            "fallback": "small"
        }))
        .unwrap()
    }

    #[test]
    fn valid_spec_passes() {
        assert_eq!(spec().check(), vec![]);
        assert_eq!(
            spec().exploration(),
            Exploration::EpsilonGreedy { epsilon: 0.05 }
        );
    }

    #[test]
    fn each_rule_names_its_field() {
        type Edit = fn(&mut LlmRouteSpec);
        let cases: [(Edit, &str); 11] = [
            (
                |s| {
                    s.sidecar = Some(SidecarSpec {
                        memory_limit: Some("lots".into()),
                        ..SidecarSpec::default()
                    })
                },
                "spec.sidecar.memoryLimit",
            ),
            (|s| s.models.clear(), "spec.models"),
            (|s| s.models[1].name = "small".into(), "spec.models[1].name"),
            (
                |s| s.models[0].name = "big model".into(),
                "spec.models[0].name",
            ),
            (
                |s| s.models[0].endpoint = "ftp://x".into(),
                "spec.models[0].endpoint",
            ),
            (
                |s| s.models[0].pricing.input_usd_per_million_tokens = -1.0,
                "spec.models[0].pricing.inputUsdPerMillionTokens",
            ),
            (|s| s.fallback = "huge".into(), "spec.fallback"),
            (|s| s.max_attempts = Some(3), "spec.maxAttempts"),
            (
                |s| s.exploration.as_mut().unwrap().epsilon = None,
                "spec.exploration",
            ),
            (|s| s.cost_scale_usd = Some(0.0), "spec.costScaleUsd"),
            (
                |s| s.models[1].api_key_secret_ref.as_mut().unwrap().name = "Keys!".into(),
                "spec.models[1].apiKeySecretRef.name",
            ),
        ];
        for (edit, field) in cases {
            let mut spec = spec();
            edit(&mut spec);
            let errors = spec.check();
            assert!(
                errors.iter().any(|e| e.field == field),
                "{field}: {errors:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut value = serde_json::to_value(spec()).unwrap();
        value["fallbak"] = "small".into();
        let error = serde_json::from_value::<LlmRouteSpec>(value).unwrap_err();
        assert!(error.to_string().contains("fallbak"), "{error}");
    }

    #[test]
    fn names_follow_kubernetes_rules() {
        assert!(is_dns_subdomain("llm-keys.v1"));
        assert!(!is_dns_subdomain("Keys"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(is_model_name("gpt-4o-mini"));
        assert!(is_model_name("llama3.1_8b"));
        assert!(is_model_name("meta-llama/Llama-3.1-8B-Instruct"));
        assert!(!is_version_name("V1"));
        assert!(!is_model_name("-x"));
    }
}
