//! Helpers shared by the binary's integration tests: running programs and the test server's
//! kubectl, raw HTTP/1.1 requests, and the crash harness of the event-ingest tests.

// Each test binary uses part of these helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmroute_control::store::Store;
use serde_json::{Value, json};

/// Encoder digest that test operators record in their policies, so they need no encoder files.
pub const ENCODER: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Events in each batch of [`event_batch`].
pub const BATCH_EVENTS: u32 = 64;

/// Returns the repository's top folder.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `program` with `args`, writing `input` to its standard input when given.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {program}: {e}"));
    if let Some(text) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Path of the test server's kubeconfig, from `LLMROUTE_TEST_KUBECONFIG`.
pub fn kubeconfig() -> String {
    std::env::var("LLMROUTE_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "LLMROUTE_TEST_KUBECONFIG is not set: run scripts/test, or `scripts/k8s-testenv start DIR` and `source DIR/env`"
        )
    })
}

/// Runs the testenv's kubectl (first on PATH after `source DIR/env`) against the test server.
pub fn kubectl(args: &[&str], input: Option<&str>) -> Output {
    let config = kubeconfig();
    let mut all = vec!["--kubeconfig", config.as_str()];
    all.extend(args);
    run("kubectl", &all, input)
}

/// Runs kubectl like [`kubectl`] and returns its standard output. Panics with its standard
/// error when it fails.
pub fn kubectl_ok(args: &[&str], input: Option<&str>) -> String {
    stdout_of_success("kubectl", args, kubectl(args, input))
}

/// Returns the standard output of `program args`, or panics with its standard error when it
/// failed.
pub fn stdout_of_success(program: &str, args: &[&str], output: Output) -> String {
    assert!(
        output.status.success(),
        "{program} {} failed: {}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs kubectl with `-o json` and parses its output.
pub fn kubectl_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl_ok(&all, None)).unwrap()
}

/// Applies the checked-in CRDs with the field manager of the other cluster tests and waits
/// until the server serves them.
pub fn install_crds() {
    let crds = repository().join("crds/llmroute.yaml");
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
}

/// Polls `check` every 200 ms until it returns `Some`, for at most 60 s.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out after 60 s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Returns a port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one HTTP/1.1 request with a bearer token and returns the status and the JSON body
/// (`Null` when the body is not JSON). Returns `None` when the connection fails, because the
/// server was killed or is not listening yet.
pub fn request(
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

/// Builds an event batch for `route` with [`BATCH_EVENTS`] events whose decision ids are
/// `first`, `first + 1`, … in 32 hex digits. Returns the ids and the request body.
pub fn event_batch(route: &str, first: u32) -> (Vec<String>, Vec<u8>) {
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

/// Batches that a server acknowledged: each batch's decision ids and request body.
pub type Acknowledged = Vec<(Vec<String>, Vec<u8>)>;

/// Posts event batches for `route` to `address` in a loop and kills `server` with SIGKILL once
/// 20 were acknowledged, while batches are in flight. Returns the acknowledged batches.
pub fn post_until_killed(
    server: &mut Child,
    address: &str,
    token: &str,
    route: &str,
) -> Acknowledged {
    let acknowledged = Arc::new(Mutex::new(Acknowledged::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let poster = {
        let acknowledged = acknowledged.clone();
        let killed = killed.clone();
        let (address, token, route) = (address.to_string(), token.to_string(), route.to_string());
        std::thread::spawn(move || {
            let mut next = 0;
            loop {
                let (ids, body) = event_batch(&route, next);
                next += BATCH_EVENTS;
                match request(&address, "POST", "/v1/events", &token, &body) {
                    Some((200, reply)) => {
                        assert_eq!(reply["stored"], BATCH_EVENTS, "{reply}");
                        acknowledged.lock().unwrap().push((ids, body));
                    }
                    // The server went away: the batch was not acknowledged.
                    None if killed.load(Ordering::SeqCst) => return,
                    other => panic!("unexpected response before the kill: {other:?}"),
                }
            }
        })
    };
    while acknowledged.lock().unwrap().len() < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.store(true, Ordering::SeqCst);
    server.kill().expect("SIGKILL is sent");
    server.wait().unwrap();
    poster.join().expect("the posting loop ends cleanly");
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 20);
    acknowledged
}

/// Posts every acknowledged batch again to the restarted server at `address` and checks that
/// each of its events is reported as a duplicate.
pub fn assert_reported_as_duplicates(address: &str, token: &str, acknowledged: &Acknowledged) {
    for (ids, body) in acknowledged {
        let (status, reply) = request(address, "POST", "/v1/events", token, body)
            .expect("the restarted server responds");
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["duplicates"], ids.len(), "batch starting {}", ids[0]);
        assert_eq!(reply["stored"], 0, "batch starting {}", ids[0]);
    }
}

/// Checks that the store in `state` contains every acknowledged decision id of `route`.
pub fn assert_stored(state: &Path, route: &str, acknowledged: &Acknowledged) {
    let store = Store::open(state).unwrap();
    let stored: std::collections::HashSet<String> = store
        .events(route)
        .unwrap()
        .into_iter()
        .map(|e| e.decision.decision_id)
        .collect();
    for id in acknowledged.iter().flat_map(|(ids, _)| ids) {
        assert!(stored.contains(id), "acknowledged event {id} is not stored");
    }
}
