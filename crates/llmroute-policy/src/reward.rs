//! The BaRP reward and the cost scale τ.
//!
//! Reward of one call (BaRP, arXiv 2510.07429):
//!
//! `r = w_q · q − w_c · min(c / τ, 1)`
//!
//! with `q ∈ [0, 1]` the quality score of the call, `c` its cost in USD, `w = (w_q, w_c)` the
//! caller's preference on the 1-simplex (`w_c = 1 − w_q`) and `τ > 0` the cost scale in USD.
//! Costs above τ count as 1, so `r ∈ [−w_c, w_q]`.

use serde::{Deserialize, Serialize};

/// Default percentile of per-call cost used to calibrate τ.
pub const DEFAULT_TAU_PERCENTILE: f64 = 0.95;

/// The reward function of one route or data set: the cost scale τ in USD per call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    /// Cost scale τ, in USD per call.
    pub tau: f32,
}

impl Reward {
    pub fn new(tau: f32) -> Self {
        assert!(
            tau > 0.0 && tau.is_finite(),
            "cost scale τ must be positive, got {tau}"
        );
        Self { tau }
    }

    /// Cost normalised to [0, 1]: `min(c / τ, 1)`.
    pub fn normalised_cost(&self, cost_usd: f32) -> f32 {
        (cost_usd / self.tau).min(1.0)
    }

    /// `r = w_q · q − (1 − w_q) · min(c / τ, 1)`.
    pub fn reward(&self, w_quality: f32, quality: f32, cost_usd: f32) -> f32 {
        w_quality * quality - (1.0 - w_quality) * self.normalised_cost(cost_usd)
    }
}

/// Calibrates τ as the given percentile (0..1, nearest rank) of observed per-call costs.
/// Returns `None` when there is no positive cost to calibrate from.
pub fn calibrate_tau(costs: impl IntoIterator<Item = f32>, percentile: f64) -> Option<f32> {
    let mut sorted: Vec<f32> = costs.into_iter().filter(|c| c.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f32::total_cmp);
    let rank = ((percentile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    let tau = sorted[rank - 1];
    (tau > 0.0).then_some(tau)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_at_simplex_corners() {
        let reward = Reward::new(0.01);
        assert_eq!(reward.reward(1.0, 0.7, 0.5), 0.7);
        assert_eq!(reward.reward(0.0, 0.7, 0.005), -0.5);
    }

    #[test]
    fn cost_above_tau_saturates() {
        let reward = Reward::new(0.01);
        assert_eq!(reward.normalised_cost(0.02), 1.0);
    }

    #[test]
    fn tau_is_nearest_rank_percentile() {
        let costs = (1..=100).map(|i| i as f32);
        assert_eq!(calibrate_tau(costs, 0.95), Some(95.0));
    }

    #[test]
    fn tau_without_positive_cost() {
        assert_eq!(calibrate_tau([0.0, 0.0], 0.95), None);
        assert_eq!(calibrate_tau([], 0.95), None);
    }
}
