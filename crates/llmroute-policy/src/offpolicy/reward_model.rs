//! The direct reward model of the doubly robust estimator.
//!
//! For each model `k`, two ridge regressions on the embedding plus an intercept predict the
//! quality `q̂_k(x)` and the normalised cost `ĉ_k(x) ≈ min(c / τ, 1)` of calling `k` on `x`, from
//! the logged events that called `k`:
//!
//! `β = (XᵀX + λ·I')⁻¹ Xᵀy`, with `X = [embeddings, 1]` and `I'` the identity without the
//! intercept's entry (the intercept is not shrunk).
//!
//! Predictions are cross-fitted: the events are split into two folds by the seed, and each
//! event's predictions come from the regressions fitted on the other fold, so an event's own
//! outcome never enters its prediction. A model with fewer than [`MIN_EVENTS_PER_FIT`] events
//! in the fitting fold is predicted by the mean of its events there, and a model with none by
//! the mean of all events of that fold. Predictions are clipped to `[0, 1]`, the range of both
//! targets. The reward estimate at a preference is `r̂_k(x, w) = w · q̂_k(x) − (1 − w) · ĉ_k(x)`.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::LoggedEvent;
use crate::reward::Reward;

/// Events of one model in a fold below which its regression falls back to the mean.
pub(crate) const MIN_EVENTS_PER_FIT: usize = 10;
/// Rows gathered before one `XᵀX` update, which bounds the buffer to `K · 256 · (d + 1)` floats.
const CHUNK_ROWS: usize = 256;

/// Cross-fitted predictions `q̂_k(xᵢ)` and `ĉ_k(xᵢ)` for every event `i` and model `k`.
pub(crate) struct RewardModel {
    /// `[n × K]` predicted quality, in `[0, 1]`.
    quality: Array2<f32>,
    /// `[n × K]` predicted normalised cost `min(c / τ, 1)`, in `[0, 1]`.
    cost: Array2<f32>,
}

impl RewardModel {
    /// Fits the regressions on each fold and predicts the other fold. `events` must be
    /// validated, with every action below `num_models`. Memory: one `(d + 1)²` Gram matrix per
    /// model at a time, plus the `[n × K]` predictions.
    pub(crate) fn cross_fit(
        events: &[LoggedEvent],
        num_models: usize,
        reward: Reward,
        ridge: f64,
        seed: u64,
    ) -> Self {
        let n = events.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut fold = vec![0u8; n];
        for &index in &order[n / 2..] {
            fold[index] = 1;
        }

        let dim = events.first().map_or(0, |event| event.embedding.len()) + 1;
        let overall = Means::of(events.iter(), reward);
        let mut model = Self {
            quality: Array2::zeros((n, num_models)),
            cost: Array2::zeros((n, num_models)),
        };
        for fitting_fold in 0..2u8 {
            let fitting = || {
                events
                    .iter()
                    .zip(&fold)
                    .filter(move |&(_, &f)| f == fitting_fold)
                    .map(|(event, _)| event)
            };
            let coefficients = fit_fold(fitting(), dim, num_models, reward, ridge, overall);
            let predicted: Vec<usize> = (0..n).filter(|&i| fold[i] != fitting_fold).collect();
            model.predict(events, &predicted, &coefficients);
        }
        model
    }

    /// `r̂_k(xᵢ, w) = w · q̂_k(xᵢ) − (1 − w) · ĉ_k(xᵢ)`.
    pub(crate) fn reward(&self, event: usize, model: usize, w_quality: f32) -> f64 {
        let w = w_quality as f64;
        w * self.quality[[event, model]] as f64 - (1.0 - w) * self.cost[[event, model]] as f64
    }

    /// Fills the rows `indices` with `[x, 1] · β`, clipped to `[0, 1]`.
    fn predict(&mut self, events: &[LoggedEvent], indices: &[usize], coefficients: &Coefficients) {
        let dim = coefficients.quality.nrows();
        let mut features = Array2::<f32>::zeros((CHUNK_ROWS, dim));
        for chunk in indices.chunks(CHUNK_ROWS) {
            for (row, &index) in chunk.iter().enumerate() {
                fill_features(
                    features.row_mut(row).as_slice_mut().unwrap(),
                    &events[index],
                );
            }
            let x = features.slice(s![..chunk.len(), ..]);
            let quality = x.dot(&coefficients.quality);
            let cost = x.dot(&coefficients.cost);
            for (row, &index) in chunk.iter().enumerate() {
                for k in 0..quality.ncols() {
                    self.quality[[index, k]] = quality[[row, k]].clamp(0.0, 1.0);
                    self.cost[[index, k]] = cost[[row, k]].clamp(0.0, 1.0);
                }
            }
        }
    }
}

/// Regression coefficients of one fold, `[(d + 1) × K]`, the intercept in the last row.
struct Coefficients {
    quality: Array2<f32>,
    cost: Array2<f32>,
}

/// Mean quality and mean normalised cost of a set of events.
#[derive(Debug, Clone, Copy)]
struct Means {
    quality: f64,
    cost: f64,
}

impl Means {
    fn of<'a>(events: impl Iterator<Item = &'a LoggedEvent>, reward: Reward) -> Self {
        let (mut quality, mut cost, mut count) = (0.0f64, 0.0f64, 0usize);
        for event in events {
            quality += event.quality as f64;
            cost += reward.normalised_cost(event.cost_usd) as f64;
            count += 1;
        }
        let count = count.max(1) as f64;
        Self {
            quality: quality / count,
            cost: cost / count,
        }
    }
}

/// Writes `[x, 1]` into `row`.
fn fill_features(row: &mut [f32], event: &LoggedEvent) {
    let dim = event.embedding.len();
    row[..dim].copy_from_slice(&event.embedding);
    row[dim] = 1.0;
}

/// Normal equations of one model's two regressions, accumulated chunk by chunk.
struct NormalEquations {
    /// `XᵀX`, `[(d + 1) × (d + 1)]`.
    gram: Array2<f64>,
    /// `Xᵀq` and `Xᵀĉ`.
    quality_moment: Array1<f64>,
    cost_moment: Array1<f64>,
    count: usize,
    quality_sum: f64,
    cost_sum: f64,
    /// Rows not yet added to `gram`, row-major `[rows × (d + 1)]`, with their targets.
    buffer: Vec<f32>,
    buffer_quality: Vec<f32>,
    buffer_cost: Vec<f32>,
}

impl NormalEquations {
    fn new(dim: usize) -> Self {
        Self {
            gram: Array2::zeros((dim, dim)),
            quality_moment: Array1::zeros(dim),
            cost_moment: Array1::zeros(dim),
            count: 0,
            quality_sum: 0.0,
            cost_sum: 0.0,
            buffer: Vec::with_capacity(CHUNK_ROWS * dim),
            buffer_quality: Vec::with_capacity(CHUNK_ROWS),
            buffer_cost: Vec::with_capacity(CHUNK_ROWS),
        }
    }

    fn add(&mut self, event: &LoggedEvent, normalised_cost: f32) {
        let dim = self.quality_moment.len();
        let start = self.buffer.len();
        self.buffer.resize(start + dim, 0.0);
        fill_features(&mut self.buffer[start..], event);
        self.buffer_quality.push(event.quality);
        self.buffer_cost.push(normalised_cost);
        self.count += 1;
        self.quality_sum += event.quality as f64;
        self.cost_sum += normalised_cost as f64;
        if self.buffer_quality.len() == CHUNK_ROWS {
            self.flush();
        }
    }

    /// Adds the buffered rows to the normal equations: a chunk's products in f32 (at most 256
    /// terms each), their sum over chunks in f64.
    fn flush(&mut self) {
        let rows = self.buffer_quality.len();
        if rows == 0 {
            return;
        }
        let dim = self.quality_moment.len();
        let x = ArrayView2::from_shape((rows, dim), &self.buffer).expect("rows × dim buffer");
        let gram = x.t().dot(&x);
        self.gram
            .zip_mut_with(&gram, |total, &v| *total += v as f64);
        let quality = x.t().dot(&ArrayView1::from(&self.buffer_quality));
        let cost = x.t().dot(&ArrayView1::from(&self.buffer_cost));
        self.quality_moment
            .zip_mut_with(&quality, |total, &v| *total += v as f64);
        self.cost_moment
            .zip_mut_with(&cost, |total, &v| *total += v as f64);
        self.buffer.clear();
        self.buffer_quality.clear();
        self.buffer_cost.clear();
    }
}

/// Fits every model's regressions on one fold's events, with `dim = d + 1` features. `fallback`
/// predicts every model when the fold has no event at all (a single event in all).
fn fit_fold<'a>(
    events: impl Iterator<Item = &'a LoggedEvent> + Clone,
    dim: usize,
    num_models: usize,
    reward: Reward,
    ridge: f64,
    fallback: Means,
) -> Coefficients {
    let fold_means = match events.clone().next() {
        Some(_) => Means::of(events.clone(), reward),
        None => fallback,
    };
    let mut coefficients = Coefficients {
        quality: Array2::zeros((dim, num_models)),
        cost: Array2::zeros((dim, num_models)),
    };
    for model in 0..num_models {
        let mut equations = NormalEquations::new(dim);
        for event in events.clone().filter(|event| event.action == model) {
            equations.add(event, reward.normalised_cost(event.cost_usd));
        }
        equations.flush();

        let solution = if equations.count >= MIN_EVENTS_PER_FIT {
            solve_ridge(
                &equations.gram,
                &[&equations.quality_moment, &equations.cost_moment],
                ridge,
            )
        } else {
            None
        };
        match solution {
            Some([quality, cost]) => {
                for j in 0..dim {
                    coefficients.quality[[j, model]] = quality[j] as f32;
                    coefficients.cost[[j, model]] = cost[j] as f32;
                }
            }
            None => {
                // Intercept only: the model's mean in this fold, or the fold's mean.
                let means = if equations.count > 0 {
                    let count = equations.count as f64;
                    Means {
                        quality: equations.quality_sum / count,
                        cost: equations.cost_sum / count,
                    }
                } else {
                    fold_means
                };
                coefficients.quality[[dim - 1, model]] = means.quality as f32;
                coefficients.cost[[dim - 1, model]] = means.cost as f32;
            }
        }
    }
    coefficients
}

/// Solves `(G + λ·I') β = b` for each right-hand side by Cholesky decomposition, `I'` being the
/// identity without its last (intercept) entry. Returns `None` when the matrix is not positive
/// definite to working precision, for example with `λ = 0` and fewer events than dimensions.
fn solve_ridge(gram: &Array2<f64>, rhs: &[&Array1<f64>; 2], ridge: f64) -> Option<[Vec<f64>; 2]> {
    let dim = gram.nrows();
    let mut matrix = gram.clone();
    for j in 0..dim - 1 {
        matrix[[j, j]] += ridge;
    }
    let trace: f64 = (0..dim).map(|j| matrix[[j, j]]).sum();
    let tolerance = 1e-10 * (trace / dim as f64).max(f64::MIN_POSITIVE);

    // Lower-triangular L with L·Lᵀ = matrix, stored row-major in place.
    let mut lower = vec![0.0f64; dim * dim];
    for j in 0..dim {
        let row_j = j * dim;
        let pivot = matrix[[j, j]]
            - (0..j)
                .map(|k| lower[row_j + k] * lower[row_j + k])
                .sum::<f64>();
        if pivot.is_nan() || pivot <= tolerance {
            return None;
        }
        let diagonal = pivot.sqrt();
        lower[row_j + j] = diagonal;
        for i in j + 1..dim {
            let row_i = i * dim;
            let dot: f64 = (0..j).map(|k| lower[row_i + k] * lower[row_j + k]).sum();
            lower[row_i + j] = (matrix[[i, j]] - dot) / diagonal;
        }
    }

    let solve = |b: &Array1<f64>| {
        // L·y = b, then Lᵀ·β = y.
        let mut y = vec![0.0f64; dim];
        for i in 0..dim {
            let dot: f64 = (0..i).map(|k| lower[i * dim + k] * y[k]).sum();
            y[i] = (b[i] - dot) / lower[i * dim + i];
        }
        let mut beta = vec![0.0f64; dim];
        for i in (0..dim).rev() {
            let dot: f64 = (i + 1..dim).map(|k| lower[k * dim + i] * beta[k]).sum();
            beta[i] = (y[i] - dot) / lower[i * dim + i];
        }
        beta
    };
    Some([solve(rhs[0]), solve(rhs[1])])
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    fn event(embedding: Vec<f32>, action: usize, quality: f32, cost_usd: f32) -> LoggedEvent {
        LoggedEvent {
            embedding,
            w_quality: 0.5,
            action,
            propensity: 0.5,
            quality,
            cost_usd,
        }
    }

    #[test]
    fn offpolicy_ridge_recovers_linear_targets() {
        // Quality 0.2 + 0.5·x₀ − 0.3·x₁ for model 0, cost 0.4·x₂ + 0.1 (τ = 1) for model 0.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let events: Vec<LoggedEvent> = (0..400)
            .map(|_| {
                let x: Vec<f32> = (0..3).map(|_| rng.random_range(0.0..1.0)).collect();
                let quality = 0.2 + 0.5 * x[0] - 0.3 * x[1] + 0.3;
                let cost = 0.4 * x[2] + 0.1;
                event(x, 0, quality, cost)
            })
            .collect();
        let model = RewardModel::cross_fit(&events, 2, Reward::new(1.0), 1e-6, 1);
        for (i, e) in events.iter().enumerate() {
            let x = &e.embedding;
            let quality = 0.5 + 0.5 * x[0] - 0.3 * x[1];
            let cost = 0.4 * x[2] + 0.1;
            assert!((model.quality[[i, 0]] - quality).abs() < 1e-3, "event {i}");
            assert!((model.cost[[i, 0]] - cost).abs() < 1e-3, "event {i}");
        }
        // Model 1 has no events, so the fold's mean predicts it.
        let mean_quality = events.iter().map(|e| e.quality).sum::<f32>() / 400.0;
        assert!((model.quality[[0, 1]] - mean_quality).abs() < 0.05);
    }

    #[test]
    fn offpolicy_ridge_falls_back_to_action_mean() {
        // Model 1 has 8 events in all, fewer than a regression needs in either fold.
        let mut events: Vec<LoggedEvent> = (0..40)
            .map(|i| event(vec![i as f32 / 40.0, 0.5], 0, 0.5, 0.0))
            .collect();
        for i in 0..8 {
            events.push(event(vec![0.1, i as f32 / 8.0], 1, 0.75, 0.5));
        }
        let model = RewardModel::cross_fit(&events, 2, Reward::new(1.0), 1.0, 9);
        for i in 0..events.len() {
            assert!((model.quality[[i, 1]] - 0.75).abs() < 1e-6, "event {i}");
            assert!((model.cost[[i, 1]] - 0.5).abs() < 1e-6, "event {i}");
        }
        assert!((model.reward(0, 1, 0.5) - (0.5 * 0.75 - 0.5 * 0.5)).abs() < 1e-6);
    }

    #[test]
    fn offpolicy_ridge_rejects_singular_system() {
        let gram = Array2::<f64>::zeros((3, 3));
        let rhs = Array1::<f64>::zeros(3);
        assert!(solve_ridge(&gram, &[&rhs, &rhs], 0.0).is_none());
    }
}
