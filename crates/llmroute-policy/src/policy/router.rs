//! The trained BaRP network as a [`Router`] for the offline evaluation: argmax of `π(· | x, w)`.

use ndarray::{ArrayView2, Axis};

use super::network::{PolicyNetwork, argmax};
use crate::baselines::Router;

/// Rows per forward pass when routing a whole split.
const CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct BarpRouter {
    pub network: PolicyNetwork,
}

impl Router for BarpRouter {
    fn id(&self) -> String {
        "barp".to_string()
    }

    fn route(&self, embeddings: ArrayView2<f32>, w_quality: f32) -> Vec<usize> {
        let mut choices = Vec::with_capacity(embeddings.nrows());
        for chunk in embeddings.axis_chunks_iter(Axis(0), CHUNK) {
            let preferences = vec![w_quality; chunk.nrows()];
            let probabilities = self.network.probabilities(chunk, &preferences);
            for row in probabilities.rows() {
                choices.push(argmax(row.as_slice().expect("standard layout")));
            }
        }
        choices
    }
}
