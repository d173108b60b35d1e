//! `knn-full-info`: k-nearest-neighbour routing on every model's recorded training outcomes.
//!
//! For a prompt, the `k` training prompts with the highest cosine similarity of embeddings
//! (ties to the lower training index) predict each model's quality and normalised cost
//! `min(c / τ, 1)` as their means. The router then picks `argmax w_q · q̂ − w_c · ĉ`.

use ndarray::{Array2, ArrayView2, Axis};

use super::{BaselineError, Router, regression_targets, route_by_predictions};
use crate::reward::Reward;

/// Default number of neighbours.
pub const DEFAULT_K: usize = 10;

/// Prompts routed per similarity block: bounds the `[block × train]` similarity matrix.
const BLOCK_ROWS: usize = 256;

/// A k-nearest-neighbour router over the training prompts.
#[derive(Debug, Clone)]
pub struct KnnRouter {
    k: usize,
    /// Training embeddings scaled to unit length, `[train × dim]`.
    train: Array2<f32>,
    quality: Array2<f64>,
    normalised_cost: Array2<f64>,
}

impl KnnRouter {
    /// Stores the training set. `embeddings` is `[train × dim]`, `quality` and `cost` are
    /// `[train × models]`.
    pub fn new(
        embeddings: ArrayView2<f32>,
        quality: ArrayView2<f32>,
        cost: ArrayView2<f32>,
        reward: Reward,
        k: usize,
    ) -> Result<Self, BaselineError> {
        let router = "knn-full-info".to_string();
        if embeddings.nrows() == 0 {
            return Err(BaselineError::EmptyTraining { router });
        }
        if embeddings.nrows() != quality.nrows() || quality.dim() != cost.dim() {
            return Err(BaselineError::ShapeMismatch {
                router,
                embeddings: embeddings.nrows(),
                outcomes: quality.nrows(),
            });
        }
        if k == 0 {
            return Err(BaselineError::InvalidConfig {
                router,
                message: "k is 0; use at least 1 neighbour".to_string(),
            });
        }
        let (quality, normalised_cost) = regression_targets(quality, cost, reward);
        Ok(Self {
            k: k.min(embeddings.nrows()),
            train: unit_rows(embeddings),
            quality,
            normalised_cost,
        })
    }
}

/// Scales every row to unit L2 norm; zero rows stay zero.
fn unit_rows(embeddings: ArrayView2<f32>) -> Array2<f32> {
    let mut rows = embeddings.to_owned();
    for mut row in rows.rows_mut() {
        let norm = row.dot(&row).sqrt();
        if norm > 0.0 {
            row /= norm;
        }
    }
    rows
}

impl Router for KnnRouter {
    fn id(&self) -> String {
        "knn-full-info".to_string()
    }

    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize> {
        let queries = unit_rows(embeddings);
        let models = self.quality.ncols();
        let mut quality = Array2::<f64>::zeros((queries.nrows(), models));
        let mut cost = Array2::<f64>::zeros((queries.nrows(), models));
        let mut order: Vec<usize> = (0..self.train.nrows()).collect();
        for (block_index, block) in queries.axis_chunks_iter(Axis(0), BLOCK_ROWS).enumerate() {
            let similarity = block.dot(&self.train.t());
            for (offset, row) in similarity.rows().into_iter().enumerate() {
                let by_similarity =
                    |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
                order.select_nth_unstable_by(self.k - 1, by_similarity);
                let neighbours = &order[..self.k];
                let target = block_index * BLOCK_ROWS + offset;
                for &neighbour in neighbours {
                    quality
                        .row_mut(target)
                        .scaled_add(1.0, &self.quality.row(neighbour));
                    cost.row_mut(target)
                        .scaled_add(1.0, &self.normalised_cost.row(neighbour));
                }
            }
        }
        // Means over the neighbours: the scale does not change the argmax, but keeps the
        // predictions readable when debugging.
        quality /= self.k as f64;
        cost /= self.k as f64;
        route_by_predictions(quality.view(), cost.view(), w_quality)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::task_embeddings;
    use super::*;

    #[test]
    fn routes_each_task_to_its_best_model() {
        let (train, train_tasks) = task_embeddings(300, 3, 12, 1);
        let (test, test_tasks) = task_embeddings(90, 3, 12, 2);
        // Model t is perfect on task t and useless elsewhere; all cost the same.
        let quality =
            Array2::from_shape_fn((300, 3), |(i, a)| f32::from(u8::from(train_tasks[i] == a)));
        let cost = Array2::from_elem((300, 3), 0.001f32);
        let router = KnnRouter::new(
            train.view(),
            quality.view(),
            cost.view(),
            Reward::new(0.01),
            10,
        )
        .unwrap();
        let choices = router.route(test.view(), 1.0);
        assert_eq!(choices, test_tasks);
    }

    #[test]
    fn cost_weight_picks_cheapest() {
        let (train, _) = task_embeddings(50, 2, 8, 3);
        let quality = Array2::from_elem((50, 2), 0.5f32);
        let cost = Array2::from_shape_fn((50, 2), |(_, a)| [0.005f32, 0.001][a]);
        let router = KnnRouter::new(
            train.view(),
            quality.view(),
            cost.view(),
            Reward::new(0.01),
            5,
        )
        .unwrap();
        assert!(router.route(train.view(), 0.0).iter().all(|&a| a == 1));
    }

    #[test]
    fn zero_k_is_rejected() {
        let (train, _) = task_embeddings(5, 1, 4, 3);
        let outcomes = Array2::<f32>::zeros((5, 2));
        let error = KnnRouter::new(
            train.view(),
            outcomes.view(),
            outcomes.view(),
            Reward::new(0.01),
            0,
        )
        .unwrap_err();
        assert!(error.to_string().contains("k is 0"), "{error}");
    }
}
