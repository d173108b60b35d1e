//! The pricing prior: the policy a route starts with before any policy was trained for it.
//!
//! Before any feedback, nothing is known about the quality of the route's models on its
//! prompts, but their prices are known. The prior turns that into a policy of the same shape and
//! file format as a trained one, so the sidecar, the canary and the trainer need no special
//! case:
//!
//! ```text
//! logit_k(x, w) = −β · w_cost · ĉ_k          (the prompt x is ignored)
//! ĉ_k = (p_k − min_j p_j) / (max_j p_j − min_j p_j) ∈ [0, 1]   (0 when all prices are equal)
//! p_k = (input_k + output_k) / 2             (USD per million tokens, blended list price)
//! ```
//!
//! At `w_cost = 0` (quality only) every model is equally likely, because none is known to be
//! better; as `w_cost` grows, probability moves toward cheaper models, and at `w_cost = 1` the
//! cheapest model is `e^β` times as likely as the most expensive one. With the route's
//! exploration setting (`sample` or `epsilonGreedy`) every model keeps a propensity above zero,
//! which the off-policy trainer needs to learn from the logged decisions.
//!
//! The network computes this exactly up to the `tanh` of the preference encoder:
//! `φ_0 = tanh(a · w_cost)` with a small slope `a`, `h_0 = ReLU(φ_0)`, and
//! `logit_k = −(β / a) · ĉ_k · h_0`. With `a = 0.01`, `tanh(a·w)/a` differs from `w` by less
//! than 0.004 % on `[0, 1]`. Every other weight is zero.

use ndarray::{Array1, Array2};

use super::metadata::{POLICY_FORMAT, PolicyMetadata};
use super::network::{NetworkShape, PolicyNetwork};

/// Log-ratio β between the probabilities of the cheapest and the most expensive model at
/// `w_cost = 1`: `e^4 ≈ 55`.
pub const PRIOR_BETA: f32 = 4.0;
/// Slope `a` of the preference encoder's one active unit.
const SLOPE: f32 = 0.01;

/// One model of the pool with its list prices, in USD per million tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct PricedModel {
    pub name: String,
    pub input_usd_per_million_tokens: f64,
    pub output_usd_per_million_tokens: f64,
}

impl PricedModel {
    /// Blended list price `p_k = (input + output) / 2`, USD per million tokens.
    pub fn blended_price(&self) -> f64 {
        (self.input_usd_per_million_tokens + self.output_usd_per_million_tokens) / 2.0
    }
}

/// Cost scale τ the prior records when the route sets none: the cost of 1 000 tokens at the
/// blended price of the most expensive model, in USD (at least 1e-9, so it is never zero).
pub fn default_cost_scale(models: &[PricedModel]) -> f64 {
    let highest = models
        .iter()
        .map(PricedModel::blended_price)
        .fold(0.0, f64::max);
    (highest * 1000.0 / 1e6).max(1e-9)
}

/// Builds the pricing-prior network and its metadata for `models`, in the route's order.
pub fn pricing_prior(
    models: &[PricedModel],
    version: &str,
    encoder: &str,
    embedding_dim: usize,
    cost_scale_usd: f64,
) -> (PolicyNetwork, PolicyMetadata) {
    let shape = NetworkShape {
        embedding_dim,
        preference_dim: 1,
        hidden_dim: 1,
        num_models: models.len(),
    };
    let prices: Vec<f64> = models.iter().map(PricedModel::blended_price).collect();
    let low = prices.iter().copied().fold(f64::INFINITY, f64::min);
    let high = prices.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let relative: Vec<f32> = prices
        .iter()
        .map(|&p| {
            if high > low {
                ((p - low) / (high - low)) as f32
            } else {
                0.0
            }
        })
        .collect();

    // Row 1 of the preference weight reads w_cost.
    let mut pref_weight = Array2::zeros((2, 1));
    pref_weight[[1, 0]] = SLOPE;
    // The hidden unit copies φ_0, the last input of the head.
    let mut hidden_weight = Array2::zeros((shape.head_input_dim(), 1));
    hidden_weight[[embedding_dim, 0]] = 1.0;
    let logit_weight = Array2::from_shape_fn((1, models.len()), |(_, k)| {
        -(PRIOR_BETA / SLOPE) * relative[k]
    });
    let network = PolicyNetwork {
        shape,
        pref_weight,
        pref_bias: Array1::zeros(1),
        hidden_weight,
        hidden_bias: Array1::zeros(1),
        logit_weight,
        logit_bias: Array1::zeros(models.len()),
        value_weight: Array1::zeros(1),
        value_bias: 0.0,
    };
    let metadata = PolicyMetadata {
        format: POLICY_FORMAT.to_string(),
        version: version.to_string(),
        models: models.iter().map(|m| m.name.clone()).collect(),
        encoder: encoder.to_string(),
        embedding_dim,
        cost_scale_usd: cost_scale_usd as f32,
    };
    (network, metadata)
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;

    fn pool() -> Vec<PricedModel> {
        [("cheap", 0.1, 0.1), ("mid", 0.5, 1.5), ("dear", 1.25, 10.0)]
            .into_iter()
            .map(|(name, input, output)| PricedModel {
                name: name.into(),
                input_usd_per_million_tokens: input,
                output_usd_per_million_tokens: output,
            })
            .collect()
    }

    #[test]
    fn quality_only_is_uniform_and_cost_only_prefers_cheap() {
        let (network, metadata) = pricing_prior(&pool(), "v1", "e", 8, 0.01);
        assert_eq!(metadata.models, ["cheap", "mid", "dear"]);
        let embeddings = Array2::from_elem((3, 8), 0.3);
        let p = network.probabilities(embeddings.view(), &[1.0, 0.5, 0.0]);
        for k in 0..3 {
            assert!((p[[0, k]] - 1.0 / 3.0).abs() < 1e-6, "{p:?}");
        }
        // Probabilities fall with price at any positive cost weight.
        for row in 1..3 {
            assert!(
                p[[row, 0]] > p[[row, 1]] && p[[row, 1]] > p[[row, 2]],
                "{p:?}"
            );
        }
        // At w_cost = 1 the cheapest model is e^β times as likely as the dearest one.
        let ratio = (p[[2, 0]] / p[[2, 2]]).ln();
        assert!((ratio - PRIOR_BETA).abs() < 1e-3, "log-ratio {ratio}");
    }

    #[test]
    fn equal_prices_give_uniform_policy() {
        let models: Vec<PricedModel> = pool()
            .into_iter()
            .map(|m| PricedModel {
                input_usd_per_million_tokens: 1.0,
                output_usd_per_million_tokens: 2.0,
                ..m
            })
            .collect();
        let (network, _) = pricing_prior(&models, "v1", "e", 4, 0.01);
        let p = network.probabilities(Array2::zeros((1, 4)).view(), &[0.0]);
        assert!(p.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6), "{p:?}");
    }

    #[test]
    fn default_cost_scale_is_a_thousand_tokens_of_the_dearest_model() {
        let tau = default_cost_scale(&pool());
        assert!((tau - 5.625 * 1000.0 / 1e6).abs() < 1e-12, "{tau}");
    }
}
