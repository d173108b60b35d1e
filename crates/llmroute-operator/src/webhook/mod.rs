//! The sidecar injection webhook: a mutating admission webhook served over TLS, its
//! `MutatingWebhookConfiguration`, its certificate, and the watch of decided pods that turns
//! skips into Events and counts.

pub mod certs;
pub mod connection;
pub mod inject;

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::core::DynamicObject;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::serving::ClusterBackend;
use connection::{ConnectionClock, ConnectionLimits, Verdict, Watched};
pub use inject::{ADMIN_PORT_NAME, DEFAULT_ADMIN_PORT};
use inject::{
    ALREADY_INJECTED, Decision, INJECTION_LABEL, InjectionSettings, ROUTE_ANNOTATION,
    SKIPPED_ANNOTATION,
};

/// Name of the `MutatingWebhookConfiguration` and its one webhook.
pub const CONFIGURATION_NAME: &str = "llmroute-sidecar-injector";
pub const WEBHOOK_NAME: &str = "inject.llmroute.dev";
/// Name of the webhook's match condition, which sends it only pods that name a route.
pub const MATCH_CONDITION: &str = "names-a-route";
/// Path of the webhook on the operator's TLS port.
pub const PATH: &str = "/inject";
/// Largest AdmissionReview accepted, in bytes (the API server's own request limit is 3 MiB).
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// Where the API server reaches the webhook.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookTarget {
    /// The operator's Service (in a cluster).
    Service {
        name: String,
        namespace: String,
        port: u16,
    },
    /// A URL (tests, or an operator outside the cluster).
    Url(String),
}

/// Settings of the webhook configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfigSpec {
    /// Name of the `MutatingWebhookConfiguration` ([`CONFIGURATION_NAME`] unless several
    /// operators share a cluster, as tests do).
    pub name: String,
    /// When set, only namespaces with these labels are sent to the webhook.
    pub namespace_labels: Option<BTreeMap<String, String>>,
    pub target: WebhookTarget,
    /// `Ignore` (a webhook outage never blocks pods) or `Fail`.
    pub failure_policy: String,
    pub timeout_seconds: i32,
    /// Namespaces never sent to the webhook, beyond those labelled
    /// `llmroute.dev/injection: disabled`.
    pub excluded_namespaces: Vec<String>,
}

/// Builds the `MutatingWebhookConfiguration`, with `ca_bundle` when the operator manages the CA.
pub fn configuration(spec: &WebhookConfigSpec, ca_bundle: Option<&str>) -> Value {
    let mut client_config = match &spec.target {
        WebhookTarget::Service {
            name,
            namespace,
            port,
        } => json!({"service": {"name": name, "namespace": namespace, "path": PATH, "port": port}}),
        WebhookTarget::Url(url) => json!({"url": url}),
    };
    if let Some(bundle) = ca_bundle {
        use k8s_openapi::ByteString;
        client_config["caBundle"] =
            serde_json::to_value(ByteString(bundle.as_bytes().to_vec())).expect("bytes serialise");
    }
    let mut namespace_selector = json!({"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": spec.excluded_namespaces},
        {"key": "llmroute.dev/injection", "operator": "NotIn", "values": ["disabled"]},
    ]});
    if let Some(labels) = &spec.namespace_labels {
        namespace_selector["matchLabels"] = json!(labels);
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {
            "name": spec.name,
            "labels": {crate::names::MANAGED_BY: crate::names::MANAGED_BY_VALUE},
        },
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": spec.failure_policy,
            "timeoutSeconds": spec.timeout_seconds,
            "reinvocationPolicy": "Never",
            "matchPolicy": "Equivalent",
            "clientConfig": client_config,
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": namespace_selector,
            // Only pods that name a route reach the webhook, so an unreachable webhook delays
            // no other pod's creation. Servers before Kubernetes 1.28 ignore the field and
            // send every pod, which the webhook admits unchanged.
            "matchConditions": [{
                "name": MATCH_CONDITION,
                "expression": format!(
                    "has(object.metadata.annotations) && '{}' in object.metadata.annotations",
                    inject::ROUTE_ANNOTATION
                ),
            }],
            // The operator's own pods are never sent to it.
            "objectSelector": {"matchExpressions": [
                {"key": "app.kubernetes.io/name", "operator": "NotIn", "values": ["llmroute"]},
            ]},
        }],
    })
}

/// Applies the configuration with server-side apply.
pub async fn apply_configuration(
    client: &Client,
    configuration: &Value,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = configuration["metadata"]["name"]
        .as_str()
        .unwrap_or(CONFIGURATION_NAME);
    api.patch(
        name,
        &PatchParams::apply(crate::names::FIELD_MANAGER).force(),
        &Patch::Apply(configuration),
    )
    .await?;
    Ok(())
}

/// State of the webhook handler.
pub struct Webhook {
    pub settings: InjectionSettings,
    pub backend: Arc<ClusterBackend>,
    pub metrics: Arc<Metrics>,
}

impl Webhook {
    /// Responds to one AdmissionReview. Every response is an allowed `admission.k8s.io/v1`
    /// review with the request's uid when the request has one. A review that cannot be read,
    /// or that is not of a pod CREATE, gets no patch, and the reason is logged and
    /// counted.
    pub fn review(&self, body: &[u8]) -> Value {
        let started = Instant::now();
        let value: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(error) => {
                let message = format!("invalid AdmissionReview: the body is not JSON ({error})");
                return self.admit_unchanged("", "invalid_review", &message, started);
            }
        };
        let uid = value
            .pointer("/request/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Err((outcome, message)) = check_review(&value) {
            return self.admit_unchanged(&uid, outcome, &message, started);
        }
        let review: AdmissionReview<Pod> = match serde_json::from_value(value) {
            Ok(review) => review,
            Err(error) => {
                let message = format!("invalid AdmissionReview of a pod: {error}");
                return self.admit_unchanged(&uid, "invalid_review", &message, started);
            }
        };
        let request: AdmissionRequest<Pod> = match review.try_into() {
            Ok(request) => request,
            Err(error) => {
                let message = format!("invalid AdmissionReview: {error}");
                return self.admit_unchanged(&uid, "invalid_review", &message, started);
            }
        };
        let response = AdmissionResponse::from(&request);
        let Some(pod) = request.object.as_ref() else {
            self.metrics.observe_injection("not_requested", started);
            return serde_json::to_value(response.into_review()).expect("a review serialises");
        };
        let namespace = request
            .namespace
            .clone()
            .filter(|namespace| !namespace.is_empty())
            .or_else(|| pod.namespace())
            .unwrap_or_default();
        let mut pod = pod.clone();
        pod.metadata.namespace = Some(namespace.clone());
        let route = pod.annotations().get(ROUTE_ANNOTATION).and_then(|name| {
            self.backend
                .route(&crate::names::route_key(&namespace, name))
        });
        let decision = inject::decide(&pod, route.as_deref(), &self.settings);
        let pod_name = pod
            .metadata
            .name
            .clone()
            .or_else(|| {
                pod.metadata
                    .generate_name
                    .clone()
                    .map(|g| format!("{g}<generated>"))
            })
            .unwrap_or_default();
        let (outcome, patch) = match decision {
            Decision::NotRequested => ("not_requested", None),
            Decision::AlreadyInjected { patch } => {
                tracing::info!(pod = %pod_name, namespace = %namespace, "pod already injected; unchanged");
                self.metrics.observe_skip(ALREADY_INJECTED);
                ("already_injected", (!patch.is_empty()).then_some(patch))
            }
            Decision::Inject { patch, hash } => {
                tracing::info!(pod = %pod_name, namespace = %namespace, hash = %hash, native = self.settings.native_sidecars, "injecting the sidecar");
                ("injected", Some(patch))
            }
            Decision::Skip {
                reason,
                message,
                patch,
            } => {
                tracing::info!(pod = %pod_name, namespace = %namespace, reason = reason.as_str(), "{message}");
                self.metrics.observe_skip(reason.as_str());
                ("skipped", Some(patch))
            }
        };
        let response = match patch {
            None => response,
            Some(patch) => {
                let patch: json_patch::Patch =
                    serde_json::from_value(Value::Array(patch)).expect("the patch is RFC 6902");
                match response.clone().with_patch(patch) {
                    Ok(patched) => patched,
                    Err(error) => {
                        tracing::error!(pod = %pod_name, namespace = %namespace, error = %error, "failed to encode the patch; admitting the pod unchanged");
                        response
                    }
                }
            }
        };
        self.metrics.observe_injection(outcome, started);
        serde_json::to_value(response.into_review()).expect("a review serialises")
    }

    /// Logs and counts a review that gets no patch because of `message`, and returns an
    /// allowed v1 response with `uid`. The webhook only injects, so it never denies a request.
    fn admit_unchanged(&self, uid: &str, outcome: &str, message: &str, started: Instant) -> Value {
        tracing::warn!(uid = %uid, outcome = outcome, "{message}; admitting without a patch");
        self.metrics.observe_injection(outcome, started);
        let mut response = AdmissionResponse::invalid(message);
        response.uid = uid.to_string();
        response.allowed = true;
        response.result = Default::default();
        serde_json::to_value(response.into_review()).expect("a review serialises")
    }
}

/// Checks that `review` is an `admission.k8s.io/v1` AdmissionReview of a pod CREATE, the only
/// request the webhook configuration sends. Returns the outcome label and the reason
/// otherwise.
fn check_review(review: &Value) -> Result<(), (&'static str, String)> {
    let text = |pointer: &str| review.pointer(pointer).and_then(Value::as_str);
    let (api_version, kind) = (text("/apiVersion"), text("/kind"));
    if api_version != Some(META_API_VERSION_V1) || kind != Some(META_KIND) {
        return Err((
            "invalid_review",
            format!(
                "invalid AdmissionReview: apiVersion {api_version:?} and kind {kind:?}; the webhook reads {META_API_VERSION_V1} {META_KIND}"
            ),
        ));
    }
    if !review.get("request").is_some_and(Value::is_object) {
        return Err((
            "invalid_review",
            "invalid AdmissionReview: request is missing or not an object".into(),
        ));
    }
    if text("/request/uid").is_none_or(str::is_empty) {
        return Err((
            "invalid_review",
            "invalid AdmissionReview: request.uid is missing or not a string".into(),
        ));
    }
    let (group, version, resource_kind) = (
        text("/request/kind/group"),
        text("/request/kind/version"),
        text("/request/kind/kind"),
    );
    if (group, version, resource_kind) != (Some(""), Some("v1"), Some("Pod")) {
        return Err((
            "not_requested",
            format!(
                "the review is about group {group:?} version {version:?} kind {resource_kind:?}, not a v1 Pod"
            ),
        ));
    }
    if let Some(subresource) = text("/request/subResource").filter(|s| !s.is_empty()) {
        return Err((
            "not_requested",
            format!("the review is about the subresource pods/{subresource}, not a pod"),
        ));
    }
    let operation = text("/request/operation");
    if operation != Some("CREATE") {
        return Err((
            "not_requested",
            format!("the review's operation is {operation:?}; the webhook injects only on CREATE"),
        ));
    }
    Ok(())
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    webhook: Arc<Webhook>,
    request: Request<Incoming>,
    body_timeout: Duration,
) -> Response<Full<Bytes>> {
    if request.method() != Method::POST || request.uri().path() != PATH {
        tracing::warn!(method = %request.method(), path = request.uri().path(), "rejected a request for an unknown endpoint with 404");
        return respond(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no endpoint {} {}; the webhook serves POST {PATH}", request.method(), request.uri().path())}).to_string(),
        );
    }
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Some(length) = declared_length.filter(|&length| length > MAX_REVIEW_BYTES as u64) {
        tracing::warn!(
            content_length = length,
            limit_bytes = MAX_REVIEW_BYTES,
            "rejected an AdmissionReview larger than the limit with 413 before reading it"
        );
        return respond(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("the review is larger than the limit of {MAX_REVIEW_BYTES} bytes")}).to_string(),
        );
    }
    let body = Limited::new(request.into_body(), MAX_REVIEW_BYTES).collect();
    let body = match tokio::time::timeout(body_timeout, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Err(_) => {
            tracing::warn!(
                timeout_seconds = body_timeout.as_secs_f64(),
                "timed out reading an AdmissionReview body"
            );
            return respond(
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": format!("the review's body did not arrive within {} s", body_timeout.as_secs_f64())}).to_string(),
            );
        }
        Ok(Err(error)) if error.is::<LengthLimitError>() => {
            tracing::warn!(
                limit_bytes = MAX_REVIEW_BYTES,
                "rejected an AdmissionReview larger than the limit with 413"
            );
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("the review is larger than the limit of {MAX_REVIEW_BYTES} bytes")}).to_string(),
            );
        }
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "failed to read an AdmissionReview body");
            return respond(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("failed to read the review's body: {error}")}).to_string(),
            );
        }
    };
    let answer = webhook.review(&body);
    respond(StatusCode::OK, answer.to_string())
}

/// Serves the webhook over TLS on `listener` until `shutdown` completes, with the default
/// [`ConnectionLimits`].
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<certs::CertResolver>,
    webhook: Arc<Webhook>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(
        listener,
        resolver,
        webhook,
        ConnectionLimits::default(),
        shutdown,
    )
    .await
}

/// Serves the webhook over TLS on `listener` until `shutdown` completes.
pub async fn serve_with(
    listener: TcpListener,
    resolver: Arc<certs::CertResolver>,
    webhook: Arc<Webhook>,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tracing::info!(address = %address, path = PATH, max_open = limits.max_open, "injection webhook listening (TLS)");
    tokio::pin!(shutdown);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_open));
    let mut at_cap = false;
    loop {
        if open.available_permits() == 0 && !at_cap {
            tracing::warn!(
                max_open = limits.max_open,
                "webhook connections at their cap; new connections wait in the listen backlog"
            );
        } else if open.available_permits() > 0 && at_cap {
            tracing::info!(
                max_open = limits.max_open,
                "webhook connections below their cap again"
            );
        }
        at_cap = open.available_permits() == 0;
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to accept a connection; retrying in 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let webhook = webhook.clone();
                tokio::spawn(async move {
                    // Held until the connection closes.
                    let _permit = permit;
                    let metrics = &webhook.metrics;
                    let started = Instant::now();
                    let tls = match tokio::time::timeout(limits.tls_handshake, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            metrics.observe_connection("established", Some(started.elapsed()));
                            tls
                        }
                        Ok(Err(error)) => {
                            metrics.observe_connection("tls_failed", None);
                            tracing::warn!(peer = %peer, error = %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            metrics.observe_connection("tls_timeout", None);
                            tracing::warn!(peer = %peer, timeout_seconds = limits.tls_handshake.as_secs_f64(), "TLS handshake timed out");
                            return;
                        }
                    };
                    serve_connection(tls, peer, webhook, limits).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!(address = %address, "injection webhook stopped");
    Ok(())
}

/// Serves HTTP/1.1 on one TLS connection until the client closes it or a timeout of
/// `timeouts` ends it.
async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    webhook: Arc<Webhook>,
    timeouts: ConnectionLimits,
) {
    let clock = Arc::new(ConnectionClock::new(Instant::now()));
    let service = {
        let clock = clock.clone();
        service_fn(move |request| {
            let webhook = webhook.clone();
            let clock = clock.clone();
            async move {
                clock.on_request();
                let response = handle(webhook, request, timeouts.body_read).await;
                clock.on_response(Instant::now());
                Ok::<_, Infallible>(response)
            }
        })
    };
    // No header_read_timeout here: hyper's would also close idle keep-alive connections, and
    // the clock times a request's head from its first byte instead.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(Watched::new(tls, clock.clone())), service);
    tokio::pin!(connection);
    let mut checks = tokio::time::interval(timeouts.check_interval());
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                match result {
                    Err(e) if e.is_parse() => {
                        tracing::warn!(peer = %peer, error = %e, "closing a webhook connection: invalid HTTP request");
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "webhook connection ended with an error");
                    }
                    Ok(()) => {}
                }
                return;
            }
            _ = checks.tick() => match clock.check(Instant::now(), &timeouts) {
                Verdict::Open => {}
                Verdict::HeadTimedOut => {
                    tracing::warn!(
                        peer = %peer,
                        timeout_seconds = timeouts.header_read.as_secs_f64(),
                        "closing a webhook connection: request head not complete in time"
                    );
                    return;
                }
                Verdict::IdleTimedOut if !shutting_down => {
                    tracing::debug!(
                        peer = %peer,
                        idle_seconds = timeouts.idle.as_secs_f64(),
                        "closing an idle webhook connection"
                    );
                    connection.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
                Verdict::IdleTimedOut => {}
            },
        }
    }
}

/// Watches pods the webhook decided on (label `llmroute.dev/injection`), publishes an Event on
/// each skipped pod once it exists, and keeps each route's counts of injected and skipped pods
/// in its status. Runs on the leader.
pub async fn watch_decided_pods(
    pods: Api<Pod>,
    client: Client,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    let mut announced: HashSet<String> = HashSet::new();
    // Route key → (injected pod uids, skipped pod uids).
    let mut counts: BTreeMap<String, (HashSet<String>, HashSet<String>)> = BTreeMap::new();
    let mut written: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    let config = watcher::Config::default().labels(INJECTION_LABEL);
    let mut stream = watcher(pods, config).default_backoff().boxed();
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = stream.try_next() => match event {
                Ok(Some(Event::Apply(pod) | Event::InitApply(pod))) => {
                    track(&pod, &mut counts, true);
                    announce_skip(&pod, &recorder, &mut announced).await;
                }
                Ok(Some(Event::Delete(pod))) => track(&pod, &mut counts, false),
                Ok(Some(Event::Init)) => counts.clear(),
                Ok(Some(Event::InitDone)) => {}
                Ok(None) => {
                    tracing::error!("the pod watch ended");
                    return;
                }
                Err(error) => tracing::warn!(error = %error, "the pod watch failed; retrying with backoff"),
            },
            _ = flush.tick() => write_counts(&client, &counts, &mut written).await,
            () = &mut stopped => return,
        }
    }
}

fn track(
    pod: &Pod,
    counts: &mut BTreeMap<String, (HashSet<String>, HashSet<String>)>,
    present: bool,
) {
    let (Some(route), Some(uid)) = (pod.annotations().get(ROUTE_ANNOTATION), pod.uid()) else {
        return;
    };
    let key = crate::names::route_key(&pod.namespace().unwrap_or_default(), route);
    let entry = counts.entry(key).or_default();
    entry.0.remove(&uid);
    entry.1.remove(&uid);
    if present {
        match pod.labels().get(INJECTION_LABEL).map(String::as_str) {
            Some("injected") => {
                entry.0.insert(uid);
            }
            Some("skipped") => {
                entry.1.insert(uid);
            }
            _ => {}
        }
    }
}

async fn announce_skip(pod: &Pod, recorder: &Recorder, announced: &mut HashSet<String>) {
    let Some(note) = pod.annotations().get(SKIPPED_ANNOTATION) else {
        return;
    };
    let Some(uid) = pod.uid() else {
        return;
    };
    if !announced.insert(uid) {
        return;
    }
    let (reason, message) = note.split_once(": ").unwrap_or(("Skipped", note.as_str()));
    // A pod that already has its sidecar lacks nothing, so that skip is a Normal Event and the
    // others are Warnings.
    let type_ = if reason == ALREADY_INJECTED {
        EventType::Normal
    } else {
        EventType::Warning
    };
    let event = KubeEvent {
        type_,
        reason: format!("InjectionSkipped{reason}"),
        note: Some(format!("llmroute sidecar not injected: {message}")),
        action: "Inject".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::warn!(pod = %pod.name_any(), error = %error, "failed to publish the skip Event");
    }
}

async fn write_counts(
    client: &Client,
    counts: &BTreeMap<String, (HashSet<String>, HashSet<String>)>,
    written: &mut BTreeMap<String, (u32, u32)>,
) {
    for (key, (injected, skipped)) in counts {
        let now = (injected.len() as u32, skipped.len() as u32);
        if written.get(key) == Some(&now) {
            continue;
        }
        let Some((namespace, name)) = key.split_once('/') else {
            continue;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            namespace,
            &kube::api::ApiResource::erase::<llmroute_api::crd::LlmRoute>(&()),
        );
        let patch = json!({
            "apiVersion": llmroute_api::crd::API_VERSION,
            "kind": "LLMRoute",
            "status": {"injectedPods": now.0, "skippedPods": now.1},
        });
        match api
            .patch_status(
                name,
                &PatchParams::apply(COUNTS_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                written.insert(key.clone(), now);
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                // A pod names a route that does not exist: nothing to count on.
                written.insert(key.clone(), now);
            }
            Err(error) => {
                tracing::warn!(route = %key, error = %error, "failed to write the pod counts; retrying in 1 s");
            }
        }
    }
}

/// Field manager of the pod counts in route status, apart from the reconciler's, so that
/// neither removes the other's fields.
pub const COUNTS_MANAGER: &str = "llmroute-operator-injection";

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Starts a webhook server on 127.0.0.1 with `limits`, and returns a TLS connector that
    /// trusts its CA.
    async fn tls_server(
        limits: ConnectionLimits,
        folder: &std::path::Path,
    ) -> (SocketAddr, tokio_rustls::TlsConnector, watch::Sender<bool>) {
        let set = certs::generate(&["127.0.0.1".to_string()], &certs::Lifetimes::default())
            .expect("certificates");
        let resolver = Arc::new(certs::CertResolver::default());
        resolver.set(certs::certified_key(&set.cert_pem, &set.key_pem).expect("key"));
        let webhook = Arc::new(test_webhook(folder));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(serve_with(
            listener,
            resolver,
            webhook,
            limits,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        ));

        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(set.ca_pem.as_bytes()).expect("CA PEM"))
            .expect("CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        (
            address,
            tokio_rustls::TlsConnector::from(Arc::new(config)),
            stop,
        )
    }

    async fn connect(
        address: SocketAddr,
        connector: &tokio_rustls::TlsConnector,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
        connector.connect(name, tcp).await.expect("TLS handshake")
    }

    /// Sends a GET of an unknown path and reads the 404 response; `None` when the server
    /// closed the connection.
    async fn get_not_found(
        stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) -> Option<String> {
        let request = b"GET /missing HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";
        stream.write_all(request).await.ok()?;
        let mut response = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                .await
                .expect("the server responds or closes within 5 s")
                .ok()?;
            if read == 0 {
                return None;
            }
            response.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&response).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .and_then(|value| value.trim().parse::<usize>().ok())
                    .expect("a content-length header");
                if body.len() >= length {
                    return Some(head.lines().next().unwrap_or_default().to_string());
                }
            }
        }
    }

    /// Reads until the server closes the connection, for at most 5 s; true when it closed.
    async fn closed_by_server(
        stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) -> bool {
        let mut buffer = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    fn short_timeouts() -> ConnectionLimits {
        ConnectionLimits {
            header_read: Duration::from_millis(200),
            body_read: Duration::from_millis(200),
            // Long enough that a slow test machine does not close the idle connection first.
            idle: Duration::from_secs(10),
            ..ConnectionLimits::default()
        }
    }

    #[tokio::test]
    async fn idle_keep_alive_connection_is_reused() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;
        let mut stream = connect(address, &connector).await;
        let first = get_not_found(&mut stream).await;
        assert_eq!(first.as_deref(), Some("HTTP/1.1 404 Not Found"));
        // Idle for four header timeouts, which hyper's own header timeout would have ended.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let second = get_not_found(&mut stream).await;
        assert_eq!(second.as_deref(), Some("HTTP/1.1 404 Not Found"));
    }

    #[tokio::test]
    async fn stalled_request_head_closes_connection() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;
        let mut stream = connect(address, &connector).await;
        stream
            .write_all(b"POST /inject HTTP/1.1\r\n")
            .await
            .expect("partial head sent");
        assert!(closed_by_server(&mut stream).await);
    }

    #[tokio::test]
    async fn stalled_request_body_gets_request_timeout() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;
        let mut stream = connect(address, &connector).await;
        let head = b"POST /inject HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{";
        stream.write_all(head).await.expect("head sent");
        let mut buffer = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("a response within 5 s")
            .expect("a readable response");
        let response = String::from_utf8_lossy(&buffer[..read]).to_string();
        assert!(
            response.starts_with("HTTP/1.1 408 Request Timeout"),
            "{response}"
        );
    }

    #[tokio::test]
    async fn abandoned_connection_closes_after_idle_timeout() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let timeouts = ConnectionLimits {
            idle: Duration::from_millis(300),
            ..short_timeouts()
        };
        let (address, connector, _stop) = tls_server(timeouts, folder.path()).await;
        let mut stream = connect(address, &connector).await;
        let first = get_not_found(&mut stream).await;
        assert_eq!(first.as_deref(), Some("HTTP/1.1 404 Not Found"));
        assert!(closed_by_server(&mut stream).await);
    }

    fn test_webhook(folder: &std::path::Path) -> Webhook {
        let metrics = Arc::new(Metrics::default());
        let store = llmroute_control::Store::open(folder).expect("store");
        Webhook {
            settings: InjectionSettings::default(),
            backend: Arc::new(ClusterBackend::new(store, metrics.clone())),
            metrics,
        }
    }

    /// Returns a pod that requests a route the backend does not have, so a CREATE gets a skip
    /// patch.
    fn pod_json() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "app", "namespace": "shop", "annotations": {ROUTE_ANNOTATION: "missing"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        })
    }

    fn pod_review(operation: &str) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "uid-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "alice"},
                "object": pod_json(),
                "oldObject": null,
                "dryRun": false,
            },
        })
    }

    #[test]
    fn review_always_allows_with_v1_and_uid() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let webhook = test_webhook(folder.path());
        // The review with the field at `pointer` set, or added when missing.
        let with = |pointer: &str, value: Value| {
            let mut review = pod_review("CREATE");
            let (parent, field) = pointer.rsplit_once('/').expect("a JSON pointer");
            review
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .expect(parent)
                .insert(field.to_string(), value);
            review.to_string().into_bytes()
        };
        let without = |field: &str| {
            let mut review = pod_review("CREATE");
            review["request"]
                .as_object_mut()
                .expect("request")
                .remove(field);
            review.to_string().into_bytes()
        };
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "app", "annotations": {ROUTE_ANNOTATION: "missing"}},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}},
        });
        // Each case: name, body, expected response uid, whether a patch is expected.
        let cases: Vec<(&str, Vec<u8>, &str, bool)> = vec![
            (
                "create",
                pod_review("CREATE").to_string().into_bytes(),
                "uid-1",
                true,
            ),
            (
                "dry run",
                with("/request/dryRun", json!(true)),
                "uid-1",
                true,
            ),
            (
                "no namespace anywhere",
                {
                    let mut review = pod_review("CREATE");
                    review["request"]
                        .as_object_mut()
                        .unwrap()
                        .remove("namespace");
                    review["request"]["object"]["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .remove("namespace");
                    review.to_string().into_bytes()
                },
                "uid-1",
                true,
            ),
            (
                "update",
                pod_review("UPDATE").to_string().into_bytes(),
                "uid-1",
                false,
            ),
            (
                "delete",
                with("/request/operation", json!("DELETE")),
                "uid-1",
                false,
            ),
            (
                "connect",
                with("/request/operation", json!("CONNECT")),
                "uid-1",
                false,
            ),
            (
                "unknown operation",
                with("/request/operation", json!("PATCH")),
                "uid-1",
                false,
            ),
            (
                "null object",
                with("/request/object", Value::Null),
                "uid-1",
                false,
            ),
            (
                "deployment",
                {
                    let mut review = pod_review("CREATE");
                    review["request"]["kind"] =
                        json!({"group": "apps", "version": "v1", "kind": "Deployment"});
                    review["request"]["object"] = deployment.clone();
                    review.to_string().into_bytes()
                },
                "uid-1",
                false,
            ),
            (
                "subresource",
                with("/request/subResource", json!("ephemeralcontainers")),
                "uid-1",
                false,
            ),
            (
                "v1beta1",
                with("/apiVersion", json!("admission.k8s.io/v1beta1")),
                "uid-1",
                false,
            ),
            ("wrong kind", with("/kind", json!("Pod")), "uid-1", false),
            ("uid missing", without("uid"), "", false),
            (
                "uid not a string",
                with("/request/uid", json!(42)),
                "",
                false,
            ),
            ("uid empty", with("/request/uid", json!("")), "", false),
            ("userInfo missing", without("userInfo"), "uid-1", false),
            (
                "object not a pod",
                with("/request/object/spec/containers", json!("app")),
                "uid-1",
                false,
            ),
            (
                "request missing",
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})
                    .to_string()
                    .into_bytes(),
                "",
                false,
            ),
            ("request null", with("/request", Value::Null), "", false),
            ("invalid JSON", b"{\"apiVersion\": ".to_vec(), "", false),
            ("empty body", Vec::new(), "", false),
            ("JSON array", b"[1, 2]".to_vec(), "", false),
            ("JSON null", b"null".to_vec(), "", false),
            (
                "deeply nested JSON",
                [vec![b'['; 100_000], vec![b']'; 100_000]].concat(),
                "",
                false,
            ),
        ];
        for (name, body, uid, patched) in cases {
            let answer = webhook.review(&body);
            assert_eq!(
                answer["apiVersion"], "admission.k8s.io/v1",
                "{name}: {answer}"
            );
            assert_eq!(answer["kind"], "AdmissionReview", "{name}: {answer}");
            let response = &answer["response"];
            assert_eq!(response["uid"], uid, "{name}: {answer}");
            assert_eq!(response["allowed"], true, "{name}: {answer}");
            assert_eq!(response.get("patch").is_some(), patched, "{name}: {answer}");
            assert_eq!(
                response.get("patchType").is_some(),
                patched,
                "{name}: {answer}"
            );
        }
    }

    /// Sends `request` and reads one response. Returns its status line and body, or `None` when
    /// the server closed the connection first.
    async fn exchange(
        stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        request: &[u8],
    ) -> Option<(String, String)> {
        stream.write_all(request).await.ok()?;
        read_response(stream).await
    }

    async fn read_response(
        stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) -> Option<(String, String)> {
        let mut response = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_string();
                let length = head
                    .lines()
                    .find_map(|line| {
                        line.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_string)
                    })
                    .and_then(|value| value.trim().parse::<usize>().ok())
                    .expect("a content-length header");
                if response.len() >= end + 4 + length {
                    let body =
                        String::from_utf8_lossy(&response[end + 4..end + 4 + length]).to_string();
                    let status = head.lines().next().unwrap_or_default().to_string();
                    return Some((status, body));
                }
            }
            // A bound against a hung test, long enough for 200 concurrent handshakes on a slow machine.
            let read = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buffer))
                .await
                .expect("the server responds or closes within 60 s")
                .ok()?;
            if read == 0 {
                return None;
            }
            response.extend_from_slice(&buffer[..read]);
        }
    }

    fn post(path: &str, body: &[u8]) -> Vec<u8> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    }

    #[tokio::test]
    async fn review_path_with_query_is_served() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;
        let mut stream = connect(address, &connector).await;
        let body = pod_review("CREATE").to_string();
        let (status, answer) = exchange(&mut stream, &post("/inject?timeout=3s", body.as_bytes()))
            .await
            .expect("a response");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let answer: Value = serde_json::from_str(&answer).expect("JSON");
        assert_eq!(answer["response"]["uid"], "uid-1");
        let (status, _) = exchange(&mut stream, &post("/inject/", body.as_bytes()))
            .await
            .expect("a response");
        assert_eq!(status, "HTTP/1.1 404 Not Found");
    }

    #[tokio::test]
    async fn review_body_limit_is_exact() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;
        let review = pod_review("CREATE").to_string();
        // JSON allows trailing whitespace, so padding keeps the review readable.
        let mut at_limit = review.into_bytes();
        at_limit.resize(MAX_REVIEW_BYTES, b' ');
        let mut stream = connect(address, &connector).await;
        let (status, answer) = exchange(&mut stream, &post(PATH, &at_limit))
            .await
            .expect("a response");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let answer: Value = serde_json::from_str(&answer).expect("JSON");
        assert!(answer["response"].get("patch").is_some(), "{answer}");

        // Chunked, so that the server finds the size by reading: a Content-Length over the
        // limit is rejected from the head alone.
        let mut over = at_limit;
        over.push(b' ');
        let mut request = format!(
            "POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(format!("{:x}\r\n", over.len()).as_bytes());
        request.extend_from_slice(&over);
        request.extend_from_slice(b"\r\n0\r\n\r\n");
        let mut stream = connect(address, &connector).await;
        let (status, _) = exchange(&mut stream, &request).await.expect("a response");
        assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
    }

    #[tokio::test]
    async fn declared_oversize_body_rejected_unread() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;
        let mut stream = connect(address, &connector).await;
        // The head announces one byte over the limit, and no body follows. Reading it would
        // end in the body timeout's 408.
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            MAX_REVIEW_BYTES + 1
        );
        let (status, body) = exchange(&mut stream, head.as_bytes())
            .await
            .expect("a response");
        assert_eq!(status, "HTTP/1.1 413 Payload Too Large", "{body}");
    }

    #[tokio::test]
    async fn connections_over_cap_wait_for_one_to_close() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let limits = ConnectionLimits {
            max_open: 1,
            ..short_timeouts()
        };
        let (address, connector, _stop) = tls_server(limits, folder.path()).await;
        let mut first = connect(address, &connector).await;
        let body = pod_review("CREATE").to_string();
        let (status, _) = exchange(&mut first, &post(PATH, body.as_bytes()))
            .await
            .expect("a response");
        assert_eq!(status, "HTTP/1.1 200 OK");

        // The kernel completes the TCP connect from the listen backlog, but the server does not
        // accept it, so the TLS handshake waits while the first connection is open.
        let second = tokio::spawn({
            let connector = connector.clone();
            async move { connect(address, &connector).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "a second connection was accepted over the cap of 1"
        );

        drop(first);
        let mut second = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the second connection is accepted once the first closes")
            .expect("the connect task");
        let (status, _) = exchange(&mut second, &post(PATH, body.as_bytes()))
            .await
            .expect("a response");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    #[test]
    fn empty_request_namespace_uses_pods() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let webhook = test_webhook(folder.path());
        let mut review = pod_review("CREATE");
        review["request"]["namespace"] = json!("");
        let answer = webhook.review(review.to_string().as_bytes());
        let patch: Vec<u8> =
            serde_json::from_value(answer["response"]["patch"].clone()).expect("a patch as bytes");
        let patch = String::from_utf8(patch).expect("UTF-8");
        assert!(
            patch.contains("LLMRoute shop/missing does not exist"),
            "the skip note names the pod's namespace: {patch}"
        );
    }

    #[tokio::test]
    async fn malformed_chunked_body_gets_bad_request() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;
        let mut stream = connect(address, &connector).await;
        let request = b"POST /inject HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
        let (status, body) = exchange(&mut stream, request).await.expect("a response");
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");

        let body = pod_review("CREATE").to_string();
        let mut request =
            b"POST /inject HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        for chunk in body.as_bytes().chunks(100) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        let mut stream = connect(address, &connector).await;
        let (status, _) = exchange(&mut stream, &request).await.expect("a response");
        assert_eq!(status, "HTTP/1.1 200 OK", "a valid chunked body is read");
    }

    #[tokio::test]
    async fn server_survives_hostile_clients() {
        let folder = tempfile::tempdir().expect("temporary folder");
        let (address, connector, _stop) = tls_server(short_timeouts(), folder.path()).await;

        // Bytes that are not a TLS ClientHello.
        let mut raw = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\x16\x03\x01\x00\x00")
            .await
            .expect("garbage sent");
        // A client that connects and never sends anything, left open during the rest.
        let _silent = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");

        // A request line that is not HTTP, after a good handshake.
        let mut stream = connect(address, &connector).await;
        stream
            .write_all(b"\x00\x01 not http\r\n\r\n")
            .await
            .expect("sent");
        let answer = read_response(&mut stream).await;
        assert!(
            answer
                .as_ref()
                .is_none_or(|(status, _)| status.starts_with("HTTP/1.1 4")),
            "{answer:?}"
        );

        // HTTP/1.0, and two pipelined requests on one connection.
        let body = pod_review("CREATE").to_string();
        let mut stream = connect(address, &connector).await;
        let mut old = post(PATH, body.as_bytes());
        old.splice(
            0.."POST /inject HTTP/1.1".len(),
            b"POST /inject HTTP/1.0".iter().copied(),
        );
        let (status, _) = exchange(&mut stream, &old).await.expect("a response");
        assert_eq!(status, "HTTP/1.0 200 OK");
        let mut stream = connect(address, &connector).await;
        let mut pipelined = post(PATH, body.as_bytes());
        pipelined.extend(post("/inject?timeout=3s", body.as_bytes()));
        let first = exchange(&mut stream, &pipelined)
            .await
            .expect("first response");
        let second = read_response(&mut stream).await.expect("second response");
        assert_eq!(first.0, "HTTP/1.1 200 OK");
        assert_eq!(second.0, "HTTP/1.1 200 OK");

        // Many connections at once, each with one review.
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let connector = connector.clone();
            let request = post(PATH, body.as_bytes());
            tasks.spawn(async move {
                let mut stream = connect(address, &connector).await;
                exchange(&mut stream, &request)
                    .await
                    .map(|(status, _)| status)
            });
        }
        let mut served = 0;
        while let Some(status) = tasks.join_next().await {
            assert_eq!(status.expect("task").as_deref(), Some("HTTP/1.1 200 OK"));
            served += 1;
        }
        assert_eq!(served, 200);
    }

    #[test]
    fn configuration_scopes_the_webhook() {
        let spec = WebhookConfigSpec {
            name: CONFIGURATION_NAME.into(),
            namespace_labels: None,
            target: WebhookTarget::Service {
                name: "llmroute-operator".into(),
                namespace: "llmroute-system".into(),
                port: 9443,
            },
            failure_policy: "Ignore".into(),
            timeout_seconds: 3,
            excluded_namespaces: vec!["kube-system".into(), "llmroute-system".into()],
        };
        let value = configuration(&spec, Some("PEM"));
        let webhook = &value["webhooks"][0];
        assert_eq!(webhook["failurePolicy"], "Ignore");
        assert_eq!(webhook["sideEffects"], "None");
        assert_eq!(webhook["timeoutSeconds"], 3);
        assert_eq!(webhook["clientConfig"]["service"]["path"], PATH);
        assert_eq!(webhook["clientConfig"]["caBundle"], "UEVN");
        let excluded = &webhook["namespaceSelector"]["matchExpressions"][0]["values"];
        assert_eq!(excluded, &json!(["kube-system", "llmroute-system"]));
        assert_eq!(
            webhook["matchConditions"],
            json!([{
                "name": "names-a-route",
                "expression": "has(object.metadata.annotations) && 'llmroute.dev/route' in object.metadata.annotations",
            }])
        );
        let without = configuration(&spec, None);
        assert!(
            without["webhooks"][0]["clientConfig"]
                .get("caBundle")
                .is_none()
        );
    }
}
