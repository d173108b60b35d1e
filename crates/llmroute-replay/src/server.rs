//! The HTTP server of replay-llm: routing of `/m/<model>/v1/...` paths, OpenAI response and
//! SSE chunk bodies, and injected faults.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use llmroute_api::openai::{Endpoint, ErrorBody, prompt_text};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::faults::Faults;
use crate::recording::{LookupError, RecordedAnswer, Recording};

/// Response header with the recorded quality score of the response, so that a load generator
/// can post it to the sidecar as feedback.
pub const QUALITY_HEADER: &str = "x-replay-quality";
/// Response header with the recorded cost of the response in USD.
pub const COST_HEADER: &str = "x-replay-cost-usd";
/// Maximum request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Time that open connections get to finish when the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type ResponseBody = BoxBody<Bytes, Infallible>;

/// The recording and faults one replay-llm server serves.
#[derive(Debug)]
pub struct ReplayServer {
    recording: Recording,
    faults: Faults,
    /// Pause between streamed chunks.
    chunk_interval: Duration,
    next_id: AtomicU64,
}

impl ReplayServer {
    /// Builds a server state; `chunk_interval` is the pause between streamed chunks.
    pub fn new(recording: Recording, faults: Faults, chunk_interval: Duration) -> Self {
        Self {
            recording,
            faults,
            chunk_interval,
            next_id: AtomicU64::new(1),
        }
    }

    /// Returns the recording this server serves.
    pub fn recording(&self) -> &Recording {
        &self.recording
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        if path == "/healthz" && method == Method::GET {
            return text_response(StatusCode::OK, "ok\n");
        }
        let Some((model, rest)) = self.split_model_path(&path) else {
            return error_response(
                StatusCode::NOT_FOUND,
                ErrorBody::new(
                    "not_found_error",
                    format!(
                        "no route for {method} {path}; replay-llm serves /m/<model>/v1/chat/completions, /m/<model>/v1/completions and /m/<model>/v1/models"
                    ),
                ),
            );
        };
        let endpoint = match (method.clone(), rest) {
            (Method::GET, "/v1/models") => return self.list_model(&model),
            (Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
            (Method::POST, "/v1/completions") => Endpoint::Completions,
            _ => {
                return error_response(
                    StatusCode::NOT_FOUND,
                    ErrorBody::new("not_found_error", format!("no route for {method} {path}")),
                );
            }
        };
        match self.complete(&model, endpoint, request).await {
            Ok(response) => response,
            Err((status, body)) => {
                tracing::debug!(model = %model, status = status.as_u16(), message = %body.error.message, "replay request failed");
                error_response(status, body)
            }
        }
    }

    /// Splits `/m/<model>/v1/...` into the model (which may contain `/`) and `/v1/...`.
    fn split_model_path<'p>(&self, path: &'p str) -> Option<(String, &'p str)> {
        let rest = path.strip_prefix("/m/")?;
        let at = rest.rfind("/v1/")?;
        Some((rest[..at].to_string(), &rest[at..]))
    }

    fn list_model(&self, model: &str) -> Response<ResponseBody> {
        if !self.recording.models().iter().any(|m| m == model) {
            return model_not_found(model, &self.recording);
        }
        let body = json!({
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "replay-llm"}],
        });
        json_response(StatusCode::OK, &body)
    }

    async fn complete(
        self: &Arc<Self>,
        model: &str,
        endpoint: Endpoint,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, (StatusCode, ErrorBody)> {
        let bytes = Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|error| {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorBody::new(
                        "invalid_request_error",
                        format!(
                            "failed to read the request body: {error}; the limit is {MAX_BODY_BYTES} bytes"
                        ),
                    ),
                )
            })?
            .to_bytes();
        let body: Value = serde_json::from_slice(&bytes).map_err(|error| {
            (
                StatusCode::BAD_REQUEST,
                ErrorBody::new(
                    "invalid_request_error",
                    format!("the request body is not valid JSON: {error}"),
                ),
            )
        })?;
        let requested = body.get("model").and_then(Value::as_str).unwrap_or(model);
        if requested != model {
            return Err((
                StatusCode::NOT_FOUND,
                ErrorBody::new(
                    "invalid_request_error",
                    format!(
                        "model {requested:?} does not match the endpoint's model {model:?}; send it to /m/{requested}/v1"
                    ),
                )
                .with_param("model")
                .with_code("model_not_found"),
            ));
        }
        let prompt = prompt_text(endpoint, &body).map_err(|message| {
            (
                StatusCode::BAD_REQUEST,
                ErrorBody::new("invalid_request_error", message),
            )
        })?;
        let answer = self
            .recording
            .answer(model, &prompt)
            .map_err(|error| match error {
                LookupError::UnknownModel { .. } => (
                    StatusCode::NOT_FOUND,
                    ErrorBody::new("invalid_request_error", error.to_string())
                        .with_param("model")
                        .with_code("model_not_found"),
                ),
                LookupError::UnknownPrompt { .. } => (
                    StatusCode::NOT_FOUND,
                    ErrorBody::new("not_found_error", error.to_string())
                        .with_code("prompt_not_recorded"),
                ),
            })?;

        let fault = self.faults.of(model);
        if !fault.latency.is_zero() {
            tokio::time::sleep(fault.latency).await;
        }
        if self.faults.draw_error(model) {
            tracing::debug!(model, "injected an error");
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new(
                    "server_error",
                    format!("injected error of replay-llm for model {model}"),
                )
                .with_code("injected_error"),
            ));
        }

        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut response = if stream {
            self.stream_response(endpoint, &answer, id, include_usage)
        } else {
            json_response(StatusCode::OK, &completion_json(endpoint, &answer, id))
        };
        let headers = response.headers_mut();
        // Display of a float is ASCII digits, '.', '-' and 'e', so it is a valid header value.
        let quality = HeaderValue::from_str(&answer.quality.to_string()).expect("ASCII number");
        let cost = HeaderValue::from_str(&answer.cost_usd.to_string()).expect("ASCII number");
        headers.insert(QUALITY_HEADER, quality);
        headers.insert(COST_HEADER, cost);
        Ok(response)
    }

    fn stream_response(
        &self,
        endpoint: Endpoint,
        answer: &RecordedAnswer,
        id: u64,
        include_usage: bool,
    ) -> Response<ResponseBody> {
        let events = stream_events(endpoint, answer, id, include_usage);
        let (sender, receiver) = mpsc::channel::<Bytes>(4);
        let interval = self.chunk_interval;
        tokio::spawn(async move {
            for event in events {
                if sender.send(event).await.is_err() {
                    // The client went away; the rest of the stream has no reader.
                    return;
                }
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
            }
        });
        let mut response = Response::new(ChannelBody { receiver }.boxed());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

/// A response body fed from a channel, one data frame per message.
struct ChannelBody {
    receiver: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.receiver
            .poll_recv(context)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage_json(answer: &RecordedAnswer) -> Value {
    json!({
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    })
}

fn completion_json(endpoint: Endpoint, answer: &RecordedAnswer, id: u64) -> Value {
    match endpoint {
        Endpoint::ChatCompletions => json!({
            "id": format!("chatcmpl-replay-{id}"),
            "object": "chat.completion",
            "created": unix_seconds(),
            "model": answer.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer.content, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage_json(answer),
        }),
        Endpoint::Completions => json!({
            "id": format!("cmpl-replay-{id}"),
            "object": "text_completion",
            "created": unix_seconds(),
            "model": answer.model,
            "choices": [{
                "text": answer.content,
                "index": 0,
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage_json(answer),
        }),
    }
}

/// Builds the SSE events of a streamed response: one chunk per word, a last chunk with the
/// finish reason, a usage chunk with no choices when the client requested
/// `stream_options.include_usage`, and `data: [DONE]`.
fn stream_events(
    endpoint: Endpoint,
    answer: &RecordedAnswer,
    id: u64,
    include_usage: bool,
) -> Vec<Bytes> {
    let created = unix_seconds();
    let (id, object) = match endpoint {
        Endpoint::ChatCompletions => (format!("chatcmpl-replay-{id}"), "chat.completion.chunk"),
        Endpoint::Completions => (format!("cmpl-replay-{id}"), "text_completion"),
    };
    let choice = |text: Option<&str>, role: bool, finish: Option<&str>| match endpoint {
        Endpoint::ChatCompletions => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(text) = text {
                delta.insert("content".into(), json!(text));
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
        Endpoint::Completions => json!({
            "text": text.unwrap_or(""), "index": 0, "logprobs": null, "finish_reason": finish
        }),
    };
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut value = json!({
            "id": id, "object": object, "created": created, "model": answer.model, "choices": choices,
        });
        if include_usage {
            value["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {value}\n\n"))
    };

    let mut events = Vec::new();
    if endpoint == Endpoint::ChatCompletions {
        events.push(chunk(json!([choice(Some(""), true, None)]), None));
    }
    for word in answer.content.split_inclusive(' ') {
        events.push(chunk(json!([choice(Some(word), false, None)]), None));
    }
    events.push(chunk(json!([choice(None, false, Some("stop"))]), None));
    if include_usage {
        events.push(chunk(json!([]), Some(usage_json(answer))));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    *response.status_mut() = status;
    response
}

fn error_response(status: StatusCode, body: ErrorBody) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_json())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn model_not_found(model: &str, recording: &Recording) -> Response<ResponseBody> {
    error_response(
        StatusCode::NOT_FOUND,
        ErrorBody::new(
            "invalid_request_error",
            format!(
                "model {model:?} is not in data set {}; its models are: {}",
                recording.dataset(),
                recording.models().join(", ")
            ),
        )
        .with_param("model")
        .with_code("model_not_found"),
    )
}

/// Serves `server` on `listener` until `shutdown` completes, then gives open connections
/// [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    server: Arc<ReplayServer>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(
        address = %address,
        dataset = server.recording.dataset(),
        prompts = server.recording.len(),
        models = server.recording.models().len(),
        "replay-llm listening"
    );
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
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
                let server = server.clone();
                let service = service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.handle(request).await) }
                });
                let connection = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(peer = %peer, error = %error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(address = %address, "replay-llm stopping");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            "connections still open after the grace period were closed"
        );
    }
    tracing::info!(address = %address, "replay-llm stopped");
    Ok(())
}
