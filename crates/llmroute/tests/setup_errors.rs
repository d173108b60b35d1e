//! When an asset is missing and the automatic set-up cannot restore it, the error names the
//! missing file first. pip is kept offline here (no index, an empty folder of wheels), so the
//! test reaches no network.

use std::process::Command;

#[test]
fn failed_automatic_setup_names_the_missing_file() {
    let cache = tempfile::tempdir().unwrap();
    let wheels = tempfile::tempdir().unwrap();
    // `decide` checks that the policy is a file, then sets up ONNX Runtime before reading it.
    let policy = wheels.path().join("policy.onnx");
    std::fs::write(&policy, b"not read").unwrap();
    let policy = policy.to_str().expect("temporary paths are UTF-8");
    let output = Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(["decide", "--policy", policy, "--prompt", "hi"])
        .env("LLMROUTE_CACHE", cache.path())
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", wheels.path())
        .env("PIP_CONFIG_FILE", "/dev/null")
        .output()
        .expect("llmroute starts");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let library = cache
        .path()
        .join("onnxruntime-1.31.1")
        .join("libonnxruntime.so.1.31.1");
    assert!(
        stderr.contains(&format!(
            "{} is missing, and the set-up that would restore it failed",
            library.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("pip download"), "{stderr}");
}
