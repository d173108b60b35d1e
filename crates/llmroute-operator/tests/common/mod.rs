//! Helpers shared by the cluster and injection tests.

use std::future::Future;
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Encoder digest the test operators record in their policies.
pub const ENCODER: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Builds a client for the test API server and sets up logging to the test's output.
pub async fn client() -> Client {
    // Logs go to the test's captured output; RUST_LOG chooses the level.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,llmroute_operator=info".into()),
        )
        .with_test_writer()
        .try_init();
    let path = std::env::var("LLMROUTE_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "LLMROUTE_TEST_KUBECONFIG is not set: run scripts/test, or `scripts/k8s-testenv start DIR` and `source DIR/env`"
        )
    });
    let kubeconfig = Kubeconfig::read_from(&path).expect("the test kubeconfig reads");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("the test kubeconfig is valid");
    Client::try_from(config).expect("a client")
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `wait`.
pub async fn eventually_within<T, F, Fut>(wait: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < wait, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A GET on 127.0.0.1; returns the status and the body (de-chunked), `None` when the
/// connection fails.
pub async fn get(url: &str) -> Option<(u16, Vec<u8>)> {
    exchange(url, "GET", &[], b"").await
}

/// A POST of a JSON body on 127.0.0.1 with a bearer token; `None` when the connection fails.
// Only the cluster tests post; the other test crates that share this module do not.
#[allow(dead_code)]
pub async fn post_json(url: &str, token: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let authorization = format!("Authorization: Bearer {token}");
    let headers = [authorization.as_str(), "Content-Type: application/json"];
    exchange(url, "POST", &headers, body).await
}

/// Sends one HTTP/1.1 request with `headers` and `body` and reads the whole response.
async fn exchange(
    url: &str,
    method: &str,
    headers: &[&str],
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    if method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.write_all(body).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(70), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text_end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..text_end]).to_string();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = response[text_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Some((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}
