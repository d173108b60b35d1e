//! The control API over HTTP on 127.0.0.1:
//!
//! - `GET /v1/routes/<route>/config?version=N&waitSeconds=S`: the route's sidecar
//!   configuration. When its version is not above `N`, the request waits up to `S` seconds
//!   (at most [`MAX_WAIT`]) for a change and then returns 304 Not Modified.
//! - `GET /v1/policies/<sha256>`: a policy artifact's bytes.
//! - `POST /v1/events`: an [`EventBatch`] to store. The response is sent after the
//!   batch's transaction commits: `{"received": N, "stored": S, "duplicates": D}`.
//! - `GET /healthz`, and `GET /metrics` (Prometheus text format).
//!
//! With an [`Authenticator`] in [`ServerOptions`], `POST /v1/events` requires an
//! `Authorization: Bearer` token (401 when missing or invalid, 503 when the check could not
//! run) and a caller allowed to write the batch's route (403). Configuration and policy reads
//! stay open: they contain no secrets (API keys appear only as references), and a sidecar
//! needs its first configuration to become ready, which should not depend on the API server
//! that checks tokens being reachable. Event writes are what a forged caller could use to
//! poison training data.
//!
//! Every batch is checked field by field ([`EventBatch::validate`]) before anything is
//! stored, and one invalid event rejects the whole batch with a message naming the event
//! index, the field and the value.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use llmroute_api::config::is_sha256_hex;
use llmroute_api::event::{BatchRules, MAX_BATCH_EVENTS};
use llmroute_api::{ErrorBody, EventBatch};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::{AuthError, Authenticator, Identity, StaticTokenAuthenticator, bearer_token};
use crate::plane::ControlPlane;
use crate::replication::{REPLICATION_PATH, ReplicationPage, parse_page_query};
use crate::store::{Store, StoreError};

/// What the control API serves: the routes' configurations, policy artifacts and the event
/// store. `llmroute standalone` serves a [`ControlPlane`] of route files; the operator serves
/// routes and policies from the cluster.
pub trait ControlBackend: Send + Sync + 'static {
    /// Subscribes to the configuration of `route`, or `None` when the route is not served.
    fn subscribe(
        &self,
        route: &str,
    ) -> Option<tokio::sync::watch::Receiver<Arc<llmroute_api::SidecarConfig>>>;
    /// Keys of the served routes, sorted.
    fn route_names(&self) -> Vec<String>;
    /// The bytes of the policy artifact with this sha256, `Ok(None)` when there is none. May
    /// block: the server calls it on a blocking thread.
    fn policy(&self, sha256: &str) -> Result<Option<Vec<u8>>, String>;
    /// The event store.
    fn store(&self) -> &Store;
    /// Returns the route's own retention (`spec.retention`) as (max age, max events), `None` when the
    /// route sets none and the server's settings apply.
    fn route_retention(&self, _route: &str) -> Option<(Option<Duration>, Option<u64>)> {
        None
    }
    /// Returns the destination of event batches. The default stores them here.
    fn event_destination(&self) -> EventDestination {
        EventDestination::Local
    }
}

/// Destination of the event batches that the control API receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventDestination {
    /// Into this server's own store.
    Local,
    /// To the replica that stores the events (the leader), which checks the batch itself.
    Forward {
        /// The leader's identity, for logs and messages.
        leader: String,
        /// `host:port` of the leader's control API.
        address: String,
    },
    /// Nowhere yet: no replica leads, so the batch is rejected with 503 and the sidecar
    /// sends it again later.
    NoLeader,
}

/// Header of an event batch that a replica forwarded to the leader. A batch with it is never
/// forwarded again, so two replicas with stale views of the leader cannot pass it back and
/// forth.
pub const FORWARDED_HEADER: &str = "x-llmroute-forwarded";

/// Time allowed for the leader to store a forwarded batch. The sidecar's own request times out
/// after 10 s, and the sidecar then sends the batch again.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

impl ControlBackend for ControlPlane {
    fn subscribe(
        &self,
        route: &str,
    ) -> Option<tokio::sync::watch::Receiver<Arc<llmroute_api::SidecarConfig>>> {
        ControlPlane::subscribe(self, route)
    }

    fn route_names(&self) -> Vec<String> {
        ControlPlane::route_names(self)
    }

    fn route_retention(&self, route: &str) -> Option<(Option<Duration>, Option<u64>)> {
        let (_, spec) = crate::learning::LearningHost::route_specs(self)
            .into_iter()
            .find(|(name, _)| name == route)?;
        retention_limits(&spec)
    }

    fn policy(&self, sha256: &str) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(self.store().policy_path(sha256)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn store(&self) -> &Store {
        ControlPlane::store(self)
    }
}

type Backend = Arc<dyn ControlBackend>;

/// Maximum wait of a long-polling configuration request.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Maximum event batch body, in bytes.
pub const MAX_EVENTS_BYTES: usize = 32 * 1024 * 1024;
/// Time that open connections get to finish when the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Embedding dimension of the sidecars' prompt encoder, all-MiniLM-L6-v2.
pub const DEFAULT_EMBEDDING_DIM: usize = 384;

/// Settings of the control API server.
#[derive(Clone)]
pub struct ServerOptions {
    /// Checks the bearer token of event batches; `None` accepts every caller, which is safe
    /// only on 127.0.0.1 with trusted local processes.
    pub authenticator: Option<Arc<dyn Authenticator>>,
    /// Length of every non-empty event embedding.
    pub embedding_dim: usize,
    /// Maximum events per batch.
    pub max_batch_events: usize,
    /// The replicas' shared token, which `GET /v1/replication/events` requires. `None` turns
    /// the endpoint off.
    pub replication: Option<Arc<StaticTokenAuthenticator>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            authenticator: None,
            embedding_dim: DEFAULT_EMBEDDING_DIM,
            max_batch_events: MAX_BATCH_EVENTS,
            replication: None,
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("authentication", &self.authenticator.is_some())
            .field("embedding_dim", &self.embedding_dim)
            .field("max_batch_events", &self.max_batch_events)
            .field("replication", &self.replication.is_some())
            .finish()
    }
}

/// Labels of a rejected event batch: the reason, and the invalid field for `invalid_event`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: String,
    field: String,
}

/// The control server's Prometheus metrics.
struct ControlMetrics {
    registry: Registry,
    events_stored: Counter,
    events_duplicate: Counter,
    batches_rejected: Family<RejectLabels, Counter>,
    batches_forwarded: Family<ForwardLabels, Counter>,
    batches_failed: Family<FailLabels, Counter>,
}

/// Reason a checked event batch was not stored: `store_full` or `store_error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailLabels {
    reason: String,
}

/// Outcome of forwarding an event batch to the leader: the leader's status code, or `failed`
/// when no response came.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    outcome: String,
}

impl ControlMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("llmroute_control");
        let events_stored = Counter::default();
        registry.register(
            "events_stored",
            "Events stored by POST /v1/events",
            events_stored.clone(),
        );
        let events_duplicate = Counter::default();
        registry.register(
            "events_duplicate",
            "Events skipped because their decision id was already stored",
            events_duplicate.clone(),
        );
        let batches_rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "event_batches_rejected",
            "Event batches rejected before storing, by reason and invalid field",
            batches_rejected.clone(),
        );
        let batches_forwarded = Family::<ForwardLabels, Counter>::default();
        registry.register(
            "event_batches_forwarded",
            "Event batches forwarded to the leader, by the leader's status code or failed",
            batches_forwarded.clone(),
        );
        let batches_failed = Family::<FailLabels, Counter>::default();
        registry.register(
            "event_batches_failed",
            "Checked event batches that the event store failed to store, by reason (store_full or store_error)",
            batches_failed.clone(),
        );
        Self {
            registry,
            events_stored,
            events_duplicate,
            batches_rejected,
            batches_forwarded,
            batches_failed,
        }
    }

    fn reject(&self, reason: &str, field: &str) {
        self.batches_rejected
            .get_or_create(&RejectLabels {
                reason: reason.to_string(),
                field: field.to_string(),
            })
            .inc();
    }

    fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// At most one log line per second for a repeated rejection, with the count of the lines
/// left out since the last one.
struct LogLimiter {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogLimiter {
    fn new() -> Self {
        Self {
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Returns `Some(suppressed)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// State shared by every request handler.
struct Server {
    backend: Backend,
    options: ServerOptions,
    metrics: ControlMetrics,
    rejection_log: LogLimiter,
    /// Client for forwarding event batches to the leader.
    forwarder: Client<HttpConnector, Full<Bytes>>,
    forward_log: LogLimiter,
    store_log: LogLimiter,
}

type ResponseBody = BoxBody<Bytes, Infallible>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, message: String) -> Response<ResponseBody> {
    let kind = if status.is_server_error() {
        "api_error"
    } else {
        "invalid_request_error"
    };
    respond(
        status,
        "application/json",
        ErrorBody::new(kind, message).to_json(),
    )
}

async fn handle(server: Arc<Server>, request: Request<Incoming>) -> Response<ResponseBody> {
    let plane = &server.backend;
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if method == Method::GET && path == "/healthz" {
        return respond(StatusCode::OK, "text/plain", "ok\n");
    }
    if method == Method::GET && path == "/metrics" {
        return respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            server.metrics.encode(),
        );
    }
    if method == Method::POST && path == "/v1/events" {
        return post_events(&server, request).await;
    }
    if method == Method::GET && path == REPLICATION_PATH {
        return get_replication_page(&server, request).await;
    }
    if method == Method::GET
        && let Some(route) = path
            .strip_prefix("/v1/routes/")
            .and_then(|rest| rest.strip_suffix("/config"))
    {
        return get_config(plane, route, request.uri().query().unwrap_or("")).await;
    }
    if method == Method::GET
        && let Some(sha256) = path.strip_prefix("/v1/policies/")
    {
        return get_policy(plane, sha256).await;
    }
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {path}; the control API serves GET /v1/routes/<route>/config, GET /v1/policies/<sha256>, POST /v1/events, GET {REPLICATION_PATH}, GET /healthz and GET /metrics"
        ),
    )
}

/// Serves one page of this store's events to a replica that presents the replication token.
async fn get_replication_page(
    server: &Server,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let peer = request
        .extensions()
        .get::<SocketAddr>()
        .map(ToString::to_string)
        .unwrap_or_default();
    let Some(authenticator) = &server.options.replication else {
        return error(
            StatusCode::NOT_FOUND,
            "replication is off on this control API: only the operator's replicas serve it, with the token of their replication Secret".to_string(),
        );
    };
    let token = match bearer_token(request.headers().get(header::AUTHORIZATION)) {
        Ok(token) => token,
        Err(failure) => {
            tracing::warn!(peer = %peer, error = %failure, "rejected a replication request");
            return error(StatusCode::UNAUTHORIZED, failure.to_string());
        }
    };
    if authenticator.authenticate(token).await.is_err() {
        tracing::warn!(peer = %peer, "rejected a replication request with a wrong token");
        return error(
            StatusCode::UNAUTHORIZED,
            "the token does not match the replicas' replication Secret".to_string(),
        );
    }
    let (after, limit) = match parse_page_query(request.uri().query().unwrap_or("")) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let backend = server.backend.clone();
    let read = tokio::task::spawn_blocking(move || {
        let (store, events) = backend.store().replication_page(after, limit)?;
        let page = ReplicationPage { store, events };
        Ok::<_, StoreError>(serde_json::to_vec(&page).expect("a page serialises"))
    })
    .await;
    match read {
        Ok(Ok(body)) => respond(StatusCode::OK, "application/json", body),
        Ok(Err(failure)) => {
            tracing::error!(peer = %peer, after, error = %failure, "failed to read events for replication");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to read events after id {after}: {failure}"),
            )
        }
        Err(failure) => {
            tracing::error!(peer = %peer, error = %failure, "the replication read task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to read events for replication".to_string(),
            )
        }
    }
}

/// Reads `version` and `waitSeconds` from a query string.
fn parse_query(query: &str) -> Result<(u64, Duration), String> {
    let mut version = 0;
    let mut wait = Duration::ZERO;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "version" => {
                version = value
                    .parse()
                    .map_err(|_| format!("invalid version {value:?}: expected a whole number"))?;
            }
            "waitSeconds" => {
                let seconds: u64 = value.parse().map_err(|_| {
                    format!("invalid waitSeconds {value:?}: expected a whole number of seconds")
                })?;
                wait = Duration::from_secs(seconds).min(MAX_WAIT);
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {key:?}; use version and waitSeconds"
                ));
            }
        }
    }
    Ok((version, wait))
}

async fn get_config(plane: &Backend, route: &str, query: &str) -> Response<ResponseBody> {
    let (known, wait) = match parse_query(query) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Some(mut receiver) = plane.subscribe(route) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "route {route:?} is not defined; routes: {}",
                plane.route_names().join(", ")
            ),
        );
    };
    let current = receiver.borrow_and_update().clone();
    let config = if current.version > known {
        current
    } else {
        match tokio::time::timeout(wait, receiver.changed()).await {
            Ok(Ok(())) => receiver.borrow_and_update().clone(),
            Ok(Err(_)) => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("route {route:?} was removed"),
                );
            }
            Err(_) => return respond(StatusCode::NOT_MODIFIED, "application/json", Bytes::new()),
        }
    };
    let body = serde_json::to_vec(config.as_ref()).expect("a configuration serialises");
    respond(StatusCode::OK, "application/json", body)
}

async fn get_policy(plane: &Backend, sha256: &str) -> Response<ResponseBody> {
    if !is_sha256_hex(sha256) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid policy digest {sha256:?}: expected 64 lowercase hex digits"),
        );
    }
    let backend = plane.clone();
    let digest = sha256.to_string();
    match tokio::task::spawn_blocking(move || backend.policy(&digest)).await {
        Ok(Ok(Some(bytes))) => respond(StatusCode::OK, "application/octet-stream", bytes),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            format!("policy {sha256} is not published"),
        ),
        Ok(Err(e)) => {
            tracing::error!(sha256, error = %e, "failed to read a policy artifact");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to read policy {sha256}: {e}"),
            )
        }
        Err(e) => {
            tracing::error!(sha256, error = %e, "the policy read task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to read policy {sha256}"),
            )
        }
    }
}

/// A rejected request: its status, the message for the caller, and the metric labels.
struct Rejection {
    status: StatusCode,
    message: String,
    reason: &'static str,
    field: &'static str,
}

impl Rejection {
    fn new(status: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            reason,
            field: "",
        }
    }
}

async fn post_events(server: &Server, request: Request<Incoming>) -> Response<ResponseBody> {
    let sidecar_address = request
        .extensions()
        .get::<SocketAddr>()
        .map(ToString::to_string)
        .unwrap_or_default();
    let forwarded = request.headers().contains_key(FORWARDED_HEADER);
    match server.backend.event_destination() {
        EventDestination::Local => {}
        EventDestination::Forward { leader, address } if !forwarded => {
            return forward_batch(server, request, &leader, &address).await;
        }
        destination => {
            let message = match destination {
                EventDestination::Forward { leader, .. } => format!(
                    "this replica received a forwarded event batch but does not store events; the leader is {leader}, so send the batch again"
                ),
                _ => "no replica leads yet, so no replica stores events; send the batch again in a few seconds".to_string(),
            };
            server.metrics.reject("no_leader", "");
            if let Some(suppressed) = server.forward_log.allow() {
                tracing::warn!(peer = %sidecar_address, forwarded, suppressed, "{message}");
            }
            return error(StatusCode::SERVICE_UNAVAILABLE, message);
        }
    }
    match check_batch(server, request).await {
        Ok((batch, identity)) => store_batch(server, batch, identity).await,
        Err(rejection) => {
            server.metrics.reject(rejection.reason, rejection.field);
            if let Some(suppressed) = server.rejection_log.allow() {
                tracing::warn!(
                    peer = %sidecar_address,
                    status = rejection.status.as_u16(),
                    reason = rejection.reason,
                    error = %rejection.message,
                    suppressed,
                    "rejected an event batch"
                );
            }
            error(rejection.status, rejection.message)
        }
    }
}

/// Sends an event batch unchanged to the leader's control API, with the caller's
/// `Authorization` header, and returns the leader's response. The leader authenticates and
/// checks the batch, so a 200 still means that the batch is committed.
async fn forward_batch(
    server: &Server,
    request: Request<Incoming>,
    leader: &str,
    address: &str,
) -> Response<ResponseBody> {
    let authorization = request.headers().get(header::AUTHORIZATION).cloned();
    let body = match Limited::new(request.into_body(), MAX_EVENTS_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            server.metrics.reject("body_too_large", "");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("failed to read the event batch (limit {MAX_EVENTS_BYTES} bytes): {e}"),
            );
        }
    };

    let mut forward = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{address}/v1/events"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(FORWARDED_HEADER, "1");
    if let Some(value) = authorization {
        forward = forward.header(header::AUTHORIZATION, value);
    }
    let forward = match forward.body(Full::new(body)) {
        Ok(forward) => forward,
        Err(e) => {
            tracing::error!(leader = %leader, address = %address, error = %e, "failed to build the forwarded event batch request");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to forward the event batch to the leader {leader}: {e}"),
            );
        }
    };

    let sent = tokio::time::timeout(FORWARD_TIMEOUT, async {
        let response = server.forwarder.request(forward).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    })
    .await;
    let failure = match sent {
        Ok(Ok((status, body))) => {
            server
                .metrics
                .batches_forwarded
                .get_or_create(&ForwardLabels {
                    outcome: status.as_u16().to_string(),
                })
                .inc();
            tracing::debug!(leader = %leader, address = %address, status = status.as_u16(), "forwarded an event batch to the leader");
            return respond(status, "application/json", body);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("timed out after {} s", FORWARD_TIMEOUT.as_secs()),
    };

    server
        .metrics
        .batches_forwarded
        .get_or_create(&ForwardLabels {
            outcome: "failed".into(),
        })
        .inc();
    if let Some(suppressed) = server.forward_log.allow() {
        tracing::warn!(leader = %leader, address = %address, error = %failure, suppressed, "failed to forward an event batch to the leader");
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "failed to forward the event batch to the leader {leader} at {address}: {failure}; send the batch again"
        ),
    )
}

/// Authenticates the caller, reads and parses the batch and checks every field.
async fn check_batch(
    server: &Server,
    request: Request<Incoming>,
) -> Result<(EventBatch, Option<Identity>), Rejection> {
    let identity = match &server.options.authenticator {
        Some(authenticator) => {
            let header = request.headers().get(header::AUTHORIZATION);
            let result = match bearer_token(header) {
                Ok(token) => authenticator.authenticate(token).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(identity) => Some(identity),
                Err(error) => {
                    let status = match error {
                        AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                        _ => StatusCode::UNAUTHORIZED,
                    };
                    return Err(Rejection::new(status, error.reason(), error.to_string()));
                }
            }
        }
        None => None,
    };
    let bytes = Limited::new(request.into_body(), MAX_EVENTS_BYTES)
        .collect()
        .await
        .map_err(|e| {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("failed to read the event batch (limit {MAX_EVENTS_BYTES} bytes): {e}"),
            )
        })?
        .to_bytes();
    // Parsing a batch of 256 events with 384-dimensional embeddings takes milliseconds of
    // CPU, so it runs on a blocking thread instead of holding up the connection tasks.
    let parsed = tokio::task::spawn_blocking(move || serde_json::from_slice::<EventBatch>(&bytes))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the event batch parsing task failed");
            Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "failed to parse the event batch".to_string(),
            )
        })?;
    let batch: EventBatch = parsed.map_err(|e| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid event batch: {e}"),
        )
    })?;
    if let Some(identity) = &identity
        && !identity.may_access_route(&batch.route)
    {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "forbidden_route",
            format!(
                "caller {} may not send events for route {:?}; a sidecar sends events only for routes of its own namespace {:?}",
                identity.name,
                batch.route,
                identity.namespace.as_deref().unwrap_or_default()
            ),
        ));
    }
    let Some(receiver) = server.backend.subscribe(&batch.route) else {
        return Err(Rejection::new(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!(
                "route {:?} is not defined; events of unknown routes are not stored",
                batch.route
            ),
        ));
    };
    let config = receiver.borrow().clone();
    let rules = BatchRules {
        config: &config,
        embedding_dim: server.options.embedding_dim,
        max_events: server.options.max_batch_events,
    };
    if let Err(invalid) = batch.validate(&rules) {
        let (status, reason) = match invalid.index {
            None if invalid.field == "events" => (StatusCode::PAYLOAD_TOO_LARGE, "batch_size"),
            None => (StatusCode::BAD_REQUEST, "invalid_batch"),
            Some(_) => (StatusCode::BAD_REQUEST, "invalid_event"),
        };
        return Err(Rejection {
            status,
            message: format!("{invalid}; nothing of the batch was stored"),
            reason,
            field: invalid.field,
        });
    }
    Ok((batch, identity))
}

/// Stores a checked batch and responds once its transaction has committed.
async fn store_batch(
    server: &Server,
    batch: EventBatch,
    identity: Option<Identity>,
) -> Response<ResponseBody> {
    let backend = server.backend.clone();
    let count = batch.events.len();
    let route = batch.route.clone();
    let sidecar = batch.sidecar.clone();
    let stored = tokio::task::spawn_blocking(move || {
        backend
            .store()
            .insert_events(&batch.route, &batch.sidecar, &batch.events)
    })
    .await;
    let caller = identity.map(|i| i.name).unwrap_or_default();
    match stored {
        Ok(Ok(inserted)) => {
            let duplicates = count - inserted;
            server.metrics.events_stored.inc_by(inserted as u64);
            server.metrics.events_duplicate.inc_by(duplicates as u64);
            tracing::debug!(route = %route, sidecar = %sidecar, caller = %caller, received = count, stored = inserted, duplicates, "stored events");
            respond(
                StatusCode::OK,
                "application/json",
                json!({"received": count, "stored": inserted, "duplicates": duplicates})
                    .to_string(),
            )
        }
        Ok(Err(e)) => {
            let (status, reason, message) = store_failure(&e);
            server
                .metrics
                .batches_failed
                .get_or_create(&FailLabels {
                    reason: reason.to_string(),
                })
                .inc();
            // Sidecars send a failed batch again, so a full volume would log every retry.
            if let Some(suppressed) = server.store_log.allow() {
                tracing::error!(route = %route, sidecar = %sidecar, error = %e, events = count, reason, suppressed, "failed to store events");
            }
            error(status, message)
        }
        Err(e) => {
            tracing::error!(route = %route, sidecar = %sidecar, error = %e, events = count, "the event store task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to store events".to_string(),
            )
        }
    }
}

/// Maps a failure of the event store to the response status, the `reason` label of
/// `event_batches_failed` and the message. A full disk gets 507 Insufficient Storage and the
/// fix. Sidecars send both statuses again later, so no event is lost while there is room in
/// their queues.
fn store_failure(error: &StoreError) -> (StatusCode, &'static str, String) {
    if error.is_disk_full() {
        return (
            StatusCode::INSUFFICIENT_STORAGE,
            "store_full",
            format!(
                "the event store is full: {error}; give its volume more space (on Kubernetes, resize the PersistentVolumeClaim data-llmroute-operator-N), lower the event retention (events.maxPerRoute, a route's spec.retention) or set a size limit (--event-max-store-size, events.maxStoreSize)"
            ),
        );
    }
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "store_error",
        format!("failed to store events: {error}"),
    )
}

/// Converts a route's `spec.retention` into (max age, max events), `None` when the route sets
/// no retention of its own.
pub fn retention_limits(
    spec: &llmroute_api::crd::LlmRouteSpec,
) -> Option<(Option<Duration>, Option<u64>)> {
    let retention = spec.retention.as_ref()?;
    let settings = llmroute_api::rollout::RetentionSpec::settings(Some(retention));
    let max_age = Duration::from_secs(u64::from(settings.max_age_days) * 24 * 3600);
    Some((Some(max_age), Some(settings.max_events)))
}

/// Limits of the events kept per route, and of the whole event store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetentionSettings {
    /// Events received longer ago are deleted; `None` keeps them regardless of age.
    pub max_age: Option<Duration>,
    /// Only the newest this many events of a route are kept; `None` sets no limit.
    pub max_events: Option<u64>,
    /// Time between two runs of the age and count limits.
    pub interval: Duration,
    /// Limit of the whole store's size, checked every `size_interval`.
    pub max_store: StoreSizeLimit,
    /// Time between two checks of `max_store`. A check reads two SQLite pragmas, so it can run
    /// far more often than the age and count limits.
    pub size_interval: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            max_events: Some(1_000_000),
            interval: Duration::from_secs(600),
            max_store: StoreSizeLimit::Auto,
            size_interval: Duration::from_secs(10),
        }
    }
}

/// Limit of the bytes that the event store's database may use ([`Store::used_bytes`]), as
/// Prometheus limits its storage with `--storage.tsdb.retention.size`. Over it, the oldest
/// events of the routes with the most events are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreSizeLimit {
    /// No limit: the store grows until the volume is full, and event batches then get 507.
    Off,
    /// [`AUTO_STORE_FRACTION`] of the size of the file system that contains the store, less
    /// the policy files and the write-ahead log in the store's folder, and at least
    /// [`MIN_STORE_BYTES`], read at each check. A resized volume raises the limit without a
    /// restart, and growing policy files lower it.
    Auto,
    /// A number of bytes.
    Bytes(u64),
}

/// Share of the file system that [`StoreSizeLimit::Auto`] lets the database, its write-ahead
/// log and the policy files use together. The rest is left for the events that arrive
/// between two checks and for the log's growth by the pages of one deletion chunk.
pub const AUTO_STORE_FRACTION: f64 = 0.8;

/// Smallest accepted [`StoreSizeLimit::Bytes`]: 16 MiB, about 6,000 events.
pub const MIN_STORE_BYTES: u64 = 16 << 20;

impl StoreSizeLimit {
    /// Parses `auto`, `0` (off), or a size in bytes with an optional suffix (Ki, Mi, Gi, Ti,
    /// k, M, G, T) as in a Kubernetes quantity, for example `800Mi`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "auto" => return Ok(Self::Auto),
            "0" => return Ok(Self::Off),
            _ => {}
        }
        let bytes = llmroute_api::crd::quantity_value(value)
            .filter(|bytes| bytes.fract() == 0.0 && *bytes >= 0.0)
            .ok_or_else(|| {
                format!(
                    "invalid event store size {value:?}: use auto, 0 (no limit) or a size such as 800Mi or 2Gi"
                )
            })?;
        if bytes < MIN_STORE_BYTES as f64 {
            return Err(format!(
                "invalid event store size {value:?}: use at least 16Mi, or 0 for no limit"
            ));
        }
        Ok(Self::Bytes(bytes.min(u64::MAX as f64) as u64))
    }

    /// Returns the limit in bytes for a store in `folder`, `None` when there is no limit.
    pub fn bytes(self, folder: &std::path::Path) -> std::io::Result<Option<u64>> {
        match self {
            Self::Off => Ok(None),
            Self::Bytes(bytes) => Ok(Some(bytes)),
            Self::Auto => {
                let stats = rustix::fs::statvfs(folder)?;
                let total = stats.f_blocks.saturating_mul(stats.f_frsize);
                let share = (total as f64 * AUTO_STORE_FRACTION) as u64;
                // The floor keeps the newest few thousand events when policy files take the
                // volume; the database may then fill it, and batches get 507.
                let left = share.saturating_sub(other_files_bytes(folder)?);
                Ok(Some(left.max(MIN_STORE_BYTES)))
            }
        }
    }
}

/// Returns the bytes of the files in the store's folder besides the database's pages: the
/// policy files (`policies/`) and the write-ahead log. A missing file or folder counts 0.
fn other_files_bytes(folder: &std::path::Path) -> std::io::Result<u64> {
    let size = |path: &std::path::Path| match std::fs::metadata(path) {
        Ok(metadata) => Ok(metadata.len()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(error) => Err(error),
    };
    let mut bytes = size(&folder.join("state.sqlite3-wal"))?;
    let policies = match std::fs::read_dir(folder.join("policies")) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(bytes),
        Err(error) => return Err(error),
    };
    for entry in policies {
        bytes = bytes.saturating_add(size(&entry?.path())?);
    }
    Ok(bytes)
}

impl std::fmt::Display for StoreSizeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => write!(f, "off"),
            Self::Auto => write!(
                f,
                "auto ({:.0} % of the volume)",
                AUTO_STORE_FRACTION * 100.0
            ),
            Self::Bytes(bytes) => write!(f, "{bytes} bytes"),
        }
    }
}

/// Applies `settings` to every route the backend serves, now and then every
/// `settings.interval`, until `shutdown` completes. Events of routes no longer served are
/// left alone: the operator deletes them with the route, and a standalone route file may come
/// back. The store's size limit is checked every `settings.size_interval`, over all routes.
pub async fn run_retention(
    backend: Backend,
    settings: RetentionSettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tracing::info!(
        max_age_seconds = settings.max_age.map(|d| d.as_secs()),
        max_events = settings.max_events,
        interval_seconds = settings.interval.as_secs(),
        max_store = %settings.max_store,
        size_interval_seconds = settings.size_interval.as_secs(),
        "event retention starting"
    );
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(settings.interval.max(Duration::from_secs(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut size_ticker =
        tokio::time::interval(settings.size_interval.max(Duration::from_millis(100)));
    size_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut size_check = SizeCheck::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => apply_route_limits(&backend, &settings).await,
            _ = size_ticker.tick() => {
                size_check.run(&backend, settings.max_store).await;
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("event retention stopped");
}

/// Applies each served route's age and count limits: its own `spec.retention`, else those of
/// `settings`.
async fn apply_route_limits(backend: &Backend, settings: &RetentionSettings) {
    for route in backend.route_names() {
        let store_backend = backend.clone();
        let key = route.clone();
        let (max_age, max_events) = backend
            .route_retention(&route)
            .unwrap_or((settings.max_age, settings.max_events));
        let result = tokio::task::spawn_blocking(move || {
            store_backend
                .store()
                .apply_retention(&key, max_age, max_events)
        })
        .await;
        match result {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => {
                tracing::info!(route = %route, deleted, "deleted events past the retention limits")
            }
            Ok(Err(error)) => {
                tracing::error!(route = %route, error = %error, "failed to apply event retention; retrying at the next run")
            }
            Err(error) => {
                tracing::error!(route = %route, error = %error, "the event retention task failed; retrying at the next run")
            }
        }
    }
}

/// State of the store's size checks between runs, so that a condition that lasts is logged
/// once, not at every check.
#[derive(Debug, Default)]
struct SizeCheck {
    /// The last check found the store over its limit with no event left to delete.
    warned_no_events: bool,
    /// The last check failed to read the file system's size.
    warned_statvfs: bool,
}

impl SizeCheck {
    async fn run(&mut self, backend: &Backend, limit: StoreSizeLimit) {
        let folder = backend.store().folder().to_path_buf();
        let max_bytes = match limit.bytes(&folder) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(error) => {
                if !std::mem::replace(&mut self.warned_statvfs, true) {
                    tracing::error!(folder = %folder.display(), error = %error, "failed to read the size of the event store's file system; no size limit until it can be read");
                }
                return;
            }
        };
        if self.warned_statvfs {
            tracing::info!(folder = %folder.display(), "read the size of the event store's file system again");
            self.warned_statvfs = false;
        }
        let store_backend = backend.clone();
        let result =
            tokio::task::spawn_blocking(move || store_backend.store().apply_size_limit(max_bytes))
                .await;
        match result {
            Ok(Ok(applied)) => {
                for (route, deleted) in &applied.deleted {
                    tracing::info!(
                        route = %route,
                        deleted,
                        used_bytes = applied.used_bytes,
                        max_bytes,
                        "deleted the oldest events to keep the event store within its size limit"
                    );
                }
                let over = applied.used_bytes > max_bytes;
                if over && applied.events_left {
                    tracing::info!(
                        used_bytes = applied.used_bytes,
                        max_bytes,
                        "the event store is still over its size limit; deleting more at the next check"
                    );
                }
                let stuck = over && !applied.events_left;
                if stuck && !self.warned_no_events {
                    tracing::warn!(
                        used_bytes = applied.used_bytes,
                        max_bytes,
                        "the event store is over its size limit with no event left to delete; raise the limit"
                    );
                }
                self.warned_no_events = stuck;
            }
            Ok(Err(error)) => {
                tracing::error!(error = %error, "failed to apply the event store's size limit; retrying at the next check")
            }
            Err(error) => {
                tracing::error!(error = %error, "the event store's size check failed; retrying at the next check")
            }
        }
    }
}

/// Serves the control API on `listener` without authentication until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    plane: Arc<impl ControlBackend>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    serve_backend(listener, plane, shutdown).await
}

/// [`serve`] for a backend chosen at run time.
pub async fn serve_backend(
    listener: TcpListener,
    plane: Backend,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, plane, ServerOptions::default(), shutdown).await
}

/// Serves the control API on `listener` with `options` until `shutdown` completes.
pub async fn serve_with(
    listener: TcpListener,
    plane: Backend,
    options: ServerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(
        address = %address,
        routes = ?plane.route_names(),
        authentication = options.authenticator.is_some(),
        embedding_dim = options.embedding_dim,
        max_batch_events = options.max_batch_events,
        "control API listening"
    );
    let server = Arc::new(Server {
        backend: plane,
        options,
        metrics: ControlMetrics::new(),
        rejection_log: LogLimiter::new(),
        forwarder: Client::builder(TokioExecutor::new()).build_http(),
        forward_log: LogLimiter::new(),
        store_log: LogLimiter::new(),
    });
    let graceful = GracefulShutdown::new();
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
                let server = server.clone();
                let service = service_fn(move |mut request: Request<Incoming>| {
                    let server = server.clone();
                    request.extensions_mut().insert(peer);
                    async move { Ok::<_, Infallible>(handle(server, request).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(address = %address, "control API stopping");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            "closed connections still open after the grace period"
        );
    }
    tracing::info!(address = %address, "control API stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_size_limit_parses_quantities() {
        assert_eq!(StoreSizeLimit::parse("auto"), Ok(StoreSizeLimit::Auto));
        assert_eq!(StoreSizeLimit::parse("0"), Ok(StoreSizeLimit::Off));
        assert_eq!(
            StoreSizeLimit::parse("800Mi"),
            Ok(StoreSizeLimit::Bytes(800 << 20))
        );
        assert_eq!(
            StoreSizeLimit::parse("2G"),
            Ok(StoreSizeLimit::Bytes(2_000_000_000))
        );
        let small = StoreSizeLimit::parse("15Mi").unwrap_err();
        assert!(small.contains("at least 16Mi"), "{small}");
        for wrong in ["lots", "-1Gi", "1.5", "100m", ""] {
            let message = StoreSizeLimit::parse(wrong).unwrap_err();
            assert!(message.contains("800Mi"), "{wrong}: {message}");
        }
    }

    #[test]
    fn auto_store_limit_is_share_of_file_system() {
        let folder = tempfile::tempdir().unwrap();
        let stats = rustix::fs::statvfs(folder.path()).unwrap();
        let total = stats.f_blocks * stats.f_frsize;
        let share = (total as f64 * AUTO_STORE_FRACTION) as u64;
        let limit = StoreSizeLimit::Auto.bytes(folder.path()).unwrap().unwrap();
        assert_eq!(limit, share);

        // Policy files and the write-ahead log share the volume, so they lower the limit.
        std::fs::create_dir(folder.path().join("policies")).unwrap();
        std::fs::write(folder.path().join("policies/a.onnx"), vec![0u8; 208_624]).unwrap();
        std::fs::write(folder.path().join("state.sqlite3-wal"), vec![0u8; 4_096]).unwrap();
        let limit = StoreSizeLimit::Auto.bytes(folder.path()).unwrap().unwrap();
        assert_eq!(limit, share - 208_624 - 4_096);
        let huge = std::fs::File::create(folder.path().join("policies/huge.onnx")).unwrap();
        huge.set_len(total).unwrap();
        let limit = StoreSizeLimit::Auto.bytes(folder.path()).unwrap().unwrap();
        assert_eq!(limit, MIN_STORE_BYTES, "the floor");
        assert_eq!(StoreSizeLimit::Off.bytes(folder.path()).unwrap(), None);
        let missing = folder.path().join("missing");
        assert!(StoreSizeLimit::Auto.bytes(&missing).is_err());
    }

    #[test]
    fn full_store_gets_507_and_the_fix() {
        let failure = |disk_full| StoreError::GroupCommit {
            path: "events.db".into(),
            batches: 2,
            message: "database or disk is full".into(),
            disk_full,
        };
        let (status, reason, message) = store_failure(&failure(true));
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(reason, "store_full");
        assert!(
            message.contains("resize the PersistentVolumeClaim"),
            "{message}"
        );
        let (status, reason, _) = store_failure(&failure(false));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reason, "store_error");
    }

    #[test]
    fn query_parsing_checks_values() {
        assert_eq!(parse_query("").unwrap(), (0, Duration::ZERO));
        assert_eq!(
            parse_query("version=3&waitSeconds=600").unwrap(),
            (3, MAX_WAIT)
        );
        assert!(parse_query("version=x").unwrap_err().contains("\"x\""));
        assert!(parse_query("wait=1").unwrap_err().contains("unknown"));
    }
}
