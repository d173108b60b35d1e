//! The control API over HTTP on 127.0.0.1: long-polled configurations that follow the route
//! files, policy artifacts by digest, event ingestion, and versions kept across restarts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmroute_api::{
    CompletedEvent, DecisionRecord, EventBatch, Outcome, Preference, SidecarConfig,
};
use llmroute_control::{ControlPlane, Store, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const ROUTE: &str = r#"apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata:
  name: chat
spec:
  models:
    - name: small
      endpoint: http://127.0.0.1:9/m/small/v1
      model: small-1
      pricing: {inputUsdPerMillionTokens: 0.1, outputUsdPerMillionTokens: 0.2}
    - name: large
      endpoint: http://127.0.0.1:9/m/large/v1
      model: large-1
      pricing: {inputUsdPerMillionTokens: 1, outputUsdPerMillionTokens: 4}
  defaultPreference: {quality: 0.7}
  fallback: small
"#;

async fn request(method: Method, url: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

fn event(id: &str) -> CompletedEvent {
    CompletedEvent {
        decision: DecisionRecord {
            decision_id: id.to_string(),
            route: "chat".into(),
            config_version: 1,
            model: "small".into(),
            routed: true,
            preference: Preference::from_quality(0.5).unwrap(),
            policy_version: Some("v1".into()),
            propensity: Some(0.9),
        },
        served_model: "small".into(),
        embedding: vec![0.5; 384],
        quality: Some(0.25),
        cost_usd: Some(1e-5),
        prompt_tokens: Some(10),
        completion_tokens: Some(20),
        latency_ms: 12.5,
        outcome: Outcome::Success,
        attempts: 1,
        timestamp_ms: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_serves_routes() {
    let routes = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let route_file = routes.path().join("chat.yaml");
    std::fs::write(&route_file, ROUTE).unwrap();
    let store = Arc::new(Store::open(state.path()).unwrap());
    let (plane, report) = ControlPlane::new(routes.path(), store);
    assert_eq!(report.changed, vec!["chat".to_string()]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, plane.clone(), async {
        let _ = stopped.await;
    }));

    let config_url = format!("{base}/v1/routes/chat/config");
    let (status, body) = request(Method::GET, &config_url, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let config: SidecarConfig = serde_json::from_slice(&body).unwrap();
    assert_eq!(config.version, 1);
    assert_eq!(config.stable, None);

    // Nothing changes within the wait: 304.
    let (status, _) = request(
        Method::GET,
        &format!("{config_url}?version=1&waitSeconds=1"),
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);

    // A long poll returns as soon as a policy is published.
    let long_poll_url = format!("{config_url}?version=1&waitSeconds=30");
    let waiting = tokio::spawn(async move { request(Method::GET, &long_poll_url, vec![]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let policy_bytes = b"policy bytes".to_vec();
    let published = plane.publish_policy("chat", "v1", &policy_bytes).unwrap();
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let config: SidecarConfig = serde_json::from_slice(&body).unwrap();
    assert_eq!(config.version, 2);
    assert_eq!(config.stable.as_ref(), Some(&published));

    let (status, body) = request(
        Method::GET,
        &format!("{base}/v1/policies/{}", published.sha256),
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), policy_bytes.as_slice());
    let (status, _) = request(
        Method::GET,
        &format!("{base}/v1/policies/{}", "0".repeat(64)),
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = request(
        Method::GET,
        &format!("{base}/v1/policies/../../etc"),
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // An edited file gives a new version; a broken one keeps the last good configuration.
    std::fs::write(&route_file, ROUTE.replace("quality: 0.7", "quality: 0.4")).unwrap();
    let report = plane.reload();
    assert_eq!(report.changed, vec!["chat".to_string()]);
    std::fs::write(
        &route_file,
        ROUTE.replace("fallback: small", "fallback: medium"),
    )
    .unwrap();
    let report = plane.reload();
    assert!(report.changed.is_empty());
    assert!(
        report.errors[0].contains("\"medium\""),
        "{:?}",
        report.errors
    );
    let (_, body) = request(Method::GET, &config_url, vec![]).await;
    let config: SidecarConfig = serde_json::from_slice(&body).unwrap();
    assert_eq!(config.version, 3);
    assert!((config.default_preference.quality - 0.4).abs() < 1e-12);

    // Events are stored once per decision id, even when a batch is sent again.
    let batch = EventBatch {
        route: "chat".into(),
        sidecar: "pod-1".into(),
        events: vec![event(&"a".repeat(32)), event(&"b".repeat(32))],
    };
    let body = serde_json::to_vec(&batch).unwrap();
    let (status, reply) = request(Method::POST, &format!("{base}/v1/events"), body.clone()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let (_, reply) = request(Method::POST, &format!("{base}/v1/events"), body).await;
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["stored"], 0);
    assert_eq!(reply["duplicates"], 2);
    assert_eq!(plane.store().count_events("chat").unwrap(), 2);
    assert_eq!(plane.store().events("chat").unwrap()[1], batch.events[1]);

    let mut other = batch.clone();
    other.route = "other".into();
    let (status, _) = request(
        Method::POST,
        &format!("{base}/v1/events"),
        serde_json::to_vec(&other).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = request(Method::POST, &format!("{base}/v1/events"), b"{".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = request(
        Method::GET,
        &format!("{base}/v1/routes/none/config"),
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();

    // A restart on the same state keeps the version instead of starting again at 1.
    std::fs::write(&route_file, ROUTE.replace("quality: 0.7", "quality: 0.4")).unwrap();
    let store = Arc::new(Store::open(state.path()).unwrap());
    let (plane, _) = ControlPlane::new(routes.path(), store);
    let receiver = plane.subscribe("chat").unwrap();
    assert_eq!(receiver.borrow().version, 3);
    assert_eq!(plane.store().count_events("chat").unwrap(), 2);
}

/// The retention task keeps the store within its size limit between the runs of the age and
/// count limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_store_within_size_limit() {
    use llmroute_control::server::{RetentionSettings, StoreSizeLimit, run_retention};

    let routes = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(routes.path().join("chat.yaml"), ROUTE).unwrap();
    let store = Arc::new(Store::open(state.path()).unwrap());
    let (plane, _) = ControlPlane::new(routes.path(), store.clone());
    // About 2.1 KB each: 10,000 events take more than 16 MiB.
    let events: Vec<CompletedEvent> = (0..10_000).map(|n| event(&format!("{n:032x}"))).collect();
    store.insert_events("chat", "pod", &events).unwrap();
    let limit = 16 << 20;
    assert!(store.used_bytes().unwrap() > limit);

    let settings = RetentionSettings {
        max_age: None,
        max_events: None,
        interval: Duration::from_secs(3600),
        max_store: StoreSizeLimit::Bytes(limit),
        size_interval: Duration::from_millis(100),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let retention = tokio::spawn(run_retention(plane, settings, async {
        let _ = stopped.await;
    }));
    let mut used = store.used_bytes().unwrap();
    for _ in 0..300 {
        if used <= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        used = store.used_bytes().unwrap();
    }
    stop.send(()).unwrap();
    retention.await.unwrap();
    assert!(used <= limit, "{used} bytes used, limit {limit}");
    let kept = store.events("chat").unwrap();
    assert!(!kept.is_empty());
    assert_eq!(kept.last(), events.last(), "the newest events are kept");
}

/// A follower's store copies the leader's events page by page, keeps its place across pulls,
/// and gets nothing without the replicas' token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_copies_leader_events() {
    use llmroute_control::auth::StaticTokenAuthenticator;
    use llmroute_control::replication::{PullError, Puller, REPLICATION_PATH};
    use llmroute_control::server::{ServerOptions, serve_with};

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    let routes = tempfile::tempdir().unwrap();
    std::fs::write(routes.path().join("chat.yaml"), ROUTE).unwrap();
    let (leader_state, follower_state) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let leader_store = Arc::new(Store::open(leader_state.path()).unwrap());
    let follower_store = Arc::new(Store::open(follower_state.path()).unwrap());
    assert_ne!(leader_store.id().unwrap(), follower_store.id().unwrap());
    let (leader, _) = ControlPlane::new(routes.path(), leader_store.clone());
    let (follower, _) = ControlPlane::new(routes.path(), follower_store.clone());
    // More than two pages of 256.
    let first: Vec<CompletedEvent> = (0..600).map(|n| event(&format!("{n:032x}"))).collect();
    leader_store.insert_events("chat", "pod-a", &first).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let options = ServerOptions {
        replication: Some(Arc::new(StaticTokenAuthenticator::new(TOKEN).unwrap())),
        ..ServerOptions::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve_with(listener, leader.clone(), options, async {
        let _ = stopped.await;
    }));

    let wrong = Puller::new("fedcba9876543210fedcba9876543210")
        .pull(&address, follower.clone())
        .await;
    match wrong {
        Err(PullError::Status { status, .. }) => assert_eq!(status, StatusCode::UNAUTHORIZED),
        other => panic!("expected 401, got {other:?}"),
    }
    let (status, _) = request(
        Method::GET,
        &format!("http://{address}{REPLICATION_PATH}"),
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");

    let puller = Puller::new(TOKEN);
    let report = puller.pull(&address, follower.clone()).await.unwrap();
    assert_eq!(report.source, leader_store.id().unwrap());
    assert_eq!((report.read, report.stored), (600, 600));
    assert!(report.caught_up);
    assert_eq!(follower_store.events("chat").unwrap(), first);
    let copied = follower_store.events_after(0, 1).unwrap().remove(0);
    let original = leader_store.events_after(0, 1).unwrap().remove(0);
    assert_eq!(copied.sidecar, "pod-a");
    assert_eq!(
        copied.received_ms, original.received_ms,
        "reception time kept"
    );

    // The next pull starts at the cursor: only the new events.
    let second: Vec<CompletedEvent> = (600..610).map(|n| event(&format!("{n:032x}"))).collect();
    leader_store
        .insert_events("chat", "pod-b", &second)
        .unwrap();
    let report = puller.pull(&address, follower.clone()).await.unwrap();
    assert_eq!((report.read, report.stored), (10, 10));
    assert_eq!(follower_store.count_events("chat").unwrap(), 610);
    let report = puller.pull(&address, follower.clone()).await.unwrap();
    assert_eq!((report.read, report.stored), (0, 0));

    // Deleting the newest events renews the leader's store id, so the ids that SQLite hands
    // out again still reach the follower.
    leader_store.delete_route("chat").unwrap();
    let third: Vec<CompletedEvent> = (700..705).map(|n| event(&format!("{n:032x}"))).collect();
    leader_store.insert_events("chat", "pod-c", &third).unwrap();
    let report = puller.pull(&address, follower.clone()).await.unwrap();
    assert_eq!((report.read, report.stored), (5, 5));
    assert_eq!(follower_store.count_events("chat").unwrap(), 615);

    // A store that serves itself copies nothing.
    let report = puller.pull(&address, leader.clone()).await.unwrap();
    assert_eq!((report.read, report.stored), (0, 0));

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();

    // Without a token the endpoint is off.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, leader, async {
        let _ = stopped.await;
    }));
    match puller.pull(&address, follower).await {
        Err(PullError::Status { status, .. }) => assert_eq!(status, StatusCode::NOT_FOUND),
        other => panic!("expected 404, got {other:?}"),
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
