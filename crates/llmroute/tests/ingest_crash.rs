//! `llmroute standalone` acknowledges an event batch only after it is committed. A client
//! posts batches in a loop and the server is killed with SIGKILL in the middle. After a
//! restart on the same state folder, every acknowledged decision id is stored.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmroute_control::store::Store;
use serde_json::{Value, json};

const ROUTE: &str = "apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata:
  name: chat
spec:
  models:
    - name: small
      endpoint: http://127.0.0.1:9/m/small/v1
      model: small-1
      pricing: {inputUsdPerMillionTokens: 0.1, outputUsdPerMillionTokens: 0.2}
  defaultPreference: {quality: 0.7}
  fallback: small
";
const TOKEN: &str = "crash-test-token-0123456789abcdef";
const BATCH_EVENTS: u32 = 64;

/// Starts `llmroute standalone` on a free port and returns it with its address.
fn start(routes: &Path, state: &Path, token_file: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(["standalone", "--port", "0", "--routes"])
        .arg(routes)
        .arg("--state")
        .arg(state)
        .arg("--token-file")
        .arg(token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("llmroute starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("llmroute standalone exited before listening")
            .expect("stdout reads");
        if let Some(rest) = line.strip_prefix("control API listening on http://") {
            break rest.split(',').next().unwrap().to_string();
        }
    };
    // Keep reading stdout so that the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, address)
}

/// Posts `body` with the bearer token; returns the status and the response body, or `None`
/// when the connection fails (the server was killed).
fn post(address: &str, body: &[u8]) -> Option<(u16, Value)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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

fn batch(first: u32) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (first..first + BATCH_EVENTS)
        .map(|n| format!("{n:032x}"))
        .collect();
    let events: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({
                "decision": {
                    "decisionId": id, "route": "chat", "configVersion": 1, "model": "small",
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
    let body = json!({"route": "chat", "sidecar": "crash-test", "events": events});
    (ids, serde_json::to_vec(&body).unwrap())
}

#[test]
fn acknowledged_events_survive_sigkill() {
    let routes = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(routes.path().join("chat.yaml"), ROUTE).unwrap();
    let token_file = routes.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    let (mut child, address) = start(routes.path(), state.path(), &token_file);
    let acknowledged = Arc::new(Mutex::new(Vec::<(Vec<String>, Vec<u8>)>::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let poster = {
        let acknowledged = acknowledged.clone();
        let killed = killed.clone();
        let address = address.clone();
        std::thread::spawn(move || {
            let mut next = 0;
            loop {
                let (ids, body) = batch(next);
                next += BATCH_EVENTS;
                match post(&address, &body) {
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
    // Kill the server once some batches went through, while the loop keeps posting.
    while acknowledged.lock().unwrap().len() < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.store(true, Ordering::SeqCst);
    child.kill().expect("SIGKILL is sent");
    child.wait().unwrap();
    poster.join().expect("the posting loop ends cleanly");
    let acknowledged = acknowledged.lock().unwrap().clone();
    let acknowledged_ids: Vec<String> = acknowledged
        .iter()
        .flat_map(|(ids, _)| ids.clone())
        .collect();
    assert!(acknowledged.len() >= 20);

    // The restarted server finds every acknowledged event already stored.
    let (mut child, address) = start(routes.path(), state.path(), &token_file);
    for (ids, body) in &acknowledged {
        let (status, reply) = post(&address, body).expect("the restarted server responds");
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["duplicates"], ids.len(), "batch starting {}", ids[0]);
        assert_eq!(reply["stored"], 0, "batch starting {}", ids[0]);
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let store = Store::open(state.path()).unwrap();
    let stored: std::collections::HashSet<String> = store
        .events("chat")
        .unwrap()
        .into_iter()
        .map(|e| e.decision.decision_id)
        .collect();
    for id in &acknowledged_ids {
        assert!(stored.contains(id), "acknowledged event {id} is not stored");
    }
}
