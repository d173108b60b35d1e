//! The exported policy run by ONNX Runtime must give the probabilities of the Rust forward pass.
//! Needs the assets of `llmroute setup` (the ONNX Runtime library).

use indicatif::ProgressBar;
use llmroute_policy::assets::{Assets, default_cache_dir};
use llmroute_policy::bandit::ReplayEnvironment;
use llmroute_policy::policy::network::PREFERENCE_INPUTS;
use llmroute_policy::policy::{
    InferenceError, OnnxPolicy, PolicyMetadata, TrainConfig, from_onnx, metadata::POLICY_FORMAT,
    to_onnx_bytes, train,
};
use llmroute_policy::reward::Reward;
use llmroute_policy::runtime::init_onnx_runtime;
use ndarray::{Array2, s};
use ort::environment::Environment;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn environment() -> Environment {
    let cache = default_cache_dir().expect("cache folder");
    let assets = Assets::locate(&cache).unwrap_or_else(|e| panic!("{e}"));
    init_onnx_runtime(&assets.onnx_runtime).expect("ONNX Runtime loads")
}

fn unit_rows(rows: usize, dim: usize, rng: &mut ChaCha8Rng) -> Array2<f32> {
    let mut matrix = Array2::from_shape_fn((rows, dim), |_| rng.random_range(-1.0f32..1.0));
    for mut row in matrix.rows_mut() {
        let norm = row.dot(&row).sqrt();
        row.mapv_inplace(|v| v / norm);
    }
    matrix
}

/// Returns the largest absolute difference between two matrices of the same shape.
fn max_abs_difference(left: &Array2<f32>, right: &Array2<f32>) -> f32 {
    (left - right).fold(0.0f32, |max, &value| max.max(value.abs()))
}

fn trained_policy() -> (llmroute_policy::policy::PolicyNetwork, PolicyMetadata) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let embeddings = unit_rows(64, 384, &mut rng);
    let quality = Array2::from_shape_fn((64, 4), |_| rng.random_range(0.0f32..1.0));
    let cost = Array2::from_shape_fn((64, 4), |(_, k)| 0.001 * (k + 1) as f32);
    let mut bandit = ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
    let config = TrainConfig {
        steps: 20,
        ..TrainConfig::default()
    };
    let (network, _) = train(
        &mut bandit,
        Reward::new(0.004),
        &config,
        None,
        &ProgressBar::hidden(),
    );
    let metadata = PolicyMetadata {
        format: POLICY_FORMAT.to_string(),
        version: "test-1".to_string(),
        models: ["a", "b", "c", "d"].map(String::from).to_vec(),
        encoder: "test-encoder".to_string(),
        embedding_dim: 384,
        cost_scale_usd: 0.004,
    };
    (network, metadata)
}

#[test]
fn onnx_policy_matches_rust_forward_pass() {
    let environment = environment();
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    let mut policy = OnnxPolicy::from_bytes(&bytes, &environment, "memory").expect("policy loads");
    assert_eq!(policy.metadata(), &metadata);

    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let embeddings = unit_rows(32, 384, &mut rng);
    // The sweep's points, and points near both ends where the log-odds input is steep.
    let mut w_quality: Vec<f32> = (0..22).map(|i| (i % 11) as f32 / 10.0).collect();
    w_quality.extend([0.0, 1e-5, 1e-4, 0.001, 0.01, 0.5, 0.99, 0.999, 0.9999, 1.0]);
    let expected = network.probabilities(embeddings.view(), &w_quality);
    let actual = policy
        .probabilities_batch(embeddings.view(), &w_quality)
        .expect("batch runs");
    let worst = max_abs_difference(&expected, &actual);
    println!("worst absolute difference, batch of 32: {worst:e}");
    assert!(worst <= 1e-5, "ONNX Runtime and Rust differ by {worst}");

    for i in 0..4 {
        let single = policy
            .probabilities(embeddings.row(i).as_slice().unwrap(), w_quality[i])
            .expect("single decision runs");
        for (k, p) in single.iter().enumerate() {
            assert!(
                (p - expected[[i, k]]).abs() <= 1e-5,
                "row {i} model {k}: {p} vs {}",
                expected[[i, k]]
            );
        }
    }
}

/// A policy written before the log-odds input existed has a `[2 × preference_dim]`
/// `pref_weight` and no log-odds nodes. It must still load and match the Rust forward pass.
#[test]
fn policy_without_log_odds_input_still_runs() {
    let environment = environment();
    let (mut network, metadata) = trained_policy();
    assert_eq!(network.pref_weight.nrows(), PREFERENCE_INPUTS);
    // Large log-odds weights first, so that dropping them changes the probabilities.
    network.pref_weight.row_mut(2).fill(3.0);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let embeddings = unit_rows(16, 384, &mut rng);
    let w_quality: Vec<f32> = (0..16).map(|i| i as f32 / 15.0).collect();
    let with_log_odds = network.probabilities(embeddings.view(), &w_quality);

    network.pref_weight = network.pref_weight.slice(s![..2, ..]).to_owned();
    let expected = network.probabilities(embeddings.view(), &w_quality);
    let changed = max_abs_difference(&with_log_odds, &expected);
    assert!(changed > 1e-3, "the log-odds input made no difference");

    let bytes = to_onnx_bytes(&network, &metadata);
    let restored = from_onnx(&llmroute_policy::onnx::decode(&bytes).expect("decodes"))
        .expect("weights read back");
    assert_eq!(restored.pref_weight, network.pref_weight);
    let mut policy = OnnxPolicy::from_bytes(&bytes, &environment, "memory").expect("policy loads");
    let actual = policy
        .probabilities_batch(embeddings.view(), &w_quality)
        .expect("batch runs");
    let worst = max_abs_difference(&expected, &actual);
    assert!(worst <= 1e-5, "ONNX Runtime and Rust differ by {worst}");
}

/// A `pref_weight` with neither 2 nor 3 rows is an error naming the initializer.
#[test]
fn wrong_preference_weight_height_rejected() {
    let (mut network, metadata) = trained_policy();
    let extra = network.pref_weight.row(0).to_owned();
    network
        .pref_weight
        .push_row(extra.view())
        .expect("same width");
    let bytes = to_onnx_bytes(&network, &metadata);
    let error = from_onnx(&llmroute_policy::onnx::decode(&bytes).expect("decodes"))
        .expect_err("4 preference inputs rejected");
    assert!(error.to_string().contains("pref_weight"), "{error}");
}

/// Weight shapes whose element count is negative or overflows are errors, not panics.
#[test]
fn weight_shapes_that_overflow_are_rejected() {
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    let cases: [(&[i64], usize); 4] = [
        (&[1 << 32, 1 << 32], 0),
        (&[-1, -384], 384),
        (&[i64::MAX, 2], 0),
        (&[384], 384),
    ];
    for (dims, values) in cases {
        let mut model = llmroute_policy::onnx::decode(&bytes).expect("decodes");
        let graph = model.graph.as_mut().expect("graph");
        let weight = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == "hidden_weight")
            .expect("hidden_weight initializer");
        weight.dims = dims.to_vec();
        weight.raw_data = vec![0; values * 4];
        let error = from_onnx(&model).expect_err("shape rejected");
        assert!(
            error.to_string().contains("hidden_weight"),
            "{dims:?}: {error}"
        );
    }
}

#[test]
fn onnx_policy_weights_round_trip() {
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    let model = llmroute_policy::onnx::decode(&bytes).expect("decodes");
    let restored = from_onnx(&model).expect("weights read back");
    assert_eq!(restored.pref_weight, network.pref_weight);
    assert_eq!(restored.hidden_weight, network.hidden_weight);
    assert_eq!(restored.logit_weight, network.logit_weight);
    assert_eq!(restored.logit_bias, network.logit_bias);
}

#[test]
fn malformed_policy_files_are_errors() {
    let environment = environment();
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);

    let truncated = OnnxPolicy::from_bytes(&bytes[..bytes.len() / 2], &environment, "half.onnx");
    let message = truncated.expect_err("truncated file rejected").to_string();
    assert!(message.contains("half.onnx"), "{message}");

    let garbage = OnnxPolicy::from_bytes(b"not a model at all", &environment, "garbage.onnx");
    assert!(
        matches!(garbage, Err(InferenceError::Malformed { .. })),
        "{garbage:?}"
    );

    let error = OnnxPolicy::load(
        std::path::Path::new("/nonexistent/policy.onnx"),
        &environment,
    )
    .expect_err("missing file rejected");
    assert!(
        error.to_string().contains("/nonexistent/policy.onnx"),
        "{error}"
    );

    let mut policy = OnnxPolicy::from_bytes(&bytes, &environment, "memory").expect("policy loads");
    let short = policy
        .probabilities(&[0.0; 10], 0.5)
        .expect_err("short embedding rejected");
    assert!(
        matches!(
            short,
            InferenceError::EmbeddingSize {
                found: 10,
                expected: 384,
                ..
            }
        ),
        "{short}"
    );
    let preference = policy
        .probabilities(&[0.0; 384], 1.5)
        .expect_err("preference out of range");
    assert!(
        matches!(preference, InferenceError::Preference(_)),
        "{preference}"
    );
}

/// Edits a copy of an encoded policy and returns the new file's bytes.
fn edited(
    bytes: &[u8],
    edit: impl FnOnce(&mut llmroute_policy::onnx::proto::ModelProto),
) -> Vec<u8> {
    let mut model = llmroute_policy::onnx::decode(bytes).expect("decodes");
    edit(&mut model);
    llmroute_policy::onnx::encode(&model)
}

/// Sets metadata `key` of `model` to `value`.
fn set_metadata(model: &mut llmroute_policy::onnx::proto::ModelProto, key: &str, value: &str) {
    let entry = model
        .metadata_props
        .iter_mut()
        .find(|entry| entry.key == key)
        .expect("metadata key present");
    entry.value = value.to_string();
}

/// NaN or infinite weights are rejected at load, naming the initializer: served, they would
/// make every propensity NaN, and the argmax would quietly pick the first model.
#[test]
fn non_finite_weights_are_rejected_at_load() {
    let environment = environment();
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    for (name, value) in [
        ("logit_bias", f32::NAN),
        ("hidden_weight", f32::INFINITY),
        ("pref_bias", f32::NEG_INFINITY),
    ] {
        let broken = edited(&bytes, |model| {
            let tensor = model
                .graph
                .as_mut()
                .expect("graph")
                .initializer
                .iter_mut()
                .find(|t| t.name == name)
                .expect("initializer present");
            tensor.raw_data[..4].copy_from_slice(&value.to_le_bytes());
        });
        let error = OnnxPolicy::from_bytes(&broken, &environment, "nan.onnx")
            .expect_err("non-finite weights rejected");
        let message = error.to_string();
        assert!(message.contains("nan.onnx"), "{message}");
        assert!(message.contains(&format!("`{name}`")), "{message}");
        assert!(message.contains("NaN or infinite values"), "{message}");
        let model = llmroute_policy::onnx::decode(&broken).expect("decodes");
        assert!(from_onnx(&model).is_err(), "{name}: from_onnx accepted it");
    }
}

/// A graph without the `probabilities` output is an error at load, not a panic on a request.
#[test]
fn missing_probabilities_output_rejected() {
    let environment = environment();
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    let broken = edited(&bytes, |model| {
        let graph = model.graph.as_mut().expect("graph");
        graph.output.retain(|output| output.name != "probabilities");
    });
    let message = OnnxPolicy::from_bytes(&broken, &environment, "no-output.onnx")
        .expect_err("missing output rejected")
        .to_string();
    assert!(message.contains("no-output.onnx"), "{message}");
    assert!(message.contains("no output `probabilities`"), "{message}");
}

/// Metadata that disagrees with the graph fails the trial decision at load, naming the file.
#[test]
fn mismatched_metadata_fails_at_load() {
    let environment = environment();
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    let cases = [
        ("llmroute.models", r#"["a","b","c"]"#, "llmroute.models"),
        (
            "llmroute.models",
            r#"["a","b","c","d","e"]"#,
            "llmroute.models",
        ),
        ("llmroute.embedding_dim", "100", "embedding"),
    ];
    for (key, value, expected) in cases {
        let broken = edited(&bytes, |model| set_metadata(model, key, value));
        let message = OnnxPolicy::from_bytes(&broken, &environment, "lying.onnx")
            .expect_err("metadata mismatch rejected")
            .to_string();
        assert!(message.contains("lying.onnx"), "{key}={value}: {message}");
        assert!(
            message.contains("trial decision"),
            "{key}={value}: {message}"
        );
        assert!(message.contains(expected), "{key}={value}: {message}");
    }
}

/// Blank or repeated model names, a zero embedding size and an empty version are metadata
/// errors naming the key.
#[test]
fn invalid_metadata_values_are_rejected() {
    let environment = environment();
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    let cases = [
        ("llmroute.models", r#"["a","b","a","d"]"#, "listed twice"),
        ("llmroute.models", r#"["a","","c","d"]"#, "empty name"),
        ("llmroute.embedding_dim", "0", "positive integer"),
        (
            "llmroute.embedding_dim",
            "10000000000000",
            "positive integer up to 65536",
        ),
        ("llmroute.policy_version", " ", "version is empty"),
    ];
    for (key, value, reason) in cases {
        let broken = edited(&bytes, |model| set_metadata(model, key, value));
        let error = OnnxPolicy::from_bytes(&broken, &environment, "bad.onnx")
            .expect_err("invalid metadata rejected");
        let message = error.to_string();
        assert!(
            matches!(error, InferenceError::Malformed { .. }),
            "{key}={value}: {message}"
        );
        assert!(message.contains(key), "{key}={value}: {message}");
        assert!(message.contains(reason), "{key}={value}: {message}");
    }
}

/// A graph whose `probabilities` are not a distribution (here the softmax replaced by a ReLU)
/// is rejected, because propensities feed the importance weights of off-policy evaluation.
#[test]
fn non_propensity_outputs_rejected() {
    let environment = environment();
    let (network, metadata) = trained_policy();
    let bytes = to_onnx_bytes(&network, &metadata);
    let broken = edited(&bytes, |model| {
        let graph = model.graph.as_mut().expect("graph");
        let softmax = graph
            .node
            .iter_mut()
            .find(|node| node.op_type == "Softmax")
            .expect("softmax node");
        softmax.op_type = "Relu".to_string();
        softmax.attribute.clear();
    });
    let message = OnnxPolicy::from_bytes(&broken, &environment, "relu.onnx")
        .expect_err("non-propensities rejected")
        .to_string();
    assert!(message.contains("relu.onnx"), "{message}");
    assert!(message.contains("not propensities"), "{message}");
}
