//! The manifests in `examples/`: each route passes the operator's own checks, and every file
//! applies to the real API server of `scripts/k8s-testenv` (a server-side dry run, then for
//! real), with the CRDs' schema and CEL rules enforced.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{install_crds, kubectl, kubectl_ok};

use llmroute_api::crd::LlmRoute;
use serde::Deserialize;
use serde_json::Value;

const EXAMPLES: [&str; 6] = [
    "hosted-openai.yaml",
    "vllm.yaml",
    "ollama.yaml",
    "mixed.yaml",
    "app.yaml",
    "preference-dial.yaml",
];

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(examples_dir().join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|e| panic!("{file} is not YAML: {e}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

#[test]
fn example_routes_pass_the_operators_checks() {
    let mut routes = 0;
    for file in EXAMPLES {
        for document in documents(file) {
            assert!(
                document["metadata"]["namespace"].is_null(),
                "{file}: examples land in the current namespace"
            );
            if document["kind"] != "LLMRoute" {
                continue;
            }
            let route: LlmRoute = serde_json::from_value(document)
                .unwrap_or_else(|e| panic!("{file} does not match the LLMRoute type: {e}"));
            let errors = route.spec.check();
            assert!(errors.is_empty(), "{file}: {errors:?}");
            routes += 1;
        }
    }
    assert_eq!(routes, 4);
}

#[test]
fn example_scripts_compile() {
    for (file, key) in [("app.yaml", "app.py"), ("preference-dial.yaml", "dial.py")] {
        let script = documents(file)
            .into_iter()
            .find(|d| d["kind"] == "ConfigMap")
            .and_then(|d| d["data"][key].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("{file} has no ConfigMap key {key}"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(key);
        std::fs::write(&path, script).unwrap();
        let output = Command::new("python3")
            .args(["-m", "py_compile"])
            .arg(&path)
            .output()
            .expect("python3 starts");
        assert!(
            output.status.success(),
            "{file}: {key} does not compile:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
fn examples_apply_to_a_real_api_server() {
    install_crds();
    let namespace = format!("examples-{}", std::process::id() % 100_000);
    kubectl_ok(&["create", "namespace", &namespace], None);
    kubectl_ok(
        &[
            "-n",
            &namespace,
            "create",
            "secret",
            "generic",
            "llm-keys",
            "--from-literal=openai=sk-test",
        ],
        None,
    );
    for file in EXAMPLES {
        let path = examples_dir().join(file);
        let path = path.to_str().unwrap();
        for dry_run in ["--dry-run=server", "--dry-run=none"] {
            kubectl_ok(
                &[
                    "-n",
                    &namespace,
                    "apply",
                    "--server-side",
                    dry_run,
                    "-f",
                    path,
                ],
                None,
            );
        }
    }
    let routes = kubectl_ok(
        &[
            "-n",
            &namespace,
            "get",
            "llmroutes",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        None,
    );
    let mut names: Vec<&str> = routes.split_whitespace().collect();
    names.sort();
    assert_eq!(names, ["chat", "ollama", "openai", "vllm"]);
    kubectl_ok(&["-n", &namespace, "get", "deployment/quiz-app"], None);
    kubectl_ok(&["-n", &namespace, "get", "job/preference-dial"], None);

    // The walk-through's patches: its rollout settings, a pin and the pin's removal.
    let rollout = examples_dir().join("patches/canary-rollout.yaml");
    kubectl_ok(
        &[
            "-n",
            &namespace,
            "patch",
            "llmroutes",
            "chat",
            "--type=merge",
            "--patch-file",
            rollout.to_str().unwrap(),
        ],
        None,
    );
    let autopromote = kubectl_ok(
        &[
            "-n",
            &namespace,
            "get",
            "llmroutes",
            "chat",
            "-o",
            "jsonpath={.spec.rollout.autoPromote}",
        ],
        None,
    );
    assert_eq!(autopromote, "false");
    for patch in [
        r#"{"spec":{"policy":{"version":"v1"}}}"#,
        r#"{"spec":{"policy":{"version":null}}}"#,
    ] {
        kubectl_ok(
            &[
                "-n",
                &namespace,
                "patch",
                "llmroutes",
                "chat",
                "--type=merge",
                "-p",
                patch,
            ],
            None,
        );
    }

    // No operator runs here, so no route has a finalizer and the namespace goes at once.
    let _ = kubectl(&["delete", "namespace", &namespace, "--wait=false"], None);
}
