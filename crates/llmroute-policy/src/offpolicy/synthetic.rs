//! A synthetic routing problem with known expected rewards, logged by a uniform policy.
//!
//! Prompts come from two clusters, A and B, with probability ½ each. Three models: model 0 is
//! cheap and good on A only, model 1 is expensive and good everywhere, model 2 is the cheapest
//! and bad. Quality is Bernoulli with the mean [`MEAN_QUALITY`] and cost is fixed per model, so
//! the expected reward of each model at each preference is known exactly. The best model depends
//! on both the cluster and the preference. At `w_quality = 1` it is model 0 on A and model 1
//! on B. At `w_quality = 0.5` it is model 0 on A and model 2 on B. At `w_quality = 0` it is
//! model 2.

use ndarray::{Array2, ArrayView2};
use rand::Rng;

use super::{ActionProbabilities, LoggedEvent};
use crate::reward::Reward;

pub const EMBEDDING_DIM: usize = 8;
pub const NUM_MODELS: usize = 3;
/// τ = 0.01 USD.
pub const REWARD: Reward = Reward { tau: 0.01 };
/// Mean quality `[cluster][model]`, cluster 0 = A, 1 = B.
pub const MEAN_QUALITY: [[f32; NUM_MODELS]; 2] = [[0.9, 0.85, 0.2], [0.15, 0.85, 0.2]];
/// Cost per call in USD; normalised by τ it is 0.2, 1 and 0.05.
pub const COST_USD: [f32; NUM_MODELS] = [0.002, 0.01, 0.0005];

/// Cluster of an embedding: 0 (A) when its first coordinate exceeds its second, else 1 (B).
pub fn cluster_of(embedding: &[f32]) -> usize {
    if embedding[0] > embedding[1] { 0 } else { 1 }
}

/// Expected reward of `model` on `cluster` at preference `w_quality`.
pub fn expected_reward(cluster: usize, model: usize, w_quality: f32) -> f64 {
    REWARD.reward(w_quality, MEAN_QUALITY[cluster][model], COST_USD[model]) as f64
}

/// Draws an L2-normalised embedding of the cluster with small noise in the other coordinates.
fn embedding(cluster: usize, rng: &mut impl Rng) -> Vec<f32> {
    let mut values = vec![0.0f32; EMBEDDING_DIM];
    values[cluster] = 1.0;
    for value in values.iter_mut().skip(2) {
        *value = rng.random_range(-0.2..0.2);
    }
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    values.iter_mut().for_each(|v| *v /= norm);
    values
}

/// `n` events logged by the uniform policy (propensity 1/3) at `w_quality ~ U[0, 1]`.
pub fn logged_events(n: usize, rng: &mut impl Rng) -> Vec<LoggedEvent> {
    (0..n)
        .map(|_| {
            let cluster = rng.random_range(0..2);
            let action = rng.random_range(0..NUM_MODELS);
            let success = rng.random::<f32>() < MEAN_QUALITY[cluster][action];
            LoggedEvent {
                embedding: embedding(cluster, rng),
                w_quality: rng.random(),
                action,
                propensity: 1.0 / NUM_MODELS as f32,
                quality: if success { 1.0 } else { 0.0 },
                cost_usd: COST_USD[action],
            }
        })
        .collect()
}

/// A policy whose probabilities depend on the cluster and the preference only, so its expected
/// reward is known exactly: the logits are `[2w, 1 − w, 0]` on A and `[0, 2w, 1 − w]` on B.
pub struct ClusterPolicy;

impl ClusterPolicy {
    pub fn probabilities(cluster: usize, w_quality: f32) -> [f32; NUM_MODELS] {
        let logits = if cluster == 0 {
            [2.0 * w_quality, 1.0 - w_quality, 0.0]
        } else {
            [0.0, 2.0 * w_quality, 1.0 - w_quality]
        };
        let exp = logits.map(f32::exp);
        let sum: f32 = exp.iter().sum();
        exp.map(|e| e / sum)
    }

    /// Expected reward over both clusters, averaged over `preferences`.
    pub fn true_value(preferences: &[f32]) -> f64 {
        let mut total = 0.0;
        for &w in preferences {
            for cluster in 0..2 {
                let p = Self::probabilities(cluster, w);
                for (model, &probability) in p.iter().enumerate() {
                    total += 0.5 * probability as f64 * expected_reward(cluster, model, w);
                }
            }
        }
        total / preferences.len() as f64
    }
}

impl ActionProbabilities for ClusterPolicy {
    fn action_probabilities(&self, embeddings: ArrayView2<f32>, w_quality: &[f32]) -> Array2<f32> {
        let mut out = Array2::zeros((embeddings.nrows(), NUM_MODELS));
        for (i, row) in embeddings.rows().into_iter().enumerate() {
            let p = Self::probabilities(cluster_of(&row.to_vec()), w_quality[i]);
            for k in 0..NUM_MODELS {
                out[[i, k]] = p[k];
            }
        }
        out
    }
}

/// The uniform policy over the three models.
pub struct UniformPolicy;

impl ActionProbabilities for UniformPolicy {
    fn action_probabilities(&self, embeddings: ArrayView2<f32>, _w_quality: &[f32]) -> Array2<f32> {
        Array2::from_elem((embeddings.nrows(), NUM_MODELS), 1.0 / NUM_MODELS as f32)
    }
}
