//! Canary analysis: live figures of the candidate and the stable policy over the requests each
//! decided while the canary ran, the statistical tests that compare them, and the verdict of
//! one canary step.
//!
//! The two arms are independent samples (each request went to one arm at random, by the canary
//! weight), so the tests are two-sample tests:
//!
//! - reward at each request's own preference, `r = w_q · q − w_c · min(c / τ, 1)` (reward
//!   units, in `[−1, 1]`): Welch's test of `H₀: μ_cand − μ_stable ≥ −tolerance` against the
//!   one-sided alternative that the candidate is worse by more than the tolerance, with
//!   `t = (x̄_c − x̄_s + tolerance) / √(s_c²/n_c + s_s²/n_s)`. The steps need at least tens of
//!   events per arm, so the t distribution is replaced by the normal one: `p = Φ(t)`;
//! - error rate (share of requests whose outcome is an error, client cancellations excluded):
//!   a one-sided two-proportion z-test of `H₀: e_cand − e_stable ≤ max increase`, pooled
//!   variance, `z = (ê_c − ê_s − δ) / √(ê(1 − ê)(1/n_c + 1/n_s))`, `p = 1 − Φ(z)`;
//! - mean cost per request in USD: Welch's test of `H₀: μ_cand ≤ (1 + max increase) · μ_stable`
//!   when the route limits it;
//! - p95 latency (milliseconds): the candidate's may be at most `L = (1 + max increase)` times
//!   the stable one's. When its p95 is above `L`, an exact one-sided binomial test of
//!   `H₀: P(latency > L) ≤ 0.05` (a p95 at most `L`) on the candidate's `k` of `n` latencies
//!   above `L` gives `p = P(X ≥ k)`, `X ~ Binomial(n, 0.05)`. A few slow requests of a loaded
//!   machine then move the p95 of a small sample without aborting the step.
//!
//! A step aborts when a test rejects at the route's confidence, advances when the candidate's mean reward is within the tolerance of the
//! stable one, and holds otherwise, for up to [`HOLD_FACTOR`] times the step's minimum events;
//! a step still undecided then aborts as inconclusive.

use llmroute_api::crd::LiveFigures;
use llmroute_api::rollout::RolloutSettings;
use llmroute_api::{CompletedEvent, Outcome};

/// A step holds at most this many times its minimum candidate events before it aborts.
pub const HOLD_FACTOR: u64 = 4;

/// Running sums of one arm of the canary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmSample {
    /// Rewards of requests with feedback.
    pub rewards: Vec<f64>,
    pub qualities: Vec<f64>,
    /// Costs in USD of requests with a known cost.
    pub costs: Vec<f64>,
    /// Requests that count for the error rate (client cancellations excluded).
    pub requests: u64,
    pub errors: u64,
    /// Latencies in milliseconds of successful requests.
    pub latencies_ms: Vec<f64>,
}

impl ArmSample {
    /// Adds one event; `tau` is the cost scale τ in USD per request.
    pub fn add(&mut self, event: &CompletedEvent, tau: f64) {
        match event.outcome {
            Outcome::ClientCancelled => return,
            Outcome::Success => self.latencies_ms.push(event.latency_ms),
            _ => self.errors += 1,
        }
        self.requests += 1;
        if let Some(cost) = event.cost_usd {
            self.costs.push(cost);
        }
        if let (Some(quality), Some(cost), Outcome::Success) =
            (event.quality, event.cost_usd, &event.outcome)
        {
            let w_quality = event.decision.preference.quality;
            // r = w_q · q − w_c · min(c / τ, 1)
            let reward = w_quality * quality - (1.0 - w_quality) * (cost / tau).min(1.0);
            self.rewards.push(reward);
            self.qualities.push(quality);
        }
    }

    /// Requests with feedback, the unit of a step's minimum events.
    pub fn with_feedback(&self) -> u64 {
        self.rewards.len() as u64
    }

    /// Computes the figures this arm shows in status.
    pub fn figures(&self) -> LiveFigures {
        LiveFigures {
            requests: self.requests,
            with_feedback: self.with_feedback(),
            mean_reward: mean(&self.rewards),
            mean_quality: mean(&self.qualities),
            mean_cost_usd: mean(&self.costs),
            error_rate: (self.requests > 0).then(|| self.errors as f64 / self.requests as f64),
            p95_latency_ms: percentile(&self.latencies_ms, 0.95),
        }
    }
}

/// The next action of a canary step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not enough candidate events yet.
    Waiting,
    /// Go to the next step, or promote after the last one.
    Advance,
    /// Keep the weight and collect more events.
    Hold,
    /// Return the weight to zero and reject the candidate.
    Abort,
}

/// The analysis of one canary step, with the figures its message reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StepAnalysis {
    pub verdict: Verdict,
    pub candidate: LiveFigures,
    pub stable: LiveFigures,
    /// One-sided p-value of "the candidate's reward is lower by more than the tolerance".
    pub reward_p: Option<f64>,
    /// One-sided p-value of "the candidate's error rate is higher by more than allowed".
    pub error_p: Option<f64>,
    /// One-sided p-value of "the candidate costs more than allowed".
    pub cost_p: Option<f64>,
    /// One-sided p-value of "the candidate's p95 latency is above the allowed one", computed
    /// only when its sample p95 is above it.
    pub latency_p: Option<f64>,
    /// Reason for the verdict, in one sentence with the numbers.
    pub message: String,
}

/// Analyses canary step `step` (0-based) from the two arms' samples.
pub fn analyse_step(
    step: usize,
    settings: &RolloutSettings,
    candidate: &ArmSample,
    stable: &ArmSample,
) -> StepAnalysis {
    let alpha = 1.0 - settings.confidence;
    let min_events = settings.steps[step].min_events;
    let label = step + 1;
    let candidate_figures = candidate.figures();
    let stable_figures = stable.figures();
    let mut analysis = StepAnalysis {
        verdict: Verdict::Waiting,
        candidate: candidate_figures.clone(),
        stable: stable_figures.clone(),
        reward_p: None,
        error_p: None,
        cost_p: None,
        latency_p: None,
        message: String::new(),
    };
    // The stable arm needs events too. With a weight of 1 it gets none, so such a step has
    // nothing to compare with and advances once the candidate has its minimum events.
    let stable_needed = if settings.steps[step].weight >= 1.0 {
        0
    } else {
        (min_events / 4).max(10)
    };
    if candidate.with_feedback() < min_events || stable.with_feedback() < stable_needed {
        analysis.message = format!(
            "canary step {label} waiting: {} of {min_events} candidate events with feedback, {} stable",
            candidate.with_feedback(),
            stable.with_feedback()
        );
        return analysis;
    }

    let reward_difference = match (
        candidate_figures.mean_reward,
        stable_figures.mean_reward,
        stable.with_feedback() >= 2,
    ) {
        (Some(c), Some(s), true) => Some(c - s),
        _ => None,
    };
    if stable.with_feedback() >= 2 {
        analysis.reward_p = welch_lower_p(
            &candidate.rewards,
            &stable.rewards,
            settings.reward_tolerance,
        );
    }
    if stable.requests > 0 && candidate.requests > 0 {
        analysis.error_p = proportion_higher_p(
            candidate.errors,
            candidate.requests,
            stable.errors,
            stable.requests,
            settings.max_error_rate_increase,
        );
    }
    if let Some(limit) = settings.max_cost_increase
        && stable.costs.len() >= 2
    {
        analysis.cost_p = welch_cost_higher_p(&candidate.costs, &stable.costs, limit);
    }
    let numbers = format!(
        "reward {} vs {}{}",
        fmt(candidate_figures.mean_reward),
        fmt(stable_figures.mean_reward),
        analysis
            .reward_p
            .map(|p| format!(", p = {p:.2}"))
            .unwrap_or_default()
    );

    let latency_ratio = match (
        candidate_figures.p95_latency_ms,
        stable_figures.p95_latency_ms,
    ) {
        (Some(c), Some(s)) if s > 0.0 => Some(c / s),
        _ => None,
    };
    let allowed_ratio = 1.0 + settings.max_latency_increase;
    if let (Some(ratio), Some(stable_p95)) = (latency_ratio, stable_figures.p95_latency_ms)
        && ratio > allowed_ratio
    {
        analysis.latency_p =
            exceedance_p(&candidate.latencies_ms, allowed_ratio * stable_p95, 0.05);
    }
    let abort_reason = if analysis.reward_p.is_some_and(|p| p < alpha) {
        Some(format!("reward is lower: {numbers}"))
    } else if let Some(p) = analysis.error_p.filter(|p| *p < alpha) {
        Some(format!(
            "error rate {} vs {} (p = {p:.3}, {numbers})",
            fmt(candidate_figures.error_rate),
            fmt(stable_figures.error_rate)
        ))
    } else if let (Some(p), Some(ratio)) =
        (analysis.latency_p.filter(|p| *p < alpha), latency_ratio)
    {
        Some(format!(
            "p95 latency {:.0} ms vs {:.0} ms is {:.0} % higher, above the {:.0} % allowed (latency p = {p:.3}, {numbers})",
            candidate_figures.p95_latency_ms.unwrap_or_default(),
            stable_figures.p95_latency_ms.unwrap_or_default(),
            (ratio - 1.0) * 100.0,
            settings.max_latency_increase * 100.0
        ))
    } else {
        analysis.cost_p.filter(|p| *p < alpha).map(|p| {
            format!(
                "cost per request ${:.3e} vs ${:.3e} is above the allowed rise (p = {p:.3}, {numbers})",
                candidate_figures.mean_cost_usd.unwrap_or_default(),
                stable_figures.mean_cost_usd.unwrap_or_default()
            )
        })
    };
    if let Some(reason) = abort_reason {
        analysis.verdict = Verdict::Abort;
        analysis.message = format!("canary step {label} aborted: {reason}");
        return analysis;
    }
    let within_tolerance = reward_difference.is_none_or(|d| d >= -settings.reward_tolerance);
    // A candidate may trail the stable policy by up to the tolerance and still pass, so the
    // message states it.
    let numbers = format!("{numbers}, reward tolerance {}", settings.reward_tolerance);
    if within_tolerance {
        analysis.verdict = Verdict::Advance;
        analysis.message = format!("canary step {label} passed: {numbers}");
    } else if candidate.with_feedback() >= HOLD_FACTOR * min_events {
        analysis.verdict = Verdict::Abort;
        analysis.message = format!(
            "canary step {label} aborted as inconclusive after {} candidate events: {numbers}",
            candidate.with_feedback()
        );
    } else {
        analysis.verdict = Verdict::Hold;
        analysis.message = format!("canary step {label} held: {numbers}");
    }
    analysis
}

fn fmt(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.3}"))
}

/// Arithmetic mean, `None` for no values.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Sample variance with `n − 1` in the denominator.
fn variance(values: &[f64]) -> Option<f64> {
    let m = mean(values)?;
    (values.len() >= 2)
        .then(|| values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (values.len() - 1) as f64)
}

/// Nearest-rank percentile `q` in `(0, 1]`, `None` for no values.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// One-sided p-value of "more than `share` of `samples` are above `limit`": the binomial tail
/// `P(X ≥ k)` with `X ~ Binomial(n, share)`, `n` the samples and `k` those above `limit`.
/// Summed in log space, because `(1 − share)ⁿ` underflows for tens of thousands of samples.
pub fn exceedance_p(samples: &[f64], limit: f64, share: f64) -> Option<f64> {
    let n = samples.len();
    if n == 0 || !(0.0..1.0).contains(&share) || share == 0.0 {
        return None;
    }
    let k = samples.iter().filter(|&&x| x > limit).count();
    // ln P(X = i), from ln P(X = 0) = n ln(1 − share) by P(X = i + 1) / P(X = i) =
    // (n − i) / (i + 1) · share / (1 − share).
    let odds = (share / (1.0 - share)).ln();
    let mut log_term = n as f64 * (1.0 - share).ln();
    let mut tail = Vec::with_capacity(n + 1 - k);
    for i in 0..=n {
        if i >= k {
            tail.push(log_term);
        }
        if i < n {
            log_term += ((n - i) as f64 / (i + 1) as f64).ln() + odds;
        }
    }
    let largest = tail.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = tail.iter().map(|t| (t - largest).exp()).sum();
    Some((largest + sum.ln()).exp().min(1.0))
}

/// Standard normal CDF `Φ(x)`, from the complementary error function.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Complementary error function, by the Chebyshev fit of Numerical Recipes (`erfcc`), with
/// a relative error below 1.2e-7 everywhere.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let result = t * poly.exp();
    if x >= 0.0 { result } else { 2.0 - result }
}

/// p-value of "the candidate's mean is lower than the stable mean minus `tolerance`":
/// `t = (x̄_c − x̄_s + tolerance) / √(s_c²/n_c + s_s²/n_s)`, `p = Φ(t)`.
fn welch_lower_p(candidate: &[f64], stable: &[f64], tolerance: f64) -> Option<f64> {
    let (mc, ms) = (mean(candidate)?, mean(stable)?);
    let (vc, vs) = (variance(candidate)?, variance(stable)?);
    let se = (vc / candidate.len() as f64 + vs / stable.len() as f64).sqrt();
    let shift = mc - ms + tolerance;
    if se == 0.0 {
        return Some(if shift < 0.0 { 0.0 } else { 1.0 });
    }
    Some(normal_cdf(shift / se))
}

/// p-value of "the candidate's mean cost is above `(1 + limit)` times the stable one".
fn welch_cost_higher_p(candidate: &[f64], stable: &[f64], limit: f64) -> Option<f64> {
    let (mc, ms) = (mean(candidate)?, mean(stable)?);
    let (vc, vs) = (variance(candidate)?, variance(stable)?);
    let factor = 1.0 + limit;
    let se = (vc / candidate.len() as f64 + factor * factor * vs / stable.len() as f64).sqrt();
    let excess = mc - factor * ms;
    if se == 0.0 {
        return Some(if excess > 0.0 { 0.0 } else { 1.0 });
    }
    Some(1.0 - normal_cdf(excess / se))
}

/// p-value of "the candidate's error rate exceeds the stable one by more than `delta`", by
/// the pooled two-proportion z-test.
fn proportion_higher_p(
    candidate_errors: u64,
    candidate_n: u64,
    stable_errors: u64,
    stable_n: u64,
    delta: f64,
) -> Option<f64> {
    if candidate_n == 0 || stable_n == 0 {
        return None;
    }
    let (nc, ns) = (candidate_n as f64, stable_n as f64);
    let (pc, ps) = (candidate_errors as f64 / nc, stable_errors as f64 / ns);
    let pooled = (candidate_errors + stable_errors) as f64 / (nc + ns);
    let se = (pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / ns)).sqrt();
    let excess = pc - ps - delta;
    if se == 0.0 {
        return Some(if excess > 0.0 { 0.0 } else { 1.0 });
    }
    Some(1.0 - normal_cdf(excess / se))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmroute_api::rollout::{CanaryStep, RolloutSpec};
    use llmroute_api::{DecisionRecord, Preference};

    fn event(quality: f64, cost: f64, outcome: Outcome, latency_ms: f64) -> CompletedEvent {
        CompletedEvent {
            decision: DecisionRecord {
                decision_id: "0".repeat(32),
                route: "r".into(),
                config_version: 1,
                model: "a".into(),
                routed: true,
                preference: Preference {
                    quality: 1.0,
                    cost: 0.0,
                },
                policy_version: Some("v1".into()),
                propensity: Some(1.0),
            },
            served_model: "a".into(),
            embedding: vec![],
            quality: Some(quality),
            cost_usd: Some(cost),
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms,
            outcome,
            attempts: 1,
            timestamp_ms: 0,
        }
    }

    fn arm(qualities: impl Iterator<Item = f64>, latency: f64) -> ArmSample {
        let mut sample = ArmSample::default();
        for q in qualities {
            sample.add(&event(q, 0.001, Outcome::Success, latency), 0.01);
        }
        sample
    }

    fn settings() -> RolloutSettings {
        RolloutSpec::settings(Some(&RolloutSpec {
            steps: Some(vec![CanaryStep {
                weight: 0.5,
                min_events: 100,
            }]),
            ..RolloutSpec::default()
        }))
    }

    #[test]
    fn normal_cdf_matches_tables() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-1.644_854) - 0.05).abs() < 1e-6);
    }

    #[test]
    fn p_values_match_hand_values() {
        let close = |actual: Option<f64>, expected: f64| {
            actual.is_some_and(|p| (p - expected).abs() < 1e-6)
        };

        // Rewards: means 0.3 and 0.6, variances 0.02, tolerance 0.1. The standard error is
        // √(0.02/2 + 0.02/2) = 0.141421, t = (0.3 − 0.6 + 0.1) / 0.141421 = −1.414214 and
        // p = Φ(−1.414214) = 0.078650.
        let reward_p = welch_lower_p(&[0.2, 0.4], &[0.5, 0.7], 0.1);
        assert!(close(reward_p, 0.078_649_6), "{reward_p:?}");

        // Errors: 10 of 100 against 2 of 100, allowed rise 0.02. The pooled rate is 0.06, the
        // standard error √(0.06 · 0.94 · 0.02) = 0.033586, z = (0.1 − 0.02 − 0.02) / 0.033586
        // = 1.786474 and p = 1 − Φ(1.786474) = 0.037011.
        let error_p = proportion_higher_p(10, 100, 2, 100, 0.02);
        assert!(close(error_p, 0.037_011_3), "{error_p:?}");

        // Costs: means 3 and 2, variances 2, allowed rise 0.25. The standard error is
        // √(2/2 + 1.25² · 2/2) = 1.600781, z = (3 − 1.25 · 2) / 1.600781 = 0.312348 and
        // p = 1 − Φ(0.312348) = 0.377388.
        let cost_p = welch_cost_higher_p(&[2.0, 4.0], &[1.0, 3.0], 0.25);
        assert!(close(cost_p, 0.377_388_2), "{cost_p:?}");
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.95), Some(95.0));
        assert_eq!(percentile(&[3.0], 0.95), Some(3.0));
        assert_eq!(percentile(&[], 0.95), None);
    }

    #[test]
    fn waits_for_minimum_events() {
        let candidate = arm((0..50).map(|i| (i % 10) as f64 / 10.0), 10.0);
        let stable = arm((0..300).map(|i| (i % 10) as f64 / 10.0), 10.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.verdict, Verdict::Waiting);
        assert!(
            analysis.message.contains("50 of 100"),
            "{}",
            analysis.message
        );
    }

    #[test]
    fn equal_arms_advance() {
        let candidate = arm((0..200).map(|i| (i % 10) as f64 / 10.0), 10.0);
        let stable = arm((0..200).map(|i| ((i + 3) % 10) as f64 / 10.0), 10.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.verdict, Verdict::Advance, "{}", analysis.message);
        assert!(analysis.message.starts_with("canary step 1 passed: reward"));
        let tolerance = format!("reward tolerance {}", settings().reward_tolerance);
        assert!(
            analysis.message.ends_with(&tolerance),
            "{}",
            analysis.message
        );
    }

    #[test]
    fn clearly_worse_reward_aborts() {
        let candidate = arm((0..200).map(|i| (i % 5) as f64 / 10.0), 10.0);
        let stable = arm((0..200).map(|i| 0.5 + (i % 5) as f64 / 10.0), 10.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.verdict, Verdict::Abort, "{}", analysis.message);
        assert!(analysis.reward_p.unwrap() < 0.05);
        assert!(analysis.message.contains("reward is lower"));
    }

    #[test]
    fn slightly_worse_reward_holds_then_aborts() {
        // A difference of 0.02 with a spread of about 0.29: not significant at n = 100.
        let candidate = arm((0..100).map(|i| (i % 10) as f64 / 10.0), 10.0);
        let stable = arm((0..100).map(|i| 0.02 + (i % 10) as f64 / 10.0), 10.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.verdict, Verdict::Hold, "{}", analysis.message);
        assert!(
            analysis
                .message
                .starts_with("canary step 1 held: reward 0.450 vs 0.470, p = ")
        );
        // The same means over four times the events: the test now rejects, or the hold runs
        // out; either way the step aborts.
        let candidate = arm((0..400).map(|i| (i % 10) as f64 / 10.0), 10.0);
        let stable = arm((0..400).map(|i| 0.02 + (i % 10) as f64 / 10.0), 10.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.verdict, Verdict::Abort, "{}", analysis.message);
    }

    #[test]
    fn errors_and_latency_abort() {
        let mut candidate = arm((0..200).map(|i| (i % 10) as f64 / 10.0), 10.0);
        for _ in 0..40 {
            candidate.add(
                &event(0.0, 0.0, Outcome::UpstreamStatus { status: 503 }, 5.0),
                0.01,
            );
        }
        let stable = arm((0..200).map(|i| (i % 10) as f64 / 10.0), 10.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.verdict, Verdict::Abort, "{}", analysis.message);
        assert!(analysis.message.contains("error rate 0.167 vs 0.000"));

        let slow = arm((0..200).map(|i| (i % 10) as f64 / 10.0), 20.0);
        let analysis = analyse_step(0, &settings(), &slow, &stable);
        assert_eq!(analysis.verdict, Verdict::Abort, "{}", analysis.message);
        assert!(
            analysis
                .message
                .contains("p95 latency 20 ms vs 10 ms is 100 % higher"),
            "{}",
            analysis.message
        );
    }

    #[test]
    fn few_slow_requests_do_not_abort() {
        // Stable: 1 to 200 ms, p95 190 ms, so at most 237.5 ms is allowed. Candidate: 140
        // requests of 100 ms and 10 of 300 ms, a p95 of 300 ms from 6.7 % of its requests
        // (p = 0.219).
        let mut stable = arm((0..200).map(|i| (i % 10) as f64 / 10.0), 10.0);
        stable.latencies_ms = (1..=200).map(f64::from).collect();
        let mut candidate = arm((0..150).map(|i| (i % 10) as f64 / 10.0), 100.0);
        candidate.latencies_ms[..10].fill(300.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.candidate.p95_latency_ms, Some(300.0));
        let p = analysis.latency_p.unwrap();
        assert!(p > 0.05, "{p}");
        assert_eq!(analysis.verdict, Verdict::Advance, "{}", analysis.message);

        // Thirty slow requests (20 %) are no accident.
        candidate.latencies_ms[..30].fill(300.0);
        let analysis = analyse_step(0, &settings(), &candidate, &stable);
        assert_eq!(analysis.verdict, Verdict::Abort, "{}", analysis.message);
        assert!(
            analysis.message.contains("latency p = 0.000"),
            "{}",
            analysis.message
        );
    }

    #[test]
    fn exceedance_p_matches_binomial_tail() {
        // P(X ≥ 1) for X ~ Binomial(2, 0.05) = 1 − 0.95² = 0.0975.
        let p = exceedance_p(&[1.0, 5.0], 2.0, 0.05).unwrap();
        assert!((p - 0.0975).abs() < 1e-12, "{p}");
        // P(X ≥ 2) = 0.05² = 0.0025, and nothing above the limit gives p = 1.
        let p = exceedance_p(&[5.0, 5.0], 2.0, 0.05).unwrap();
        assert!((p - 0.0025).abs() < 1e-12, "{p}");
        assert_eq!(exceedance_p(&[1.0, 1.0], 2.0, 0.05), Some(1.0));
        // 10 of 150 at 5 %: 0.219116 (the tail summed with log-gamma terms in Python).
        let mut samples = vec![1.0; 150];
        samples[..10].fill(5.0);
        let p = exceedance_p(&samples, 2.0, 0.05).unwrap();
        assert!((p - 0.219_116_454).abs() < 1e-8, "{p}");
        // 2,500 of 50,000: 0.502865. (1 − 0.05)ⁿ underflows, the log-space sum does not.
        let mut many = vec![1.0; 50_000];
        many[..2_500].fill(5.0);
        let p = exceedance_p(&many, 2.0, 0.05).unwrap();
        assert!((p - 0.502_865_141).abs() < 1e-6, "{p}");
        assert_eq!(exceedance_p(&[], 2.0, 0.05), None);
    }

    #[test]
    fn cancellations_do_not_count() {
        let mut sample = ArmSample::default();
        sample.add(&event(1.0, 0.0, Outcome::ClientCancelled, 1.0), 0.01);
        assert_eq!(sample.requests, 0);
        assert_eq!(sample.figures().error_rate, None);
    }
}
