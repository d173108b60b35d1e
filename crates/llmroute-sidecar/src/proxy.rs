//! Forwarding one request upstream: the model order with retries, then a whole or streamed
//! response back to the client with usage and cost accounted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use llmroute_api::openai::Endpoint;
use llmroute_api::{DecisionRecord, ErrorBody, ModelEndpoint, Outcome};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::body::{ChannelBody, ResponseBody, error_response};
use crate::metrics::Metrics;
use crate::sidecar::{Sidecar, cost_of, decision_headers};
use crate::sse::{Usage, UsageScanner};
use crate::state::RouteState;

/// Response headers that belong to one connection and are not forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// An attempt that ended before any byte reached the client.
enum Failure {
    Timeout,
    Transport(String),
    Status {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

impl Failure {
    fn reason(&self) -> String {
        match self {
            Failure::Timeout => "timeout".to_string(),
            Failure::Transport(_) => "connect_error".to_string(),
            Failure::Status { status, .. } => format!("status_{}", status.as_u16()),
        }
    }
}

/// A decision whose event is not recorded yet. Hyper drops the request future when the client
/// closes the connection, so dropping this guard records the event as cancelled by the client.
struct InFlight {
    sidecar: Arc<Sidecar>,
    state: Arc<RouteState>,
    /// The decision and prompt embedding, until a path that records the event takes them.
    decision: Option<(DecisionRecord, Vec<f32>)>,
    /// The model of the current attempt.
    model: String,
    attempts: u32,
    started: Instant,
}

impl InFlight {
    /// Takes the decision out, for a path that records the event itself.
    fn take(&mut self) -> (DecisionRecord, Vec<f32>) {
        self.decision
            .take()
            .expect("each request path takes the decision once")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some((record, embedding)) = self.decision.take() else {
            return;
        };
        tracing::info!(
            route = %self.state.config.route,
            decision_id = %record.decision_id,
            model = %self.model,
            attempts = self.attempts,
            "the client closed the connection before the response"
        );
        self.sidecar.cancel(
            &self.state,
            record,
            &self.model,
            embedding,
            self.attempts,
            self.started,
        );
    }
}

/// Tries the models of `order` until one responds without a retryable error, within the route's `maxAttempts`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    sidecar: Arc<Sidecar>,
    state: Arc<RouteState>,
    endpoint: Endpoint,
    record: DecisionRecord,
    order: Vec<String>,
    embedding: Vec<f32>,
    mut body: Value,
    stream: bool,
    strip_usage: bool,
    started: Instant,
) -> Response<ResponseBody> {
    let route = state.config.route.clone();
    let decision_id = record.decision_id.clone();
    let max_attempts = state.config.max_attempts as usize;
    let mut last_failure = None;
    let mut attempts = 0u32;
    let mut in_flight = InFlight {
        sidecar: sidecar.clone(),
        state: state.clone(),
        decision: Some((record, embedding)),
        model: String::new(),
        attempts,
        started,
    };
    for name in order.iter().take(max_attempts) {
        let Some(model) = state.config.model(name).cloned() else {
            continue;
        };
        if let Some(failure) = &last_failure {
            let reason = Failure::reason(failure);
            Metrics::count(&sidecar.metrics.retries, &route, &reason);
            tracing::warn!(
                route = %route,
                decision_id = %decision_id,
                model = %model.name,
                reason = %reason,
                attempt = attempts + 1,
                "retrying on the next model"
            );
        }
        attempts += 1;
        in_flight.model = model.name.clone();
        in_flight.attempts = attempts;
        body["model"] = Value::String(model.upstream_model.clone());
        let bytes = Bytes::from(serde_json::to_vec(&body).expect("a JSON value serialises"));
        match send(&sidecar, &state, &model, endpoint, bytes).await {
            Ok(response) => {
                return respond(
                    sidecar,
                    state,
                    &model,
                    in_flight,
                    response,
                    stream,
                    strip_usage,
                    attempts,
                    started,
                )
                .await;
            }
            Err(failure) => {
                match &failure {
                    Failure::Timeout => {
                        tracing::warn!(route = %route, decision_id = %decision_id, model = %model.name, timeout_ms = model.timeout_ms, "the upstream timed out before its response headers")
                    }
                    Failure::Transport(error) => {
                        tracing::warn!(route = %route, decision_id = %decision_id, model = %model.name, error = %error, "failed to reach the upstream")
                    }
                    Failure::Status { status, .. } => {
                        tracing::warn!(route = %route, decision_id = %decision_id, model = %model.name, status = status.as_u16(), "the upstream responded with a retryable status")
                    }
                }
                last_failure = Some(failure);
            }
        }
    }

    let served = order
        .get(attempts.saturating_sub(1) as usize)
        .cloned()
        .unwrap_or_default();
    let (outcome, mut response) = match last_failure {
        Some(Failure::Status {
            status,
            headers,
            body,
        }) => (
            Outcome::UpstreamStatus {
                status: status.as_u16(),
            },
            upstream_error_response(status, &headers, body),
        ),
        Some(Failure::Timeout) => (
            Outcome::Unreachable,
            error_response(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorBody::new(
                    "api_error",
                    format!(
                        "no model of route {route} responded in time after {attempts} attempts"
                    ),
                )
                .with_code("upstream_timeout"),
            ),
        ),
        Some(Failure::Transport(error)) => (
            Outcome::Unreachable,
            error_response(
                StatusCode::BAD_GATEWAY,
                ErrorBody::new(
                    "api_error",
                    format!(
                        "no model of route {route} could be reached after {attempts} attempts; the last error: {error}"
                    ),
                )
                .with_code("upstream_unreachable"),
            ),
        ),
        None => (
            Outcome::Unreachable,
            error_response(
                StatusCode::BAD_GATEWAY,
                ErrorBody::new(
                    "api_error",
                    format!("no model of route {route} could be reached after {attempts} attempts"),
                )
                .with_code("upstream_unreachable"),
            ),
        ),
    };
    let (record, embedding) = in_flight.take();
    decision_headers(response.headers_mut(), &record, &served, attempts, None);
    sidecar.finish(
        &state, record, &served, embedding, None, outcome, attempts, started,
    );
    response
}

/// Sends one attempt and waits for the response headers. 429 and 5xx responses come back as
/// [`Failure::Status`] with their body, so that the caller may retry.
async fn send(
    sidecar: &Sidecar,
    state: &RouteState,
    model: &ModelEndpoint,
    endpoint: Endpoint,
    body: Bytes,
) -> Result<Response<Incoming>, Failure> {
    let url = format!(
        "{}{}",
        model.endpoint.trim_end_matches('/'),
        endpoint.path()
    );
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(key) = state.api_key(&model.name) {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = builder
        .body(Full::new(body))
        .map_err(|e| Failure::Transport(format!("invalid upstream request to {url}: {e}")))?;
    let timeout = Duration::from_millis(model.timeout_ms);
    let response = tokio::time::timeout(timeout, sidecar.client.request(request))
        .await
        .map_err(|_| Failure::Timeout)?
        .map_err(|e| Failure::Transport(transport_error(&url, &e)))?;
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let headers = response.headers().clone();
        let limit = sidecar.options.limits.max_upstream_bytes;
        let body =
            tokio::time::timeout(timeout, Limited::new(response.into_body(), limit).collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|collected| collected.to_bytes())
                .unwrap_or_default();
        return Err(Failure::Status {
            status,
            headers,
            body,
        });
    }
    Ok(response)
}

/// Returns an upstream error to the client unchanged when it is an OpenAI-style error body,
/// and wrapped in one otherwise.
fn upstream_error_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Response<ResponseBody> {
    let is_openai_error = serde_json::from_slice::<Value>(&body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(Value::is_object));
    let mut response = if is_openai_error {
        crate::body::json_response(status, body)
    } else {
        error_response(
            status,
            ErrorBody::new(
                if status == StatusCode::TOO_MANY_REQUESTS {
                    "rate_limit_error"
                } else {
                    "api_error"
                },
                format!(
                    "the upstream responded {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(500)])
                ),
            ),
        )
    };
    if let Some(retry_after) = headers.get(header::RETRY_AFTER) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after.clone());
    }
    response
}

/// Sends a successful (or non-retryable) upstream response to the client.
#[allow(clippy::too_many_arguments)]
async fn respond(
    sidecar: Arc<Sidecar>,
    state: Arc<RouteState>,
    model: &ModelEndpoint,
    mut in_flight: InFlight,
    upstream: Response<Incoming>,
    stream: bool,
    strip_usage: bool,
    attempts: u32,
    started: Instant,
) -> Response<ResponseBody> {
    let (parts, body) = upstream.into_parts();
    let is_event_stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let timeout = Duration::from_millis(model.timeout_ms);
    if stream && parts.status.is_success() && is_event_stream {
        // From here on, the streaming task records the event, also when the client leaves.
        let (record, embedding) = in_flight.take();
        return stream_response(
            sidecar,
            state,
            model,
            record,
            embedding,
            parts,
            body,
            strip_usage,
            attempts,
            started,
        );
    }

    let limit = sidecar.options.limits.max_upstream_bytes;
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    let (record, embedding) = in_flight.take();
    let bytes = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) => {
            tracing::warn!(route = %state.config.route, decision_id = %record.decision_id, model = %model.name, error = %error, "failed to read the upstream response body");
            let mut response = error_response(
                StatusCode::BAD_GATEWAY,
                ErrorBody::new(
                    "api_error",
                    format!(
                        "failed to read the response of model {}: {error}",
                        model.name
                    ),
                )
                .with_code("upstream_body"),
            );
            decision_headers(response.headers_mut(), &record, &model.name, attempts, None);
            sidecar.finish(
                &state,
                record,
                &model.name,
                embedding,
                None,
                Outcome::StreamInterrupted,
                attempts,
                started,
            );
            return response;
        }
        Err(_) => {
            tracing::warn!(route = %state.config.route, decision_id = %record.decision_id, model = %model.name, timeout_ms = model.timeout_ms, "the upstream response body timed out");
            let mut response = error_response(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorBody::new(
                    "api_error",
                    format!("the response of model {} timed out", model.name),
                )
                .with_code("upstream_timeout"),
            );
            decision_headers(response.headers_mut(), &record, &model.name, attempts, None);
            sidecar.finish(
                &state,
                record,
                &model.name,
                embedding,
                None,
                Outcome::StreamInterrupted,
                attempts,
                started,
            );
            return response;
        }
    };
    let usage = if parts.status.is_success() {
        serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| Usage::from_response(&v))
    } else {
        None
    };
    let cost = usage.and_then(|u| cost_of(&state, &model.name, u));
    let outcome = if parts.status.is_success() {
        Outcome::Success
    } else {
        Outcome::UpstreamStatus {
            status: parts.status.as_u16(),
        }
    };
    let mut response = Response::new(crate::body::full(bytes));
    *response.status_mut() = parts.status;
    copy_headers(&parts.headers, response.headers_mut());
    decision_headers(response.headers_mut(), &record, &model.name, attempts, cost);
    sidecar.finish(
        &state,
        record,
        &model.name,
        embedding,
        usage,
        outcome,
        attempts,
        started,
    );
    response
}

/// Starts the task that pumps upstream SSE chunks to the client and returns the response.
#[allow(clippy::too_many_arguments)]
fn stream_response(
    sidecar: Arc<Sidecar>,
    state: Arc<RouteState>,
    model: &ModelEndpoint,
    record: DecisionRecord,
    embedding: Vec<f32>,
    parts: http::response::Parts,
    mut body: Incoming,
    strip_usage: bool,
    attempts: u32,
    started: Instant,
) -> Response<ResponseBody> {
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let mut response = Response::new(BodyExt::boxed(ChannelBody { receiver }));
    *response.status_mut() = parts.status;
    copy_headers(&parts.headers, response.headers_mut());
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    decision_headers(response.headers_mut(), &record, &model.name, attempts, None);
    // The client can post feedback as soon as it reads the decision id in these headers.
    sidecar.feedback.start_streaming(&record.decision_id);

    let model_name = model.name.clone();
    let timeout = Duration::from_millis(model.timeout_ms);
    let limit = sidecar.options.limits.max_upstream_bytes;
    tokio::spawn(async move {
        let route = state.config.route.clone();
        let mut scanner = UsageScanner::new(strip_usage);
        let mut total = 0usize;
        let outcome = loop {
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => {
                    tracing::warn!(route = %route, decision_id = %record.decision_id, model = %model_name, timeout_ms = timeout.as_millis() as u64, "the upstream stream stalled; ending it");
                    break Outcome::StreamInterrupted;
                }
                Ok(None) => {
                    let rest = scanner.finish();
                    if !rest.is_empty() && sender.send(Ok(rest)).await.is_err() {
                        break Outcome::ClientCancelled;
                    }
                    break Outcome::Success;
                }
                Ok(Some(Err(error))) => {
                    tracing::warn!(route = %route, decision_id = %record.decision_id, model = %model_name, error = %error, "the upstream stream failed");
                    break Outcome::StreamInterrupted;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len();
            if total > limit {
                tracing::warn!(route = %route, decision_id = %record.decision_id, model = %model_name, limit_bytes = limit, "the upstream stream exceeded the size limit; ending it");
                break Outcome::StreamInterrupted;
            }
            let output = scanner.push(&data);
            if !output.is_empty() && sender.send(Ok(output)).await.is_err() {
                break Outcome::ClientCancelled;
            }
        };
        if outcome == Outcome::StreamInterrupted {
            // An error frame makes hyper abort the chunked body, so the client sees an
            // incomplete stream rather than a clean end.
            let _ = sender
                .send(Err(std::io::Error::other(
                    "the upstream stream was interrupted",
                )))
                .await;
        }
        if scanner.overflowed() {
            tracing::warn!(route = %route, decision_id = %record.decision_id, model = %model_name, "an SSE line exceeded the scan limit; usage may be missing");
        }
        sidecar.finish(
            &state,
            record,
            &model_name,
            embedding,
            scanner.usage(),
            outcome,
            attempts,
            started,
        );
    });
    response
}

/// Copies end-to-end upstream headers, leaving out hop-by-hop ones and `content-length`.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Describes a failed attempt to reach `url`, with advice when the TLS handshake failed.
fn transport_error(url: &str, error: &(dyn std::error::Error + 'static)) -> String {
    let chain = error_chain(error);
    match crate::tls::rustls_error(error) {
        Some(rustls::Error::InvalidCertificate(_)) => format!(
            "{chain}; the TLS server certificate of {url} failed verification: trust the CA that signed it with the sidecar's upstream CA file or SSL_CERT_FILE"
        ),
        Some(_) => format!("{chain}; the TLS handshake with {url} failed"),
        None => chain,
    }
}

/// Formats an error with its sources, because hyper's client error alone often reads only
/// "client error (Connect)".
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
