//! The `llmroute` binary end to end: `train` writes a policy that ONNX Runtime serves, `eval`
//! writes every row and repeats itself exactly for a seed, and bad input is a clear error.
//! Runs on small evenly spaced subsets of the bundled data, with the real encoder and runtime
//! (set up by `llmroute setup`).

use std::path::Path;
use std::process::{Command, Output};

use llmroute_policy::assets::{Assets, default_cache_dir};
use llmroute_policy::policy::{OnnxPolicy, PolicyManifest};
use llmroute_policy::runtime::init_onnx_runtime;
use sha2::{Digest, Sha256};

fn llmroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(args)
        .output()
        .expect("llmroute starts")
}

/// Runs `llmroute`, checks that it failed and returns its standard error.
fn llmroute_fails(args: &[&str]) -> String {
    let output = llmroute(args);
    assert!(!output.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Returns the sorted names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Arguments of a quick `llmroute train` run into `out`.
fn quick_train(out: &Path) -> Vec<&str> {
    vec![
        "train",
        "--dataset",
        "paretobandit-k3",
        "--max-prompts",
        "20",
        "--steps",
        "2",
        "--out",
        path_arg(out),
    ]
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "llmroute failed: {}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Reads the `policy.json` that `llmroute train` wrote into `dir`.
fn read_manifest(dir: &Path) -> PolicyManifest {
    let text = std::fs::read(dir.join("policy.json")).expect("policy.json written");
    serde_json::from_slice(&text).expect("policy.json parses")
}

/// Creates a cache folder whose asset folders link to those of the default cache (set up by
/// `llmroute setup`), so that a test can change the rest of the cache.
fn cache_linking_assets() -> tempfile::TempDir {
    let real = default_cache_dir().unwrap();
    let assets = Assets::locate(&real).expect("assets set up");
    let cache = tempfile::tempdir().unwrap();
    for path in [
        &assets.onnx_runtime,
        &assets.safetensors,
        &assets.tokenizer,
        &assets.encoder,
    ] {
        let top = path
            .strip_prefix(&real)
            .expect("assets lie in the cache")
            .components()
            .next()
            .expect("asset path has a folder");
        let link = cache.path().join(top);
        if !link.exists() {
            std::os::unix::fs::symlink(real.join(top), link).unwrap();
        }
    }
    cache
}

#[test]
fn train_writes_servable_policy() {
    let out = tempfile::tempdir().unwrap();
    let output = llmroute(&[
        "train",
        "--dataset",
        "paretobandit-k3",
        "--max-prompts",
        "60",
        "--steps",
        "40",
        "--version",
        "test-v1",
        "--out",
        path_arg(out.path()),
    ]);
    assert_success(&output);

    let onnx = std::fs::read(out.path().join("policy.onnx")).expect("policy.onnx written");
    let manifest = read_manifest(out.path());
    assert_eq!(manifest.sha256, hex::encode(Sha256::digest(&onnx)));
    assert_eq!(manifest.metadata.version, "test-v1");
    assert_eq!(manifest.metadata.models.len(), 3);
    let training = manifest.training.expect("training record");
    assert_eq!(training.prompts, 60);
    assert_eq!(training.interactions, 40 * 64);

    let assets = Assets::locate(&default_cache_dir().unwrap()).expect("assets set up");
    let environment = init_onnx_runtime(&assets.onnx_runtime).expect("runtime loads");
    let mut policy = OnnxPolicy::from_bytes(&onnx, &environment, "policy.onnx").expect("loads");
    assert_eq!(policy.metadata(), &manifest.metadata);
    let probabilities = policy
        .probabilities(&[0.05; 384], 0.7)
        .expect("decision runs");
    assert_eq!(probabilities.len(), 3);
    assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn unwritable_embedding_cache_is_a_warning() {
    let cache = cache_linking_assets();
    // A file where the embeddings folder belongs makes every cache write fail, even as root.
    let blocker = cache.path().join("embeddings");
    std::fs::write(&blocker, "not a folder").unwrap();

    let out = tempfile::tempdir().unwrap();
    let output = llmroute(&[
        "--cache",
        path_arg(cache.path()),
        "train",
        "--dataset",
        "paretobandit-k3",
        "--max-prompts",
        "20",
        "--steps",
        "2",
        "--out",
        path_arg(out.path()),
    ]);
    assert_success(&output);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("failed to write the embedding cache file"),
        "{stderr}"
    );
    assert!(
        stderr.contains(path_arg(&blocker)),
        "names the file: {stderr}"
    );
    assert!(out.path().join("policy.onnx").is_file());
    assert!(out.path().join("policy.json").is_file());
}

#[test]
fn training_steps_follow_interactions_per_prompt() {
    let out = tempfile::tempdir().unwrap();
    let output = llmroute(&[
        "train",
        "--dataset",
        "paretobandit-k3",
        "--max-prompts",
        "60",
        "--interactions-per-prompt",
        "5",
        "--out",
        path_arg(out.path()),
    ]);
    assert_success(&output);
    let manifest = read_manifest(out.path());
    let training = manifest.training.expect("training record");
    // 60 prompts · 5 draws = 300 interactions: ⌈300 / 64⌉ = 5 steps of 64.
    assert_eq!(training.config.steps, 5);
    assert_eq!(training.interactions, 5 * 64);
}

#[test]
fn training_rejects_zero_settings_by_name() {
    for flag in ["--steps", "--batch-size", "--interactions-per-prompt"] {
        let output = llmroute(&["train", "--dataset", "paretobandit-k3", flag, "0"]);
        assert!(!output.status.success(), "{flag} 0 was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("invalid {flag} 0: use at least 1")),
            "{stderr}"
        );
    }
}

#[test]
fn decide_rejects_missing_policy_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.onnx");
    let output = llmroute(&["decide", "--policy", path_arg(&missing), "--prompt", "hi"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("policy file {} not found", missing.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("loaded ONNX Runtime"), "{stderr}");
}

#[test]
fn training_rejects_negative_tau_by_name() {
    for args in [["--tau", "-1"].as_slice(), ["--tau=-1"].as_slice()] {
        let mut command = vec!["train", "--dataset", "paretobandit-k3"];
        command.extend_from_slice(args);
        let output = llmroute(&command);
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("invalid --tau -1: the cost scale must be a positive number of USD"),
            "{stderr}"
        );
    }
}

#[test]
fn eval_rows_repeat_for_seed() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let run = |dir: &Path| {
        let json = dir.join("rows.json");
        let output = llmroute(&[
            "eval",
            "--dataset",
            "paretobandit-k3",
            "--max-prompts",
            "150",
            "--steps",
            "30",
            "--seed",
            "3",
            "--out",
            path_arg(dir),
            "--json",
            path_arg(&json),
        ]);
        assert_success(&output);
        std::fs::read_to_string(json).expect("JSON rows written")
    };
    let rows = run(first.path());
    assert_eq!(rows, run(second.path()), "same seed, same rows");

    for file in ["report.md", "quality_cost_id.svg", "quality_cost_ood.svg"] {
        assert!(first.path().join(file).is_file(), "{file} written");
    }

    let parsed: serde_json::Value = serde_json::from_str(&rows).unwrap();
    let rows = parsed
        .as_array()
        .or_else(|| parsed["rows"].as_array())
        .expect("rows array");
    for router in [
        "barp",
        "mlp-full-info",
        "knn-full-info",
        "linucb",
        "epsilon-greedy",
        "thompson",
        "random",
        "oracle",
        "single:mistralai/mistral-large-2512",
    ] {
        for split in ["id", "ood"] {
            let points = rows
                .iter()
                .filter(|row| row["router"] == router && row["split"] == split)
                .count();
            assert_eq!(points, 11, "{router} on {split}: one row per sweep point");
        }
    }
    let row = &rows[0];
    for field in [
        "router",
        "split",
        "w_quality",
        "mean_quality",
        "mean_cost",
        "mean_reward",
        "shares",
    ] {
        assert!(row.get(field).is_some(), "row has `{field}`: {row}");
    }
}

#[test]
fn unknown_dataset_is_clear_error() {
    let output = llmroute(&[
        "train",
        "--dataset",
        "no-such-data",
        "--out",
        "/nonexistent",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-data"), "names the value: {stderr}");
    assert!(
        stderr.contains("llmrouter-9llm"),
        "lists the known data sets: {stderr}"
    );
}

#[test]
fn invalid_cost_scale_is_clear_error() {
    for value in ["0", "-1", "NaN"] {
        let output = llmroute(&[
            "train",
            "--dataset",
            "paretobandit-k3",
            &format!("--tau={value}"),
        ]);
        assert!(!output.status.success(), "--tau={value} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("--tau {value}")),
            "names the value: {stderr}"
        );
    }
}

#[test]
fn checked_in_crds_match_the_types() {
    let output = llmroute(&["crd"]);
    assert_success(&output);
    let generated = String::from_utf8(output.stdout).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds/llmroute.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        generated == checked_in,
        "{} differs from `llmroute crd`; run `cargo run -p llmroute -- crd > crds/llmroute.yaml`",
        path.display()
    );
}

#[test]
fn install_rejects_bad_settings_by_name() {
    let output = llmroute(&["install", "--namespace", "Not_A_Namespace"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Not_A_Namespace"), "{stderr}");
    let output = llmroute(&[
        "install",
        "--replicas",
        "2",
        "--image",
        "example/llmroute:1",
    ]);
    assert_success(&output);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("replicas: 2"), "{text}");
    assert!(text.contains("image: example/llmroute:1"), "{text}");
    let output = llmroute(&["install", "--storage-size", "lots"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--storage-size \"lots\""), "{stderr}");
    let output = llmroute(&["install", "--webhook-failure-policy", "Sometimes"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Sometimes"), "{stderr}");
}

#[test]
fn policies_names_missing_state_folder() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent");
    let output = llmroute(&["policies", "--state", path_arg(&missing), "--route", "chat"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no state database at"), "{stderr}");
    assert!(stderr.contains("absent"), "{stderr}");
}

#[test]
fn quickstart_rejects_zero_settings_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "--requests",
            "invalid --requests 0: send at least 1 request",
        ),
        (
            "--concurrency",
            "invalid --concurrency 0: use at least 1 worker",
        ),
    ];
    for (flag, message) in cases {
        let output = llmroute(&["quickstart", "--out", path_arg(dir.path()), flag, "0"]);
        assert!(!output.status.success(), "{flag} 0 was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{stderr}");
    }
}

#[test]
fn sidecar_rejects_zero_settings_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.json");
    for flag in [
        "--encoder-threads",
        "--feedback-capacity",
        "--feedback-ttl-seconds",
    ] {
        let output = llmroute(&["sidecar", "--config", path_arg(&config), flag, "0"]);
        assert!(!output.status.success(), "{flag} 0 was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("invalid {flag} 0: use at least 1")),
            "{stderr}"
        );
    }
}

#[test]
fn failed_policy_write_keeps_previous_pair() {
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("policy.onnx"), "previous onnx").unwrap();
    // A non-empty folder at policy.json makes the second rename fail after policy.onnx was
    // replaced.
    let blocker = out.path().join("policy.json");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("notes.txt"), "kept").unwrap();

    let stderr = llmroute_fails(&quick_train(out.path()));
    assert!(
        stderr.contains(&format!(
            "failed to move the new {} into place",
            blocker.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("previous files are unchanged"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("policy.onnx")).unwrap(),
        "previous onnx"
    );
    assert_eq!(
        std::fs::read_to_string(blocker.join("notes.txt")).unwrap(),
        "kept"
    );
    assert_eq!(names_in(out.path()), ["policy.json", "policy.onnx"]);
}

#[test]
fn file_size_limit_keeps_previous_pair() {
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("policy.onnx"), "previous onnx").unwrap();
    std::fs::write(out.path().join("policy.json"), "previous json").unwrap();
    // policy.onnx takes about 200 KB, more than the 64 blocks (32 or 64 KiB, by shell) allowed,
    // while policy.json takes about 1 KB.
    let mut command = vec![
        "-c",
        "ulimit -f 64 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_llmroute"),
    ];
    command.extend(quick_train(out.path()));
    let output = Command::new("sh")
        .args(&command)
        .output()
        .expect("sh starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}\n{stderr}", output.status);
    let onnx = out.path().join("policy.onnx");
    assert!(
        stderr.contains(&format!("failed to write {}", onnx.display())),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&onnx).unwrap(), "previous onnx");
    assert_eq!(
        std::fs::read_to_string(out.path().join("policy.json")).unwrap(),
        "previous json"
    );
    assert_eq!(names_in(out.path()), ["policy.json", "policy.onnx"]);
}

#[test]
fn output_file_is_rejected_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("results");
    std::fs::write(&file, "a file").unwrap();
    let train = llmroute_fails(&quick_train(&file));
    let eval = llmroute_fails(&[
        "eval",
        "--dataset",
        "paretobandit-k3",
        "--max-prompts",
        "20",
        "--out",
        path_arg(&file),
    ]);
    for stderr in [train, eval] {
        assert!(
            stderr.contains(&format!(
                "invalid --out {0}: {0} is a file, not a folder",
                file.display()
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("File exists"), "{stderr}");
        assert!(!stderr.contains("loaded ONNX Runtime"), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a file");
}

#[test]
fn json_folder_is_rejected_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = llmroute_fails(&[
        "eval",
        "--dataset",
        "paretobandit-k3",
        "--max-prompts",
        "20",
        "--out",
        path_arg(&dir.path().join("report")),
        "--json",
        path_arg(dir.path()),
    ]);
    assert!(
        stderr.contains("the path is a folder. Pass the path of a file"),
        "{stderr}"
    );
    assert!(!stderr.contains("loaded ONNX Runtime"), "{stderr}");
}

#[test]
fn eval_too_few_prompts_names_fix() {
    let dir = tempfile::tempdir().unwrap();
    for max in ["1", "2"] {
        let stderr = llmroute_fails(&[
            "eval",
            "--dataset",
            "paretobandit-k3",
            "--max-prompts",
            max,
            "--out",
            path_arg(dir.path()),
        ]);
        assert!(
            stderr.contains(&format!("invalid --max-prompts {max}:")),
            "{stderr}"
        );
        assert!(stderr.contains("Use a larger --max-prompts"), "{stderr}");
        assert!(!stderr.contains("hold out fewer tasks"), "{stderr}");
        assert!(!stderr.contains("loaded ONNX Runtime"), "{stderr}");
    }
}

#[test]
fn training_rejects_huge_settings_by_name() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--steps", "1", "--batch-size", "18446744073709551615"],
            "invalid --batch-size 18446744073709551615: use at most 65536",
        ),
        (
            &["--steps", "1", "--batch-size", "1000000000"],
            "invalid --batch-size 1000000000: use at most 65536",
        ),
        (
            &["--steps", "18446744073709551615"],
            "invalid --steps 18446744073709551615: 18446744073709551615 steps of 64 \
             interactions exceed the maximum interaction count",
        ),
        (
            &["--interactions-per-prompt", "18446744073709551615"],
            "invalid --interactions-per-prompt 18446744073709551615: 20 training prompts",
        ),
    ];
    let out = tempfile::tempdir().unwrap();
    for (flags, message) in cases {
        let mut args = vec![
            "train",
            "--dataset",
            "paretobandit-k3",
            "--max-prompts",
            "20",
            "--out",
            path_arg(out.path()),
        ];
        args.extend_from_slice(flags);
        let stderr = llmroute_fails(&args);
        assert!(stderr.contains(message), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
    }
    let output = llmroute(&["train", "--help"]);
    assert_success(&output);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("from 1 to 65536"), "{help}");
}

#[test]
fn negative_numbers_are_rejected_by_flag() {
    let cases: [&[&str]; 8] = [
        &["train", "--steps", "-5"],
        &["train", "--batch-size", "-5"],
        &["train", "--seed", "-5"],
        &["train", "--interactions-per-prompt", "-5"],
        &["train", "--max-prompts", "-5"],
        &["eval", "--steps", "-5"],
        &["bench", "--decisions", "-5"],
        &[
            "sidecar",
            "--config",
            "sidecar.json",
            "--encoder-threads",
            "-5",
        ],
    ];
    for args in cases {
        let stderr = llmroute_fails(args);
        let flag = args[args.len() - 2];
        assert!(
            stderr.contains(&format!("invalid value '-5' for '{flag} <")),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("expected a non-negative integer"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn empty_version_is_rejected() {
    let out = tempfile::tempdir().unwrap();
    for version in ["", "  "] {
        let mut args = quick_train(out.path());
        args.extend(["--version", version]);
        let stderr = llmroute_fails(&args);
        assert!(
            stderr.contains(&format!(
                "invalid --version {version:?}: pass a non-empty label"
            )),
            "{stderr}"
        );
    }
    assert!(names_in(out.path()).is_empty());
}

#[test]
fn bench_rejects_bad_settings_before_timing() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--decisions", "0"],
            "invalid --decisions 0: use at least 1",
        ),
        (&["--encodes", "0"], "invalid --encodes 0: use at least 1"),
        (
            &["--decisions", "10000001"],
            "invalid --decisions 10000001: use at most 10000000",
        ),
        (
            &["--dataset", "nope"],
            "invalid --dataset nope: unknown data set",
        ),
        (
            &["--dataset", "nope", "--skip-training"],
            "invalid --dataset nope: unknown data set",
        ),
    ];
    for (flags, message) in cases {
        let mut args = vec!["bench"];
        args.extend_from_slice(flags);
        let stderr = llmroute_fails(&args);
        assert!(stderr.contains(message), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
        assert!(
            !stderr.contains("loaded ONNX Runtime"),
            "{flags:?}: {stderr}"
        );
    }
}

#[test]
fn sidecar_rejects_huge_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.json");
    let stderr = llmroute_fails(&[
        "sidecar",
        "--config",
        path_arg(&config),
        "--port",
        "0",
        "--encoder-threads",
        "1000000",
    ]);
    assert!(
        stderr.contains("invalid --encoder-threads 1000000: use at most 256"),
        "{stderr}"
    );
    let output = llmroute(&["sidecar", "--help"]);
    assert_success(&output);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("from 1 to 256"), "{help}");
}

#[test]
fn relative_cache_variable_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args(["train", "--dataset", "no-such-data"])
        .env("LLMROUTE_CACHE", "relative-cache")
        .current_dir(dir.path())
        .output()
        .expect("llmroute starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ignoring a relative cache folder"),
        "{stderr}"
    );
    assert!(stderr.contains("relative-cache"), "{stderr}");
    assert!(names_in(dir.path()).is_empty());
}

#[test]
fn sidecar_names_admin_address_it_cannot_use() {
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = occupied.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.json");
    let sidecar = |admin: &str| {
        llmroute_fails(&[
            "sidecar",
            "--config",
            path_arg(&config),
            "--port",
            "0",
            "--admin-address",
            admin,
        ])
    };
    let stderr = sidecar(&address);
    assert!(
        stderr.contains(&format!(
            "failed to bind {address}; pick another --admin-address"
        )),
        "{stderr}"
    );
    let stderr = sidecar("9099");
    assert!(
        stderr.contains("invalid value '9099' for '--admin-address <ADDRESS:PORT>'"),
        "{stderr}"
    );
}

#[test]
fn operator_rejects_sidecar_ports_that_cannot_work() {
    // Checked before the operator reaches for a cluster.
    let stderr = llmroute_fails(&["operator", "--sidecar-admin-port", "8099"]);
    assert!(
        stderr.contains("invalid --sidecar-admin-port 8099: it equals --sidecar-port"),
        "{stderr}"
    );
    let stderr = llmroute_fails(&["operator", "--sidecar-port", "0"]);
    assert!(stderr.contains("invalid --sidecar-port 0"), "{stderr}");
    let stderr = llmroute_fails(&["operator", "--sidecar-image-pull-secret", "ok,Not_A_Name"]);
    assert!(
        stderr.contains("invalid --sidecar-image-pull-secret \"Not_A_Name\""),
        "{stderr}"
    );
}

/// Writes a sidecar configuration for route `chat` with one model, `small`, at `endpoint`,
/// with the `apiKey` reference `api_key` when given, and returns the file's path.
fn write_sidecar_config(
    dir: &Path,
    endpoint: &str,
    api_key: Option<serde_json::Value>,
) -> std::path::PathBuf {
    let mut model = serde_json::json!({
        "name": "small",
        "endpoint": endpoint,
        "upstreamModel": "s",
        "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.2}
    });
    if let Some(api_key) = api_key {
        model["apiKey"] = api_key;
    }
    let route = serde_json::json!({
        "route": "chat",
        "version": 1,
        "models": [model],
        "defaultPreference": {"quality": 0.5},
        "fallback": "small"
    });
    let config = dir.join("sidecar.json");
    std::fs::write(&config, route.to_string()).unwrap();
    config
}

/// Starts `command` (an `llmroute sidecar` on port 0) and returns it with the `host:port` it
/// prints.
fn spawn_sidecar(mut command: Command) -> (std::process::Child, String) {
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("llmroute starts");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let address = lines
        .find_map(|line| {
            let line = line.ok()?;
            let rest = line.split_once("listening on http://")?.1;
            Some(rest.trim_end_matches("/v1").to_string())
        })
        .expect("the sidecar prints its address");
    (child, address)
}

#[test]
fn sidecar_keeps_serving_while_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_sidecar_config(dir.path(), "http://127.0.0.1:9/v1", None);
    let mut command = Command::new(env!("CARGO_BIN_EXE_llmroute"));
    command
        .args(["sidecar", "--config", path_arg(&config), "--port", "0"])
        .args(["--drain-seconds", "5"]);
    let (mut child, address) = spawn_sidecar(command);
    let get = |path: &str| -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&address).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response.split_once("\r\n\r\n")?.1.to_string()))
    };
    assert_eq!(get("/readyz").map(|r| r.0), Some(200));

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut draining = None;
    for _ in 0..100 {
        if let Some((503, body)) = get("/readyz") {
            draining = Some(body);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(draining.as_deref(), Some("the sidecar is shutting down\n"));
    assert_eq!(get("/v1/models").map(|r| r.0), Some(200), "still proxying");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// Sends one HTTP/1.1 request to `address` and returns the status and body.
fn http_request(address: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n")?.1.to_string()))
}

/// Waits up to a minute for `child` to exit after POST /shutdown, and kills it after that.
fn exit_within_a_minute(child: &mut std::process::Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    panic!("the sidecar still runs a minute after POST /shutdown");
}

/// The app of a Job's pod stops a sidecar that runs as a regular container with POST
/// /shutdown: the sidecar exits with status 0, skips the drain and first writes the event
/// still waiting for feedback.
#[test]
fn sidecar_stops_on_post_shutdown() {
    let (port, _seen) = recording_upstream();
    let dir = tempfile::tempdir().unwrap();
    let config = write_sidecar_config(dir.path(), &format!("http://127.0.0.1:{port}/v1"), None);
    let events = dir.path().join("events.jsonl");
    let mut command = Command::new(env!("CARGO_BIN_EXE_llmroute"));
    command
        .args(["sidecar", "--config", path_arg(&config), "--port", "0"])
        .args(["--events", path_arg(&events), "--shutdown-endpoint"])
        // As the webhook starts a regular-container sidecar; the drain follows SIGTERM only.
        .args(["--drain-seconds", "3600"]);
    let (mut child, address) = spawn_sidecar(command);
    let chat = r#"{"model":"small","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(
        http_request(&address, "POST", "/v1/chat/completions", chat).map(|r| r.0),
        Some(200)
    );
    let get = http_request(&address, "GET", "/shutdown", "");
    assert_eq!(get.map(|r| r.0), Some(405), "GET does not stop the sidecar");
    assert_eq!(
        http_request(&address, "POST", "/shutdown", ""),
        Some((200, "shutting down\n".to_string()))
    );
    // With the hour-long drain that SIGTERM would start, the wait would run out.
    let status = exit_within_a_minute(&mut child);
    assert!(status.success(), "{status}");
    let written = std::fs::read_to_string(&events).unwrap();
    assert_eq!(written.lines().count(), 1, "{written}");
}

/// A sidecar still waiting for its first configuration, from a control API that refuses
/// connections, also stops on POST /shutdown, so a Job whose app failed early still completes.
#[test]
fn sidecar_stops_on_post_shutdown_before_its_configuration() {
    // Two free ports. Nothing listens on the control port, so the control API refuses
    // connections.
    let free_port = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (control, port) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmroute"))
        .args([
            "sidecar",
            "--control",
            &format!("http://127.0.0.1:{control}"),
        ])
        .args(["--route", "default/chat", "--port", &port.to_string()])
        .arg("--shutdown-endpoint")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("llmroute starts");

    let address = format!("127.0.0.1:{port}");
    let mut waiting = None;
    for _ in 0..600 {
        if let Some(response) = http_request(&address, "GET", "/readyz", "") {
            waiting = Some(response);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if waiting.as_ref().map(|r| r.0) != Some(503) {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("expected a sidecar waiting for its configuration, got {waiting:?}");
    }

    assert_eq!(
        http_request(&address, "POST", "/shutdown", "").map(|r| r.0),
        Some(200)
    );
    let status = exit_within_a_minute(&mut child);
    assert!(status.success(), "{status}");
}

/// Without --shutdown-endpoint, POST /shutdown is refused with the flag that turns it on, and
/// the sidecar keeps serving.
#[test]
fn sidecar_refuses_shutdown_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_sidecar_config(dir.path(), "http://127.0.0.1:9/v1", None);
    let mut command = Command::new(env!("CARGO_BIN_EXE_llmroute"));
    command.args(["sidecar", "--config", path_arg(&config), "--port", "0"]);
    let (mut child, address) = spawn_sidecar(command);
    let (status, body) = http_request(&address, "POST", "/shutdown", "").unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("--shutdown-endpoint"), "{body}");
    assert_eq!(
        http_request(&address, "GET", "/readyz", "").map(|r| r.0),
        Some(200)
    );
    assert!(child.try_wait().unwrap().is_none(), "the sidecar stopped");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn sidecar_without_source_names_both_flags() {
    let stderr = llmroute_fails(&["sidecar"]);
    assert!(
        stderr.contains("--config <FILE>|--control <URL>"),
        "{stderr}"
    );
}

/// `decide` rejects what the sidecar rejects: a folder instead of a policy file, and a policy
/// trained on another encoder's embeddings.
#[test]
fn decide_names_folder_as_policy() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = llmroute_fails(&["decide", "--policy", path_arg(dir.path()), "--prompt", "hi"]);
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
    let stderr = llmroute_fails(&["decide", "--policy", path_arg(&other), "--prompt", "hi"]);
    assert!(
        stderr.contains(&format!("was trained with encoder {}", "0".repeat(64))),
        "{stderr}"
    );
    assert!(stderr.contains("other-encoder.onnx"), "{stderr}");
}

/// When an asset is missing and the automatic set-up cannot restore it, the error names the
/// missing file first. pip is kept offline (no index, an empty folder of wheels), so the test
/// reaches no network.
#[test]
fn failed_setup_names_missing_asset() {
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

/// Starts an OpenAI-style upstream on 127.0.0.1 that responds to every request with a chat
/// completion and records each request's `Authorization` header. Returns its port.
fn recording_upstream() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        // Bounded: the test sends far fewer requests, and the thread ends with the process.
        for stream in listener.incoming().take(200) {
            let Ok(stream) = stream else { continue };
            let mut reader = std::io::BufReader::new(stream);
            let mut authorization = None;
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let (name, value) = line.split_once(':').unwrap_or((&line, ""));
                match name.to_ascii_lowercase().as_str() {
                    "authorization" => authorization = Some(value.trim().to_string()),
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            record.lock().unwrap().push(authorization);
            let completion = serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "s",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            })
            .to_string();
            let _ = write!(
                reader.get_mut(),
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{completion}",
                completion.len()
            );
        }
    });
    (port, seen)
}

#[test]
fn sidecar_reads_rotated_key_file() {
    let (port, seen) = recording_upstream();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("openai");
    std::fs::write(&key_file, "sk-first\n").unwrap();
    let config = write_sidecar_config(
        dir.path(),
        &format!("http://127.0.0.1:{port}/v1"),
        Some(
            serde_json::json!({"secret": {"name": "llm-keys", "key": "openai", "env": "LLMROUTE_API_KEY_SMALL"}}),
        ),
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_llmroute"));
    command
        .args(["sidecar", "--config", path_arg(&config), "--port", "0"])
        .env("LLMROUTE_API_KEY_SMALL_FILE", &key_file)
        .env_remove("LLMROUTE_API_KEY_SMALL");
    let (mut child, address) = spawn_sidecar(command);
    let chat = || -> Option<u16> {
        use std::io::{Read, Write};
        let body = r#"{"model":"small","messages":[{"role":"user","content":"hi"}]}"#;
        let mut stream = std::net::TcpStream::connect(&address).ok()?;
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    };
    let last_key = || seen.lock().unwrap().last().cloned().flatten();

    assert_eq!(chat(), Some(200));
    assert_eq!(last_key().as_deref(), Some("Bearer sk-first"));

    // The kubelet rewrites the file when the Secret changes. The sidecar reads it again within
    // a few seconds, without a restart.
    std::fs::write(&key_file, "sk-second").unwrap();
    let mut rotated = false;
    for _ in 0..40 {
        assert_eq!(chat(), Some(200));
        if last_key().as_deref() == Some("Bearer sk-second") {
            rotated = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(rotated, "the sidecar kept sending {:?}", last_key());

    // Without the file the model cannot be called, and the request is rejected before any
    // upstream call.
    std::fs::remove_file(&key_file).unwrap();
    let mut rejected = false;
    for _ in 0..40 {
        if chat() == Some(503) {
            rejected = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(
        rejected,
        "the sidecar still called the model without its key"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
