//! Importance-weighted REINFORCE from logged events.
//!
//! Each step draws `B` logged events uniformly with replacement and re-scores each of them under
//! `m` preferences `w' ~ U[0, 1]`, which gives `N = B · m` rows. For a row with logged event
//! `(x, w, a, p₀, q, c)` and preference `w'`:
//!
//! - reward `r = w' · q − (1 − w') · min(c / τ, 1)`, dimensionless in `[−1, 1]`;
//! - importance weight `ρ = π_θ(a | x, w') / p₀`, and its truncation `ρ̄ = min(ρ, c_max)`;
//! - advantage `A = r − V(x, w')`.
//!
//! The loss of one step is
//!
//! `L(θ) = 1/N · Σᵢ [ −ρ̄ᵢ · Aᵢ · log π_θ(aᵢ | xᵢ, w'ᵢ) − β · H(π_θ(· | xᵢ, w'ᵢ)) ]
//!        + 1/N · Σᵢ ½ · ρ̄ᵢ · (V(xᵢ, w'ᵢ) − rᵢ)²`
//!
//! with `ρ̄ᵢ` and `Aᵢ` held constant (no gradient flows through them) and `H` the entropy in
//! nats. Without clipping, `ρ · ∇log π_θ(a) = ∇π_θ(a) / p₀`, so the policy term is an unbiased
//! estimate of the REINFORCE gradient under `π_θ`. The clip trades a bias for a bounded
//! variance. The value head regresses `r` with the same weights, so it estimates the reward
//! of `π_θ` at `(x, w')` rather than that of `π₀`.

use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{LoggedEvent, OffPolicyError, validate_events};
use crate::policy::adam::Adam;
use crate::policy::network::{ForwardPass, Gradients, NetworkShape, PolicyNetwork};
use crate::reward::Reward;

/// Hyper-parameters of one off-policy training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffPolicyConfig {
    /// Seed of every random choice: fresh weights, drawn events and preferences.
    pub seed: u64,
    /// Gradient steps.
    pub steps: usize,
    /// Logged events per step.
    pub batch_size: usize,
    /// Preferences `w' ~ U[0, 1]` each drawn event is re-scored under (`m`).
    pub preferences_per_event: usize,
    pub learning_rate: f32,
    /// Decoupled weight decay λ of the weight matrices (AdamW).
    pub weight_decay: f32,
    /// Entropy bonus β.
    pub entropy: f32,
    /// Clip `c_max` of the importance weight `π_θ(a | x, w') / π₀(a | x, w)`.
    pub max_importance_weight: f32,
    /// Hidden units of a network started from fresh weights.
    pub hidden_dim: usize,
    /// Output size of the preference encoder φ of a network started from fresh weights.
    pub preference_dim: usize,
}

impl Default for OffPolicyConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            // 2 000 steps of 64 events and 4 preferences are 512 000 weighted rows, about five
            // re-scorings of each of 100 000 events. The offpolicy_bench example trained them
            // in 6.1 s on 2 shared cores, a tenth of the one-minute budget, which leaves room
            // for a busy machine.
            // On the benchmark's synthetic events, 1 000 and 5 000 steps gave the same DR
            // estimate within 0.0005. On recorded outcomes (the offpolicy_real example), 3 000
            // and more steps lowered the first candidate's true reward in most runs, so routes
            // train with 1 500 by default (`spec.training.steps`).
            steps: 2_000,
            batch_size: 64,
            // Re-scoring an event under several preferences costs one forward row each but no
            // new outcome, so it teaches the preference dependence cheaply.
            preferences_per_event: 4,
            // The on-policy trainer's learning rate and weight decay (policy::train), so a
            // candidate continues from the stable policy at the scale it was trained with.
            learning_rate: 1e-3,
            weight_decay: 0.1,
            // The end of the on-policy trainer's entropy schedule: the candidate keeps some
            // spread, and with it support for the next round of logged data.
            entropy: 0.005,
            // ρ reaches K under uniform logging and K / ε under ε-greedy logging. A clip of 10
            // keeps uniform logging over up to 10 models unbiased and bounds the variance of
            // rows whose propensity was small.
            max_importance_weight: 10.0,
            // The on-policy trainer's shape, so a candidate continues from a trained stable
            // policy instead of starting over.
            hidden_dim: 128,
            preference_dim: 16,
        }
    }
}

impl OffPolicyConfig {
    fn validate(&self) -> Result<(), OffPolicyError> {
        let invalid = |name, value: String, reason| {
            Err(OffPolicyError::InvalidConfig {
                name,
                value,
                reason,
            })
        };
        if self.steps == 0 {
            return invalid("steps", "0".into(), "use at least 1 gradient step");
        }
        if self.batch_size == 0 {
            return invalid("batch_size", "0".into(), "use at least 1 event per step");
        }
        if self.preferences_per_event == 0 {
            return invalid(
                "preferences_per_event",
                "0".into(),
                "use at least 1 preference per event",
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return invalid(
                "learning_rate",
                self.learning_rate.to_string(),
                "use a positive finite learning rate, for example 1e-3",
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return invalid(
                "weight_decay",
                self.weight_decay.to_string(),
                "use a finite weight decay of at least 0",
            );
        }
        if !(self.entropy >= 0.0 && self.entropy.is_finite()) {
            return invalid(
                "entropy",
                self.entropy.to_string(),
                "use a finite entropy bonus of at least 0",
            );
        }
        if !(self.max_importance_weight > 0.0 && self.max_importance_weight.is_finite()) {
            return invalid(
                "max_importance_weight",
                self.max_importance_weight.to_string(),
                "use a positive finite clip, for example 10",
            );
        }
        if self.hidden_dim == 0 || self.preference_dim == 0 {
            return invalid(
                "hidden_dim/preference_dim",
                format!("{}/{}", self.hidden_dim, self.preference_dim),
                "use at least 1 unit in each layer",
            );
        }
        Ok(())
    }
}

/// Statistics of one off-policy training run, besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffPolicySummary {
    /// Logged events trained on.
    pub events: usize,
    /// Gradient steps.
    pub steps: usize,
    /// Weighted rows used: `steps · batch_size · preferences_per_event`.
    pub interactions: u64,
    /// Mean unclipped importance weight `ρ` over all rows. Far below 1 means the policy moved
    /// away from the logged actions.
    pub mean_importance_weight: f32,
    /// Fraction of rows with `ρ > max_importance_weight`.
    pub clipped_fraction: f32,
    /// Mean over the last tenth of the steps of the batch objective
    /// `J = 1/N · Σᵢ [ρ̄ᵢ · rᵢ + β · Hᵢ]`: the clipped IPS estimate of the reward plus the
    /// entropy bonus.
    pub final_objective: f32,
    /// Whether training continued from the initial network's weights (false: fresh weights of
    /// the configured shape).
    pub continued_from_initial: bool,
}

/// Trains a policy on logged events, starting from `initial`.
///
/// The result has `initial`'s embedding dimension and number of models. It continues from
/// `initial`'s weights when `initial` already has the configured `hidden_dim` and
/// `preference_dim`. Otherwise, for example from the pricing prior (one hidden unit, one
/// preference feature, too small to learn in), it starts from fresh weights of the configured
/// shape drawn from `config.seed`. The result is deterministic for a seed.
pub fn train_off_policy(
    initial: &PolicyNetwork,
    events: &[LoggedEvent],
    reward: Reward,
    config: &OffPolicyConfig,
) -> Result<(PolicyNetwork, OffPolicySummary), OffPolicyError> {
    config.validate()?;
    let embedding_dim = initial.shape.embedding_dim;
    validate_events(events, embedding_dim, Some(initial.shape.num_models))?;

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let shape = NetworkShape {
        embedding_dim,
        preference_dim: config.preference_dim,
        hidden_dim: config.hidden_dim,
        num_models: initial.shape.num_models,
    };
    let continued_from_initial = initial.shape == shape;
    let mut network = if continued_from_initial {
        initial.clone()
    } else {
        PolicyNetwork::new(shape, &mut rng)
    };
    let mut adam = Adam::new(config.learning_rate);
    adam.weight_decay = config.weight_decay;

    let rows = config.batch_size * config.preferences_per_event;
    let mut embeddings = Array2::<f32>::zeros((rows, embedding_dim));
    let mut w_quality = vec![0.0f32; rows];
    let mut actions = vec![0usize; rows];
    let mut propensities = vec![0.0f32; rows];
    let mut rewards = vec![0.0f32; rows];

    let tail_start = config.steps - config.steps.div_ceil(10);
    let (mut tail_objective, mut tail_steps) = (0.0f64, 0usize);
    let (mut weight_sum, mut clipped_rows) = (0.0f64, 0u64);

    for step in 0..config.steps {
        for slot in 0..config.batch_size {
            let event = &events[rng.random_range(0..events.len())];
            for repeat in 0..config.preferences_per_event {
                let row = slot * config.preferences_per_event + repeat;
                embeddings
                    .row_mut(row)
                    .as_slice_mut()
                    .expect("standard layout")
                    .copy_from_slice(&event.embedding);
                let w = rng.random::<f32>();
                w_quality[row] = w;
                actions[row] = event.action;
                propensities[row] = event.propensity;
                rewards[row] = reward.reward(w, event.quality, event.cost_usd);
            }
        }

        let pass = network.forward(embeddings.view(), &w_quality);
        let batch = WeightedBatch {
            actions: &actions,
            propensities: &propensities,
            rewards: &rewards,
        };
        let (mut gradients, stats) = importance_weighted_gradients(
            &network,
            &pass,
            &batch,
            config.entropy,
            config.max_importance_weight,
        );
        adam.step(&mut network, &mut gradients);

        weight_sum += stats.weight_sum;
        clipped_rows += stats.clipped_rows as u64;
        if step >= tail_start {
            tail_objective += stats.objective as f64;
            tail_steps += 1;
        }
    }

    let interactions = (config.steps * rows) as u64;
    let summary = OffPolicySummary {
        events: events.len(),
        steps: config.steps,
        interactions,
        mean_importance_weight: (weight_sum / interactions as f64) as f32,
        clipped_fraction: (clipped_rows as f64 / interactions as f64) as f32,
        final_objective: (tail_objective / tail_steps as f64) as f32,
        continued_from_initial,
    };
    Ok((network, summary))
}

/// The logged part of a batch's rows: the called model, its logged propensity `p₀` and the
/// reward under the row's preference.
struct WeightedBatch<'a> {
    actions: &'a [usize],
    propensities: &'a [f32],
    rewards: &'a [f32],
}

/// Batch statistics of one importance-weighted step.
#[derive(Debug, Clone, Copy)]
struct WeightedStepStats {
    /// Sum of the unclipped importance weights `ρᵢ`.
    weight_sum: f64,
    /// Rows with `ρᵢ > c_max`.
    clipped_rows: usize,
    /// `J = 1/N · Σᵢ [ρ̄ᵢ · rᵢ + β · Hᵢ]`.
    objective: f32,
    /// Value of the loss `L(θ)` of the module documentation.
    #[cfg_attr(not(test), allow(dead_code))]
    loss: f32,
}

/// Gradients of the loss `L(θ)` of the module documentation for one batch.
///
/// With `p = softmax(z)`, `H = −Σₖ pₖ log pₖ` and `ρ̄`, `A` constant:
/// `∂(−ρ̄ A log p_a)/∂zₖ = −ρ̄ A (1[k = a] − pₖ)`, `∂(−β H)/∂zₖ = β pₖ (log pₖ + H)` and
/// `∂(½ ρ̄ (V − r)²)/∂V = ρ̄ (V − r)`.
fn importance_weighted_gradients(
    network: &PolicyNetwork,
    pass: &ForwardPass,
    batch: &WeightedBatch,
    beta: f32,
    max_importance_weight: f32,
) -> (Gradients, WeightedStepStats) {
    let rows = batch.actions.len();
    let scale = 1.0 / rows as f32;
    let mut d_logits = Array2::<f32>::zeros(pass.logits.raw_dim());
    let mut d_values = Array1::<f32>::zeros(rows);
    let mut stats = WeightedStepStats {
        weight_sum: 0.0,
        clipped_rows: 0,
        objective: 0.0,
        loss: 0.0,
    };

    for i in 0..rows {
        let probabilities = pass.probabilities.row(i);
        let action = batch.actions[i];
        let reward = batch.rewards[i];
        let value = pass.values[i];

        let weight = probabilities[action] / batch.propensities[i];
        let clipped = weight.min(max_importance_weight);
        stats.weight_sum += weight as f64;
        if weight > max_importance_weight {
            stats.clipped_rows += 1;
        }

        let advantage = reward - value;
        let entropy: f32 = -probabilities
            .iter()
            .map(|&p| if p > 0.0 { p * p.ln() } else { 0.0 })
            .sum::<f32>();
        for (k, &p) in probabilities.iter().enumerate() {
            let indicator = if k == action { 1.0 } else { 0.0 };
            let log_p = p.max(f32::MIN_POSITIVE).ln();
            d_logits[[i, k]] =
                scale * (-clipped * advantage * (indicator - p) + beta * p * (log_p + entropy));
        }
        d_values[i] = scale * clipped * (value - reward);

        let log_p_action = probabilities[action].max(f32::MIN_POSITIVE).ln();
        stats.loss += scale * (-clipped * advantage * log_p_action - beta * entropy);
        stats.loss += scale * 0.5 * clipped * (value - reward).powi(2);
        stats.objective += scale * (clipped * reward + beta * entropy);
    }

    let gradients = network.backward(pass, &d_logits, &d_values);
    (gradients, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offpolicy::synthetic;
    use crate::policy::adam::{gradient_slices, parameter_slices};
    use crate::policy::network::PREFERENCE_INPUTS;
    use crate::policy::prior::{PricedModel, pricing_prior};

    fn small_network(rng: &mut ChaCha8Rng) -> PolicyNetwork {
        let shape = NetworkShape {
            embedding_dim: 5,
            preference_dim: 3,
            hidden_dim: 6,
            num_models: 3,
        };
        let mut network = PolicyNetwork::new(shape, rng);
        // Non-zero biases and value head so every parameter has a visible gradient.
        for slice in parameter_slices(&mut network) {
            for value in slice.iter_mut() {
                *value += rng.random_range(-0.3..0.3);
            }
        }
        network
    }

    /// Policy term and value term of `L(θ)` in f64, with `ρ̄` and the advantages held fixed.
    fn split_loss(
        network: &PolicyNetwork,
        embeddings: &Array2<f32>,
        w_quality: &[f32],
        batch: &WeightedBatch,
        clipped_weights: &[f32],
        advantages: &[f32],
        beta: f32,
    ) -> (f64, f64) {
        let pass = network.forward(embeddings.view(), w_quality);
        let rows = batch.actions.len() as f64;
        let (mut policy_loss, mut value_loss) = (0.0f64, 0.0f64);
        for i in 0..batch.actions.len() {
            let p = pass.probabilities.row(i);
            let entropy: f64 = -p.iter().map(|&v| (v as f64) * (v as f64).ln()).sum::<f64>();
            let weight = clipped_weights[i] as f64;
            policy_loss += (-weight * advantages[i] as f64 * (p[batch.actions[i]] as f64).ln()
                - beta as f64 * entropy)
                / rows;
            value_loss +=
                0.5 * weight * ((pass.values[i] - batch.rewards[i]) as f64).powi(2) / rows;
        }
        (policy_loss, value_loss)
    }

    #[test]
    fn offpolicy_gradients_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let network = small_network(&mut rng);
        let embeddings = Array2::from_shape_fn((5, 5), |_| rng.random_range(-1.0..1.0));
        let w_quality = vec![0.0, 0.3, 0.8, 1.0, 0.5];
        // The last row's propensity is small enough for its weight to exceed the clip.
        let batch = WeightedBatch {
            actions: &[0, 2, 1, 2, 1],
            propensities: &[0.5, 0.2, 0.9, 1.0, 0.01],
            rewards: &[0.4, -0.2, 0.9, 0.1, 0.6],
        };
        let beta = 0.05;
        let clip = 3.0;

        let pass = network.forward(embeddings.view(), &w_quality);
        let clipped_weights: Vec<f32> = (0..5)
            .map(|i| (pass.probabilities[[i, batch.actions[i]]] / batch.propensities[i]).min(clip))
            .collect();
        assert_eq!(clipped_weights[4], clip, "one row is clipped");
        let advantages: Vec<f32> = (0..5).map(|i| batch.rewards[i] - pass.values[i]).collect();
        let (mut analytic, stats) =
            importance_weighted_gradients(&network, &pass, &batch, beta, clip);
        assert_eq!(stats.clipped_rows, 1);
        let (policy, value) = split_loss(
            &network,
            &embeddings,
            &w_quality,
            &batch,
            &clipped_weights,
            &advantages,
            beta,
        );
        assert!(
            ((policy + value) - stats.loss as f64).abs() < 1e-4,
            "loss value"
        );

        let analytic: Vec<Vec<f32>> = gradient_slices(&mut analytic)
            .iter()
            .map(|g| g.to_vec())
            .collect();
        let epsilon = 1e-3f32;
        let value_tensors = [6, 7];
        let mut checked = 0;
        for (tensor, tensor_gradients) in analytic.iter().enumerate() {
            for (index, &exact) in tensor_gradients.iter().enumerate() {
                let loss_at = |delta: f32| {
                    let mut shifted = network.clone();
                    parameter_slices(&mut shifted)[tensor][index] += delta;
                    let (policy, value) = split_loss(
                        &shifted,
                        &embeddings,
                        &w_quality,
                        &batch,
                        &clipped_weights,
                        &advantages,
                        beta,
                    );
                    // The value head is trained by the value term only, the policy by its own.
                    if value_tensors.contains(&tensor) {
                        value
                    } else {
                        policy
                    }
                };
                let numeric = (loss_at(epsilon) - loss_at(-epsilon)) / (2.0 * epsilon as f64);
                let exact = exact as f64;
                let tolerance = 2e-3 + 2e-2 * numeric.abs().max(exact.abs());
                assert!(
                    (numeric - exact).abs() <= tolerance,
                    "tensor {tensor} index {index}: analytic {exact:.6} vs finite difference {numeric:.6}"
                );
                checked += 1;
            }
        }
        assert_eq!(
            checked,
            PREFERENCE_INPUTS * 3 + 3 + 8 * 6 + 6 + 6 * 3 + 3 + 6 + 1
        );
    }

    fn small_config() -> OffPolicyConfig {
        OffPolicyConfig {
            steps: 30,
            batch_size: 16,
            preferences_per_event: 3,
            hidden_dim: 16,
            preference_dim: 4,
            ..OffPolicyConfig::default()
        }
    }

    fn prior(embedding_dim: usize) -> PolicyNetwork {
        let models: Vec<PricedModel> = [1.0, 2.0, 3.0]
            .into_iter()
            .enumerate()
            .map(|(k, price)| PricedModel {
                name: format!("m{k}"),
                input_usd_per_million_tokens: price,
                output_usd_per_million_tokens: price,
            })
            .collect();
        pricing_prior(&models, "v0", "test", embedding_dim, 0.01).0
    }

    #[test]
    fn offpolicy_training_is_deterministic() {
        let events = synthetic::logged_events(300, &mut ChaCha8Rng::seed_from_u64(2));
        let initial = prior(synthetic::EMBEDDING_DIM);
        let run = || {
            train_off_policy(&initial, &events, synthetic::REWARD, &small_config())
                .expect("valid events")
        };
        let (first, first_summary) = run();
        let (second, second_summary) = run();
        assert_eq!(first, second);
        assert_eq!(first_summary, second_summary);
    }

    #[test]
    fn offpolicy_prior_starts_fresh() {
        let events = synthetic::logged_events(100, &mut ChaCha8Rng::seed_from_u64(2));
        let config = small_config();
        let (network, summary) = train_off_policy(
            &prior(synthetic::EMBEDDING_DIM),
            &events,
            synthetic::REWARD,
            &config,
        )
        .expect("valid events");
        assert!(!summary.continued_from_initial);
        assert_eq!(network.shape.hidden_dim, config.hidden_dim);
        assert_eq!(network.shape.preference_dim, config.preference_dim);
        assert_eq!(network.shape.num_models, 3);
        assert_eq!(summary.events, 100);
        assert_eq!(summary.steps, 30);
        assert_eq!(summary.interactions, 30 * 16 * 3);
        assert!(summary.mean_importance_weight > 0.0);
        assert!((0.0..=1.0).contains(&summary.clipped_fraction));
    }

    #[test]
    fn offpolicy_continues_from_matching_shape() {
        let events = synthetic::logged_events(100, &mut ChaCha8Rng::seed_from_u64(2));
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let config = OffPolicyConfig {
            steps: 1,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            ..small_config()
        };
        let shape = NetworkShape {
            embedding_dim: synthetic::EMBEDDING_DIM,
            preference_dim: config.preference_dim,
            hidden_dim: config.hidden_dim,
            num_models: 3,
        };
        let mut initial = PolicyNetwork::new(shape, &mut rng);
        let (mut network, summary) =
            train_off_policy(&initial, &events, synthetic::REWARD, &config).expect("valid events");
        assert!(summary.continued_from_initial);
        // One Adam step moves each parameter by at most about the learning rate.
        let before = parameter_slices(&mut initial);
        let after = parameter_slices(&mut network);
        for (tensor, (a, b)) in before.iter().zip(&after).enumerate() {
            for (index, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                assert!(
                    (x - y).abs() <= 1.01e-4,
                    "tensor {tensor} index {index}: {x} became {y}"
                );
            }
        }
    }

    #[test]
    fn offpolicy_config_errors_name_the_value() {
        let events = synthetic::logged_events(10, &mut ChaCha8Rng::seed_from_u64(2));
        let initial = prior(synthetic::EMBEDDING_DIM);
        let cases = [
            (
                OffPolicyConfig {
                    steps: 0,
                    ..small_config()
                },
                "invalid steps = 0",
            ),
            (
                OffPolicyConfig {
                    learning_rate: -1.0,
                    ..small_config()
                },
                "invalid learning_rate = -1",
            ),
            (
                OffPolicyConfig {
                    max_importance_weight: 0.0,
                    ..small_config()
                },
                "invalid max_importance_weight = 0",
            ),
        ];
        for (config, expected) in cases {
            let message = train_off_policy(&initial, &events, synthetic::REWARD, &config)
                .expect_err(expected)
                .to_string();
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn offpolicy_training_rejects_wrong_embedding() {
        let mut events = synthetic::logged_events(10, &mut ChaCha8Rng::seed_from_u64(2));
        events[7].embedding.truncate(3);
        let error = train_off_policy(
            &prior(synthetic::EMBEDDING_DIM),
            &events,
            synthetic::REWARD,
            &small_config(),
        )
        .unwrap_err();
        assert_eq!(
            error,
            OffPolicyError::EmbeddingLength {
                index: 7,
                expected: synthetic::EMBEDDING_DIM,
                found: 3
            }
        );
    }
}
