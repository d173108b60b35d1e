//! The control client's bearer token: sent on configuration, policy and event requests, read
//! again after the file is replaced (as the kubelet rotates projected tokens), and the last
//! good token kept while the file is missing.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use llmroute_api::EventBatch;
use llmroute_sidecar::{ControlClient, TokenFile};
use tokio::net::TcpListener;

/// `Authorization` header values (or `None`) of the requests, by path.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Starts a control API mock that records each request's Authorization header and responds 304 to
/// configuration requests, 404 to policy requests and 200 to event batches.
async fn start_mock() -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let recorder = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let recorder = recorder.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let header = request
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string());
                let path = request.uri().path().to_string();
                recorder.lock().unwrap().push((path.clone(), header));
                let status = if path.ends_with("/config") {
                    StatusCode::NOT_MODIFIED
                } else if path.starts_with("/v1/policies/") {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::OK
                };
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = status;
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (base, seen)
}

fn last(seen: &Seen) -> (String, Option<String>) {
    seen.lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a request arrived")
}

#[tokio::test]
async fn control_client_sends_rotated_token() {
    let (base, seen) = start_mock().await;
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("token");
    std::fs::write(&path, "first-token\n").unwrap();
    let client = ControlClient::new(&base, "ns/chat").with_token_file(TokenFile::new(&path));

    assert_eq!(client.fetch_config(1, 0).await.unwrap(), None);
    assert_eq!(
        last(&seen),
        (
            "/v1/routes/ns/chat/config".to_string(),
            Some("Bearer first-token".to_string())
        )
    );
    let batch = EventBatch {
        route: "ns/chat".into(),
        sidecar: "pod".into(),
        events: vec![],
    };
    client
        .post_events(&batch, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        last(&seen),
        (
            "/v1/events".to_string(),
            Some("Bearer first-token".to_string())
        )
    );

    // Replaced the way the kubelet does it: a new file renamed over the old one. The new
    // token has another length, so the change shows even where file times are coarse.
    let replacement = folder.path().join("token.new");
    std::fs::write(&replacement, "second-token-rotated").unwrap();
    std::fs::rename(&replacement, &path).unwrap();
    let error = client.fetch_policy(&"0".repeat(64)).await.unwrap_err();
    assert!(error.message.contains("404"), "{}", error.message);
    assert_eq!(
        last(&seen).1,
        Some("Bearer second-token-rotated".to_string())
    );

    // A missing file keeps the last good token.
    std::fs::remove_file(&path).unwrap();
    client.fetch_config(1, 0).await.unwrap();
    assert_eq!(
        last(&seen).1,
        Some("Bearer second-token-rotated".to_string())
    );

    // Without a token file, no header is sent.
    let anonymous = ControlClient::new(&base, "ns/chat");
    anonymous.fetch_config(1, 0).await.unwrap();
    assert_eq!(last(&seen).1, None);
}
