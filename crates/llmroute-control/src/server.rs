//! The control API over HTTP on 127.0.0.1:
//!
//! - `GET /v1/routes/<route>/config?version=N&waitSeconds=S`: the route's sidecar
//!   configuration. When its version is not above `N`, the request waits up to `S` seconds
//!   (at most [`MAX_WAIT`]) for a change and then returns 304 Not Modified.
//! - `GET /v1/policies/<sha256>`: a policy artifact's bytes.
//! - `POST /v1/events`: an [`EventBatch`] to store.
//! - `GET /healthz`.

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
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use llmroute_api::config::is_sha256_hex;
use llmroute_api::{ErrorBody, EventBatch};
use serde_json::json;
use tokio::net::TcpListener;

use crate::plane::ControlPlane;
use crate::store::Store;

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
}

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

async fn handle(plane: Backend, request: Request<Incoming>) -> Response<ResponseBody> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if method == Method::GET && path == "/healthz" {
        return respond(StatusCode::OK, "text/plain", "ok\n");
    }
    if method == Method::POST && path == "/v1/events" {
        return post_events(&plane, request).await;
    }
    if method == Method::GET
        && let Some(route) = path
            .strip_prefix("/v1/routes/")
            .and_then(|rest| rest.strip_suffix("/config"))
    {
        return get_config(&plane, route, request.uri().query().unwrap_or("")).await;
    }
    if method == Method::GET
        && let Some(sha256) = path.strip_prefix("/v1/policies/")
    {
        return get_policy(&plane, sha256).await;
    }
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {path}; the control API serves GET /v1/routes/<route>/config, GET /v1/policies/<sha256> and POST /v1/events"
        ),
    )
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

async fn post_events(plane: &Backend, request: Request<Incoming>) -> Response<ResponseBody> {
    let bytes = match Limited::new(request.into_body(), MAX_EVENTS_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("failed to read the event batch (limit {MAX_EVENTS_BYTES} bytes): {e}"),
            );
        }
    };
    let batch: EventBatch = match serde_json::from_slice(&bytes) {
        Ok(batch) => batch,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid event batch: {e}")),
    };
    if plane.subscribe(&batch.route).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "route {:?} is not defined; events of unknown routes are not stored",
                batch.route
            ),
        );
    }
    if let Some(event) = batch
        .events
        .iter()
        .find(|e| e.decision.route != batch.route)
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "event {} belongs to route {:?}, but the batch is for route {:?}",
                event.decision.decision_id, event.decision.route, batch.route
            ),
        );
    }
    let plane = plane.clone();
    let count = batch.events.len();
    let stored = tokio::task::spawn_blocking(move || {
        plane
            .store()
            .insert_events(&batch.route, &batch.sidecar, &batch.events)
            .map(|inserted| (inserted, batch.route, batch.sidecar))
    })
    .await;
    match stored {
        Ok(Ok((inserted, route, sidecar))) => {
            tracing::debug!(route = %route, sidecar = %sidecar, received = count, inserted, "stored events");
            respond(
                StatusCode::OK,
                "application/json",
                json!({"received": count, "inserted": inserted}).to_string(),
            )
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, events = count, "failed to store events");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to store events: {e}"),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, events = count, "the event store task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to store events".to_string(),
            )
        }
    }
}

/// Serves the control API on `listener` until `shutdown` completes.
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
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(address = %address, routes = ?plane.route_names(), "control API listening");
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
                let plane = plane.clone();
                let service = service_fn(move |request| {
                    let plane = plane.clone();
                    async move { Ok::<_, Infallible>(handle(plane, request).await) }
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
