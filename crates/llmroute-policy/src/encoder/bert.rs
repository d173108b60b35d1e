//! Building the all-MiniLM-L6-v2 sentence encoder as an ONNX graph from its safetensors
//! weights, so that no Python export step is needed.
//!
//! The graph reproduces the sentence-transformers pipeline of the model. A 6-layer BERT
//! (hidden size 384, 12 heads of 32, GELU with erf, layer-norm epsilon 1e-12) is followed by
//! mean pooling over the last hidden state, weighted by the attention mask (which includes
//! `[CLS]` and `[SEP]`), and by L2 normalisation. Inputs are `input_ids` and `attention_mask`, int64
//! `[batch, sequence]`; the output `embedding` is float `[batch, 384]`.

use safetensors::{Dtype, SafeTensors};

use crate::onnx::proto::ModelProto;
use crate::onnx::{Dim, FLOAT, GraphBuilder, INT64, attr_float, attr_int, attr_ints};

/// Hidden size of all-MiniLM-L6-v2 (from its `config.json`).
pub const HIDDEN: usize = 384;
const HEADS: usize = 12;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 6;
const INTERMEDIATE: usize = 1536;
/// Number of rows of the word-piece embedding table (`vocab_size` in `config.json`).
pub const VOCABULARY: usize = 30522;
const MAX_POSITIONS: usize = 512;
const LAYER_NORM_EPSILON: f32 = 1e-12;
/// Default epsilon of `torch.nn.functional.normalize`, which sentence-transformers' Normalize
/// module calls: the norm is clamped to at least this value before dividing.
const NORMALIZE_EPSILON: f32 = 1e-12;
/// sentence-transformers clamps the mask sum to at least 1e-9 before dividing.
const MASK_SUM_MIN: f32 = 1e-9;

/// Version of the graph layout below. Bump it when the graph changes, so that `llmroute setup`
/// rebuilds `encoder.onnx` files built by an older llmroute.
pub const GRAPH_VERSION: u32 = 1;

/// A failure to read the weights or to build the graph from them.
#[derive(Debug, thiserror::Error)]
pub enum BertBuildError {
    #[error("invalid safetensors file: {0}; delete it and run `llmroute setup` again")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error(
        "tensor {name} in the safetensors file has dtype {dtype:?} and shape {shape:?}, expected F32 {expected:?}; the file is not all-MiniLM-L6-v2"
    )]
    UnexpectedTensor {
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// Builds the encoder model from the bytes of all-MiniLM-L6-v2's `model.safetensors`.
///
/// `metadata` is stored in the model's `metadata_props`.
pub fn build_encoder_model(
    safetensors: &[u8],
    metadata: &[(&str, String)],
) -> Result<ModelProto, BertBuildError> {
    let weights = Weights(SafeTensors::deserialize(safetensors)?);
    let mut graph = GraphBuilder::new("all_minilm_l6_v2");
    let batch_sequence = [Dim::Symbolic("batch"), Dim::Symbolic("sequence")];
    let input_ids = graph.input("input_ids", INT64, &batch_sequence);
    let attention_mask = graph.input("attention_mask", INT64, &batch_sequence);
    let constants = Constants::add(&mut graph);

    let hidden = embeddings(&mut graph, &weights, &constants, &input_ids)?;

    // The mask as float [batch, sequence] for pooling, and as an additive attention bias
    // [batch, 1, 1, sequence]: 0 for real tokens and the float32 minimum for padding, as in
    // Hugging Face transformers.
    let mask = graph.node(
        "Cast",
        &[&attention_mask],
        vec![attr_int("to", FLOAT as i64)],
    );
    let inverted = graph.node("Sub", &[&constants.one, &mask], vec![]);
    let bias = graph.node("Mul", &[&inverted, &constants.float_min], vec![]);
    let bias = graph.node("Unsqueeze", &[&bias, &constants.axes_1_2], vec![]);

    let mut hidden = hidden;
    for layer in 0..LAYERS {
        hidden = encoder_layer(&mut graph, &weights, &constants, layer, &hidden, &bias)?;
    }

    pool_and_normalize(&mut graph, &constants, &hidden, &mask);
    graph.output(
        "embedding",
        FLOAT,
        &[Dim::Symbolic("batch"), Dim::Fixed(HIDDEN as i64)],
    );
    Ok(graph.finish(
        "all-MiniLM-L6-v2 sentence encoder: mean pooling and L2 normalisation, built by llmroute from model.safetensors",
        metadata,
    ))
}

/// Shared constant initializers.
struct Constants {
    one: String,
    float_min: String,
    attention_scale: String,
    sqrt_2: String,
    half: String,
    mask_sum_min: String,
    normalize_epsilon: String,
    split_heads: String,
    merge_heads: String,
    axes_1: String,
    axes_1_2: String,
    axes_2: String,
    zero: String,
    one_i64: String,
    sequence_axis: String,
}

impl Constants {
    fn add(graph: &mut GraphBuilder) -> Self {
        Self {
            one: graph.initializer_f32("one", &[], &[1.0]),
            float_min: graph.initializer_f32("float_min", &[], &[f32::MIN]),
            // Scores are divided by sqrt(head dim), as in BertSelfAttention.
            attention_scale: graph.initializer_f32(
                "sqrt_head_dim",
                &[],
                &[(HEAD_DIM as f32).sqrt()],
            ),
            sqrt_2: graph.initializer_f32("sqrt_2", &[], &[std::f32::consts::SQRT_2]),
            half: graph.initializer_f32("half", &[], &[0.5]),
            mask_sum_min: graph.initializer_f32("mask_sum_min", &[], &[MASK_SUM_MIN]),
            normalize_epsilon: graph.initializer_f32(
                "normalize_epsilon",
                &[],
                &[NORMALIZE_EPSILON],
            ),
            // Reshape copies a dimension from the input where the target shape contains 0, so the
            // batch and sequence dimensions stay dynamic.
            split_heads: graph.initializer_i64(
                "split_heads",
                &[4],
                &[0, 0, HEADS as i64, HEAD_DIM as i64],
            ),
            merge_heads: graph.initializer_i64("merge_heads", &[3], &[0, 0, HIDDEN as i64]),
            axes_1: graph.initializer_i64("axes_1", &[1], &[1]),
            axes_1_2: graph.initializer_i64("axes_1_2", &[2], &[1, 2]),
            axes_2: graph.initializer_i64("axes_2", &[1], &[2]),
            zero: graph.initializer_i64("zero", &[], &[0]),
            one_i64: graph.initializer_i64("one_i64", &[], &[1]),
            sequence_axis: graph.initializer_i64("sequence_axis", &[], &[1]),
        }
    }
}

/// Word, position and token-type embeddings, then layer norm: `[batch, sequence, 384]`.
fn embeddings(
    graph: &mut GraphBuilder,
    weights: &Weights,
    constants: &Constants,
    input_ids: &str,
) -> Result<String, BertBuildError> {
    let word_table = weights.add(
        graph,
        "embeddings.word_embeddings.weight",
        &[VOCABULARY, HIDDEN],
    )?;
    let position_table = weights.add(
        graph,
        "embeddings.position_embeddings.weight",
        &[MAX_POSITIONS, HIDDEN],
    )?;
    // Every input is a single segment, so the token type is always 0: only row 0 is used.
    let token_types = weights.f32("embeddings.token_type_embeddings.weight", &[2, HIDDEN])?;
    let token_type_0 = graph.initializer_f32("token_type_0", &[HIDDEN], &token_types[..HIDDEN]);

    let words = graph.node("Gather", &[&word_table, input_ids], vec![]);
    let shape = graph.node("Shape", &[input_ids], vec![]);
    let length = graph.node("Gather", &[&shape, &constants.sequence_axis], vec![]);
    let positions = graph.node(
        "Range",
        &[&constants.zero, &length, &constants.one_i64],
        vec![],
    );
    let position_vectors = graph.node("Gather", &[&position_table, &positions], vec![]);

    // Same order of additions as BertEmbeddings: words + token type, then + position.
    let sum = graph.node("Add", &[&words, &token_type_0], vec![]);
    let sum = graph.node("Add", &[&sum, &position_vectors], vec![]);
    layer_norm(graph, weights, "embeddings.LayerNorm", &sum)
}

/// Adds one transformer layer: self-attention and the feed-forward block, each followed by a
/// residual connection and layer norm.
fn encoder_layer(
    graph: &mut GraphBuilder,
    weights: &Weights,
    constants: &Constants,
    layer: usize,
    input: &str,
    bias: &str,
) -> Result<String, BertBuildError> {
    let prefix = format!("encoder.layer.{layer}");
    let heads = |graph: &mut GraphBuilder, name: &str, perm: &[i64]| {
        let projected = linear(
            graph,
            weights,
            &format!("{prefix}.attention.self.{name}"),
            input,
            HIDDEN,
            HIDDEN,
        )?;
        let split = graph.node("Reshape", &[&projected, &constants.split_heads], vec![]);
        Ok::<_, BertBuildError>(graph.node("Transpose", &[&split], vec![attr_ints("perm", perm)]))
    };
    // Query and value are [batch, heads, sequence, 32]. Key is transposed to [batch, heads, 32, sequence].
    let query = heads(graph, "query", &[0, 2, 1, 3])?;
    let key = heads(graph, "key", &[0, 2, 3, 1])?;
    let value = heads(graph, "value", &[0, 2, 1, 3])?;

    let scores = graph.node("MatMul", &[&query, &key], vec![]);
    let scores = graph.node("Div", &[&scores, &constants.attention_scale], vec![]);
    let scores = graph.node("Add", &[&scores, bias], vec![]);
    let probabilities = graph.node("Softmax", &[&scores], vec![attr_int("axis", -1)]);
    let context = graph.node("MatMul", &[&probabilities, &value], vec![]);
    let context = graph.node(
        "Transpose",
        &[&context],
        vec![attr_ints("perm", &[0, 2, 1, 3])],
    );
    let context = graph.node("Reshape", &[&context, &constants.merge_heads], vec![]);

    let attention = linear(
        graph,
        weights,
        &format!("{prefix}.attention.output.dense"),
        &context,
        HIDDEN,
        HIDDEN,
    )?;
    let residual = graph.node("Add", &[&attention, input], vec![]);
    let attended = layer_norm(
        graph,
        weights,
        &format!("{prefix}.attention.output.LayerNorm"),
        &residual,
    )?;

    let intermediate = linear(
        graph,
        weights,
        &format!("{prefix}.intermediate.dense"),
        &attended,
        HIDDEN,
        INTERMEDIATE,
    )?;
    let activated = gelu(graph, constants, &intermediate);
    let output = linear(
        graph,
        weights,
        &format!("{prefix}.output.dense"),
        &activated,
        INTERMEDIATE,
        HIDDEN,
    )?;
    let residual = graph.node("Add", &[&output, &attended], vec![]);
    layer_norm(
        graph,
        weights,
        &format!("{prefix}.output.LayerNorm"),
        &residual,
    )
}

/// Exact GELU, `x * 0.5 * (1 + erf(x / sqrt(2)))`, in the order of Hugging Face's `gelu`.
fn gelu(graph: &mut GraphBuilder, constants: &Constants, input: &str) -> String {
    let scaled = graph.node("Div", &[input, &constants.sqrt_2], vec![]);
    let erf = graph.node("Erf", &[&scaled], vec![]);
    let shifted = graph.node("Add", &[&erf, &constants.one], vec![]);
    let half = graph.node("Mul", &[input, &constants.half], vec![]);
    graph.node("Mul", &[&half, &shifted], vec![])
}

/// Masked mean over the sequence, then L2 normalisation, into the output `embedding`.
fn pool_and_normalize(graph: &mut GraphBuilder, constants: &Constants, hidden: &str, mask: &str) {
    let mask = graph.node("Unsqueeze", &[mask, &constants.axes_2], vec![]);
    let masked = graph.node("Mul", &[hidden, &mask], vec![]);
    let keep_dims = || vec![attr_int("keepdims", 0)];
    let sum = graph.node("ReduceSum", &[&masked, &constants.axes_1], keep_dims());
    let count = graph.node("ReduceSum", &[&mask, &constants.axes_1], keep_dims());
    let count = graph.node("Max", &[&count, &constants.mask_sum_min], vec![]);
    let mean = graph.node("Div", &[&sum, &count], vec![]);

    // ReduceL2 still takes its axes as an attribute at opset 17.
    let norm = graph.node(
        "ReduceL2",
        &[&mean],
        vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
    );
    let norm = graph.node("Max", &[&norm, &constants.normalize_epsilon], vec![]);
    graph.node_with_outputs("Div", &[&mean, &norm], &["embedding"], vec![]);
}

/// `input · weightᵀ + bias` for the Linear layer `name`.
fn linear(
    graph: &mut GraphBuilder,
    weights: &Weights,
    name: &str,
    input: &str,
    inputs: usize,
    outputs: usize,
) -> Result<String, BertBuildError> {
    // PyTorch stores Linear weights as [out, in], but MatMul needs [in, out].
    let weight = weights.f32(&format!("{name}.weight"), &[outputs, inputs])?;
    let mut transposed = vec![0.0f32; weight.len()];
    for row in 0..outputs {
        for column in 0..inputs {
            transposed[column * outputs + row] = weight[row * inputs + column];
        }
    }
    let weight =
        graph.initializer_f32(&format!("{name}.weight_t"), &[inputs, outputs], &transposed);
    let bias = weights.add(graph, &format!("{name}.bias"), &[outputs])?;
    let product = graph.node("MatMul", &[input, &weight], vec![]);
    Ok(graph.node("Add", &[&product, &bias], vec![]))
}

fn layer_norm(
    graph: &mut GraphBuilder,
    weights: &Weights,
    name: &str,
    input: &str,
) -> Result<String, BertBuildError> {
    let scale = weights.add(graph, &format!("{name}.weight"), &[HIDDEN])?;
    let bias = weights.add(graph, &format!("{name}.bias"), &[HIDDEN])?;
    Ok(graph.node(
        "LayerNormalization",
        &[input, &scale, &bias],
        vec![
            attr_int("axis", -1),
            attr_float("epsilon", LAYER_NORM_EPSILON),
        ],
    ))
}

struct Weights<'data>(SafeTensors<'data>);

impl Weights<'_> {
    /// Reads tensor `name`, checking that it is F32 with shape `expected`.
    fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, BertBuildError> {
        let tensor = self.0.tensor(name)?;
        if tensor.dtype() != Dtype::F32 || tensor.shape() != expected {
            return Err(BertBuildError::UnexpectedTensor {
                name: name.to_string(),
                dtype: tensor.dtype(),
                shape: tensor.shape().to_vec(),
                expected: expected.to_vec(),
            });
        }
        // safetensors stores little-endian values.
        Ok(tensor
            .data()
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect())
    }

    /// Adds tensor `name` unchanged as an initializer of the same name.
    fn add(
        &self,
        graph: &mut GraphBuilder,
        name: &str,
        expected: &[usize],
    ) -> Result<String, BertBuildError> {
        let values = self.f32(name, expected)?;
        Ok(graph.initializer_f32(name, expected, &values))
    }
}
