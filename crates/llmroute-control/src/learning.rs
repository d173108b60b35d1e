//! The learning loop of one route: train a candidate from the route's events on schedule, gate
//! it by off-policy evaluation against the stable policy, roll it out in canary steps, and
//! promote or abort it on live figures.
//!
//! The steps are functions of the store and the route's spec, so that `llmroute standalone`
//! ([`LearningLoop`]) and the operator run the same logic:
//!
//! 1. [`train_candidate`]: the most recent events with feedback (at most
//!    `spec.training.maxEvents`) are split by time into a training part and a held-out part
//!    (`holdoutFraction`, the most recent). The candidate starts from the stable policy's
//!    weights and is trained by importance-weighted REINFORCE with clipped weights, each event
//!    re-scored under sampled preferences (`llmroute_policy::offpolicy`).
//! 2. The gate: IPS, SNIPS and doubly robust estimates of candidate and stable reward on the
//!    held-out events, at the preferences the traffic used, both policies under the route's
//!    exploration rule. The candidate passes when the lower bound of the doubly robust
//!    `candidate − stable` interval is above `−tolerance`.
//! 3. [`crate::canary`]: each step's live events are compared; the step advances, holds or
//!    aborts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmroute_api::crd::{
    EstimateFigures, GateFigures, LastTraining, LlmRouteSpec, PolicyOrigin, PolicyPhase,
    TrainingData,
};
use llmroute_api::rollout::{RolloutSpec, TrainingSpec, max_importance_weight};
use llmroute_api::{Outcome, PolicyRef};
use llmroute_policy::offpolicy::{
    Estimate, EvaluationConfig, Explored, LoggedEvent, OffPolicyConfig, compare_policies,
    train_off_policy,
};
use llmroute_policy::onnx;
use llmroute_policy::policy::prior::{PricedModel, default_cost_scale, pricing_prior};
use llmroute_policy::policy::{
    PolicyMetadata, PolicyNetwork, from_onnx, read_metadata, to_onnx_bytes,
};
use llmroute_policy::reward::{DEFAULT_TAU_PERCENTILE, Reward, calibrate_tau};

use crate::canary::{ArmSample, Verdict, analyse_step};
use crate::history::{PolicyRecord, RolloutState, StoredEvent, has_ended};
use crate::store::{Store, StoreError};

/// Embedding size of all-MiniLM-L6-v2, the encoder of every policy.
pub const EMBEDDING_DIM: usize = 384;

/// A step of the learning loop that failed.
#[derive(Debug, thiserror::Error)]
pub enum LearningError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stable policy {version} of route {route:?} cannot be read: {message}")]
    StablePolicy {
        route: String,
        version: String,
        message: String,
    },
    #[error("off-policy training or evaluation failed: {0}")]
    OffPolicy(#[from] llmroute_policy::offpolicy::OffPolicyError),
}

/// The policy that serves a route, with its artifact.
#[derive(Debug, Clone)]
pub struct StablePolicy {
    pub reference: PolicyRef,
    pub bytes: Vec<u8>,
    pub metadata: PolicyMetadata,
    pub network: PolicyNetwork,
}

impl StablePolicy {
    /// Reads a policy artifact.
    pub fn from_bytes(
        route: &str,
        reference: PolicyRef,
        bytes: Vec<u8>,
    ) -> Result<Self, LearningError> {
        let fail = |message: String| LearningError::StablePolicy {
            route: route.to_string(),
            version: reference.version.clone(),
            message,
        };
        let model = onnx::decode(&bytes).map_err(|e| fail(e.to_string()))?;
        let metadata = read_metadata(&model).map_err(|e| fail(e.to_string()))?;
        let network = from_onnx(&model).map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            reference,
            bytes,
            metadata,
            network,
        })
    }
}

/// The product of one training run.
#[derive(Debug, Clone)]
pub struct TrainingRun {
    pub version: String,
    pub bytes: Vec<u8>,
    pub data: TrainingData,
    pub gate: GateFigures,
    /// One sentence with the gate's figures.
    pub message: String,
}

/// The reason a training run did not happen.
#[derive(Debug, Clone, PartialEq)]
pub enum NoRun {
    /// The window has too few usable events.
    TooFewEvents { usable: usize, needed: usize },
}

/// Turns stored events into logged bandit interactions in the stable policy's action order.
/// Only events the policy itself decided and whose chosen model returned the response count: a retried
/// request's outcome belongs to another model than the logged propensity. Events whose
/// propensity or cost is invalid for off-policy validation once narrowed to f32 are dropped
/// too, because one of them would fail the whole training run. A propensity below about
/// 1.4e-45 becomes 0, and a cost above about 3.4e38 USD becomes +inf.
pub fn logged_events<'a>(
    events: &'a [StoredEvent],
    models: &[String],
) -> (Vec<LoggedEvent>, Vec<&'a StoredEvent>) {
    let mut logged = Vec::with_capacity(events.len());
    let mut kept = Vec::with_capacity(events.len());
    for stored in events {
        let event = &stored.event;
        let (Some(quality), Some(cost), Some(propensity)) =
            (event.quality, event.cost_usd, event.decision.propensity)
        else {
            continue;
        };
        let (propensity, cost_usd) = (propensity as f32, cost as f32);
        if event.outcome != Outcome::Success
            || event.served_model != event.decision.model
            || event.embedding.len() != EMBEDDING_DIM
            || !(propensity > 0.0 && propensity <= 1.0)
            || !cost_usd.is_finite()
        {
            continue;
        }
        let Some(action) = models.iter().position(|m| *m == event.decision.model) else {
            continue;
        };
        logged.push(LoggedEvent {
            embedding: event.embedding.clone(),
            w_quality: event.decision.preference.quality as f32,
            action,
            propensity,
            quality: quality as f32,
            cost_usd,
        });
        kept.push(stored);
    }
    (logged, kept)
}

/// Converts an estimate to status figures, leaving out NaN and infinite values.
fn figures(estimate: &Estimate) -> EstimateFigures {
    let finite = |value: f64| value.is_finite().then_some(value);
    EstimateFigures {
        mean: finite(estimate.mean),
        ci_low: finite(estimate.ci_low),
        ci_high: finite(estimate.ci_high),
    }
}

/// Trains a candidate for `route` from its recent events, starting from `stable`, and gates
/// it by off-policy evaluation. Deterministic given the events and `spec.training.seed`.
pub fn train_candidate(
    store: &Store,
    route: &str,
    spec: &LlmRouteSpec,
    stable: &StablePolicy,
    version: &str,
) -> Result<Result<TrainingRun, NoRun>, LearningError> {
    let started = Instant::now();
    let settings = TrainingSpec::settings(spec.training.as_ref());
    let window = store.recent_feedback_events(route, settings.max_events)?;
    let (events, kept) = logged_events(&window, &stable.metadata.models);
    const MIN_USABLE: usize = 20;
    if events.len() < MIN_USABLE {
        return Ok(Err(NoRun::TooFewEvents {
            usable: events.len(),
            needed: MIN_USABLE,
        }));
    }
    // τ: the route's value, else the 95th percentile of the window's costs, else the stable
    // policy's.
    let tau = spec
        .cost_scale_usd
        .map(|t| t as f32)
        .or_else(|| calibrate_tau(events.iter().map(|e| e.cost_usd), DEFAULT_TAU_PERCENTILE))
        .unwrap_or(stable.metadata.cost_scale_usd);
    let reward = Reward::new(tau);
    let holdout = ((events.len() as f64 * settings.holdout_fraction).ceil() as usize)
        .clamp(1, events.len() - 1);
    let (train_part, held_out) = events.split_at(events.len() - holdout);

    let config = OffPolicyConfig {
        seed: settings.seed,
        steps: settings.steps as usize,
        ..OffPolicyConfig::default()
    };
    let (network, summary) = train_off_policy(&stable.network, train_part, reward, &config)?;
    let exploration = spec.exploration();
    let candidate_policy = Explored {
        policy: &network,
        exploration,
    };
    let stable_policy = Explored {
        policy: &stable.network,
        exploration,
    };
    let weight_cap = max_importance_weight(
        settings.gate_max_importance_weight,
        exploration,
        stable.metadata.models.len(),
    );
    let comparison = compare_policies(
        &candidate_policy,
        &stable_policy,
        held_out,
        reward,
        &EvaluationConfig {
            confidence: settings.gate_confidence,
            seed: settings.seed,
            max_importance_weight: Some(weight_cap),
            ..EvaluationConfig::default()
        },
    )?;
    let supported =
        comparison.candidate_effective_sample_size >= settings.gate_min_effective_sample_size;
    let passed = supported && comparison.difference.dr.ci_low > -settings.gate_tolerance;
    let gate = GateFigures {
        events: held_out.len() as u64,
        preferences: comparison.preferences.iter().map(|&w| w as f64).collect(),
        confidence: comparison.confidence,
        candidate_ips: figures(&comparison.candidate.ips),
        candidate_snips: figures(&comparison.candidate.snips),
        candidate_dr: figures(&comparison.candidate.dr),
        stable_dr: figures(&comparison.stable.dr),
        difference_dr: figures(&comparison.difference.dr),
        effective_sample_size: comparison.candidate_effective_sample_size,
        passed,
    };
    let message = format!(
        "{version} {} the off-policy gate: DR reward {:.3} vs {:.3} for {}, difference {:+.3} ({:.0} % CI [{:+.3}, {:+.3}], tolerance {}) on {} held-out events, effective sample size {:.1}{}, {:.1} % of importance weights clipped at {:.1}; trained on {} events ({} steps, {}continued from {})",
        if passed { "passed" } else { "failed" },
        comparison.candidate.dr.mean,
        comparison.stable.dr.mean,
        stable.reference.version,
        comparison.difference.dr.mean,
        gate.confidence * 100.0,
        comparison.difference.dr.ci_low,
        comparison.difference.dr.ci_high,
        settings.gate_tolerance,
        gate.events,
        gate.effective_sample_size,
        match (settings.gate_min_effective_sample_size, supported) {
            (minimum, _) if minimum <= 0.0 => String::new(),
            (minimum, true) => format!(" (minimum {minimum})"),
            (minimum, false) => format!(
                " (minimum {minimum}), too few events on which the candidate chooses as the \
                 logged decisions did"
            ),
        },
        comparison.candidate_clipped_fraction * 100.0,
        weight_cap,
        train_part.len(),
        summary.steps,
        if summary.continued_from_initial {
            ""
        } else {
            "not "
        },
        stable.reference.version,
    );
    let metadata = PolicyMetadata {
        version: version.to_string(),
        cost_scale_usd: tau,
        ..stable.metadata.clone()
    };
    let bytes = to_onnx_bytes(&network, &metadata);
    let first = kept.first().expect("at least MIN_USABLE events");
    let last = kept.last().expect("at least MIN_USABLE events");
    let data = TrainingData {
        training_events: train_part.len() as u64,
        holdout_events: held_out.len() as u64,
        first_event_id: first.id,
        last_event_id: last.id,
        first_event_ms: first.event.timestamp_ms,
        last_event_ms: last.event.timestamp_ms,
        seed: settings.seed,
        steps: settings.steps,
        cost_scale_usd: tau as f64,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(Ok(TrainingRun {
        version: version.to_string(),
        bytes,
        data,
        gate,
        message,
    }))
}

/// The next free version name `vN` of a route, above every `vN` in its history.
pub fn next_version(records: &[PolicyRecord]) -> String {
    let highest = records
        .iter()
        .map(|r| version_number(&r.version))
        .max()
        .unwrap_or(0);
    format!("v{}", highest + 1)
}

/// The next free version name of `route` in `store`: above every version in its history and
/// above every version it has had ([`Store::highest_version`]), so the name of a deleted
/// version is not given again. The canary analysis counts events by version name, so a reused
/// name would mix the events of two policies.
pub fn next_free_version(store: &Store, route: &str) -> Result<String, StoreError> {
    let records = store.policy_records(route)?;
    let from_history = version_number(&next_version(&records)) - 1;
    let highest = from_history.max(store.highest_version(route)?);
    Ok(format!("v{}", highest + 1))
}

/// The number `N` of a version named `vN`; 0 for other names.
pub fn version_number(version: &str) -> u64 {
    version
        .strip_prefix('v')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    let seconds = now_ms() / 1000;
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// What the learning loop needs from the control plane that runs it. `llmroute standalone`
/// ([`crate::ControlPlane`]) and the operator (whose store mirrors the cluster's `LLMPolicy`
/// objects and route statuses) implement it.
pub trait LearningHost: Send + Sync {
    /// Keys and specs of the routes to learn for, sorted by key.
    fn route_specs(&self) -> Vec<(String, LlmRouteSpec)>;
    /// The store with the routes' events, policy files, history and rollout state.
    fn store(&self) -> &Store;
    /// The policy that serves `route` as stable now, following the route's pin.
    fn serving_stable(&self, route: &str) -> Result<Option<PolicyRef>, StoreError>;
    /// Publishes `bytes` as the new stable `version` of `route` and records it in the
    /// history, retiring the previous stable version.
    fn publish_version(
        &self,
        route: &str,
        version: &str,
        bytes: &[u8],
        origin: PolicyOrigin,
        parent: Option<String>,
        message: &str,
    ) -> Result<PolicyRef, StoreError>;
    /// Called after a pass that changed what some route serves.
    fn changed(&self);
}

/// Returns the history's `Stable` record of `route`, the newest when several claim it.
pub fn history_stable(store: &Store, route: &str) -> Result<Option<PolicyRecord>, StoreError> {
    Ok(store
        .policy_records(route)?
        .into_iter()
        .rev()
        .find(|r| r.phase == PolicyPhase::Stable))
}

/// Publishes `bytes` as the stable `version` of `route` in `store`: the file, and a `Stable`
/// history record that retires the previous stable one.
pub fn publish_stable_version(
    store: &Store,
    route: &str,
    version: &str,
    bytes: &[u8],
    origin: PolicyOrigin,
    parent: Option<String>,
    message: &str,
) -> Result<PolicyRef, StoreError> {
    let reference = store.publish_policy(route, version, bytes)?;
    if let Some(mut previous) = history_stable(store, route)?
        && previous.version != version
    {
        previous.phase = PolicyPhase::Retired;
        previous.message = Some(format!("replaced by {version}"));
        store.save_policy_record(route, &previous)?;
    }
    store.save_policy_record(
        route,
        &PolicyRecord {
            version: version.to_string(),
            sha256: reference.sha256.clone(),
            phase: PolicyPhase::Stable,
            origin,
            parent,
            created_ms: now_ms(),
            message: Some(message.to_string()),
            training: None,
            off_policy: None,
            live: None,
            ended_ms: None,
        },
    )?;
    tracing::info!(route, policy_version = version, sha256 = %reference.sha256, ?origin, "published a stable policy");
    Ok(reference)
}

/// The learning loop: runs the steps above for every route of a [`LearningHost`] and records
/// policies, rollout state and decisions in its store.
pub struct LearningLoop {
    host: Arc<dyn LearningHost>,
    /// Digest of the prompt encoder, for the pricing prior of routes without a policy; `None`
    /// leaves such routes on their fallback model.
    encoder: Option<String>,
}

impl std::fmt::Debug for LearningLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LearningLoop")
            .field("encoder", &self.encoder)
            .finish_non_exhaustive()
    }
}

/// The decisions of one pass over a route, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    /// Timeline reasons recorded in this pass, in order.
    pub reasons: Vec<String>,
    /// The timeline messages of those reasons, in the same order.
    pub messages: Vec<String>,
    /// Whether the pass changed what the route serves or its policy history.
    pub changed: bool,
    /// Policy versions deleted from the store by the history limit, which the host deletes
    /// from its own record too.
    pub pruned: Vec<String>,
}

impl LearningLoop {
    pub fn new(host: Arc<dyn LearningHost>, encoder: Option<String>) -> Self {
        Self { host, encoder }
    }

    fn store(&self) -> &Store {
        self.host.store()
    }

    fn record(
        &self,
        route: &str,
        report: &mut TickReport,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        tracing::info!(route, reason, "{message}");
        report.reasons.push(reason.to_string());
        report.messages.push(message.to_string());
        self.store().record_timeline(route, reason, message)
    }

    /// Runs one pass over every route. Errors of one route are logged and do not stop the
    /// others.
    pub fn tick(&self) -> Vec<(String, TickReport)> {
        let mut reports = Vec::new();
        let mut changed = false;
        for (name, spec) in self.host.route_specs() {
            let mut report = TickReport::default();
            match self.tick_route(&name, &spec, &mut report) {
                Ok(route_changed) => {
                    report.changed = route_changed || !report.reasons.is_empty();
                    changed |= route_changed;
                }
                Err(error) => {
                    tracing::error!(route = %name, error = %error, "the learning loop failed for this route; it retries at the next pass");
                }
            }
            reports.push((name, report));
        }
        if changed {
            self.host.changed();
        }
        reports
    }

    /// Runs [`LearningLoop::tick`] every `period` on a blocking thread until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        period: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tracing::info!(
            period_seconds = period.as_secs_f64(),
            "learning loop started"
        );
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let this = self.clone();
                    if let Err(error) = tokio::task::spawn_blocking(move || this.tick()).await {
                        tracing::error!(error = %error, "a learning loop pass panicked; the next pass starts on schedule");
                    }
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!("learning loop stopped");
    }

    /// One pass over one route; returns whether the route's configuration must be rebuilt.
    fn tick_route(
        &self,
        route: &str,
        spec: &LlmRouteSpec,
        report: &mut TickReport,
    ) -> Result<bool, LearningError> {
        let changed = self.advance_route(route, spec, report)?;
        self.prune_history(route, spec, report)?;
        Ok(changed)
    }

    /// Deletes the route's `Retired` and `Rejected` versions beyond
    /// `spec.rollout.revisionHistoryLimit`, those that ended first, with their files. The
    /// pinned, stable, canary and highest-numbered versions are kept and not counted, as are
    /// candidates. The
    /// stable version replaced last, the likeliest to be pinned for a rollback, ended last and
    /// is kept even after many rejected candidates. New versions are numbered above the
    /// deleted ones ([`next_free_version`]).
    fn prune_history(
        &self,
        route: &str,
        spec: &LlmRouteSpec,
        report: &mut TickReport,
    ) -> Result<(), LearningError> {
        let store = self.store();
        // The schema's minimum is 1; 0 would allow the highest version to go.
        let limit = RolloutSpec::settings(spec.rollout.as_ref())
            .revision_history_limit
            .max(1) as usize;
        let records = store.policy_records(route)?;
        let canary = store.rollout_state(route)?.canary;
        let pinned = spec.policy.as_ref().and_then(|p| p.version.clone());
        let serving = self.host.serving_stable(route)?.map(|r| r.version);
        // The highest-numbered version stays too. The operator's reconciler numbers new
        // versions above the highest one it lists, and a ConfigMap without an `LLMPolicy`
        // counts as a leftover only below that version.
        let highest = records
            .iter()
            .max_by_key(|r| version_number(&r.version))
            .map(|r| r.version.clone());

        let kept_always = |version: &String| {
            [&canary, &pinned, &serving, &highest]
                .iter()
                .any(|v| v.as_ref() == Some(version))
        };
        let mut ended: Vec<&PolicyRecord> = records
            .iter()
            .filter(|r| has_ended(r.phase) && !kept_always(&r.version))
            .collect();
        // Last ended first; records saved before end times existed count from their creation.
        ended.sort_by_key(|r| {
            std::cmp::Reverse((
                r.ended_ms.unwrap_or(r.created_ms),
                version_number(&r.version),
            ))
        });
        let old: Vec<String> = ended
            .iter()
            .skip(limit)
            .map(|r| r.version.clone())
            .collect();
        if old.is_empty() {
            return Ok(());
        }

        store.delete_policy_versions(route, &old)?;
        const LISTED: usize = 10;
        let mut names: Vec<String> = old.iter().take(LISTED).cloned().collect();
        names.sort_by_key(|v| version_number(v));
        let more = if old.len() > LISTED {
            format!(" and {} more", old.len() - LISTED)
        } else {
            String::new()
        };
        let message = format!(
            "deleted the retired or rejected policy versions {}{more} with their files, keeping the {limit} that ended last (spec.rollout.revisionHistoryLimit)",
            names.join(", ")
        );
        self.record(route, report, "PolicyHistoryPruned", &message)?;
        report.pruned.extend(old);
        Ok(())
    }

    /// Trains, gates or analyses the canary of one route, as its state requires; returns
    /// whether the route's configuration must be rebuilt.
    fn advance_route(
        &self,
        route: &str,
        spec: &LlmRouteSpec,
        report: &mut TickReport,
    ) -> Result<bool, LearningError> {
        let store = self.store();
        let mut changed = self.ensure_initial_policy(route, spec, report)?;
        let mut state = store.rollout_state(route)?;
        let pinned = spec.policy.as_ref().and_then(|p| p.version.clone());
        if let Some(pinned) = pinned {
            changed |= self.apply_pin(route, &pinned, &mut state, report)?;
            store.save_rollout_state(route, &state)?;
            return Ok(changed);
        }
        if state.canary.is_some() {
            changed |= self.analyse_canary(route, spec, &mut state, report)?;
            store.save_rollout_state(route, &state)?;
            return Ok(changed);
        }
        let training = TrainingSpec::settings(spec.training.as_ref());
        if !training.enabled {
            return Ok(changed);
        }
        let due =
            now_ms().saturating_sub(state.last_training_ms) >= training.interval_seconds * 1000;
        if !due {
            return Ok(changed);
        }
        let new_events = store.count_feedback_events(route, state.last_training_event_id)?;
        if new_events < training.min_new_events {
            return Ok(changed);
        }
        let Some(stable) = self.stable(route)? else {
            return Ok(changed);
        };
        changed |= self.train(route, spec, &stable, &mut state, report)?;
        store.save_rollout_state(route, &state)?;
        Ok(changed)
    }

    /// Reads the stable policy of `route` with its artifact, `None` when it has none.
    fn stable(&self, route: &str) -> Result<Option<StablePolicy>, LearningError> {
        let Some(reference) = self.host.serving_stable(route)? else {
            return Ok(None);
        };
        let path = self.store().policy_path(&reference.sha256);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io { path, source })?;
        StablePolicy::from_bytes(route, reference, bytes).map(Some)
    }

    /// Publishes the pricing prior for a route with no policy, or for a route whose pool no
    /// longer matches its prior.
    fn ensure_initial_policy(
        &self,
        route: &str,
        spec: &LlmRouteSpec,
        report: &mut TickReport,
    ) -> Result<bool, LearningError> {
        let Some(encoder) = &self.encoder else {
            return Ok(false);
        };
        if spec.policy.as_ref().is_some_and(|p| p.version.is_some()) {
            // A pinned version serves whatever the history holds.
            return Ok(false);
        }
        let names: Vec<String> = spec.models.iter().map(|m| m.name.clone()).collect();
        let stable_origin = history_stable(self.store(), route)?.map(|r| r.origin);
        let reason = match self.stable(route)? {
            None => "the route has no policy".to_string(),
            Some(stable) => {
                let removed: Vec<&String> = stable
                    .metadata
                    .models
                    .iter()
                    .filter(|m| !names.contains(m))
                    .collect();
                let mut sorted_policy = stable.metadata.models.clone();
                let mut sorted_pool = names.clone();
                sorted_policy.sort();
                sorted_pool.sort();
                if !removed.is_empty() {
                    format!(
                        "the stable policy {} routes to {removed:?}, which the pool no longer lists",
                        stable.reference.version
                    )
                } else if stable_origin == Some(PolicyOrigin::PricingPrior)
                    && sorted_policy != sorted_pool
                {
                    format!(
                        "the pool changed from {:?} to {names:?}",
                        stable.metadata.models
                    )
                } else {
                    return Ok(false);
                }
            }
        };
        let mut state = self.store().rollout_state(route)?;
        if let Some(canary) = state.canary.take() {
            let message = format!("canary {canary} cancelled: {reason}");
            self.set_phase(route, &canary, PolicyPhase::Rejected, &message)?;
            self.record(route, report, "CanaryAborted", &message)?;
            state.weight = 0.0;
            state.step = 0;
            self.store().save_rollout_state(route, &state)?;
        }
        let models: Vec<PricedModel> = spec
            .models
            .iter()
            .map(|m| PricedModel {
                name: m.name.clone(),
                input_usd_per_million_tokens: m.pricing.input_usd_per_million_tokens,
                output_usd_per_million_tokens: m.pricing.output_usd_per_million_tokens,
            })
            .collect();
        let version = next_free_version(self.store(), route)?;
        let (tau, tau_source) = match spec.cost_scale_usd {
            Some(tau) => (tau, "the route's costScaleUsd"),
            // Trained versions calibrate τ from observed costs instead, so theirs differs.
            None => (
                default_cost_scale(&models),
                "1,000 tokens at the dearest model's price, until costs are observed",
            ),
        };
        let (network, metadata) = pricing_prior(&models, &version, encoder, EMBEDDING_DIM, tau);
        let bytes = to_onnx_bytes(&network, &metadata);
        let message = format!(
            "published the pricing prior {version} for {} models (τ = ${tau:.3e}, {tau_source}) because {reason}",
            models.len()
        );
        self.host.publish_version(
            route,
            &version,
            &bytes,
            PolicyOrigin::PricingPrior,
            None,
            &message,
        )?;
        self.record(route, report, "PricingPriorPublished", &message)?;
        Ok(true)
    }

    fn train(
        &self,
        route: &str,
        spec: &LlmRouteSpec,
        stable: &StablePolicy,
        state: &mut RolloutState,
        report: &mut TickReport,
    ) -> Result<bool, LearningError> {
        let store = self.store();
        let version = next_free_version(store, route)?;
        let last_event = store.last_event_id(route)?;
        self.record(
            route,
            report,
            "TrainingStarted",
            &format!(
                "training {version} from {} on up to {} events",
                stable.reference.version,
                TrainingSpec::settings(spec.training.as_ref()).max_events
            ),
        )?;
        let run = train_candidate(store, route, spec, stable, &version);
        state.last_training_ms = now_ms();
        state.last_training_event_id = last_event;
        let run = match run {
            Ok(Ok(run)) => run,
            Ok(Err(NoRun::TooFewEvents { usable, needed })) => {
                let message = format!(
                    "training skipped: {usable} usable events (routed, answered by the chosen model, with quality, cost and propensity), {needed} needed"
                );
                self.record(route, report, "TrainingSkipped", &message)?;
                state.last_training = Some(LastTraining {
                    time: rfc3339_now(),
                    candidate: None,
                    result: "TrainingSkipped".into(),
                    message,
                });
                return Ok(false);
            }
            Err(error) => {
                let message = format!("training {version} failed: {error}");
                self.record(route, report, "TrainingFailed", &message)?;
                state.last_training = Some(LastTraining {
                    time: rfc3339_now(),
                    candidate: None,
                    result: "TrainingFailed".into(),
                    message,
                });
                return Ok(false);
            }
        };
        let reference = store.publish_policy(route, &run.version, &run.bytes)?;
        let passed = run.gate.passed;
        let record = PolicyRecord {
            version: run.version.clone(),
            sha256: reference.sha256,
            phase: if passed {
                PolicyPhase::Canary
            } else {
                PolicyPhase::Rejected
            },
            origin: PolicyOrigin::Trained,
            parent: Some(stable.reference.version.clone()),
            created_ms: now_ms(),
            message: Some(run.message.clone()),
            training: Some(run.data.clone()),
            off_policy: Some(run.gate.clone()),
            live: None,
            ended_ms: None,
        };
        store.save_policy_record(route, &record)?;
        let result = if passed { "GatePassed" } else { "GateRejected" };
        self.record(route, report, result, &run.message)?;
        state.last_training = Some(LastTraining {
            time: rfc3339_now(),
            candidate: Some(run.version.clone()),
            result: result.into(),
            message: run.message,
        });
        if !passed {
            return Ok(false);
        }
        self.start_step(route, spec, state, &run.version, 0, report)?;
        Ok(true)
    }

    fn start_step(
        &self,
        route: &str,
        spec: &LlmRouteSpec,
        state: &mut RolloutState,
        version: &str,
        step: u32,
        report: &mut TickReport,
    ) -> Result<(), StoreError> {
        let settings = RolloutSpec::settings(spec.rollout.as_ref());
        let canary = settings.steps[step as usize];
        state.canary = Some(version.to_string());
        state.step = step;
        state.weight = canary.weight;
        state.step_start_event_id = self.store().last_event_id(route)?;
        self.record(
            route,
            report,
            "CanaryStepStarted",
            &format!(
                "canary step {} of {} started: {version} decides {:.0} % of routed requests until {} of its events have feedback",
                step + 1,
                settings.steps.len(),
                canary.weight * 100.0,
                canary.min_events
            ),
        )
    }

    fn analyse_canary(
        &self,
        route: &str,
        spec: &LlmRouteSpec,
        state: &mut RolloutState,
        report: &mut TickReport,
    ) -> Result<bool, LearningError> {
        let store = self.store();
        let settings = RolloutSpec::settings(spec.rollout.as_ref());
        let Some(candidate_version) = state.canary.clone() else {
            return Ok(false);
        };
        let Some(stable) = self.host.serving_stable(route)? else {
            return Ok(false);
        };
        let step = (state.step as usize).min(settings.steps.len() - 1);
        // The reward of both arms is computed with the candidate's τ, so the two are on one
        // scale.
        let tau = store
            .policy_record(route, &candidate_version)?
            .and_then(|r| r.training.map(|t| t.cost_scale_usd))
            .or(spec.cost_scale_usd)
            .unwrap_or(1.0);
        let events = store.events_of_versions(
            route,
            [candidate_version.as_str(), stable.version.as_str()],
            state.step_start_event_id,
        )?;
        let (mut candidate, mut stable_arm) = (ArmSample::default(), ArmSample::default());
        for stored in &events {
            let arm = if stored.event.decision.policy_version.as_deref()
                == Some(candidate_version.as_str())
            {
                &mut candidate
            } else {
                &mut stable_arm
            };
            arm.add(&stored.event, tau);
        }
        let analysis = analyse_step(step, &settings, &candidate, &stable_arm);
        self.update_live(route, &candidate_version, &analysis.candidate)?;
        self.update_live(route, &stable.version, &analysis.stable)?;
        let last_step = step + 1 == settings.steps.len();
        match analysis.verdict {
            Verdict::Waiting => Ok(false),
            Verdict::Hold => {
                // One Event per hold level, not one per pass: record when the candidate's
                // sample grew by another step minimum since the last recorded hold.
                let timeline = store.timeline(route, 1)?;
                if timeline
                    .first()
                    .is_none_or(|e| e.reason != "CanaryStepHeld")
                {
                    self.record(route, report, "CanaryStepHeld", &analysis.message)?;
                }
                Ok(false)
            }
            Verdict::Abort => {
                self.record(route, report, "CanaryAborted", &analysis.message)?;
                self.set_phase(
                    route,
                    &candidate_version,
                    PolicyPhase::Rejected,
                    &analysis.message,
                )?;
                state.canary = None;
                state.weight = 0.0;
                state.step = 0;
                state.degraded = Some(analysis.message);
                Ok(true)
            }
            Verdict::Advance if !last_step => {
                self.record(route, report, "CanaryStepPassed", &analysis.message)?;
                self.start_step(
                    route,
                    spec,
                    state,
                    &candidate_version,
                    state.step + 1,
                    report,
                )?;
                Ok(true)
            }
            Verdict::Advance if !settings.auto_promote => {
                let timeline = store.timeline(route, 1)?;
                if timeline
                    .first()
                    .is_none_or(|e| e.reason != "AwaitingPromotion")
                {
                    let message = format!(
                        "{}; {candidate_version} waits at the last step: set spec.policy.version to {candidate_version} to promote it",
                        analysis.message
                    );
                    self.record(route, report, "AwaitingPromotion", &message)?;
                }
                Ok(false)
            }
            Verdict::Advance => {
                let message = format!(
                    "promoted {candidate_version} to stable after {} canary steps, replacing {}: {}",
                    settings.steps.len(),
                    stable.version,
                    analysis.message
                );
                self.promote(route, &candidate_version, &stable.version, &message, state)?;
                self.record(route, report, "Promoted", &message)?;
                Ok(true)
            }
        }
    }

    fn update_live(
        &self,
        route: &str,
        version: &str,
        live: &llmroute_api::crd::LiveFigures,
    ) -> Result<(), StoreError> {
        if let Some(mut record) = self.store().policy_record(route, version)? {
            record.live = Some(live.clone());
            self.store().save_policy_record(route, &record)?;
        }
        Ok(())
    }

    fn set_phase(
        &self,
        route: &str,
        version: &str,
        phase: PolicyPhase,
        message: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut record) = self.store().policy_record(route, version)? {
            record.phase = phase;
            record.message = Some(message.to_string());
            self.store().save_policy_record(route, &record)?;
        }
        Ok(())
    }

    fn promote(
        &self,
        route: &str,
        version: &str,
        previous: &str,
        message: &str,
        state: &mut RolloutState,
    ) -> Result<(), StoreError> {
        self.set_phase(
            route,
            previous,
            PolicyPhase::Retired,
            &format!("replaced by {version}"),
        )?;
        self.set_phase(route, version, PolicyPhase::Stable, message)?;
        state.canary = None;
        state.weight = 0.0;
        state.step = 0;
        state.degraded = None;
        Ok(())
    }

    /// Follows `spec.policy.version`: promotes a canary it names, cancels any other canary,
    /// and makes the pinned version the stable one in the history.
    fn apply_pin(
        &self,
        route: &str,
        pinned: &str,
        state: &mut RolloutState,
        report: &mut TickReport,
    ) -> Result<bool, LearningError> {
        let store = self.store();
        let Some(mut record) = store.policy_record(route, pinned)? else {
            // A version published before the history existed, or none at all: the host's
            // configuration already reports it.
            return Ok(false);
        };
        let mut changed = false;
        if let Some(canary) = state.canary.clone() {
            if canary == pinned {
                let previous = history_stable(store, route)?
                    .map(|r| r.version)
                    .unwrap_or_default();
                let message =
                    format!("promoted {pinned} by spec.policy.version, replacing {previous}");
                self.promote(route, pinned, &previous, &message, state)?;
                self.record(route, report, "Promoted", &message)?;
                return Ok(true);
            }
            let message = format!("canary {canary} cancelled: spec.policy.version pins {pinned}");
            self.set_phase(route, &canary, PolicyPhase::Rejected, &message)?;
            self.record(route, report, "CanaryAborted", &message)?;
            state.canary = None;
            state.weight = 0.0;
            state.step = 0;
            changed = true;
        }
        if record.phase != PolicyPhase::Stable {
            let previous = history_stable(self.store(), route)?;
            if let Some(previous) = &previous {
                self.set_phase(
                    route,
                    &previous.version,
                    PolicyPhase::Retired,
                    &format!("replaced by {pinned}, pinned by spec.policy.version"),
                )?;
            }
            let message = format!(
                "{pinned} serves as stable, pinned by spec.policy.version{}",
                previous
                    .map(|p| format!(" (was {})", p.version))
                    .unwrap_or_default()
            );
            record.phase = PolicyPhase::Stable;
            record.message = Some(message.clone());
            store.save_policy_record(route, &record)?;
            self.record(route, report, "RolledBack", &message)?;
            changed = true;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_version_skips_taken_names() {
        let record = |version: &str| PolicyRecord {
            version: version.into(),
            sha256: String::new(),
            phase: PolicyPhase::Retired,
            origin: PolicyOrigin::Trained,
            parent: None,
            created_ms: 0,
            message: None,
            training: None,
            off_policy: None,
            live: None,
            ended_ms: None,
        };
        assert_eq!(next_version(&[]), "v1");
        assert_eq!(
            next_version(&[record("v1"), record("v7"), record("custom")]),
            "v8"
        );
    }

    fn stored_event(propensity: f64, cost_usd: f64) -> StoredEvent {
        StoredEvent {
            id: 1,
            event: llmroute_api::CompletedEvent {
                decision: llmroute_api::DecisionRecord {
                    decision_id: "0".repeat(32),
                    route: "r".into(),
                    config_version: 1,
                    model: "b".into(),
                    routed: true,
                    preference: llmroute_api::Preference {
                        quality: 0.5,
                        cost: 0.5,
                    },
                    policy_version: Some("v1".into()),
                    propensity: Some(propensity),
                },
                served_model: "b".into(),
                embedding: vec![0.0; EMBEDDING_DIM],
                quality: Some(0.75),
                cost_usd: Some(cost_usd),
                prompt_tokens: None,
                completion_tokens: None,
                latency_ms: 10.0,
                outcome: Outcome::Success,
                attempts: 1,
                timestamp_ms: 0,
            },
        }
    }

    #[test]
    fn logged_events_keep_valid_values() {
        let models = ["a".to_string(), "b".to_string()];
        let stored = [stored_event(0.25, 0.002)];
        let (logged, kept) = logged_events(&stored, &models);
        assert_eq!(kept.len(), 1);
        assert_eq!(logged[0].action, 1);
        assert_eq!(logged[0].propensity, 0.25);
        assert_eq!(logged[0].w_quality, 0.5);
    }

    #[test]
    fn logged_events_drop_values_lost_in_f32() {
        // The event API accepts any propensity in (0, 1] and any finite cost, both in f64.
        // 1e-60 is below the smallest positive f32 (about 1.4e-45), so it becomes 0.0, and
        // 1e39 is above the largest f32 (about 3.4e38), so it becomes +inf. Either value makes
        // the off-policy validation reject the whole window, so one such event would fail
        // every training run until it left the window.
        let models = ["a".to_string(), "b".to_string()];
        let stored = [
            stored_event(1e-60, 0.002),
            stored_event(0.25, 1e39),
            stored_event(0.25, 0.002),
        ];
        let (logged, kept) = logged_events(&stored, &models);
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert_eq!(kept.len(), 1);
        assert_eq!(logged[0].propensity, 0.25);
        assert_eq!(logged[0].cost_usd, 0.002);
    }

    #[test]
    fn gate_figures_survive_the_store() {
        // 20 usable events with holdoutFraction 0.05 hold out ceil(20 · 0.05) = 1 event. The
        // standard error of one event is infinite, so every interval is (−∞, +∞). A candidate
        // that gives probability 0 to every held-out action has Σρ = 0, so its SNIPS mean is
        // 0 / 0, which compare_policies reports as NaN.
        let single = Estimate {
            mean: 0.25,
            std_error: f64::INFINITY,
            ci_low: f64::NEG_INFINITY,
            ci_high: f64::INFINITY,
        };
        let undefined = Estimate {
            mean: f64::NAN,
            ..single
        };
        let gate = GateFigures {
            events: 1,
            preferences: vec![0.5],
            confidence: 0.95,
            candidate_ips: figures(&single),
            candidate_snips: figures(&undefined),
            candidate_dr: figures(&single),
            stable_dr: figures(&single),
            difference_dr: figures(&single),
            effective_sample_size: 0.0,
            passed: false,
        };
        let record = PolicyRecord {
            version: "v2".into(),
            sha256: String::new(),
            phase: PolicyPhase::Rejected,
            origin: PolicyOrigin::Trained,
            parent: Some("v1".into()),
            created_ms: 0,
            message: None,
            training: None,
            off_policy: Some(gate),
            live: None,
            ended_ms: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.ensure_history().unwrap();
        store.save_policy_record("r", &record).unwrap();

        let records = store
            .policy_records("r")
            .expect("a record with an unbounded interval is readable");
        let gate = records[0].off_policy.as_ref().expect("gate figures");
        assert_eq!(gate.difference_dr.mean, Some(0.25));
        assert_eq!(gate.difference_dr.ci_low, None);
        assert_eq!(gate.difference_dr.ci_high, None);
        assert_eq!(gate.candidate_snips.mean, None);
    }

    #[test]
    fn rfc3339_has_the_shape() {
        let text = rfc3339_now();
        assert_eq!(text.len(), 20, "{text}");
        assert!(text.starts_with("20"), "{text}");
        assert!(text.ends_with('Z'), "{text}");
    }
}
