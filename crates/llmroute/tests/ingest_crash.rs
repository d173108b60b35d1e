//! `llmroute standalone` acknowledges an event batch only after it is committed. A client
//! posts batches in a loop and the server is killed with SIGKILL in the middle. After a
//! restart on the same state folder, every acknowledged decision id is stored.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{assert_reported_as_duplicates, assert_stored, post_until_killed};

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

#[test]
fn acknowledged_events_survive_sigkill() {
    let routes = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(routes.path().join("chat.yaml"), ROUTE).unwrap();
    let token_file = routes.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    let (mut child, address) = start(routes.path(), state.path(), &token_file);
    let acknowledged = post_until_killed(&mut child, &address, TOKEN, "chat");

    // The restarted server finds every acknowledged event already stored.
    let (mut child, address) = start(routes.path(), state.path(), &token_file);
    assert_reported_as_duplicates(&address, TOKEN, &acknowledged);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_stored(state.path(), "chat", &acknowledged);
}
