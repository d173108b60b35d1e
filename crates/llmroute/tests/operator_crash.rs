//! `llmroute operator` acknowledges an event batch only after it is committed. Against the API
//! server of `scripts/k8s-testenv`, a client posts batches under a service-account token in a
//! loop and the operator is killed with SIGKILL in the middle. After a restart on the same data
//! folder, every acknowledged decision id is stored.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmroute_control::store::Store;
use serde_json::{Value, json};

const BATCH_EVENTS: u32 = 64;
const ENCODER: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn kubeconfig() -> String {
    std::env::var("LLMROUTE_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "LLMROUTE_TEST_KUBECONFIG is not set: run scripts/test, or `scripts/k8s-testenv start DIR` and `source DIR/env`"
        )
    })
}

fn kubectl(args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl starts (scripts/k8s-testenv's env puts it on PATH)");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(input.unwrap_or_default().as_bytes())
        .unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn kubectl_ok(args: &[&str], input: Option<&str>) -> String {
    let output = kubectl(args, input);
    assert!(
        output.status.success(),
        "kubectl {} failed: {}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `llmroute operator` for `namespace` on `control` with its event store in `data`.
fn start(namespace: &str, control: &str, data: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(["operator", "--control-listen", control, "--ops-listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(data)
        .args([
            "--lease-namespace",
            namespace,
            "--watch-namespace",
            namespace,
        ])
        .args(["--identity", "crash-test", "--encoder-digest", ENCODER])
        .args(["--learning-interval-seconds", "0"])
        .env("KUBECONFIG", kubeconfig())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llmroute operator starts")
}

/// Sends one HTTP/1.1 request; returns the status and the JSON body, or `None` when the
/// connection fails (the operator was killed or is not listening yet).
fn request(
    address: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> Option<(u16, Value)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let status: u16 = text.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// Waits until the operator serves the route's configuration, so that it accepts events.
fn wait_serving(address: &str, route: &str) {
    let start = Instant::now();
    loop {
        let path = format!("/v1/routes/{route}/config");
        if let Some((200, _)) = request(address, "GET", &path, "", b"") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the operator did not serve {route} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn batch(route: &str, first: u32) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (first..first + BATCH_EVENTS)
        .map(|n| format!("{n:032x}"))
        .collect();
    let events: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({
                "decision": {
                    "decisionId": id, "route": route, "configVersion": 1, "model": "small",
                    "routed": true, "preference": {"quality": 0.7}, "policyVersion": "v1",
                    "propensity": 1.0
                },
                "servedModel": "small",
                "embedding": vec![0.01f32; 384],
                "quality": 0.5, "costUsd": 0.0001, "promptTokens": 5, "completionTokens": 7,
                "latencyMs": 3.0, "outcome": {"kind": "success"}, "attempts": 1,
                "timestampMs": 1
            })
        })
        .collect();
    let body = json!({"route": route, "sidecar": "crash-test", "events": events});
    (ids, serde_json::to_vec(&body).unwrap())
}

#[test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
fn operator_keeps_acknowledged_events_after_sigkill() {
    let namespace = format!("t-crash-{}", std::process::id() % 100_000);
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds/llmroute.yaml");
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=llmroute-tests",
            "-f",
            crds.to_str().unwrap(),
        ],
        None,
    );
    kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/llmroutes.llmroute.dev",
            "crd/llmpolicies.llmroute.dev",
        ],
        None,
    );
    kubectl_ok(&["create", "namespace", &namespace], None);
    kubectl_ok(&["create", "serviceaccount", "app", "-n", &namespace], None);
    let route = json!({
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "models": [{"name": "small", "endpoint": "http://127.0.0.1:9/v1", "model": "small-1",
                        "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.2}}],
            "defaultPreference": {"quality": 0.7},
            "fallback": "small",
        },
    });
    kubectl_ok(&["apply", "-f", "-"], Some(&route.to_string()));
    let token = kubectl_ok(
        &[
            "create",
            "token",
            "app",
            "-n",
            &namespace,
            "--audience",
            "llmroute.dev",
            "--duration",
            "1h",
        ],
        None,
    )
    .trim()
    .to_string();
    let key = format!("{namespace}/chat");

    let data = tempfile::tempdir().unwrap();
    let control = format!("127.0.0.1:{}", free_port());
    let mut child = start(&namespace, &control, data.path());
    wait_serving(&control, &key);

    let acknowledged = Arc::new(Mutex::new(Vec::<(Vec<String>, Vec<u8>)>::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let poster = {
        let acknowledged = acknowledged.clone();
        let killed = killed.clone();
        let control = control.clone();
        let key = key.clone();
        let token = token.clone();
        std::thread::spawn(move || {
            let mut next = 0;
            loop {
                let (ids, body) = batch(&key, next);
                next += BATCH_EVENTS;
                match request(&control, "POST", "/v1/events", &token, &body) {
                    Some((200, reply)) => {
                        assert_eq!(reply["stored"], BATCH_EVENTS, "{reply}");
                        acknowledged.lock().unwrap().push((ids, body));
                    }
                    // The operator went away: the batch was not acknowledged.
                    None if killed.load(Ordering::SeqCst) => return,
                    other => panic!("unexpected response before the kill: {other:?}"),
                }
            }
        })
    };
    // Kill the operator once some batches went through, while the loop keeps posting.
    while acknowledged.lock().unwrap().len() < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.store(true, Ordering::SeqCst);
    child.kill().expect("SIGKILL is sent");
    child.wait().unwrap();
    poster.join().expect("the posting loop ends cleanly");
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 20);

    // The restarted operator finds every acknowledged event already stored.
    let mut child = start(&namespace, &control, data.path());
    wait_serving(&control, &key);
    for (ids, body) in &acknowledged {
        let (status, reply) = request(&control, "POST", "/v1/events", &token, body)
            .expect("the restarted operator responds");
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["duplicates"], ids.len(), "batch starting {}", ids[0]);
        assert_eq!(reply["stored"], 0, "batch starting {}", ids[0]);
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let store = Store::open(data.path()).unwrap();
    let stored: std::collections::HashSet<String> = store
        .events(&key)
        .unwrap()
        .into_iter()
        .map(|e| e.decision.decision_id)
        .collect();
    for id in acknowledged.iter().flat_map(|(ids, _)| ids) {
        assert!(stored.contains(id), "acknowledged event {id} is not stored");
    }
    kubectl(&["delete", "namespace", &namespace, "--wait=false"], None);
}
