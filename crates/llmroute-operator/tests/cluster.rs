//! The operator against a real Kubernetes API server, one namespace per test.
//!
//! These tests need the server that `scripts/k8s-testenv start DIR` runs; `scripts/test` starts
//! it and runs them with `--ignored`. They fail, rather than skip, when
//! `LLMROUTE_TEST_KUBECONFIG` is not set. Each test runs its operators in this process, scoped
//! to its own namespace, with its own leader Lease.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use llmroute_api::SidecarConfig;
use llmroute_api::crd::{ConditionStatus, LlmPolicy, LlmRoute, PolicyOrigin, PolicyPhase};
use llmroute_operator::OperatorConfig;
use llmroute_operator::leader::LeaderElection;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

mod common;

use common::{ENCODER, client, get};

const WAIT: Duration = Duration::from_secs(30);

/// Applies the CRDs and waits until both are established.
async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in llmroute_api::crd::definitions() {
        api.patch(
            &crd.name_any(),
            &PatchParams::apply("llmroute-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("the CRD applies");
    }
    for name in ["llmroutes.llmroute.dev", "llmpolicies.llmroute.dev"] {
        eventually("CRD established", || async {
            let crd = api.get(name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await;
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::eventually_within(WAIT, what, check).await
}

struct TestNamespace {
    client: Client,
    name: String,
}

impl TestNamespace {
    async fn new(test: &str) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let name = format!("t-{test}-{}", std::process::id() % 100_000);
        let api: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &namespace)
            .await
            .expect("the test namespace is created");
        Self { client, name }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    async fn delete(self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        // The namespace controller finishes the deletion; the test does not wait for it.
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
    }
}

/// One operator running in this process.
struct Operator {
    control: String,
    ops: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    data: tempfile::TempDir,
}

impl Operator {
    async fn start(namespace: &TestNamespace, identity: &str) -> Self {
        Self::start_with(namespace, identity, None).await
    }

    /// An operator whose learning loop passes every `learning_interval`.
    async fn start_with(
        namespace: &TestNamespace,
        identity: &str,
        learning_interval: Option<Duration>,
    ) -> Self {
        Self::start_configured(namespace, identity, |config| {
            config.learning_interval = learning_interval;
        })
        .await
    }

    /// Starts an operator with the test's settings, changed by `adjust`.
    async fn start_configured(
        namespace: &TestNamespace,
        identity: &str,
        adjust: impl FnOnce(&mut OperatorConfig),
    ) -> Self {
        let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut config = OperatorConfig {
            control_address: control.local_addr().unwrap(),
            ops_address: ops.local_addr().unwrap(),
            data_dir: data.path().to_path_buf(),
            election: LeaderElection {
                renew_every: Duration::from_millis(500),
                lease_duration: Duration::from_secs(4),
                control_address: Some(control.local_addr().unwrap().to_string()),
                ..LeaderElection::new(&namespace.name, "llmroute-operator", identity)
            },
            encoder_digest: ENCODER.into(),
            embedding_dim: 384,
            watch_namespace: Some(namespace.name.clone()),
            webhook: None,
            learning_interval: None,
            shutdown_drain: Duration::ZERO,
            replication_interval: llmroute_operator::replication::DEFAULT_PULL_INTERVAL,
        };
        adjust(&mut config);
        let control_url = format!("http://{}", control.local_addr().unwrap());
        let ops_url = format!("http://{}", ops.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let client = namespace.client.clone();
        let task = tokio::spawn(async move {
            let listeners = llmroute_operator::Listeners {
                control,
                ops,
                webhook: None,
            };
            llmroute_operator::run_with_listeners(client, config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("the operator runs");
        });
        let operator = Self {
            control: control_url,
            ops: ops_url,
            stop: Some(stop),
            task,
            data,
        };
        eventually("the operator to be ready", || async {
            let (status, _) = get(&format!("{}/readyz", operator.ops)).await?;
            (status == 200).then_some(())
        })
        .await;
        operator
    }

    async fn is_leader(&self) -> bool {
        let Some((_, body)) = get(&format!("{}/metrics", self.ops)).await else {
            return false;
        };
        String::from_utf8_lossy(&body)
            .lines()
            .any(|line| line == "llmroute_operator_leader 1")
    }

    /// Decision ids of the events of `route` in this operator's own store.
    fn stored_ids(&self, route: &str) -> Vec<String> {
        let store = llmroute_control::store::Store::open(self.data.path()).unwrap();
        let mut ids: Vec<String> = store
            .events(route)
            .unwrap()
            .into_iter()
            .map(|e| e.decision.decision_id)
            .collect();
        ids.sort();
        ids
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("the operator stops within 20 s")
            .expect("the operator task ends cleanly");
    }
}

fn route_manifest(name: &str, extra: Value) -> Value {
    let mut spec = json!({
        "models": [
            {"name": "small", "endpoint": "http://127.0.0.1:9/v1", "model": "small-1",
             "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.4}},
            {"name": "large", "endpoint": "http://127.0.0.1:9/v1", "model": "large-1",
             "pricing": {"inputUsdPerMillionTokens": 2.5, "outputUsdPerMillionTokens": 10}}
        ],
        "defaultPreference": {"quality": 0.7},
        "fallback": "small",
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            spec.insert(key.clone(), value.clone());
        }
    }
    json!({
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": name},
        "spec": spec,
    })
}

async fn apply_route(namespace: &TestNamespace, manifest: &Value) -> Result<LlmRoute, kube::Error> {
    let api: Api<LlmRoute> = namespace.api();
    let name = manifest["metadata"]["name"].as_str().unwrap();
    api.patch(
        name,
        &PatchParams::apply("llmroute-tests").force(),
        &Patch::Apply(manifest),
    )
    .await
}

/// Waits until the route's `Ready` condition has `status` and `reason` for its current
/// generation, and returns the route.
async fn wait_ready(
    namespace: &TestNamespace,
    name: &str,
    status: ConditionStatus,
    reason: &str,
) -> LlmRoute {
    let api: Api<LlmRoute> = namespace.api();
    eventually(&format!("{name} Ready={status:?} ({reason})"), || async {
        let route = api.get(name).await.ok()?;
        let current = route.status.as_ref()?;
        let ready = current.conditions.iter().find(|c| c.type_ == "Ready")?;
        (current.observed_generation == route.metadata.generation
            && ready.status == status
            && ready.reason == reason)
            .then_some(route)
    })
    .await
}

async fn policies(namespace: &TestNamespace) -> Vec<LlmPolicy> {
    let api: Api<LlmPolicy> = namespace.api();
    api.list(&ListParams::default()).await.unwrap().items
}

async fn events_for(namespace: &TestNamespace, name: &str) -> Vec<Event> {
    let api: Api<Event> = namespace.api();
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

async fn sidecar_config(operator: &Operator, key: &str, after: u64) -> SidecarConfig {
    eventually(
        &format!("config of {key} above version {after}"),
        || async {
            let (status, body) = get(&format!(
                "{}/v1/routes/{key}/config?version={after}&waitSeconds=1",
                operator.control
            ))
            .await?;
            if status != 200 {
                return None;
            }
            serde_json::from_slice(&body).ok()
        },
    )
    .await
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn route_becomes_ready_with_an_initial_policy_and_follows_spec_changes() {
    let namespace = TestNamespace::new("ready").await;
    let operator = Operator::start(&namespace, "one").await;
    apply_route(&namespace, &route_manifest("chat", json!({})))
        .await
        .unwrap();
    let route = wait_ready(&namespace, "chat", ConditionStatus::True, "Serving").await;
    let status = route.status.clone().unwrap();
    assert_eq!(status.stable_policy.as_deref(), Some("v1"));
    assert_eq!(status.models, Some(2));
    assert_eq!(status.config_version, Some(1));
    for condition in ["PolicyReady", "Progressing", "Degraded"] {
        assert!(
            status.conditions.iter().any(|c| c.type_ == condition),
            "{condition} missing: {:?}",
            status.conditions
        );
    }
    assert!(
        route
            .finalizers()
            .contains(&"llmroute.dev/cleanup".to_string())
    );

    // The initial policy: an LLMPolicy owned by the route, its ConfigMap, phase Stable.
    let listed = policies(&namespace).await;
    assert_eq!(listed.len(), 1);
    let policy = &listed[0];
    assert_eq!(policy.spec.origin, PolicyOrigin::PricingPrior);
    assert_eq!(policy.spec.models, ["small", "large"]);
    assert_eq!(
        policy.status.as_ref().and_then(|s| s.phase),
        Some(PolicyPhase::Stable)
    );
    assert_eq!(
        policy.owner_references()[0].uid,
        route.metadata.uid.clone().unwrap()
    );
    let configmaps: Api<ConfigMap> = namespace.api();
    let configmap = configmaps.get(&policy.spec.artifact.name).await.unwrap();
    let bytes = &configmap.binary_data.unwrap()["policy.onnx"].0;
    assert_eq!(hex::encode(Sha256::digest(bytes)), policy.spec.sha256);

    // The control API serves the configuration and the policy bytes.
    let key = format!("{}/chat", namespace.name);
    let config = sidecar_config(&operator, &key, 0).await;
    assert_eq!(config.version, 1);
    assert_eq!(config.stable.as_ref().unwrap().sha256, policy.spec.sha256);
    let (code, served) = get(&format!(
        "{}/v1/policies/{}",
        operator.control, policy.spec.sha256
    ))
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert_eq!(&served, bytes);

    // A spec change: new generation observed, new configuration version, seen by a sidecar.
    let mut changed = route_manifest("chat", json!({"defaultPreference": {"quality": 0.2}}));
    changed["spec"]["exploration"] = json!({"mode": "epsilonGreedy", "epsilon": 0.1});
    apply_route(&namespace, &changed).await.unwrap();
    let route = wait_ready(&namespace, "chat", ConditionStatus::True, "Serving").await;
    assert_eq!(route.metadata.generation, Some(2));
    assert_eq!(route.status.as_ref().unwrap().observed_generation, Some(2));
    assert_eq!(route.status.as_ref().unwrap().config_version, Some(2));
    let config = sidecar_config(&operator, &key, 1).await;
    assert_eq!(config.version, 2);
    assert!((config.default_preference.quality - 0.2).abs() < 1e-9);
    assert_eq!(
        policies(&namespace).await.len(),
        1,
        "a preference change keeps the policy"
    );

    // A new pool needs a new policy: v2 from the prior, v1 retired.
    let mut pool = route_manifest("chat", json!({}));
    pool["spec"]["models"][1]["name"] = json!("huge");
    apply_route(&namespace, &pool).await.unwrap();
    let route = wait_ready(&namespace, "chat", ConditionStatus::True, "Serving").await;
    assert_eq!(
        route.status.as_ref().unwrap().stable_policy.as_deref(),
        Some("v2")
    );
    let mut phases: Vec<(String, Option<PolicyPhase>)> = policies(&namespace)
        .await
        .into_iter()
        .map(|p| (p.spec.version, p.status.and_then(|s| s.phase)))
        .collect();
    phases.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        phases,
        [
            ("v1".to_string(), Some(PolicyPhase::Retired)),
            ("v2".to_string(), Some(PolicyPhase::Stable))
        ]
    );
    let (_, metrics) = get(&format!("{}/metrics", operator.ops)).await.unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("llmroute_operator_reconciles_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llmroute_operator_routes_served 1"),
        "{metrics}"
    );
    operator.stop().await;
    namespace.delete().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn invalid_routes_are_refused_or_reported_and_do_not_block_others() {
    let namespace = TestNamespace::new("invalid").await;
    let operator = Operator::start(&namespace, "one").await;

    // What the schema and CEL rules catch never reaches the operator.
    let bad_fallback = route_manifest("bad", json!({"fallback": "nope"}));
    let error = apply_route(&namespace, &bad_fallback)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("spec.fallback must name one of spec.models"),
        "{error}"
    );
    let bad_price = route_manifest("bad", json!({}));
    let mut bad_price = bad_price;
    bad_price["spec"]["models"][0]["pricing"]["inputUsdPerMillionTokens"] = json!(-1);
    let error = apply_route(&namespace, &bad_price)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("inputUsdPerMillionTokens"), "{error}");
    let bad_preference = route_manifest(
        "bad",
        json!({"defaultPreference": {"quality": 0.5, "cost": 0.7}}),
    );
    let error = apply_route(&namespace, &bad_preference)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("quality + cost must be 1"), "{error}");

    // Unknown fields: server-side apply and strict field validation (kubectl's default
    // since 1.27) refuse them; other writes have them pruned, so the operator never sees them.
    let routes: Api<LlmRoute> = namespace.api();
    let mut unknown = route_manifest("typo", json!({}));
    unknown["spec"]["fallbak"] = json!("small");
    let error = apply_route(&namespace, &unknown)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("fallbak"), "{error}");
    apply_route(&namespace, &route_manifest("typo", json!({})))
        .await
        .unwrap();
    let typo = json!({"spec": {"fallbak": "large"}});
    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::default()
    };
    let error = routes
        .patch("typo", &strict, &Patch::Merge(&typo))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("fallbak"), "{error}");
    let lenient = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Ignore),
        ..PatchParams::default()
    };
    let pruned = routes
        .patch("typo", &lenient, &Patch::Merge(&typo))
        .await
        .unwrap();
    assert_eq!(
        pruned.spec.fallback, "small",
        "the unknown field was pruned"
    );
    routes
        .delete("typo", &DeleteParams::default())
        .await
        .unwrap();
    let mut huge = route_manifest("huge", json!({}));
    let model = huge["spec"]["models"][0].clone();
    huge["spec"]["models"] = Value::Array(
        (0..33)
            .map(|i| {
                let mut m = model.clone();
                m["name"] = json!(format!("m{i}"));
                m
            })
            .collect(),
    );
    huge["spec"]["fallback"] = json!("m0");
    let error = apply_route(&namespace, &huge)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("spec.models"), "{error}");
    huge["spec"]["models"] = json!([model.clone()]);
    huge["spec"]["models"][0]["model"] = json!("x".repeat(300));
    let error = apply_route(&namespace, &huge)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("spec.models[0].model"), "{error}");

    // Conflicting edits: a second manager cannot silently take a field another one set.
    apply_route(&namespace, &route_manifest("shared", json!({})))
        .await
        .unwrap();
    let mut other = route_manifest("shared", json!({}));
    other["spec"]["fallback"] = json!("large");
    let error = routes
        .patch(
            "shared",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(&other),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(error.to_lowercase().contains("conflict"), "{error}");

    // What only the operator can know: a pin to a version that does not exist.
    let pinned = route_manifest("pinned", json!({"policy": {"version": "v9"}}));
    apply_route(&namespace, &pinned).await.unwrap();
    apply_route(&namespace, &route_manifest("good", json!({})))
        .await
        .unwrap();
    let route = wait_ready(
        &namespace,
        "pinned",
        ConditionStatus::False,
        "UnknownPolicyVersion",
    )
    .await;
    let ready = route
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(ready.message.contains("\"v9\""), "{}", ready.message);
    assert!(
        ready.message.contains("published versions: none"),
        "{}",
        ready.message
    );
    wait_ready(&namespace, "good", ConditionStatus::True, "Serving").await;
    let events = eventually("an UnknownPolicyVersion Event", || async {
        let events = events_for(&namespace, "pinned").await;
        events
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("UnknownPolicyVersion")
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(events)
    })
    .await;
    assert!(!events.is_empty());
    // The invalid route is not served; the valid one is.
    let (code, _) = get(&format!(
        "{}/v1/routes/{}/pinned/config",
        operator.control, namespace.name
    ))
    .await
    .unwrap();
    assert_eq!(code, 404);
    sidecar_config(&operator, &format!("{}/good", namespace.name), 0).await;

    // Fixing the pin makes the route ready.
    apply_route(
        &namespace,
        &route_manifest("pinned", json!({"policy": {"version": "v1"}})),
    )
    .await
    .unwrap();
    // v1 is not published for "pinned" until the pin goes; remove it, then pin the real v1.
    apply_route(&namespace, &route_manifest("pinned", json!({})))
        .await
        .unwrap();
    wait_ready(&namespace, "pinned", ConditionStatus::True, "Serving").await;
    apply_route(
        &namespace,
        &route_manifest("pinned", json!({"policy": {"version": "v1"}})),
    )
    .await
    .unwrap();
    wait_ready(&namespace, "pinned", ConditionStatus::True, "Serving").await;
    operator.stop().await;
    namespace.delete().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn missing_secret_is_a_condition_until_it_is_created() {
    let namespace = TestNamespace::new("secret").await;
    let operator = Operator::start(&namespace, "one").await;
    let mut manifest = route_manifest("keyed", json!({}));
    manifest["spec"]["models"][1]["apiKeySecretRef"] = json!({"name": "llm-keys", "key": "large"});
    apply_route(&namespace, &manifest).await.unwrap();
    let route = wait_ready(
        &namespace,
        "keyed",
        ConditionStatus::False,
        "SecretNotFound",
    )
    .await;
    let ready = route
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(ready.message.contains("llm-keys"), "{}", ready.message);
    assert!(
        ready
            .message
            .contains("kubectl create secret generic llm-keys"),
        "{}",
        ready.message
    );

    // A Secret without the key is a different reason.
    let secrets: Api<Secret> = namespace.api();
    let mut data = BTreeMap::new();
    data.insert("small".to_string(), "x".to_string());
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "llm-keys"},
        "stringData": data,
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    wait_ready(
        &namespace,
        "keyed",
        ConditionStatus::False,
        "SecretKeyNotFound",
    )
    .await;

    let patch = json!({"stringData": {"large": "sk-test"}});
    secrets
        .patch("llm-keys", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_ready(&namespace, "keyed", ConditionStatus::True, "Serving").await;
    let events = events_for(&namespace, "keyed").await;
    let reasons: Vec<&str> = events.iter().filter_map(|e| e.reason.as_deref()).collect();
    for reason in [
        "SecretNotFound",
        "SecretKeyNotFound",
        "Serving",
        "PolicyPublished",
    ] {
        assert!(
            reasons.contains(&reason),
            "{reason} missing from {reasons:?}"
        );
    }
    operator.stop().await;
    namespace.delete().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn deleting_a_route_removes_what_it_owns() {
    let namespace = TestNamespace::new("delete").await;
    let operator = Operator::start(&namespace, "one").await;
    apply_route(&namespace, &route_manifest("gone", json!({})))
        .await
        .unwrap();
    apply_route(&namespace, &route_manifest("kept", json!({})))
        .await
        .unwrap();
    wait_ready(&namespace, "gone", ConditionStatus::True, "Serving").await;
    wait_ready(&namespace, "kept", ConditionStatus::True, "Serving").await;
    let key = format!("{}/gone", namespace.name);
    sidecar_config(&operator, &key, 0).await;

    let routes: Api<LlmRoute> = namespace.api();
    routes
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the route to be gone", || async {
        routes.get_opt("gone").await.ok()?.is_none().then_some(())
    })
    .await;
    let configmaps: Api<ConfigMap> = namespace.api();
    let left: Vec<String> = policies(&namespace)
        .await
        .into_iter()
        .map(|p| p.spec.route)
        .collect();
    assert_eq!(left, ["kept"]);
    let names: Vec<String> = configmaps
        .list(&ListParams::default().labels("llmroute.dev/route"))
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(names, ["kept-policy-v1"]);
    eventually("the control API to drop the route", || async {
        let (code, _) = get(&format!("{}/v1/routes/{key}/config", operator.control)).await?;
        (code == 404).then_some(())
    })
    .await;
    operator.stop().await;
    namespace.delete().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn a_restarted_operator_publishes_no_duplicate_policy() {
    let namespace = TestNamespace::new("restart").await;
    let operator = Operator::start(&namespace, "first").await;
    for name in ["a", "b", "c"] {
        apply_route(&namespace, &route_manifest(name, json!({})))
            .await
            .unwrap();
    }
    for name in ["a", "b", "c"] {
        wait_ready(&namespace, name, ConditionStatus::True, "Serving").await;
    }
    operator.stop().await;

    let operator = Operator::start(&namespace, "second").await;
    eventually("the new operator to lead", || async {
        operator.is_leader().await.then_some(())
    })
    .await;
    // Give the controller time to reconcile every route again.
    let routes: Api<LlmRoute> = namespace.api();
    let before: Vec<_> = routes.list(&ListParams::default()).await.unwrap().items;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = policies(&namespace).await;
    let mut names: Vec<String> = listed.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["a-v1", "b-v1", "c-v1"]);
    for route in before {
        let name = route.name_any();
        let after = wait_ready(&namespace, &name, ConditionStatus::True, "Serving").await;
        assert_eq!(
            after.status.unwrap().config_version,
            route.status.unwrap().config_version,
            "a restart does not bump {name}'s configuration version"
        );
    }
    operator.stop().await;
    namespace.delete().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn two_replicas_elect_one_leader_and_hand_over() {
    let namespace = TestNamespace::new("leader").await;
    let first = Operator::start(&namespace, "replica-a").await;
    let second = Operator::start(&namespace, "replica-b").await;
    let leases: Api<Lease> = namespace.api();
    let holder = eventually("a Lease holder", || async {
        leases
            .get_opt("llmroute-operator")
            .await
            .ok()??
            .spec?
            .holder_identity
    })
    .await;
    // Both replicas serve; exactly one leads, for several renewal periods.
    for _ in 0..10 {
        let leaders = [first.is_leader().await, second.is_leader().await];
        assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The models of the simulated world, so that its events pass the leader's checks.
    apply_route(&namespace, &learning_route("shared"))
        .await
        .unwrap();
    wait_ready(&namespace, "shared", ConditionStatus::True, "Serving").await;
    let key = format!("{}/shared", namespace.name);
    let a = sidecar_config(&first, &key, 0).await;
    let b = sidecar_config(&second, &key, 0).await;
    assert_eq!(a, b, "both replicas serve the same configuration");

    // Events posted to the follower are stored by the leader, which trains on them.
    let (leader, follower) = if holder == "replica-a" {
        (first, second)
    } else {
        (second, first)
    };
    let token = sidecar_token(&namespace, "app").await;
    let mut world = world::World::new(7, &key);
    serve_requests(&follower, &key, &token, &mut world, 20, 10.0).await;
    let stored = leader.stored_ids(&key);
    assert_eq!(stored.len(), 20, "the leader stores the batch");
    let (_, metrics) = get(&format!("{}/metrics", follower.control)).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        metrics.contains("llmroute_control_event_batches_forwarded_total{outcome=\"200\"} 1"),
        "{metrics}"
    );
    // The follower copies the leader's events within a few pulls.
    eventually("the follower's copy of the events", || async {
        (follower.stored_ids(&key) == stored).then_some(())
    })
    .await;
    let (_, metrics) = get(&format!("{}/metrics", follower.ops)).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    assert!(
        metrics.contains("llmroute_operator_replicated_events_total 20"),
        "{metrics}"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = namespace.api();
    assert!(
        secrets
            .get_opt("llmroute-operator-replication")
            .await
            .unwrap()
            .is_some(),
        "the replicas' shared token"
    );

    // The leader stops and releases the Lease; the other takes over with the events.
    leader.stop().await;
    eventually("the follower to lead", || async {
        follower.is_leader().await.then_some(())
    })
    .await;
    assert_eq!(follower.stored_ids(&key), stored, "the new leader has them");
    apply_route(&namespace, &route_manifest("after", json!({})))
        .await
        .unwrap();
    wait_ready(&namespace, "after", ConditionStatus::True, "Serving").await;
    let lease = leases.get("llmroute-operator").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_ne!(spec.holder_identity.as_deref(), Some(holder.as_str()));
    assert!(spec.lease_transitions.unwrap_or(0) >= 1);
    follower.stop().await;
    namespace.delete().await;
}

/// Checks that a stopping leader releases the Lease before its control API closes, and that
/// the replica that takes over pulls its last events at once. The periodic pull is an hour apart here,
/// so only that last pull can bring them.
#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn new_leader_pulls_last_events_of_old() {
    let namespace = TestNamespace::new("handover").await;
    let hourly =
        |config: &mut OperatorConfig| config.replication_interval = Duration::from_secs(3600);
    let first = Operator::start_configured(&namespace, "replica-a", hourly).await;
    let second = Operator::start_configured(&namespace, "replica-b", hourly).await;
    apply_route(&namespace, &learning_route("shared"))
        .await
        .unwrap();
    wait_ready(&namespace, "shared", ConditionStatus::True, "Serving").await;
    let key = format!("{}/shared", namespace.name);
    let (leader, follower) = loop {
        match (first.is_leader().await, second.is_leader().await) {
            (true, false) => break (first, second),
            (false, true) => break (second, first),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let token = sidecar_token(&namespace, "app").await;
    let mut world = world::World::new(11, &key);
    serve_requests(&follower, &key, &token, &mut world, 20, 10.0).await;
    let stored = leader.stored_ids(&key);
    assert_eq!(stored.len(), 20, "the leader stores the batch");
    assert!(
        follower.stored_ids(&key).is_empty(),
        "no periodic pull came after the events"
    );

    leader.stop().await;
    eventually("the follower to lead", || async {
        follower.is_leader().await.then_some(())
    })
    .await;
    eventually(
        "the new leader's copy of the old leader's events",
        || async { (follower.stored_ids(&key) == stored).then_some(()) },
    )
    .await;
    follower.stop().await;
    namespace.delete().await;
}

/// Applies what `llmroute install` prints, then runs an operator as the installed service
/// account (impersonated): its RBAC must be enough for every step, and no more than it needs.
#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn installed_rbac_is_enough_for_the_operator_and_no_more() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    use kube::discovery::Discovery;

    let namespace = TestNamespace::new("install").await;
    let install_namespace = format!("{}-system", namespace.name);
    let options = llmroute_operator::install::InstallOptions {
        namespace: install_namespace.clone(),
        ..Default::default()
    };
    let client = namespace.client.clone();
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    for object in llmroute_operator::install::manifests(&options) {
        let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
            Some((group, version)) => (group.to_string(), version.to_string()),
            None => (
                String::new(),
                object["apiVersion"].as_str().unwrap().to_string(),
            ),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, object["kind"].as_str().unwrap());
        let (resource, capabilities) = discovery
            .resolve_gvk(&gvk)
            .expect("the server knows the kind");
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let api: Api<DynamicObject> = match capabilities.scope {
            kube::discovery::Scope::Namespaced => {
                Api::namespaced_with(client.clone(), &install_namespace, &resource)
            }
            kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let _: &ApiResource = &resource;
        // A server-side dry run first, then for real, as `kubectl apply --server-side` does.
        for dry_run in [true, false] {
            let mut params = PatchParams::apply("llmroute-install-test").force();
            params.dry_run = dry_run;
            api.patch(&name, &params, &Patch::Apply(&object))
                .await
                .unwrap_or_else(|e| panic!("{} {name} (dry run {dry_run}): {e}", object["kind"]));
        }
    }

    // What the service account may and may not do.
    let account = format!("system:serviceaccount:{install_namespace}:llmroute-operator");
    let may = |verb: &str, group: &str, resource: &str, ns: &str| {
        let client = client.clone();
        let account = account.clone();
        let (verb, group, resource, ns) = (
            verb.to_string(),
            group.to_string(),
            resource.to_string(),
            ns.to_string(),
        );
        async move {
            use k8s_openapi::api::authorization::v1::SubjectAccessReview;
            let review: SubjectAccessReview = serde_json::from_value(json!({
                "spec": {"user": account, "groups": ["system:serviceaccounts"],
                         "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": ns}}
            }))
            .unwrap();
            let api: Api<SubjectAccessReview> = Api::all(client);
            let answer = api.create(&PostParams::default(), &review).await.unwrap();
            answer.status.unwrap().allowed
        }
    };
    let ns = namespace.name.as_str();
    assert!(may("get", "", "secrets", ns).await);
    assert!(
        !may("list", "", "secrets", ns).await,
        "secrets are never listed"
    );
    assert!(!may("watch", "", "secrets", ns).await);
    assert!(!may("create", "", "pods", ns).await);
    assert!(may("patch", "llmroute.dev", "llmroutes/status", ns).await);
    assert!(
        !may("delete", "llmroute.dev", "llmroutes", ns).await,
        "routes belong to users"
    );
    assert!(
        may(
            "update",
            "coordination.k8s.io",
            "leases",
            &install_namespace
        )
        .await
    );
    assert!(
        !may("update", "coordination.k8s.io", "leases", ns).await,
        "leases only in its own namespace"
    );

    // An operator with exactly these rights reconciles a route with a Secret end to end.
    let mut config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(std::env::var("LLMROUTE_TEST_KUBECONFIG").unwrap()).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some(account.clone());
    config.auth_info.impersonate_groups = Some(vec!["system:serviceaccounts".into()]);
    let restricted = TestNamespace {
        client: Client::try_from(config).unwrap(),
        name: namespace.name.clone(),
    };
    let forbidden = restricted
        .api::<Secret>()
        .list(&ListParams::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        forbidden.contains("forbidden"),
        "the client acts as the service account: {forbidden}"
    );
    let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_url = format!("http://{}", ops.local_addr().unwrap());
    let data = tempfile::tempdir().unwrap();
    let operator_config = OperatorConfig {
        control_address: control.local_addr().unwrap(),
        ops_address: ops.local_addr().unwrap(),
        data_dir: data.path().to_path_buf(),
        // With a control address, as the manifests set it: event forwarding and replication
        // on, so the service account also creates the replicas' token Secret.
        election: LeaderElection {
            control_address: Some(control.local_addr().unwrap().to_string()),
            ..LeaderElection::new(&install_namespace, "llmroute-operator", "installed")
        },
        encoder_digest: ENCODER.into(),
        embedding_dim: 384,
        watch_namespace: Some(namespace.name.clone()),
        webhook: None,
        learning_interval: None,
        shutdown_drain: Duration::ZERO,
        replication_interval: llmroute_operator::replication::DEFAULT_PULL_INTERVAL,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(llmroute_operator::run_with_listeners(
        restricted.client.clone(),
        operator_config,
        llmroute_operator::Listeners {
            control,
            ops,
            webhook: None,
        },
        async {
            let _ = stopped.await;
        },
    ));
    eventually("the restricted operator to lead", || async {
        let (_, body) = get(&format!("{ops_url}/metrics")).await?;
        String::from_utf8_lossy(&body)
            .lines()
            .any(|l| l == "llmroute_operator_leader 1")
            .then_some(())
    })
    .await;
    let secrets: Api<Secret> = namespace.api();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "keys"}, "stringData": {"large": "sk-test"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let mut manifest = route_manifest("rbac", json!({}));
    manifest["spec"]["models"][1]["apiKeySecretRef"] = json!({"name": "keys", "key": "large"});
    apply_route(&namespace, &manifest).await.unwrap();
    wait_ready(&namespace, "rbac", ConditionStatus::True, "Serving").await;
    let events = eventually("Events written by the restricted operator", || async {
        let events = events_for(&namespace, "rbac").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("PolicyPublished"))
    );
    let routes: Api<LlmRoute> = namespace.api();
    routes
        .delete("rbac", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the route's cleanup under the installed RBAC", || async {
        routes.get_opt("rbac").await.ok()?.is_none().then_some(())
    })
    .await;
    let install_secrets: Api<Secret> = Api::namespaced(client.clone(), &install_namespace);
    assert!(
        install_secrets
            .get_opt("llmroute-operator-replication")
            .await
            .unwrap()
            .is_some(),
        "the service account created the replicas' token"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .delete(&install_namespace, &DeleteParams::default())
        .await;
    namespace.delete().await;
}

/// A policy file for `models`, as `llmroute train` writes one (here the pricing prior).
fn policy_file(models: &[&str], encoder: &str) -> Vec<u8> {
    use llmroute_policy::policy::prior::{PricedModel, pricing_prior};
    let priced: Vec<PricedModel> = models
        .iter()
        .enumerate()
        .map(|(i, name)| PricedModel {
            name: name.to_string(),
            input_usd_per_million_tokens: 0.1 + i as f64,
            output_usd_per_million_tokens: 0.4 + i as f64,
        })
        .collect();
    let (network, metadata) = pricing_prior(&priced, "pretrained-1", encoder, 384, 0.002);
    llmroute_policy::policy::to_onnx_bytes(&network, &metadata)
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn a_referenced_pretrained_policy_is_checked_and_used() {
    let namespace = TestNamespace::new("pretrained").await;
    let operator = Operator::start(&namespace, "one").await;
    let configmaps: Api<ConfigMap> = namespace.api();
    let initial = json!({"policy": {"initial": {"name": "trained", "key": "policy.onnx"}}});

    // Missing ConfigMap: a condition that names it, checked again until it exists.
    apply_route(&namespace, &route_manifest("chat", initial.clone()))
        .await
        .unwrap();
    wait_ready(
        &namespace,
        "chat",
        ConditionStatus::False,
        "InitialPolicyNotFound",
    )
    .await;

    // A policy for other models: refused with both lists in the message.
    let wrong = policy_file(&["a", "b"], ENCODER);
    let configmap: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "trained"},
        "binaryData": {"policy.onnx": k8s_openapi::ByteString(wrong)},
    }))
    .unwrap();
    configmaps
        .create(&PostParams::default(), &configmap)
        .await
        .unwrap();
    let route = wait_ready(
        &namespace,
        "chat",
        ConditionStatus::False,
        "InitialPolicyInvalid",
    )
    .await;
    let ready = route
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(ready.message.contains("[a, b]"), "{}", ready.message);
    assert!(
        ready.message.contains("[small, large]"),
        "{}",
        ready.message
    );

    // The right policy: published as v1 with its own bytes, origin Pretrained.
    let right = policy_file(&["small", "large"], ENCODER);
    let patch = json!({"binaryData": {"policy.onnx": k8s_openapi::ByteString(right.clone())}});
    configmaps
        .patch("trained", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_ready(&namespace, "chat", ConditionStatus::True, "Serving").await;
    let listed = policies(&namespace).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].spec.origin, PolicyOrigin::Pretrained);
    assert_eq!(listed[0].spec.sha256, hex::encode(Sha256::digest(&right)));
    assert_eq!(listed[0].spec.source.as_ref().unwrap().name, "trained");
    operator.stop().await;
    namespace.delete().await;
}

/// Creates the ConfigMap and the `LLMPolicy` of a trained `version` of `route`, as an earlier
/// leader would have left them, with `phase` in the policy's status. With `phase` `None` it
/// creates only the ConfigMap. Returns the file's sha256.
async fn seed_policy(
    namespace: &TestNamespace,
    route: &str,
    version: &str,
    phase: Option<PolicyPhase>,
) -> String {
    // A different encoder digest in each file, so that every version has its own file. The
    // files of rejected versions are never loaded.
    let bytes = policy_file(&["small", "large"], &format!("{ENCODER}-{version}"));
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let configmap_name = format!("{route}-policy-{version}");
    let configmap: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": configmap_name,
            "labels": {
                "app.kubernetes.io/managed-by": "llmroute-operator",
                "llmroute.dev/route": route,
                "llmroute.dev/policy-version": version,
            },
            "annotations": {"llmroute.dev/policy-sha256": sha256},
        },
        "binaryData": {"policy.onnx": k8s_openapi::ByteString(bytes)},
    }))
    .unwrap();
    let configmaps: Api<ConfigMap> = namespace.api();
    configmaps
        .create(&PostParams::default(), &configmap)
        .await
        .unwrap();
    let Some(phase) = phase else {
        return sha256;
    };
    let policy: LlmPolicy = serde_json::from_value(json!({
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMPolicy",
        "metadata": {
            "name": format!("{route}-{version}"),
            "labels": {
                "app.kubernetes.io/managed-by": "llmroute-operator",
                "llmroute.dev/route": route,
            },
        },
        "spec": {
            "route": route,
            "version": version,
            "sha256": sha256,
            "artifact": {"name": configmap_name, "key": "policy.onnx"},
            "models": ["small", "large"],
            "encoder": ENCODER,
            "costScaleUsd": 0.002,
            "origin": "trained",
            "parent": "v1",
        },
    }))
    .unwrap();
    let policies: Api<LlmPolicy> = namespace.api();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let status = json!({"status": {"phase": phase, "message": "seeded by the test"}});
    policies
        .patch_status(
            &format!("{route}-{version}"),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    sha256
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn old_policy_versions_are_deleted_beyond_the_history_limit() {
    let namespace = TestNamespace::new("history").await;
    // Three rejected versions from an earlier leader, and a ConfigMap whose LLMPolicy is gone.
    seed_policy(&namespace, "chat", "v1", None).await;
    let mut seeded = Vec::new();
    for version in ["v2", "v3", "v4"] {
        seeded.push(seed_policy(&namespace, "chat", version, Some(PolicyPhase::Rejected)).await);
    }
    let operator = Operator::start_with(&namespace, "one", Some(Duration::from_millis(500))).await;
    let route = json!({"rollout": {"revisionHistoryLimit": 1}});
    apply_route(&namespace, &route_manifest("chat", route))
        .await
        .unwrap();
    // The reconciler numbers the pricing prior above every listed version.
    wait_ready(&namespace, "chat", ConditionStatus::True, "Serving").await;
    let policies_api: Api<LlmPolicy> = namespace.api();
    let configmaps: Api<ConfigMap> = namespace.api();
    let versions = || async {
        let mut names: Vec<String> = policies(&namespace)
            .await
            .into_iter()
            .map(|p| p.name_any())
            .collect();
        names.sort();
        names
    };
    let configmap_names = || async {
        let mut names: Vec<String> = configmaps
            .list(&ListParams::default().labels("llmroute.dev/route=chat"))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| c.name_any())
            .collect();
        names.sort();
        names
    };
    eventually("the history limit to leave v4 and v5", || async {
        (versions().await == ["chat-v4", "chat-v5"]
            && configmap_names().await == ["chat-policy-v4", "chat-policy-v5"])
        .then_some(())
    })
    .await;
    let v5 = policies_api.get("chat-v5").await.unwrap();
    assert_eq!(v5.status.and_then(|s| s.phase), Some(PolicyPhase::Stable));
    let event = eventually("the PolicyHistoryPruned Event", || async {
        events_for(&namespace, "chat")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("PolicyHistoryPruned"))
    })
    .await;
    let note = event.note.unwrap_or_default();
    assert!(note.contains("v2, v3"), "{note}");
    // The leader's store deleted the files too.
    let key = format!("{}/chat", namespace.name);
    let store = llmroute_control::store::Store::open(operator.data.path()).unwrap();
    let kept: Vec<String> = store
        .policy_records(&key)
        .unwrap()
        .into_iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(kept, ["v4", "v5"]);
    for sha256 in [&seeded[0], &seeded[1]] {
        assert!(!store.policy_path(sha256).exists(), "{sha256}");
    }
    assert!(store.policy_path(&seeded[2]).exists());

    // A version deleted by hand stays deleted: the leader does not publish it again, and
    // deletes its ConfigMap.
    policies_api
        .delete("chat-v4", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the ConfigMap of v4 to go", || async {
        (configmap_names().await == ["chat-policy-v5"]).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(versions().await, ["chat-v5"]);
    assert!(store.policy_record(&key, "v4").unwrap().is_none());

    // The status records the highest version so far, and new versions are numbered above
    // it: here as if v6 to v9 had existed and been deleted.
    let routes: Api<LlmRoute> = namespace.api();
    let recorded = |route: LlmRoute| route.status.and_then(|s| s.highest_policy_version);
    assert_eq!(
        recorded(routes.get("chat").await.unwrap()).as_deref(),
        Some("v5")
    );
    let raised = json!({
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "status": {"highestPolicyVersion": "v9"},
    });
    routes
        .patch_status(
            "chat",
            &PatchParams::apply("llmroute-tests").force(),
            &Patch::Apply(&raised),
        )
        .await
        .unwrap();
    // A pool change makes the reconciler publish a new pricing prior.
    let pool = json!({
        "models": [
            {"name": "small", "endpoint": "http://127.0.0.1:9/v1", "model": "small-1",
             "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.4}},
        ],
        "rollout": {"revisionHistoryLimit": 1},
    });
    apply_route(&namespace, &route_manifest("chat", pool))
        .await
        .unwrap();
    let route = wait_ready(&namespace, "chat", ConditionStatus::True, "Serving").await;
    assert_eq!(
        route
            .status
            .as_ref()
            .and_then(|s| s.stable_policy.as_deref()),
        Some("v10")
    );
    eventually("the status to record v10", || async {
        (recorded(routes.get("chat").await.ok()?).as_deref() == Some("v10")).then_some(())
    })
    .await;
    let v5 = eventually("v5 to be retired with an end time", || async {
        let policy = policies_api.get("chat-v5").await.ok()?;
        let status = policy.status.clone()?;
        (status.phase == Some(PolicyPhase::Retired) && status.end_time.is_some()).then_some(policy)
    })
    .await;
    let end_time = v5.status.unwrap().end_time.unwrap();
    assert!(end_time.starts_with("20"), "{end_time}");

    // A ConfigMap of v11 without its LLMPolicy, left by a publication that stopped half way,
    // claims v11 too: the next pool change publishes v12.
    seed_policy(&namespace, "chat", "v11", None).await;
    apply_route(
        &namespace,
        &route_manifest("chat", json!({"rollout": {"revisionHistoryLimit": 1}})),
    )
    .await
    .unwrap();
    let route = wait_ready(&namespace, "chat", ConditionStatus::True, "Serving").await;
    assert_eq!(
        route
            .status
            .as_ref()
            .and_then(|s| s.stable_policy.as_deref()),
        Some("v12")
    );

    // Publishing claims the version's name: another file under v12 is refused and changes
    // nothing, the same file again is accepted.
    use llmroute_operator::reconcile::{PolicyObjects, PublishError, publish_policy_objects};
    let route = routes.get("chat").await.unwrap();
    let objects = |version: &'static str, bytes: &'static [u8]| PolicyObjects {
        version,
        bytes,
        origin: PolicyOrigin::Trained,
        source: None,
        parent: Some("v12".into()),
        models: vec!["small".into()],
        encoder: ENCODER.into(),
        cost_scale_usd: 0.002,
    };
    let v12 = policies_api.get("chat-v12").await.unwrap();
    let taken = publish_policy_objects(
        &namespace.client,
        "llmroute-tests",
        &route,
        &namespace.name,
        objects("v12", b"another file"),
    )
    .await;
    assert!(
        matches!(
            &taken,
            Err(PublishError::NameTaken {
                kind: "ConfigMap",
                ..
            })
        ),
        "{taken:?}"
    );
    let configmap = configmaps.get("chat-policy-v12").await.unwrap();
    assert_eq!(
        configmap.annotations().get("llmroute.dev/policy-sha256"),
        Some(&v12.spec.sha256)
    );
    for _ in 0..2 {
        let published = publish_policy_objects(
            &namespace.client,
            "llmroute-tests",
            &route,
            &namespace.name,
            objects("v13", b"a candidate"),
        )
        .await
        .unwrap();
        assert_eq!(published.spec.version, "v13");
    }

    operator.stop().await;
    namespace.delete().await;
}

#[path = "../../llmroute-control/tests/support/world.rs"]
#[allow(dead_code)]
mod world;

/// Mints a token of service account `account` for the control API's audience.
async fn sidecar_token(namespace: &TestNamespace, account: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = namespace.api();
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": account}})).unwrap(),
        )
        .await
        .expect("the service account is created");
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["llmroute.dev".into()]),
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .expect("a token for the control API")
        .status
        .and_then(|s| s.token)
        .expect("a TokenRequest status with a token")
}

/// A policy the control API serves, as a network the test can run.
async fn served_network(
    operator: &Operator,
    sha256: &str,
) -> llmroute_policy::policy::PolicyNetwork {
    let (status, bytes) = get(&format!("{}/v1/policies/{sha256}", operator.control))
        .await
        .expect("the control API answers");
    assert_eq!(status, 200, "policy {sha256}");
    llmroute_policy::policy::from_onnx(&llmroute_policy::onnx::decode(&bytes).unwrap()).unwrap()
}

/// Logs `n` requests as the route's sidecars would under the configuration the control API
/// serves now (stable and canary by the canary weight), and posts them as event batches.
/// Canary requests take `canary_latency_ms`, stable ones 10 ms.
async fn serve_requests(
    operator: &Operator,
    key: &str,
    token: &str,
    world: &mut world::World,
    n: usize,
    canary_latency_ms: f64,
) -> SidecarConfig {
    use rand::Rng;
    let config = sidecar_config(operator, key, 0).await;
    let stable_ref = config.stable.clone().expect("a stable policy");
    let stable = served_network(operator, &stable_ref.sha256).await;
    let canary = match &config.canary {
        Some(c) => Some((c.version.clone(), served_network(operator, &c.sha256).await)),
        None => None,
    };
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        let use_canary = canary.is_some() && world.rng.random::<f64>() < config.canary_weight;
        let mut event = match (&canary, use_canary) {
            (Some((version, policy)), true) => world.event(policy, version, canary_latency_ms),
            _ => world.event(&stable, &stable_ref.version, 10.0),
        };
        event.decision.config_version = config.version;
        events.push(event);
    }
    for chunk in events.chunks(250) {
        let batch = llmroute_api::EventBatch {
            route: key.to_string(),
            sidecar: "test-sidecar".into(),
            events: chunk.to_vec(),
        };
        let body = serde_json::to_vec(&batch).unwrap();
        let (status, answer) =
            common::post_json(&format!("{}/v1/events", operator.control), token, &body)
                .await
                .expect("the control API answers");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    }
    config
}

fn learning_route(name: &str) -> Value {
    route_manifest(
        name,
        json!({
            "models": world::MODELS.iter().zip([0.1, 0.8, 4.0]).map(|(model, price)| json!({
                "name": model, "endpoint": "http://127.0.0.1:9/v1", "model": model,
                "pricing": {"inputUsdPerMillionTokens": price, "outputUsdPerMillionTokens": price},
            })).collect::<Vec<_>>(),
            "defaultPreference": {"quality": 0.5, "cost": 0.5},
            "fallback": "cheap",
            "exploration": {"mode": "epsilonGreedy", "epsilon": world::EPSILON},
            "costScaleUsd": 0.004,
            // The tests post 1,500 events first: training waits for all of them, so that the
            // candidate and the gate's figures do not depend on how fast the batches arrive.
            "training": {"minNewEvents": 1500, "steps": 400, "intervalSeconds": 5},
            "rollout": {"steps": [{"weight": 0.3, "minEvents": 60}, {"weight": 0.6, "minEvents": 60}]},
        }),
    )
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn the_leader_trains_gates_canaries_and_promotes_a_policy() {
    let namespace = TestNamespace::new("learning").await;
    let token = sidecar_token(&namespace, "app").await;
    let operator =
        Operator::start_with(&namespace, "learner", Some(Duration::from_millis(500))).await;
    apply_route(&namespace, &learning_route("world"))
        .await
        .expect("the route applies");
    wait_ready(&namespace, "world", ConditionStatus::True, "Serving").await;
    let key = format!("{}/world", namespace.name);
    let mut world = world::World::new(1, &key);

    // Traffic under the pricing prior, then a candidate trained on it, gated and canaried.
    let config = serve_requests(&operator, &key, &token, &mut world, 1500, 10.0).await;
    assert_eq!(config.stable.as_ref().unwrap().version, "v1");
    let routes: Api<LlmRoute> = namespace.api();
    let policies_api: Api<LlmPolicy> = namespace.api();
    let phase = |policy: &LlmPolicy| policy.status.as_ref().and_then(|s| s.phase);
    let v2 = eventually("v2 to be trained and gated", || async {
        let policy = policies_api.get_opt("world-v2").await.ok()??;
        phase(&policy)
            .is_some_and(|p| p != PolicyPhase::Candidate)
            .then_some(policy)
    })
    .await;
    let status = v2.status.clone().unwrap();
    assert_eq!(status.phase, Some(PolicyPhase::Canary), "{status:?}");
    assert_eq!(v2.spec.origin, PolicyOrigin::Trained);
    assert_eq!(v2.spec.parent.as_deref(), Some("v1"));
    assert_eq!(v2.spec.models, world::MODELS.map(String::from).to_vec());
    let training = status
        .training
        .expect("the data the candidate was trained on");
    let used = training.training_events + training.holdout_events;
    assert_eq!(used, 1500, "{training:?}");
    let gate = status.off_policy.expect("the gate's figures");
    assert!(
        gate.passed && gate.difference_dr.ci_low.is_some_and(|low| low > 0.0),
        "{gate:?}"
    );
    let route = eventually("the canary in the route's status", || async {
        let route = routes.get("world").await.ok()?;
        let status = route.status.as_ref()?;
        (status.canary_policy.as_deref() == Some("v2")).then_some(route)
    })
    .await;
    let status = route.status.unwrap();
    assert_eq!(status.canary_weight, Some(0.3));
    assert_eq!(
        status.canary_policy_sha256.as_deref(),
        Some(v2.spec.sha256.as_str())
    );
    assert_eq!(
        status.last_training.as_ref().map(|t| t.result.as_str()),
        Some("GatePassed")
    );

    // The control API serves the canary, and live traffic carries it through both steps.
    let served = sidecar_config(&operator, &key, config.version).await;
    assert_eq!(
        served.canary.as_ref().map(|c| c.version.as_str()),
        Some("v2")
    );
    assert_eq!(served.canary_weight, 0.3);
    let mut promoted = false;
    for _ in 0..40 {
        serve_requests(&operator, &key, &token, &mut world, 200, 10.0).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v2 = policies_api.get("world-v2").await.unwrap();
        if phase(&v2) == Some(PolicyPhase::Stable) {
            promoted = true;
            break;
        }
    }
    assert!(promoted, "v2 was not promoted");
    let v1 = policies_api.get("world-v1").await.unwrap();
    assert_eq!(phase(&v1), Some(PolicyPhase::Retired));
    let v2 = policies_api.get("world-v2").await.unwrap();
    let live = v2.status.unwrap().live.expect("live figures of the canary");
    assert!(live.with_feedback >= 60, "{live:?}");

    let route = wait_ready(&namespace, "world", ConditionStatus::True, "Serving").await;
    let route = eventually("the route to serve v2 without a canary", || {
        let route = route.clone();
        let routes = routes.clone();
        async move {
            let current = routes.get("world").await.ok().unwrap_or(route);
            let status = current.status.as_ref()?;
            (status.stable_policy.as_deref() == Some("v2") && status.canary_policy.is_none())
                .then_some(current)
        }
    })
    .await;
    let progressing = route
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap()
        .clone();
    assert_eq!(
        progressing.status,
        ConditionStatus::False,
        "{progressing:?}"
    );
    let served = sidecar_config(&operator, &key, served.version).await;
    let served = if served.canary.is_some() {
        sidecar_config(&operator, &key, served.version).await
    } else {
        served
    };
    assert_eq!(served.stable.as_ref().unwrap().version, "v2");
    assert!(served.canary.is_none());

    // Every decision is an Event on the route, with its figures.
    let events = eventually("the learning loop's Events", || async {
        let events = events_for(&namespace, "world").await;
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Promoted"))
            .then_some(events)
    })
    .await;
    let reasons: Vec<&str> = events.iter().filter_map(|e| e.reason.as_deref()).collect();
    for reason in [
        "TrainingStarted",
        "GatePassed",
        "CanaryStepStarted",
        "CanaryStepPassed",
    ] {
        assert!(
            reasons.contains(&reason),
            "no {reason} Event in {reasons:?}"
        );
    }
    let passed = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("CanaryStepPassed"))
        .and_then(|e| e.note.clone())
        .unwrap();
    assert!(
        passed.contains("reward") && passed.contains("p = "),
        "{passed}"
    );

    operator.stop().await;
    namespace.delete().await;
}

#[tokio::test]
#[ignore = "needs the API server of scripts/k8s-testenv; scripts/test runs it"]
async fn a_slow_canary_is_aborted_and_degrades_the_route() {
    let namespace = TestNamespace::new("abort").await;
    let token = sidecar_token(&namespace, "app").await;
    let operator =
        Operator::start_with(&namespace, "learner", Some(Duration::from_millis(500))).await;
    apply_route(&namespace, &learning_route("world"))
        .await
        .expect("the route applies");
    wait_ready(&namespace, "world", ConditionStatus::True, "Serving").await;
    let key = format!("{}/world", namespace.name);
    let mut world = world::World::new(6, &key);
    serve_requests(&operator, &key, &token, &mut world, 1500, 10.0).await;
    let routes: Api<LlmRoute> = namespace.api();
    eventually("the canary v2 in the route's status", || async {
        let route = routes.get("world").await.ok()?;
        (route.status?.canary_policy.as_deref() == Some("v2")).then_some(())
    })
    .await;

    // The candidate decides better but answers 20 times slower: the p95 latency check aborts.
    let policies_api: Api<LlmPolicy> = namespace.api();
    let mut aborted = None;
    for _ in 0..40 {
        serve_requests(&operator, &key, &token, &mut world, 200, 200.0).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v2 = policies_api.get("world-v2").await.unwrap();
        if v2.status.as_ref().and_then(|s| s.phase) == Some(PolicyPhase::Rejected) {
            aborted = Some(v2);
            break;
        }
    }
    let v2 = aborted.expect("the slow canary v2 was not aborted");
    let message = v2.status.unwrap().message.unwrap_or_default();
    assert!(message.contains("aborted: p95 latency"), "{message}");

    let route = eventually("the route to be Degraded without a canary", || async {
        let route = routes.get("world").await.ok()?;
        let status = route.status.as_ref()?;
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded")?;
        (degraded.status == ConditionStatus::True
            && degraded.reason == "CanaryAborted"
            && status.canary_policy.is_none()
            && status.observed_generation == route.metadata.generation)
            .then_some(route)
    })
    .await;
    let status = route.status.unwrap();
    assert_eq!(status.stable_policy.as_deref(), Some("v1"));
    assert!(status.canary_abort.is_some());
    assert!(status.canary_weight.is_none());
    let served = sidecar_config(&operator, &key, 0).await;
    assert_eq!(served.stable.as_ref().unwrap().version, "v1");
    assert!(served.canary.is_none(), "{served:?}");

    let events = eventually("the CanaryAborted Event", || async {
        let events = events_for(&namespace, "world").await;
        events
            .iter()
            .find(|e| e.reason.as_deref() == Some("CanaryAborted"))
            .cloned()
    })
    .await;
    assert_eq!(events.type_.as_deref(), Some("Warning"));

    operator.stop().await;
    namespace.delete().await;
}
