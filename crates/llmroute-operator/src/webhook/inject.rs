//! What the injection webhook does to one pod: inject the sidecar, or skip with a reason.
//!
//! The decision is a pure function of the pod, its route and the operator's settings, so it is
//! tested without a server, the native-sidecar path included. A pod opts in with the annotation
//! `llmroute.dev/route: <route in the pod's namespace>`.
//!
//! An injected pod carries `llmroute.dev/injected: <version>/<hash>`, the hash being over
//! everything injected. A second pass with the same hash changes nothing; a pass with another
//! hash (an upgrade, a changed route) removes what the previous one added and injects again.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use llmroute_api::crd::{LlmRoute, is_quantity, quantity_value};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Annotation naming the route of a pod: the opt-in.
pub const ROUTE_ANNOTATION: &str = "llmroute.dev/route";
/// Annotation that turns injection off for a pod when `"false"`.
pub const INJECT_ANNOTATION: &str = "llmroute.dev/inject";
/// Annotation recording what was injected: `<operator version>/<hash>`.
pub const INJECTED_ANNOTATION: &str = "llmroute.dev/injected";
/// Annotation recording why injection was skipped: `<Reason>: <message>`.
pub const SKIPPED_ANNOTATION: &str = "llmroute.dev/injection-skipped";
/// Reason of the skip annotation and the Event for a pod that already has this injection.
pub const ALREADY_INJECTED: &str = "AlreadyInjected";
/// Label on every pod the webhook decided on: `injected` or `skipped`, so the operator can
/// watch only those pods.
pub const INJECTION_LABEL: &str = "llmroute.dev/injection";
/// Per-pod overrides of the sidecar's image, CPU and memory.
pub const IMAGE_ANNOTATION: &str = "llmroute.dev/sidecar-image";
pub const CPU_ANNOTATION: &str = "llmroute.dev/sidecar-cpu";
pub const MEMORY_ANNOTATION: &str = "llmroute.dev/sidecar-memory";
/// Per-pod limits of the sidecar. With each limit equal to its request the sidecar is
/// Guaranteed, so a pod whose other containers are Guaranteed stays Guaranteed.
pub const CPU_LIMIT_ANNOTATION: &str = "llmroute.dev/sidecar-cpu-limit";
pub const MEMORY_LIMIT_ANNOTATION: &str = "llmroute.dev/sidecar-memory-limit";
/// Per-pod switch of the sidecar's `POST /shutdown` (`"true"` or `"false"`). By default it is
/// on for a pod of a Job whose sidecar runs as a regular container, the one case where the
/// pod cannot complete until the app stops the sidecar.
pub const SHUTDOWN_ENDPOINT_ANNOTATION: &str = "llmroute.dev/sidecar-shutdown-endpoint";
/// Name of the injected container.
pub const SIDECAR_NAME: &str = "llmroute-sidecar";
/// Default port of the sidecar's admin listener.
pub const DEFAULT_ADMIN_PORT: u16 = 9099;
/// Name of the admin listener's container port, which probes and PodMonitors refer to.
pub const ADMIN_PORT_NAME: &str = "llmroute-admin";
/// Drain of a sidecar that runs as a regular container: seconds it keeps proxying after SIGTERM.
/// A native sidecar gets SIGTERM only after the app containers have stopped.
const CLASSIC_DRAIN_SECONDS: u32 = 5;
/// Name of the projected service-account token volume.
pub const TOKEN_VOLUME: &str = "llmroute-token";
/// Where the sidecar reads its token for the control API.
pub const TOKEN_PATH: &str = "/var/run/secrets/llmroute.dev/serviceaccount";
/// Folder of the token volume with one file per API key, named by the model's key variable.
const KEYS_FOLDER: &str = "keys";
/// Maximum total size of a pod's annotation keys and values, in bytes, that the API server
/// accepts (`TotalAnnotationSizeLimitB` in k8s.io/apimachinery `pkg/api/validation/objectmeta.go`).
/// A patch that goes over it makes the pod's creation fail.
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// How the operator injects, from its flags (and later from the route).
#[derive(Debug, Clone, PartialEq)]
pub struct InjectionSettings {
    /// Sidecar image.
    pub image: String,
    /// Base URL of the control API as pods reach it.
    pub control_url: String,
    /// Port of the sidecar on the pod's loopback.
    pub port: u16,
    /// Port of the sidecar's admin listener on the pod's IP (`/healthz`, `/readyz`,
    /// `/metrics`), where the kubelet probes and Prometheus scrapes it. `None` injects no admin
    /// listener and no probes. The kubelet probes from the node and cannot reach the pod's
    /// loopback: an `httpGet` probe with host 127.0.0.1 tests the node's own loopback.
    pub admin_port: Option<u16>,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// Audience of the projected token the sidecar presents to the control API.
    pub token_audience: String,
    /// Secrets that the kubelet needs to pull the sidecar's image, added to the pod's
    /// `imagePullSecrets` when missing. Each must exist in the pod's namespace.
    pub image_pull_secrets: Vec<String>,
    /// Whether the API server runs native sidecars (init containers with
    /// `restartPolicy: Always`, on by default from Kubernetes 1.29).
    pub native_sidecars: bool,
    /// The operator's version, recorded in the injected annotation.
    pub version: String,
}

impl Default for InjectionSettings {
    fn default() -> Self {
        Self {
            image: format!("llmroute:{}", env!("CARGO_PKG_VERSION")),
            control_url: "http://llmroute-operator.llmroute-system.svc:8090".into(),
            port: 8099,
            admin_port: Some(DEFAULT_ADMIN_PORT),
            cpu_request: "100m".into(),
            memory_request: "256Mi".into(),
            memory_limit: "512Mi".into(),
            token_audience: "llmroute.dev".into(),
            image_pull_secrets: Vec::new(),
            native_sidecars: true,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Why a pod is not injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The pod uses the node's network: its loopback is the node's, shared with other pods.
    HostNetwork,
    /// `llmroute.dev/inject: "false"`.
    OptedOut,
    /// The annotated route does not exist in the pod's namespace.
    RouteNotFound,
    /// An llmroute annotation has a value that cannot be used.
    InvalidAnnotation,
    /// The route's sidecar settings would make the API server reject the pod.
    InvalidRoute,
    /// The pod cannot take the sidecar: it has no app container, it already has a container
    /// or volume of the sidecar's name that llmroute did not inject, or its annotations leave
    /// no room for the injection record.
    InvalidPod,
}

impl SkipReason {
    /// The CamelCase reason of the Event and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostNetwork => "HostNetwork",
            Self::OptedOut => "OptedOut",
            Self::RouteNotFound => "RouteNotFound",
            Self::InvalidAnnotation => "InvalidAnnotation",
            Self::InvalidRoute => "InvalidRoute",
            Self::InvalidPod => "InvalidPod",
        }
    }
}

/// The webhook's decision on one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The pod does not ask for injection: no change.
    NotRequested,
    /// The pod already has this exact injection, so its spec is left as it is. The patch
    /// records the skip in an annotation, which the operator publishes as a Normal Event. It
    /// adds the injection label when the pod lacks it, so that the operator counts the pod.
    AlreadyInjected { patch: Vec<Value> },
    /// A JSON patch (RFC 6902) that injects the sidecar.
    Inject { patch: Vec<Value>, hash: String },
    /// A JSON patch that only records the skip on the pod, and why.
    Skip {
        reason: SkipReason,
        message: String,
        patch: Vec<Value>,
    },
}

/// Decides what to do with `pod`; `route` is the route its annotation names, when it exists.
pub fn decide(pod: &Pod, route: Option<&LlmRoute>, settings: &InjectionSettings) -> Decision {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let Some(route_name) = annotations.get(ROUTE_ANNOTATION) else {
        return Decision::NotRequested;
    };
    let skip = |reason: SkipReason, message: String| Decision::Skip {
        reason,
        patch: record_skip(pod, reason, &message),
        message,
    };
    if let Some(value) = annotations.get(INJECT_ANNOTATION) {
        match value.as_str() {
            "false" => {
                return skip(
                    SkipReason::OptedOut,
                    format!("{INJECT_ANNOTATION} is \"false\""),
                );
            }
            "true" => {}
            other => {
                return skip(
                    SkipReason::InvalidAnnotation,
                    format!(
                        "{INJECT_ANNOTATION} is {}; use \"true\" or \"false\"",
                        quoted(other)
                    ),
                );
            }
        }
    }
    if !llmroute_api::crd::is_dns_subdomain(route_name) {
        return skip(
            SkipReason::InvalidAnnotation,
            format!(
                "{ROUTE_ANNOTATION} is {}, which is not a route name (a DNS subdomain such as chat)",
                quoted(route_name)
            ),
        );
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return skip(
            SkipReason::HostNetwork,
            "the pod uses the host network, where 127.0.0.1 is shared with the node; the sidecar needs the pod's own loopback".into(),
        );
    }
    if let Err(message) = check_pod_spec(
        &spec,
        annotations.contains_key(INJECTED_ANNOTATION),
        settings,
    ) {
        return skip(SkipReason::InvalidPod, message);
    }
    let Some(route) = route else {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        return skip(
            SkipReason::RouteNotFound,
            format!(
                "LLMRoute {namespace}/{route_name} does not exist; create it or fix the {ROUTE_ANNOTATION} annotation, then recreate the pod"
            ),
        );
    };
    let overrides = match Overrides::read(&annotations, route, settings, is_job_pod(pod)) {
        Ok(overrides) => overrides,
        Err((reason, message)) => return skip(reason, message),
    };
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let container = sidecar_container(route, &namespace, route_name, &overrides, settings);
    let volume = token_volume(route, settings);
    let hash = injection_hash(&container, &volume, settings);
    let record = format!("{}/{hash}", settings.version);
    if annotations.get(INJECTED_ANNOTATION) == Some(&record) && has_sidecar(&spec) {
        let labelled = pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|labels| labels.get(INJECTION_LABEL).is_some_and(|v| v == "injected"));
        let note = format!(
            "{ALREADY_INJECTED}: the pod already has the llmroute sidecar of injection {record}, so it was not injected again"
        );
        let label: &[(&str, &str)] = if labelled {
            &[]
        } else {
            &[(INJECTION_LABEL, "injected")]
        };
        let note = fitting_note(pod, &note, ALREADY_INJECTED);
        let annotation: &[(&str, &str)] = match &note {
            Some(note) => &[(SKIPPED_ANNOTATION, note.as_str())],
            None => &[],
        };
        let patch = set_metadata(pod, annotation, label);
        return Decision::AlreadyInjected { patch };
    }
    if !annotation_fits(pod, INJECTED_ANNOTATION, &record) {
        return skip(
            SkipReason::InvalidPod,
            format!(
                "the pod's annotations leave no room for {INJECTED_ANNOTATION} within the API server's limit of {MAX_ANNOTATIONS_BYTES} bytes; shorten or remove other annotations"
            ),
        );
    }
    Decision::Inject {
        patch: inject_patch(pod, container, volume, &record, settings),
        hash,
    }
}

/// The sidecar settings: the operator's, then the route's, then the pod's annotations.
struct Overrides {
    image: String,
    cpu: String,
    /// No CPU limit unless the pod's annotation sets one.
    cpu_limit: Option<String>,
    memory: String,
    memory_limit: String,
    /// Whether the sidecar serves `POST /shutdown`.
    shutdown_endpoint: bool,
}

impl Overrides {
    /// Reads the settings, or returns the skip reason and message when they are invalid or
    /// would make the API server reject the pod.
    fn read(
        annotations: &BTreeMap<String, String>,
        route: &LlmRoute,
        settings: &InjectionSettings,
        job_pod: bool,
    ) -> Result<Self, (SkipReason, String)> {
        let sidecar = route.spec.sidecar.clone().unwrap_or_default();
        let image = sidecar.image.unwrap_or_else(|| settings.image.clone());
        let cpu = sidecar
            .cpu_request
            .unwrap_or_else(|| settings.cpu_request.clone());
        let memory = sidecar
            .memory_request
            .clone()
            .unwrap_or_else(|| settings.memory_request.clone());
        let get =
            |key: &str, default: &str, valid: fn(&str) -> bool, format: &str| match annotations
                .get(key)
            {
                None => Ok(default.to_string()),
                Some(value) if valid(value) => Ok(value.clone()),
                Some(value) => Err((
                    SkipReason::InvalidAnnotation,
                    format!("{key} is {}; expected {format}", quoted(value)),
                )),
            };
        let overrides = Self {
            image: get(
                IMAGE_ANNOTATION,
                &image,
                is_image_reference,
                "an image reference such as llmroute:0.1.0, at most 512 characters of letters, digits and ._-/:@",
            )?,
            cpu: get(
                CPU_ANNOTATION,
                &cpu,
                is_quantity,
                "a CPU quantity such as 100m or 1",
            )?,
            memory: get(
                MEMORY_ANNOTATION,
                &memory,
                is_quantity,
                "a memory quantity such as 256Mi",
            )?,
            cpu_limit: match annotations.get(CPU_LIMIT_ANNOTATION) {
                None => None,
                Some(_) => Some(get(
                    CPU_LIMIT_ANNOTATION,
                    "",
                    is_quantity,
                    "a CPU quantity such as 500m or 2",
                )?),
            },
            memory_limit: get(
                MEMORY_LIMIT_ANNOTATION,
                &sidecar
                    .memory_limit
                    .clone()
                    .unwrap_or_else(|| settings.memory_limit.clone()),
                is_quantity,
                "a memory quantity such as 512Mi",
            )?,
            shutdown_endpoint: match annotations.get(SHUTDOWN_ENDPOINT_ANNOTATION) {
                // A native sidecar stops after the app by itself, and the kubelet would
                // restart one that exits earlier.
                None => job_pod && !settings.native_sidecars,
                Some(value) => match value.as_str() {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err((
                            SkipReason::InvalidAnnotation,
                            format!(
                                "{SHUTDOWN_ENDPOINT_ANNOTATION} is {}; use \"true\" or \"false\"",
                                quoted(other)
                            ),
                        ));
                    }
                },
            },
        };
        overrides.check_cpu_limit()?;
        overrides.fit_memory_limit(annotations, sidecar.memory_limit.is_some())
    }

    /// Rejects a CPU limit below the CPU request, which the API server would reject.
    fn check_cpu_limit(&self) -> Result<(), (SkipReason, String)> {
        let Some(limit) = &self.cpu_limit else {
            return Ok(());
        };
        match (quantity_value(&self.cpu), quantity_value(limit)) {
            (Some(request), Some(limit_cores)) if request > limit_cores => Err((
                SkipReason::InvalidAnnotation,
                format!(
                    "{CPU_LIMIT_ANNOTATION} is {}, less than the sidecar's CPU request {:?}; raise the limit or lower the request ({CPU_ANNOTATION})",
                    quoted(limit),
                    self.cpu
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Keeps the memory request within the memory limit, which the API server requires. A
    /// limit from the operator's flags is raised to the request. A limit that the route sets
    /// is kept, and the pod is skipped.
    fn fit_memory_limit(
        mut self,
        annotations: &BTreeMap<String, String>,
        route_sets_limit: bool,
    ) -> Result<Self, (SkipReason, String)> {
        let (Some(request), Some(limit)) = (
            quantity_value(&self.memory),
            quantity_value(&self.memory_limit),
        ) else {
            return Ok(self);
        };
        if request <= limit {
            return Ok(self);
        }
        if annotations.contains_key(MEMORY_LIMIT_ANNOTATION) {
            return Err((
                SkipReason::InvalidAnnotation,
                format!(
                    "{MEMORY_LIMIT_ANNOTATION} is {}, less than the sidecar's memory request {:?}; raise the limit or lower the request ({MEMORY_ANNOTATION})",
                    quoted(&self.memory_limit),
                    self.memory
                ),
            ));
        }
        if !route_sets_limit {
            self.memory_limit = self.memory.clone();
            return Ok(self);
        }
        let (request, limit) = (&self.memory, &self.memory_limit);
        Err(if annotations.contains_key(MEMORY_ANNOTATION) {
            (
                SkipReason::InvalidAnnotation,
                format!(
                    "{MEMORY_ANNOTATION} is {request:?}, more than the route's sidecar memoryLimit {limit:?}; lower the annotation or raise spec.sidecar.memoryLimit"
                ),
            )
        } else {
            (
                SkipReason::InvalidRoute,
                format!(
                    "the route's sidecar memoryRequest {request:?} is more than its memoryLimit {limit:?}; raise spec.sidecar.memoryLimit or lower spec.sidecar.memoryRequest"
                ),
            )
        })
    }
}

/// Returns whether a Job owns `pod`, as the Job controller records it when it creates the pod.
fn is_job_pod(pod: &Pod) -> bool {
    pod.metadata.owner_references.iter().flatten().any(|owner| {
        owner.kind == "Job"
            && owner.api_version.starts_with("batch/")
            && owner.controller == Some(true)
    })
}

/// Returns whether `value` can be an image reference such as `registry:5000/llmroute:0.1.0` or
/// `llmroute@sha256:<hex>`: at most 512 characters, all of them characters that references use.
fn is_image_reference(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 512
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

/// Formats a value from the pod for a message: quoted, and cut after 64 characters, so that a
/// skip note stays small however long the value is.
fn quoted(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes in all)", &value[..end], value.len()),
    }
}

/// Checks that the pod can take the sidecar. `injected_before` is whether the pod carries the
/// annotation of an earlier injection, whose container and volume a new injection replaces.
fn check_pod_spec(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    injected_before: bool,
    settings: &InjectionSettings,
) -> Result<(), String> {
    if spec.containers.iter().all(|c| c.name == SIDECAR_NAME) {
        return Err(format!(
            "the pod has no app container besides {SIDECAR_NAME:?}, so the sidecar has nothing to serve"
        ));
    }
    // Containers of a pod share its network, so a port the sidecar listens on cannot be
    // another container's: one of the two would fail to bind it.
    let sidecar_ports = std::iter::once(("--sidecar-port", settings.port)).chain(
        settings
            .admin_port
            .map(|port| ("--sidecar-admin-port", port)),
    );
    for (flag, port) in sidecar_ports {
        let taken_by = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter(|c| c.name != SIDECAR_NAME)
            .find(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.container_port == i32::from(port))
            });
        if let Some(container) = taken_by {
            return Err(format!(
                "container {:?} declares port {port}, which the sidecar listens on; change that port or the operator's {flag}",
                container.name
            ));
        }
    }
    if injected_before {
        return Ok(());
    }
    if has_sidecar(spec) {
        return Err(format!(
            "the pod already has a container named {SIDECAR_NAME:?} and no {INJECTED_ANNOTATION} annotation, so llmroute did not inject it; rename that container"
        ));
    }
    if spec
        .volumes
        .iter()
        .flatten()
        .any(|volume| volume.name == TOKEN_VOLUME)
    {
        return Err(format!(
            "the pod already has a volume named {TOKEN_VOLUME:?} and no {INJECTED_ANNOTATION} annotation, so llmroute did not add it; rename that volume"
        ));
    }
    Ok(())
}

fn sidecar_container(
    route: &LlmRoute,
    namespace: &str,
    route_name: &str,
    overrides: &Overrides,
    settings: &InjectionSettings,
) -> Value {
    let mut env = vec![
        json!({"name": "LLMROUTE_CONTROL_TOKEN_FILE", "value": format!("{TOKEN_PATH}/token")}),
    ];
    // The keys are files of the token volume (`token_volume`), which the kubelet rewrites
    // when a Secret changes, so that a rotated key needs no restart.
    for model in &route.spec.models {
        if model.api_key_secret_ref.is_some() {
            let variable = llmroute_control::route::api_key_env(&model.name);
            env.push(json!({
                "name": format!("{variable}_FILE"),
                "value": format!("{TOKEN_PATH}/{KEYS_FOLDER}/{variable}"),
            }));
        }
    }
    let probe = |path: &str| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT_NAME},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
        })
    };
    let mut args = vec![
        "sidecar".to_string(),
        "--control".into(),
        settings.control_url.clone(),
        "--route".into(),
        format!("{namespace}/{route_name}"),
        "--port".into(),
        settings.port.to_string(),
    ];
    if !settings.native_sidecars {
        // A regular container gets SIGTERM together with the app, which may still call it
        // while it finishes its own work.
        args.extend(["--drain-seconds".into(), CLASSIC_DRAIN_SECONDS.to_string()]);
    }
    if overrides.shutdown_endpoint {
        args.push("--shutdown-endpoint".into());
    }
    // The proxy listens on the pod's loopback only, so no Service reaches this port. It is
    // declared so that the pod's spec shows the port as taken.
    let mut ports =
        vec![json!({"name": "llmroute", "containerPort": settings.port, "protocol": "TCP"})];
    if let Some(admin_port) = settings.admin_port {
        // Every address of the pod, so that the kubelet and Prometheus reach it from outside.
        // The sidecar binds [::] for IPv4 and IPv6 alike, and 0.0.0.0 where the node has no IPv6.
        args.extend(["--admin-address".into(), format!("[::]:{admin_port}")]);
        ports
            .push(json!({"name": ADMIN_PORT_NAME, "containerPort": admin_port, "protocol": "TCP"}));
    }
    let mut limits = json!({"memory": overrides.memory_limit});
    if let Some(cpu_limit) = &overrides.cpu_limit {
        limits["cpu"] = json!(cpu_limit);
    }
    let mut container = json!({
        "name": SIDECAR_NAME,
        "image": overrides.image,
        "args": args,
        "env": env,
        "ports": ports,
        "resources": {
            "requests": {"cpu": overrides.cpu, "memory": overrides.memory},
            "limits": limits,
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            // The Pod Security Standard "restricted" requires a seccomp profile on every
            // container when the pod does not set one.
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_PATH, "readOnly": true}],
    });
    if settings.admin_port.is_some() {
        container["readinessProbe"] = probe("/readyz");
        container["livenessProbe"] = probe("/healthz");
    }
    container
}

/// sha256 (first 16 hex digits) over the container and the settings that shape the patch.
fn injection_hash(container: &Value, volume: &Value, settings: &InjectionSettings) -> String {
    let mut hasher = Sha256::new();
    hasher.update(container.to_string());
    hasher.update(volume.to_string());
    hasher.update([u8::from(settings.native_sidecars)]);
    hasher.update(&settings.token_audience);
    for secret in &settings.image_pull_secrets {
        hasher.update([0]);
        hasher.update(secret);
    }
    hex::encode(hasher.finalize())[..16].to_string()
}

/// Builds the sidecar's projected volume: the service-account token with its own audience, for
/// the control API, and the route's API keys as `keys/<variable>`, one file per model.
fn token_volume(route: &LlmRoute, settings: &InjectionSettings) -> Value {
    let mut sources = vec![json!({"serviceAccountToken": {
        "audience": settings.token_audience,
        "expirationSeconds": 3600,
        "path": "token",
    }})];
    // One source per Secret, in the order the models name them.
    let mut secrets: Vec<(String, Vec<Value>)> = Vec::new();
    for model in &route.spec.models {
        let Some(secret) = &model.api_key_secret_ref else {
            continue;
        };
        let item = json!({
            "key": secret.key,
            "path": format!("{KEYS_FOLDER}/{}", llmroute_control::route::api_key_env(&model.name)),
        });
        match secrets.iter_mut().find(|(name, _)| *name == secret.name) {
            Some((_, items)) => items.push(item),
            None => secrets.push((secret.name.clone(), vec![item])),
        }
    }
    for (name, items) in secrets {
        // Optional, because a missing Secret or key would keep the kubelet from starting the
        // pod. The sidecar serves the other models until the file appears.
        // NOTE: no test runs a kubelet. That it writes a Secret created or changed after the
        // pod started into these files is its documented behaviour, not checked here.
        sources.push(json!({"secret": {"name": name, "items": items, "optional": true}}));
    }
    json!({"name": TOKEN_VOLUME, "projected": {"sources": sources}})
}

fn has_sidecar(spec: &k8s_openapi::api::core::v1::PodSpec) -> bool {
    let named = |c: &Container| c.name == SIDECAR_NAME;
    spec.containers.iter().any(named)
        || spec
            .init_containers
            .as_ref()
            .is_some_and(|list| list.iter().any(named))
}

/// Escapes a key for a JSON pointer (RFC 6901).
fn pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Patch operations that set annotation and label values, creating the maps when missing.
fn set_metadata(pod: &Pod, annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> Vec<Value> {
    let mut patch = Vec::new();
    for (field, entries, present) in [
        (
            "annotations",
            annotations,
            pod.metadata.annotations.is_some(),
        ),
        ("labels", labels, pod.metadata.labels.is_some()),
    ] {
        if entries.is_empty() {
            continue;
        }
        if !present {
            patch.push(json!({"op": "add", "path": format!("/metadata/{field}"), "value": {}}));
        }
        for (key, value) in entries {
            patch.push(json!({
                "op": "add",
                "path": format!("/metadata/{field}/{}", pointer(key)),
                "value": value,
            }));
        }
    }
    patch
}

/// Records a skip on the pod: the label lets the operator watch skipped pods, and the
/// annotation `<Reason>: <message>` becomes the Event it publishes once the pod exists.
fn record_skip(pod: &Pod, reason: SkipReason, message: &str) -> Vec<Value> {
    let note = format!("{}: {message}", reason.as_str());
    let note = fitting_note(pod, &note, reason.as_str());
    let annotation: &[(&str, &str)] = match &note {
        Some(note) => &[(SKIPPED_ANNOTATION, note.as_str())],
        None => &[],
    };
    set_metadata(pod, annotation, &[(INJECTION_LABEL, "skipped")])
}

/// Returns the skip note that fits in the pod's annotations: `note`, else `<reason>: ` with a
/// short message, else `None` when the annotations are full.
fn fitting_note(pod: &Pod, note: &str, reason: &str) -> Option<String> {
    let short = format!("{reason}: the message did not fit in the pod's annotations");
    [note.to_string(), short]
        .into_iter()
        .find(|note| annotation_fits(pod, SKIPPED_ANNOTATION, note))
}

/// Returns whether setting annotation `key` to `value` keeps the pod's annotations within
/// [`MAX_ANNOTATIONS_BYTES`].
fn annotation_fits(pod: &Pod, key: &str, value: &str) -> bool {
    let others: usize = pod
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(existing, _)| existing.as_str() != key)
        .map(|(existing, value)| existing.len() + value.len())
        .sum();
    others + key.len() + value.len() <= MAX_ANNOTATIONS_BYTES
}

fn inject_patch(
    pod: &Pod,
    container: Value,
    token: Value,
    record: &str,
    settings: &InjectionSettings,
) -> Vec<Value> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut patch = Vec::new();

    // Remove what an earlier injection added, highest index first so indices stay valid.
    let init = spec.init_containers.clone().unwrap_or_default();
    for (index, _) in init
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, c)| c.name == SIDECAR_NAME)
    {
        patch.push(json!({"op": "remove", "path": format!("/spec/initContainers/{index}")}));
    }
    for (index, _) in spec
        .containers
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, c)| c.name == SIDECAR_NAME)
    {
        patch.push(json!({"op": "remove", "path": format!("/spec/containers/{index}")}));
    }
    let volumes = spec.volumes.clone().unwrap_or_default();
    for (index, _) in volumes
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, v)| v.name == TOKEN_VOLUME)
    {
        patch.push(json!({"op": "remove", "path": format!("/spec/volumes/{index}")}));
    }

    // The sidecar: first init container when native (so it starts before the app), else the
    // last container.
    if settings.native_sidecars {
        let mut native = container;
        native["restartPolicy"] = json!("Always");
        let remaining = init.iter().filter(|c| c.name != SIDECAR_NAME).count();
        if remaining == 0 {
            patch.push(json!({"op": "add", "path": "/spec/initContainers", "value": [native]}));
        } else {
            patch.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": native}));
        }
    } else {
        patch.push(json!({"op": "add", "path": "/spec/containers/-", "value": container}));
    }

    if volumes.iter().all(|v| v.name == TOKEN_VOLUME) {
        patch.push(json!({"op": "add", "path": "/spec/volumes", "value": [token]}));
    } else {
        patch.push(json!({"op": "add", "path": "/spec/volumes/-", "value": token}));
    }

    // The kubelet pulls every image of a pod with the pod's pull secrets. They stay when an
    // injection is replaced: removing one could stop the app's own image from pulling.
    let pull_secrets = spec.image_pull_secrets.clone().unwrap_or_default();
    let missing: Vec<Value> = settings
        .image_pull_secrets
        .iter()
        .filter(|name| !pull_secrets.iter().any(|s| &s.name == *name))
        .map(|name| json!({"name": name}))
        .collect();
    if spec.image_pull_secrets.is_none() && !missing.is_empty() {
        patch.push(json!({"op": "add", "path": "/spec/imagePullSecrets", "value": missing}));
    } else {
        for secret in missing {
            patch.push(json!({"op": "add", "path": "/spec/imagePullSecrets/-", "value": secret}));
        }
    }

    // Point the app at the sidecar unless it chose its own base URL.
    let base = format!("http://127.0.0.1:{}/v1", settings.port);
    for (index, app) in spec.containers.iter().enumerate() {
        if app.name == SIDECAR_NAME {
            continue;
        }
        // Indices of the app containers after the removals above.
        let removed_before = spec.containers[..index]
            .iter()
            .filter(|c| c.name == SIDECAR_NAME)
            .count();
        let at = index - removed_before;
        let env = app.env.clone().unwrap_or_default();
        let has = |name: &str| env.iter().any(|e| e.name == name);
        let mut added = Vec::new();
        for name in ["OPENAI_BASE_URL", "OPENAI_API_BASE"] {
            if !has(name) {
                added.push(json!({"name": name, "value": base}));
            }
        }
        if added.is_empty() {
            continue;
        }
        if app.env.is_none() {
            patch.push(
                json!({"op": "add", "path": format!("/spec/containers/{at}/env"), "value": added}),
            );
        } else {
            for value in added {
                patch.push(json!({"op": "add", "path": format!("/spec/containers/{at}/env/-"), "value": value}));
            }
        }
    }
    // A skip note copied from another pod would become a skip Event on an injected pod.
    let annotations = pod.metadata.annotations.as_ref();
    if annotations.is_some_and(|map| map.contains_key(SKIPPED_ANNOTATION)) {
        patch.push(json!({
            "op": "remove",
            "path": format!("/metadata/annotations/{}", pointer(SKIPPED_ANNOTATION)),
        }));
    }
    patch.extend(set_metadata(
        pod,
        &[(INJECTED_ANNOTATION, record)],
        &[(INJECTION_LABEL, "injected")],
    ));
    patch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> LlmRoute {
        serde_json::from_value(json!({
            "apiVersion": "llmroute.dev/v1alpha1",
            "kind": "LLMRoute",
            "metadata": {"name": "chat", "namespace": "shop"},
            "spec": {
                "models": [
                    {"name": "small", "endpoint": "http://127.0.0.1:9/v1", "model": "s",
                     "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.4}},
                    {"name": "gpt-4o", "endpoint": "https://127.0.0.1:9/v1", "model": "l",
                     "apiKeySecretRef": {"name": "keys", "key": "openai"},
                     "pricing": {"inputUsdPerMillionTokens": 2.5, "outputUsdPerMillionTokens": 10}}
                ],
                "defaultPreference": {"quality": 0.7},
                "fallback": "small"
            }
        }))
        .unwrap()
    }

    fn pod(annotations: Value, spec: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"generateName": "app-", "namespace": "shop", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn app_spec() -> Value {
        json!({"containers": [
            {"name": "app", "image": "app:1"},
            {"name": "worker", "image": "app:1", "env": [{"name": "OPENAI_BASE_URL", "value": "http://mine"}]}
        ]})
    }

    /// Applies a decision's patch to the pod, as the API server does.
    fn apply(pod: &Pod, decision: &Decision) -> Pod {
        let patch = match decision {
            Decision::Inject { patch, .. }
            | Decision::Skip { patch, .. }
            | Decision::AlreadyInjected { patch } => patch.clone(),
            _ => return pod.clone(),
        };
        let mut value = serde_json::to_value(pod).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(patch)).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn native_injection_adds_init_sidecar_env_and_token() {
        let settings = InjectionSettings::default();
        let pod = pod(json!({ROUTE_ANNOTATION: "chat"}), app_spec());
        let decision = decide(&pod, Some(&route()), &settings);
        assert!(matches!(decision, Decision::Inject { .. }), "{decision:?}");
        let injected = apply(&pod, &decision);
        let spec = injected.spec.clone().unwrap();
        let init = spec.init_containers.clone().unwrap();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].name, SIDECAR_NAME);
        assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.containers.len(), 2, "no regular sidecar container");
        let args = init[0].args.clone().unwrap();
        assert!(args.contains(&"shop/chat".to_string()), "{args:?}");
        // The kubelet probes from the node: the admin listener is on the pod's address, and
        // the probes name its port without a host, so they reach the pod's IP.
        assert!(
            args.windows(2)
                .any(|pair| pair == ["--admin-address", "[::]:9099"]),
            "{args:?}"
        );
        let ports = init[0].ports.clone().unwrap();
        assert!(
            ports
                .iter()
                .any(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME) && p.container_port == 9099),
            "{ports:?}"
        );
        // No startup probe: it would hold the app containers until the control API responds.
        assert!(init[0].startup_probe.is_none());
        for probe in [
            init[0].readiness_probe.clone().unwrap(),
            init[0].liveness_probe.clone().unwrap(),
        ] {
            let get = probe.http_get.unwrap();
            assert_eq!(get.host, None);
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                    ADMIN_PORT_NAME.into()
                )
            );
        }
        let env = init[0].env.clone().unwrap();
        // The key is a file of the token volume, not a variable fixed at the container's start.
        let key = env
            .iter()
            .find(|e| e.name == "LLMROUTE_API_KEY_GPT_4O_FILE")
            .unwrap();
        assert_eq!(
            key.value.as_deref(),
            Some("/var/run/secrets/llmroute.dev/serviceaccount/keys/LLMROUTE_API_KEY_GPT_4O")
        );
        assert!(!env.iter().any(|e| e.value_from.is_some()), "{env:?}");
        let app_env = spec.containers[0].env.clone().unwrap();
        assert!(app_env.iter().any(|e| e.name == "OPENAI_BASE_URL"
            && e.value.as_deref() == Some("http://127.0.0.1:8099/v1")));
        assert!(app_env.iter().any(|e| e.name == "OPENAI_API_BASE"));
        let worker_env = spec.containers[1].env.clone().unwrap();
        let base = worker_env
            .iter()
            .find(|e| e.name == "OPENAI_BASE_URL")
            .unwrap();
        assert_eq!(
            base.value.as_deref(),
            Some("http://mine"),
            "the pod's own value stays"
        );
        let volume = &spec.volumes.unwrap()[0];
        let sources = volume.projected.clone().unwrap().sources.unwrap();
        let token = sources[0].service_account_token.clone().unwrap();
        assert_eq!(token.audience.as_deref(), Some("llmroute.dev"));
        // Optional, so that a missing Secret or key does not keep the pod from starting.
        let secret = sources[1].secret.clone().unwrap();
        assert_eq!(secret.name, "keys");
        assert_eq!(secret.optional, Some(true));
        let items = secret.items.unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].key, "openai");
        assert_eq!(items[0].path, "keys/LLMROUTE_API_KEY_GPT_4O");
        let annotations = injected.metadata.annotations.clone().unwrap();
        assert!(annotations[INJECTED_ANNOTATION].starts_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(
            injected.metadata.labels.unwrap()[INJECTION_LABEL],
            "injected"
        );
    }

    #[test]
    fn injection_adds_missing_image_pull_secrets() {
        let settings = InjectionSettings {
            image_pull_secrets: vec!["registry".into(), "mirror".into()],
            ..InjectionSettings::default()
        };
        let names = |pod: &Pod| -> Vec<String> {
            let spec = pod.spec.clone().unwrap();
            spec.image_pull_secrets
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        let bare = pod(json!({ROUTE_ANNOTATION: "chat"}), app_spec());
        let injected = apply(&bare, &decide(&bare, Some(&route()), &settings));
        assert_eq!(names(&injected), ["registry", "mirror"]);

        // The pod's own secrets stay first, and a name it already lists is not repeated.
        let mut spec = app_spec();
        spec["imagePullSecrets"] = json!([{"name": "app-registry"}, {"name": "mirror"}]);
        let own = pod(json!({ROUTE_ANNOTATION: "chat"}), spec);
        let injected = apply(&own, &decide(&own, Some(&route()), &settings));
        assert_eq!(names(&injected), ["app-registry", "mirror", "registry"]);

        // Settings without pull secrets leave the pod's list as it is.
        let injected = apply(
            &own,
            &decide(&own, Some(&route()), &InjectionSettings::default()),
        );
        assert_eq!(names(&injected), ["app-registry", "mirror"]);
    }

    #[test]
    fn injection_without_admin_port_has_no_probes() {
        let settings = InjectionSettings {
            admin_port: None,
            ..InjectionSettings::default()
        };
        let pod = pod(json!({ROUTE_ANNOTATION: "chat"}), app_spec());
        let decision = decide(&pod, Some(&route()), &settings);
        let injected = apply(&pod, &decision);
        let sidecar = injected.spec.unwrap().init_containers.unwrap()[0].clone();
        assert!(sidecar.readiness_probe.is_none());
        assert!(sidecar.liveness_probe.is_none());
        assert!(sidecar.startup_probe.is_none());
        let args = sidecar.args.unwrap();
        assert!(!args.contains(&"--admin-address".to_string()), "{args:?}");
        assert_eq!(sidecar.ports.unwrap().len(), 1);
    }

    #[test]
    fn app_port_of_the_sidecar_skips_injection() {
        let settings = InjectionSettings::default();
        for (port, flag) in [(8099, "--sidecar-port"), (9099, "--sidecar-admin-port")] {
            let spec = json!({"containers": [
                {"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}, {"containerPort": port}]}
            ]});
            let pod = pod(json!({ROUTE_ANNOTATION: "chat"}), spec);
            match decide(&pod, Some(&route()), &settings) {
                Decision::Skip {
                    reason: SkipReason::InvalidPod,
                    message,
                    ..
                } => assert_eq!(
                    message,
                    format!(
                        "container \"app\" declares port {port}, which the sidecar listens on; change that port or the operator's {flag}"
                    )
                ),
                other => panic!("port {port}: {other:?}"),
            }
        }
        // A port the sidecar does not use is fine.
        let spec = json!({"containers": [
            {"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}
        ]});
        let pod = pod(json!({ROUTE_ANNOTATION: "chat"}), spec);
        let decision = decide(&pod, Some(&route()), &settings);
        assert!(matches!(decision, Decision::Inject { .. }), "{decision:?}");
    }

    #[test]
    fn classic_injection_appends_a_container() {
        let settings = InjectionSettings {
            native_sidecars: false,
            ..InjectionSettings::default()
        };
        let pod = pod(json!({ROUTE_ANNOTATION: "chat"}), app_spec());
        let injected = apply(&pod, &decide(&pod, Some(&route()), &settings));
        let spec = injected.spec.unwrap();
        assert!(spec.init_containers.is_none());
        assert_eq!(spec.containers.len(), 3);
        assert_eq!(spec.containers[2].name, SIDECAR_NAME);
        assert!(spec.containers[2].restart_policy.is_none());
        // It gets SIGTERM with the app, so it keeps proxying for the app's last calls.
        let args = spec.containers[2].args.clone().unwrap();
        assert!(
            args.windows(2).any(|pair| pair == ["--drain-seconds", "5"]),
            "{args:?}"
        );
        let native = apply(
            &pod,
            &decide(&pod, Some(&route()), &InjectionSettings::default()),
        );
        let native_args = native.spec.unwrap().init_containers.unwrap()[0]
            .args
            .clone()
            .unwrap();
        assert!(!native_args.contains(&"--drain-seconds".to_string()));
    }

    /// A Job's pod with a regular-container sidecar gets POST /shutdown, so that its app can
    /// stop the sidecar and the pod completes. The annotation overrides the default.
    #[test]
    fn job_pod_gets_shutdown_endpoint() {
        let classic = InjectionSettings {
            native_sidecars: false,
            ..InjectionSettings::default()
        };
        let native = InjectionSettings::default();
        let job_pod = |annotations: Value| {
            let mut pod = pod(annotations, app_spec());
            pod.metadata.owner_references = Some(vec![
                serde_json::from_value(json!({
                    "apiVersion": "batch/v1", "kind": "Job", "name": "nightly-eval",
                    "uid": "5f0c", "controller": true, "blockOwnerDeletion": true
                }))
                .unwrap(),
            ]);
            pod
        };
        let has_flag = |pod: &Pod, settings: &InjectionSettings| {
            let spec = apply(pod, &decide(pod, Some(&route()), settings))
                .spec
                .unwrap();
            let sidecar = if settings.native_sidecars {
                spec.init_containers.unwrap().remove(0)
            } else {
                spec.containers.into_iter().last().unwrap()
            };
            assert_eq!(sidecar.name, SIDECAR_NAME);
            sidecar
                .args
                .unwrap()
                .contains(&"--shutdown-endpoint".to_string())
        };
        let chat = json!({ROUTE_ANNOTATION: "chat"});
        assert!(has_flag(&job_pod(chat.clone()), &classic));
        assert!(
            !has_flag(&job_pod(chat.clone()), &native),
            "a native sidecar stops after the app by itself"
        );
        assert!(
            !has_flag(&pod(chat.clone(), app_spec()), &classic),
            "not a Job's pod"
        );
        let off = json!({ROUTE_ANNOTATION: "chat", SHUTDOWN_ENDPOINT_ANNOTATION: "false"});
        assert!(!has_flag(&job_pod(off), &classic));
        let on = json!({ROUTE_ANNOTATION: "chat", SHUTDOWN_ENDPOINT_ANNOTATION: "true"});
        assert!(has_flag(&pod(on, app_spec()), &native));

        let wrong = json!({ROUTE_ANNOTATION: "chat", SHUTDOWN_ENDPOINT_ANNOTATION: "yes"});
        match decide(&job_pod(wrong), Some(&route()), &classic) {
            Decision::Skip {
                reason, message, ..
            } => {
                assert_eq!(reason, SkipReason::InvalidAnnotation);
                assert_eq!(
                    message,
                    "llmroute.dev/sidecar-shutdown-endpoint is \"yes\"; use \"true\" or \"false\""
                );
            }
            other => panic!("expected a skip, got {other:?}"),
        }
    }

    #[test]
    fn second_pass_changes_nothing_and_upgrade_replaces() {
        let settings = InjectionSettings::default();
        let pod = pod(json!({ROUTE_ANNOTATION: "chat"}), app_spec());
        let once = apply(&pod, &decide(&pod, Some(&route()), &settings));
        let second = decide(&once, Some(&route()), &settings);
        assert!(
            matches!(second, Decision::AlreadyInjected { .. }),
            "{second:?}"
        );
        let twice = apply(&once, &second);
        assert_eq!(
            twice.spec, once.spec,
            "a second pass leaves the spec as it is"
        );
        let note = &twice.metadata.annotations.as_ref().unwrap()[SKIPPED_ANNOTATION];
        assert!(
            note.starts_with("AlreadyInjected: ") && note.contains(&settings.version),
            "{note}"
        );
        assert_eq!(twice.metadata.labels, once.metadata.labels);
        let mut unlabelled = once.clone();
        unlabelled.metadata.labels = None;
        let relabelled = apply(&unlabelled, &decide(&unlabelled, Some(&route()), &settings));
        assert_eq!(
            relabelled.metadata.labels.unwrap()[INJECTION_LABEL],
            "injected"
        );
        assert_eq!(relabelled.spec, once.spec, "only the label is added");

        for native in [true, false] {
            let upgraded = InjectionSettings {
                image: "llmroute:9.9.9".into(),
                native_sidecars: native,
                ..InjectionSettings::default()
            };
            let twice = apply(&once, &decide(&once, Some(&route()), &upgraded));
            let spec = twice.spec.unwrap();
            let sidecars: Vec<&Container> = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .filter(|c| c.name == SIDECAR_NAME)
                .collect();
            assert_eq!(sidecars.len(), 1, "native {native}");
            assert_eq!(sidecars[0].image.as_deref(), Some("llmroute:9.9.9"));
            assert_eq!(spec.volumes.unwrap().len(), 1, "one token volume");
            let env = spec.containers[0].env.clone().unwrap();
            assert_eq!(
                env.iter().filter(|e| e.name == "OPENAI_BASE_URL").count(),
                1
            );
        }
    }

    #[test]
    fn skips_name_their_reason() {
        let settings = InjectionSettings::default();
        let cases = [
            (
                json!({ROUTE_ANNOTATION: "chat"}),
                json!({"hostNetwork": true, "containers": [{"name": "a"}]}),
                true,
                SkipReason::HostNetwork,
            ),
            (
                json!({ROUTE_ANNOTATION: "chat", INJECT_ANNOTATION: "false"}),
                app_spec(),
                true,
                SkipReason::OptedOut,
            ),
            (
                json!({ROUTE_ANNOTATION: "chat", INJECT_ANNOTATION: "maybe"}),
                app_spec(),
                true,
                SkipReason::InvalidAnnotation,
            ),
            (
                json!({ROUTE_ANNOTATION: "Not A Route"}),
                app_spec(),
                true,
                SkipReason::InvalidAnnotation,
            ),
            (
                json!({ROUTE_ANNOTATION: "chat", CPU_ANNOTATION: "lots"}),
                app_spec(),
                true,
                SkipReason::InvalidAnnotation,
            ),
            (
                json!({ROUTE_ANNOTATION: "missing"}),
                app_spec(),
                false,
                SkipReason::RouteNotFound,
            ),
        ];
        for (annotations, spec, route_exists, expected) in cases {
            let pod = pod(annotations.clone(), spec);
            let route = route();
            let decision = decide(&pod, route_exists.then_some(&route), &settings);
            let Decision::Skip {
                reason, message, ..
            } = &decision
            else {
                panic!("{annotations}: {decision:?}");
            };
            assert_eq!(*reason, expected, "{annotations}: {message}");
            let skipped = apply(&pod, &decision);
            assert_eq!(skipped.metadata.labels.unwrap()[INJECTION_LABEL], "skipped");
            let note = &skipped.metadata.annotations.unwrap()[SKIPPED_ANNOTATION];
            assert!(
                note.starts_with(&format!("{}: ", expected.as_str())),
                "{note}"
            );
            assert!(skipped.spec.unwrap().init_containers.is_none());
        }
    }

    #[test]
    fn route_settings_apply_and_annotations_win() {
        let mut route = route();
        route.spec.sidecar = Some(llmroute_api::crd::SidecarSpec {
            image: Some("llmroute:route".into()),
            cpu_request: Some("250m".into()),
            memory_request: None,
            memory_limit: Some("1Gi".into()),
        });
        let settings = InjectionSettings::default();
        let pod = pod(
            json!({ROUTE_ANNOTATION: "chat", CPU_ANNOTATION: "500m"}),
            app_spec(),
        );
        let injected = apply(&pod, &decide(&pod, Some(&route), &settings));
        let sidecar = injected.spec.unwrap().init_containers.unwrap().remove(0);
        assert_eq!(sidecar.image.as_deref(), Some("llmroute:route"));
        let resources = sidecar.resources.unwrap();
        let requests = resources.requests.unwrap();
        assert_eq!(requests["cpu"].0, "500m", "the annotation wins");
        assert_eq!(
            requests["memory"].0, settings.memory_request,
            "the default stays"
        );
        assert_eq!(
            resources.limits.unwrap()["memory"].0,
            "1Gi",
            "the route's limit"
        );
    }

    #[test]
    fn unannotated_pods_are_left_alone() {
        let pod = pod(json!({}), app_spec());
        assert_eq!(
            decide(&pod, None, &InjectionSettings::default()),
            Decision::NotRequested
        );
    }

    /// Applies a decision's patch to the pod's JSON as the API server received it, which the
    /// typed `Pod` may not reproduce (absent and null fields, for one).
    fn apply_raw(raw: &Value, decision: &Decision) -> Result<Value, String> {
        let patch = match decision {
            Decision::Inject { patch, .. }
            | Decision::Skip { patch, .. }
            | Decision::AlreadyInjected { patch } => patch.clone(),
            Decision::NotRequested => return Ok(raw.clone()),
        };
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(patch)).map_err(|e| e.to_string())?;
        let mut value = raw.clone();
        json_patch::patch(&mut value, &patch).map_err(|e| format!("{e}: {patch:?}"))?;
        Ok(value)
    }

    fn annotation_bytes(pod: &Pod) -> usize {
        pod.metadata
            .annotations
            .iter()
            .flatten()
            .map(|(key, value)| key.len() + value.len())
            .sum()
    }

    fn all_distinct<'a>(names: impl Iterator<Item = &'a str>) -> bool {
        let mut seen = std::collections::HashSet::new();
        names.into_iter().all(|name| seen.insert(name))
    }

    /// Checks what the API server's validation would reject in a patched pod.
    fn assert_valid_pod(label: &str, pod: &Pod) {
        let spec = pod.spec.clone().unwrap_or_default();
        assert!(!spec.containers.is_empty(), "{label}: no containers");

        let containers = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .map(|c| c.name.as_str());
        assert!(
            all_distinct(containers),
            "{label}: duplicate container names"
        );

        let volumes = spec.volumes.iter().flatten().map(|v| v.name.as_str());
        assert!(all_distinct(volumes), "{label}: duplicate volume names");

        assert!(
            annotation_bytes(pod) <= MAX_ANNOTATIONS_BYTES,
            "{label}: annotations over the API server's limit"
        );

        for container in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let Some(resources) = &container.resources else {
                continue;
            };
            let memory = |map: &Option<
                BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
            >| {
                map.as_ref()
                    .and_then(|m| m.get("memory"))
                    .and_then(|q| quantity_value(&q.0))
            };
            if let (Some(request), Some(limit)) =
                (memory(&resources.requests), memory(&resources.limits))
            {
                assert!(request <= limit, "{label}: memory request above limit");
            }
        }
    }

    fn sidecar_count(pod: &Pod) -> usize {
        let spec = pod.spec.clone().unwrap_or_default();
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter(|c| c.name == SIDECAR_NAME)
            .count()
    }

    #[test]
    fn patches_apply_to_unusual_pods() {
        let route_only = |name: &str| json!({ROUTE_ANNOTATION: name});
        let many: Vec<Value> = (0..300)
            .map(|i| json!({"name": format!("app-{i}"), "image": "app:1"}))
            .collect();
        // Each case: name, pod JSON, whether it is injected (else skipped as InvalidPod).
        let cases: Vec<(&str, Value, bool)> = vec![
            (
                "minimal",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"containers": [{"name": "app"}]}}),
                true,
            ),
            (
                "empty lists and maps",
                json!({"metadata": {"name": "p", "annotations": route_only("chat"), "labels": {}},
                       "spec": {"containers": [{"name": "app", "env": []}],
                                "initContainers": [], "volumes": []}}),
                true,
            ),
            (
                "null lists and maps",
                json!({"metadata": {"name": "p", "annotations": route_only("chat"), "labels": null},
                       "spec": {"containers": [{"name": "app", "env": null}],
                                "initContainers": null, "volumes": null}}),
                true,
            ),
            (
                "base URL from a secret",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                "spec": {"containers": [{"name": "app", "env": [
                    {"name": "OPENAI_BASE_URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
                ]}]}}),
                true,
            ),
            (
                "existing init containers and volumes",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"initContainers": [{"name": "setup"}, {"name": "migrate"}],
                                "containers": [{"name": "app"}],
                                "volumes": [{"name": "data", "emptyDir": {}}]}}),
                true,
            ),
            (
                "annotation keys that need escaping",
                json!({"metadata": {"generateName": "p-", "annotations": {
                           "llmroute.dev/route": "chat", "a~b/c": "1", "x/~1": "2"},
                       "labels": {"a~b/c": "1"}},
                       "spec": {"containers": [{"name": "app"}]}}),
                true,
            ),
            (
                "unicode names",
                json!({"metadata": {"name": "pöd-✓", "annotations": route_only("chat")},
                       "spec": {"containers": [{"name": "äpp-✓"}, {"name": "~/"}]}}),
                true,
            ),
            (
                "many containers",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"containers": many}}),
                true,
            ),
            (
                "no namespace and generateName only",
                json!({"metadata": {"generateName": "p-", "annotations": route_only("chat")},
                       "spec": {"containers": [{"name": "app"}]}}),
                true,
            ),
            (
                "a skip note copied from another pod",
                json!({"metadata": {"name": "p", "annotations": {
                           ROUTE_ANNOTATION: "chat", SKIPPED_ANNOTATION: "RouteNotFound: old"},
                       "labels": {INJECTION_LABEL: "skipped"}},
                       "spec": {"containers": [{"name": "app"}]}}),
                true,
            ),
            (
                "no containers",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"containers": []}}),
                false,
            ),
            (
                "no spec",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")}}),
                false,
            ),
            (
                "only a container of the sidecar's name",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"containers": [{"name": SIDECAR_NAME, "image": "mine:1"}]}}),
                false,
            ),
            (
                "an app container of the sidecar's name",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"containers": [{"name": "app"}, {"name": SIDECAR_NAME, "image": "mine:1"}]}}),
                false,
            ),
            (
                "an init container of the sidecar's name",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"initContainers": [{"name": SIDECAR_NAME, "image": "mine:1"}],
                                "containers": [{"name": "app"}]}}),
                false,
            ),
            (
                "a volume of the token's name",
                json!({"metadata": {"name": "p", "annotations": route_only("chat")},
                       "spec": {"containers": [{"name": "app", "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": "/t"}]}],
                                "volumes": [{"name": TOKEN_VOLUME, "emptyDir": {}}]}}),
                false,
            ),
        ];
        for native in [true, false] {
            let settings = InjectionSettings {
                native_sidecars: native,
                ..InjectionSettings::default()
            };
            for (name, raw, injected) in &cases {
                let label = format!("{name} (native {native})");
                let pod: Pod = serde_json::from_value(raw.clone()).expect(&label);
                let decision = decide(&pod, Some(&route()), &settings);
                let patched = apply_raw(raw, &decision)
                    .unwrap_or_else(|error| panic!("{label}: the patch does not apply: {error}"));
                let patched: Pod = serde_json::from_value(patched)
                    .unwrap_or_else(|error| panic!("{label}: not a pod: {error}"));
                let app_containers = |pod: &Pod| {
                    pod.spec
                        .iter()
                        .flat_map(|spec| spec.containers.iter())
                        .filter(|c| c.name != SIDECAR_NAME)
                        .count()
                };
                assert_eq!(
                    app_containers(&patched),
                    app_containers(&pod),
                    "{label}: app containers kept"
                );
                match &decision {
                    Decision::Inject { .. } if *injected => {
                        assert_valid_pod(&label, &patched);
                        assert_eq!(sidecar_count(&patched), 1, "{label}: one sidecar");
                        let annotations = patched.metadata.annotations.clone().unwrap();
                        assert!(
                            !annotations.contains_key(SKIPPED_ANNOTATION),
                            "{label}: no skip note on an injected pod"
                        );
                        assert_eq!(
                            patched.metadata.labels.clone().unwrap()[INJECTION_LABEL],
                            "injected",
                            "{label}"
                        );
                        let again = decide(&patched, Some(&route()), &settings);
                        assert!(
                            matches!(again, Decision::AlreadyInjected { .. }),
                            "{label}: second review {again:?}"
                        );
                        let twice = apply_raw(&serde_json::to_value(&patched).unwrap(), &again)
                            .expect("second patch applies");
                        let twice: Pod = serde_json::from_value(twice).expect("a pod");
                        assert_eq!(sidecar_count(&twice), 1, "{label}: no second sidecar");
                    }
                    Decision::Skip { reason, .. } if !*injected => {
                        assert_eq!(*reason, SkipReason::InvalidPod, "{label}");
                        assert_eq!(patched.spec, pod.spec, "{label}: spec unchanged");
                    }
                    other => panic!("{label}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn hostile_annotation_values_skip_with_short_note() {
        let settings = InjectionSettings::default();
        let long = "a".repeat(200 * 1024);
        let cases = [
            (ROUTE_ANNOTATION, long.clone()),
            (ROUTE_ANNOTATION, "other/chat".into()),
            (ROUTE_ANNOTATION, "../chat".into()),
            (INJECT_ANNOTATION, long.clone()),
            (CPU_ANNOTATION, "1".repeat(10 * 1024)),
            (CPU_ANNOTATION, "-1".into()),
            (MEMORY_ANNOTATION, "256Mi\"}".into()),
            (IMAGE_ANNOTATION, long.clone()),
            (IMAGE_ANNOTATION, "llmroute:1;$(id)".into()),
            (IMAGE_ANNOTATION, "llmroute:1\u{0}".into()),
            (IMAGE_ANNOTATION, "\"llmroute\"".into()),
        ];
        for (key, value) in cases {
            let mut annotations = json!({ROUTE_ANNOTATION: "chat"});
            annotations[key] = json!(value);
            let pod = pod(annotations, app_spec());
            let decision = decide(&pod, Some(&route()), &settings);
            let label = format!("{key} of {} bytes", value.len());
            let Decision::Skip {
                reason, message, ..
            } = &decision
            else {
                panic!("{label}: {decision:?}");
            };
            assert_eq!(*reason, SkipReason::InvalidAnnotation, "{label}");
            assert!(message.contains(key), "{label}: {message}");
            assert!(
                message.len() < 1024,
                "{label}: the message quotes at most a prefix"
            );
            let skipped = apply(&pod, &decision);
            assert_valid_pod(&label, &skipped);
        }
    }

    #[test]
    fn memory_request_stays_within_limit() {
        let settings = InjectionSettings::default();
        let sidecar_memory = |decision: &Decision, pod: &Pod| {
            let injected = apply(pod, decision);
            let sidecar = injected.spec.unwrap().init_containers.unwrap().remove(0);
            let resources = sidecar.resources.unwrap();
            (
                resources.requests.unwrap()["memory"].0.clone(),
                resources.limits.unwrap()["memory"].0.clone(),
            )
        };

        // Above the operator's default limit: the limit follows the request.
        let pod = pod(
            json!({ROUTE_ANNOTATION: "chat", MEMORY_ANNOTATION: "1Gi"}),
            app_spec(),
        );
        let decision = decide(&pod, Some(&route()), &settings);
        assert!(matches!(decision, Decision::Inject { .. }), "{decision:?}");
        assert_eq!(
            sidecar_memory(&decision, &pod),
            ("1Gi".to_string(), "1Gi".to_string())
        );

        // Within the default limit: both stay.
        let pod_within = self::pod(
            json!({ROUTE_ANNOTATION: "chat", MEMORY_ANNOTATION: "0.5Gi"}),
            app_spec(),
        );
        let decision = decide(&pod_within, Some(&route()), &settings);
        assert_eq!(
            sidecar_memory(&decision, &pod_within),
            ("0.5Gi".to_string(), settings.memory_limit.clone())
        );

        // Above a limit the route sets: the pod's annotation is at fault.
        let mut limited = route();
        limited.spec.sidecar = Some(llmroute_api::crd::SidecarSpec {
            memory_limit: Some("512Mi".into()),
            ..Default::default()
        });
        let decision = decide(&pod, Some(&limited), &settings);
        let Decision::Skip {
            reason, message, ..
        } = &decision
        else {
            panic!("{decision:?}");
        };
        assert_eq!(*reason, SkipReason::InvalidAnnotation);
        assert!(message.contains("\"1Gi\""), "{message}");
        assert!(message.contains("\"512Mi\""), "{message}");

        // The route's own request above its own limit: the route is at fault.
        let mut contradictory = route();
        contradictory.spec.sidecar = Some(llmroute_api::crd::SidecarSpec {
            memory_request: Some("2Gi".into()),
            memory_limit: Some("1Gi".into()),
            ..Default::default()
        });
        let plain = self::pod(json!({ROUTE_ANNOTATION: "chat"}), app_spec());
        let decision = decide(&plain, Some(&contradictory), &settings);
        assert!(
            matches!(
                decision,
                Decision::Skip {
                    reason: SkipReason::InvalidRoute,
                    ..
                }
            ),
            "{decision:?}"
        );
    }

    #[test]
    fn limit_annotations_make_sidecar_guaranteed() {
        let settings = InjectionSettings::default();
        let annotated = pod(
            json!({
                ROUTE_ANNOTATION: "chat",
                CPU_ANNOTATION: "500m",
                CPU_LIMIT_ANNOTATION: "500m",
                MEMORY_ANNOTATION: "512Mi",
                MEMORY_LIMIT_ANNOTATION: "512Mi",
            }),
            app_spec(),
        );
        let decision = decide(&annotated, Some(&route()), &settings);
        assert!(matches!(decision, Decision::Inject { .. }), "{decision:?}");
        let injected = apply(&annotated, &decision);
        let sidecar = injected.spec.unwrap().init_containers.unwrap().remove(0);
        let resources = sidecar.resources.unwrap();
        // Requests equal to limits for CPU and memory: the Guaranteed QoS class.
        assert_eq!(resources.requests, resources.limits);
        assert_eq!(resources.limits.unwrap()["cpu"].0, "500m");

        // Without the annotation there is no CPU limit.
        let plain = pod(json!({ROUTE_ANNOTATION: "chat"}), app_spec());
        let injected = apply(&plain, &decide(&plain, Some(&route()), &settings));
        let sidecar = injected.spec.unwrap().init_containers.unwrap().remove(0);
        assert!(
            !sidecar
                .resources
                .unwrap()
                .limits
                .unwrap()
                .contains_key("cpu")
        );

        // Limits below their requests, or not quantities, skip the pod and name the value.
        for (annotations, expected) in [
            (
                json!({ROUTE_ANNOTATION: "chat", CPU_ANNOTATION: "1", CPU_LIMIT_ANNOTATION: "500m"}),
                "llmroute.dev/sidecar-cpu-limit is \"500m\", less than the sidecar's CPU request \"1\"",
            ),
            (
                json!({ROUTE_ANNOTATION: "chat", MEMORY_LIMIT_ANNOTATION: "64Mi"}),
                "llmroute.dev/sidecar-memory-limit is \"64Mi\", less than the sidecar's memory request",
            ),
            (
                json!({ROUTE_ANNOTATION: "chat", CPU_LIMIT_ANNOTATION: "lots"}),
                "llmroute.dev/sidecar-cpu-limit is \"lots\"; expected a CPU quantity",
            ),
        ] {
            let limited = pod(annotations, app_spec());
            let decision = decide(&limited, Some(&route()), &settings);
            let Decision::Skip {
                reason, message, ..
            } = &decision
            else {
                panic!("{decision:?}");
            };
            assert_eq!(*reason, SkipReason::InvalidAnnotation);
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn full_annotations_leave_no_room() {
        let settings = InjectionSettings::default();
        let filler_key = "example.com/filler";
        let room =
            MAX_ANNOTATIONS_BYTES - ROUTE_ANNOTATION.len() - "chat".len() - filler_key.len() - 10;
        let pod = pod(
            json!({ROUTE_ANNOTATION: "chat", filler_key: "f".repeat(room)}),
            app_spec(),
        );
        let decision = decide(&pod, Some(&route()), &settings);
        let Decision::Skip { reason, .. } = &decision else {
            panic!("{decision:?}");
        };
        assert_eq!(*reason, SkipReason::InvalidPod);
        let skipped = apply(&pod, &decision);
        assert_valid_pod("full annotations", &skipped);
        assert_eq!(skipped.metadata.labels.unwrap()[INJECTION_LABEL], "skipped");

        // Room for a short skip note only: 100 bytes.
        let pod = self::pod(
            json!({ROUTE_ANNOTATION: "chat", filler_key: "f".repeat(room - 90)}),
            app_spec(),
        );
        let skipped = apply(&pod, &decide(&pod, None, &settings));
        assert_valid_pod("nearly full annotations", &skipped);
        let note = &skipped.metadata.annotations.unwrap()[SKIPPED_ANNOTATION];
        assert!(note.starts_with("RouteNotFound: "), "{note}");
    }

    #[test]
    fn quantities_follow_kubernetes_suffixes() {
        for good in ["100m", "1", "0.5", "256Mi", "1G"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "lots", "1 Gi", "Mi", "1.2.3"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
