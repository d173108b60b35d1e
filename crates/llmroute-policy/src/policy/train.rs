//! REINFORCE training of the BaRP policy from bandit feedback.
//!
//! Each step draws a batch of prompts and a preference per sample from Dirichlet(α, α) on the
//! 1-simplex. For two weights that is `w_quality ~ Beta(α, α)`: α = 1 is `U[0, 1]`, and the
//! default α = ½ puts more weight near both ends. It samples one model per sample from the
//! current policy and observes that model's outcome only. The loss per batch is
//!
//! `L(θ) = 1/B · Σᵢ [ −(rᵢ − V(xᵢ, wᵢ)) · log π_θ(aᵢ | xᵢ, wᵢ) − β · H(π_θ(· | xᵢ, wᵢ)) ]
//!        + 1/B · Σᵢ ½ (V(xᵢ, wᵢ) − rᵢ)²`
//!
//! with `rᵢ` the BaRP reward of the observed call, the value baseline `V` treated as a constant
//! in the policy term, and `β` the entropy bonus, annealed linearly over training.

use indicatif::ProgressBar;
use ndarray::{Array1, Array2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};

use super::adam::Adam;
use super::network::{ForwardPass, Gradients, NetworkShape, PolicyNetwork};
use crate::bandit::ReplayEnvironment;
use crate::reward::Reward;

/// Hyper-parameters of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Seed of every random choice (initial weights, prompts, preferences, actions).
    pub seed: u64,
    /// Gradient steps, unless `interactions_per_prompt` is set: then that sets the count.
    pub steps: usize,
    /// Sets `steps` from the size of the training set: `⌈prompts · n / batch_size⌉` steps,
    /// so each training prompt is drawn `n` times on average whatever the data set's size.
    /// A replayed prompt reveals the same outcome every time it is drawn with the same model,
    /// so past some number of draws per prompt the policy fits those prompts' recorded
    /// outcomes rather than what the prompts have in common.
    #[serde(default)]
    pub interactions_per_prompt: Option<usize>,
    /// Samples (bandit interactions) per step.
    pub batch_size: usize,
    pub learning_rate: f32,
    /// Decoupled weight decay λ of the weight matrices (AdamW).
    #[serde(default)]
    pub weight_decay: f32,
    /// Entropy bonus β at the first step.
    pub entropy_start: f32,
    /// Entropy bonus β at the last step.
    pub entropy_end: f32,
    /// Output size of the preference encoder φ.
    pub preference_dim: usize,
    /// Hidden units of the decision head.
    pub hidden_dim: usize,
    /// Learning rate at the last step, reached by cosine decay from `learning_rate`. `None`
    /// keeps the learning rate constant.
    #[serde(default)]
    pub learning_rate_end: Option<f32>,
    /// Rescales the advantages of each batch to zero mean and unit standard deviation.
    #[serde(default)]
    pub normalize_advantages: bool,
    /// Concentration α of the Dirichlet(α, α) that preferences are drawn from. α = 1 is the
    /// uniform distribution of `w_quality` on [0, 1]. α < 1 puts more preferences near
    /// "quality only" and "cost only", where the best model can change within a narrow range
    /// of `w_quality`: on paretobandit, gemini-2.5-pro is worth its price only above about
    /// 0.99.
    #[serde(default = "default_concentration")]
    pub preference_concentration: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            // 640 000 interactions: on a validation split of llmrouter-9llm's training prompts
            // (examples/tune_barp.rs) 10 000 steps beat 3 000 steps for each of three seeds.
            steps: 10_000,
            interactions_per_prompt: None,
            batch_size: 64,
            learning_rate: 1e-3,
            // On the same validation splits, λ = 0.1 raised the mean reward over the sweep both
            // on held-out prompts and on held-out tasks, for two seeds.
            weight_decay: 0.1,
            entropy_start: 0.05,
            entropy_end: 0.005,
            preference_dim: 16,
            hidden_dim: 128,
            // Cosine decay to 1e-4 raised the mean validation reward over the sweep on both
            // validation splits of llmrouter-9llm and paretobandit-k3 (means of seeds 7, 8, 9).
            learning_rate_end: Some(1e-4),
            normalize_advantages: false,
            // Dirichlet(½, ½), the arcsine distribution of w_quality. We compared it with the
            // uniform Dirichlet(1, 1) on the held-out prompts and held-out tasks of the three
            // data sets (examples/tune_barp.rs, 200 draws per prompt). It raised the mean reward
            // over the sweep on five of those six splits and matched it on the sixth. α = 0.3
            // did not do better than ½.
            preference_concentration: 0.5,
        }
    }
}

/// Concentration of a configuration written before the field existed: those runs drew
/// preferences from U[0, 1].
fn default_concentration() -> f32 {
    1.0
}

/// Draws per training prompt of `llmroute train` and `llmroute eval`. We compared 60, 120
/// and 200 draws per prompt and a fixed 10,000 steps on the validation splits of the three
/// data sets (`examples/tune_barp.rs`). Summed over data sets and splits, 200 gave the
/// highest mean reward over the sweep. A fixed 10,000 steps is 134 draws per prompt on
/// llmrouter-9llm but 420 on paretobandit, where it did worst (`docs/benchmarks.md`).
pub const DEFAULT_INTERACTIONS_PER_PROMPT: usize = 200;

impl TrainConfig {
    /// Bandit interactions (observed outcomes) the run uses: `steps · batch_size`, saturating at
    /// `usize::MAX`. The command line rejects settings whose product overflows before training.
    pub fn interactions(&self) -> usize {
        self.steps.saturating_mul(self.batch_size)
    }

    /// Returns this configuration with `steps` set for a training set of `prompts` prompts.
    /// Without `interactions_per_prompt` it is returned unchanged.
    pub fn for_prompts(&self, prompts: usize) -> Self {
        let mut resolved = self.clone();
        if let Some(per_prompt) = self.interactions_per_prompt {
            resolved.steps = prompts
                .saturating_mul(per_prompt)
                .div_ceil(self.batch_size.max(1))
                .max(1);
        }
        resolved
    }

    /// Entropy bonus at `step`, linear from `entropy_start` to `entropy_end`.
    pub fn entropy_at(&self, step: usize) -> f32 {
        self.entropy_start + (self.entropy_end - self.entropy_start) * self.progress(step)
    }

    /// Learning rate at `step`: `learning_rate`, or its cosine decay to `learning_rate_end`.
    pub fn learning_rate_at(&self, step: usize) -> f32 {
        match self.learning_rate_end {
            None => self.learning_rate,
            Some(end) => {
                let cosine = 0.5 * (1.0 + (std::f32::consts::PI * self.progress(step)).cos());
                end + (self.learning_rate - end) * cosine
            }
        }
    }

    /// Fraction of training done at `step`, from 0 at the first step to 1 at the last.
    fn progress(&self, step: usize) -> f32 {
        if self.steps > 1 {
            step as f32 / (self.steps - 1) as f32
        } else {
            1.0
        }
    }
}

/// Statistics of one training run, besides the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Outcomes revealed by the environment: exactly one per interaction.
    pub interactions: u64,
    /// Mean reward of the sampled actions over the last tenth of training.
    pub final_mean_reward: f32,
    /// Mean policy entropy (nats) over the last tenth of training.
    pub final_mean_entropy: f32,
}

/// Trains a policy from bandit feedback on `environment`. `initial` continues from existing
/// weights (its shape must match the environment); otherwise weights start from `config.seed`.
pub fn train(
    environment: &mut ReplayEnvironment,
    reward: Reward,
    config: &TrainConfig,
    initial: Option<PolicyNetwork>,
    progress: &ProgressBar,
) -> (PolicyNetwork, TrainSummary) {
    let config = &config.for_prompts(environment.num_prompts());
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let shape = NetworkShape {
        embedding_dim: environment.context_dim(),
        preference_dim: config.preference_dim,
        hidden_dim: config.hidden_dim,
        num_models: environment.num_arms(),
    };
    let mut network = match initial {
        Some(network) => {
            assert_eq!(
                network.shape.embedding_dim, shape.embedding_dim,
                "embedding dimension"
            );
            assert_eq!(
                network.shape.num_models, shape.num_models,
                "number of models"
            );
            network
        }
        None => PolicyNetwork::new(shape, &mut rng),
    };
    let mut adam = Adam::new(config.learning_rate);
    adam.weight_decay = config.weight_decay;
    let pulls_before = environment.pulls();

    let tail_start = config.steps - config.steps.div_ceil(10);
    let (mut tail_reward, mut tail_entropy, mut tail_samples) = (0.0f64, 0.0f64, 0usize);

    let preferences = PreferenceDistribution::new(config.preference_concentration);

    progress.set_length(config.steps as u64);
    for step in 0..config.steps {
        let batch = sample_batch(environment, config.batch_size, &preferences, &mut rng);
        let pass = network.forward(batch.embeddings.view(), &batch.w_quality);

        let actions: Vec<usize> = pass
            .probabilities
            .rows()
            .into_iter()
            .map(|row| sample_categorical(row.as_slice().expect("standard layout"), &mut rng))
            .collect();
        let rewards: Vec<f32> = batch
            .prompts
            .iter()
            .zip(&actions)
            .zip(&batch.w_quality)
            .map(|((&prompt, &action), &w_quality)| {
                let outcome = environment.pull(prompt, action);
                reward.reward(w_quality, outcome.quality, outcome.cost)
            })
            .collect();

        let options = ReinforceOptions {
            beta: config.entropy_at(step),
            normalize_advantages: config.normalize_advantages,
        };
        let (mut gradients, stats) =
            reinforce_gradients_with(&network, &pass, &actions, &rewards, &options);
        adam.learning_rate = config.learning_rate_at(step);
        adam.step(&mut network, &mut gradients);

        if step >= tail_start {
            tail_reward += stats.mean_reward as f64 * rewards.len() as f64;
            tail_entropy += stats.mean_entropy as f64 * rewards.len() as f64;
            tail_samples += rewards.len();
        }
        progress.inc(1);
    }
    progress.finish();

    let samples = tail_samples.max(1) as f64;
    let summary = TrainSummary {
        interactions: environment.pulls() - pulls_before,
        final_mean_reward: (tail_reward / samples) as f32,
        final_mean_entropy: (tail_entropy / samples) as f32,
    };
    (network, summary)
}

/// One batch of contexts: prompt indices, their embeddings and sampled preferences.
struct Batch {
    prompts: Vec<usize>,
    embeddings: Array2<f32>,
    w_quality: Vec<f32>,
}

/// Distribution of the training preferences' `w_quality`: Dirichlet(α, α) on the 1-simplex.
enum PreferenceDistribution {
    /// α = 1, drawn as `U[0, 1]`, the random stream of runs made before α existed.
    Uniform,
    Beta(rand_distr::Beta<f32>),
}

impl PreferenceDistribution {
    fn new(concentration: f32) -> Self {
        if concentration == 1.0 {
            return Self::Uniform;
        }
        match rand_distr::Beta::new(concentration, concentration) {
            Ok(beta) => Self::Beta(beta),
            Err(_) => {
                panic!("invalid preference_concentration {concentration}: use a positive number")
            }
        }
    }

    fn sample(&self, rng: &mut impl Rng) -> f32 {
        match self {
            Self::Uniform => rng.random::<f32>(),
            Self::Beta(beta) => beta.sample(rng),
        }
    }
}

fn sample_batch(
    environment: &ReplayEnvironment,
    size: usize,
    preferences: &PreferenceDistribution,
    rng: &mut impl Rng,
) -> Batch {
    let prompts: Vec<usize> = (0..size)
        .map(|_| rng.random_range(0..environment.num_prompts()))
        .collect();
    let embeddings = environment.contexts().select(Axis(0), &prompts);
    let w_quality = (0..size).map(|_| preferences.sample(rng)).collect();
    Batch {
        prompts,
        embeddings,
        w_quality,
    }
}

/// Draws an index with the given probabilities (they sum to 1 up to rounding).
pub fn sample_categorical(probabilities: &[f32], rng: &mut impl Rng) -> usize {
    let mut threshold = rng.random::<f32>();
    for (index, &p) in probabilities.iter().enumerate() {
        threshold -= p;
        if threshold < 0.0 {
            return index;
        }
    }
    probabilities.len() - 1
}

/// Batch statistics of one REINFORCE step.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub mean_reward: f32,
    /// Mean entropy of `π(· | x, w)` in nats.
    pub mean_entropy: f32,
    /// Value of the loss `L(θ)` of the module documentation.
    pub loss: f32,
}

/// Options of [`reinforce_gradients_with`] beyond the batch itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReinforceOptions {
    /// Entropy bonus β.
    pub beta: f32,
    /// Rescales the batch's advantages to zero mean and unit standard deviation.
    pub normalize_advantages: bool,
}

/// Gradients of the REINFORCE loss for one batch with fixed actions and rewards.
///
/// With `p = softmax(z)` and `H = −Σₖ pₖ log pₖ`:
/// `∂(−A log p_a)/∂zₖ = −A · (1[k = a] − pₖ)` and `∂(−β H)/∂zₖ = β · pₖ · (log pₖ + H)`.
pub fn reinforce_gradients(
    network: &PolicyNetwork,
    pass: &ForwardPass,
    actions: &[usize],
    rewards: &[f32],
    beta: f32,
) -> (Gradients, StepStats) {
    let options = ReinforceOptions {
        beta,
        ..ReinforceOptions::default()
    };
    reinforce_gradients_with(network, pass, actions, rewards, &options)
}

/// [`reinforce_gradients`] with optionally normalised advantages.
pub fn reinforce_gradients_with(
    network: &PolicyNetwork,
    pass: &ForwardPass,
    actions: &[usize],
    rewards: &[f32],
    options: &ReinforceOptions,
) -> (Gradients, StepStats) {
    let batch = actions.len();
    let scale = 1.0 / batch as f32;
    let beta = options.beta;
    let mut advantages: Vec<f32> = (0..batch).map(|i| rewards[i] - pass.values[i]).collect();
    if options.normalize_advantages && batch > 1 {
        let mean = advantages.iter().sum::<f32>() * scale;
        let variance = advantages.iter().map(|a| (a - mean).powi(2)).sum::<f32>() * scale;
        let std = variance.sqrt() + 1e-6;
        advantages.iter_mut().for_each(|a| *a = (*a - mean) / std);
    }
    let mut d_logits = Array2::<f32>::zeros(pass.logits.raw_dim());
    let mut d_values = Array1::<f32>::zeros(batch);
    let (mut reward_sum, mut entropy_sum, mut loss) = (0.0f32, 0.0f32, 0.0f32);

    for i in 0..batch {
        let probabilities = pass.probabilities.row(i);
        let advantage = advantages[i];
        let entropy: f32 = -probabilities
            .iter()
            .map(|&p| if p > 0.0 { p * p.ln() } else { 0.0 })
            .sum::<f32>();

        for (k, &p) in probabilities.iter().enumerate() {
            let indicator = if k == actions[i] { 1.0 } else { 0.0 };
            let log_p = p.max(f32::MIN_POSITIVE).ln();
            d_logits[[i, k]] =
                scale * (-advantage * (indicator - p) + beta * p * (log_p + entropy));
        }
        d_values[i] = scale * (pass.values[i] - rewards[i]);

        let log_p_action = probabilities[actions[i]].max(f32::MIN_POSITIVE).ln();
        loss += scale * (-advantage * log_p_action - beta * entropy);
        loss += scale * 0.5 * (pass.values[i] - rewards[i]).powi(2);
        reward_sum += rewards[i];
        entropy_sum += entropy;
    }

    let gradients = network.backward(pass, &d_logits, &d_values);
    let stats = StepStats {
        mean_reward: reward_sum * scale,
        mean_entropy: entropy_sum * scale,
        loss,
    };
    (gradients, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::adam::{gradient_slices, parameter_slices};
    use crate::policy::network::PREFERENCE_INPUTS;
    use ndarray::Array2;

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

    /// Policy term and value term of the loss, with the advantages held fixed.
    fn split_loss(
        network: &PolicyNetwork,
        embeddings: &Array2<f32>,
        w_quality: &[f32],
        actions: &[usize],
        rewards: &[f32],
        advantages: &[f32],
        beta: f32,
    ) -> (f64, f64) {
        let pass = network.forward(embeddings.view(), w_quality);
        let batch = actions.len() as f64;
        let (mut policy_loss, mut value_loss) = (0.0f64, 0.0f64);
        for i in 0..actions.len() {
            let p = pass.probabilities.row(i);
            let entropy: f64 = -p.iter().map(|&v| (v as f64) * (v as f64).ln()).sum::<f64>();
            policy_loss += (-(advantages[i] as f64) * (p[actions[i]] as f64).ln()
                - beta as f64 * entropy)
                / batch;
            value_loss += 0.5 * ((pass.values[i] - rewards[i]) as f64).powi(2) / batch;
        }
        (policy_loss, value_loss)
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let network = small_network(&mut rng);
        let embeddings = Array2::from_shape_fn((4, 5), |_| rng.random_range(-1.0..1.0));
        let w_quality = vec![0.0, 0.3, 0.8, 1.0];
        let actions = vec![0, 2, 1, 2];
        let rewards = vec![0.4, -0.2, 0.9, 0.1];
        let beta = 0.05;

        let pass = network.forward(embeddings.view(), &w_quality);
        let advantages: Vec<f32> = (0..4).map(|i| rewards[i] - pass.values[i]).collect();
        let (mut analytic, _) = reinforce_gradients(&network, &pass, &actions, &rewards, beta);
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
                        &actions,
                        &rewards,
                        &advantages,
                        beta,
                    );
                    // The value head is trained by the value loss only, the policy by its own term only.
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

    /// Logit-bias gradients of the policy term alone (β = 0), the value head excluded.
    fn logit_bias_gradient(
        network: &PolicyNetwork,
        pass: &ForwardPass,
        rewards: &[f32],
        options: &ReinforceOptions,
    ) -> Vec<f32> {
        let actions = [0, 2, 1, 2];
        let (gradients, _) = reinforce_gradients_with(network, pass, &actions, rewards, options);
        gradients.logit_bias.to_vec()
    }

    #[test]
    fn normalized_advantages_ignore_reward_shift() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let network = small_network(&mut rng);
        let embeddings = Array2::from_shape_fn((4, 5), |_| rng.random_range(-1.0..1.0));
        let pass = network.forward(embeddings.view(), &[0.0, 0.3, 0.8, 1.0]);
        let rewards = [0.4, -0.2, 0.9, 0.1];
        let shifted: Vec<f32> = rewards.iter().map(|r| r + 0.7).collect();
        let options = ReinforceOptions {
            normalize_advantages: true,
            ..Default::default()
        };
        let base = logit_bias_gradient(&network, &pass, &rewards, &options);
        let moved = logit_bias_gradient(&network, &pass, &shifted, &options);
        for (k, (&a, &b)) in base.iter().zip(&moved).enumerate() {
            assert!((a - b).abs() < 1e-5, "logit {k}: {a} vs {b}");
        }
    }

    #[test]
    fn cosine_learning_rate_endpoints() {
        let config = TrainConfig {
            steps: 101,
            learning_rate: 1e-3,
            learning_rate_end: Some(1e-4),
            ..TrainConfig::default()
        };
        assert!((config.learning_rate_at(0) - 1e-3).abs() < 1e-9);
        assert!((config.learning_rate_at(50) - 5.5e-4).abs() < 1e-8);
        assert!((config.learning_rate_at(100) - 1e-4).abs() < 1e-9);
        let constant = TrainConfig {
            learning_rate_end: None,
            ..TrainConfig::default()
        };
        assert_eq!(constant.learning_rate_at(5_000), constant.learning_rate);
    }

    #[test]
    fn normalized_cosine_training_learns() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (embeddings, quality, cost) = synthetic_problem(&mut rng);
        let mut environment =
            ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
        let config = TrainConfig {
            steps: 1500,
            batch_size: 32,
            hidden_dim: 32,
            learning_rate_end: Some(1e-4),
            normalize_advantages: true,
            ..TrainConfig::default()
        };
        let (network, summary) = train(
            &mut environment,
            Reward::new(0.01),
            &config,
            None,
            &ProgressBar::hidden(),
        );

        assert_eq!(summary.interactions, config.interactions() as u64);
        let probabilities =
            network.probabilities(embeddings.slice(ndarray::s![0..2, ..]), &[1.0, 0.0]);
        assert_eq!(
            crate::policy::argmax(probabilities.row(1).as_slice().unwrap()),
            2,
            "cluster B at w=0"
        );
    }

    #[test]
    fn policy_shares_sum_to_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let network = small_network(&mut rng);
        let embeddings = Array2::from_shape_fn((7, 5), |_| rng.random_range(-1.0..1.0));
        let probabilities =
            network.probabilities(embeddings.view(), &[0.0, 0.1, 0.2, 0.5, 0.7, 0.9, 1.0]);
        for row in probabilities.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-5, "row sums to {}", row.sum());
        }
    }

    /// Two prompt clusters and three models: model 0 is cheap and good on cluster A only, model 1
    /// is expensive and good everywhere, model 2 is cheap and bad. At w_quality = 1 the best
    /// choice is model 0 on A (ties with 1) and model 1 on B; at w_quality = 0 it is the
    /// cheapest model.
    fn synthetic_problem(rng: &mut ChaCha8Rng) -> (Array2<f32>, Array2<f32>, Array2<f32>) {
        let n = 200;
        let mut embeddings = Array2::zeros((n, 8));
        let mut quality = Array2::zeros((n, 3));
        let mut cost = Array2::zeros((n, 3));
        for i in 0..n {
            let cluster_a = i % 2 == 0;
            embeddings[[i, if cluster_a { 0 } else { 1 }]] = 1.0;
            for j in 2..8 {
                embeddings[[i, j]] = rng.random_range(-0.1..0.1);
            }
            quality[[i, 0]] = if cluster_a { 0.95 } else { 0.1 };
            quality[[i, 1]] = 0.9;
            quality[[i, 2]] = 0.2;
            cost[[i, 0]] = 0.004;
            cost[[i, 1]] = 0.01;
            cost[[i, 2]] = 0.0005;
        }
        (embeddings, quality, cost)
    }

    #[test]
    fn training_learns_preference_dependent_routing() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (embeddings, quality, cost) = synthetic_problem(&mut rng);
        let mut environment =
            ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
        let config = TrainConfig {
            steps: 1500,
            batch_size: 32,
            hidden_dim: 32,
            ..TrainConfig::default()
        };
        let reward = Reward::new(0.01);
        let (network, summary) = train(
            &mut environment,
            reward,
            &config,
            None,
            &ProgressBar::hidden(),
        );

        assert_eq!(summary.interactions, config.interactions() as u64);
        let quality_first =
            network.probabilities(embeddings.slice(ndarray::s![0..2, ..]), &[1.0, 1.0]);
        assert_eq!(
            crate::policy::argmax(quality_first.row(0).as_slice().unwrap()),
            0,
            "cluster A at w=1"
        );
        assert_eq!(
            crate::policy::argmax(quality_first.row(1).as_slice().unwrap()),
            1,
            "cluster B at w=1"
        );
        let cost_first =
            network.probabilities(embeddings.slice(ndarray::s![0..2, ..]), &[0.0, 0.0]);
        assert_eq!(
            crate::policy::argmax(cost_first.row(0).as_slice().unwrap()),
            2,
            "cluster A at w=0"
        );
        assert_eq!(
            crate::policy::argmax(cost_first.row(1).as_slice().unwrap()),
            2,
            "cluster B at w=0"
        );
    }

    /// Trains on a bandit whose best model changes next to "quality only", as on paretobandit,
    /// and returns the expensive model's share of 20 prompts at `w = 1` and at `w = 0.95`. The
    /// expensive model is better by 0.01 but costs 0.0145 USD more, so with τ = 0.022 USD it
    /// is worth its price only for `w_quality > 0.659 / 0.669 ≈ 0.985`.
    fn switch_near_quality_only() -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 200;
        let embeddings = Array2::from_shape_fn((n, 8), |_| rng.random_range(-1.0..1.0));
        let quality = Array2::from_shape_fn((n, 2), |(_, k)| [0.92, 0.93][k]);
        let cost = Array2::from_shape_fn((n, 2), |(_, k)| [0.0005, 0.015][k]);

        let mut environment =
            ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
        let config = TrainConfig {
            steps: 3000,
            batch_size: 32,
            hidden_dim: 32,
            ..TrainConfig::default()
        };
        let (network, _) = train(
            &mut environment,
            Reward::new(0.022),
            &config,
            None,
            &ProgressBar::hidden(),
        );

        let rows = embeddings.slice(ndarray::s![0..20, ..]);
        let expensive_share = |w_quality: f32| {
            let probabilities = network.probabilities(rows, &[w_quality; 20]);
            let expensive = probabilities
                .rows()
                .into_iter()
                .filter(|row| crate::policy::argmax(row.as_slice().unwrap()) == 1)
                .count();
            expensive as f32 / 20.0
        };
        vec![expensive_share(1.0), expensive_share(0.95)]
    }

    /// Needs the log-odds input `ℓ(w)`: the same training from a network without it (2
    /// preference inputs) chose the cheap model at `w = 1` for all 20 prompts.
    #[test]
    fn training_learns_switch_near_quality_only() {
        let shares = switch_near_quality_only();
        assert_eq!(
            shares,
            vec![1.0, 0.0],
            "expensive model's share at w = 1 and 0.95"
        );
    }

    #[test]
    fn steps_follow_the_number_of_training_prompts() {
        let config = TrainConfig {
            steps: 7,
            batch_size: 64,
            interactions_per_prompt: Some(120),
            ..TrainConfig::default()
        };
        // ⌈1785 · 120 / 64⌉ = ⌈3346.875⌉
        assert_eq!(config.for_prompts(1785).steps, 3347);
        assert_eq!(config.for_prompts(0).steps, 1);
        let fixed = TrainConfig {
            interactions_per_prompt: None,
            ..config
        };
        assert_eq!(fixed.for_prompts(1785).steps, 7);
    }

    #[test]
    fn arcsine_preferences_favour_both_ends() {
        let embeddings = Array2::<f32>::zeros((4, 3));
        let quality = Array2::<f32>::zeros((4, 2));
        let cost = Array2::<f32>::zeros((4, 2));
        let environment = ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let share_at_ends = |concentration: f32, rng: &mut ChaCha8Rng| {
            let preferences = PreferenceDistribution::new(concentration);
            let batch = sample_batch(&environment, 20_000, &preferences, rng);
            assert!(batch.w_quality.iter().all(|w| (0.0..=1.0).contains(w)));
            let ends = batch
                .w_quality
                .iter()
                .filter(|&&w| !(0.1..=0.9).contains(&w))
                .count();
            ends as f64 / batch.w_quality.len() as f64
        };
        // P(w < 0.1 or w > 0.9) is 0.2 under U[0, 1] and (4/π)·asin(√0.1) ≈ 0.41 under
        // Beta(½, ½).
        let uniform = share_at_ends(1.0, &mut rng);
        let arcsine = share_at_ends(0.5, &mut rng);
        assert!((uniform - 0.2).abs() < 0.02, "uniform share {uniform}");
        assert!((arcsine - 0.41).abs() < 0.02, "arcsine share {arcsine}");
    }

    #[test]
    fn training_is_deterministic_for_a_seed() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (embeddings, quality, cost) = synthetic_problem(&mut rng);
        let config = TrainConfig {
            steps: 50,
            batch_size: 16,
            hidden_dim: 16,
            ..TrainConfig::default()
        };
        let run = || {
            let mut environment =
                ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
            train(
                &mut environment,
                Reward::new(0.01),
                &config,
                None,
                &ProgressBar::hidden(),
            )
            .0
        };
        assert_eq!(run(), run());
    }
}
