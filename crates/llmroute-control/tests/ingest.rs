//! Event ingestion over HTTP: authentication, namespace checks, field-by-field validation,
//! duplicates, and the rejection counters on `/metrics`. Route keys are namespaced
//! (`<namespace>/<name>`) as the operator serves them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmroute_api::SidecarConfig;
use llmroute_control::auth::{AuthError, AuthFuture, Authenticator, Identity};
use llmroute_control::server::{ServerOptions, serve_with};
use llmroute_control::store::Store;
use llmroute_control::{ControlBackend, EventDestination};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

const ROUTE: &str = "team-a/chat";
const OTHER_ROUTE: &str = "team-b/chat";
const DIM: usize = 384;
const MAX_EVENTS: usize = 8;

/// Two namespaced routes and a store, like the operator's backend.
struct TestBackend {
    routes: HashMap<String, watch::Sender<Arc<SidecarConfig>>>,
    store: Store,
    destination: std::sync::Mutex<EventDestination>,
}

impl ControlBackend for TestBackend {
    fn subscribe(&self, route: &str) -> Option<watch::Receiver<Arc<SidecarConfig>>> {
        self.routes.get(route).map(watch::Sender::subscribe)
    }

    fn route_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.routes.keys().cloned().collect();
        names.sort();
        names
    }

    fn policy(&self, _sha256: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn event_destination(&self) -> EventDestination {
        self.destination.lock().unwrap().clone()
    }
}

fn config(route: &str) -> SidecarConfig {
    serde_json::from_value(json!({
        "route": route,
        "version": 1,
        "models": [
            {"name": "small", "endpoint": "http://127.0.0.1:9/v1", "upstreamModel": "s",
             "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.2}},
            {"name": "large", "endpoint": "http://127.0.0.1:9/v1", "upstreamModel": "l",
             "pricing": {"inputUsdPerMillionTokens": 1.0, "outputUsdPerMillionTokens": 4.0}}
        ],
        "defaultPreference": {"quality": 0.5},
        "fallback": "small"
    }))
    .unwrap()
}

/// Accepts `token-a` for namespace team-a, returns the audience error for `other-audience`
/// and rejects every other token.
struct FakeReview;

impl Authenticator for FakeReview {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        let result = match token {
            "token-a" => Ok(Identity {
                namespace: Some("team-a".into()),
                name: "team-a/app".into(),
            }),
            "other-audience" => Err(AuthError::WrongAudience {
                expected: "llmroute.dev".into(),
                actual: vec!["other.example".into()],
            }),
            _ => Err(AuthError::Invalid("token not recognised".into())),
        };
        Box::pin(std::future::ready(result))
    }
}

struct Server {
    base: String,
    backend: Arc<TestBackend>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _state: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        let routes = [ROUTE, OTHER_ROUTE]
            .into_iter()
            .map(|r| (r.to_string(), watch::channel(Arc::new(config(r))).0))
            .collect();
        let backend = Arc::new(TestBackend {
            routes,
            store: Store::open(state.path()).unwrap(),
            destination: std::sync::Mutex::new(EventDestination::Local),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let options = ServerOptions {
            authenticator: Some(Arc::new(FakeReview)),
            embedding_dim: DIM,
            max_batch_events: MAX_EVENTS,
            replication: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(listener, backend.clone(), options, async {
            let _ = stopped.await;
        }));
        Self {
            base,
            backend,
            stop: Some(stop),
            task,
            _state: state,
        }
    }

    async fn post(&self, token: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
        self.post_with(token, &[], body).await
    }

    /// Posts a batch with extra `headers`.
    async fn post_with(
        &self,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/v1/events", self.base))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = client
            .request(request.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    /// Returns the value of the rejection counter with these labels, 0 when absent.
    async fn rejected(&self, reason: &str, field: &str) -> u64 {
        let text = self.metrics().await;
        let series = format!(
            "llmroute_control_event_batches_rejected_total{{reason=\"{reason}\",field=\"{field}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .map(|value| value.trim().parse().unwrap())
            .unwrap_or(0)
    }

    async fn metrics(&self) -> String {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let response = client
            .get(format!("{}/metrics", self.base).parse().unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn route_to(&self, destination: EventDestination) {
        *self.backend.destination.lock().unwrap() = destination;
    }

    fn stored(&self) -> u64 {
        self.backend.store.count_events(ROUTE).unwrap()
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        (&mut self.task).await.unwrap().unwrap();
    }
}

/// Builds a valid routed event of [`ROUTE`] with decision id `n` in hex.
fn event(n: u32) -> Value {
    json!({
        "decision": {
            "decisionId": format!("{n:032x}"),
            "route": ROUTE,
            "configVersion": 1,
            "model": "small",
            "routed": true,
            "preference": {"quality": 0.7, "cost": 0.3},
            "policyVersion": "v1",
            "propensity": 0.9
        },
        "servedModel": "small",
        "embedding": vec![0.05f32; DIM],
        "quality": 0.5,
        "costUsd": 0.001,
        "promptTokens": 10,
        "completionTokens": 20,
        "latencyMs": 12.5,
        "outcome": {"kind": "success"},
        "attempts": 1,
        "timestampMs": 1_700_000_000_000u64
    })
}

fn batch(route: &str, events: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"route": route, "sidecar": "pod-1", "events": events})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_accepts_and_skips_duplicates() {
    let server = Server::start().await;
    let body = batch(ROUTE, (1..=3).map(event).collect());
    let (status, reply) = server.post(Some("token-a"), body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["received"], 3);
    assert_eq!(reply["stored"], 3);
    assert_eq!(reply["duplicates"], 0);

    // The same batch again, and one that overlaps it by one event.
    let (status, reply) = server.post(Some("token-a"), body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["stored"], 0);
    assert_eq!(reply["duplicates"], 3);
    let (_, reply) = server
        .post(Some("token-a"), batch(ROUTE, vec![event(3), event(4)]))
        .await;
    assert_eq!(reply["stored"], 1);
    assert_eq!(reply["duplicates"], 1);

    let stored = server.backend.store.events(ROUTE).unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[0].embedding, vec![0.05f32; DIM]);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("llmroute_control_events_stored_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llmroute_control_events_duplicate_total 4"),
        "{metrics}"
    );
    server.stop().await;
}

/// One case of the rejection table: a token, a batch, and the expected response.
struct Case {
    name: &'static str,
    token: Option<&'static str>,
    body: Vec<u8>,
    status: StatusCode,
    reason: &'static str,
    field: &'static str,
    /// Texts the error message must contain (the index, the field, the value).
    message: Vec<String>,
}

/// Builds a batch of three valid events whose second event is changed at `pointer`.
fn invalid_event(
    name: &'static str,
    pointer: &str,
    value: Value,
    field: &'static str,
    shown: &str,
) -> Case {
    let mut events: Vec<Value> = (10..13).map(event).collect();
    *events[1].pointer_mut(pointer).unwrap() = value;
    Case {
        name,
        token: Some("token-a"),
        body: batch(ROUTE, events),
        status: StatusCode::BAD_REQUEST,
        reason: "invalid_event",
        field,
        message: vec!["event 1:".to_string(), format!("invalid {field} {shown}")],
    }
}

fn cases() -> Vec<Case> {
    let valid = || batch(ROUTE, vec![event(100)]);
    let mut not_routed = event(11);
    not_routed["decision"]["routed"] = json!(false);
    not_routed["decision"]["policyVersion"] = Value::Null;
    let mut unrouted_short = not_routed.clone();
    unrouted_short["decision"]["propensity"] = Value::Null;
    unrouted_short["embedding"] = json!(vec![0.1f32; 16]);
    vec![
        Case {
            name: "missing token",
            token: None,
            body: valid(),
            status: StatusCode::UNAUTHORIZED,
            reason: "missing_token",
            field: "",
            message: vec!["missing Authorization header".into()],
        },
        Case {
            name: "forged token",
            token: Some("forged"),
            body: valid(),
            status: StatusCode::UNAUTHORIZED,
            reason: "invalid_token",
            field: "",
            message: vec!["invalid token".into()],
        },
        Case {
            name: "wrong audience",
            token: Some("other-audience"),
            body: valid(),
            status: StatusCode::UNAUTHORIZED,
            reason: "wrong_audience",
            field: "",
            message: vec!["\"llmroute.dev\"".into()],
        },
        Case {
            name: "route of another namespace",
            token: Some("token-a"),
            body: batch(OTHER_ROUTE, vec![]),
            status: StatusCode::FORBIDDEN,
            reason: "forbidden_route",
            field: "",
            message: vec!["\"team-b/chat\"".into(), "\"team-a\"".into()],
        },
        Case {
            name: "unknown route",
            token: Some("token-a"),
            body: batch("team-a/none", vec![]),
            status: StatusCode::NOT_FOUND,
            reason: "unknown_route",
            field: "",
            message: vec!["\"team-a/none\"".into()],
        },
        Case {
            name: "oversized batch",
            token: Some("token-a"),
            body: batch(
                ROUTE,
                (200..200 + MAX_EVENTS as u32 + 1).map(event).collect(),
            ),
            status: StatusCode::PAYLOAD_TOO_LARGE,
            reason: "batch_size",
            field: "events",
            message: vec!["(9 events)".into(), "at most 8 events".into()],
        },
        Case {
            name: "malformed JSON",
            token: Some("token-a"),
            body: b"{\"route\": ".to_vec(),
            status: StatusCode::BAD_REQUEST,
            reason: "invalid_json",
            field: "",
            message: vec!["invalid event batch".into()],
        },
        invalid_event(
            "decision id",
            "/decision/decisionId",
            json!("XYZ"),
            "decision.decisionId",
            "\"XYZ\"",
        ),
        invalid_event(
            "event route",
            "/decision/route",
            json!(OTHER_ROUTE),
            "decision.route",
            "\"team-b/chat\"",
        ),
        invalid_event(
            "decision model",
            "/decision/model",
            json!("huge"),
            "decision.model",
            "\"huge\"",
        ),
        invalid_event(
            "served model",
            "/servedModel",
            json!("huge"),
            "servedModel",
            "\"huge\"",
        ),
        invalid_event(
            "embedding length",
            "/embedding",
            json!(vec![0.1f32; 383]),
            "embedding",
            "(383 values)",
        ),
        invalid_event(
            "empty embedding when routed",
            "/embedding",
            json!([]),
            "embedding",
            "[] (empty)",
        ),
        invalid_event(
            "zero propensity",
            "/decision/propensity",
            json!(0.0),
            "decision.propensity",
            "0",
        ),
        invalid_event(
            "propensity above 1",
            "/decision/propensity",
            json!(1.5),
            "decision.propensity",
            "1.5",
        ),
        invalid_event(
            "missing propensity when routed",
            "/decision/propensity",
            Value::Null,
            "decision.propensity",
            "null",
        ),
        invalid_event(
            "propensity when not routed",
            "",
            not_routed,
            "decision.propensity",
            "0.9",
        ),
        invalid_event("quality above 1", "/quality", json!(1.5), "quality", "1.5"),
        invalid_event(
            "negative quality",
            "/quality",
            json!(-0.1),
            "quality",
            "-0.1",
        ),
        invalid_event("negative cost", "/costUsd", json!(-1.0), "costUsd", "-1"),
        invalid_event(
            "negative latency",
            "/latencyMs",
            json!(-3.0),
            "latencyMs",
            "-3",
        ),
        Case {
            name: "short embedding of an unrouted event",
            token: Some("token-a"),
            body: batch(ROUTE, vec![unrouted_short, event(12)]),
            status: StatusCode::BAD_REQUEST,
            reason: "invalid_event",
            field: "embedding",
            message: vec!["event 0:".into(), "(16 values)".into(), "384 values".into()],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_rejects_and_counts() {
    let server = Server::start().await;
    for case in cases() {
        let before = server.rejected(case.reason, case.field).await;
        let (status, reply) = server.post(case.token, case.body).await;
        assert_eq!(status, case.status, "{}: {reply}", case.name);
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        for text in &case.message {
            assert!(
                message.contains(text.as_str()),
                "{}: message {message:?} lacks {text:?}",
                case.name
            );
        }
        let after = server.rejected(case.reason, case.field).await;
        assert_eq!(after, before + 1, "{}: counter not incremented", case.name);
    }
    assert_eq!(
        server.backend.store.count_events(ROUTE).unwrap(),
        0,
        "no event of a rejected batch is stored"
    );
    server.stop().await;
}

/// A replica that does not lead sends batches to the leader and returns its response; without
/// a reachable leader it responds 503 and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_forward_batches_to_the_leader() {
    let leader = Server::start().await;
    let follower = Server::start().await;
    let address = leader.base.trim_start_matches("http://").to_string();
    follower.route_to(EventDestination::Forward {
        leader: "replica-0".into(),
        address,
    });

    // The leader authenticates, checks and stores the batch; the follower keeps no copy.
    let body = batch(ROUTE, (1..=3).map(event).collect());
    let (status, reply) = follower.post(Some("token-a"), body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["stored"], 3);
    assert_eq!(leader.stored(), 3);
    assert_eq!(follower.stored(), 0);
    let (status, reply) = follower.post(Some("bad-token"), body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reply}");
    let metrics = follower.metrics().await;
    for series in [
        "llmroute_control_event_batches_forwarded_total{outcome=\"200\"} 1",
        "llmroute_control_event_batches_forwarded_total{outcome=\"401\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }

    // A batch that was forwarded once is not forwarded again.
    let forwarded = [(llmroute_control::server::FORWARDED_HEADER, "1")];
    let (status, reply) = follower
        .post_with(Some("token-a"), &forwarded, batch(ROUTE, vec![event(4)]))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert!(reply.to_string().contains("leader is replica-0"), "{reply}");

    // No reachable leader, or none at all: 503, so that the sidecar sends the batch again.
    follower.route_to(EventDestination::Forward {
        leader: "replica-0".into(),
        address: "127.0.0.1:1".into(),
    });
    let (status, reply) = follower
        .post(Some("token-a"), batch(ROUTE, vec![event(5)]))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert!(
        reply
            .to_string()
            .contains("failed to forward the event batch"),
        "{reply}"
    );
    follower.route_to(EventDestination::NoLeader);
    let (status, reply) = follower
        .post(Some("token-a"), batch(ROUTE, vec![event(6)]))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert!(reply.to_string().contains("no replica leads"), "{reply}");
    assert_eq!(leader.stored(), 3);
    assert_eq!(follower.stored(), 0);
    follower.stop().await;
    leader.stop().await;
}
