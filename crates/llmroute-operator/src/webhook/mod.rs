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
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::serving::ClusterBackend;
use connection::{ConnectionClock, ConnectionTimeouts, Verdict, Watched};
use inject::{
    ALREADY_INJECTED, Decision, INJECTION_LABEL, InjectionSettings, ROUTE_ANNOTATION,
    SKIPPED_ANNOTATION,
};

/// Name of the `MutatingWebhookConfiguration` and its one webhook.
pub const CONFIGURATION_NAME: &str = "llmroute-sidecar-injector";
pub const WEBHOOK_NAME: &str = "inject.llmroute.dev";
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
    /// Responds to one AdmissionReview. A review that cannot be read gets an allowed response
    /// without a patch, and the error is logged and counted.
    pub fn review(&self, body: &[u8]) -> Value {
        let started = Instant::now();
        let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
            Ok(review) => review,
            Err(error) => {
                tracing::warn!(error = %error, "invalid AdmissionReview; responding without a patch");
                self.metrics.observe_injection("invalid_review", started);
                return serde_json::to_value(
                    AdmissionResponse::invalid(error.to_string()).into_review(),
                )
                .expect("a review serialises");
            }
        };
        let request: AdmissionRequest<Pod> = match review.try_into() {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(error = %error, "AdmissionReview without a request");
                self.metrics.observe_injection("invalid_review", started);
                return serde_json::to_value(
                    AdmissionResponse::invalid(error.to_string()).into_review(),
                )
                .expect("a review serialises");
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
        return respond(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no endpoint {} {}; the webhook serves POST {PATH}", request.method(), request.uri().path())}).to_string(),
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
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "failed to read an AdmissionReview");
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("failed to read the review (limit {MAX_REVIEW_BYTES} bytes): {error}")}).to_string(),
            );
        }
    };
    let answer = webhook.review(&body);
    respond(StatusCode::OK, answer.to_string())
}

/// Serves the webhook over TLS on `listener` until `shutdown` completes, with the default
/// [`ConnectionTimeouts`].
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
        ConnectionTimeouts::default(),
        shutdown,
    )
    .await
}

/// Serves the webhook over TLS on `listener` until `shutdown` completes.
pub async fn serve_with(
    listener: TcpListener,
    resolver: Arc<certs::CertResolver>,
    webhook: Arc<Webhook>,
    timeouts: ConnectionTimeouts,
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
    tracing::info!(address = %address, path = PATH, "injection webhook listening (TLS)");
    tokio::pin!(shutdown);
    loop {
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
                    let metrics = &webhook.metrics;
                    let started = Instant::now();
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
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
                            tracing::warn!(peer = %peer, "TLS handshake timed out after 10 s");
                            return;
                        }
                    };
                    serve_connection(tls, peer, webhook, timeouts).await;
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
    timeouts: ConnectionTimeouts,
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
                if let Err(e) = result {
                    tracing::debug!(peer = %peer, error = %e, "webhook connection ended with an error");
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

    /// Starts a webhook server on 127.0.0.1 with `timeouts`, and returns a TLS connector that
    /// trusts its CA.
    async fn tls_server(
        timeouts: ConnectionTimeouts,
        folder: &std::path::Path,
    ) -> (SocketAddr, tokio_rustls::TlsConnector, watch::Sender<bool>) {
        let set = certs::generate(&["127.0.0.1".to_string()], &certs::Lifetimes::default())
            .expect("certificates");
        let resolver = Arc::new(certs::CertResolver::default());
        resolver.set(certs::certified_key(&set.cert_pem, &set.key_pem).expect("key"));
        let metrics = Arc::new(Metrics::default());
        let store = llmroute_control::Store::open(folder).expect("store");
        let webhook = Arc::new(Webhook {
            settings: InjectionSettings::default(),
            backend: Arc::new(ClusterBackend::new(store, metrics.clone())),
            metrics,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(serve_with(
            listener,
            resolver,
            webhook,
            timeouts,
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

    fn short_timeouts() -> ConnectionTimeouts {
        ConnectionTimeouts {
            header_read: Duration::from_millis(200),
            body_read: Duration::from_millis(200),
            // Long enough that a slow test machine does not close the idle connection first.
            idle: Duration::from_secs(10),
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
        let timeouts = ConnectionTimeouts {
            idle: Duration::from_millis(300),
            ..short_timeouts()
        };
        let (address, connector, _stop) = tls_server(timeouts, folder.path()).await;
        let mut stream = connect(address, &connector).await;
        let first = get_not_found(&mut stream).await;
        assert_eq!(first.as_deref(), Some("HTTP/1.1 404 Not Found"));
        assert!(closed_by_server(&mut stream).await);
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
        let without = configuration(&spec, None);
        assert!(
            without["webhooks"][0]["clientConfig"]
                .get("caBundle")
                .is_none()
        );
    }
}
