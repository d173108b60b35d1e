//! The HTTP server of the sidecar on 127.0.0.1: endpoint routing, feedback, models, metrics
//! and health, and the background task that releases events whose feedback TTL passed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use llmroute_api::{ErrorBody, FeedbackRequest};
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::{ResponseBody, error_response, json_response, text_response};
use crate::events::EventSender;
use crate::feedback::Joined;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::request::unknown_path_error;
use crate::shutdown::{SHUTDOWN_PATH, ShutdownSwitch};
use crate::sidecar::Sidecar;

/// Time that open connections get to finish when the sidecar stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Maximum feedback request body, in bytes.
const MAX_FEEDBACK_BYTES: usize = 64 * 1024;
/// Body of `/readyz` during the shutdown's drain.
const SHUTTING_DOWN: &str = "the sidecar is shutting down\n";
/// Period of the feedback TTL sweep.
const EXPIRY_PERIOD: Duration = Duration::from_secs(1);

impl Sidecar {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        match (method.clone(), path.as_str()) {
            (Method::POST, "/v1/chat/completions" | "/v1/completions") => {
                self.complete(request).await
            }
            (Method::GET, "/v1/models") => self.list_models(),
            (Method::POST, "/v1/feedback") => self.post_feedback(request).await,
            (Method::GET, "/metrics") => metrics_response(&self),
            (Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
            (_, SHUTDOWN_PATH) => crate::shutdown::respond(
                &method,
                &self.state().config.route,
                self.options.shutdown.as_ref(),
            ),
            (Method::GET, "/readyz") => {
                if self.is_draining() {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN)
                } else if self.is_ready() {
                    text_response(StatusCode::OK, "ready\n")
                } else {
                    text_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no route configuration yet\n",
                    )
                }
            }
            (
                _,
                "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/models"
                | "/v1/feedback"
                | "/metrics"
                | "/healthz"
                | "/readyz",
            ) => error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorBody::new(
                    "invalid_request_error",
                    format!("method {method} is not allowed on {path}"),
                ),
            ),
            _ => error_response(StatusCode::NOT_FOUND, unknown_path_error(&path)),
        }
    }

    fn list_models(&self) -> Response<ResponseBody> {
        let state = self.state();
        let entry =
            |id: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "llmroute"});
        let data: Vec<_> = std::iter::once(entry(&state.config.route))
            .chain(state.config.models.iter().map(|m| entry(&m.name)))
            .collect();
        json_response(
            StatusCode::OK,
            json!({"object": "list", "data": data}).to_string(),
        )
    }

    async fn post_feedback(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let route = self.state().config.route.clone();
        let reject = |status: StatusCode, reason: &str, message: String| {
            Metrics::count(&self.metrics.feedback, &route, reason);
            error_response(status, ErrorBody::new("invalid_request_error", message))
        };
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(crate::limits::is_json_content_type);
        if !is_json {
            return reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid",
                "unsupported Content-Type; send application/json".to_string(),
            );
        }
        let bytes = match Limited::new(request.into_body(), MAX_FEEDBACK_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return reject(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid",
                    format!("the feedback body exceeds {MAX_FEEDBACK_BYTES} bytes"),
                );
            }
        };
        let feedback: FeedbackRequest = match serde_json::from_slice(&bytes) {
            Ok(feedback) => feedback,
            Err(error) => {
                return reject(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!(
                        "invalid feedback: {error}; send {{\"decision_id\": \"<x-llmroute-decision-id>\", \"score\": <0..1>}}"
                    ),
                );
            }
        };
        if let Err(message) = feedback.validate() {
            return reject(StatusCode::BAD_REQUEST, "invalid", message);
        }
        let accepted = || {
            json_response(
                StatusCode::OK,
                json!({"decision_id": feedback.decision_id, "status": "accepted"}).to_string(),
            )
        };
        match self
            .feedback
            .feedback(&feedback.decision_id, feedback.score)
        {
            Joined::Event(event) => {
                Metrics::count(&self.metrics.feedback, &route, "joined");
                tracing::debug!(route = %route, decision_id = %feedback.decision_id, "joined feedback");
                self.events.submit(*event);
                accepted()
            }
            Joined::Held => {
                Metrics::count(&self.metrics.feedback, &route, "held_until_stream_end");
                tracing::debug!(route = %route, decision_id = %feedback.decision_id, "holding feedback until the stream ends");
                accepted()
            }
            Joined::NotWaiting => {
                Metrics::count(&self.metrics.feedback, &route, "unknown_decision");
                error_response(
                    StatusCode::NOT_FOUND,
                    ErrorBody::new(
                        "invalid_request_error",
                        format!(
                            "decision {} is not waiting for feedback: it is unknown, its feedback time ran out, or it already has feedback",
                            feedback.decision_id
                        ),
                    )
                    .with_param("decision_id")
                    .with_code("decision_not_found"),
                )
            }
        }
    }
}

/// Serves `sidecar` on `listener` until `shutdown` completes, then gives open connections
/// [`SHUTDOWN_GRACE`] to finish, releases the events still waiting for feedback and stops the
/// event sender after it has sent what is queued.
pub async fn serve(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    events: EventSender,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    let route = sidecar.state().config.route.clone();
    tracing::info!(address = %address, route = %route, "sidecar listening");
    let expiry = tokio::spawn(expire_feedback(sidecar.clone()));
    let graceful = GracefulShutdown::new();
    let limits = sidecar.options.limits;
    let service = || {
        let sidecar = sidecar.clone();
        service_fn(move |request| {
            let sidecar = sidecar.clone();
            async move { Ok::<_, Infallible>(sidecar.handle(request).await) }
        })
    };
    accept_until(&listener, &limits, &graceful, shutdown, service).await;
    drop(listener);
    tracing::info!(address = %address, route = %route, "sidecar stopping");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(route = %route, grace_seconds = SHUTDOWN_GRACE.as_secs(), "closed connections still open after the grace period");
    }
    expiry.abort();
    let waiting = sidecar.feedback.drain();
    tracing::info!(route = %route, events = waiting.len(), "releasing events still waiting for feedback");
    for event in waiting {
        sidecar.events.submit(event);
    }
    events.stop().await;
    tracing::info!(address = %address, route = %route, "sidecar stopped");
    Ok(())
}

/// The sidecar the admin listener reports on: `None` until it has its first configuration.
pub type AdminTarget = tokio::sync::watch::Receiver<Option<Arc<Sidecar>>>;

/// Serves the admin endpoints on `listener` until `shutdown` completes: `GET /healthz` (200
/// while the process runs), `GET /readyz` (200 once the sidecar has a configuration, else 503)
/// and `GET /metrics` (OpenMetrics text, 503 before the first configuration). Nothing else:
/// the admin listener may listen on the pod's IP, where the kubelet probes and Prometheus
/// scrapes, so it does not proxy and does not take feedback.
pub async fn serve_admin(
    listener: TcpListener,
    target: AdminTarget,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(address = %address, "admin endpoints listening (/healthz, /readyz, /metrics)");
    let graceful = GracefulShutdown::new();
    let service = || {
        let target = target.clone();
        service_fn(move |request: Request<Incoming>| {
            let sidecar = target.borrow().clone();
            async move { Ok::<_, Infallible>(admin_response(&request, sidecar.as_deref())) }
        })
    };
    accept_until(&listener, &Limits::default(), &graceful, shutdown, service).await;
    drop(listener);
    tracing::info!(address = %address, "admin endpoints stopping");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            "closed admin connections still open after the grace period"
        );
    }
    tracing::info!(address = %address, "admin endpoints stopped");
    Ok(())
}

/// Builds the response to one request to the admin listener.
fn admin_response(
    request: &Request<Incoming>,
    sidecar: Option<&Sidecar>,
) -> Response<ResponseBody> {
    const NOT_CONFIGURED: &str = "no route configuration yet\n";
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match sidecar {
            Some(sidecar) if sidecar.is_draining() => {
                text_response(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN)
            }
            Some(sidecar) if sidecar.is_ready() => text_response(StatusCode::OK, "ready\n"),
            _ => text_response(StatusCode::SERVICE_UNAVAILABLE, NOT_CONFIGURED),
        },
        (&Method::GET, "/metrics") => match sidecar {
            Some(sidecar) => metrics_response(sidecar),
            None => text_response(StatusCode::SERVICE_UNAVAILABLE, NOT_CONFIGURED),
        },
        (method, "/healthz" | "/readyz" | "/metrics") => text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not allowed on {path}; use GET\n"),
        ),
        _ => text_response(
            StatusCode::NOT_FOUND,
            format!(
                "no admin endpoint {path}: this port serves GET /healthz, /readyz and /metrics; \
                 send API requests to the sidecar's port on 127.0.0.1\n"
            ),
        ),
    }
}

/// Encodes the metrics registry as an OpenMetrics response, with each model's availability
/// as of now: a key file may have appeared or gone since the configuration arrived.
fn metrics_response(sidecar: &Sidecar) -> Response<ResponseBody> {
    let metrics = sidecar.metrics();
    metrics.set_availability(&sidecar.state());
    let mut response = text_response(StatusCode::OK, metrics.encode());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Serves a not-ready sidecar on `listener` until `ready` completes: `/healthz` responds 200,
/// `/readyz` 503, `/shutdown` turns `shutdown` on when there is one, and every other request
/// gets a 503 OpenAI-style error. Connections still open then get [`SHUTDOWN_GRACE`] to
/// finish, so that the caller can serve the same listener.
pub async fn serve_not_ready(
    listener: &TcpListener,
    route: &str,
    shutdown: Option<&ShutdownSwitch>,
    ready: impl std::future::Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let service = || {
        let route = route.to_string();
        let shutdown = shutdown.cloned();
        service_fn(move |request: Request<Incoming>| {
            let response = match (request.method(), request.uri().path()) {
                (method, SHUTDOWN_PATH) => {
                    crate::shutdown::respond(method, &route, shutdown.as_ref())
                }
                (&Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
                (&Method::GET, "/readyz") => text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the first route configuration\n",
                ),
                _ => error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorBody::new(
                        "api_error",
                        "the sidecar is waiting for its first route configuration from the control plane; retry shortly",
                    )
                    .with_code("not_ready"),
                ),
            };
            std::future::ready(Ok::<_, Infallible>(response))
        })
    };
    accept_until(listener, &Limits::default(), &graceful, ready, service).await;
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            "closed not-ready connections still open after the grace period"
        );
    }
}

/// Accepts connections on `listener` until `stop` completes. Each connection is served over
/// HTTP/1.1 by a service from `service`, with the header limits of `limits`, and `graceful`
/// watches it.
async fn accept_until<F, S>(
    listener: &TcpListener,
    limits: &Limits,
    graceful: &GracefulShutdown,
    stop: impl std::future::Future<Output = ()>,
    mut service: F,
) where
    F: FnMut() -> S,
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Accept fails on resource limits such as EMFILE; wait before retrying.
                        tracing::warn!(error = %error, "failed to accept a connection; retrying in 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(error = %error, "failed to set TCP_NODELAY");
                }
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_headers(limits.max_headers)
                    .max_header_size(limits.max_header_bytes)
                    .serve_connection(TokioIo::new(stream), service());
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(peer = %peer, error = %error, "connection ended with an error");
                    }
                });
            }
            () = &mut stop => break,
        }
    }
}

/// Releases the events whose feedback TTL passed, once per [`EXPIRY_PERIOD`].
async fn expire_feedback(sidecar: Arc<Sidecar>) {
    let mut ticker = tokio::time::interval(EXPIRY_PERIOD);
    loop {
        ticker.tick().await;
        let expired = sidecar.feedback.expire(Instant::now());
        if !expired.is_empty() {
            let route = sidecar.state().config.route.clone();
            tracing::debug!(route = %route, events = expired.len(), "feedback time ran out");
            for event in expired {
                Metrics::count(&sidecar.metrics.feedback, &route, "expired");
                sidecar.events.submit(event);
            }
        }
    }
}
