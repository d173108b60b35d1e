//! Malformed and hostile input against every endpoint of the sidecar: each case gets a clean
//! rejection with the expected status (and an OpenAI-style error where the sidecar writes the
//! body), and the sidecar keeps serving afterwards.

mod common;

use std::time::Duration;

use common::{Harness, ROUTE, Setup, send};
use http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request case: name, method, URL, headers, body, expected status, and the expected error
/// code (empty when any code is accepted).
type Case<'a> = (
    &'a str,
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    String,
    u16,
    &'a str,
);

/// Sends raw bytes on a new connection and returns the status line of the response.
async fn raw_status(base: &str, bytes: &[u8]) -> String {
    let address = base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(address).await.unwrap();
    // The server may reject and close before it has read everything, so a failed write is
    // part of some cases.
    let _ = stream.write_all(bytes).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_rejected() {
    let harness = Harness::start(Setup::default()).await;
    let chat = format!("{}/v1/chat/completions", harness.base);
    let completions = format!("{}/v1/completions", harness.base);
    let feedback = format!("{}/v1/feedback", harness.base);
    let embeddings = format!("{}/v1/embeddings", harness.base);
    let traversal = format!("{}/v1/../metrics", harness.base);
    let prompt = harness.dataset.test.prompts[0].clone();
    let good = json!({"model": ROUTE, "messages": [{"role": "user", "content": prompt}]});
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let deep_body = format!(r#"{{"model": "{ROUTE}", "messages": {deep}}}"#);
    let json_type = ("content-type", "application/json");

    let cases: Vec<Case> = vec![
        (
            "no content type",
            Method::POST,
            &chat,
            vec![],
            good.to_string(),
            415,
            "",
        ),
        (
            "text content type",
            Method::POST,
            &chat,
            vec![("content-type", "text/plain")],
            good.to_string(),
            415,
            "",
        ),
        (
            "invalid JSON",
            Method::POST,
            &chat,
            vec![json_type],
            "{\"model\": ".to_string(),
            400,
            "",
        ),
        (
            "JSON array body",
            Method::POST,
            &chat,
            vec![json_type],
            "[1, 2]".to_string(),
            400,
            "",
        ),
        (
            "JSON string body",
            Method::POST,
            &chat,
            vec![json_type],
            "\"hi\"".to_string(),
            400,
            "",
        ),
        (
            "empty body",
            Method::POST,
            &chat,
            vec![json_type],
            String::new(),
            400,
            "",
        ),
        (
            "invalid UTF-8",
            Method::POST,
            &chat,
            vec![json_type],
            String::from_utf8_lossy(b"{\"model\": \"\xff\"}").replace('\u{fffd}', "\\udc00"),
            400,
            "",
        ),
        (
            "deep nesting",
            Method::POST,
            &chat,
            vec![json_type],
            deep_body,
            400,
            "",
        ),
        (
            "missing model",
            Method::POST,
            &chat,
            vec![json_type],
            json!({"messages": []}).to_string(),
            400,
            "",
        ),
        (
            "model not a string",
            Method::POST,
            &chat,
            vec![json_type],
            json!({"model": 3}).to_string(),
            400,
            "",
        ),
        (
            "unknown model",
            Method::POST,
            &chat,
            vec![json_type],
            json!({"model": "gpt-4o", "messages": []}).to_string(),
            404,
            "model_not_found",
        ),
        (
            "no user message",
            Method::POST,
            &chat,
            vec![json_type],
            json!({"model": ROUTE, "messages": [{"role": "system", "content": "x"}]}).to_string(),
            400,
            "",
        ),
        (
            "messages not an array",
            Method::POST,
            &chat,
            vec![json_type],
            json!({"model": ROUTE, "messages": "hi"}).to_string(),
            400,
            "",
        ),
        (
            "completions without prompt",
            Method::POST,
            &completions,
            vec![json_type],
            json!({"model": ROUTE}).to_string(),
            400,
            "",
        ),
        (
            "preference header garbage",
            Method::POST,
            &chat,
            vec![json_type, ("x-llmroute-preference", "quality=2")],
            good.to_string(),
            400,
            "",
        ),
        (
            "preference header off simplex",
            Method::POST,
            &chat,
            vec![json_type, ("x-llmroute-preference", "quality=0.9,cost=0.9")],
            good.to_string(),
            400,
            "",
        ),
        (
            "preference field number",
            Method::POST,
            &chat,
            vec![json_type],
            {
                let mut body = good.clone();
                body["llmroute_preference"] = json!(0.5);
                body.to_string()
            },
            400,
            "",
        ),
        (
            "preference field unknown key",
            Method::POST,
            &chat,
            vec![json_type],
            {
                let mut body = good.clone();
                body["llmroute_preference"] = json!({"speed": 1});
                body.to_string()
            },
            400,
            "",
        ),
        (
            "GET on chat",
            Method::GET,
            &chat,
            vec![],
            String::new(),
            405,
            "",
        ),
        (
            "unknown path",
            Method::GET,
            &embeddings,
            vec![],
            String::new(),
            404,
            "unknown_url",
        ),
        (
            "path traversal",
            Method::GET,
            &traversal,
            vec![],
            String::new(),
            404,
            "",
        ),
        (
            "feedback not JSON",
            Method::POST,
            &feedback,
            vec![json_type],
            "score=1".to_string(),
            400,
            "",
        ),
        (
            "feedback wrong type",
            Method::POST,
            &feedback,
            vec![("content-type", "text/plain")],
            "{}".to_string(),
            415,
            "",
        ),
        (
            "feedback score high",
            Method::POST,
            &feedback,
            vec![json_type],
            json!({"decision_id": "0".repeat(32), "score": 1.5}).to_string(),
            400,
            "",
        ),
        (
            "feedback score NaN text",
            Method::POST,
            &feedback,
            vec![json_type],
            r#"{"decision_id": "00000000000000000000000000000000", "score": NaN}"#.to_string(),
            400,
            "",
        ),
        (
            "feedback bad id",
            Method::POST,
            &feedback,
            vec![json_type],
            json!({"decision_id": "../../etc", "score": 1}).to_string(),
            400,
            "",
        ),
        (
            "feedback unknown id",
            Method::POST,
            &feedback,
            vec![json_type],
            json!({"decision_id": "f".repeat(32), "score": 1}).to_string(),
            404,
            "decision_not_found",
        ),
        (
            "feedback extra field",
            Method::POST,
            &feedback,
            vec![json_type],
            json!({"decision_id": "f".repeat(32), "score": 1, "x": 1}).to_string(),
            400,
            "",
        ),
        (
            "feedback over limit",
            Method::POST,
            &feedback,
            vec![json_type],
            format!("{{\"decision_id\": \"{}\"}}", "a".repeat(100_000)),
            413,
            "",
        ),
    ];
    for (name, method, url, headers, body, status, code) in cases {
        let reply = send(method, url, &headers, body).await;
        assert_eq!(
            reply.status.as_u16(),
            status,
            "{name}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = reply.openai_error();
        if !code.is_empty() {
            assert_eq!(error["code"], code, "{name}");
        }
    }

    // Protocol-level abuse, rejected by the HTTP layer before any handler runs.
    let many_headers: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long_header = format!("x-long: {}\r\n", "a".repeat(100 * 1024));
    let chunk = "x".repeat(9 * 1024 * 1024);
    let chunked_over_limit = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let raw_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("chunked body over limit", chunked_over_limit.into_bytes(), " 413 "),
        ("garbage request line", b"HELLO\r\n\r\n".to_vec(), " 400 "),
        ("too many headers", format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n").into_bytes(), " 431 "),
        ("header over limit", format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{long_header}\r\n").into_bytes(), " 431 "),
        ("bad content length", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n".to_vec(), " 400 "),
        ("declared body over limit", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 999999999\r\nconnection: close\r\n\r\n{}".to_vec(), " 413 "),
    ];
    for (name, bytes, status) in raw_cases {
        let line = raw_status(&harness.base, &bytes).await;
        assert!(line.contains(status), "{name}: status line {line:?}");
    }

    // The sidecar still serves normal traffic.
    let reply = common::post_json(&chat, &[], &good).await;
    assert_eq!(reply.status, 200);
    let health = send(Method::GET, &format!("{}/healthz", harness.base), &[], "").await;
    assert_eq!(health.status, 200);
    let metrics = harness.sidecar.metrics().encode();
    assert!(metrics.contains("reason=\"json_depth\""), "{metrics}");
    assert!(metrics.contains("reason=\"body_too_large\""), "{metrics}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_bodies_get_clean_answers() {
    use rand::{Rng, SeedableRng};

    let harness = Harness::start(Setup::default()).await;
    let chat = format!("{}/v1/chat/completions", harness.base);
    let prompt = harness.dataset.test.prompts[2].clone();
    let valid = json!({
        "model": ROUTE,
        "stream": false,
        "messages": [{"role": "user", "content": prompt}],
        "llmroute_preference": {"quality": 0.4},
    })
    .to_string()
    .into_bytes();
    let alphabet = b"{}[]\":,\\ 0123456789.-eE\x00\xff\xc3tfnul";
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    // A bounded number of seeded mutations: byte flips, inserted JSON punctuation, cuts and
    // duplicated slices.
    for case in 0..300 {
        let mut body = valid.clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..body.len());
            match rng.random_range(0..4) {
                0 => body[at] = alphabet[rng.random_range(0..alphabet.len())],
                1 => body.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                2 => body.truncate(at.max(1)),
                _ => {
                    let end = (at + rng.random_range(1..40)).min(body.len());
                    let slice = body[at..end].to_vec();
                    body.splice(at..at, slice);
                }
            }
        }
        let reply = send(
            Method::POST,
            &chat,
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await;
        let status = reply.status.as_u16();
        assert!(
            status == 200 || (400..500).contains(&status),
            "case {case}: status {status} for {}",
            String::from_utf8_lossy(&body)
        );
        if status != 200 {
            reply.openai_error();
        }
    }
    let health = send(Method::GET, &format!("{}/healthz", harness.base), &[], "").await;
    assert_eq!(health.status, 200);
    harness.stop().await;
}
