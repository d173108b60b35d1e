//! `mlp-full-info`: a multilayer perceptron trained on every model's recorded training
//! outcomes.
//!
//! `embedding → Linear(dim, hidden) → ReLU → Linear(hidden, 2K)` predicts each model's
//! quality (outputs `0..K`) and normalised cost `min(c / τ, 1)` (outputs `K..2K`), trained
//! with mean squared error over all `2K` outputs and Adam, for a fixed number of epochs from a
//! fixed seed. It routes by `argmax w_q · q̂ − w_c · ĉ`. This network is separate from the
//! BaRP policy network.

use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::{BaselineError, Router, route_by_predictions};
use crate::reward::Reward;

/// Hyper-parameters of the full-information MLP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    pub hidden: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
    pub seed: u64,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            hidden: 128,
            epochs: 40,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 0,
        }
    }
}

/// A trained full-information MLP router.
#[derive(Debug, Clone)]
pub struct MlpRouter {
    w1: Array2<f32>,
    b1: Array1<f32>,
    w2: Array2<f32>,
    b2: Array1<f32>,
    models: usize,
}

impl MlpRouter {
    /// Predictions `[prompts × 2K]`: quality then normalised cost, per model.
    pub fn predict(&self, embeddings: ArrayView2<f32>) -> Array2<f32> {
        let hidden = (embeddings.dot(&self.w1) + &self.b1).mapv(|v| v.max(0.0));
        hidden.dot(&self.w2) + &self.b2
    }
}

impl Router for MlpRouter {
    fn id(&self) -> String {
        "mlp-full-info".to_string()
    }

    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize> {
        let outputs = self.predict(embeddings).mapv(f64::from);
        let quality = outputs.slice(s![.., ..self.models]);
        let cost = outputs.slice(s![.., self.models..]);
        route_by_predictions(quality, cost, w_quality)
    }
}

/// Adam moments of one parameter tensor (β₁ = 0.9, β₂ = 0.999, ε = 1e-8).
struct Moments<D: ndarray::Dimension> {
    first: ndarray::Array<f32, D>,
    second: ndarray::Array<f32, D>,
}

impl<D: ndarray::Dimension> Moments<D> {
    fn new(shape: D) -> Self {
        Self {
            first: ndarray::Array::zeros(shape.clone()),
            second: ndarray::Array::zeros(shape),
        }
    }

    /// Applies one Adam update to `parameter` with `gradient` at step `t` (counted from 1).
    fn step(
        &mut self,
        parameter: &mut ndarray::Array<f32, D>,
        gradient: &ndarray::Array<f32, D>,
        rate: f32,
        t: i32,
    ) {
        const BETA1: f32 = 0.9;
        const BETA2: f32 = 0.999;
        const EPSILON: f32 = 1e-8;
        self.first
            .zip_mut_with(gradient, |m, &g| *m = BETA1 * *m + (1.0 - BETA1) * g);
        self.second
            .zip_mut_with(gradient, |v, &g| *v = BETA2 * *v + (1.0 - BETA2) * g * g);
        let first_correction = 1.0 - BETA1.powi(t);
        let second_correction = 1.0 - BETA2.powi(t);
        ndarray::Zip::from(parameter)
            .and(&self.first)
            .and(&self.second)
            .for_each(|p, &m, &v| {
                *p -= rate * (m / first_correction) / ((v / second_correction).sqrt() + EPSILON);
            });
    }
}

/// Trains the MLP on `[train × dim]` embeddings and `[train × models]` outcomes.
pub fn train_mlp(
    embeddings: ArrayView2<f32>,
    quality: ArrayView2<f32>,
    cost: ArrayView2<f32>,
    reward: Reward,
    config: &MlpConfig,
) -> Result<MlpRouter, BaselineError> {
    let router = "mlp-full-info".to_string();
    let (rows, dim) = embeddings.dim();
    if rows == 0 {
        return Err(BaselineError::EmptyTraining { router });
    }
    if rows != quality.nrows() || quality.dim() != cost.dim() {
        return Err(BaselineError::ShapeMismatch {
            router,
            embeddings: rows,
            outcomes: quality.nrows(),
        });
    }
    if config.hidden == 0
        || config.batch_size == 0
        || !(config.learning_rate.is_finite() && config.learning_rate > 0.0)
    {
        return Err(BaselineError::InvalidConfig {
            router,
            message: format!(
                "hidden {}, batch_size {} and learning_rate {} must all be positive",
                config.hidden, config.batch_size, config.learning_rate
            ),
        });
    }
    let models = quality.ncols();
    let outputs = 2 * models;
    let mut targets = Array2::<f32>::zeros((rows, outputs));
    targets.slice_mut(s![.., ..models]).assign(&quality);
    targets
        .slice_mut(s![.., models..])
        .assign(&cost.mapv(|c| reward.normalised_cost(c)));

    // He initialisation for the ReLU layer, Glorot-scale for the linear output layer.
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let he = Normal::new(0.0, (2.0 / dim as f32).sqrt()).expect("positive standard deviation");
    let glorot =
        Normal::new(0.0, (1.0 / config.hidden as f32).sqrt()).expect("positive standard deviation");
    let mut network = MlpRouter {
        w1: Array2::from_shape_fn((dim, config.hidden), |_| he.sample(&mut rng)),
        b1: Array1::zeros(config.hidden),
        w2: Array2::from_shape_fn((config.hidden, outputs), |_| glorot.sample(&mut rng)),
        b2: Array1::zeros(outputs),
        models,
    };
    let mut moments = (
        Moments::new(network.w1.raw_dim()),
        Moments::new(network.b1.raw_dim()),
        Moments::new(network.w2.raw_dim()),
        Moments::new(network.b2.raw_dim()),
    );

    let mut order: Vec<usize> = (0..rows).collect();
    let mut step = 0;
    let mut last_loss = f32::NAN;
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        let mut epoch_loss = 0.0f32;
        for batch in order.chunks(config.batch_size) {
            step += 1;
            let x = embeddings.select(Axis(0), batch);
            let y = targets.select(Axis(0), batch);
            let pre_activation = x.dot(&network.w1) + &network.b1;
            let hidden = pre_activation.mapv(|v| v.max(0.0));
            let prediction = hidden.dot(&network.w2) + &network.b2;
            // Loss = mean over the batch and all 2K outputs of (ŷ − y)², so dL/dŷ = 2(ŷ − y)/(B·2K).
            let error = &prediction - &y;
            epoch_loss += error.mapv(|e| e * e).sum();
            let d_prediction = error * (2.0 / (batch.len() * outputs) as f32);
            let d_w2 = hidden.t().dot(&d_prediction);
            let d_b2 = d_prediction.sum_axis(Axis(0));
            let mut d_hidden = d_prediction.dot(&network.w2.t());
            d_hidden.zip_mut_with(&pre_activation, |d, &z| {
                if z <= 0.0 {
                    *d = 0.0;
                }
            });
            let d_w1 = x.t().dot(&d_hidden);
            let d_b1 = d_hidden.sum_axis(Axis(0));
            let rate = config.learning_rate;
            moments.0.step(&mut network.w1, &d_w1, rate, step);
            moments.1.step(&mut network.b1, &d_b1, rate, step);
            moments.2.step(&mut network.w2, &d_w2, rate, step);
            moments.3.step(&mut network.b2, &d_b2, rate, step);
        }
        last_loss = epoch_loss / (rows * outputs) as f32;
    }
    tracing::debug!(
        epochs = config.epochs,
        final_mse = last_loss,
        "trained full-information MLP"
    );
    Ok(network)
}

#[cfg(test)]
mod tests {
    use super::super::tests::task_embeddings;
    use super::*;

    #[test]
    fn learns_per_task_best_model() {
        let (train, train_tasks) = task_embeddings(600, 3, 16, 4);
        let (test, test_tasks) = task_embeddings(90, 3, 16, 5);
        let quality =
            Array2::from_shape_fn((600, 3), |(i, a)| f32::from(u8::from(train_tasks[i] == a)));
        // Model 2 is cheap, the others cost τ or more.
        let cost = Array2::from_shape_fn((600, 3), |(_, a)| [0.02f32, 0.02, 0.0][a]);
        let config = MlpConfig {
            epochs: 30,
            ..MlpConfig::default()
        };
        let router = train_mlp(
            train.view(),
            quality.view(),
            cost.view(),
            Reward::new(0.01),
            &config,
        )
        .unwrap();
        assert_eq!(router.route(test.view(), 1.0), test_tasks);
        assert!(router.route(test.view(), 0.0).iter().all(|&a| a == 2));
        let predictions = router.predict(test.view());
        for (row, &task) in predictions.rows().into_iter().zip(&test_tasks) {
            assert!(
                (row[task] - 1.0).abs() < 0.15,
                "quality prediction {} for its best model",
                row[task]
            );
        }
    }

    #[test]
    fn training_is_deterministic() {
        let (train, tasks) = task_embeddings(100, 2, 8, 6);
        let quality = Array2::from_shape_fn((100, 2), |(i, a)| f32::from(u8::from(tasks[i] == a)));
        let cost = Array2::from_elem((100, 2), 0.001f32);
        let config = MlpConfig {
            epochs: 3,
            ..MlpConfig::default()
        };
        let first = train_mlp(
            train.view(),
            quality.view(),
            cost.view(),
            Reward::new(0.01),
            &config,
        )
        .unwrap();
        let second = train_mlp(
            train.view(),
            quality.view(),
            cost.view(),
            Reward::new(0.01),
            &config,
        )
        .unwrap();
        assert_eq!(first.predict(train.view()), second.predict(train.view()));
    }

    #[test]
    fn mismatched_shapes_are_rejected() {
        let (train, _) = task_embeddings(10, 2, 8, 6);
        let outcomes = Array2::<f32>::zeros((9, 2));
        let error = train_mlp(
            train.view(),
            outcomes.view(),
            outcomes.view(),
            Reward::new(0.01),
            &MlpConfig::default(),
        )
        .unwrap_err();
        assert!(
            matches!(error, BaselineError::ShapeMismatch { .. }),
            "{error}"
        );
    }
}
