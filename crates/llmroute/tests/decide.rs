//! `llmroute decide` rejects what the sidecar rejects: a folder instead of a policy file, and a
//! policy trained on another encoder's embeddings. Needs the assets of `llmroute setup`.

use std::path::Path;
use std::process::{Command, Output};

fn llmroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(args)
        .output()
        .expect("llmroute starts")
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

#[test]
fn decide_names_folder_as_policy() {
    let dir = tempfile::tempdir().unwrap();
    let output = llmroute(&["decide", "--policy", path_arg(dir.path()), "--prompt", "hi"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{} is a folder", dir.path().display())),
        "{stderr}"
    );
}

#[test]
fn decide_rejects_foreign_encoder_policy() {
    let dir = tempfile::tempdir().unwrap();
    let output = llmroute(&[
        "train",
        "--dataset",
        "paretobandit-k3",
        "--max-prompts",
        "30",
        "--steps",
        "5",
        "--out",
        path_arg(dir.path()),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let policy = dir.path().join("policy.onnx");
    let decide = |path: &Path| llmroute(&["decide", "--policy", path_arg(path), "--prompt", "hi"]);
    let good = decide(&policy);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );

    let mut model = llmroute_policy::onnx::decode(&std::fs::read(&policy).unwrap()).unwrap();
    let encoder = model
        .metadata_props
        .iter_mut()
        .find(|entry| entry.key == "llmroute.encoder")
        .expect("encoder digest recorded");
    encoder.value = "0".repeat(64);
    let other = dir.path().join("other-encoder.onnx");
    std::fs::write(&other, llmroute_policy::onnx::encode(&model)).unwrap();
    let output = decide(&other);
    assert!(!output.status.success(), "a foreign encoder was accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("was trained with encoder {}", "0".repeat(64))),
        "{stderr}"
    );
    assert!(stderr.contains("other-encoder.onnx"), "{stderr}");
}
