//! Status conditions as Kubernetes users read them: one per aspect, a CamelCase reason, a
//! message that says what to do, and a transition time that changes only with the status.

use llmroute_api::crd::{Condition, ConditionStatus};

/// The route serves sidecars a valid configuration for its current spec.
pub const READY: &str = "Ready";
/// The route has a usable stable policy.
pub const POLICY_READY: &str = "PolicyReady";
/// A new policy version is being rolled out.
pub const PROGRESSING: &str = "Progressing";
/// Sidecars serve an older configuration than the spec asks for, or a rollout was aborted.
pub const DEGRADED: &str = "Degraded";

/// Current time in RFC 3339, as `metav1.Time` writes it.
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .expect("rounding a timestamp to seconds cannot overflow")
        .to_string()
}

/// Sets condition `type_` in `conditions`, keeping its transition time when its status does not
/// change.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(condition) => {
            if condition.status != status {
                condition.last_transition_time = now();
            }
            condition.status = status;
            condition.reason = reason.to_string();
            condition.message = message;
            condition.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: now(),
            observed_generation: generation,
        }),
    }
}

/// Returns condition `type_`.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_changes_only_with_status() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            READY,
            ConditionStatus::False,
            "SecretNotFound",
            "a",
            Some(1),
        );
        conditions[0].last_transition_time = "2020-01-01T00:00:00Z".into();
        set(
            &mut conditions,
            READY,
            ConditionStatus::False,
            "InvalidSpec",
            "b",
            Some(2),
        );
        assert_eq!(conditions[0].last_transition_time, "2020-01-01T00:00:00Z");
        assert_eq!(conditions[0].reason, "InvalidSpec");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set(
            &mut conditions,
            READY,
            ConditionStatus::True,
            "Serving",
            "c",
            Some(2),
        );
        assert_ne!(conditions[0].last_transition_time, "2020-01-01T00:00:00Z");
        assert_eq!(conditions.len(), 1);
        assert_eq!(get(&conditions, READY).unwrap().message, "c");
    }
}
