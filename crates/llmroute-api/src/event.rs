//! Routing decisions, feedback from the application, and the completed events that sidecars
//! send to the control plane for training and off-policy evaluation.

use serde::{Deserialize, Serialize};

use crate::preference::Preference;

/// The sidecar's decision for one request, also sent back in response headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    /// Random 128-bit id in 32 lowercase hex digits.
    pub decision_id: String,
    pub route: String,
    /// Version of the sidecar configuration the decision was made with.
    pub config_version: u64,
    /// Model the request was first sent to.
    pub model: String,
    /// False when the client named a pool model itself, or when no policy could run.
    pub routed: bool,
    pub preference: Preference,
    /// Policy version that made the decision; `None` when the request was not routed.
    pub policy_version: Option<String>,
    /// `π₀(a | x, w)` of the chosen model under the exploration setting; `None` when the
    /// request was not routed.
    pub propensity: Option<f64>,
}

/// Quality feedback that the application posts for one decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct FeedbackRequest {
    pub decision_id: String,
    /// Quality score in `[0, 1]`.
    pub score: f64,
}

/// The end state of one request's upstream call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Outcome {
    /// The upstream responded with 2xx and the whole response reached the client.
    Success,
    /// The last model tried responded with this HTTP status.
    UpstreamStatus { status: u16 },
    /// No model could be reached, or none responded in time.
    Unreachable,
    /// The upstream failed or stalled after the response had started.
    StreamInterrupted,
    /// The client went away before the response was complete.
    ClientCancelled,
}

/// One finished request with everything training needs. The prompt itself is not included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletedEvent {
    pub decision: DecisionRecord,
    /// Model that produced the answer (differs from `decision.model` after a retry).
    pub served_model: String,
    /// Prompt embedding the policy saw; empty when the request was not routed.
    pub embedding: Vec<f32>,
    /// Quality score from feedback; `None` when none arrived within the feedback TTL.
    pub quality: Option<f64>,
    /// Cost in USD from the upstream's token usage and the route's prices; `None` when the
    /// upstream reported no usage.
    pub cost_usd: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Time from the request's arrival to the end of the answer, in milliseconds.
    pub latency_ms: f64,
    pub outcome: Outcome,
    /// Number of models tried.
    pub attempts: u32,
    /// Unix time of the request's arrival, in milliseconds.
    pub timestamp_ms: u64,
}

/// Events sent to the control plane in one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventBatch {
    pub route: String,
    /// Identity of the sending sidecar (for example the pod name).
    pub sidecar: String,
    pub events: Vec<CompletedEvent>,
}

impl FeedbackRequest {
    /// Checks the score range and the decision id format, returning a message that names the
    /// invalid value.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.score) {
            return Err(format!(
                "invalid score {}: expected a number in [0, 1]",
                self.score
            ));
        }
        if !is_decision_id(&self.decision_id) {
            return Err(format!(
                "invalid decision_id {:?}: expected the 32 hex digits of an x-llmroute-decision-id response header",
                self.decision_id
            ));
        }
        Ok(())
    }
}

/// Tests whether `value` has the form of a decision id: 32 lowercase hex digits.
pub fn is_decision_id(value: &str) -> bool {
    value.len() == 32
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_validation_names_value() {
        let valid = FeedbackRequest {
            decision_id: "0123456789abcdef0123456789abcdef".into(),
            score: 0.5,
        };
        assert_eq!(valid.validate(), Ok(()));
        let high = FeedbackRequest {
            score: 1.5,
            ..valid.clone()
        };
        assert!(high.validate().unwrap_err().contains("1.5"));
        let bad_id = FeedbackRequest {
            decision_id: "xyz".into(),
            ..valid
        };
        assert!(bad_id.validate().unwrap_err().contains("\"xyz\""));
    }

    #[test]
    fn feedback_rejects_unknown_fields() {
        let error = serde_json::from_str::<FeedbackRequest>(
            r#"{"decision_id": "0123456789abcdef0123456789abcdef", "score": 1, "extra": 1}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("extra"), "{error}");
    }

    #[test]
    fn outcome_is_tagged() {
        let json = serde_json::to_string(&Outcome::UpstreamStatus { status: 503 }).unwrap();
        assert_eq!(json, r#"{"kind":"upstreamStatus","status":503}"#);
    }
}
