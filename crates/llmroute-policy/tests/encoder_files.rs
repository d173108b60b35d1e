//! A damaged `encoder.onnx` is an error at load that names the file and `llmroute setup`:
//! another ONNX model in its place, and weights that make the embeddings NaN. Needs the assets
//! of `llmroute setup`. The damaged copies are written to a temporary folder.

use std::path::Path;

use llmroute_policy::assets::{self, Assets};
use llmroute_policy::encoder::{Encoder, EncoderError};
use llmroute_policy::onnx::{self, proto::ModelProto};

fn assets() -> Assets {
    let cache = assets::default_cache_dir().unwrap_or_else(|error| panic!("{error}"));
    Assets::locate(&cache).unwrap_or_else(|error| panic!("{error}"))
}

/// Returns the real assets with `encoder.onnx` replaced by `model` written into `dir`.
fn assets_with_encoder(dir: &Path, model: &ModelProto) -> Assets {
    let path = dir.join("encoder.onnx");
    std::fs::write(&path, onnx::encode(model)).unwrap();
    Assets {
        encoder: path,
        ..assets()
    }
}

fn load_error(assets: &Assets) -> EncoderError {
    Encoder::load(assets, 1).expect_err("the damaged encoder was accepted")
}

#[test]
fn nan_encoder_weights_fail_at_load() {
    let real = assets();
    let mut model = onnx::decode(&std::fs::read(&real.encoder).unwrap()).unwrap();
    let tensor = model
        .graph
        .as_mut()
        .expect("graph")
        .initializer
        .iter_mut()
        .find(|tensor| tensor.name == "token_type_0")
        .expect("the token type 0 row, added to every token");
    tensor.raw_data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let damaged = assets_with_encoder(dir.path(), &model);
    let error = load_error(&damaged);
    let message = error.to_string();
    assert!(matches!(error, EncoderError::NonFinite { .. }), "{message}");
    assert!(
        message.contains(&damaged.encoder.display().to_string()),
        "{message}"
    );
    assert!(message.contains("llmroute setup"), "{message}");
}

#[test]
fn foreign_encoder_model_is_named() {
    let real = assets();
    let mut model = onnx::decode(&std::fs::read(&real.encoder).unwrap()).unwrap();
    let graph = model.graph.as_mut().expect("graph");
    let input = graph
        .input
        .iter_mut()
        .find(|input| input.name == "input_ids")
        .expect("input_ids");
    input.name = "tokens".to_string();
    for node in &mut graph.node {
        for name in &mut node.input {
            if name == "input_ids" {
                *name = "tokens".to_string();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let damaged = assets_with_encoder(dir.path(), &model);
    let message = load_error(&damaged).to_string();
    assert!(message.contains("is not the prompt encoder"), "{message}");
    assert!(message.contains("no input `input_ids`"), "{message}");
    assert!(
        message.contains(&damaged.encoder.display().to_string()),
        "{message}"
    );
}

#[test]
fn token_id_past_vocabulary_names_tokenizer() {
    let real = assets();
    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&real.tokenizer).unwrap()).unwrap();
    tokenizer["model"]["vocab"]["hello"] = serde_json::json!(40_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_vec(&tokenizer).unwrap()).unwrap();
    let damaged = Assets {
        tokenizer: path.clone(),
        ..real
    };
    let mut encoder = Encoder::load(&damaged, 1).expect("other words still embed");
    let error = encoder.embed("hello").expect_err("id 40000 rejected");
    let message = error.to_string();
    assert!(message.contains("token id 40000"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("llmroute setup"), "{message}");
}
