//! Writes a trained policy as an ONNX graph and reads its weights back.
//!
//! The graph computes exactly [`PolicyNetwork::forward`] without the value head:
//! `probabilities = softmax(relu([embedding; tanh(p(preference) · W_p + b_p)] · W_1 + b_1) · W_2 + b_2)`,
//! with `p(w) = [w; ℓ(w)]` and the log-odds
//! `ℓ(w) = (ln max(w_quality, ε) − ln max(w_cost, ε)) / s` of [`super::network::log_odds`] (policies written
//! before `ℓ` existed have `p(w) = w`).
//! The batch dimension is symbolic, so one file serves single decisions and batches.

use ndarray::{Array1, Array2};

use super::metadata::{POLICY_FORMAT, PolicyMetadata, keys, tensors};
use super::network::{
    LOG_ODDS_FLOOR, LOG_ODDS_SCALE, NetworkShape, PREFERENCE_INPUTS, PolicyNetwork,
};
use crate::onnx::{self, Dim, FLOAT, GraphBuilder, attr_int, proto::ModelProto};

/// Initializer names in the exported graph.
const PREF_WEIGHT: &str = "pref_weight";
const PREF_BIAS: &str = "pref_bias";
const HIDDEN_WEIGHT: &str = "hidden_weight";
const HIDDEN_BIAS: &str = "hidden_bias";
const LOGIT_WEIGHT: &str = "logit_weight";
const LOGIT_BIAS: &str = "logit_bias";
/// Initializer names of the log-odds constants: the floor ε, and the `[2 × 1]` matrix
/// `(1/s, −1/s)` that turns `(ln w_quality, ln w_cost)` into `ℓ`.
const LOG_ODDS_FLOOR_NAME: &str = "log_odds_floor";
const LOG_ODDS_WEIGHT: &str = "log_odds_weight";

/// Largest `llmroute.embedding_dim` a policy file may state. Sentence encoders produce a few
/// hundred to a few thousand values, and a larger claim would only size allocations.
pub const MAX_EMBEDDING_DIM: usize = 1 << 16;

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error(
        "not an ONNX model ({0}); the file is truncated or not a policy written by `llmroute train`"
    )]
    Decode(#[from] prost::DecodeError),
    #[error("the ONNX model has no metadata key `{0}`; it was not written by `llmroute train`")]
    MissingMetadata(&'static str),
    #[error(
        "the policy format is `{found}`, but this build reads `{POLICY_FORMAT}`; retrain it with this version of llmroute"
    )]
    WrongFormat { found: String },
    #[error("invalid metadata `{key}` = `{value}`: {reason}")]
    InvalidMetadata {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("the ONNX model has no initializer `{0}`; the file is not a BaRP policy")]
    MissingWeights(&'static str),
    #[error(
        "initializer `{name}` contains {count} NaN or infinite values; the file is corrupt, or training diverged: retrain the policy"
    )]
    NonFiniteWeights { name: String, count: usize },
    #[error(
        "the graph has no {kind} `{name}`; a policy written by `llmroute train` has inputs `embedding` and `preference` and output `probabilities`"
    )]
    MissingTensor {
        kind: &'static str,
        name: &'static str,
    },
    #[error("initializer `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        name: &'static str,
        found: Vec<i64>,
        expected: Vec<usize>,
    },
}

/// Builds the ONNX model of `network` with `metadata` in its `metadata_props`.
pub fn to_onnx(network: &PolicyNetwork, metadata: &PolicyMetadata) -> ModelProto {
    assert_eq!(
        metadata.models.len(),
        network.shape.num_models,
        "one model name per action"
    );
    let shape = network.shape;
    let mut graph = GraphBuilder::new("barp_policy");
    let batch = Dim::Symbolic("batch");
    let embedding = graph.input(
        tensors::EMBEDDING,
        FLOAT,
        &[batch, Dim::Fixed(shape.embedding_dim as i64)],
    );
    let preference = graph.input(tensors::PREFERENCE, FLOAT, &[batch, Dim::Fixed(2)]);

    let weights = [
        (PREF_WEIGHT, &network.pref_weight),
        (HIDDEN_WEIGHT, &network.hidden_weight),
        (LOGIT_WEIGHT, &network.logit_weight),
    ];
    for (name, weight) in weights {
        graph.initializer_f32(
            name,
            &[weight.nrows(), weight.ncols()],
            weight.as_slice().expect("standard layout"),
        );
    }
    let biases = [
        (PREF_BIAS, &network.pref_bias),
        (HIDDEN_BIAS, &network.hidden_bias),
        (LOGIT_BIAS, &network.logit_bias),
    ];
    for (name, bias) in biases {
        graph.initializer_f32(
            name,
            &[bias.len()],
            bias.as_slice().expect("standard layout"),
        );
    }

    // p(w) = [w; ℓ(w)], ℓ(w) = (ln max(w_quality, ε) − ln max(w_cost, ε)) / s
    let pref_inputs = if network.pref_weight.nrows() == PREFERENCE_INPUTS {
        graph.initializer_f32(LOG_ODDS_FLOOR_NAME, &[1], &[LOG_ODDS_FLOOR]);
        graph.initializer_f32(
            LOG_ODDS_WEIGHT,
            &[2, 1],
            &[1.0 / LOG_ODDS_SCALE, -1.0 / LOG_ODDS_SCALE],
        );
        let floored = graph.node("Max", &[&preference, LOG_ODDS_FLOOR_NAME], vec![]);
        let logs = graph.node("Log", &[&floored], vec![]);
        let odds = graph.node("MatMul", &[&logs, LOG_ODDS_WEIGHT], vec![]);
        graph.node("Concat", &[&preference, &odds], vec![attr_int("axis", 1)])
    } else {
        preference.clone()
    };
    // φ(w) = tanh(p(w) · W_p + b_p)
    let pref_linear = graph.node("MatMul", &[&pref_inputs, PREF_WEIGHT], vec![]);
    let pref_shifted = graph.node("Add", &[&pref_linear, PREF_BIAS], vec![]);
    let pref_features = graph.node("Tanh", &[&pref_shifted], vec![]);

    // u = relu([h(x); φ(w)] · W_1 + b_1)
    let head_input = graph.node(
        "Concat",
        &[&embedding, &pref_features],
        vec![attr_int("axis", 1)],
    );
    let hidden_linear = graph.node("MatMul", &[&head_input, HIDDEN_WEIGHT], vec![]);
    let hidden_shifted = graph.node("Add", &[&hidden_linear, HIDDEN_BIAS], vec![]);
    let hidden = graph.node("Relu", &[&hidden_shifted], vec![]);

    // z = u · W_2 + b_2, π = softmax(z)
    let logit_linear = graph.node("MatMul", &[&hidden, LOGIT_WEIGHT], vec![]);
    graph.node_with_outputs(
        "Add",
        &[&logit_linear, LOGIT_BIAS],
        &[tensors::LOGITS],
        vec![],
    );
    graph.node_with_outputs(
        "Softmax",
        &[tensors::LOGITS],
        &[tensors::PROBABILITIES],
        vec![attr_int("axis", -1)],
    );

    let models = Dim::Fixed(shape.num_models as i64);
    graph.output(tensors::LOGITS, FLOAT, &[batch, models]);
    graph.output(tensors::PROBABILITIES, FLOAT, &[batch, models]);

    let properties = [
        (keys::FORMAT, POLICY_FORMAT.to_string()),
        (keys::VERSION, metadata.version.clone()),
        (
            keys::MODELS,
            serde_json::to_string(&metadata.models).expect("strings serialise"),
        ),
        (keys::ENCODER, metadata.encoder.clone()),
        (keys::EMBEDDING_DIM, metadata.embedding_dim.to_string()),
        (keys::COST_SCALE, metadata.cost_scale_usd.to_string()),
    ];
    graph.finish(
        "BaRP routing policy: preference-conditioned softmax over the route's models",
        &properties,
    )
}

/// Serialises `network` to the bytes of a policy `.onnx` file.
pub fn to_onnx_bytes(network: &PolicyNetwork, metadata: &PolicyMetadata) -> Vec<u8> {
    onnx::encode(&to_onnx(network, metadata))
}

/// Reads the metadata of a policy file without running it.
pub fn read_metadata(model: &ModelProto) -> Result<PolicyMetadata, PolicyFileError> {
    let lookup = |key: &'static str| {
        model
            .metadata_props
            .iter()
            .find(|entry| entry.key == key)
            .map(|entry| entry.value.clone())
            .ok_or(PolicyFileError::MissingMetadata(key))
    };
    let format = lookup(keys::FORMAT)?;
    if format != POLICY_FORMAT {
        return Err(PolicyFileError::WrongFormat { found: format });
    }
    let models_text = lookup(keys::MODELS)?;
    let models: Vec<String> =
        serde_json::from_str(&models_text).map_err(|e| PolicyFileError::InvalidMetadata {
            key: keys::MODELS,
            value: models_text.clone(),
            reason: format!("expected a JSON array of model names ({e})"),
        })?;
    if models.is_empty() {
        return Err(PolicyFileError::InvalidMetadata {
            key: keys::MODELS,
            value: models_text,
            reason: "the policy names no model".to_string(),
        });
    }
    // Output column k is models[k]: a blank or repeated name would make two columns one model,
    // or route to a model no route can name.
    if let Some(blank) = models.iter().position(|name| name.trim().is_empty()) {
        return Err(PolicyFileError::InvalidMetadata {
            key: keys::MODELS,
            value: models_text,
            reason: format!("model {blank} has an empty name"),
        });
    }
    if let Some((index, name)) = models
        .iter()
        .enumerate()
        .find(|(index, name)| models[..*index].contains(name))
    {
        return Err(PolicyFileError::InvalidMetadata {
            key: keys::MODELS,
            value: models_text.clone(),
            reason: format!("model {name:?} is listed twice (again at position {index})"),
        });
    }
    let dim_text = lookup(keys::EMBEDDING_DIM)?;
    let embedding_dim = dim_text
        .parse()
        .ok()
        .filter(|dim: &usize| (1..=MAX_EMBEDDING_DIM).contains(dim))
        .ok_or_else(|| PolicyFileError::InvalidMetadata {
            key: keys::EMBEDDING_DIM,
            value: dim_text.clone(),
            reason: format!("expected a positive integer up to {MAX_EMBEDDING_DIM}"),
        })?;
    let tau_text = lookup(keys::COST_SCALE)?;
    let cost_scale_usd: f32 = tau_text
        .parse()
        .ok()
        .filter(|tau: &f32| *tau > 0.0 && tau.is_finite())
        .ok_or_else(|| PolicyFileError::InvalidMetadata {
            key: keys::COST_SCALE,
            value: tau_text.clone(),
            reason: "expected a positive number of USD".to_string(),
        })?;
    let version = lookup(keys::VERSION)?;
    if version.trim().is_empty() {
        return Err(PolicyFileError::InvalidMetadata {
            key: keys::VERSION,
            value: version,
            reason: "the policy version is empty".to_string(),
        });
    }
    Ok(PolicyMetadata {
        format,
        version,
        models,
        encoder: lookup(keys::ENCODER)?,
        embedding_dim,
        cost_scale_usd,
    })
}

/// Checks the graph's interface and weights before ONNX Runtime builds a session from it: the
/// inputs `embedding` and `preference`, the output `probabilities`, and only finite values in
/// every float initializer. A NaN weight makes every propensity NaN, and an argmax over NaN
/// silently picks the first model.
pub fn check_graph(model: &ModelProto) -> Result<(), PolicyFileError> {
    let graph = model.graph.as_ref().ok_or(PolicyFileError::MissingTensor {
        kind: "output",
        name: tensors::PROBABILITIES,
    })?;
    for name in [tensors::EMBEDDING, tensors::PREFERENCE] {
        if !graph.input.iter().any(|input| input.name == name) {
            return Err(PolicyFileError::MissingTensor {
                kind: "input",
                name,
            });
        }
    }
    if !graph
        .output
        .iter()
        .any(|output| output.name == tensors::PROBABILITIES)
    {
        return Err(PolicyFileError::MissingTensor {
            kind: "output",
            name: tensors::PROBABILITIES,
        });
    }
    for tensor in &graph.initializer {
        if tensor.data_type != FLOAT {
            continue;
        }
        let raw = tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let count = raw
            .chain(tensor.float_data.iter().copied())
            .filter(|value| !value.is_finite())
            .count();
        if count > 0 {
            return Err(PolicyFileError::NonFiniteWeights {
                name: tensor.name.clone(),
                count,
            });
        }
    }
    Ok(())
}

/// Reads the weights of a policy file back into a network, for continued training from a
/// stable policy. The value head is not exported, so it restarts at zero.
pub fn from_onnx(model: &ModelProto) -> Result<PolicyNetwork, PolicyFileError> {
    let metadata = read_metadata(model)?;
    check_graph(model)?;
    let graph = model
        .graph
        .as_ref()
        .ok_or(PolicyFileError::MissingWeights(HIDDEN_WEIGHT))?;
    let tensor = |name: &'static str| -> Result<(Vec<i64>, Vec<f32>), PolicyFileError> {
        let tensor = graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .ok_or(PolicyFileError::MissingWeights(name))?;
        let values = tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((tensor.dims.clone(), values))
    };
    let matrix = |name: &'static str,
                  expected: Option<[usize; 2]>|
     -> Result<Array2<f32>, PolicyFileError> {
        let (dims, values) = tensor(name)?;
        // Negative dimensions fail the conversion, and a product past usize fails the
        // multiplication, so a crafted file cannot pass with a wrapped element count.
        let shape = match dims.as_slice() {
            [rows, cols] => usize::try_from(*rows).ok().zip(usize::try_from(*cols).ok()),
            _ => None,
        }
        .filter(|&(rows, cols)| rows.checked_mul(cols) == Some(values.len()))
        .filter(|&(rows, cols)| expected.is_none_or(|e| rows == e[0] && cols == e[1]));
        let Some((rows, cols)) = shape else {
            return Err(PolicyFileError::WrongShape {
                name,
                found: dims,
                expected: expected.map(|e| e.to_vec()).unwrap_or_default(),
            });
        };
        Ok(Array2::from_shape_vec((rows, cols), values).expect("checked shape"))
    };
    let vector = |name: &'static str, expected: usize| -> Result<Array1<f32>, PolicyFileError> {
        let (dims, values) = tensor(name)?;
        if dims != [expected as i64] || values.len() != expected {
            return Err(PolicyFileError::WrongShape {
                name,
                found: dims,
                expected: vec![expected],
            });
        }
        Ok(Array1::from(values))
    };

    let pref_weight = matrix(PREF_WEIGHT, None)?;
    let preference_dim = pref_weight.ncols();
    let hidden_weight = matrix(HIDDEN_WEIGHT, None)?;
    let hidden_dim = hidden_weight.ncols();
    let shape = NetworkShape {
        embedding_dim: metadata.embedding_dim,
        preference_dim,
        hidden_dim,
        num_models: metadata.models.len(),
    };
    if pref_weight.nrows() != 2 && pref_weight.nrows() != PREFERENCE_INPUTS {
        return Err(PolicyFileError::WrongShape {
            name: PREF_WEIGHT,
            found: vec![pref_weight.nrows() as i64, preference_dim as i64],
            expected: vec![PREFERENCE_INPUTS, preference_dim],
        });
    }
    if hidden_weight.nrows() != shape.head_input_dim() {
        return Err(PolicyFileError::WrongShape {
            name: HIDDEN_WEIGHT,
            found: vec![hidden_weight.nrows() as i64, hidden_dim as i64],
            expected: vec![shape.head_input_dim(), hidden_dim],
        });
    }
    Ok(PolicyNetwork {
        shape,
        pref_weight,
        pref_bias: vector(PREF_BIAS, preference_dim)?,
        hidden_weight,
        hidden_bias: vector(HIDDEN_BIAS, hidden_dim)?,
        logit_weight: matrix(LOGIT_WEIGHT, Some([hidden_dim, shape.num_models]))?,
        logit_bias: vector(LOGIT_BIAS, shape.num_models)?,
        value_weight: Array1::zeros(hidden_dim),
        value_bias: 0.0,
    })
}
