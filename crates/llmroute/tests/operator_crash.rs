//! `llmroute operator` acknowledges an event batch only after it is committed. Against the API
//! server of `scripts/k8s-testenv`, a client posts batches under a service-account token in a
//! loop and the operator is killed with SIGKILL in the middle. After a restart on the same data
//! folder, every acknowledged decision id is stored.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{
    ENCODER, assert_reported_as_duplicates, assert_stored, eventually, free_port, install_crds,
    kubeconfig, kubectl, kubectl_ok, post_until_killed, request,
};
use serde_json::json;

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

/// Waits until the operator serves the route's configuration, so that it accepts events.
fn wait_serving(address: &str, route: &str) {
    let path = format!("/v1/routes/{route}/config");
    eventually(&format!("the operator to serve {route}"), || {
        matches!(request(address, "GET", &path, "", b""), Some((200, _))).then_some(())
    });
}

#[test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
fn operator_keeps_acknowledged_events_after_sigkill() {
    let namespace = format!("t-crash-{}", std::process::id() % 100_000);
    install_crds();
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

    let acknowledged = post_until_killed(&mut child, &control, &token, &key);

    // The restarted operator finds every acknowledged event already stored.
    let mut child = start(&namespace, &control, data.path());
    wait_serving(&control, &key);
    assert_reported_as_duplicates(&control, &token, &acknowledged);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_stored(data.path(), &key, &acknowledged);
    kubectl(&["delete", "namespace", &namespace, "--wait=false"], None);
}
