//! Names the operator writes into the cluster: field manager, finalizer, labels, annotations.

/// Field manager of the reconciler's server-side applies.
pub const FIELD_MANAGER: &str = "llmroute-operator";
/// Field manager of the learning loop: the rollout fields of route statuses and the figures of
/// policy statuses.
pub const LEARNING_FIELD_MANAGER: &str = "llmroute-learning";
/// Finalizer that holds a deleted route until its policies, ConfigMaps and events are gone.
pub const FINALIZER: &str = "llmroute.dev/cleanup";
/// Label naming the managing controller on every object the operator creates.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "llmroute-operator";
/// Label naming the route an object belongs to.
pub const ROUTE_LABEL: &str = "llmroute.dev/route";
/// Label naming the policy version of a policy ConfigMap.
pub const VERSION_LABEL: &str = "llmroute.dev/policy-version";
/// Annotation holding the sha256 of a policy ConfigMap's ONNX file (labels cannot hold 64
/// characters).
pub const SHA256_ANNOTATION: &str = "llmroute.dev/policy-sha256";
/// Key of the ONNX file in a policy ConfigMap's `binaryData`.
pub const POLICY_KEY: &str = "policy.onnx";

/// Name of the LLMPolicy of `version` of `route`: `<route>-<version>`.
pub fn policy_name(route: &str, version: &str) -> String {
    format!("{route}-{version}")
}

/// Name of the ConfigMap holding the ONNX file of `version` of `route`.
pub fn policy_configmap_name(route: &str, version: &str) -> String {
    format!("{route}-policy-{version}")
}

/// Key of a route in the control API and the event store: `<namespace>/<name>`.
pub fn route_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}
