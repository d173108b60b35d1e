//! Off-policy evaluation: the expected reward of a target policy, estimated from events that
//! another policy `π₀` logged.
//!
//! Each event `i` is re-scored at each evaluation preference `w'_j` (quantiles of the logged
//! preferences, so the estimate covers the trade-offs the route's traffic uses), with
//! reward `r_ij = w'_j · qᵢ − (1 − w'_j) · min(cᵢ / τ, 1)` and importance weight
//! `ρ_ij = π(aᵢ | xᵢ, w'_j) / π₀(aᵢ | xᵢ, wᵢ)`. Averaged over the `n` events and `P` points:
//!
//! - IPS: `V̂ = 1/(nP) · Σᵢⱼ ρ_ij · r_ij`;
//! - SNIPS: `V̂ = Σᵢⱼ ρ_ij · r_ij / Σᵢⱼ ρ_ij`;
//! - DR: `V̂ = 1/(nP) · Σᵢⱼ [ Σ_k π(k | xᵢ, w'_j) · r̂_k(xᵢ, w'_j) + ρ_ij · (r_ij − r̂_aᵢ(xᵢ, w'_j)) ]`
//!   with the cross-fitted direct reward model `r̂` of [`super::reward_model`].
//!
//! With a cap `M` ([`EvaluationConfig::max_importance_weight`]) every `ρ_ij` above is replaced
//! by `min(ρ_ij, M)`, the clipped estimators of Bottou et al. (2013, "Counterfactual reasoning
//! and learning systems", section 4.6). Clipping bounds how much one event can move an
//! estimate: without it, one event logged with a propensity of 1e-30, whose model the target
//! policy also picks, outweighs all others. It biases IPS and DR downwards for a target policy
//! that often picks decisions the logging policy rarely took, by at most the reward mass of the
//! clipped terms.
//!
//! An event's terms at the different points share its outcome and are correlated, so standard
//! errors treat the event as the unit: its terms are averaged over the points first, and the
//! variance is taken over events. SNIPS's standard error is the delta method's, from the
//! influence values `ψᵢ = (Aᵢ − V̂ · Bᵢ) / B̄` with `Aᵢ`, `Bᵢ` the event's mean of `ρ·r` and of
//! `ρ`. Confidence intervals are normal approximations `V̂ ± z · SE`.

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::normal::two_sided_z;
use super::probabilities::is_distribution;
use super::reward_model::RewardModel;
use super::{ActionProbabilities, LoggedEvent, OffPolicyError, validate_events};
use crate::reward::Reward;

/// Events whose embeddings are gathered into one matrix for the target policies.
const CHUNK_ROWS: usize = 2048;

/// One estimate of a policy's expected reward (or of a difference of two), in reward units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub std_error: f64,
    /// Lower end of the normal-approximation confidence interval `mean − z · std_error`.
    pub ci_low: f64,
    /// Upper end `mean + z · std_error`.
    pub ci_high: f64,
}

impl Estimate {
    fn normal(mean: f64, std_error: f64, z: f64) -> Self {
        Self {
            mean,
            std_error,
            ci_low: mean - z * std_error,
            ci_high: mean + z * std_error,
        }
    }

    /// Builds the estimate that data without support gives: SNIPS when no logged action has
    /// target probability.
    fn undefined() -> Self {
        Self {
            mean: f64::NAN,
            std_error: f64::INFINITY,
            ci_low: f64::NEG_INFINITY,
            ci_high: f64::INFINITY,
        }
    }
}

/// The three estimators on the same events.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimates {
    /// Inverse propensity scoring: unbiased, with a variance that grows with the weights.
    pub ips: Estimate,
    /// Self-normalised IPS: slightly biased, lower variance. The mean is NaN when every
    /// logged action has target probability 0.
    pub snips: Estimate,
    /// Doubly robust: unbiased when the propensities are right, and of lower variance than IPS
    /// when the reward model is good.
    pub dr: Estimate,
}

/// Off-policy estimates of a candidate and the stable policy on the same logged events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyComparison {
    pub events: usize,
    /// The `w_quality` values every event was re-scored at, ascending.
    pub preferences: Vec<f32>,
    pub candidate: Estimates,
    pub stable: Estimates,
    /// `candidate − stable`, paired per event, with its own standard errors and intervals.
    pub difference: Estimates,
    /// Kish's effective sample size `(Σᵢ ρᵢ)² / Σᵢ ρᵢ²` of the candidate's weights at each
    /// preference, averaged over the preferences. The weights are the clipped ones when a cap is
    /// set. In events, so never above `events`.
    pub candidate_effective_sample_size: f64,
    /// Share of the candidate's weights `ρ_ij`, over events and preferences, above the cap and
    /// clipped to it; 0 without a cap.
    pub candidate_clipped_fraction: f64,
    /// Confidence level of the intervals.
    pub confidence: f64,
}

/// Settings of [`compare_policies`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationConfig {
    /// Confidence level of the intervals, in `(0, 1)`.
    pub confidence: f64,
    /// Quantiles of the logged `w_quality` to evaluate at: the 10th to the 90th percentile,
    /// evenly spaced, or the median for 1. Equal values count once.
    pub preference_points: usize,
    /// Ridge penalty λ of the direct reward model's regressions.
    pub ridge: f64,
    /// Seed of the split into the reward model's two cross-fitting folds.
    pub seed: u64,
    /// Cap `M` on the importance weights `ρ`, at least 1; `None` leaves them uncapped, and the
    /// estimators unbiased when the logged propensities are right.
    pub max_importance_weight: Option<f64>,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            confidence: 0.95,
            preference_points: 5,
            // Embeddings are L2-normalised, so λ = 1 is small next to the Gram matrix of a few
            // hundred events per model and mainly keeps sparse models well-posed.
            ridge: 1.0,
            seed: 0,
            max_importance_weight: None,
        }
    }
}

impl EvaluationConfig {
    fn validate(&self) -> Result<(), OffPolicyError> {
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            return Err(OffPolicyError::InvalidConfig {
                name: "confidence",
                value: self.confidence.to_string(),
                reason: "use a level in (0, 1), for example 0.95",
            });
        }
        if self.preference_points == 0 {
            return Err(OffPolicyError::InvalidConfig {
                name: "preference_points",
                value: "0".into(),
                reason: "use at least 1 preference point, for example 5",
            });
        }
        if !(self.ridge >= 0.0 && self.ridge.is_finite()) {
            return Err(OffPolicyError::InvalidConfig {
                name: "ridge",
                value: self.ridge.to_string(),
                reason: "use a finite penalty of at least 0, for example 1",
            });
        }
        if let Some(cap) = self.max_importance_weight
            && !(cap >= 1.0 && cap.is_finite())
        {
            return Err(OffPolicyError::InvalidConfig {
                name: "max_importance_weight",
                value: cap.to_string(),
                reason: "use a finite cap of at least 1, for example K / ε for ε-greedy logging \
                         over K models",
            });
        }
        Ok(())
    }
}

/// Estimates the expected reward of `candidate` and `stable` on the same logged events, and
/// their paired difference, by IPS, SNIPS and DR (see the module documentation).
///
/// The policies' probabilities must include the exploration rule they would serve with (wrap
/// them in [`super::Explored`]). Memory: the policies see at most 2 048 events at a time, and
/// the estimators keep a few numbers per event.
pub fn compare_policies(
    candidate: &dyn ActionProbabilities,
    stable: &dyn ActionProbabilities,
    events: &[LoggedEvent],
    reward: Reward,
    config: &EvaluationConfig,
) -> Result<PolicyComparison, OffPolicyError> {
    config.validate()?;
    let Some(first) = events.first() else {
        return Err(OffPolicyError::NoEvents);
    };
    let embedding_dim = candidate
        .embedding_dim()
        .or(stable.embedding_dim())
        .unwrap_or(first.embedding.len());
    validate_events(events, embedding_dim, None)?;
    if let Some(stable_dim) = stable.embedding_dim() {
        validate_events(events, stable_dim, None)?;
    }

    let preferences = preference_points(events, config.preference_points);
    let num_models = probe_num_models(candidate, stable, first, preferences[0])?;
    validate_events(events, embedding_dim, Some(num_models))?;
    let model = RewardModel::cross_fit(events, num_models, reward, config.ridge, config.seed);

    let n = events.len();
    let mut candidate_units = EventUnits::new(n);
    let mut stable_units = EventUnits::new(n);
    let mut weight_sums = vec![0.0f64; preferences.len()];
    let mut squared_weight_sums = vec![0.0f64; preferences.len()];
    let cap = config.max_importance_weight.unwrap_or(f64::INFINITY);
    let mut clipped_weights = 0usize;
    let mut embeddings = Array2::<f32>::zeros((CHUNK_ROWS.min(n), embedding_dim));

    for start in (0..n).step_by(CHUNK_ROWS) {
        let chunk = &events[start..(start + CHUNK_ROWS).min(n)];
        for (row, event) in chunk.iter().enumerate() {
            embeddings
                .row_mut(row)
                .as_slice_mut()
                .expect("standard layout")
                .copy_from_slice(&event.embedding);
        }
        let view = embeddings.slice(ndarray::s![..chunk.len(), ..]);
        for (j, &w) in preferences.iter().enumerate() {
            let w_quality = vec![w; chunk.len()];
            let scored = [
                ("candidate", candidate, &mut candidate_units),
                ("stable", stable, &mut stable_units),
            ];
            for (name, policy, units) in scored {
                let probabilities = policy.action_probabilities(view, &w_quality);
                check_probabilities(name, probabilities.view(), chunk.len(), num_models, start)?;
                let (weights, clipped) =
                    units.add(chunk, start, &probabilities, w, reward, &model, cap);
                if name == "candidate" {
                    clipped_weights += clipped;
                    weight_sums[j] += weights.iter().sum::<f64>();
                    squared_weight_sums[j] += weights.iter().map(|r| r * r).sum::<f64>();
                }
            }
        }
    }

    let points = preferences.len() as f64;
    candidate_units.scale(1.0 / points);
    stable_units.scale(1.0 / points);
    let z = two_sided_z(config.confidence);
    let effective_sizes: f64 = weight_sums
        .iter()
        .zip(&squared_weight_sums)
        .map(|(&sum, &squares)| {
            if squares > 0.0 {
                sum * sum / squares
            } else {
                0.0
            }
        })
        .sum();

    Ok(PolicyComparison {
        events: n,
        candidate: candidate_units.estimates(z),
        stable: stable_units.estimates(z),
        difference: candidate_units.difference(&stable_units, z),
        candidate_effective_sample_size: effective_sizes / points,
        candidate_clipped_fraction: clipped_weights as f64 / (n as f64 * points),
        preferences,
        confidence: config.confidence,
    })
}

/// Quantiles of the logged `w_quality`, by linear interpolation between order statistics, at
/// levels `0.1 + 0.8 · j / (P − 1)` (the median when `P = 1`), ascending and without repeats.
fn preference_points(events: &[LoggedEvent], points: usize) -> Vec<f32> {
    let mut sorted: Vec<f32> = events.iter().map(|event| event.w_quality).collect();
    sorted.sort_by(f32::total_cmp);
    let last = (sorted.len() - 1) as f64;
    let mut preferences: Vec<f32> = (0..points)
        .map(|j| {
            let level = if points == 1 {
                0.5
            } else {
                0.1 + 0.8 * j as f64 / (points - 1) as f64
            };
            let position = level * last;
            let below = position.floor() as usize;
            let above = (below + 1).min(sorted.len() - 1);
            let fraction = (position - below as f64) as f32;
            sorted[below] + fraction * (sorted[above] - sorted[below])
        })
        .collect();
    preferences.dedup();
    preferences
}

/// Runs both policies on the first event to learn the number of models, and checks that they
/// agree on it.
fn probe_num_models(
    candidate: &dyn ActionProbabilities,
    stable: &dyn ActionProbabilities,
    first: &LoggedEvent,
    w_quality: f32,
) -> Result<usize, OffPolicyError> {
    let embedding = ArrayView2::from_shape((1, first.embedding.len()), &first.embedding)
        .expect("one row of the embedding's length");
    let candidate_shape = candidate
        .action_probabilities(embedding, &[w_quality])
        .dim();
    let num_models = candidate_shape.1;
    if candidate_shape.0 != 1 || num_models == 0 {
        return Err(OffPolicyError::ProbabilityShape {
            policy: "candidate",
            rows: candidate_shape.0,
            columns: candidate_shape.1,
            expected_rows: 1,
            expected_columns: num_models.max(1),
        });
    }
    let stable_shape = stable.action_probabilities(embedding, &[w_quality]).dim();
    if stable_shape != (1, num_models) {
        return Err(OffPolicyError::ProbabilityShape {
            policy: "stable",
            rows: stable_shape.0,
            columns: stable_shape.1,
            expected_rows: 1,
            expected_columns: num_models,
        });
    }
    Ok(num_models)
}

/// Checks the shape of a chunk's target probabilities and that each row is a distribution.
fn check_probabilities(
    policy: &'static str,
    probabilities: ArrayView2<f32>,
    rows: usize,
    num_models: usize,
    first_event: usize,
) -> Result<(), OffPolicyError> {
    if probabilities.dim() != (rows, num_models) {
        return Err(OffPolicyError::ProbabilityShape {
            policy,
            rows: probabilities.nrows(),
            columns: probabilities.ncols(),
            expected_rows: rows,
            expected_columns: num_models,
        });
    }
    for (row, values) in probabilities.rows().into_iter().enumerate() {
        if !is_distribution(values) {
            return Err(OffPolicyError::InvalidProbabilities {
                policy,
                index: first_event + row,
                sum: values.sum(),
            });
        }
    }
    Ok(())
}

/// Per-event terms of one target policy, summed over the preference points (averaged once
/// [`EventUnits::scale`] divides by their number).
struct EventUnits {
    /// `Σⱼ ρ_ij · r_ij`.
    weighted_reward: Vec<f64>,
    /// `Σⱼ ρ_ij`.
    weight: Vec<f64>,
    /// `Σⱼ` of the DR term.
    doubly_robust: Vec<f64>,
}

impl EventUnits {
    fn new(n: usize) -> Self {
        Self {
            weighted_reward: vec![0.0; n],
            weight: vec![0.0; n],
            doubly_robust: vec![0.0; n],
        }
    }

    /// Adds the terms of `chunk` (events `start..`) at preference `w` with importance weights
    /// clipped at `cap`, and returns those weights `min(ρ_ij, cap)` of its rows and how many
    /// were clipped.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        chunk: &[LoggedEvent],
        start: usize,
        probabilities: &Array2<f32>,
        w: f32,
        reward: Reward,
        model: &RewardModel,
        cap: f64,
    ) -> (Vec<f64>, usize) {
        let mut weights = Vec::with_capacity(chunk.len());
        let mut clipped = 0;
        for (row, event) in chunk.iter().enumerate() {
            let i = start + row;
            let target = probabilities.row(row);
            let r = reward.reward(w, event.quality, event.cost_usd) as f64;
            // ρ = π(a | x, w') / π₀(a | x, w), clipped at the cap.
            let unclipped = target[event.action] as f64 / event.propensity as f64;
            if unclipped > cap {
                clipped += 1;
            }
            let rho = unclipped.min(cap);
            // Direct method: the reward model's expectation under the target policy.
            let direct: f64 = target
                .iter()
                .enumerate()
                .map(|(k, &p)| p as f64 * model.reward(i, k, w))
                .sum();
            let correction = rho * (r - model.reward(i, event.action, w));
            self.weighted_reward[i] += rho * r;
            self.weight[i] += rho;
            self.doubly_robust[i] += direct + correction;
            weights.push(rho);
        }
        (weights, clipped)
    }

    fn scale(&mut self, factor: f64) {
        for values in [
            &mut self.weighted_reward,
            &mut self.weight,
            &mut self.doubly_robust,
        ] {
            values.iter_mut().for_each(|v| *v *= factor);
        }
    }

    fn estimates(&self, z: f64) -> Estimates {
        Estimates {
            ips: mean_estimate(self.weighted_reward.iter().copied(), z),
            snips: match self.snips_influence() {
                Some((mean, influence)) => influence_estimate(mean, &influence, z),
                None => Estimate::undefined(),
            },
            dr: mean_estimate(self.doubly_robust.iter().copied(), z),
        }
    }

    /// Paired differences `self − other`, event by event.
    fn difference(&self, other: &Self, z: f64) -> Estimates {
        let paired = |a: &[f64], b: &[f64]| {
            let differences = a.iter().zip(b).map(|(x, y)| x - y);
            mean_estimate(differences, z)
        };
        let snips = match (self.snips_influence(), other.snips_influence()) {
            (Some((mean, influence)), Some((other_mean, other_influence))) => {
                let differences: Vec<f64> = influence
                    .iter()
                    .zip(&other_influence)
                    .map(|(x, y)| x - y)
                    .collect();
                influence_estimate(mean - other_mean, &differences, z)
            }
            _ => Estimate::undefined(),
        };
        Estimates {
            ips: paired(&self.weighted_reward, &other.weighted_reward),
            snips,
            dr: paired(&self.doubly_robust, &other.doubly_robust),
        }
    }

    /// SNIPS `V̂ = ΣAᵢ / ΣBᵢ` and its delta-method influence values `(Aᵢ − V̂ Bᵢ) / B̄`, or `None`
    /// when `ΣBᵢ = 0`.
    fn snips_influence(&self) -> Option<(f64, Vec<f64>)> {
        let weight_sum: f64 = self.weight.iter().sum();
        if weight_sum <= 0.0 {
            return None;
        }
        let mean = self.weighted_reward.iter().sum::<f64>() / weight_sum;
        let mean_weight = weight_sum / self.weight.len() as f64;
        let influence = self
            .weighted_reward
            .iter()
            .zip(&self.weight)
            .map(|(a, b)| (a - mean * b) / mean_weight)
            .collect();
        Some((mean, influence))
    }
}

/// Sample mean of per-event values, with standard error `s / √n`.
fn mean_estimate(values: impl Iterator<Item = f64> + Clone, z: f64) -> Estimate {
    let n = values.clone().count() as f64;
    let mean = values.clone().sum::<f64>() / n;
    let deviations: Vec<f64> = values.map(|v| v - mean).collect();
    influence_estimate(mean, &deviations, z)
}

/// Estimate with standard error `√(Σψᵢ² / (n − 1) / n)` from zero-mean influence values `ψᵢ`;
/// infinite for a single event.
fn influence_estimate(mean: f64, influence: &[f64], z: f64) -> Estimate {
    let n = influence.len() as f64;
    let std_error = if influence.len() < 2 {
        f64::INFINITY
    } else {
        (influence.iter().map(|v| v * v).sum::<f64>() / (n - 1.0) / n).sqrt()
    };
    Estimate::normal(mean, std_error, z)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::offpolicy::synthetic::{
        self, ClusterPolicy, EMBEDDING_DIM, NUM_MODELS, REWARD, UniformPolicy,
    };
    use crate::offpolicy::{OffPolicyConfig, train_off_policy};
    use crate::policy::network::{NetworkShape, PolicyNetwork};

    fn contains(estimate: &Estimate, truth: f64) -> bool {
        estimate.ci_low <= truth && truth <= estimate.ci_high
    }

    /// Expected reward of the uniform policy at the preferences, averaged over them.
    fn uniform_value(preferences: &[f32]) -> f64 {
        let mut total = 0.0;
        for &w in preferences {
            for cluster in 0..2 {
                for model in 0..NUM_MODELS {
                    total +=
                        0.5 / NUM_MODELS as f64 * synthetic::expected_reward(cluster, model, w);
                }
            }
        }
        total / preferences.len() as f64
    }

    #[test]
    fn offpolicy_estimators_cover_true_value() {
        let events = synthetic::logged_events(20_000, &mut ChaCha8Rng::seed_from_u64(21));
        // 99 % intervals: with 12 checks on one sample, 95 % ones would miss now and then.
        let config = EvaluationConfig {
            confidence: 0.99,
            ..EvaluationConfig::default()
        };
        let comparison = compare_policies(&ClusterPolicy, &UniformPolicy, &events, REWARD, &config)
            .expect("valid events");
        assert_eq!(comparison.events, 20_000);
        assert_eq!(comparison.preferences.len(), 5);

        let truth = ClusterPolicy::true_value(&comparison.preferences);
        let uniform = uniform_value(&comparison.preferences);
        let candidate = &comparison.candidate;
        assert!(
            contains(&candidate.ips, truth),
            "IPS {candidate:?} vs {truth}"
        );
        assert!(
            contains(&candidate.snips, truth),
            "SNIPS {candidate:?} vs {truth}"
        );
        assert!(
            contains(&candidate.dr, truth),
            "DR {candidate:?} vs {truth}"
        );
        let stable = &comparison.stable;
        assert!(
            contains(&stable.ips, uniform),
            "IPS {stable:?} vs {uniform}"
        );
        assert!(contains(&stable.dr, uniform), "DR {stable:?} vs {uniform}");
        let difference = &comparison.difference;
        let true_difference = truth - uniform;
        assert!(
            contains(&difference.dr, true_difference),
            "DR {difference:?} vs {true_difference}"
        );
        assert!(
            contains(&difference.snips, true_difference),
            "SNIPS {difference:?} vs {true_difference}"
        );
        assert!(
            candidate.dr.std_error < candidate.ips.std_error,
            "DR {:?} vs IPS {:?}",
            candidate.dr,
            candidate.ips
        );
        // Logging is uniform, so the uniform policy's weights are all 1.
        assert_eq!(stable.snips.mean, stable.ips.mean);
        let ess = comparison.candidate_effective_sample_size;
        assert!(ess > 0.0, "effective sample size {ess}");
        assert!(ess < 20_000.0, "effective sample size {ess}");
    }

    #[test]
    fn offpolicy_intervals_cover_at_nominal_rate() {
        // 30 samples of 20 000 events: a 95 % interval should miss the truth about 1.5 times.
        // 7 misses or more happen with probability below 0.001 when the standard errors are
        // right.
        let mut misses = [0usize; 3];
        for seed in 100..130 {
            let events = synthetic::logged_events(20_000, &mut ChaCha8Rng::seed_from_u64(seed));
            let comparison = compare_policies(
                &ClusterPolicy,
                &UniformPolicy,
                &events,
                REWARD,
                &EvaluationConfig::default(),
            )
            .expect("valid events");
            let truth = ClusterPolicy::true_value(&comparison.preferences);
            let estimates = comparison.candidate;
            for (count, estimate) in
                misses
                    .iter_mut()
                    .zip([estimates.ips, estimates.snips, estimates.dr])
            {
                if !contains(&estimate, truth) {
                    *count += 1;
                }
            }
        }
        assert!(
            misses.iter().all(|&count| count < 7),
            "IPS, SNIPS, DR misses: {misses:?}"
        );
    }

    #[test]
    fn offpolicy_policy_against_itself_differs_by_zero() {
        let events = synthetic::logged_events(500, &mut ChaCha8Rng::seed_from_u64(5));
        let comparison = compare_policies(
            &ClusterPolicy,
            &ClusterPolicy,
            &events,
            REWARD,
            &EvaluationConfig::default(),
        )
        .expect("valid events");
        for estimate in [
            comparison.difference.ips,
            comparison.difference.snips,
            comparison.difference.dr,
        ] {
            assert_eq!(estimate.mean, 0.0);
            assert_eq!(estimate.std_error, 0.0);
        }
    }

    fn learning_config() -> OffPolicyConfig {
        OffPolicyConfig {
            steps: 1_000,
            batch_size: 32,
            preferences_per_event: 4,
            hidden_dim: 32,
            preference_dim: 8,
            learning_rate: 3e-3,
            ..OffPolicyConfig::default()
        }
    }

    fn fresh_network() -> PolicyNetwork {
        let shape = NetworkShape {
            embedding_dim: EMBEDDING_DIM,
            preference_dim: 1,
            hidden_dim: 1,
            num_models: NUM_MODELS,
        };
        PolicyNetwork::new(shape, &mut ChaCha8Rng::seed_from_u64(0))
    }

    #[test]
    fn offpolicy_trained_policy_beats_uniform() {
        let training = synthetic::logged_events(4_000, &mut ChaCha8Rng::seed_from_u64(31));
        let held_out = synthetic::logged_events(4_000, &mut ChaCha8Rng::seed_from_u64(32));
        let (good, summary) =
            train_off_policy(&fresh_network(), &training, REWARD, &learning_config())
                .expect("valid events");
        assert!(!summary.continued_from_initial);

        let inverted_events: Vec<LoggedEvent> = training
            .iter()
            .map(|event| LoggedEvent {
                quality: 1.0 - event.quality,
                ..event.clone()
            })
            .collect();
        let (inverted, _) = train_off_policy(
            &fresh_network(),
            &inverted_events,
            REWARD,
            &learning_config(),
        )
        .expect("valid events");

        let config = EvaluationConfig::default();
        let against_uniform = compare_policies(&good, &UniformPolicy, &held_out, REWARD, &config)
            .expect("valid events");
        let difference = against_uniform.difference;
        assert!(difference.dr.ci_low > 0.0, "DR {:?}", difference.dr);
        assert!(difference.ips.ci_low > 0.0, "IPS {:?}", difference.ips);
        assert!(
            difference.snips.ci_low > 0.0,
            "SNIPS {:?}",
            difference.snips
        );

        let against_inverted =
            compare_policies(&good, &inverted, &held_out, REWARD, &config).expect("valid events");
        let difference = against_inverted.difference;
        assert!(difference.dr.ci_low > 0.0, "DR {:?}", difference.dr);
        assert!(difference.ips.ci_low > 0.0, "IPS {:?}", difference.ips);
    }

    fn events_with_preferences(preferences: &[f32]) -> Vec<LoggedEvent> {
        let template = synthetic::logged_events(1, &mut ChaCha8Rng::seed_from_u64(1)).remove(0);
        preferences
            .iter()
            .map(|&w_quality| LoggedEvent {
                w_quality,
                ..template.clone()
            })
            .collect()
    }

    #[test]
    fn offpolicy_preference_points_are_quantiles() {
        let preferences: Vec<f32> = (0..=100).map(|i| i as f32 / 100.0).collect();
        let points = preference_points(&events_with_preferences(&preferences), 5);
        let expected = [0.1, 0.3, 0.5, 0.7, 0.9];
        assert_eq!(points.len(), 5, "{points:?}");
        for (point, target) in points.iter().zip(expected) {
            assert!((point - target).abs() < 1e-6, "{points:?}");
        }
        assert_eq!(
            preference_points(&events_with_preferences(&preferences), 1),
            [0.5]
        );
    }

    #[test]
    fn offpolicy_equal_preferences_give_one_point() {
        let events = events_with_preferences(&[0.7; 50]);
        assert_eq!(preference_points(&events, 5), [0.7]);
        let comparison = compare_policies(
            &ClusterPolicy,
            &UniformPolicy,
            &events,
            REWARD,
            &EvaluationConfig::default(),
        )
        .expect("valid events");
        assert_eq!(comparison.preferences, [0.7]);
    }

    #[test]
    fn offpolicy_single_event_has_infinite_error() {
        let events = synthetic::logged_events(1, &mut ChaCha8Rng::seed_from_u64(8));
        let comparison = compare_policies(
            &ClusterPolicy,
            &UniformPolicy,
            &events,
            REWARD,
            &EvaluationConfig::default(),
        )
        .expect("valid events");
        assert!(comparison.candidate.ips.mean.is_finite());
        assert_eq!(comparison.candidate.ips.std_error, f64::INFINITY);
        assert_eq!(comparison.difference.dr.ci_low, f64::NEG_INFINITY);
    }

    /// Returns a fixed number of columns, each `1 / columns`.
    struct Columns(usize);

    impl ActionProbabilities for Columns {
        fn action_probabilities(
            &self,
            embeddings: ArrayView2<f32>,
            _w_quality: &[f32],
        ) -> Array2<f32> {
            Array2::from_elem((embeddings.nrows(), self.0), 1.0 / self.0 as f32)
        }
    }

    #[test]
    fn offpolicy_evaluation_rejects_mismatches() {
        let events = synthetic::logged_events(20, &mut ChaCha8Rng::seed_from_u64(8));
        let config = EvaluationConfig::default();

        let error = compare_policies(&Columns(3), &Columns(4), &events, REWARD, &config)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("the stable policy returned probabilities of shape [1 × 4]"),
            "{error}"
        );

        let mut out_of_range = events.clone();
        out_of_range[5].action = 2;
        let error =
            compare_policies(&Columns(2), &Columns(2), &out_of_range, REWARD, &config).unwrap_err();
        assert!(
            matches!(
                error,
                OffPolicyError::ActionOutOfRange { num_models: 2, .. }
            ),
            "{error}"
        );

        let wide = PolicyNetwork::new(
            NetworkShape {
                embedding_dim: 16,
                preference_dim: 2,
                hidden_dim: 4,
                num_models: 3,
            },
            &mut ChaCha8Rng::seed_from_u64(1),
        );
        let error = compare_policies(&wide, &UniformPolicy, &events, REWARD, &config).unwrap_err();
        assert_eq!(
            error,
            OffPolicyError::EmbeddingLength {
                index: 0,
                expected: 16,
                found: EMBEDDING_DIM
            }
        );

        let error = compare_policies(
            &UniformPolicy,
            &UniformPolicy,
            &events,
            REWARD,
            &EvaluationConfig {
                confidence: 1.0,
                ..config
            },
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("invalid confidence = 1"), "{error}");
    }

    /// The same probabilities for every row.
    struct Fixed([f32; 2]);

    impl ActionProbabilities for Fixed {
        fn action_probabilities(
            &self,
            embeddings: ArrayView2<f32>,
            _w_quality: &[f32],
        ) -> Array2<f32> {
            Array2::from_shape_fn((embeddings.nrows(), 2), |(_, k)| self.0[k])
        }
    }

    /// Builds an event of the hand-computed tests, all with the embedding `[1, 0]`.
    fn hand_event(
        action: usize,
        propensity: f32,
        quality: f32,
        cost_usd: f32,
        w_quality: f32,
    ) -> LoggedEvent {
        LoggedEvent {
            embedding: vec![1.0, 0.0],
            w_quality,
            action,
            propensity,
            quality,
            cost_usd,
        }
    }

    #[test]
    fn offpolicy_estimators_match_hand_values() {
        // Two events, τ = 1 USD and one preference point, 0.5, the median of w = 0.2 and 0.8.
        // Rewards at w' = 0.5: r₀ = 0.5 · 1 − 0.5 · 0.2 = 0.4 and r₁ = 0.5 · 0.5 − 0 = 0.25.
        let events = [
            hand_event(0, 0.5, 1.0, 0.2, 0.2),
            hand_event(1, 0.8, 0.5, 0.0, 0.8),
        ];
        let comparison = compare_policies(
            &Fixed([0.25, 0.75]),
            &Fixed([0.5, 0.5]),
            &events,
            Reward::new(1.0),
            &EvaluationConfig {
                preference_points: 1,
                ..EvaluationConfig::default()
            },
        )
        .expect("valid events");
        assert_eq!(comparison.preferences, [0.5]);
        let close = |actual: f64, expected: f64| (actual - expected).abs() < 1e-6;

        // Candidate weights ρ₀ = 0.25 / 0.5 = 0.5 and ρ₁ = 0.75 / 0.8 = 0.9375, so ρ·r is 0.2
        // and 0.234375. IPS = 0.434375 / 2 and SNIPS = 0.434375 / 1.4375. The two per-event
        // values differ by ±d from their mean, so the standard error √(2d² / 1 / 2) is d.
        let candidate = comparison.candidate;
        assert!(close(candidate.ips.mean, 0.217_187_5), "{candidate:?}");
        assert!(close(candidate.ips.std_error, 0.017_187_5), "{candidate:?}");
        assert!(close(candidate.snips.mean, 0.302_173_913), "{candidate:?}");
        // ψᵢ = (ρᵢrᵢ − V̂ρᵢ) / mean(ρ) = ±0.048913 / 0.71875.
        assert!(
            close(candidate.snips.std_error, 0.068_052_930),
            "{candidate:?}"
        );

        // Each of the two cross-fitting folds has one event, and a model with fewer than 10
        // events in a fold is predicted by the mean of the other fold, so each event's r̂ for
        // both models is the other event's outcome: r̂ = 0.25 for event 0 and 0.4 for event 1.
        // DR₀ = 0.25 + 0.5 · (0.4 − 0.25) = 0.325 and DR₁ = 0.4 + 0.9375 · (0.25 − 0.4) =
        // 0.259375.
        assert!(close(candidate.dr.mean, 0.292_187_5), "{candidate:?}");
        assert!(close(candidate.dr.std_error, 0.032_812_5), "{candidate:?}");
        let z = 1.959_963_985;
        assert!(close(candidate.dr.ci_low, 0.292_187_5 - z * 0.032_812_5));
        assert!(close(candidate.dr.ci_high, 0.292_187_5 + z * 0.032_812_5));

        // Stable weights are 1 and 0.625: IPS = (0.4 + 0.15625) / 2, and DR per event is
        // 0.25 + 0.15 = 0.4 and 0.4 − 0.09375 = 0.30625. Paired DR differences are −0.075 and
        // −0.046875.
        let stable = comparison.stable;
        assert!(close(stable.ips.mean, 0.278_125), "{stable:?}");
        assert!(close(stable.dr.mean, 0.353_125), "{stable:?}");
        let difference = comparison.difference;
        assert!(close(difference.ips.mean, -0.060_937_5), "{difference:?}");
        assert!(close(difference.dr.mean, -0.060_937_5), "{difference:?}");
        assert!(
            close(difference.dr.std_error, 0.014_062_5),
            "{difference:?}"
        );

        // Kish: (0.5 + 0.9375)² / (0.5² + 0.9375²) = 2.06640625 / 1.12890625.
        let ess = comparison.candidate_effective_sample_size;
        assert!(close(ess, 1.830_449_827), "effective sample size {ess}");
    }

    #[test]
    fn offpolicy_cap_clips_hand_weights() {
        // The events of `offpolicy_estimators_match_hand_values`, with event 0 logged at
        // propensity 0.1: the candidate's ρ₀ = 0.25 / 0.1 = 2.5 is clipped to 2, ρ₁ = 0.9375 is
        // not, so IPS = (2 · 0.4 + 0.9375 · 0.25) / 2 and SNIPS = 1.034375 / 2.9375.
        let events = [
            hand_event(0, 0.1, 1.0, 0.2, 0.2),
            hand_event(1, 0.8, 0.5, 0.0, 0.8),
        ];
        let compare = |cap| {
            compare_policies(
                &Fixed([0.25, 0.75]),
                &Fixed([0.5, 0.5]),
                &events,
                Reward::new(1.0),
                &EvaluationConfig {
                    preference_points: 1,
                    max_importance_weight: cap,
                    ..EvaluationConfig::default()
                },
            )
            .expect("valid events")
        };
        let close = |actual: f64, expected: f64| (actual - expected).abs() < 1e-6;

        let capped = compare(Some(2.0));
        assert!(close(capped.candidate.ips.mean, 0.517_187_5), "{capped:?}");
        assert!(
            close(capped.candidate.snips.mean, 0.352_127_66),
            "{capped:?}"
        );
        // Candidate: one of its two weights clipped. The stable policy's ρ₀ = 5 is clipped too,
        // to IPS (2 · 0.4 + 0.625 · 0.25) / 2, but only the candidate's share is reported.
        assert!(close(capped.candidate_clipped_fraction, 0.5), "{capped:?}");
        assert!(close(capped.stable.ips.mean, 0.478_125), "{capped:?}");
        // Kish on the clipped weights: (2 + 0.9375)² / (4 + 0.87890625).
        assert!(
            close(capped.candidate_effective_sample_size, 1.768_614_891),
            "{capped:?}"
        );

        let uncapped = compare(None);
        assert!(
            close(uncapped.candidate.ips.mean, 0.617_187_5),
            "{uncapped:?}"
        );
        assert_eq!(uncapped.candidate_clipped_fraction, 0.0);
    }

    #[test]
    fn offpolicy_cap_bounds_a_tiny_propensity() {
        // The event API accepts any propensity in (0, 1]. One event logged at 1e-30, whose
        // model the candidate picks with the largest probability, multiplies its reward by
        // about 1e30 without a cap.
        let mut events = synthetic::logged_events(20_000, &mut ChaCha8Rng::seed_from_u64(21));
        let corrupted = events
            .iter()
            .position(|event| {
                let cluster = synthetic::cluster_of(&event.embedding);
                let probabilities = ClusterPolicy::probabilities(cluster, event.w_quality);
                probabilities[event.action] >= 0.5 && event.quality > 0.5
            })
            .expect("an event whose model the candidate prefers");
        events[corrupted].propensity = 1e-30;
        let evaluate = |cap| {
            compare_policies(
                &ClusterPolicy,
                &UniformPolicy,
                &events,
                REWARD,
                &EvaluationConfig {
                    confidence: 0.99,
                    max_importance_weight: cap,
                    ..EvaluationConfig::default()
                },
            )
            .expect("valid events")
        };

        let uncapped = evaluate(None);
        assert!(
            uncapped.candidate.ips.mean.abs() > 1e20,
            "{:?}",
            uncapped.candidate
        );

        // Uniform logging over 3 models gives every correct event a propensity of 1/3, so a
        // cap of 3 clips the corrupted event only.
        let capped = evaluate(Some(NUM_MODELS as f64));
        let truth = ClusterPolicy::true_value(&capped.preferences);
        for (name, estimate) in [
            ("IPS", capped.candidate.ips),
            ("SNIPS", capped.candidate.snips),
            ("DR", capped.candidate.dr),
        ] {
            assert!(contains(&estimate, truth), "{name} {estimate:?} vs {truth}");
        }
        // At most the corrupted event's weights, at every preference point.
        let most = 1.0 / events.len() as f64;
        assert!(
            capped.candidate_clipped_fraction > 0.0 && capped.candidate_clipped_fraction <= most,
            "clipped fraction {}",
            capped.candidate_clipped_fraction
        );
    }

    #[test]
    fn offpolicy_cap_below_one_is_rejected() {
        let events = synthetic::logged_events(20, &mut ChaCha8Rng::seed_from_u64(8));
        for cap in [0.5, f64::NAN, f64::INFINITY] {
            let error = compare_policies(
                &UniformPolicy,
                &UniformPolicy,
                &events,
                REWARD,
                &EvaluationConfig {
                    max_importance_weight: Some(cap),
                    ..EvaluationConfig::default()
                },
            )
            .unwrap_err()
            .to_string();
            assert!(
                error.contains(&format!("max_importance_weight = {cap}")),
                "{error}"
            );
        }
    }

    /// Probabilities that sum to 2.
    struct Unnormalised;

    impl ActionProbabilities for Unnormalised {
        fn action_probabilities(
            &self,
            embeddings: ArrayView2<f32>,
            _w_quality: &[f32],
        ) -> Array2<f32> {
            Array2::from_elem((embeddings.nrows(), NUM_MODELS), 2.0 / NUM_MODELS as f32)
        }
    }

    #[test]
    fn offpolicy_evaluation_rejects_unnormalised_rows() {
        let events = synthetic::logged_events(20, &mut ChaCha8Rng::seed_from_u64(8));
        let error = compare_policies(
            &UniformPolicy,
            &Unnormalised,
            &events,
            REWARD,
            &EvaluationConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("stable policy returned probabilities summing to 2"),
            "{error}"
        );
    }

    /// Probabilities of a network whose weights became NaN.
    struct NotANumber;

    impl ActionProbabilities for NotANumber {
        fn action_probabilities(
            &self,
            embeddings: ArrayView2<f32>,
            _w_quality: &[f32],
        ) -> Array2<f32> {
            Array2::from_elem((embeddings.nrows(), NUM_MODELS), f32::NAN)
        }
    }

    #[test]
    fn offpolicy_explored_nan_is_rejected() {
        use crate::offpolicy::Explored;
        use llmroute_api::config::Exploration;
        // An argmax over [NaN, NaN, NaN] returns index 0. A greedy rule would turn the row into
        // the valid distribution [1, 0, 0], and ε-greedy into [1 − ε + ε/3, ε/3, ε/3], so the
        // gate would score a broken network as "always model 0".
        let events = synthetic::logged_events(20, &mut ChaCha8Rng::seed_from_u64(8));
        for exploration in [
            Exploration::Greedy,
            Exploration::Sample,
            Exploration::EpsilonGreedy { epsilon: 0.3 },
        ] {
            let broken = Explored {
                policy: &NotANumber,
                exploration,
            };
            let error = compare_policies(
                &broken,
                &UniformPolicy,
                &events,
                REWARD,
                &EvaluationConfig::default(),
            )
            .expect_err("NaN probabilities");
            assert!(
                matches!(
                    error,
                    OffPolicyError::InvalidProbabilities {
                        policy: "candidate",
                        index: 0,
                        ..
                    }
                ),
                "{exploration:?}: {error}"
            );
        }
    }

    #[test]
    fn offpolicy_explored_greedy_is_evaluated() {
        use crate::offpolicy::Explored;
        use llmroute_api::config::Exploration;
        let events = synthetic::logged_events(5_000, &mut ChaCha8Rng::seed_from_u64(12));
        let greedy = Explored {
            policy: &ClusterPolicy,
            exploration: Exploration::Greedy,
        };
        let comparison = compare_policies(
            &greedy,
            &UniformPolicy,
            &events,
            REWARD,
            &EvaluationConfig::default(),
        )
        .expect("valid events");
        // Under uniform logging a greedy policy matches a third of the logged actions, whose
        // weight is 3, so the mean weight is 1 and the effective sample size about n / 3.
        let ess = comparison.candidate_effective_sample_size;
        assert!(
            (ess - 5_000.0 / 3.0).abs() < 150.0,
            "effective sample size {ess}"
        );
    }
}
