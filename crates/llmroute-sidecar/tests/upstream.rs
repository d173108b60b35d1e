//! The sidecar in front of small OpenAI-style upstreams on 127.0.0.1, plain or TLS with a
//! certificate from a throw-away CA, without a policy: TLS verification and failover, and
//! the lifecycle of events around streams and cancelled requests.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{post_json, sse_payloads};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmroute_api::{Exploration, ModelEndpoint, Preference, Pricing, SidecarConfig};
use llmroute_sidecar::body::{ChannelBody, ResponseBody, json_response};
use llmroute_sidecar::{
    BatchSettings, EventSink, RouteState, Sidecar, SidecarOptions, UpstreamTls,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};

const ROUTE: &str = "chat";
/// Upstream model whose non-streamed response waits for [`Signals::release`].
const HOLD: &str = "hold";
/// Upstream model whose stream pauses after its first chunk until [`Signals::release`].
const PAUSE: &str = "pause";
/// Maximum time a test waits for one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters and signals shared between a test and its upstream.
#[derive(Clone, Default)]
struct Signals {
    /// TCP connections accepted (TLS handshakes started, on a TLS upstream).
    connections: Arc<AtomicUsize>,
    /// HTTP requests read.
    requests: Arc<AtomicUsize>,
    /// Notified when a `hold` request arrives or a `pause` stream pauses.
    arrived: Arc<Notify>,
    /// Notified by the test to let a held response or paused stream go on.
    release: Arc<Notify>,
}

/// An OpenAI-style upstream on 127.0.0.1, which stops accepting when dropped.
struct Upstream {
    address: SocketAddr,
    signals: Signals,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Starts an upstream, with TLS when `tls` is set.
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let signals = Signals::default();
        let shared = signals.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let signals = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let signals = signals.clone();
                        async move { Ok::<_, Infallible>(respond(signals, request).await) }
                    });
                    match tls {
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            // A client that rejects the certificate ends the handshake here.
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            address,
            signals,
            task,
        }
    }

    fn endpoint(&self, scheme: &str) -> String {
        format!("{scheme}://{}/v1", self.address)
    }
}

fn completion(model: &str) -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    })
}

fn chunk(model: &str, content: &str) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

fn usage_chunk(model: &str) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// Waits for the test to release a held response, for at most three times [`STEP_TIMEOUT`].
async fn wait_for_release(signals: &Signals) {
    let _ = tokio::time::timeout(STEP_TIMEOUT * 3, signals.release.notified()).await;
}

/// Serves one chat completion: whole, or as an SSE stream of "hel", "lo" and a usage chunk.
async fn respond(signals: Signals, request: Request<Incoming>) -> Response<ResponseBody> {
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let request: Value = serde_json::from_slice(&body).unwrap();
    signals.requests.fetch_add(1, Ordering::SeqCst);
    let model = request["model"].as_str().unwrap_or_default().to_string();
    if !request["stream"].as_bool().unwrap_or(false) {
        if model == HOLD {
            signals.arrived.notify_one();
            wait_for_release(&signals).await;
        }
        return json_response(StatusCode::OK, completion(&model).to_string());
    }
    let (sender, receiver) = mpsc::channel(8);
    tokio::spawn(async move {
        let _ = sender.send(Ok(chunk(&model, "hel"))).await;
        if model == PAUSE {
            signals.arrived.notify_one();
            wait_for_release(&signals).await;
        }
        for bytes in [
            chunk(&model, "lo"),
            usage_chunk(&model),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ] {
            let _ = sender.send(Ok(bytes)).await;
        }
    });
    let mut response = Response::new(ChannelBody { receiver }.boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// A throw-away CA and a server configuration with a certificate for IP 127.0.0.1 signed by it.
struct TestCa {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    fn new() -> Self {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "llmroute test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();

        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let server_cert = server_params.signed_by(&server_key, &ca).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![server_cert.der().clone()], key)
            .unwrap();
        Self {
            ca_pem: ca.pem(),
            server: Arc::new(server),
        }
    }

    /// Writes the CA certificate as PEM into `folder` and returns the file's path.
    fn write_ca(&self, folder: &Path) -> PathBuf {
        let path = folder.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

/// A sidecar without a policy on 127.0.0.1: requests for the route go to the first model,
/// then to the next ones on retryable failures.
struct Proxy {
    base: String,
    sidecar: Arc<Sidecar>,
    events_path: PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _folder: tempfile::TempDir,
}

impl Proxy {
    /// Starts a sidecar for `models`, each a name (also sent as the upstream model) and an
    /// endpoint.
    async fn start(models: &[(&str, String)], upstream_tls: UpstreamTls) -> Self {
        let config = SidecarConfig {
            route: ROUTE.to_string(),
            version: 1,
            models: models
                .iter()
                .map(|(name, endpoint)| ModelEndpoint {
                    name: name.to_string(),
                    endpoint: endpoint.clone(),
                    upstream_model: name.to_string(),
                    api_key: None,
                    pricing: Pricing {
                        input_usd_per_million_tokens: 1.0,
                        output_usd_per_million_tokens: 2.0,
                    },
                    timeout_ms: 5_000,
                })
                .collect(),
            default_preference: Preference::from_quality(0.5).unwrap(),
            exploration: Exploration::Greedy,
            stable: None,
            canary: None,
            canary_weight: 0.0,
            fallback: models[0].0.to_string(),
            max_attempts: 3,
        };
        let state = RouteState::build(config, &|_| None, None, "", None).unwrap();
        let folder = tempfile::tempdir().unwrap();
        let events_path = folder.path().join("events.jsonl");
        let options = SidecarOptions {
            sink: EventSink::File(events_path.clone()),
            batch: BatchSettings {
                interval: Duration::from_millis(50),
                ..BatchSettings::default()
            },
            upstream_tls,
            ..SidecarOptions::default()
        };
        let (sidecar, events) = Sidecar::new(state, None, options);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(llmroute_sidecar::serve(
            listener,
            sidecar.clone(),
            events,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            base,
            sidecar,
            events_path,
            stop,
            task,
            _folder: folder,
        }
    }

    fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.base)
    }

    /// Waits, at most [`STEP_TIMEOUT`], for a written event that `matches` accepts.
    async fn wait_for_event(&self, matches: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if let Some(event) = read_events(&self.events_path).into_iter().find(&matches) {
                return Some(event);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Stops the sidecar and returns every event it wrote.
    async fn stop(self) -> Vec<Value> {
        let events = self.events_path.clone();
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
        read_events(&events)
    }
}

/// Reads the events written so far from a JSON Lines file.
fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// Joins the `delta.content` of every chunk of an SSE body.
fn streamed_text(body: &[u8]) -> String {
    let payloads = sse_payloads(body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_with_test_ca() {
    let ca = TestCa::new();
    let upstream = Upstream::start(Some(ca.server.clone())).await;
    let folder = tempfile::tempdir().unwrap();
    let tls = UpstreamTls::with_ca_file(&ca.write_ca(folder.path())).unwrap();
    let proxy = Proxy::start(&[("secure", upstream.endpoint("https"))], tls).await;

    for _ in 0..2 {
        let reply = post_json(&proxy.chat_url(), &[], &chat(ROUTE, false)).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.header("x-llmroute-model").as_deref(), Some("secure"));
        assert_eq!(reply.header("x-llmroute-attempts").as_deref(), Some("1"));
        assert_eq!(
            reply.json()["choices"][0]["message"]["content"],
            json!("hello")
        );
        assert!(reply.header("x-llmroute-cost-usd").is_some());
    }
    assert_eq!(
        upstream.signals.connections.load(Ordering::SeqCst),
        1,
        "the second request reuses the pooled TLS connection"
    );

    let reply = post_json(&proxy.chat_url(), &[], &chat(ROUTE, true)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(streamed_text(&reply.body), "hello");
    assert_eq!(upstream.signals.requests.load(Ordering::SeqCst), 3);

    let events = proxy.stop().await;
    assert_eq!(events.len(), 3);
    for event in &events {
        assert_eq!(event["outcome"]["kind"], "success", "{event}");
        assert_eq!(event["promptTokens"], 5, "{event}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_fails_over() {
    let ca = TestCa::new();
    let secure = Upstream::start(Some(ca.server.clone())).await;
    let plain = Upstream::start(None).await;
    let proxy = Proxy::start(
        &[
            ("secure", secure.endpoint("https")),
            ("plain", plain.endpoint("http")),
        ],
        UpstreamTls::default(),
    )
    .await;

    // The route tries "secure" first; its certificate fails verification, so "plain" serves.
    for stream in [false, true] {
        let reply = post_json(&proxy.chat_url(), &[], &chat(ROUTE, stream)).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.header("x-llmroute-model").as_deref(), Some("plain"));
        assert_eq!(reply.header("x-llmroute-attempts").as_deref(), Some("2"));
    }
    let metrics = proxy.sidecar.metrics().encode();
    assert!(
        metrics
            .contains("llmroute_upstream_retries_total{route=\"chat\",reason=\"connect_error\"} 2"),
        "{metrics}"
    );

    // A request naming "secure" has no other model to go to.
    let reply = post_json(&proxy.chat_url(), &[], &chat("secure", false)).await;
    assert_eq!(reply.status, 502);
    let error = reply.openai_error();
    assert_eq!(error["code"], "upstream_unreachable");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("invalid peer certificate"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    assert!(message.contains("upstream CA file"), "{message}");

    assert!(secure.signals.connections.load(Ordering::SeqCst) >= 3);
    assert_eq!(
        secure.signals.requests.load(Ordering::SeqCst),
        0,
        "no request reaches an upstream whose certificate failed verification"
    );
    let events = proxy.stop().await;
    assert_eq!(events.len(), 3);
    let unreachable = events
        .iter()
        .filter(|e| e["outcome"]["kind"] == "unreachable")
        .count();
    assert_eq!(unreachable, 1, "{events:?}");
}

/// Sends a streamed chat completion for the route and returns the response with its body
/// still open.
async fn open_stream(proxy: &Proxy) -> Response<Incoming> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(proxy.chat_url())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(chat(ROUTE, true).to_string())))
        .unwrap();
    client.request(request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_during_stream_is_joined() {
    let upstream = Upstream::start(None).await;
    let proxy = Proxy::start(
        &[(PAUSE, upstream.endpoint("http"))],
        UpstreamTls::default(),
    )
    .await;
    let feedback_url = format!("{}/v1/feedback", proxy.base);

    let response = open_stream(&proxy).await;
    assert_eq!(response.status(), 200);
    let decision_id = response.headers()["x-llmroute-decision-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut body = response.into_body();
    let first = tokio::time::timeout(STEP_TIMEOUT, body.frame())
        .await
        .expect("the first chunk arrives")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("hel"));
    tokio::time::timeout(STEP_TIMEOUT, upstream.signals.arrived.notified())
        .await
        .expect("the upstream pauses its stream");

    // The stream is still open: feedback is accepted and held, and only once.
    let feedback = json!({"decision_id": decision_id, "score": 0.8});
    let reply = post_json(&feedback_url, &[], &feedback).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["status"], "accepted");
    let again = post_json(&feedback_url, &[], &feedback).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.openai_error()["code"], "decision_not_found");
    assert!(read_events(&proxy.events_path).is_empty());

    upstream.signals.release.notify_one();
    let rest = tokio::time::timeout(STEP_TIMEOUT, body.collect())
        .await
        .expect("the stream ends")
        .unwrap()
        .to_bytes();
    let mut whole = first.to_vec();
    whole.extend_from_slice(&rest);
    assert_eq!(streamed_text(&whole), "hello");

    // The event leaves as soon as the stream ends, because its feedback is already in.
    let event = proxy
        .wait_for_event(|e| e["decision"]["decisionId"] == decision_id.as_str())
        .await
        .expect("the event is written before the feedback time to live ends");
    assert_eq!(event["quality"], 0.8);
    assert_eq!(event["outcome"]["kind"], "success");
    assert_eq!(event["completionTokens"], 2);
    let late = post_json(&feedback_url, &[], &feedback).await;
    assert_eq!(late.status, 404);

    let events = proxy.stop().await;
    assert_eq!(events.len(), 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_request_records_event() {
    let upstream = Upstream::start(None).await;
    let proxy = Proxy::start(&[(HOLD, upstream.endpoint("http"))], UpstreamTls::default()).await;

    let body = chat(ROUTE, false).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let address = proxy.base.strip_prefix("http://").unwrap();
    let mut client = TcpStream::connect(address).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(STEP_TIMEOUT, upstream.signals.arrived.notified())
        .await
        .expect("the request reaches the upstream");
    // The client closes the connection while the upstream delays its response.
    drop(client);

    let event = proxy
        .wait_for_event(|e| e["outcome"]["kind"] == "clientCancelled")
        .await
        .expect("the cancelled request's event is written");
    assert_eq!(event["servedModel"], HOLD);
    assert_eq!(event["attempts"], 1);
    assert_eq!(event["quality"], Value::Null);
    assert_eq!(event["promptTokens"], Value::Null);
    let metrics = proxy.sidecar.metrics().encode();
    assert!(
        metrics.contains("outcome=\"client_cancelled\""),
        "{metrics}"
    );

    upstream.signals.release.notify_one();
    let events = proxy.stop().await;
    assert_eq!(events.len(), 1, "{events:?}");
}
