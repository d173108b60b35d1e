//! The learning loop end to end on a synthetic world, without sidecars: events logged under
//! the serving policies go into the store, and the loop trains, gates, canaries, promotes,
//! rejects and aborts as the route's settings require.
//!
//! The world: prompts fall in two clusters of the embedding space; three models with
//! different prices; the best model depends on the cluster and on the preference. Quality is a
//! Bernoulli draw with the model's mean on the cluster, so the loop sees noisy feedback.

use std::path::Path;
use std::sync::Arc;

use llmroute_api::crd::PolicyPhase;
use llmroute_control::history::PolicyRecord;
use llmroute_control::{ControlPlane, LearningLoop, Store};
use llmroute_policy::onnx;
use llmroute_policy::policy::{PolicyNetwork, from_onnx};
use rand::Rng;

#[path = "support/world.rs"]
#[allow(dead_code)]
mod world;

use world::{ENCODER, EPSILON, World};

fn route_yaml(training: &str, rollout: &str) -> String {
    format!(
        r#"apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata:
  name: world
spec:
  models:
    - name: cheap
      endpoint: http://127.0.0.1:9/v1
      model: cheap
      pricing: {{inputUsdPerMillionTokens: 0.1, outputUsdPerMillionTokens: 0.1}}
    - name: mid
      endpoint: http://127.0.0.1:9/v1
      model: mid
      pricing: {{inputUsdPerMillionTokens: 0.8, outputUsdPerMillionTokens: 0.8}}
    - name: premium
      endpoint: http://127.0.0.1:9/v1
      model: premium
      pricing: {{inputUsdPerMillionTokens: 4, outputUsdPerMillionTokens: 4}}
  defaultPreference: {{quality: 0.5, cost: 0.5}}
  fallback: cheap
  exploration: {{mode: epsilonGreedy, epsilon: {EPSILON}}}
  costScaleUsd: 0.004
{training}
{rollout}
"#
    )
}

fn network(store: &Store, record: &PolicyRecord) -> PolicyNetwork {
    let bytes = std::fs::read(store.policy_path(&record.sha256)).unwrap();
    from_onnx(&onnx::decode(&bytes).unwrap()).unwrap()
}

fn setup(dir: &Path, yaml: &str) -> (Arc<ControlPlane>, LearningLoop) {
    let routes = dir.join("routes");
    std::fs::create_dir_all(&routes).unwrap();
    std::fs::write(routes.join("world.yaml"), yaml).unwrap();
    let store = Arc::new(Store::open(&dir.join("state")).unwrap());
    let (plane, report) = ControlPlane::new(&routes, store);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let learning = LearningLoop::new(plane.clone(), Some(ENCODER.into()));
    (plane, learning)
}

fn record(plane: &ControlPlane, version: &str) -> PolicyRecord {
    plane
        .store()
        .policy_record("world", version)
        .unwrap()
        .unwrap_or_else(|| panic!("no record of {version}"))
}

/// Serves `n` requests split between stable and canary by the route's current weight.
fn serve(plane: &ControlPlane, world: &mut World, n: usize, canary_latency_ms: f64) {
    let config = plane.subscribe("world").unwrap().borrow().clone();
    let stable_ref = config.stable.clone().unwrap();
    let stable = network(plane.store(), &record(plane, &stable_ref.version));
    let canary = config.canary.as_ref().map(|c| {
        (
            c.version.clone(),
            network(plane.store(), &record(plane, &c.version)),
        )
    });
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        let use_canary = canary.is_some() && world.rng.random::<f64>() < config.canary_weight;
        let event = match (&canary, use_canary) {
            (Some((version, policy)), true) => world.event(policy, version, canary_latency_ms),
            _ => world.event(&stable, &stable_ref.version, 10.0),
        };
        events.push(event);
    }
    plane
        .store()
        .insert_events("world", "test", &events)
        .unwrap();
}

fn reasons(plane: &ControlPlane) -> Vec<String> {
    plane
        .store()
        .timeline("world", 100)
        .unwrap()
        .into_iter()
        .map(|e| e.reason)
        .collect()
}

const TRAINING: &str = "  training: {minNewEvents: 600, steps: 400, intervalSeconds: 5}";
const ROLLOUT: &str =
    "  rollout: {steps: [{weight: 0.3, minEvents: 60}, {weight: 0.6, minEvents: 60}]}";

#[test]
fn better_candidate_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let (plane, learning) = setup(dir.path(), &route_yaml(TRAINING, ROLLOUT));
    let mut world = World::new(1, "world");

    learning.tick();
    assert_eq!(reasons(&plane), ["PricingPriorPublished"]);
    // The message names the source of the prior's τ, here the route's pinned value.
    let published = &plane.store().timeline("world", 100).unwrap()[0].message;
    assert!(
        published.contains("(τ = $4.000e-3, the route's costScaleUsd)"),
        "{published}"
    );
    let config = plane.subscribe("world").unwrap().borrow().clone();
    assert_eq!(config.stable.as_ref().unwrap().version, "v1");
    assert_eq!(record(&plane, "v1").phase, PolicyPhase::Stable);

    serve(&plane, &mut world, 1500, 10.0);
    learning.tick();
    let v2 = record(&plane, "v2");
    let gate = v2.off_policy.clone().unwrap();
    assert!(gate.passed, "{:?}", v2.message);
    assert!(gate.effective_sample_size > 0.0, "{gate:?}");
    assert!(
        v2.message
            .as_deref()
            .is_some_and(|m| m.contains("effective sample size")),
        "{:?}",
        v2.message
    );
    assert_eq!(v2.phase, PolicyPhase::Canary);
    assert_eq!(v2.parent.as_deref(), Some("v1"));
    let training = v2.training.clone().unwrap();
    assert_eq!(training.training_events + training.holdout_events, 1500);
    assert!(
        gate.difference_dr.ci_low.is_some_and(|low| low > 0.0),
        "{gate:?}"
    );
    let config = plane.subscribe("world").unwrap().borrow().clone();
    assert_eq!(config.canary.as_ref().unwrap().version, "v2");
    assert_eq!(config.canary_weight, 0.3);

    // Step 1, then step 2, then promotion.
    for _ in 0..20 {
        serve(&plane, &mut world, 200, 10.0);
        learning.tick();
        if plane
            .store()
            .policy_record("world", "v2")
            .unwrap()
            .unwrap()
            .phase
            == PolicyPhase::Stable
        {
            break;
        }
    }
    let reasons = reasons(&plane);
    assert!(reasons.ends_with(&["Promoted".to_string()]), "{reasons:?}");
    assert!(
        reasons.contains(&"CanaryStepPassed".to_string()),
        "{reasons:?}"
    );
    assert_eq!(record(&plane, "v2").phase, PolicyPhase::Stable);
    assert_eq!(record(&plane, "v1").phase, PolicyPhase::Retired);
    let live = record(&plane, "v2").live.unwrap();
    assert!(live.with_feedback >= 60, "{live:?}");
    let config = plane.subscribe("world").unwrap().borrow().clone();
    assert_eq!(config.stable.as_ref().unwrap().version, "v2");
    assert!(config.canary.is_none());
    assert_eq!(config.canary_weight, 0.0);
    let state = plane.store().rollout_state("world").unwrap();
    assert!(state.degraded.is_none());
    for entry in plane.store().timeline("world", 100).unwrap() {
        eprintln!("{}: {}", entry.reason, entry.message);
    }
    assert_eq!(state.last_training.unwrap().result, "GatePassed");
}

#[test]
fn training_repeats_for_seed() {
    let run = || {
        let dir = tempfile::tempdir().unwrap();
        let (plane, learning) = setup(dir.path(), &route_yaml(TRAINING, ROLLOUT));
        let mut world = World::new(2, "world");
        learning.tick();
        serve(&plane, &mut world, 800, 10.0);
        learning.tick();
        let v2 = record(&plane, "v2");
        (v2.sha256, v2.off_policy.unwrap().difference_dr)
    };
    assert_eq!(run(), run());
}

#[test]
fn gate_rejects_inverted_reward_candidate() {
    // The feedback of the first 1 500 events is inverted, so training learns the worst
    // models. The last 700 are honest, and as the most recent they are the held-out part of
    // the window that the gate measures on.
    let mut world = World::new(3, "world");
    let inverted_dir = tempfile::tempdir().unwrap();
    let (inverted_plane, inverted_learning) =
        setup(inverted_dir.path(), &route_yaml(TRAINING, ROLLOUT));
    inverted_learning.tick();
    let v1 = network(inverted_plane.store(), &record(&inverted_plane, "v1"));
    let mut events = Vec::new();
    for _ in 0..1500 {
        let mut event = world.event(&v1, "v1", 10.0);
        event.quality = event.quality.map(|q| 1.0 - q);
        events.push(event);
    }
    // Honest events come last, so the gate measures the candidate on true feedback.
    for _ in 0..700 {
        events.push(world.event(&v1, "v1", 10.0));
    }
    inverted_plane
        .store()
        .insert_events("world", "test", &events)
        .unwrap();
    std::fs::write(
        inverted_dir.path().join("routes/world.yaml"),
        route_yaml(
            "  training: {minNewEvents: 600, steps: 400, intervalSeconds: 5, holdoutFraction: 0.3}",
            ROLLOUT,
        ),
    )
    .unwrap();
    inverted_plane.reload();
    inverted_learning.tick();
    let v2 = record(&inverted_plane, "v2");
    let gate = v2.off_policy.clone().unwrap();
    assert!(!gate.passed, "{gate:?}");
    assert_eq!(v2.phase, PolicyPhase::Rejected);
    assert!(v2.message.unwrap().contains("failed the off-policy gate"));
    assert_eq!(reasons(&inverted_plane).last().unwrap(), "GateRejected");
    let config = inverted_plane.subscribe("world").unwrap().borrow().clone();
    assert!(config.canary.is_none());
    assert_eq!(config.stable.as_ref().unwrap().version, "v1");
}

#[test]
fn gate_rejects_candidate_below_effective_sample_size() {
    // Tolerance 1 would let any candidate through, but at most 450 held-out events (30 % of
    // 1,500) give an effective sample size of at most 450, below the minimum of 10,000.
    let dir = tempfile::tempdir().unwrap();
    let training = "  training: {minNewEvents: 600, steps: 400, intervalSeconds: 5, \
                    gate: {tolerance: 1, minEffectiveSampleSize: 10000}}";
    let (plane, learning) = setup(dir.path(), &route_yaml(training, ROLLOUT));
    let mut world = World::new(1, "world");
    learning.tick();
    serve(&plane, &mut world, 1500, 10.0);
    learning.tick();

    let v2 = record(&plane, "v2");
    let gate = v2.off_policy.clone().unwrap();
    assert!(!gate.passed, "{gate:?}");
    assert!(gate.effective_sample_size > 0.0, "{gate:?}");
    assert!(gate.effective_sample_size <= 450.0, "{gate:?}");
    assert_eq!(v2.phase, PolicyPhase::Rejected);
    let message = v2.message.unwrap();
    assert!(message.contains("failed the off-policy gate"), "{message}");
    assert!(message.contains("(minimum 10000)"), "{message}");
    assert!(
        message.contains("too few events on which the candidate chooses as the logged"),
        "{message}"
    );
    assert_eq!(reasons(&plane).last().unwrap(), "GateRejected");
}

/// Runs the first training of `world` seed 1, whose candidate `better_candidate_is_promoted`
/// promotes, with the last held-out event logged at propensity 1e-30, and returns `v2`.
fn gate_with_tiny_propensity(training: &str) -> PolicyRecord {
    let dir = tempfile::tempdir().unwrap();
    let (plane, learning) = setup(dir.path(), &route_yaml(training, ROLLOUT));
    let mut world = World::new(1, "world");
    learning.tick();
    let v1 = network(plane.store(), &record(&plane, "v1"));
    let mut events: Vec<_> = (0..1500).map(|_| world.event(&v1, "v1", 10.0)).collect();
    let last = events.last_mut().unwrap();
    last.decision.propensity = Some(1e-30);
    plane
        .store()
        .insert_events("world", "test", &events)
        .unwrap();
    learning.tick();
    record(&plane, "v2")
}

#[test]
fn gate_caps_importance_weight_of_tiny_propensity() {
    // Both policies give every model at least ε / 3 probability, so their weights on that
    // event are at least 1e28. At a cap of 1e6, above every other weight, that one event still
    // outweighs the other 449: rewards lie in [−1, 1], but the recorded estimates do not.
    let wide = gate_with_tiny_propensity(
        "  training: {minNewEvents: 600, steps: 400, intervalSeconds: 5, \
         gate: {maxImportanceWeight: 1000000}}",
    );
    let gate = wide.off_policy.clone().unwrap();
    let dr = gate.candidate_dr.mean.unwrap();
    assert!(dr.abs() > 10.0, "{gate:?}");
    assert!(gate.effective_sample_size < 2.0, "{gate:?}");
    let message = wide.message.unwrap();
    eprintln!("{message}");
    assert!(message.contains("clipped at 1000000.0"), "{message}");

    // The default cap, K / ε = 3 / ε, is the largest weight a correctly logged event can have,
    // so it clips that event only, and the candidate passes as without it.
    let capped = gate_with_tiny_propensity(TRAINING);
    let gate = capped.off_policy.clone().unwrap();
    assert!(gate.passed, "{:?}", capped.message);
    let dr = gate.candidate_dr.mean.unwrap();
    assert!((-1.0..=1.0).contains(&dr), "{gate:?}");
    assert!(gate.effective_sample_size > 20.0, "{gate:?}");
    let message = capped.message.unwrap();
    eprintln!("{message}");
    let cap = 3.0 / EPSILON;
    assert!(
        message.contains(&format!("clipped at {cap:.1}")),
        "{message}"
    );
}

#[test]
fn canary_aborts_slow_candidate() {
    let dir = tempfile::tempdir().unwrap();
    // Tolerance 1 lets any candidate through the gate.
    let training =
        "  training: {minNewEvents: 600, steps: 400, intervalSeconds: 5, gate: {tolerance: 1}}";
    let (plane, learning) = setup(dir.path(), &route_yaml(training, ROLLOUT));
    let mut world = World::new(4, "world");
    learning.tick();
    serve(&plane, &mut world, 1500, 10.0);
    learning.tick();
    assert_eq!(record(&plane, "v2").phase, PolicyPhase::Canary);
    // The candidate's requests are four times slower than the stable policy's.
    for _ in 0..20 {
        serve(&plane, &mut world, 200, 40.0);
        learning.tick();
        if record(&plane, "v2").phase != PolicyPhase::Canary {
            break;
        }
    }
    let v2 = record(&plane, "v2");
    assert_eq!(v2.phase, PolicyPhase::Rejected);
    assert!(
        v2.message
            .as_ref()
            .unwrap()
            .contains("p95 latency 40 ms vs 10 ms"),
        "{:?}",
        v2.message
    );
    let state = plane.store().rollout_state("world").unwrap();
    assert!(state.canary.is_none());
    assert!(state.degraded.is_some());
    let config = plane.subscribe("world").unwrap().borrow().clone();
    assert_eq!(config.canary_weight, 0.0);
    assert_eq!(config.stable.as_ref().unwrap().version, "v1");
    assert_eq!(reasons(&plane).last().unwrap(), "CanaryAborted");
}

#[test]
fn pin_cancels_canary_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (plane, learning) = setup(dir.path(), &route_yaml(TRAINING, ROLLOUT));
    let mut world = World::new(5, "world");
    learning.tick();
    serve(&plane, &mut world, 1500, 10.0);
    learning.tick();
    assert_eq!(record(&plane, "v2").phase, PolicyPhase::Canary);
    // Pin v2: the canary is promoted by hand.
    let pinned = route_yaml(TRAINING, ROLLOUT) + "  policy: {version: v2}\n";
    std::fs::write(dir.path().join("routes/world.yaml"), pinned).unwrap();
    plane.reload();
    learning.tick();
    assert_eq!(record(&plane, "v2").phase, PolicyPhase::Stable);
    assert_eq!(record(&plane, "v1").phase, PolicyPhase::Retired);
    // Pin v1: rolled back.
    let pinned = route_yaml(TRAINING, ROLLOUT) + "  policy: {version: v1}\n";
    std::fs::write(dir.path().join("routes/world.yaml"), pinned).unwrap();
    plane.reload();
    learning.tick();
    assert_eq!(record(&plane, "v1").phase, PolicyPhase::Stable);
    assert_eq!(record(&plane, "v2").phase, PolicyPhase::Retired);
    assert_eq!(reasons(&plane).last().unwrap(), "RolledBack");
    let config = plane.subscribe("world").unwrap().borrow().clone();
    assert_eq!(config.stable.as_ref().unwrap().version, "v1");
}

#[test]
fn pool_change_publishes_new_prior() {
    let dir = tempfile::tempdir().unwrap();
    let (plane, learning) = setup(dir.path(), &route_yaml(TRAINING, ROLLOUT));
    learning.tick();
    assert_eq!(record(&plane, "v1").phase, PolicyPhase::Stable);

    // Remove `premium` from the pool: the prior routes to a model the route no longer has.
    let premium = "    - name: premium\n      endpoint: http://127.0.0.1:9/v1\n      model: premium\n      pricing: {inputUsdPerMillionTokens: 4, outputUsdPerMillionTokens: 4}\n";
    let yaml = route_yaml(TRAINING, ROLLOUT).replace(premium, "");
    assert!(!yaml.contains("premium"));
    std::fs::write(dir.path().join("routes/world.yaml"), yaml).unwrap();
    let report = plane.reload();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    learning.tick();

    let v2 = record(&plane, "v2");
    assert_eq!(v2.phase, PolicyPhase::Stable);
    assert_eq!(v2.origin, llmroute_api::crd::PolicyOrigin::PricingPrior);
    let message = v2.message.unwrap();
    assert!(
        message.contains("which the pool no longer lists"),
        "{message}"
    );
    assert_eq!(record(&plane, "v1").phase, PolicyPhase::Retired);
    let config = plane.subscribe("world").unwrap().borrow().clone();
    assert_eq!(config.stable.as_ref().unwrap().version, "v2");

    // A second pass changes nothing.
    learning.tick();
    assert!(
        plane
            .store()
            .policy_record("world", "v3")
            .unwrap()
            .is_none()
    );
}

#[test]
fn history_limit_keeps_last_ended_versions() {
    let dir = tempfile::tempdir().unwrap();
    let rollout = "  rollout: {revisionHistoryLimit: 2}";
    let (plane, learning) = setup(dir.path(), &route_yaml(TRAINING, rollout));
    // Each change of the pool publishes a new pricing prior and retires the stable one.
    let premium = "    - name: premium\n      endpoint: http://127.0.0.1:9/v1\n      model: premium\n      pricing: {inputUsdPerMillionTokens: 4, outputUsdPerMillionTokens: 4}\n";
    let pass = |with_premium: bool, extra: &str| {
        let mut yaml = route_yaml(TRAINING, rollout) + extra;
        if !with_premium {
            yaml = yaml.replace(premium, "");
        }
        std::fs::write(dir.path().join("routes/world.yaml"), yaml).unwrap();
        let report = plane.reload();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // End times are in milliseconds: keep them apart.
        std::thread::sleep(std::time::Duration::from_millis(5));
        learning.tick();
    };
    let versions = || -> Vec<(String, PolicyPhase)> {
        plane
            .store()
            .policy_records("world")
            .unwrap()
            .into_iter()
            .map(|r| (r.version, r.phase))
            .collect()
    };
    let phases = |expected: &[(&str, PolicyPhase)]| -> Vec<(String, PolicyPhase)> {
        expected.iter().map(|(v, p)| (v.to_string(), *p)).collect()
    };
    learning.tick();
    for round in 0..5 {
        pass(round % 2 == 1, "");
    }
    assert_eq!(
        versions(),
        phases(&[
            ("v4", PolicyPhase::Retired),
            ("v5", PolicyPhase::Retired),
            ("v6", PolicyPhase::Stable)
        ])
    );
    // The deleted versions' files are gone; the kept ones' are there.
    let records = plane.store().policy_records("world").unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("state/policies"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = records
        .iter()
        .map(|r| format!("{}.onnx", r.sha256))
        .collect();
    expected.sort();
    assert_eq!(files, expected);
    let timeline = plane.store().timeline("world", 100).unwrap();
    let pruned: Vec<&str> = timeline
        .iter()
        .filter(|e| e.reason == "PolicyHistoryPruned")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(pruned.len(), 3, "{pruned:?}");
    assert!(
        pruned[2].contains("versions v3 with their files, keeping the 2 that ended last"),
        "{}",
        pruned[2]
    );

    // Pin v5 for a rollback, release the pin, and replace v5: v5 ended last of all and stays,
    // v6, which ended first, goes, although its number is higher.
    pass(true, "");
    pass(true, "  policy: {version: v5}\n");
    assert_eq!(record(&plane, "v5").phase, PolicyPhase::Stable);
    pass(true, "");
    pass(false, "");
    assert_eq!(
        versions(),
        phases(&[
            ("v5", PolicyPhase::Retired),
            ("v7", PolicyPhase::Retired),
            ("v8", PolicyPhase::Stable)
        ])
    );

    // New versions are numbered above every version the route has had, deleted ones too.
    plane
        .store()
        .delete_policy_versions("world", &["v8".to_string()])
        .unwrap();
    assert_eq!(
        llmroute_control::learning::next_free_version(plane.store(), "world").unwrap(),
        "v9"
    );
}

#[test]
fn deleting_a_route_deletes_its_policy_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (plane, learning) = setup(dir.path(), &route_yaml(TRAINING, ROLLOUT));
    learning.tick();
    let v1 = record(&plane, "v1");
    let path = plane.store().policy_path(&v1.sha256);
    assert!(path.exists());
    // Another route's version with the same bytes keeps the file.
    let bytes = std::fs::read(&path).unwrap();
    plane.store().publish_policy("other", "v1", &bytes).unwrap();
    plane.store().delete_route("world").unwrap();
    assert!(plane.store().policy_records("world").unwrap().is_empty());
    assert!(
        plane
            .store()
            .stable_policy("world", None)
            .unwrap()
            .is_none()
    );
    assert!(plane.store().timeline("world", 10).unwrap().is_empty());
    assert!(path.exists());
    plane.store().delete_route("other").unwrap();
    assert!(!path.exists());
}

#[test]
fn route_retention_overrides_server_settings() {
    use llmroute_control::ControlBackend;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let (plane, _) = setup(dir.path(), &route_yaml(TRAINING, ROLLOUT));
    assert_eq!(plane.route_retention("world"), None);

    let yaml = route_yaml(TRAINING, ROLLOUT) + "  retention: {maxAgeDays: 2, maxEvents: 5000}\n";
    std::fs::write(dir.path().join("routes/world.yaml"), yaml).unwrap();
    let report = plane.reload();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        plane.route_retention("world"),
        Some((Some(Duration::from_secs(2 * 24 * 3600)), Some(5000)))
    );
    assert_eq!(plane.route_retention("absent"), None);
}

#[test]
fn canary_aborts_inverted_reward_candidate() {
    let dir = tempfile::tempdir().unwrap();
    // Tolerance 1 forces any candidate past the gate, so the canary analysis must stop it.
    let training =
        "  training: {minNewEvents: 600, steps: 400, intervalSeconds: 5, gate: {tolerance: 1}}";
    let (plane, learning) = setup(dir.path(), &route_yaml(training, ROLLOUT));
    let mut world = World::new(7, "world");
    learning.tick();
    let v1 = network(plane.store(), &record(&plane, "v1"));
    // Every training event has inverted feedback, so the candidate learns the worst models.
    let events: Vec<_> = (0..1500)
        .map(|_| {
            let mut event = world.event(&v1, "v1", 10.0);
            event.quality = event.quality.map(|q| 1.0 - q);
            event
        })
        .collect();
    plane
        .store()
        .insert_events("world", "test", &events)
        .unwrap();
    learning.tick();
    let v2 = record(&plane, "v2");
    assert_eq!(v2.phase, PolicyPhase::Canary, "{:?}", v2.message);

    // Live traffic has honest feedback.
    for _ in 0..20 {
        serve(&plane, &mut world, 200, 10.0);
        learning.tick();
        if record(&plane, "v2").phase != PolicyPhase::Canary {
            break;
        }
    }
    let v2 = record(&plane, "v2");
    assert_eq!(v2.phase, PolicyPhase::Rejected);
    let message = v2.message.unwrap_or_default();
    assert!(message.contains("aborted: reward is lower"), "{message}");
    assert_eq!(reasons(&plane).last().unwrap(), "CanaryAborted");
    let config = plane.subscribe("world").unwrap().borrow().clone();
    assert!(config.canary.is_none());
    assert_eq!(config.stable.as_ref().unwrap().version, "v1");
    let state = plane.store().rollout_state("world").unwrap();
    assert!(state.degraded.is_some());
}
