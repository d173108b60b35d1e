//! Linear contextual bandits under bandit feedback: LinUCB, Thompson sampling and ε-greedy.
//!
//! Each arm `a` keeps two disjoint ridge regressions on the context `x = [embedding; 1]` that
//! share one design matrix `A_a = λI + Σ x xᵀ` (sum over the interactions that pulled `a`):
//! one predicts quality `q`, one the normalised cost `ĉ = min(c / τ, 1)`, with
//! `θ = A_a⁻¹ b_a` and `b_a = Σ y x`. The preference-weighted score of arm `a` is
//!
//! `s_a = w_q · θ_q,aᵀx − w_c · θ_c,aᵀx`
//!
//! and exploration differs per learner:
//! - LinUCB: `s_a + α · sqrt(xᵀ A_a⁻¹ x)`;
//! - Thompson: a draw from `N(s_a, (w_q² + w_c²) · v² · xᵀ A_a⁻¹ x)`, the exact marginal of the
//!   score under independent Gaussian posteriors `θ ~ N(θ̂, v² A_a⁻¹)` of the two regressions;
//! - ε-greedy: a uniform arm with probability ε, else `argmax s_a`.
//!
//! Every interaction samples a prompt uniformly and `w_q ~ U[0, 1]` (Dirichlet(1, 1) on the
//! 1-simplex), picks an arm, pulls it through [`ReplayEnvironment::pull`] and learns from that
//! one outcome. Interactions run in batches of `batch_size` that share one posterior, then
//! `A_a⁻¹` is updated for the batch by the Woodbury identity (Sherman–Morrison for a rank-m
//! update): `A⁻¹ ← A⁻¹ − U (I + X U)⁻¹ Uᵀ` with `U = A⁻¹ Xᵀ`, in f64. With `batch_size = 1`
//! this is the textbook sequential algorithm. At evaluation every learner acts greedily on the
//! posterior mean, `argmax s_a`.

use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::{BaselineError, Router, route_by_predictions};
use crate::bandit::ReplayEnvironment;
use crate::reward::Reward;

/// Exploration strategy of a learner during training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Exploration {
    /// LinUCB: optimism bonus `alpha · sqrt(xᵀ A⁻¹ x)`.
    Ucb { alpha: f64 },
    /// Thompson sampling with posterior scale `v` (the assumed noise standard deviation).
    Thompson { scale: f64 },
    /// ε-greedy: a uniform arm with probability `epsilon`.
    EpsilonGreedy { epsilon: f64 },
}

impl Exploration {
    /// Router id of the learner: `linucb`, `thompson` or `epsilon-greedy`.
    pub fn router_id(&self) -> &'static str {
        match self {
            Exploration::Ucb { .. } => "linucb",
            Exploration::Thompson { .. } => "thompson",
            Exploration::EpsilonGreedy { .. } => "epsilon-greedy",
        }
    }
}

/// Training budget and regularisation shared by the linear bandit learners.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearBanditConfig {
    /// Bandit interactions, exactly one pulled outcome each.
    pub interactions: usize,
    /// Interactions that share one posterior before it is updated.
    pub batch_size: usize,
    /// Ridge penalty λ: `A = λI` before any data.
    pub ridge_lambda: f64,
    pub seed: u64,
}

impl Default for LinearBanditConfig {
    fn default() -> Self {
        Self {
            interactions: 20_000,
            batch_size: 32,
            ridge_lambda: 1.0,
            seed: 0,
        }
    }
}

/// A trained linear bandit, routing greedily on its posterior means.
#[derive(Debug, Clone)]
pub struct LinearBanditRouter {
    id: String,
    /// Quality weights, `[context dim + 1 × arms]` (last row: intercept).
    theta_quality: Array2<f64>,
    /// Normalised-cost weights, same shape.
    theta_cost: Array2<f64>,
}

impl Router for LinearBanditRouter {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize> {
        let contexts = with_intercept(embeddings);
        let quality = contexts.dot(&self.theta_quality);
        let cost = contexts.dot(&self.theta_cost);
        route_by_predictions(quality.view(), cost.view(), w_quality)
    }
}

/// Appends the constant 1 to every embedding: `[n × dim] → [n × (dim + 1)]`, in f64.
fn with_intercept(embeddings: ArrayView2<f32>) -> Array2<f64> {
    let (rows, dim) = embeddings.dim();
    let mut contexts = Array2::<f64>::ones((rows, dim + 1));
    contexts
        .slice_mut(s![.., ..dim])
        .assign(&embeddings.mapv(f64::from));
    contexts
}

/// Per-arm ridge state: `A⁻¹` and the two response vectors `b`.
struct ArmState {
    a_inverse: Array2<f64>,
    b_quality: Array1<f64>,
    b_cost: Array1<f64>,
}

/// Trains one linear bandit learner on `environment`, pulling exactly
/// `config.interactions` outcomes.
pub fn train_linear_bandit(
    environment: &mut ReplayEnvironment,
    reward: Reward,
    exploration: Exploration,
    config: &LinearBanditConfig,
) -> Result<LinearBanditRouter, BaselineError> {
    let router = exploration.router_id();
    validate(environment, exploration, config)?;

    let dim = environment.context_dim() + 1;
    let arms = environment.num_arms();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut states: Vec<ArmState> = (0..arms)
        .map(|_| ArmState {
            a_inverse: Array2::eye(dim) / config.ridge_lambda,
            b_quality: Array1::zeros(dim),
            b_cost: Array1::zeros(dim),
        })
        .collect();
    let mut theta_quality = Array2::<f64>::zeros((dim, arms));
    let mut theta_cost = Array2::<f64>::zeros((dim, arms));

    let mut remaining = config.interactions;
    while remaining > 0 {
        let batch = remaining.min(config.batch_size);
        remaining -= batch;
        let prompts: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..environment.num_prompts()))
            .collect();
        let weights: Vec<f64> = (0..batch).map(|_| rng.random::<f64>()).collect();
        let contexts = with_intercept(environment.contexts().select(Axis(0), &prompts).view());

        let mean_quality = contexts.dot(&theta_quality);
        let mean_cost = contexts.dot(&theta_cost);
        // xᵀ A_a⁻¹ x per (row, arm); only the exploring learners need it.
        let variance = match exploration {
            Exploration::EpsilonGreedy { .. } => None,
            _ => Some(quadratic_forms(&contexts, &states)),
        };

        let mut chosen = Vec::with_capacity(batch);
        for row in 0..batch {
            let w = weights[row];
            let mean =
                |arm: usize| w * mean_quality[[row, arm]] - (1.0 - w) * mean_cost[[row, arm]];
            let arm = match exploration {
                Exploration::Ucb { alpha } => {
                    let variance = variance.as_ref().expect("computed for UCB");
                    super::argmax(
                        (0..arms).map(|a| mean(a) + alpha * variance[[row, a]].max(0.0).sqrt()),
                    )
                }
                Exploration::Thompson { scale } => {
                    let variance = variance.as_ref().expect("computed for Thompson");
                    let spread = (w * w + (1.0 - w) * (1.0 - w)) * scale * scale;
                    super::argmax((0..arms).map(|a| {
                        let noise: f64 = StandardNormal.sample(&mut rng);
                        mean(a) + noise * (spread * variance[[row, a]].max(0.0)).sqrt()
                    }))
                }
                Exploration::EpsilonGreedy { epsilon } => {
                    if rng.random::<f64>() < epsilon {
                        rng.random_range(0..arms)
                    } else {
                        super::argmax((0..arms).map(mean))
                    }
                }
            };
            chosen.push(arm);
        }

        // Reveal one outcome per interaction, then update each pulled arm with its rows.
        let outcomes: Vec<(f64, f64)> = prompts
            .iter()
            .zip(&chosen)
            .map(|(&prompt, &arm)| {
                let outcome = environment.pull(prompt, arm);
                (
                    f64::from(outcome.quality),
                    f64::from(reward.normalised_cost(outcome.cost)),
                )
            })
            .collect();
        for (arm, state) in states.iter_mut().enumerate() {
            let rows: Vec<usize> = (0..batch).filter(|&r| chosen[r] == arm).collect();
            if rows.is_empty() {
                continue;
            }
            let x = contexts.select(Axis(0), &rows);
            let y_quality = Array1::from_iter(rows.iter().map(|&r| outcomes[r].0));
            let y_cost = Array1::from_iter(rows.iter().map(|&r| outcomes[r].1));
            woodbury_update(&mut state.a_inverse, &x);
            state.b_quality += &x.t().dot(&y_quality);
            state.b_cost += &x.t().dot(&y_cost);
            theta_quality
                .column_mut(arm)
                .assign(&state.a_inverse.dot(&state.b_quality));
            theta_cost
                .column_mut(arm)
                .assign(&state.a_inverse.dot(&state.b_cost));
        }
    }
    tracing::debug!(router, pulls = environment.pulls(), "trained linear bandit");
    Ok(LinearBanditRouter {
        id: router.to_string(),
        theta_quality,
        theta_cost,
    })
}

fn validate(
    environment: &ReplayEnvironment,
    exploration: Exploration,
    config: &LinearBanditConfig,
) -> Result<(), BaselineError> {
    let router = exploration.router_id().to_string();
    let invalid = |message: String| BaselineError::InvalidConfig {
        router: router.clone(),
        message,
    };
    if environment.num_prompts() == 0 || environment.num_arms() == 0 {
        return Err(BaselineError::EmptyTraining { router });
    }
    if config.batch_size == 0 {
        return Err(invalid("batch_size is 0; use at least 1".to_string()));
    }
    if !(config.ridge_lambda.is_finite() && config.ridge_lambda > 0.0) {
        return Err(invalid(format!(
            "ridge_lambda {} must be positive and finite",
            config.ridge_lambda
        )));
    }
    let parameter = match exploration {
        Exploration::Ucb { alpha } => alpha,
        Exploration::Thompson { scale } => scale,
        Exploration::EpsilonGreedy { epsilon } if epsilon > 1.0 => {
            return Err(invalid(format!("epsilon {epsilon} is above 1")));
        }
        Exploration::EpsilonGreedy { epsilon } => epsilon,
    };
    if !(parameter.is_finite() && parameter >= 0.0) {
        return Err(invalid(format!(
            "exploration parameter {parameter} must be finite and non-negative"
        )));
    }
    Ok(())
}

/// `xᵢᵀ A_a⁻¹ xᵢ` for every row `i` of `contexts` and every arm `a`: `[rows × arms]`.
fn quadratic_forms(contexts: &Array2<f64>, states: &[ArmState]) -> Array2<f64> {
    let mut forms = Array2::zeros((contexts.nrows(), states.len()));
    for (arm, state) in states.iter().enumerate() {
        let projected = contexts.dot(&state.a_inverse);
        let column = (&projected * contexts).sum_axis(Axis(1));
        forms.column_mut(arm).assign(&column);
    }
    forms
}

/// Updates `A⁻¹` to `(A + Xᵀ X)⁻¹` by the Woodbury identity
/// `A⁻¹ − U (I + X U)⁻¹ Uᵀ`, `U = A⁻¹ Xᵀ`, for the rows `X` (`[m × d]`).
fn woodbury_update(a_inverse: &mut Array2<f64>, x: &Array2<f64>) {
    let u = a_inverse.dot(&x.t()); // [d × m]
    let mut inner = x.dot(&u); // [m × m], symmetric positive definite after adding I
    for i in 0..inner.nrows() {
        inner[[i, i]] += 1.0;
    }
    let solved = cholesky_solve(&inner, &u.t()); // (I + XU)⁻¹ Uᵀ, [m × d]
    *a_inverse -= &u.dot(&solved);
}

/// Solves `S Z = B` for symmetric positive definite `S` (`[m × m]`) by Cholesky, `B` `[m × n]`.
/// `I + X A⁻¹ Xᵀ` has every eigenvalue ≥ 1, so the factorisation cannot break down.
fn cholesky_solve(matrix: &Array2<f64>, rhs: &ArrayView2<f64>) -> Array2<f64> {
    let m = matrix.nrows();
    let mut lower = Array2::<f64>::zeros((m, m));
    for i in 0..m {
        for j in 0..=i {
            let mut sum = matrix[[i, j]];
            for k in 0..j {
                sum -= lower[[i, k]] * lower[[j, k]];
            }
            if i == j {
                lower[[i, i]] = sum.max(f64::MIN_POSITIVE).sqrt();
            } else {
                lower[[i, j]] = sum / lower[[j, j]];
            }
        }
    }
    // Forward substitution L Y = B, then back substitution Lᵀ Z = Y, on whole rows of B.
    let columns = rhs.ncols();
    let mut solution = rhs.as_standard_layout().into_owned();
    let data = solution
        .as_slice_mut()
        .expect("standard layout is contiguous");
    for i in 0..m {
        for k in 0..i {
            let factor = lower[[i, k]];
            for c in 0..columns {
                data[i * columns + c] -= factor * data[k * columns + c];
            }
        }
        let diagonal = lower[[i, i]];
        data[i * columns..(i + 1) * columns]
            .iter_mut()
            .for_each(|v| *v /= diagonal);
    }
    for i in (0..m).rev() {
        for k in (i + 1)..m {
            let factor = lower[[k, i]];
            for c in 0..columns {
                data[i * columns + c] -= factor * data[k * columns + c];
            }
        }
        let diagonal = lower[[i, i]];
        data[i * columns..(i + 1) * columns]
            .iter_mut()
            .for_each(|v| *v /= diagonal);
    }
    solution
}

#[cfg(test)]
mod tests {
    use super::super::tests::task_embeddings;
    use super::*;
    use ndarray::array;

    #[test]
    fn woodbury_matches_direct_inverse() {
        let x = array![[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]];
        let mut a_inverse = Array2::<f64>::eye(3);
        woodbury_update(&mut a_inverse, &x);
        let a = Array2::<f64>::eye(3) + x.t().dot(&x);
        let product = a.dot(&a_inverse);
        for ((i, j), value) in product.indexed_iter() {
            let expected = if i == j { 1.0 } else { 0.0 };
            assert!((value - expected).abs() < 1e-12, "A·A⁻¹[{i},{j}] = {value}");
        }
    }

    /// Per-task linear outcomes: arm 0 cheap and good on task 0 only, arm 1 mid, arm 2
    /// expensive and always good. The per-arm linear model is exact on the task one-hot.
    fn synthetic_problem(n: usize) -> (Array2<f32>, Array2<f32>, Array2<f32>) {
        let (embeddings, tasks) = task_embeddings(n, 4, 16, 7);
        let quality = Array2::from_shape_fn((n, 3), |(i, a)| match (a, tasks[i]) {
            (0, 0) => 0.9,
            (0, _) => 0.1,
            (1, t) => 0.3 + 0.15 * t as f32,
            _ => 0.95,
        });
        let cost = Array2::from_shape_fn((n, 3), |(_, a)| [0.0001f32, 0.001, 0.01][a]);
        (embeddings, quality, cost)
    }

    fn mean_reward(
        choices: &[usize],
        quality: &Array2<f32>,
        cost: &Array2<f32>,
        reward: Reward,
        w: f32,
    ) -> f64 {
        choices
            .iter()
            .enumerate()
            .map(|(i, &a)| f64::from(reward.reward(w, quality[[i, a]], cost[[i, a]])))
            .sum::<f64>()
            / choices.len() as f64
    }

    #[test]
    fn learners_reach_near_oracle_reward() {
        let (embeddings, quality, cost) = synthetic_problem(400);
        let reward = Reward::new(0.01);
        let config = LinearBanditConfig {
            interactions: 3000,
            batch_size: 8,
            ridge_lambda: 1.0,
            seed: 5,
        };
        let oracle = super::super::OracleRouter::new(quality.clone(), cost.clone(), reward);
        for exploration in [
            Exploration::Ucb { alpha: 0.5 },
            Exploration::Thompson { scale: 0.5 },
            Exploration::EpsilonGreedy { epsilon: 0.1 },
        ] {
            let mut environment =
                ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
            let router =
                train_linear_bandit(&mut environment, reward, exploration, &config).unwrap();
            assert_eq!(environment.pulls(), 3000, "{}", router.id());
            for w in [0.0f32, 0.3, 0.6, 1.0] {
                let best = mean_reward(
                    &oracle.route(embeddings.view(), w),
                    &quality,
                    &cost,
                    reward,
                    w,
                );
                let got = mean_reward(
                    &router.route(embeddings.view(), w),
                    &quality,
                    &cost,
                    reward,
                    w,
                );
                assert!(
                    best - got < 0.02,
                    "{} at w={w}: reward {got:.4}, oracle {best:.4}",
                    router.id()
                );
            }
        }
    }

    #[test]
    fn training_is_deterministic() {
        let (embeddings, quality, cost) = synthetic_problem(100);
        let reward = Reward::new(0.01);
        let config = LinearBanditConfig {
            interactions: 500,
            batch_size: 4,
            ridge_lambda: 1.0,
            seed: 9,
        };
        let train = || {
            let mut environment =
                ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
            train_linear_bandit(
                &mut environment,
                reward,
                Exploration::Thompson { scale: 0.5 },
                &config,
            )
            .unwrap()
        };
        assert_eq!(train().theta_quality, train().theta_quality);
    }

    #[test]
    fn invalid_config_is_rejected() {
        let (embeddings, quality, cost) = synthetic_problem(10);
        let mut environment =
            ReplayEnvironment::new(embeddings.view(), quality.view(), cost.view());
        let config = LinearBanditConfig {
            batch_size: 0,
            ..LinearBanditConfig::default()
        };
        let error = train_linear_bandit(
            &mut environment,
            Reward::new(0.01),
            Exploration::Ucb { alpha: 1.0 },
            &config,
        )
        .unwrap_err();
        assert!(error.to_string().contains("batch_size"), "{error}");
        assert_eq!(environment.pulls(), 0);
    }

    #[test]
    fn empty_environment_is_rejected() {
        let embeddings = Array2::<f32>::zeros((0, 4));
        let outcomes = Array2::<f32>::zeros((0, 2));
        let mut environment =
            ReplayEnvironment::new(embeddings.view(), outcomes.view(), outcomes.view());
        let error = train_linear_bandit(
            &mut environment,
            Reward::new(0.01),
            Exploration::EpsilonGreedy { epsilon: 0.1 },
            &LinearBanditConfig::default(),
        )
        .unwrap_err();
        assert!(
            matches!(error, BaselineError::EmptyTraining { .. }),
            "{error}"
        );
    }
}
