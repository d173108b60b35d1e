//! Action probabilities of a target policy, with or without the sidecar's exploration rule.

use llmroute_api::config::Exploration;
use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::policy::network::{PolicyNetwork, argmax};

/// Largest deviation from 1 accepted for the sum of a row of target probabilities.
pub(crate) const PROBABILITY_SUM_TOLERANCE: f32 = 1e-3;

/// Checks that `row` contains finite, non-negative values whose sum is within
/// [`PROBABILITY_SUM_TOLERANCE`] of 1.
pub(crate) fn is_distribution(row: ArrayView1<f32>) -> bool {
    let valid = row.iter().all(|p| p.is_finite() && *p >= 0.0);
    valid && (row.sum() - 1.0).abs() <= PROBABILITY_SUM_TOLERANCE
}

/// A target policy whose action probabilities off-policy evaluation can weigh.
pub trait ActionProbabilities {
    /// Probabilities `π(· | x, w)` for a batch of embeddings `[n × d]` with one `w_quality` per
    /// row; returns `[n × K]` with rows that sum to 1.
    fn action_probabilities(&self, embeddings: ArrayView2<f32>, w_quality: &[f32]) -> Array2<f32>;

    /// Embedding dimension the policy reads, when it is fixed. [`super::compare_policies`]
    /// checks the events against it and reports a mismatch as an error.
    fn embedding_dim(&self) -> Option<usize> {
        None
    }
}

/// The softmax of the network, `π_θ(· | x, w)`.
///
/// Panics when the embeddings do not have `shape.embedding_dim` columns, as
/// [`PolicyNetwork::forward`] does.
impl ActionProbabilities for PolicyNetwork {
    fn action_probabilities(&self, embeddings: ArrayView2<f32>, w_quality: &[f32]) -> Array2<f32> {
        self.probabilities(embeddings, w_quality)
    }

    fn embedding_dim(&self) -> Option<usize> {
        Some(self.shape.embedding_dim)
    }
}

/// A policy with the sidecar's exploration rule applied on top of its probabilities, so that
/// the result is the distribution the sidecar draws decisions from.
#[derive(Debug, Clone, Copy)]
pub struct Explored<'a, P: ?Sized> {
    pub policy: &'a P,
    pub exploration: Exploration,
}

/// - `Greedy`: one-hot on the argmax, the first model on ties (as [`argmax`]);
/// - `Sample`: the policy's probabilities unchanged;
/// - `EpsilonGreedy { ε }`: `(1 − ε)·[a = argmax] + ε / K`.
///
/// A row of the policy that is not a probability distribution, such as the NaN row of a
/// diverged network, is returned unchanged. An argmax over NaN would pick the first model and
/// hide the fault, and [`super::compare_policies`] reports the row as invalid instead.
///
/// Panics when ε is outside `[0, 1]`, which the route's configuration check rejects.
impl<P: ActionProbabilities + ?Sized> ActionProbabilities for Explored<'_, P> {
    fn action_probabilities(&self, embeddings: ArrayView2<f32>, w_quality: &[f32]) -> Array2<f32> {
        let mut probabilities = self.policy.action_probabilities(embeddings, w_quality);
        let epsilon = match self.exploration {
            Exploration::Sample => return probabilities,
            Exploration::Greedy => 0.0,
            Exploration::EpsilonGreedy { epsilon } => {
                assert!(
                    (0.0..=1.0).contains(&epsilon),
                    "exploration epsilon {epsilon} is outside [0, 1]"
                );
                epsilon as f32
            }
        };
        let num_models = probabilities.ncols();
        let uniform = epsilon / num_models as f32;
        for mut row in probabilities.rows_mut() {
            if !is_distribution(row.view()) {
                continue;
            }
            let best = argmax(&row.to_vec());
            for (k, p) in row.iter_mut().enumerate() {
                let greedy = if k == best { 1.0 - epsilon } else { 0.0 };
                *p = greedy + uniform;
            }
        }
        probabilities
    }

    fn embedding_dim(&self) -> Option<usize> {
        self.policy.embedding_dim()
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use super::*;

    /// Fixed probabilities for every row.
    struct Table(Vec<f32>);

    impl ActionProbabilities for Table {
        fn action_probabilities(
            &self,
            embeddings: ArrayView2<f32>,
            _w_quality: &[f32],
        ) -> Array2<f32> {
            Array2::from_shape_fn((embeddings.nrows(), self.0.len()), |(_, k)| self.0[k])
        }
    }

    fn explore(table: &Table, exploration: Exploration) -> Vec<f32> {
        let embeddings = Array2::zeros((1, 2));
        Explored {
            policy: table,
            exploration,
        }
        .action_probabilities(embeddings.view(), &[0.5])
        .row(0)
        .to_vec()
    }

    #[test]
    fn explored_greedy_breaks_ties_to_first() {
        let table = Table(vec![0.2, 0.4, 0.4]);
        assert_eq!(explore(&table, Exploration::Greedy), [0.0, 1.0, 0.0]);
    }

    #[test]
    fn explored_sample_keeps_probabilities() {
        let table = Table(vec![0.2, 0.5, 0.3]);
        assert_eq!(explore(&table, Exploration::Sample), [0.2, 0.5, 0.3]);
    }

    #[test]
    fn explored_epsilon_greedy_mixes_uniform() {
        let table = Table(vec![0.2, 0.5, 0.3]);
        let p = explore(&table, Exploration::EpsilonGreedy { epsilon: 0.3 });
        let expected = [0.1, 0.7 + 0.1, 0.1];
        for k in 0..3 {
            assert!((p[k] - expected[k]).abs() < 1e-6, "model {k}: {p:?}");
        }
    }

    #[test]
    fn network_probabilities_are_its_softmax() {
        use rand::SeedableRng;
        let shape = crate::policy::NetworkShape {
            embedding_dim: 2,
            preference_dim: 2,
            hidden_dim: 4,
            num_models: 3,
        };
        let network = PolicyNetwork::new(shape, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let embeddings = array![[0.6f32, 0.8], [1.0, 0.0]];
        let expected = network.probabilities(embeddings.view(), &[0.2, 0.9]);
        let actual = network.action_probabilities(embeddings.view(), &[0.2, 0.9]);
        assert_eq!(actual, expected);
        assert_eq!(ActionProbabilities::embedding_dim(&network), Some(2));
    }
}
