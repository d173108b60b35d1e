//! Bandit feedback over recorded routing outcomes.
//!
//! A routing data set records every model's quality and cost for every prompt: full
//! information. Production only ever observes the outcome of the model that was called. Learners
//! that claim bandit feedback train through [`ReplayEnvironment`], which reveals the outcome of
//! the pulled arm only and counts every pull, so the restriction is enforced by the type rather
//! than by convention.

use ndarray::{ArrayView1, ArrayView2};

/// The observed outcome of one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Quality score in [0, 1].
    pub quality: f32,
    /// Cost of the call in USD.
    pub cost: f32,
}

/// A contextual bandit over a fixed set of prompts: contexts are prompt embeddings, arms are
/// the models of the pool in a fixed order.
#[derive(Debug)]
pub struct ReplayEnvironment<'a> {
    embeddings: ArrayView2<'a, f32>,
    quality: ArrayView2<'a, f32>,
    cost: ArrayView2<'a, f32>,
    pulls: u64,
}

impl<'a> ReplayEnvironment<'a> {
    /// `embeddings` is `[prompts × dim]`; `quality` and `cost` are `[prompts × arms]`.
    pub fn new(
        embeddings: ArrayView2<'a, f32>,
        quality: ArrayView2<'a, f32>,
        cost: ArrayView2<'a, f32>,
    ) -> Self {
        assert_eq!(
            embeddings.nrows(),
            quality.nrows(),
            "one embedding per prompt"
        );
        assert_eq!(
            quality.dim(),
            cost.dim(),
            "quality and cost share one shape"
        );
        Self {
            embeddings,
            quality,
            cost,
            pulls: 0,
        }
    }

    pub fn num_prompts(&self) -> usize {
        self.embeddings.nrows()
    }

    pub fn num_arms(&self) -> usize {
        self.quality.ncols()
    }

    /// Embedding dimension of the contexts.
    pub fn context_dim(&self) -> usize {
        self.embeddings.ncols()
    }

    /// Returns the context of one prompt: its embedding.
    pub fn context(&self, prompt: usize) -> ArrayView1<'a, f32> {
        self.embeddings.index_axis_move(ndarray::Axis(0), prompt)
    }

    /// Returns all contexts, `[prompts × dim]`.
    pub fn contexts(&self) -> ArrayView2<'a, f32> {
        self.embeddings
    }

    /// Calls `arm` on `prompt` and reveals that call's outcome, and nothing else.
    pub fn pull(&mut self, prompt: usize, arm: usize) -> Outcome {
        self.pulls += 1;
        Outcome {
            quality: self.quality[[prompt, arm]],
            cost: self.cost[[prompt, arm]],
        }
    }

    /// Number of outcomes revealed so far.
    pub fn pulls(&self) -> u64 {
        self.pulls
    }
}
