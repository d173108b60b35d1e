//! The container image's file layout, tested without an image builder. `scripts/image-layout`,
//! which the Dockerfile's build stage runs, fills a folder. The binary in it then routes a
//! prompt through ONNX Runtime and the encoder as the image's non-root user, with no
//! environment but `LLMROUTE_CACHE`, as in the image.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use llmroute_policy::encoder::digest_of_files;
use llmroute_policy::policy::prior::{PricedModel, pricing_prior};

/// User and group of the image (`USER 65532:65532` in the Dockerfile).
const IMAGE_USER: &str = "65532";

fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().expect("id runs");
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

#[test]
fn image_layout_runs_as_non_root() {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = llmroute_policy::assets::default_cache_dir().unwrap();
    let root = tempfile::tempdir().unwrap();
    // The image's user must reach the layout through the temporary folder.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let layout = root.path().join("image");
    let output = Command::new(repository.join("scripts/image-layout"))
        .arg(&layout)
        .arg(env!("CARGO_BIN_EXE_llmroute"))
        .arg(&cache)
        .output()
        .expect("scripts/image-layout starts");
    assert!(
        output.status.success(),
        "scripts/image-layout failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let binary = layout.join("usr/local/bin/llmroute");
    let image_cache = layout.join("opt/llmroute/cache");
    let assets = llmroute_policy::assets::Assets::locate(&image_cache)
        .expect("the layout contains every asset");
    // Only the assets and the stamp that `llmroute setup` keeps beside the encoder graph: no
    // wheel, download folder or other tool's cache.
    let mut expected = vec![
        assets.onnx_runtime.clone(),
        assets.tokenizer.clone(),
        assets.safetensors.clone(),
        assets.encoder.clone(),
        assets.encoder.with_extension("onnx.stamp"),
    ];
    expected.sort();
    let mut files = walk(&image_cache);
    files.sort();
    assert_eq!(files, expected);

    // A policy for two models, made for this encoder.
    let encoder = digest_of_files(&assets.encoder, &assets.tokenizer).unwrap();
    let models =
        [("cheap", 0.1, 0.4), ("dear", 5.0, 20.0)].map(|(name, input, output)| PricedModel {
            name: name.into(),
            input_usd_per_million_tokens: input,
            output_usd_per_million_tokens: output,
        });
    let (network, metadata) = pricing_prior(&models, "v1", &encoder, 384, 0.002);
    let policy = root.path().join("policy.onnx");
    std::fs::write(
        &policy,
        llmroute_policy::policy::to_onnx_bytes(&network, &metadata),
    )
    .unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut command = if is_root() {
        let mut command = Command::new("setpriv");
        command.args([
            &format!("--reuid={IMAGE_USER}"),
            &format!("--regid={IMAGE_USER}"),
            "--clear-groups",
        ]);
        command.arg(&binary);
        command
    } else {
        Command::new(&binary)
    };
    let output = command
        .env_clear()
        .env("LLMROUTE_CACHE", &image_cache)
        .current_dir("/")
        .args(["decide", "--prompt", "What is 2 + 2?", "--preference"])
        .arg("quality=0")
        .arg("--policy")
        .arg(&policy)
        .output()
        .expect("the layout's binary starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "llmroute decide from the layout failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let decision: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        decision["model"], "cheap",
        "at quality=0 the pricing prior favours the cheaper model: {stdout}"
    );
}

/// Lists every file under `folder`, recursively.
fn walk(folder: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
