//! The admin listener: health, readiness and metrics for the kubelet and Prometheus, and
//! nothing that reaches a model.

mod common;

use common::{Harness, ROUTE, Setup, post_json, send};
use http::Method;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_health_readiness_and_metrics() {
    let harness = Harness::start(Setup::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    let (publish, target) = watch::channel(None);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(llmroute_sidecar::serve_admin(listener, target, async {
        let _ = stopped.await;
    }));
    let get = |path: &str| {
        let url = format!("{admin}{path}");
        async move { send(Method::GET, &url, &[], "").await }
    };

    // Before the first configuration: alive, not ready, no metrics yet.
    assert_eq!(get("/healthz").await.status, 200);
    let ready = get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body, "no route configuration yet\n");
    assert_eq!(get("/metrics").await.status, 503);

    publish.send_replace(Some(harness.sidecar.clone()));
    assert_eq!(get("/readyz").await.status, 200);

    // A request through the proxy shows up in the admin listener's metrics.
    let prompt = harness.dataset.test.prompts[0].clone();
    let reply = post_json(
        &format!("{}/v1/chat/completions", harness.base),
        &[],
        &json!({"model": ROUTE, "messages": [{"role": "user", "content": prompt}]}),
    )
    .await;
    assert_eq!(reply.status, 200);
    let metrics = get("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type").as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    let proxy_metrics = send(Method::GET, &format!("{}/metrics", harness.base), &[], "").await;
    assert_eq!(text, String::from_utf8_lossy(&proxy_metrics.body));
    assert!(text.contains(&format!("route=\"{ROUTE}\"")), "{text}");

    // The admin listener neither proxies nor takes feedback.
    let proxied = post_json(
        &format!("{admin}/v1/chat/completions"),
        &[],
        &json!({"model": ROUTE, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(proxied.status, 404);
    let message = String::from_utf8_lossy(&proxied.body).into_owned();
    assert!(
        message.contains("this port serves GET /healthz, /readyz and /metrics"),
        "{message}"
    );
    assert_eq!(
        send(Method::GET, &format!("{admin}/v1/models"), &[], "")
            .await
            .status,
        404
    );
    let posted = send(Method::POST, &format!("{admin}/metrics"), &[], "").await;
    assert_eq!(posted.status, 405);
    assert_eq!(
        posted.body,
        "method POST is not allowed on /metrics; use GET\n"
    );

    // While draining, both listeners report not ready and the proxy still serves.
    harness.sidecar.start_draining();
    for base in [&admin, &harness.base] {
        let ready = send(Method::GET, &format!("{base}/readyz"), &[], "").await;
        assert_eq!(ready.status, 503, "{base}");
        assert_eq!(ready.body, "the sidecar is shutting down\n");
    }
    let models = send(Method::GET, &format!("{}/v1/models", harness.base), &[], "").await;
    assert_eq!(models.status, 200);

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_wildcard_serves_both_families() {
    let listener = llmroute_api::listen::bind("[::]:0".parse().unwrap()).unwrap();
    let bound = listener.local_addr().unwrap();
    let (_publish, target) = watch::channel(None);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(llmroute_sidecar::serve_admin(listener, target, async {
        let _ = stopped.await;
    }));
    let mut urls = vec![format!("http://127.0.0.1:{}/healthz", bound.port())];
    // A host without IPv6 gets 0.0.0.0 instead, and then only IPv4 can be checked.
    if bound.is_ipv6() {
        urls.push(format!("http://[::1]:{}/healthz", bound.port()));
    }
    for url in &urls {
        let reply = send(Method::GET, url, &[], "").await;
        assert_eq!(reply.status, 200, "{url}");
    }
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
