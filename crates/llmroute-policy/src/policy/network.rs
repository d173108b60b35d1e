//! The BaRP policy network `π_θ(a | x, w)` with its forward and backward passes.
//!
//! - preference encoder `φ(w) = tanh(p(w) · W_p + b_p)` → 16 features, on the preference
//!   inputs `p(w) = (w_quality, w_cost, ℓ(w))` of [`preference_inputs`], where `ℓ` is the scaled
//!   log-odds of the two weights;
//! - decision head `g([h(x); φ(w)])`: `z = relu([h; φ] · W_1 + b_1) · W_2 + b_2`, one logit per
//!   model, and `π = softmax(z)`;
//! - a value head `V(x, w) = u · v + b_v` on the hidden features `u`, used only as the
//!   REINFORCE baseline during training (it is not exported).
//!
//! Matrices are stored `[inputs × outputs]` so a batch is `X · W`.

use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use rand::Rng;
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};

/// Preference inputs of a new network: `w_quality`, `w_cost` and the log-odds `ℓ(w)`.
/// Policies written before the log-odds existed have 2 inputs. [`PolicyNetwork::forward`]
/// and the ONNX writer follow the row count of `pref_weight`, so both kinds keep working.
pub const PREFERENCE_INPUTS: usize = 3;
/// Floor ε of each weight before its logarithm, so that `w_quality = 0` and `= 1` have a finite
/// log-odds: `ℓ` spans `±ln(1/ε) / s ≈ ±2.3`.
pub const LOG_ODDS_FLOOR: f32 = 1e-4;
/// Divisor `s` of the log-odds, so that `ℓ` stays within ±2.3, near the [0, 1] range of the
/// other two inputs.
pub const LOG_ODDS_SCALE: f32 = 4.0;

/// Scaled log-odds of a preference (dimensionless):
///
/// `ℓ(w) = (ln max(w_quality, ε) − ln max(w_cost, ε)) / s`
///
/// The model with the best reward `w_q · q − w_c · c̃` depends on `w` only through the ratio
/// `w_q / w_c`. The points where it changes are squeezed near both ends of `w_quality` and
/// spread out in `ℓ`. On paretobandit, gemini-2.5-pro becomes worth its price at about
/// `w_quality = 0.985` (`ℓ ≈ 1.05`) and mistral-large at 0.03 to 0.3 (`ℓ ≈ −0.9` to −0.2),
/// while `w_quality = 1` is at `ℓ ≈ 2.3`. On the validation splits of `examples/tune_barp.rs`
/// this input raised the mean reward over the sweep on paretobandit-k3 and -k4 and left
/// llmrouter-9llm's unchanged (`docs/benchmarks.md`).
pub fn log_odds(w_quality: f32) -> f32 {
    let quality = w_quality.max(LOG_ODDS_FLOOR);
    let cost = (1.0 - w_quality).max(LOG_ODDS_FLOOR);
    (quality.ln() - cost.ln()) / LOG_ODDS_SCALE
}

/// Builds the `[batch × inputs]` preference inputs `p(w)`: `(w_quality, w_cost)` and, with 3
/// inputs, `ℓ(w)`.
pub fn preference_inputs(w_quality: &[f32], inputs: usize) -> Array2<f32> {
    assert!(
        inputs == 2 || inputs == PREFERENCE_INPUTS,
        "2 or {PREFERENCE_INPUTS} preference inputs"
    );
    Array2::from_shape_fn((w_quality.len(), inputs), |(i, j)| match j {
        0 => w_quality[i],
        1 => 1.0 - w_quality[i],
        _ => log_odds(w_quality[i]),
    })
}

/// Sizes of the policy network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkShape {
    /// Prompt embedding dimension (384 for all-MiniLM-L6-v2).
    pub embedding_dim: usize,
    /// Output size of the preference encoder φ.
    pub preference_dim: usize,
    /// Hidden units of the decision head.
    pub hidden_dim: usize,
    /// Number of models (actions).
    pub num_models: usize,
}

impl NetworkShape {
    pub fn head_input_dim(&self) -> usize {
        self.embedding_dim + self.preference_dim
    }
}

/// Trainable parameters. The field names are the initializer names in the ONNX file.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyNetwork {
    pub shape: NetworkShape,
    /// `[inputs × preference_dim]`, `inputs` 3 (or 2 in policies written before `ℓ(w)`).
    pub pref_weight: Array2<f32>,
    pub pref_bias: Array1<f32>,
    /// `[(embedding_dim + preference_dim) × hidden_dim]`
    pub hidden_weight: Array2<f32>,
    pub hidden_bias: Array1<f32>,
    /// `[hidden_dim × num_models]`
    pub logit_weight: Array2<f32>,
    pub logit_bias: Array1<f32>,
    /// `[hidden_dim]`: the value head (baseline), trained on detached hidden features.
    pub value_weight: Array1<f32>,
    pub value_bias: f32,
}

/// Intermediate values of one forward pass, kept for the backward pass.
#[derive(Debug, Clone)]
pub struct ForwardPass {
    /// `[batch × inputs]` preference inputs `p(w)`.
    pub preferences: Array2<f32>,
    /// `[batch × preference_dim]` φ(w).
    pub pref_features: Array2<f32>,
    /// `[batch × (embedding_dim + preference_dim)]` `[h(x); φ(w)]`.
    pub head_input: Array2<f32>,
    /// `[batch × hidden_dim]` after ReLU.
    pub hidden: Array2<f32>,
    /// `[batch × num_models]`.
    pub logits: Array2<f32>,
    /// `[batch × num_models]` softmax of the logits.
    pub probabilities: Array2<f32>,
    /// `[batch]` value baseline V(x, w).
    pub values: Array1<f32>,
}

/// Gradients with the same layout as [`PolicyNetwork`]'s parameters.
#[derive(Debug, Clone)]
pub struct Gradients {
    pub pref_weight: Array2<f32>,
    pub pref_bias: Array1<f32>,
    pub hidden_weight: Array2<f32>,
    pub hidden_bias: Array1<f32>,
    pub logit_weight: Array2<f32>,
    pub logit_bias: Array1<f32>,
    pub value_weight: Array1<f32>,
    pub value_bias: f32,
}

impl PolicyNetwork {
    /// Initialises weights with Glorot-uniform ranges and zero biases.
    pub fn new(shape: NetworkShape, rng: &mut impl Rng) -> Self {
        let mut glorot = |rows: usize, cols: usize| {
            let limit = (6.0 / (rows + cols) as f32).sqrt();
            let uniform = Uniform::new_inclusive(-limit, limit).expect("finite range");
            Array2::from_shape_fn((rows, cols), |_| uniform.sample(rng))
        };
        let pref_weight = glorot(PREFERENCE_INPUTS, shape.preference_dim);
        let hidden_weight = glorot(shape.head_input_dim(), shape.hidden_dim);
        // Small output weights start the policy near uniform, so early sampling explores.
        let logit_weight = glorot(shape.hidden_dim, shape.num_models) * 0.1;
        Self {
            shape,
            pref_weight,
            pref_bias: Array1::zeros(shape.preference_dim),
            hidden_weight,
            hidden_bias: Array1::zeros(shape.hidden_dim),
            logit_weight,
            logit_bias: Array1::zeros(shape.num_models),
            value_weight: Array1::zeros(shape.hidden_dim),
            value_bias: 0.0,
        }
    }

    /// Runs the network on a batch: `embeddings` is `[batch × embedding_dim]`, `w_quality`
    /// holds one preference weight on quality per row (`w_cost = 1 − w_quality`).
    pub fn forward(&self, embeddings: ArrayView2<f32>, w_quality: &[f32]) -> ForwardPass {
        let batch = embeddings.nrows();
        assert_eq!(batch, w_quality.len(), "one preference per embedding row");
        assert_eq!(
            embeddings.ncols(),
            self.shape.embedding_dim,
            "embedding dimension"
        );

        let preferences = preference_inputs(w_quality, self.pref_weight.nrows());
        let pref_features = (preferences.dot(&self.pref_weight) + &self.pref_bias).mapv(f32::tanh);

        let mut head_input = Array2::zeros((batch, self.shape.head_input_dim()));
        head_input
            .slice_mut(s![.., ..self.shape.embedding_dim])
            .assign(&embeddings);
        head_input
            .slice_mut(s![.., self.shape.embedding_dim..])
            .assign(&pref_features);

        let hidden = (head_input.dot(&self.hidden_weight) + &self.hidden_bias).mapv(|v| v.max(0.0));
        let logits = hidden.dot(&self.logit_weight) + &self.logit_bias;
        let probabilities = softmax_rows(&logits);
        let values = hidden.dot(&self.value_weight) + self.value_bias;

        ForwardPass {
            preferences,
            pref_features,
            head_input,
            hidden,
            logits,
            probabilities,
            values,
        }
    }

    /// Action probabilities `π(· | x, w)`, `[batch × num_models]`.
    pub fn probabilities(&self, embeddings: ArrayView2<f32>, w_quality: &[f32]) -> Array2<f32> {
        self.forward(embeddings, w_quality).probabilities
    }

    /// Back-propagates `d_logits = ∂L/∂z` (`[batch × K]`) through the policy, and
    /// `d_values = ∂L/∂V` (`[batch]`) into the value head only: the baseline must not change the
    /// policy's features, or it would bias the policy gradient.
    pub fn backward(
        &self,
        pass: &ForwardPass,
        d_logits: &Array2<f32>,
        d_values: &Array1<f32>,
    ) -> Gradients {
        let logit_weight = pass.hidden.t().dot(d_logits);
        let logit_bias = d_logits.sum_axis(Axis(0));

        let mut d_hidden = d_logits.dot(&self.logit_weight.t());
        d_hidden.zip_mut_with(&pass.hidden, |d, &h| {
            if h <= 0.0 {
                *d = 0.0;
            }
        });
        let hidden_weight = pass.head_input.t().dot(&d_hidden);
        let hidden_bias = d_hidden.sum_axis(Axis(0));

        let d_head_input = d_hidden.dot(&self.hidden_weight.t());
        let mut d_pref_pre = d_head_input
            .slice(s![.., self.shape.embedding_dim..])
            .to_owned();
        // d tanh(u) / du = 1 − tanh(u)².
        d_pref_pre.zip_mut_with(&pass.pref_features, |d, &phi| *d *= 1.0 - phi * phi);
        let pref_weight = pass.preferences.t().dot(&d_pref_pre);
        let pref_bias = d_pref_pre.sum_axis(Axis(0));

        let value_weight = pass.hidden.t().dot(d_values);
        let value_bias = d_values.sum();

        Gradients {
            pref_weight,
            pref_bias,
            hidden_weight,
            hidden_bias,
            logit_weight,
            logit_bias,
            value_weight,
            value_bias,
        }
    }

    /// Number of trainable scalars of the exported policy (value head excluded).
    pub fn num_policy_parameters(&self) -> usize {
        self.pref_weight.len()
            + self.pref_bias.len()
            + self.hidden_weight.len()
            + self.hidden_bias.len()
            + self.logit_weight.len()
            + self.logit_bias.len()
    }
}

/// Row-wise softmax, stabilised by subtracting each row's maximum.
pub fn softmax_rows(logits: &Array2<f32>) -> Array2<f32> {
    let mut out = logits.clone();
    for mut row in out.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    out
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_odds_is_antisymmetric_bounded_and_increasing() {
        let end = (1.0f32 / LOG_ODDS_FLOOR).ln() / LOG_ODDS_SCALE;
        assert_eq!(log_odds(0.5), 0.0);
        assert!((log_odds(1.0) - end).abs() < 1e-6, "{}", log_odds(1.0));
        assert!((log_odds(0.0) + end).abs() < 1e-6, "{}", log_odds(0.0));
        // w_quality = 0.985, where gemini-2.5-pro becomes worth its price on paretobandit.
        assert!((log_odds(0.985) - (0.985f32 / 0.015).ln() / 4.0).abs() < 1e-5);
        let grid: Vec<f32> = (0..=1000).map(|i| i as f32 / 1000.0).collect();
        for pair in grid.windows(2) {
            assert!(log_odds(pair[1]) > log_odds(pair[0]), "at {pair:?}");
            assert!((log_odds(pair[0]) + log_odds(1.0 - pair[0])).abs() < 1e-4);
        }
    }

    #[test]
    fn preference_inputs_follow_the_weight_height() {
        let inputs = preference_inputs(&[0.0, 0.25, 1.0], PREFERENCE_INPUTS);
        assert_eq!(inputs.shape(), &[3, 3]);
        assert_eq!(inputs.row(1).to_vec(), vec![0.25, 0.75, log_odds(0.25)]);
        let legacy = preference_inputs(&[0.0, 0.25, 1.0], 2);
        assert_eq!(legacy.shape(), &[3, 2]);
        assert_eq!(legacy.row(2).to_vec(), vec![1.0, 0.0]);
    }
}
