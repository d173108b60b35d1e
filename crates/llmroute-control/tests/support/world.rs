//! A synthetic routing world for the learning loop's tests. Prompts fall in two clusters of
//! the embedding space, three models have different prices, and the best model depends on the
//! cluster and on the preference. Quality is a Bernoulli draw with the model's mean on the
//! cluster, so the loop sees noisy feedback. Events are logged as a sidecar would log them.
//!
//! Shared by the tests of `llmroute-control` and of the operator (`#[path]` includes it).

use llmroute_api::{CompletedEvent, DecisionRecord, Outcome, Preference};
use llmroute_policy::offpolicy::{ActionProbabilities, Explored};
use llmroute_policy::policy::PolicyNetwork;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const MODELS: [&str; 3] = ["cheap", "mid", "premium"];
/// Mean quality per cluster (rows) and model (columns).
pub const QUALITY: [[f64; 3]; 2] = [[0.85, 0.5, 0.9], [0.1, 0.75, 0.8]];
/// Cost per call in USD.
pub const COST: [f64; 3] = [0.0001, 0.0008, 0.004];
pub const EPSILON: f64 = 0.3;
pub const ENCODER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub struct World {
    pub rng: ChaCha8Rng,
    centers: [Vec<f32>; 2],
    next_id: u64,
    route: String,
}

impl World {
    /// Creates a world whose events belong to `route`.
    pub fn new(seed: u64, route: &str) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut center = || -> Vec<f32> {
            let v: Vec<f32> = (0..384).map(|_| rng.random_range(-1.0..1.0)).collect();
            normalise(v)
        };
        let centers = [center(), center()];
        Self {
            rng,
            centers,
            next_id: 1,
            route: route.to_string(),
        }
    }

    /// Draws a prompt: its cluster and an embedding near the cluster's center.
    pub fn prompt(&mut self) -> (usize, Vec<f32>) {
        let cluster = self.rng.random_range(0..2);
        let noisy: Vec<f32> = self.centers[cluster]
            .iter()
            .map(|c| c + self.rng.random_range(-0.05..0.05))
            .collect();
        (cluster, normalise(noisy))
    }

    /// Simulates one request decided by `policy` (under ε-greedy), logged as its sidecar
    /// would log it.
    pub fn event(
        &mut self,
        policy: &PolicyNetwork,
        version: &str,
        latency_ms: f64,
    ) -> CompletedEvent {
        let (cluster, embedding) = self.prompt();
        let w_quality: f64 = self.rng.random_range(0.0..1.0);
        let explored = Explored {
            policy,
            exploration: llmroute_api::Exploration::EpsilonGreedy { epsilon: EPSILON },
        };
        let row = Array2::from_shape_vec((1, 384), embedding.clone()).unwrap();
        let probabilities = explored.action_probabilities(row.view(), &[w_quality as f32]);
        let draw: f32 = self.rng.random();
        let mut action = MODELS.len() - 1;
        let mut acc = 0.0;
        for (k, p) in probabilities.row(0).iter().enumerate() {
            acc += p;
            if draw < acc {
                action = k;
                break;
            }
        }
        let quality = if self.rng.random::<f64>() < QUALITY[cluster][action] {
            1.0
        } else {
            0.0
        };
        let id = self.next_id;
        self.next_id += 1;
        CompletedEvent {
            decision: DecisionRecord {
                decision_id: format!("{id:032x}"),
                route: self.route.clone(),
                config_version: 1,
                model: MODELS[action].into(),
                routed: true,
                preference: Preference {
                    quality: w_quality,
                    cost: 1.0 - w_quality,
                },
                policy_version: Some(version.into()),
                propensity: Some(probabilities[[0, action]] as f64),
            },
            served_model: MODELS[action].into(),
            embedding,
            quality: Some(quality),
            cost_usd: Some(COST[action]),
            prompt_tokens: Some(100),
            completion_tokens: Some(100),
            latency_ms,
            outcome: Outcome::Success,
            attempts: 1,
            timestamp_ms: 1_700_000_000_000 + id,
        }
    }
}

pub fn normalise(v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}
