//! Off-policy learning and evaluation of the BaRP policy from production logs.
//!
//! Every logged event was produced by an older policy `π₀` with the route's exploration rule,
//! and records the propensity `π₀(a | x, w)` of the model it called. The quality `q` and the
//! cost `c` of that call do not depend on the preference `w`, so one event can be re-scored
//! under any preference `w'` with the importance weight
//!
//! `ρ = π_θ(a | x, w') / π₀(a | x, w)`
//!
//! which is unbiased because `a` was drawn from `π₀(· | x, w)` and the outcome of `a` on `x` is
//! the same whatever the preference. [`train_off_policy`] uses clipped weights in a REINFORCE
//! step, and [`compare_policies`] uses them in the IPS, SNIPS and doubly robust estimators to
//! compare a candidate with the stable policy on the same events.

mod evaluate;
mod normal;
mod probabilities;
mod reward_model;
#[cfg(test)]
mod synthetic;
mod train;

use serde::{Deserialize, Serialize};

pub use evaluate::{Estimate, Estimates, EvaluationConfig, PolicyComparison, compare_policies};
pub use normal::standard_normal_quantile;
pub use probabilities::{ActionProbabilities, Explored};
pub use train::{OffPolicyConfig, OffPolicySummary, train_off_policy};

/// One logged bandit interaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// L2-normalised prompt embedding, of the policy network's `embedding_dim`.
    pub embedding: Vec<f32>,
    /// Logged preference weight on quality, in `[0, 1]`; `w_cost = 1 − w_quality`.
    pub w_quality: f32,
    /// Index of the called model in the policy's model order.
    pub action: usize,
    /// `π₀(a | x, w)` as logged, in `(0, 1]`.
    pub propensity: f32,
    /// Quality score of the call, in `[0, 1]`.
    pub quality: f32,
    /// Cost of the call in USD, at least 0.
    pub cost_usd: f32,
}

/// Logged events or settings that off-policy training or evaluation cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OffPolicyError {
    #[error(
        "the list of logged events is empty; collect feedback events before training or evaluating"
    )]
    NoEvents,
    #[error(
        "event {index}: embedding has {found} values but the policy expects {expected}; embed the prompt with the encoder the policy was trained with"
    )]
    EmbeddingLength {
        index: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "event {index}: embedding value {value} at position {position} is not finite; drop the event or embed its prompt again"
    )]
    NonFiniteEmbedding {
        index: usize,
        position: usize,
        value: f32,
    },
    #[error(
        "event {index}: w_quality {value} is outside [0, 1]; log the preference weight on quality, with w_cost = 1 - w_quality"
    )]
    Preference { index: usize, value: f32 },
    #[error(
        "event {index}: action {action} is out of range for {num_models} models; map the model name through the policy's model order"
    )]
    ActionOutOfRange {
        index: usize,
        action: usize,
        num_models: usize,
    },
    #[error(
        "event {index}: propensity {value} is outside (0, 1]; log π₀(a | x, w) of the called model, which is positive for any model the logging policy called"
    )]
    Propensity { index: usize, value: f32 },
    #[error("event {index}: quality {value} is outside [0, 1]; rescale the score to [0, 1]")]
    Quality { index: usize, value: f32 },
    #[error(
        "event {index}: cost {value} USD is negative or not finite; log the call's cost in USD, 0 for a free call"
    )]
    Cost { index: usize, value: f32 },
    #[error("invalid {name} = {value}: {reason}")]
    InvalidConfig {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "the {policy} policy returned probabilities of shape [{rows} × {columns}] for {expected_rows} rows and {expected_columns} models; it must return one row per embedding and one column per model of the route"
    )]
    ProbabilityShape {
        policy: &'static str,
        rows: usize,
        columns: usize,
        expected_rows: usize,
        expected_columns: usize,
    },
    #[error(
        "the {policy} policy returned probabilities summing to {sum} (or a negative or non-finite value) for event {index}; each row must be a probability distribution over the models"
    )]
    InvalidProbabilities {
        policy: &'static str,
        index: usize,
        sum: f32,
    },
}

/// Checks every event against the policy's embedding dimension and, when known, its number of
/// models, and returns the first invalid value.
fn validate_events(
    events: &[LoggedEvent],
    embedding_dim: usize,
    num_models: Option<usize>,
) -> Result<(), OffPolicyError> {
    if events.is_empty() {
        return Err(OffPolicyError::NoEvents);
    }
    for (index, event) in events.iter().enumerate() {
        if event.embedding.len() != embedding_dim {
            return Err(OffPolicyError::EmbeddingLength {
                index,
                expected: embedding_dim,
                found: event.embedding.len(),
            });
        }
        if let Some(position) = event.embedding.iter().position(|v| !v.is_finite()) {
            return Err(OffPolicyError::NonFiniteEmbedding {
                index,
                position,
                value: event.embedding[position],
            });
        }
        if !(0.0..=1.0).contains(&event.w_quality) {
            return Err(OffPolicyError::Preference {
                index,
                value: event.w_quality,
            });
        }
        if let Some(num_models) = num_models
            && event.action >= num_models
        {
            return Err(OffPolicyError::ActionOutOfRange {
                index,
                action: event.action,
                num_models,
            });
        }
        if !(event.propensity > 0.0 && event.propensity <= 1.0) {
            return Err(OffPolicyError::Propensity {
                index,
                value: event.propensity,
            });
        }
        if !(0.0..=1.0).contains(&event.quality) {
            return Err(OffPolicyError::Quality {
                index,
                value: event.quality,
            });
        }
        if !(event.cost_usd >= 0.0 && event.cost_usd.is_finite()) {
            return Err(OffPolicyError::Cost {
                index,
                value: event.cost_usd,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_event() -> LoggedEvent {
        LoggedEvent {
            embedding: vec![0.6, 0.8, 0.0],
            w_quality: 0.5,
            action: 1,
            propensity: 0.25,
            quality: 0.9,
            cost_usd: 0.002,
        }
    }

    #[test]
    fn valid_events_pass() {
        assert_eq!(validate_events(&[valid_event()], 3, Some(2)), Ok(()));
    }

    #[test]
    fn empty_event_list_is_rejected() {
        let error = validate_events(&[], 3, Some(2)).unwrap_err();
        assert_eq!(error, OffPolicyError::NoEvents);
        assert!(error.to_string().contains("empty"), "{error}");
    }

    #[test]
    fn invalid_event_messages_name_the_value() {
        type Edit = fn(&mut LoggedEvent);
        let cases: [(Edit, &str); 9] = [
            (
                |e| e.embedding.push(0.0),
                "embedding has 4 values but the policy expects 3",
            ),
            (
                |e| e.embedding[2] = f32::NAN,
                "embedding value NaN at position 2",
            ),
            (|e| e.w_quality = 1.5, "w_quality 1.5 is outside [0, 1]"),
            (|e| e.action = 2, "action 2 is out of range for 2 models"),
            (|e| e.propensity = 0.0, "propensity 0 is outside (0, 1]"),
            (|e| e.propensity = 1.25, "propensity 1.25 is outside (0, 1]"),
            (|e| e.quality = -0.5, "quality -0.5 is outside [0, 1]"),
            (|e| e.cost_usd = -0.01, "cost -0.01 USD is negative"),
            (
                |e| e.cost_usd = f32::INFINITY,
                "cost inf USD is negative or not finite",
            ),
        ];
        for (edit, expected) in cases {
            let mut events = vec![valid_event(), valid_event()];
            edit(&mut events[1]);
            let message = validate_events(&events, 3, Some(2))
                .expect_err(expected)
                .to_string();
            assert!(message.starts_with("event 1: "), "{message}");
            assert!(message.contains(expected), "{message}");
        }
    }
}
