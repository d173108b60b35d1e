//! Routing decisions, feedback from the application, and the completed events that sidecars
//! send to the control plane for training and off-policy evaluation.

use serde::{Deserialize, Serialize};

use crate::preference::Preference;

/// The sidecar's decision for one request, also sent back in response headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    /// 128-bit id in 32 lowercase hex digits, made by [`new_decision_id`].
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
    /// Prompt embedding the policy saw; empty when the request was not routed. In JSON it is
    /// the base64 text of its little-endian f32 values (as with `encoding_format: base64` of
    /// OpenAI's embeddings API), or an array of numbers. Events are written in base64: for 384
    /// values it is 2,048 characters against about 4 KB of decimals, and needs no float parsing.
    #[serde(with = "embedding_json")]
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

/// Maximum number of events in one [`EventBatch`]; the sidecar sends at most 256.
pub const MAX_BATCH_EVENTS: usize = 1024;

/// Largest allowed distance of `quality + cost` from 1 in a stored preference, the tolerance
/// of [`Preference::parse`](crate::Preference::parse).
const PREFERENCE_SUM_TOLERANCE: f64 = 1e-3;

/// What an [`EventBatch`] is checked against: the route's current sidecar configuration and
/// the embedding dimension of the sidecars' prompt encoder.
#[derive(Debug, Clone, Copy)]
pub struct BatchRules<'a> {
    pub config: &'a crate::SidecarConfig,
    /// Length of every non-empty embedding (384 for all-MiniLM-L6-v2).
    pub embedding_dim: usize,
    pub max_events: usize,
}

/// The first invalid value of a batch: which event, which field, the value and what was
/// expected. `index` is `None` for the batch's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct EventError {
    pub index: Option<usize>,
    /// JSON path of the field inside the event (or the batch), for example
    /// `decision.propensity`.
    pub field: &'static str,
    pub value: String,
    pub expected: String,
}

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(index) => write!(f, "event {index}: invalid {} {}", self.field, self.value)?,
            None => write!(f, "invalid batch {} {}", self.field, self.value)?,
        }
        write!(f, ": expected {}", self.expected)
    }
}

impl std::error::Error for EventError {}

impl EventBatch {
    /// Checks the batch and every event field by field, returning the first invalid value.
    /// Events are checked in order, so the error names the lowest invalid index.
    pub fn validate(&self, rules: &BatchRules<'_>) -> Result<(), EventError> {
        let batch_error = |field, value: String, expected: String| EventError {
            index: None,
            field,
            value,
            expected,
        };
        if self.route != rules.config.route {
            return Err(batch_error(
                "route",
                format!("{:?}", self.route),
                format!("the route {:?} of this endpoint", rules.config.route),
            ));
        }
        if self.events.len() > rules.max_events {
            return Err(batch_error(
                "events",
                format!("({} events)", self.events.len()),
                format!(
                    "at most {} events per batch; send smaller batches",
                    rules.max_events
                ),
            ));
        }
        for (index, event) in self.events.iter().enumerate() {
            event
                .validate(&self.route, rules)
                .map_err(|(field, value, expected)| EventError {
                    index: Some(index),
                    field,
                    value,
                    expected,
                })?;
        }
        Ok(())
    }
}

type FieldError = (&'static str, String, String);

impl CompletedEvent {
    /// Checks one event of a batch for `route`.
    fn validate(&self, route: &str, rules: &BatchRules<'_>) -> Result<(), FieldError> {
        let decision = &self.decision;
        if !is_decision_id(&decision.decision_id) {
            return Err((
                "decision.decisionId",
                format!("{:?}", decision.decision_id),
                "32 lowercase hex digits".to_string(),
            ));
        }
        if decision.route != route {
            return Err((
                "decision.route",
                format!("{:?}", decision.route),
                format!("the batch's route {route:?}"),
            ));
        }
        let pool = || {
            rules
                .config
                .models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
        };
        if rules.config.model(&decision.model).is_none() {
            return Err((
                "decision.model",
                format!("{:?}", decision.model),
                format!("a model of the route's pool {:?}", pool()),
            ));
        }
        if rules.config.model(&self.served_model).is_none() {
            return Err((
                "servedModel",
                format!("{:?}", self.served_model),
                format!("a model of the route's pool {:?}", pool()),
            ));
        }
        check_preference(&decision.preference)?;
        check_propensity(decision)?;
        self.check_embedding(rules.embedding_dim)?;
        if let Some(quality) = self.quality
            && !(0.0..=1.0).contains(&quality)
        {
            return Err(("quality", quality.to_string(), "a number in [0, 1]".into()));
        }
        if let Some(cost) = self.cost_usd
            && !(cost.is_finite() && cost >= 0.0)
        {
            return Err((
                "costUsd",
                cost.to_string(),
                "a finite number of USD >= 0".into(),
            ));
        }
        if !(self.latency_ms.is_finite() && self.latency_ms >= 0.0) {
            return Err((
                "latencyMs",
                self.latency_ms.to_string(),
                "a finite number of milliseconds >= 0".into(),
            ));
        }
        Ok(())
    }

    /// Checks that a routed event has an embedding, and that every non-empty embedding has
    /// the encoder's dimension (so all of a batch have the same length) and finite values.
    fn check_embedding(&self, embedding_dim: usize) -> Result<(), FieldError> {
        let length = self.embedding.len();
        if length == 0 {
            if self.decision.routed {
                return Err((
                    "embedding",
                    "[] (empty)".into(),
                    format!("{embedding_dim} values when decision.routed is true"),
                ));
            }
            return Ok(());
        }
        if length != embedding_dim {
            return Err((
                "embedding",
                format!("({length} values)"),
                format!("{embedding_dim} values, the prompt encoder's dimension"),
            ));
        }
        if let Some((position, value)) = self
            .embedding
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err((
                "embedding",
                format!("{value} at position {position}"),
                "finite numbers".into(),
            ));
        }
        Ok(())
    }
}

fn check_preference(preference: &crate::Preference) -> Result<(), FieldError> {
    let (quality, cost) = (preference.quality, preference.cost);
    let on_simplex = (0.0..=1.0).contains(&quality)
        && (0.0..=1.0).contains(&cost)
        && ((quality + cost) - 1.0).abs() <= PREFERENCE_SUM_TOLERANCE;
    if !on_simplex {
        return Err((
            "decision.preference",
            format!("{{quality: {quality}, cost: {cost}}}"),
            "quality and cost in [0, 1] summing to 1".into(),
        ));
    }
    Ok(())
}

fn check_propensity(decision: &DecisionRecord) -> Result<(), FieldError> {
    match (decision.routed, decision.propensity) {
        (true, Some(p)) if p > 0.0 && p <= 1.0 => Ok(()),
        (true, Some(p)) => Err((
            "decision.propensity",
            p.to_string(),
            "a probability in (0, 1] for a routed decision".into(),
        )),
        (true, None) => Err((
            "decision.propensity",
            "null".into(),
            "a probability in (0, 1] for a routed decision".into(),
        )),
        (false, Some(p)) => Err((
            "decision.propensity",
            p.to_string(),
            "null when decision.routed is false".into(),
        )),
        (false, None) => Ok(()),
    }
}

/// Makes a decision id: a UUID version 7 (RFC 9562, section 5.7) in 32 lowercase hex digits,
/// without dashes. The first 48 bits are `unix_ms`, the Unix time in milliseconds; 74 of the
/// other bits come from `random`, and the remaining 6 hold the version (7) and the variant.
///
/// Ids made later sort after ids made earlier. The event store keeps a unique index on the
/// decision id, so a new id lands at the end of that index instead of on a random page of it.
/// In a SQLite test of the store's schema with 64-event transactions, time-ordered ids were
/// stored about 1.7 times as fast as fully random ones (see `docs/benchmarks-ingest.md`).
pub fn new_decision_id(unix_ms: u64, random: u128) -> String {
    const RAND_B_BITS: u32 = 62;
    let timestamp = (u128::from(unix_ms) & 0xFFFF_FFFF_FFFF) << 80;
    let version = 0x7_u128 << 76;
    let rand_a = ((random >> RAND_B_BITS) & 0xFFF) << 64;
    let variant = 0b10_u128 << RAND_B_BITS;
    let rand_b = random & ((1_u128 << RAND_B_BITS) - 1);
    format!("{:032x}", timestamp | version | rand_a | variant | rand_b)
}

/// Tests whether `value` has the form of a decision id: 32 lowercase hex digits.
pub fn is_decision_id(value: &str) -> bool {
    value.len() == 32
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The JSON form of [`CompletedEvent::embedding`]: base64 of little-endian f32 values, or an
/// array of numbers. An empty embedding is written as `[]`.
mod embedding_json {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(embedding: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        if embedding.is_empty() {
            return serializer.collect_seq(embedding);
        }
        let mut bytes = Vec::with_capacity(embedding.len() * 4);
        for value in embedding {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        deserializer.deserialize_any(EmbeddingVisitor)
    }

    struct EmbeddingVisitor;

    impl<'de> Visitor<'de> for EmbeddingVisitor {
        type Value = Vec<f32>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of numbers or the base64 text of little-endian f32 values")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f32>, A::Error> {
            let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(value) = seq.next_element::<f32>()? {
                values.push(value);
            }
            Ok(values)
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Vec<f32>, E> {
            let bytes = STANDARD.decode(text).map_err(|error| {
                E::custom(format!(
                    "invalid base64 embedding ({error}); expected the standard base64 alphabet with padding"
                ))
            })?;
            if bytes.len() % 4 != 0 {
                return Err(E::custom(format!(
                    "invalid base64 embedding: {} bytes is not a whole number of f32 values (4 bytes each)",
                    bytes.len()
                )));
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_id_is_time_ordered_uuid_v7() {
        let earlier = new_decision_id(1_764_806_400_000, u128::MAX);
        let later = new_decision_id(1_764_806_400_001, 0);
        assert!(is_decision_id(&earlier), "{earlier}");
        assert!(is_decision_id(&later), "{later}");
        assert!(earlier < later, "{earlier} should sort before {later}");
        assert_eq!(&earlier[..12], format!("{:012x}", 1_764_806_400_000_u64));
        // Version nibble 7 and variant bits 10 (hex digit 8 to b), as RFC 9562 requires.
        assert_eq!(&earlier[12..13], "7");
        assert!(matches!(&later[16..17], "8" | "9" | "a" | "b"), "{later}");
        assert!(
            matches!(&earlier[16..17], "8" | "9" | "a" | "b"),
            "{earlier}"
        );
        // Different random bits give different ids in the same millisecond.
        assert_ne!(
            new_decision_id(5, 1),
            new_decision_id(5, 2),
            "the random part is lost"
        );
    }

    fn event_json(embedding: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "decision": {
                "decisionId": "0123456789abcdef0123456789abcdef", "route": "chat",
                "configVersion": 1, "model": "small", "routed": true,
                "preference": {"quality": 0.7}, "policyVersion": "v1", "propensity": 0.9
            },
            "servedModel": "small", "embedding": embedding, "quality": 0.5, "costUsd": 0.001,
            "promptTokens": 5, "completionTokens": 7, "latencyMs": 3.0,
            "outcome": {"kind": "success"}, "attempts": 1, "timestampMs": 1
        })
    }

    #[test]
    fn embedding_round_trips_as_base64() {
        let values = vec![0.25f32, -1.5, 3.0e-8, f32::MAX];
        let event: CompletedEvent =
            serde_json::from_value(event_json(serde_json::json!(values))).unwrap();
        assert_eq!(event.embedding, values);
        let written = serde_json::to_value(&event).unwrap();
        let text = written["embedding"].as_str().expect("a base64 string");
        assert_eq!(text.len(), 24);
        let read: CompletedEvent = serde_json::from_value(written).unwrap();
        assert_eq!(read.embedding, values);
    }

    #[test]
    fn empty_embedding_is_written_as_array() {
        let mut event: CompletedEvent =
            serde_json::from_value(event_json(serde_json::json!([]))).unwrap();
        assert!(event.embedding.is_empty());
        event.embedding.clear();
        let written = serde_json::to_value(&event).unwrap();
        assert_eq!(written["embedding"], serde_json::json!([]));
    }

    #[test]
    fn invalid_base64_embedding_is_named() {
        let error =
            serde_json::from_value::<CompletedEvent>(event_json(serde_json::json!("not base64!")))
                .unwrap_err()
                .to_string();
        assert!(error.contains("invalid base64 embedding"), "{error}");
        let error =
            serde_json::from_value::<CompletedEvent>(event_json(serde_json::json!("AAAAAAA=")))
                .unwrap_err()
                .to_string();
        assert!(error.contains("5 bytes is not a whole number"), "{error}");
        let error =
            serde_json::from_value::<CompletedEvent>(event_json(serde_json::json!({"a": 1})))
                .unwrap_err()
                .to_string();
        assert!(
            error.contains("base64 text of little-endian f32"),
            "{error}"
        );
    }

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

    fn config() -> crate::SidecarConfig {
        serde_json::from_value(serde_json::json!({
            "route": "ns/chat",
            "version": 1,
            "models": [{"name": "small", "endpoint": "http://127.0.0.1:9/v1",
                        "upstreamModel": "s",
                        "pricing": {"inputUsdPerMillionTokens": 1, "outputUsdPerMillionTokens": 1}}],
            "defaultPreference": {"quality": 0.5},
            "fallback": "small"
        }))
        .unwrap()
    }

    fn event() -> CompletedEvent {
        CompletedEvent {
            decision: DecisionRecord {
                decision_id: "0123456789abcdef0123456789abcdef".into(),
                route: "ns/chat".into(),
                config_version: 1,
                model: "small".into(),
                routed: true,
                preference: Preference::from_quality(0.5).unwrap(),
                policy_version: Some("v1".into()),
                propensity: Some(1.0),
            },
            served_model: "small".into(),
            embedding: vec![0.0; 4],
            quality: None,
            cost_usd: None,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: 0.0,
            outcome: Outcome::Success,
            attempts: 1,
            timestamp_ms: 0,
        }
    }

    /// Values that JSON cannot carry (NaN, infinities) and a preference built off the simplex
    /// without its parser; the HTTP tests cover the rest.
    #[test]
    fn validation_rejects_unrepresentable_values() {
        let config = config();
        let rules = BatchRules {
            config: &config,
            embedding_dim: 4,
            max_events: 10,
        };
        let check = |event: CompletedEvent| {
            EventBatch {
                route: "ns/chat".into(),
                sidecar: "pod".into(),
                events: vec![event],
            }
            .validate(&rules)
        };
        assert_eq!(check(event()), Ok(()));
        let cases: Vec<(CompletedEvent, &str, &str)> = vec![
            (
                CompletedEvent {
                    embedding: vec![0.0, f32::NAN, 0.0, 0.0],
                    ..event()
                },
                "embedding",
                "NaN at position 1",
            ),
            (
                CompletedEvent {
                    cost_usd: Some(f64::INFINITY),
                    ..event()
                },
                "costUsd",
                "inf",
            ),
            (
                CompletedEvent {
                    latency_ms: f64::NAN,
                    ..event()
                },
                "latencyMs",
                "NaN",
            ),
            (
                CompletedEvent {
                    quality: Some(f64::NAN),
                    ..event()
                },
                "quality",
                "NaN",
            ),
            (
                {
                    let mut e = event();
                    e.decision.preference = Preference {
                        quality: 0.9,
                        cost: 0.9,
                    };
                    e
                },
                "decision.preference",
                "quality: 0.9, cost: 0.9",
            ),
        ];
        for (invalid, field, value) in cases {
            let error = check(invalid).unwrap_err();
            assert_eq!(error.index, Some(0), "{field}");
            assert_eq!(error.field, field);
            assert!(error.value.contains(value), "{field}: {}", error.value);
        }
    }

    #[test]
    fn outcome_is_tagged() {
        let json = serde_json::to_string(&Outcome::UpstreamStatus { status: 503 }).unwrap();
        assert_eq!(json, r#"{"kind":"upstreamStatus","status":503}"#);
    }
}
