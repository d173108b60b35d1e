//! The learning loop's part of an `LLMRoute`: when to retrain, how a candidate is gated by
//! off-policy evaluation, how it is rolled out as a canary, how long events are kept, and the
//! figures the control plane reports for each policy version.
//!
//! Every field is optional in the resource; the `*_or_default` accessors give the values the
//! control plane uses, so that the defaults live in one place.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::Exploration;
use crate::crd::SpecError;

/// When and how the control plane trains a candidate policy from the route's events.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingSpec {
    /// Turns training off when false (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Seconds between training runs (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 604800))]
    pub interval_seconds: Option<u64>,
    /// Events with feedback that must arrive after the last run before the next one (default
    /// 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 20, max = 10000000))]
    pub min_new_events: Option<u64>,
    /// Most recent events one run uses, at most (default 100000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 20, max = 1000000))]
    pub max_events: Option<u64>,
    /// Share of those events, the most recent ones, held out of training for the off-policy
    /// gate (default 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.05, max = 0.8))]
    pub holdout_fraction: Option<f64>,
    /// Gradient steps of one run (default 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub steps: Option<u32>,
    /// Seed of the run's random choices; the same events and seed give the same policy
    /// (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The off-policy gate a candidate must pass before it serves any request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateSpec>,
}

/// The off-policy gate: the doubly robust estimate of `candidate − stable` reward on held-out
/// events must have its lower confidence bound above `−tolerance`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateSpec {
    /// How much worse than the stable policy, in reward units, a candidate may be estimated
    /// (default 0: it must be better with the stated confidence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: Option<f64>,
    /// Confidence of the interval (default 0.95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.5, max = 0.999))]
    pub confidence: Option<f64>,
    /// Smallest effective sample size of the candidate's importance weights on the held-out
    /// events for the gate to trust its estimate (default 0: no minimum). It is Kish's
    /// `(Σρ)² / Σρ²` with `ρ = π_candidate / π_logged`, so it roughly counts the events on
    /// which the candidate chooses as the logged decisions did. Below it the candidate fails,
    /// because its estimate would rest on the reward model alone. Set it when the route logs
    /// with `greedy` exploration and the tolerance is above 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub min_effective_sample_size: Option<f64>,
    /// Cap on the importance weights `ρ = π_candidate / π_logged` of the off-policy estimates;
    /// a weight above it counts as the cap. Default: `K / epsilon` for `epsilonGreedy`
    /// exploration over K models, the largest weight a correctly logged event can have, and
    /// 100 otherwise. It keeps one event logged with a tiny propensity from deciding the gate,
    /// at the price of a downward bias for a candidate that often picks what was rarely logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 1000000.0))]
    pub max_importance_weight: Option<f64>,
}

/// The rollout of a candidate that passed the gate.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// Canary steps in order; the candidate is promoted after the last one (default: 10 % for
    /// 200 events, then 50 % for 500 events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 10))]
    pub steps: Option<Vec<CanaryStep>>,
    /// Confidence of the canary's statistical tests (default 0.95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.5, max = 0.999))]
    pub confidence: Option<f64>,
    /// How much lower, in reward units, the candidate's mean reward may be before a step holds
    /// or aborts (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub reward_tolerance: Option<f64>,
    /// Largest tolerated rise of the error rate, as a share of requests (default 0.02).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate_increase: Option<f64>,
    /// Largest tolerated rise of p95 latency, as a share of the stable policy's (default 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub max_latency_increase: Option<f64>,
    /// Largest tolerated rise of the mean cost per request, as a share of the stable policy's;
    /// no limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub max_cost_increase: Option<f64>,
    /// Promotes after the last step on its own (default true); when false the candidate waits
    /// at the last step until `spec.policy.version` names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote: Option<bool>,
    /// Policy versions of phase `Retired` or `Rejected` kept per route, those that ended last
    /// (default 10), as Argo Rollouts' `revisionHistoryLimit`. Older ones are deleted with
    /// their files. The stable, canary, candidate and pinned versions are always kept. At least
    /// 1, so that the version replaced last stays available to pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub revision_history_limit: Option<u32>,
}

/// Default of [`RolloutSpec::revision_history_limit`], the default of Argo Rollouts.
pub const DEFAULT_REVISION_HISTORY_LIMIT: u32 = 10;

/// One canary step: the candidate's share of routed requests and the candidate events the
/// step needs before it is analysed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryStep {
    /// Share of routed requests decided by the candidate, in (0, 1].
    #[schemars(range(min = 0.001, max = 1.0))]
    pub weight: f64,
    /// Candidate events with feedback needed before the step is analysed.
    #[schemars(range(min = 10, max = 10000000))]
    pub min_events: u64,
}

/// How long the route's events are kept.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionSpec {
    /// Events older than this many days are deleted (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub max_age_days: Option<u32>,
    /// At most this many events are kept, oldest deleted first (default 1000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000, max = 100000000))]
    pub max_events: Option<u64>,
}

/// Default of [`GateSpec::min_effective_sample_size`]: no minimum. Under ε-greedy logging the
/// interval of the doubly robust estimate already widens with the importance weights. In a
/// quickstart run, a candidate with an effective size of 23.8 on 191 events passed the gate and
/// its canary.
pub const DEFAULT_MIN_EFFECTIVE_SAMPLE_SIZE: f64 = 0.0;

/// Default of [`GateSpec::max_importance_weight`] for routes that do not log with ε-greedy
/// exploration: the weight of a decision logged with probability 1 % that the candidate always
/// takes. Under `greedy` exploration every correct propensity is 1 and no weight exceeds 1.
pub const DEFAULT_MAX_IMPORTANCE_WEIGHT: f64 = 100.0;

/// Returns the gate's cap on importance weights: the route's `maxImportanceWeight`, else `K / ε`
/// under ε-greedy exploration with `ε > 0` over `num_models` models, else
/// [`DEFAULT_MAX_IMPORTANCE_WEIGHT`]. A correct propensity is at least `ε / K`, so `K / ε` clips
/// no correctly logged event.
pub fn max_importance_weight(
    configured: Option<f64>,
    exploration: Exploration,
    num_models: usize,
) -> f64 {
    configured.unwrap_or(match exploration {
        Exploration::EpsilonGreedy { epsilon } if epsilon > 0.0 => {
            (num_models as f64 / epsilon).max(1.0)
        }
        _ => DEFAULT_MAX_IMPORTANCE_WEIGHT,
    })
}

/// Training settings with every default filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingSettings {
    pub enabled: bool,
    pub interval_seconds: u64,
    pub min_new_events: u64,
    pub max_events: u64,
    pub holdout_fraction: f64,
    pub steps: u32,
    pub seed: u64,
    pub gate_tolerance: f64,
    pub gate_confidence: f64,
    pub gate_min_effective_sample_size: f64,
    /// The route's cap, if set; [`max_importance_weight`] fills in the default, which depends on
    /// the exploration rule and the model pool.
    pub gate_max_importance_weight: Option<f64>,
}

/// Rollout settings with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSettings {
    pub steps: Vec<CanaryStep>,
    pub confidence: f64,
    pub reward_tolerance: f64,
    pub max_error_rate_increase: f64,
    pub max_latency_increase: f64,
    pub max_cost_increase: Option<f64>,
    pub auto_promote: bool,
    pub revision_history_limit: u32,
}

/// Retention settings with every default filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetentionSettings {
    pub max_age_days: u32,
    pub max_events: u64,
}

impl TrainingSpec {
    /// Returns the settings with defaults filled in.
    pub fn settings(spec: Option<&Self>) -> TrainingSettings {
        let default = Self::default();
        let spec = spec.unwrap_or(&default);
        let gate = spec.gate.clone().unwrap_or_default();
        TrainingSettings {
            enabled: spec.enabled.unwrap_or(true),
            interval_seconds: spec.interval_seconds.unwrap_or(3600),
            min_new_events: spec.min_new_events.unwrap_or(1000),
            max_events: spec.max_events.unwrap_or(100_000),
            holdout_fraction: spec.holdout_fraction.unwrap_or(0.3),
            steps: spec.steps.unwrap_or(1500),
            seed: spec.seed.unwrap_or(7),
            gate_tolerance: gate.tolerance.unwrap_or(0.0),
            gate_confidence: gate.confidence.unwrap_or(0.95),
            gate_min_effective_sample_size: gate
                .min_effective_sample_size
                .unwrap_or(DEFAULT_MIN_EFFECTIVE_SAMPLE_SIZE),
            gate_max_importance_weight: gate.max_importance_weight,
        }
    }
}

impl RolloutSpec {
    /// Returns the settings with defaults filled in.
    pub fn settings(spec: Option<&Self>) -> RolloutSettings {
        let default = Self::default();
        let spec = spec.unwrap_or(&default);
        RolloutSettings {
            steps: spec.steps.clone().unwrap_or_else(|| {
                vec![
                    CanaryStep {
                        weight: 0.1,
                        min_events: 200,
                    },
                    CanaryStep {
                        weight: 0.5,
                        min_events: 500,
                    },
                ]
            }),
            confidence: spec.confidence.unwrap_or(0.95),
            reward_tolerance: spec.reward_tolerance.unwrap_or(0.01),
            max_error_rate_increase: spec.max_error_rate_increase.unwrap_or(0.02),
            max_latency_increase: spec.max_latency_increase.unwrap_or(0.25),
            max_cost_increase: spec.max_cost_increase,
            auto_promote: spec.auto_promote.unwrap_or(true),
            revision_history_limit: spec
                .revision_history_limit
                .unwrap_or(DEFAULT_REVISION_HISTORY_LIMIT),
        }
    }
}

impl RetentionSpec {
    /// Returns the settings with defaults filled in.
    pub fn settings(spec: Option<&Self>) -> RetentionSettings {
        RetentionSettings {
            max_age_days: spec.and_then(|s| s.max_age_days).unwrap_or(30),
            max_events: spec.and_then(|s| s.max_events).unwrap_or(1_000_000),
        }
    }
}

fn range_check<T: PartialOrd + std::fmt::Display + Copy>(
    errors: &mut Vec<SpecError>,
    field: &str,
    value: Option<T>,
    low: T,
    high: T,
    unit: &str,
) {
    if let Some(value) = value
        && !(value >= low && value <= high)
    {
        errors.push(SpecError {
            field: field.to_string(),
            message: format!("{value} is outside [{low}, {high}]{unit}"),
        });
    }
}

/// Checks the learning loop's fields of a route spec, as the schema states them.
pub fn check(
    training: Option<&TrainingSpec>,
    rollout: Option<&RolloutSpec>,
    retention: Option<&RetentionSpec>,
    errors: &mut Vec<SpecError>,
) {
    if let Some(t) = training {
        let at = |f: &str| format!("spec.training.{f}");
        range_check(
            errors,
            &at("intervalSeconds"),
            t.interval_seconds,
            5,
            604_800,
            " seconds",
        );
        range_check(
            errors,
            &at("minNewEvents"),
            t.min_new_events,
            20,
            10_000_000,
            " events",
        );
        range_check(
            errors,
            &at("maxEvents"),
            t.max_events,
            20,
            1_000_000,
            " events",
        );
        range_check(
            errors,
            &at("holdoutFraction"),
            t.holdout_fraction,
            0.05,
            0.8,
            "",
        );
        range_check(errors, &at("steps"), t.steps, 1, 100_000, " steps");
        if let Some(gate) = &t.gate {
            range_check(errors, &at("gate.tolerance"), gate.tolerance, 0.0, 1.0, "");
            range_check(
                errors,
                &at("gate.confidence"),
                gate.confidence,
                0.5,
                0.999,
                "",
            );
            range_check(
                errors,
                &at("gate.minEffectiveSampleSize"),
                gate.min_effective_sample_size,
                0.0,
                1_000_000.0,
                " events",
            );
            range_check(
                errors,
                &at("gate.maxImportanceWeight"),
                gate.max_importance_weight,
                1.0,
                1_000_000.0,
                "",
            );
        }
    }
    if let Some(r) = rollout {
        let at = |f: &str| format!("spec.rollout.{f}");
        if let Some(steps) = &r.steps {
            if steps.is_empty() || steps.len() > 10 {
                errors.push(SpecError {
                    field: at("steps"),
                    message: format!(
                        "has {} steps; list 1 to 10, such as [{{weight: 0.1, minEvents: 200}}]",
                        steps.len()
                    ),
                });
            }
            for (index, step) in steps.iter().enumerate() {
                range_check(
                    errors,
                    &at(&format!("steps[{index}].weight")),
                    Some(step.weight),
                    0.001,
                    1.0,
                    "",
                );
                range_check(
                    errors,
                    &at(&format!("steps[{index}].minEvents")),
                    Some(step.min_events),
                    10,
                    10_000_000,
                    " events",
                );
            }
        }
        range_check(errors, &at("confidence"), r.confidence, 0.5, 0.999, "");
        range_check(
            errors,
            &at("rewardTolerance"),
            r.reward_tolerance,
            0.0,
            1.0,
            "",
        );
        range_check(
            errors,
            &at("maxErrorRateIncrease"),
            r.max_error_rate_increase,
            0.0,
            1.0,
            "",
        );
        range_check(
            errors,
            &at("maxLatencyIncrease"),
            r.max_latency_increase,
            0.0,
            10.0,
            "",
        );
        range_check(
            errors,
            &at("maxCostIncrease"),
            r.max_cost_increase,
            0.0,
            100.0,
            "",
        );
        range_check(
            errors,
            &at("revisionHistoryLimit"),
            r.revision_history_limit,
            1,
            1000,
            " versions",
        );
    }
    if let Some(r) = retention {
        range_check(
            errors,
            "spec.retention.maxAgeDays",
            r.max_age_days,
            1,
            3650,
            " days",
        );
        range_check(
            errors,
            "spec.retention.maxEvents",
            r.max_events,
            1000,
            100_000_000,
            " events",
        );
    }
}

/// One off-policy estimate with its confidence interval, in reward units.
///
/// JSON has no NaN or infinity, so a value the estimator leaves undefined or unbounded is
/// absent rather than written as `null`, which would make the record unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EstimateFigures {
    /// Estimated reward, absent when it is undefined. Only self-normalised IPS can be, when no
    /// held-out logged action has a positive probability under the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Lower end of the interval, absent when it is unbounded, as with one held-out event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_low: Option<f64>,
    /// Upper end of the interval, absent when it is unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_high: Option<f64>,
}

/// Formats as `+0.012 [-0.003,+0.027]`, with `n/a` for an undefined mean and `-inf` or `+inf`
/// for an unbounded end.
impl std::fmt::Display for EstimateFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = |value: Option<f64>, unbounded: &str| {
            value.map_or_else(|| unbounded.to_string(), |v| format!("{v:+.3}"))
        };
        write!(
            f,
            "{} [{},{}]",
            value(self.mean, "n/a"),
            value(self.ci_low, "-inf"),
            value(self.ci_high, "+inf")
        )
    }
}

/// The off-policy gate's figures for one candidate, against its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateFigures {
    /// Held-out events the estimates come from.
    pub events: u64,
    /// `w_quality` values the events were re-scored at.
    pub preferences: Vec<f64>,
    /// Confidence of the intervals.
    pub confidence: f64,
    /// Inverse propensity scoring estimate of the candidate's reward.
    pub candidate_ips: EstimateFigures,
    /// Self-normalised IPS estimate of the candidate's reward.
    pub candidate_snips: EstimateFigures,
    /// Doubly robust estimate of the candidate's reward.
    pub candidate_dr: EstimateFigures,
    /// Doubly robust estimate of the parent's reward.
    pub stable_dr: EstimateFigures,
    /// Doubly robust estimate of `candidate − parent`, paired on the same events.
    pub difference_dr: EstimateFigures,
    /// `(Σρ)² / Σρ²` of the candidate's importance weights.
    pub effective_sample_size: f64,
    /// Whether the candidate passed.
    pub passed: bool,
}

/// Live figures of one policy version over the events it decided during the last canary step
/// it took part in, as a candidate or as the stable arm. They are not totals over its life.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LiveFigures {
    /// Routed requests the version decided in that canary step.
    pub requests: u64,
    /// Of those, requests with quality feedback.
    pub with_feedback: u64,
    /// Mean reward at each request's own preference, over requests with feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_reward: Option<f64>,
    /// Mean quality over requests with feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_quality: Option<f64>,
    /// Mean cost per request in USD, over requests with a known cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_cost_usd: Option<f64>,
    /// Share of requests that ended in an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// 95th percentile of latency in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_latency_ms: Option<f64>,
}

/// The data and figures of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingData {
    /// Events used for training (the rest of the window was held out).
    pub training_events: u64,
    /// Events held out for the off-policy gate.
    pub holdout_events: u64,
    /// Store ids of the first and last event of the window.
    pub first_event_id: i64,
    pub last_event_id: i64,
    /// Unix times of the first and last event of the window, in milliseconds.
    pub first_event_ms: u64,
    pub last_event_ms: u64,
    /// Seed and gradient steps of the run.
    pub seed: u64,
    pub steps: u32,
    /// Cost scale τ of the rewards, in USD per request.
    pub cost_scale_usd: f64,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_absent_fields() {
        let training = TrainingSpec::settings(None);
        assert!(training.enabled);
        assert_eq!(training.min_new_events, 1000);
        let rollout = RolloutSpec::settings(Some(&RolloutSpec {
            reward_tolerance: Some(0.05),
            ..RolloutSpec::default()
        }));
        assert_eq!(rollout.reward_tolerance, 0.05);
        assert_eq!(rollout.steps.len(), 2);
        assert_eq!(rollout.revision_history_limit, 10);
        assert_eq!(RetentionSpec::settings(None).max_age_days, 30);
        assert_eq!(training.gate_min_effective_sample_size, 0.0);
    }

    #[test]
    fn check_rejects_negative_effective_sample_size() {
        let mut errors = Vec::new();
        let training = TrainingSpec {
            gate: Some(GateSpec {
                min_effective_sample_size: Some(-1.0),
                ..GateSpec::default()
            }),
            ..TrainingSpec::default()
        };
        check(Some(&training), None, None, &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.training.gate.minEffectiveSampleSize");
        assert!(errors[0].message.contains("-1 is outside [0, 1000000]"));
    }

    #[test]
    fn check_rejects_importance_weight_cap_below_one() {
        let mut errors = Vec::new();
        let training = TrainingSpec {
            gate: Some(GateSpec {
                max_importance_weight: Some(0.5),
                ..GateSpec::default()
            }),
            ..TrainingSpec::default()
        };
        check(Some(&training), None, None, &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.training.gate.maxImportanceWeight");
        assert!(errors[0].message.contains("0.5 is outside [1, 1000000]"));
    }

    #[test]
    fn importance_weight_cap_follows_exploration() {
        let epsilon = |epsilon| Exploration::EpsilonGreedy { epsilon };
        // ε-greedy over 4 models at ε = 0.1: the smallest correct propensity is 0.025.
        assert_eq!(max_importance_weight(None, epsilon(0.1), 4), 40.0);
        assert_eq!(max_importance_weight(None, epsilon(1.0), 4), 4.0);
        assert_eq!(max_importance_weight(None, epsilon(0.0), 4), 100.0);
        assert_eq!(max_importance_weight(None, Exploration::Greedy, 4), 100.0);
        assert_eq!(max_importance_weight(None, Exploration::Sample, 4), 100.0);
        assert_eq!(max_importance_weight(Some(7.0), epsilon(0.1), 4), 7.0);
        assert_eq!(
            TrainingSpec::settings(None).gate_max_importance_weight,
            None
        );
    }

    #[test]
    fn check_names_field_and_value() {
        let mut errors = Vec::new();
        let rollout = RolloutSpec {
            steps: Some(vec![CanaryStep {
                weight: 1.5,
                min_events: 100,
            }]),
            ..RolloutSpec::default()
        };
        let training = TrainingSpec {
            holdout_fraction: Some(0.95),
            ..TrainingSpec::default()
        };
        check(Some(&training), Some(&rollout), None, &mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].field, "spec.training.holdoutFraction");
        assert!(errors[0].message.contains("0.95"));
        assert_eq!(errors[1].field, "spec.rollout.steps[0].weight");
        assert!(errors[1].message.contains("1.5"));
    }

    #[test]
    fn check_refuses_a_history_limit_of_zero() {
        let mut errors = Vec::new();
        let rollout = RolloutSpec {
            revision_history_limit: Some(0),
            ..RolloutSpec::default()
        };
        check(None, Some(&rollout), None, &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.rollout.revisionHistoryLimit");
        assert!(
            errors[0]
                .message
                .contains("0 is outside [1, 1000] versions")
        );
    }

    #[test]
    fn estimate_figures_omit_absent_values() {
        let bounded = EstimateFigures {
            mean: Some(0.012),
            ci_low: Some(-0.003),
            ci_high: Some(0.027),
        };
        assert_eq!(bounded.to_string(), "+0.012 [-0.003,+0.027]");
        let json = serde_json::to_string(&bounded).unwrap();
        assert_eq!(json, r#"{"mean":0.012,"ciLow":-0.003,"ciHigh":0.027}"#);

        let undefined = EstimateFigures {
            mean: None,
            ci_low: None,
            ci_high: None,
        };
        assert_eq!(undefined.to_string(), "n/a [-inf,+inf]");
        let json = serde_json::to_string(&undefined).unwrap();
        assert_eq!(json, "{}");
        let read: EstimateFigures = serde_json::from_str(&json).unwrap();
        assert_eq!(read, undefined);
    }
}
