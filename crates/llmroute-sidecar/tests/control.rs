//! The sidecar following a mock control API on 127.0.0.1. The last good configuration and
//! policy keep serving while the control plane is away or sends something invalid. Completed
//! events reach the control plane once each despite failed batches, and the bounded queue
//! counts its overflow. Needs the assets of `llmroute setup` (ONNX Runtime and the encoder).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::{
    DATASET, ROUTE, Running, assets, policy_bytes, post_json, route_config, start_replay,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use llmroute_api::{EventBatch, PolicyRef, SidecarConfig};
use llmroute_policy::data::{RoutingDataset, load};
use llmroute_policy::encoder::Encoder;
use llmroute_policy::runtime::init_onnx_runtime;
use llmroute_replay::Faults;
use llmroute_sidecar::{BatchSettings, ControlClient, EventSink, Sidecar, SidecarOptions};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Maximum time a test waits for one step, above the sidecar's maximum poll backoff of 30 s.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Message of the sidecar's warning for a failed configuration poll.
const POLL_FAILED: &str = "failed to poll the control API; the current configuration keeps serving";
/// Message of the sidecar's error for a configuration it could not use.
const CONFIG_REJECTED: &str = "rejected a route configuration; the previous one keeps serving";

/// Warnings and errors logged by the sidecar, each as its fields (the text under `message`).
#[derive(Default)]
struct LogRecorder {
    events: Mutex<Vec<BTreeMap<String, String>>>,
}

struct FieldVisitor<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl tracing::Subscriber for LogRecorder {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        // Levels compare by verbosity, so this keeps WARN and ERROR.
        *metadata.level() <= tracing::Level::WARN
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut FieldVisitor(&mut fields));
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fields);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// Returns the recorder of this test binary, installed as the global subscriber on first use.
fn logs() -> &'static LogRecorder {
    static RECORDER: OnceLock<&'static LogRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static LogRecorder = Box::leak(Box::default());
        tracing::subscriber::set_global_default(RecorderHandle(recorder))
            .expect("no other global subscriber in this test binary");
        recorder
    })
}

/// The global subscriber: a `'static` reference to the recorder.
struct RecorderHandle(&'static LogRecorder);

impl tracing::Subscriber for RecorderHandle {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn new_span(&self, attributes: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(attributes)
    }

    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        self.0.record(span, values)
    }

    fn record_follows_from(&self, span: &tracing::span::Id, follows: &tracing::span::Id) {
        self.0.record_follows_from(span, follows)
    }

    fn event(&self, event: &tracing::Event<'_>) {
        self.0.event(event)
    }

    fn enter(&self, span: &tracing::span::Id) {
        self.0.enter(span)
    }

    fn exit(&self, span: &tracing::span::Id) {
        self.0.exit(span)
    }
}

impl LogRecorder {
    /// Counts the logged events with `message` whose field `key` is `value`.
    fn count(&self, message: &str, key: &str, value: &str) -> usize {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|fields| fields.get("message").map(String::as_str) == Some(message))
            .filter(|fields| fields.get(key).map(String::as_str) == Some(value))
            .count()
    }
}

/// How the mock's `POST /v1/events` responds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventsMode {
    /// Stores the batch and responds 200.
    Accept,
    /// Fails every batch without storing it, alternating a 503 and a connection closed
    /// without a response.
    Fail,
    /// Rejects every batch with 400, as the control plane does for an invalid event.
    Reject,
}

/// What the mock serves and what it saw.
struct ControlState {
    /// Body of the configuration response, served when `config_version` is above the
    /// poll's `version`. It may be invalid on purpose.
    config_body: String,
    config_version: u64,
    /// Policy artifacts by sha256. A request for a missing sha256 gets 404.
    policies: HashMap<String, Vec<u8>>,
    /// The `version` parameter of every configuration poll.
    polled_versions: Vec<u64>,
    /// The sha256 of every policy request.
    policy_requests: Vec<String>,
    /// Policy requests still to fail with 503, as a control plane under load does.
    policy_failures_left: usize,
    events_mode: EventsMode,
    /// Event batches failed on purpose.
    failed_batches: usize,
    /// Accepted copies of each event, by decision id.
    received: HashMap<String, usize>,
}

/// The shared side of the mock, which outlives its listener.
struct ControlShared {
    state: Mutex<ControlState>,
    /// The configuration version, watched by waiting long polls.
    version: watch::Sender<u64>,
}

impl ControlShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A mock of the control API on 127.0.0.1. `stop` closes the listener and every open
/// connection; `restart` listens again on the same address with the same state.
struct MockControl {
    address: SocketAddr,
    shared: Arc<ControlShared>,
    task: Option<JoinHandle<()>>,
}

impl Drop for MockControl {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl MockControl {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(ControlShared {
            state: Mutex::new(ControlState {
                config_body: String::new(),
                config_version: 0,
                policies: HashMap::new(),
                polled_versions: Vec::new(),
                policy_requests: Vec::new(),
                policy_failures_left: 0,
                events_mode: EventsMode::Accept,
                failed_batches: 0,
                received: HashMap::new(),
            }),
            version: watch::Sender::new(0),
        });
        let task = tokio::spawn(accept(listener, shared.clone()));
        Self {
            address,
            shared,
            task: Some(task),
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Closes the listener and every open connection, including waiting long polls.
    async fn stop(&mut self) {
        let task = self.task.take().expect("the mock is running");
        task.abort();
        let _ = task.await;
    }

    /// Listens again on the address of the stopped mock.
    async fn restart(&mut self) {
        assert!(self.task.is_none(), "the mock is already running");
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.address).unwrap();
        let listener = socket.listen(64).unwrap();
        self.task = Some(tokio::spawn(accept(listener, self.shared.clone())));
    }

    /// Publishes a policy artifact and returns its sha256.
    fn publish_policy(&self, bytes: Vec<u8>) -> String {
        let sha256 = hex_sha256(&bytes);
        self.shared.lock().policies.insert(sha256.clone(), bytes);
        sha256
    }

    /// Serves `body` as configuration `version` and wakes the waiting long polls.
    fn set_config_body(&self, version: u64, body: String) {
        {
            let mut state = self.shared.lock();
            state.config_body = body;
            state.config_version = version;
        }
        self.shared.version.send_replace(version);
    }

    fn set_config(&self, config: &SidecarConfig) {
        self.set_config_body(config.version, serde_json::to_string(config).unwrap());
    }

    fn set_events_mode(&self, mode: EventsMode) {
        self.shared.lock().events_mode = mode;
    }

    /// Waits until `condition` holds for the mock's state; false after [`STEP_TIMEOUT`].
    async fn wait_for(&self, condition: impl Fn(&ControlState) -> bool) -> bool {
        wait_until(|| condition(&self.shared.lock())).await
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Polls `condition` every 20 ms until it holds; false after [`STEP_TIMEOUT`].
async fn wait_until(condition: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

/// Accepts connections until aborted. The connections live in a `JoinSet` that this task
/// owns, so aborting it also closes every open connection.
async fn accept(listener: TcpListener, shared: Arc<ControlShared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| respond(shared.clone(), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Serves one request of the mock. An `Err` makes hyper close the connection without a
/// response.
async fn respond(
    shared: Arc<ControlShared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let reply = |status: StatusCode, body: Bytes| {
        Ok(Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .unwrap())
    };
    let path = request.uri().path().to_string();
    let config_path = format!("/v1/routes/{ROUTE}/config");
    if request.method() == Method::GET && path == config_path {
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let known: u64 = query["version"].parse().unwrap();
        let wait: u64 = query["waitSeconds"].parse().unwrap();
        shared.lock().polled_versions.push(known);
        let mut versions = shared.version.subscribe();
        let changed = tokio::time::timeout(
            Duration::from_secs(wait),
            versions.wait_for(|version| *version > known),
        )
        .await;
        if !matches!(changed, Ok(Ok(_))) {
            return reply(StatusCode::NOT_MODIFIED, Bytes::new());
        }
        let body = shared.lock().config_body.clone();
        return reply(StatusCode::OK, Bytes::from(body));
    }
    if request.method() == Method::GET
        && let Some(sha256) = path.strip_prefix("/v1/policies/")
    {
        let mut state = shared.lock();
        state.policy_requests.push(sha256.to_string());
        if state.policy_failures_left > 0 {
            state.policy_failures_left -= 1;
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from(json!({"error": "unavailable on purpose"}).to_string()),
            );
        }
        return match state.policies.get(sha256) {
            Some(bytes) => reply(StatusCode::OK, Bytes::from(bytes.clone())),
            None => reply(
                StatusCode::NOT_FOUND,
                Bytes::from(json!({"error": "policy not found"}).to_string()),
            ),
        };
    }
    if request.method() == Method::POST && path == "/v1/events" {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let batch: EventBatch = serde_json::from_slice(&body).unwrap();
        let mut state = shared.lock();
        if state.events_mode == EventsMode::Reject {
            state.failed_batches += 1;
            return reply(
                StatusCode::BAD_REQUEST,
                Bytes::from(
                    json!({"error": {"message": "event 0: invalid quality 2"}}).to_string(),
                ),
            );
        }
        if state.events_mode == EventsMode::Fail {
            state.failed_batches += 1;
            if state.failed_batches.is_multiple_of(2) {
                return Err(std::io::Error::other("closing the connection on purpose"));
            }
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from(json!({"error": "unavailable on purpose"}).to_string()),
            );
        }
        for event in batch.events {
            *state
                .received
                .entry(event.decision.decision_id)
                .or_default() += 1;
        }
        return reply(StatusCode::OK, Bytes::from("{}"));
    }
    reply(StatusCode::NOT_FOUND, Bytes::new())
}

/// A sidecar that took its first configuration from the mock and follows it, sending events
/// to its `/v1/events`. Dropping it aborts its server and follower without waiting for the
/// event sender, which may be inside a long backoff.
struct FollowingSidecar {
    base: String,
    sidecar: Arc<Sidecar>,
    server: JoinHandle<std::io::Result<()>>,
    follower: JoinHandle<()>,
    _stop: oneshot::Sender<()>,
}

impl Drop for FollowingSidecar {
    fn drop(&mut self) {
        self.server.abort();
        self.follower.abort();
    }
}

impl FollowingSidecar {
    /// Starts a sidecar for the mock at `control`, with routing when `encoder` is set.
    async fn start(control: &str, encoder: Option<Encoder>, options: SidecarOptions) -> Self {
        logs();
        let client = ControlClient::new(control, ROUTE);
        let digest = encoder
            .as_ref()
            .map(|e| e.digest().to_string())
            .unwrap_or_default();
        let (first_environment, environment) = if encoder.is_some() {
            let library = assets().onnx_runtime;
            (
                Some(init_onnx_runtime(&library).unwrap()),
                Some(init_onnx_runtime(&library).unwrap()),
            )
        } else {
            (None, None)
        };
        let first = tokio::time::timeout(
            STEP_TIMEOUT,
            client.first_state(first_environment.as_ref(), &digest, std::future::pending()),
        )
        .await
        .expect("timed out waiting for the first configuration from the mock")
        .expect("first_state stopped without a configuration");

        let options = SidecarOptions {
            sink: EventSink::Http {
                url: client.base().to_string(),
                client: client.http_client(),
            },
            ..options
        };
        let (sidecar, events) = Sidecar::new(first, encoder, options);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(llmroute_sidecar::serve(
            listener,
            sidecar.clone(),
            events,
            async {
                let _ = stopped.await;
            },
        ));
        let follower = tokio::spawn(llmroute_sidecar::follow(
            sidecar.clone(),
            client,
            environment,
            std::future::pending(),
        ));
        Self {
            base,
            sidecar,
            server,
            follower,
            _stop: stop,
        }
    }

    /// Sends a chat request for `model`, asserts a 200, and returns the decision id and the
    /// policy version header (empty when no policy decided).
    async fn chat(&self, model: &str, prompt: &str) -> (String, String) {
        let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
        let reply = post_json(&format!("{}/v1/chat/completions", self.base), &[], &body).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        (
            reply.header("x-llmroute-decision-id").unwrap(),
            reply
                .header("x-llmroute-policy-version")
                .unwrap_or_default(),
        )
    }

    /// Posts feedback for `decision_id`, which sends its event to the queue at once.
    async fn feedback(&self, decision_id: &str) {
        let reply = post_json(
            &format!("{}/v1/feedback", self.base),
            &[],
            &json!({"decision_id": decision_id, "score": 0.5}),
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }

    /// Reads one sample of the sidecar's `/metrics`, by metric name and labels as written
    /// there. Returns 0 when the series does not exist yet.
    async fn metric(&self, series: &str) -> f64 {
        let reply = common::send(Method::GET, &format!("{}/metrics", self.base), &[], "").await;
        assert_eq!(reply.status, 200);
        let text = String::from_utf8(reply.body.to_vec()).unwrap();
        let prefix = format!("{series} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map(|value| value.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

/// Starts replay-llm for the data set's models and returns the data set, a route over those
/// models without a policy, and the server.
async fn upstream() -> (RoutingDataset, SidecarConfig, Running) {
    let dataset = load(DATASET).unwrap();
    let (replay, server) = start_replay(&dataset, Faults::none()).await;
    let config = route_config(&dataset, &replay);
    (dataset, config, server)
}

/// Settings that post events in small batches and retry quickly.
fn quick_batches() -> BatchSettings {
    BatchSettings {
        max_events: 4,
        interval: Duration::from_millis(20),
        attempts: 16,
        first_backoff: Duration::from_millis(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_config_serves_while_control_away() {
    let (dataset, mut config, replay) = upstream().await;
    let encoder = Encoder::load(&assets(), 1).unwrap();
    let mut mock = MockControl::start().await;
    let first_sha = mock.publish_policy(policy_bytes(
        &dataset.models,
        encoder.digest(),
        "test-v1",
        5,
    ));
    config.stable = Some(PolicyRef {
        version: "test-v1".to_string(),
        sha256: first_sha,
    });
    mock.set_config(&config);
    let sidecar =
        FollowingSidecar::start(&mock.base(), Some(encoder), SidecarOptions::default()).await;
    let prompts = &dataset.test.prompts;
    let (_, policy) = sidecar.chat(ROUTE, &prompts[0]).await;
    assert_eq!(policy, "test-v1");
    // The follower waits in a long poll before the mock goes away.
    assert!(
        mock.wait_for(|s| s.polled_versions.contains(&1)).await,
        "the sidecar never long-polled for a version above 1"
    );

    mock.stop().await;
    let base = mock.base();
    assert!(
        wait_until(|| logs().count(POLL_FAILED, "control", &base) >= 2).await,
        "the sidecar logged fewer than 2 failed polls after the control API went away"
    );
    for prompt in &prompts[1..4] {
        let (_, policy) = sidecar.chat(ROUTE, prompt).await;
        assert_eq!(policy, "test-v1");
    }
    assert_eq!(sidecar.sidecar.state().config.version, 1);
    assert!(sidecar.sidecar.is_ready());

    let second_sha = mock.publish_policy(policy_bytes(
        &dataset.models,
        sidecar.sidecar.encoder_digest(),
        "test-v2",
        6,
    ));
    config.version = 2;
    config.stable = Some(PolicyRef {
        version: "test-v2".to_string(),
        sha256: second_sha.clone(),
    });
    mock.set_config(&config);
    mock.restart().await;
    assert!(
        wait_until(|| sidecar.sidecar.state().config.version == 2).await,
        "the sidecar did not take configuration 2 after the control API came back"
    );
    assert!(mock.shared.lock().policy_requests.contains(&second_sha));
    let (_, policy) = sidecar.chat(ROUTE, &prompts[4]).await;
    assert_eq!(policy, "test-v2");

    drop(sidecar);
    replay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configs_keep_previous() {
    let (dataset, mut config, replay) = upstream().await;
    let encoder = Encoder::load(&assets(), 1).unwrap();
    let digest = encoder.digest().to_string();
    let mock = MockControl::start().await;
    let first_sha = mock.publish_policy(policy_bytes(&dataset.models, &digest, "test-v1", 5));
    let second_bytes = policy_bytes(&dataset.models, &digest, "test-v2", 6);
    let second_sha = hex_sha256(&second_bytes);
    config.stable = Some(PolicyRef {
        version: "test-v1".to_string(),
        sha256: first_sha,
    });
    mock.set_config(&config);
    let sidecar =
        FollowingSidecar::start(&mock.base(), Some(encoder), SidecarOptions::default()).await;
    let prompts = &dataset.test.prompts;

    let unknown_fallback = {
        let mut c = config.clone();
        c.version = 2;
        c.fallback = "no-such-model".to_string();
        c
    };
    let missing_policy = {
        let mut c = config.clone();
        c.version = 3;
        c.stable = Some(PolicyRef {
            version: "test-missing".to_string(),
            sha256: hex_sha256(b"never published"),
        });
        c
    };
    // The mock serves other bytes under test-v2's sha256 until the last step.
    mock.shared
        .lock()
        .policies
        .insert(second_sha.clone(), b"not an ONNX policy".to_vec());
    let corrupt_policy = {
        let mut c = config.clone();
        c.version = 4;
        c.stable = Some(PolicyRef {
            version: "test-v2".to_string(),
            sha256: second_sha.clone(),
        });
        c
    };
    let cases = [
        ("fallback not in models", unknown_fallback),
        ("policy not found", missing_policy),
        ("policy bytes do not match sha256", corrupt_policy),
    ];
    for (index, (name, invalid)) in cases.iter().enumerate() {
        let version = invalid.version;
        mock.set_config(invalid);
        // The next poll names the rejected version, so the sidecar has finished with it.
        assert!(
            mock.wait_for(|s| s.polled_versions.contains(&version))
                .await,
            "{name}: the sidecar did not poll after configuration {version}"
        );
        assert_eq!(
            logs().count(CONFIG_REJECTED, "config_version", &version.to_string()),
            1,
            "{name}: the rejection of configuration {version} was not logged once"
        );
        assert_eq!(
            sidecar.sidecar.state().config.version,
            1,
            "{name}: the sidecar left configuration 1"
        );
        let (_, policy) = sidecar.chat(ROUTE, &prompts[index]).await;
        assert_eq!(
            policy, "test-v1",
            "{name}: a request was not routed by test-v1"
        );
    }
    let requested = mock.shared.lock().policy_requests.clone();
    assert!(requested.contains(&hex_sha256(b"never published")));
    assert!(requested.contains(&second_sha));

    // A valid configuration after the rejected ones still gets through.
    mock.shared
        .lock()
        .policies
        .insert(second_sha.clone(), second_bytes);
    config.version = 5;
    config.stable = Some(PolicyRef {
        version: "test-v2".to_string(),
        sha256: second_sha,
    });
    mock.set_config(&config);
    assert!(
        wait_until(|| sidecar.sidecar.state().config.version == 5).await,
        "the sidecar did not take configuration 5 after rejecting 2 to 4"
    );
    let (_, policy) = sidecar.chat(ROUTE, &prompts[3]).await;
    assert_eq!(policy, "test-v2");

    drop(sidecar);
    replay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_fetch_503_is_retried() {
    let (dataset, mut config, replay) = upstream().await;
    let encoder = Encoder::load(&assets(), 1).unwrap();
    let digest = encoder.digest().to_string();
    let mock = MockControl::start().await;
    let first_sha = mock.publish_policy(policy_bytes(&dataset.models, &digest, "test-v1", 5));
    config.stable = Some(PolicyRef {
        version: "test-v1".to_string(),
        sha256: first_sha,
    });
    mock.set_config(&config);
    let sidecar =
        FollowingSidecar::start(&mock.base(), Some(encoder), SidecarOptions::default()).await;

    // A 503 is not a verdict on configuration 2, so the sidecar fetches it again.
    let second_sha = mock.publish_policy(policy_bytes(&dataset.models, &digest, "test-v2", 6));
    mock.shared.lock().policy_failures_left = 1;
    config.version = 2;
    config.stable = Some(PolicyRef {
        version: "test-v2".to_string(),
        sha256: second_sha.clone(),
    });
    mock.set_config(&config);
    assert!(
        wait_until(|| sidecar.sidecar.state().config.version == 2).await,
        "the sidecar did not take configuration 2 after one failed policy fetch"
    );
    let fetches = mock
        .shared
        .lock()
        .policy_requests
        .iter()
        .filter(|sha| **sha == second_sha)
        .count();
    assert_eq!(fetches, 2);
    let (_, policy) = sidecar.chat(ROUTE, &dataset.test.prompts[0]).await;
    assert_eq!(policy, "test-v2");

    drop(sidecar);
    replay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_event_batches_are_retried() {
    let (dataset, config, replay) = upstream().await;
    let mock = MockControl::start().await;
    mock.set_config(&config);
    mock.set_events_mode(EventsMode::Fail);
    let options = SidecarOptions {
        batch: quick_batches(),
        ..SidecarOptions::default()
    };
    let sidecar = FollowingSidecar::start(&mock.base(), None, options).await;
    let prompts = &dataset.test.prompts;
    let mut ids = Vec::new();

    // Six requests, then six more after at least three batches failed, so that requests run
    // while the control plane rejects every batch.
    for prompt in &prompts[..6] {
        let (id, _) = sidecar.chat(ROUTE, prompt).await;
        sidecar.feedback(&id).await;
        ids.push(id);
    }
    assert!(
        mock.wait_for(|s| s.failed_batches >= 3).await,
        "the sidecar sent fewer than 3 batches to a failing control plane, so it did not retry"
    );
    for prompt in &prompts[6..12] {
        let (id, _) = sidecar.chat(ROUTE, prompt).await;
        sidecar.feedback(&id).await;
        ids.push(id);
    }
    assert_eq!(mock.shared.lock().events_mode, EventsMode::Fail);
    assert!(mock.shared.lock().received.is_empty());

    mock.set_events_mode(EventsMode::Accept);
    assert!(
        mock.wait_for(|s| ids.iter().all(|id| s.received.contains_key(id)))
            .await,
        "not every event reached the control plane"
    );
    let received = mock.shared.lock().received.clone();
    assert_eq!(received.len(), ids.len(), "unexpected events: {received:?}");
    for id in &ids {
        assert_eq!(received[id], 1, "event {id} was accepted more than once");
    }
    let route = format!("route=\"{ROUTE}\"");
    assert_eq!(sidecar.metric("llmroute_events_sent_total").await, 12.0);
    for reason in ["queue_full", "sink_failed"] {
        let series = format!("llmroute_events_dropped_total{{{route},reason=\"{reason}\"}}");
        assert_eq!(sidecar.metric(&series).await, 0.0, "{series}");
    }

    drop(sidecar);
    replay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_event_batch_is_not_retried() {
    let (dataset, config, replay) = upstream().await;
    let mock = MockControl::start().await;
    mock.set_config(&config);
    mock.set_events_mode(EventsMode::Reject);
    let options = SidecarOptions {
        batch: BatchSettings {
            max_events: 1,
            interval: Duration::from_millis(20),
            attempts: 5,
            first_backoff: Duration::from_millis(20),
        },
        ..SidecarOptions::default()
    };
    let sidecar = FollowingSidecar::start(&mock.base(), None, options).await;

    let (id, _) = sidecar.chat(ROUTE, &dataset.test.prompts[0]).await;
    sidecar.feedback(&id).await;
    let route = format!("route=\"{ROUTE}\"");
    let rejected = format!("llmroute_events_dropped_total{{{route},reason=\"rejected\"}}");
    let mut dropped = 0.0;
    for _ in 0..100 {
        dropped = sidecar.metric(&rejected).await;
        if dropped > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dropped, 1.0, "{rejected}");
    // Five attempts with 20 ms backoffs would have finished by now.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(mock.shared.lock().failed_batches, 1);
    let failed = format!("llmroute_events_dropped_total{{{route},reason=\"sink_failed\"}}");
    assert_eq!(sidecar.metric(&failed).await, 0.0);

    drop(sidecar);
    replay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_event_queue_counts_drops() {
    let (dataset, config, replay) = upstream().await;
    let mock = MockControl::start().await;
    mock.set_config(&config);
    mock.set_events_mode(EventsMode::Fail);
    // One retry after 10 minutes keeps the sender on the first batch for the whole test.
    let options = SidecarOptions {
        event_queue_capacity: 1,
        batch: BatchSettings {
            max_events: 1,
            interval: Duration::from_millis(20),
            attempts: 2,
            first_backoff: Duration::from_secs(600),
        },
        ..SidecarOptions::default()
    };
    let sidecar = FollowingSidecar::start(&mock.base(), None, options).await;
    let prompts = &dataset.test.prompts;

    let (id, _) = sidecar.chat(ROUTE, &prompts[0]).await;
    sidecar.feedback(&id).await;
    assert!(
        mock.wait_for(|s| s.failed_batches == 1).await,
        "the sidecar did not send its first batch"
    );

    // The first of these fills the queue, and every later one overflows it.
    let overflowing = 8;
    for prompt in &prompts[1..=overflowing] {
        let (id, _) = sidecar.chat(ROUTE, prompt).await;
        sidecar.feedback(&id).await;
    }
    let route = format!("route=\"{ROUTE}\"");
    let full = format!("llmroute_events_dropped_total{{{route},reason=\"queue_full\"}}");
    assert_eq!(sidecar.metric(&full).await, (overflowing - 1) as f64);
    assert_eq!(sidecar.metric("llmroute_events_sent_total").await, 0.0);
    assert_eq!(mock.shared.lock().failed_batches, 1);
    assert!(mock.shared.lock().received.is_empty());

    drop(sidecar);
    replay.stop().await;
}
