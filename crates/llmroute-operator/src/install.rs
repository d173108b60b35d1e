//! `llmroute install`: every object a cluster needs to run the operator, as one YAML stream for
//! `kubectl apply -f -`. RBAC grants only what the operator calls. The Helm chart in
//! `charts/llmroute` renders the same objects for the same settings, and a test compares them.

use serde_json::{Value, json};

/// Settings of the rendered manifests.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Namespace of the operator.
    pub namespace: String,
    /// Container image of `llmroute`.
    pub image: String,
    /// Operator replicas; with more than one, the Lease elects the leader.
    pub replicas: u32,
    /// Port of the control API.
    pub control_port: u16,
    /// Port of `/metrics`, `/healthz` and `/readyz`.
    pub ops_port: u16,
    /// Port of the injection webhook (TLS).
    pub webhook_port: u16,
    /// `Ignore` or `Fail`.
    pub webhook_failure_policy: String,
    /// Seconds the API server waits for the webhook (1 to 30).
    pub webhook_timeout_seconds: u32,
    /// Image of the injected sidecar; `None` uses [`InstallOptions::image`].
    pub sidecar_image: Option<String>,
    /// CPU request of the injected sidecar, as a Kubernetes quantity.
    pub sidecar_cpu: String,
    /// Memory request of the injected sidecar, as a Kubernetes quantity.
    pub sidecar_memory: String,
    /// `auto`, `native` or `classic`.
    pub sidecar_mode: String,
    /// Port of the injected sidecar's admin listener on the pod's IP (0: none, and no probes).
    pub sidecar_admin_port: u16,
    /// Secrets added to injected pods' imagePullSecrets for the sidecar's image.
    pub sidecar_image_pull_secrets: Vec<String>,
    /// Size of each replica's PersistentVolumeClaim for the event store.
    pub storage_size: String,
    /// StorageClass of that claim; `None` uses the cluster's default class.
    pub storage_class: Option<String>,
    /// Days after which stored events are deleted (0 keeps events of any age).
    pub event_max_age_days: u64,
    /// Newest events kept per route (0 sets no limit).
    pub event_max_per_route: u64,
    /// Limit of each replica's event store: `auto`, `0` or a size such as 800Mi.
    pub event_max_store_size: String,
    /// Seconds between two passes of the leader's learning loop (0 turns it off).
    pub learning_interval_seconds: u64,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            namespace: "llmroute-system".into(),
            image: format!("llmroute:{}", env!("CARGO_PKG_VERSION")),
            replicas: 2,
            control_port: 8090,
            ops_port: 8081,
            webhook_port: 9443,
            webhook_failure_policy: "Ignore".into(),
            webhook_timeout_seconds: 3,
            sidecar_image: None,
            sidecar_cpu: "100m".into(),
            sidecar_memory: "256Mi".into(),
            sidecar_mode: "auto".into(),
            sidecar_admin_port: crate::webhook::DEFAULT_ADMIN_PORT,
            sidecar_image_pull_secrets: Vec::new(),
            storage_size: "1Gi".into(),
            storage_class: None,
            event_max_age_days: 30,
            event_max_per_route: 1_000_000,
            event_max_store_size: "auto".into(),
            learning_interval_seconds: 10,
        }
    }
}

/// Name of the operator's StatefulSet, service account, roles, Lease and control API Service.
pub const NAME: &str = "llmroute-operator";
/// Name of the Service through which the API server calls the injection webhook.
pub const WEBHOOK_SERVICE: &str = "llmroute-operator-webhook";
/// Folder of the event store in the operator's container.
pub const DATA_DIR: &str = "/var/lib/llmroute";

/// Builds the objects, in the order `kubectl apply` needs them.
pub fn manifests(options: &InstallOptions) -> Vec<Value> {
    let ns = options.namespace.as_str();
    let labels = json!({
        "app.kubernetes.io/name": "llmroute",
        "app.kubernetes.io/component": "operator",
    });
    let mut objects: Vec<Value> = llmroute_api::crd::definitions()
        .into_iter()
        .map(|crd| serde_json::to_value(crd).expect("a CRD serialises"))
        .collect();
    objects.push(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"llmroute.dev/injection": "disabled"}},
    }));
    objects.push(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
    }));
    objects.extend(rbac(ns, &labels));
    objects.push(stateful_set(options, &labels));
    objects.extend(services(options, &labels));
    objects.push(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }));
    objects.push(crate::webhook::configuration(
        &crate::webhook::WebhookConfigSpec {
            name: crate::webhook::CONFIGURATION_NAME.into(),
            namespace_labels: None,
            target: crate::webhook::WebhookTarget::Service {
                name: WEBHOOK_SERVICE.into(),
                namespace: ns.to_string(),
                port: 443,
            },
            failure_policy: options.webhook_failure_policy.clone(),
            timeout_seconds: options.webhook_timeout_seconds as i32,
            excluded_namespaces: vec![
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
                ns.to_string(),
            ],
        },
        None,
    ));
    objects
}

fn rbac(ns: &str, labels: &Value) -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": NAME, "labels": labels},
            "rules": [
                // Routes: watched, finalizer added and removed, status written.
                {"apiGroups": ["llmroute.dev"], "resources": ["llmroutes"],
                 "verbs": ["get", "list", "watch", "patch", "update"]},
                {"apiGroups": ["llmroute.dev"], "resources": ["llmroutes/status"],
                 "verbs": ["get", "patch", "update"]},
                // Owner references with blockOwnerDeletion need update on the owner's finalizers.
                {"apiGroups": ["llmroute.dev"], "resources": ["llmroutes/finalizers"],
                 "verbs": ["update"]},
                {"apiGroups": ["llmroute.dev"], "resources": ["llmpolicies"],
                 "verbs": ["get", "list", "watch", "create", "patch", "delete", "deletecollection"]},
                {"apiGroups": ["llmroute.dev"], "resources": ["llmpolicies/status"],
                 "verbs": ["get", "patch", "update"]},
                // Policy artifacts, and a pretrained policy a route references.
                {"apiGroups": [""], "resources": ["configmaps"],
                 "verbs": ["get", "list", "watch", "create", "patch", "delete", "deletecollection"]},
                // Only to check that a route's API-key Secret and key exist; never listed or watched.
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"],
                 "verbs": ["create", "patch"]},
                // Sidecars' service-account tokens, checked before their events are stored.
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                 "verbs": ["create"]},
                // Pods the webhook decided on (label-selected watch): skip Events and counts.
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                // Its own webhook configuration, to keep the CA bundle current.
                {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                 "verbs": ["get", "patch"], "resourceNames": [crate::webhook::CONFIGURATION_NAME]},
                {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                 "verbs": ["create"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": NAME, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": NAME, "namespace": ns, "labels": labels},
            "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "verbs": ["get", "create", "update"]},
                // The webhook's CA and serving certificate.
                {"apiGroups": [""], "resources": ["secrets"],
                 "verbs": ["get", "create", "update"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": NAME, "namespace": ns, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
        }),
    ]
}

/// Builds the Service of the control API and `/metrics`, and the webhook's Service.
fn services(options: &InstallOptions, labels: &Value) -> Vec<Value> {
    let ns = options.namespace.as_str();
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": NAME, "namespace": ns, "labels": labels},
            "spec": {
                "selector": labels,
                "ports": [
                    {"name": "control", "port": options.control_port, "targetPort": "control"},
                    {"name": "metrics", "port": options.ops_port, "targetPort": "ops"},
                ],
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": WEBHOOK_SERVICE, "namespace": ns, "labels": labels},
            "spec": {
                "selector": labels,
                "ports": [{"name": "webhook", "port": 443, "targetPort": "webhook"}],
            },
        }),
    ]
}

/// Builds the arguments of `llmroute operator` in the operator's container.
fn operator_args(options: &InstallOptions) -> Vec<String> {
    let sidecar_image = options.sidecar_image.as_deref().unwrap_or(&options.image);
    let mut args: Vec<String> = vec![
        "operator".into(),
        format!("--control-listen=[::]:{}", options.control_port),
        format!("--ops-listen=[::]:{}", options.ops_port),
        format!("--webhook-listen=[::]:{}", options.webhook_port),
        format!(
            "--webhook-failure-policy={}",
            options.webhook_failure_policy
        ),
        format!(
            "--webhook-timeout-seconds={}",
            options.webhook_timeout_seconds
        ),
        format!("--service={WEBHOOK_SERVICE}"),
        format!(
            "--control-url=http://{NAME}.{}.svc:{}",
            options.namespace, options.control_port
        ),
        format!("--sidecar-image={sidecar_image}"),
        format!("--sidecar-cpu={}", options.sidecar_cpu),
        format!("--sidecar-memory={}", options.sidecar_memory),
        format!("--sidecar-mode={}", options.sidecar_mode),
        format!("--sidecar-admin-port={}", options.sidecar_admin_port),
        format!("--event-max-age-days={}", options.event_max_age_days),
        format!("--event-max-per-route={}", options.event_max_per_route),
        format!("--event-max-store-size={}", options.event_max_store_size),
        format!(
            "--learning-interval-seconds={}",
            options.learning_interval_seconds
        ),
        format!("--data-dir={DATA_DIR}"),
        "--lease-namespace=$(POD_NAMESPACE)".into(),
        "--identity=$(POD_NAME)".into(),
        "--advertise-host=$(POD_IP)".into(),
    ];
    // After every fixed flag, as the chart's template lists them.
    args.extend(
        options
            .sidecar_image_pull_secrets
            .iter()
            .map(|name| format!("--sidecar-image-pull-secret={name}")),
    );
    args
}

/// Builds the operator's StatefulSet. Each replica keeps events in its own SQLite file, so each
/// gets its own PersistentVolumeClaim. A claim keeps its name, and so its
/// events, across restarts, upgrades and uninstalls.
fn stateful_set(options: &InstallOptions, labels: &Value) -> Value {
    let probe = |path: &str| {
        json!({
            "httpGet": {"path": path, "port": "ops"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
        })
    };
    let mut claim_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": options.storage_size}},
    });
    if let Some(class) = &options.storage_class {
        claim_spec["storageClassName"] = json!(class);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": NAME, "namespace": options.namespace, "labels": labels},
        "spec": {
            "replicas": options.replicas,
            "serviceName": NAME,
            // Replicas do not depend on each other, so they start and stop together.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": NAME,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "terminationGracePeriodSeconds": 30,
                    // One node's loss should not take the webhook and the control API down with
                    // both replicas; a cluster of one node still schedules them.
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": labels},
                    }],
                    "containers": [{
                        "name": "operator",
                        "image": options.image,
                        "args": operator_args(options),
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "RUST_LOG", "value": "info"},
                        ],
                        "ports": [
                            {"name": "control", "containerPort": options.control_port},
                            {"name": "ops", "containerPort": options.ops_port},
                            {"name": "webhook", "containerPort": options.webhook_port},
                        ],
                        "livenessProbe": probe("/healthz"),
                        "readinessProbe": probe("/readyz"),
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "128Mi"},
                            "limits": {"memory": "512Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels},
                "spec": claim_spec,
            }],
        },
    })
}

/// Renders the manifests as one YAML stream.
pub fn render(options: &InstallOptions) -> String {
    let mut out = String::from(
        "# llmroute operator: apply with `llmroute install | kubectl apply --server-side -f -`\n",
    );
    for object in manifests(options) {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&object).expect("JSON values serialise to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_object_has_kind_name_and_namespace_where_needed() {
        let options = InstallOptions {
            namespace: "ops".into(),
            ..InstallOptions::default()
        };
        let objects = manifests(&options);
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "StatefulSet",
                "Service",
                "Service",
                "PodDisruptionBudget",
                "MutatingWebhookConfiguration"
            ]
        );
        for object in &objects {
            let kind = object["kind"].as_str().unwrap();
            assert!(object["metadata"]["name"].is_string(), "{kind}");
            let cluster_scoped = matches!(
                kind,
                "CustomResourceDefinition"
                    | "Namespace"
                    | "ClusterRole"
                    | "ClusterRoleBinding"
                    | "MutatingWebhookConfiguration"
            );
            assert_eq!(
                object["metadata"]["namespace"].as_str(),
                (!cluster_scoped).then_some("ops"),
                "{kind}"
            );
        }
    }

    #[test]
    fn secrets_are_only_read_by_name() {
        let objects = manifests(&InstallOptions::default());
        let role = objects.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
        let secrets = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resources"][0] == "secrets")
            .unwrap();
        assert_eq!(secrets["verbs"], json!(["get"]));
        let rendered = render(&InstallOptions::default());
        assert!(!rendered.contains("\"*\""), "no wildcard grants");
    }
}
