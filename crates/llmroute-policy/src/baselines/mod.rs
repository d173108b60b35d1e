//! Baseline routers that BaRP is compared against, and the [`Router`] trait they share.
//!
//! Three kinds of information separate them:
//! - bandit feedback ([`linear`]: `linucb`, `epsilon-greedy`, `thompson`): trained only through
//!   [`crate::bandit::ReplayEnvironment::pull`], one revealed outcome per interaction, like BaRP;
//! - full information ([`mlp`]: `mlp-full-info`, [`knn`]: `knn-full-info`): trained on every
//!   model's recorded outcome for every training prompt, an upper reference for offline
//!   supervised routing;
//! - none or all ([`RandomRouter`], [`SingleModelRouter`], and [`OracleRouter`], which reads the
//!   test outcomes and so bounds every router's reward from above).

pub mod knn;
pub mod linear;
pub mod mlp;

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use crate::reward::Reward;

/// A routing policy: picks one model per prompt for a quality weight `w_quality`
/// (`w_cost = 1 − w_quality`).
pub trait Router {
    /// Stable identifier used in tables and JSON, for example `linucb` or `single:<model>`.
    fn id(&self) -> String;

    /// Picks a model index (in the data set's model order) for each row of `embeddings`
    /// (`[prompts × dim]`).
    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize>;
}

/// Failure to train a baseline router.
#[derive(Debug, Error)]
pub enum BaselineError {
    #[error("cannot train `{router}`: the training set has no prompts; check the split filters")]
    EmptyTraining { router: String },
    #[error("cannot train `{router}`: {message}")]
    InvalidConfig { router: String, message: String },
    #[error(
        "cannot train `{router}`: {embeddings} embeddings for {outcomes} rows of outcomes; \
         embed exactly the prompts of the split"
    )]
    ShapeMismatch {
        router: String,
        embeddings: usize,
        outcomes: usize,
    },
}

/// Index of the maximum of `scores`, the lowest index on ties. Returns 0 for an empty slice.
pub fn argmax(scores: impl IntoIterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (index, score) in scores.into_iter().enumerate() {
        if score > best.1 {
            best = (index, score);
        }
    }
    best.0
}

/// Routes each row to the argmax of `w_q · q̂ − (1 − w_q) · ĉ`, given predicted quality `q̂`
/// and predicted normalised cost `ĉ = min(c / τ, 1)`, both `[prompts × models]`.
pub fn route_by_predictions(
    quality: ArrayView2<f64>,
    normalised_cost: ArrayView2<f64>,
    w_quality: f32,
) -> Vec<usize> {
    let w_quality = f64::from(w_quality);
    quality
        .rows()
        .into_iter()
        .zip(normalised_cost.rows())
        .map(|(q, c)| {
            argmax(
                q.iter()
                    .zip(c)
                    .map(|(q, c)| w_quality * q - (1.0 - w_quality) * c),
            )
        })
        .collect()
}

/// Targets of the regression baselines: quality as recorded and cost normalised by τ,
/// `min(c / τ, 1)`, both `[prompts × models]` in f64.
pub fn regression_targets(
    quality: ArrayView2<f32>,
    cost: ArrayView2<f32>,
    reward: Reward,
) -> (Array2<f64>, Array2<f64>) {
    (
        quality.mapv(f64::from),
        cost.mapv(|c| f64::from(reward.normalised_cost(c))),
    )
}

/// Picks a model uniformly at random for every prompt, from a fixed seed.
#[derive(Debug, Clone)]
pub struct RandomRouter {
    pub num_models: usize,
    pub seed: u64,
}

impl Router for RandomRouter {
    fn id(&self) -> String {
        "random".to_string()
    }

    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize> {
        // One stream per sweep point, so each point's choices are reproducible on their own.
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (u64::from(w_quality.to_bits()) << 17));
        (0..embeddings.nrows())
            .map(|_| rng.random_range(0..self.num_models.max(1)))
            .collect()
    }
}

/// Always calls one model.
#[derive(Debug, Clone)]
pub struct SingleModelRouter {
    pub model: String,
    pub index: usize,
}

impl Router for SingleModelRouter {
    fn id(&self) -> String {
        format!("single:{}", self.model)
    }

    fn route(&self, embeddings: ArrayView2<f32>, _w_quality: f32) -> Vec<usize> {
        vec![self.index; embeddings.nrows()]
    }
}

/// Picks, per prompt, the model with the highest actual reward at `w` on the recorded test
/// outcomes, ties going to the cheaper model. It reads the outcomes it is scored on, so its
/// mean reward bounds every other router's from above.
#[derive(Debug, Clone)]
pub struct OracleRouter {
    quality: Array2<f32>,
    cost: Array2<f32>,
    reward: Reward,
}

impl OracleRouter {
    /// `quality` and `cost` are the outcomes of exactly the prompts that will be routed.
    pub fn new(quality: Array2<f32>, cost: Array2<f32>, reward: Reward) -> Self {
        Self {
            quality,
            cost,
            reward,
        }
    }
}

impl Router for OracleRouter {
    fn id(&self) -> String {
        "oracle".to_string()
    }

    /// Panics when `embeddings` has a different number of rows than the outcomes, because the
    /// oracle can only route the prompts whose outcomes it holds.
    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize> {
        assert_eq!(
            embeddings.nrows(),
            self.quality.nrows(),
            "the oracle routes only the prompts whose outcomes it holds"
        );
        self.quality
            .rows()
            .into_iter()
            .zip(self.cost.rows())
            .map(|(quality, cost)| {
                let mut best = 0;
                for k in 1..quality.len() {
                    // Compare in f32, exactly as the evaluation scores the choice.
                    let candidate = self.reward.reward(w_quality, quality[k], cost[k]);
                    let incumbent = self.reward.reward(w_quality, quality[best], cost[best]);
                    if candidate > incumbent || (candidate == incumbent && cost[k] < cost[best]) {
                        best = k;
                    }
                }
                best
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ndarray::{Array2, array};
    use rand_distr::{Distribution, StandardNormal};

    /// Random unit vectors of dimension `dim`: one centre per task plus small noise, so tasks
    /// are separable. Returns `[n × dim]` embeddings and the task of each row (`i % tasks`).
    pub(crate) fn task_embeddings(
        n: usize,
        tasks: usize,
        dim: usize,
        seed: u64,
    ) -> (Array2<f32>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut centre_rng = ChaCha8Rng::seed_from_u64(12_345);
        let centres: Array2<f32> =
            Array2::from_shape_fn((tasks, dim), |_| StandardNormal.sample(&mut centre_rng));
        let labels: Vec<usize> = (0..n).map(|i| i % tasks).collect();
        let mut embeddings = Array2::from_shape_fn((n, dim), |(i, j)| {
            let noise: f32 = StandardNormal.sample(&mut rng);
            centres[[labels[i], j]] + 0.2 * noise
        });
        for mut row in embeddings.rows_mut() {
            let norm = row.dot(&row).sqrt();
            row /= norm;
        }
        (embeddings, labels)
    }

    #[test]
    fn oracle_maximises_reward_per_prompt() {
        let quality = array![[1.0f32, 1.0, 0.0], [0.0, 0.5, 1.0]];
        let cost = array![[0.02f32, 0.01, 0.0], [0.0, 0.001, 0.02]];
        let reward = Reward::new(0.01);
        let oracle = OracleRouter::new(quality, cost, reward);
        let embeddings = Array2::<f32>::zeros((2, 4));
        // w = 1: quality only, ties to the cheaper model.
        assert_eq!(oracle.route(embeddings.view(), 1.0), vec![1, 2]);
        // w = 0: cost only.
        assert_eq!(oracle.route(embeddings.view(), 0.0), vec![2, 0]);
    }

    #[test]
    fn random_router_is_seeded() {
        let router = RandomRouter {
            num_models: 4,
            seed: 3,
        };
        let embeddings = Array2::<f32>::zeros((1000, 2));
        let first = router.route(embeddings.view(), 0.5);
        assert_eq!(first, router.route(embeddings.view(), 0.5));
        for k in 0..4 {
            let share = first.iter().filter(|&&a| a == k).count();
            assert!(
                (200..300).contains(&share),
                "model {k} picked {share} times of 1000"
            );
        }
    }

    #[test]
    fn predictions_route_by_weighted_score() {
        let quality = array![[0.9, 0.5]];
        let cost = array![[1.0, 0.0]];
        assert_eq!(
            route_by_predictions(quality.view(), cost.view(), 1.0),
            vec![0]
        );
        assert_eq!(
            route_by_predictions(quality.view(), cost.view(), 0.0),
            vec![1]
        );
        assert_eq!(argmax([1.0, 3.0, 3.0]), 1);
    }
}
