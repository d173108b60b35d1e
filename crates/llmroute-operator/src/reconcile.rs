//! The LLMRoute reconciler: checks the spec (also the rules older servers do not enforce), the
//! Secrets it names and the policy it serves; publishes the first policy of a new route; and
//! writes the status the control API serves sidecars from.
//!
//! Errors the user must fix (an invalid spec, a missing Secret, an unknown pinned version) are
//! not reconcile errors: they become `Ready=False` with a reason and a message, and an Event.
//! Reconcile errors are what retrying can fix (the API server unreachable, a conflict); the
//! error policy requeues them with exponential backoff per route.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use llmroute_api::PolicyRef;
use llmroute_api::crd::{
    ConditionStatus, LlmPolicy, LlmPolicySpec, LlmPolicyStatus, LlmRoute, LlmRouteSpec,
    LlmRouteStatus, PolicyOrigin, PolicyPhase,
};
use llmroute_control::learning::version_number;
use llmroute_policy::policy::prior::{PricedModel, default_cost_scale, pricing_prior};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::conditions::{self, DEGRADED, POLICY_READY, PROGRESSING, READY};
use crate::metrics::Metrics;
use crate::names::{
    FIELD_MANAGER, FINALIZER, MANAGED_BY, MANAGED_BY_VALUE, POLICY_KEY, ROUTE_LABEL,
    SHA256_ANNOTATION, VERSION_LABEL, policy_configmap_name, policy_name, route_key,
};

/// Requeue period of a healthy route, so that drift is repaired even without a watch event.
const RESYNC: Duration = Duration::from_secs(300);
/// Requeue period while waiting for an object the operator does not watch (a Secret or a
/// ConfigMap of the user's).
const WAIT_FOR_OBJECT: Duration = Duration::from_secs(3);
/// Maximum backoff between retries of a failing reconcile.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// Digest of the prompt encoder the route's sidecars use; see
    /// [`llmroute_policy::encoder::digest_of_files`].
    pub encoder_digest: String,
    /// Embedding dimension of that encoder.
    pub embedding_dim: usize,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per route, for the error policy's backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Called with a route's key after its cleanup, so the control API stops serving it.
    pub on_cleanup: Box<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("encoder_digest", &self.encoder_digest)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        encoder_digest: String,
        embedding_dim: usize,
        metrics: Arc<Metrics>,
        on_cleanup: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Self {
        Self {
            client,
            recorder,
            encoder_digest,
            embedding_dim,
            metrics,
            failures: Mutex::new(HashMap::new()),
            on_cleanup,
        }
    }
}

/// A failure that retrying may fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the event store failed: {0}")]
    Store(#[from] llmroute_control::store::StoreError),
    #[error("route {0} has no namespace")]
    NoNamespace(String),
    #[error("publishing a policy failed: {0}")]
    Publish(#[from] PublishError),
}

/// Reconciles one route; see the module documentation.
pub async fn reconcile(route: Arc<LlmRoute>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = route.name_any();
    let namespace = route
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let span = tracing::info_span!("reconcile", route = %name, namespace = %namespace);
    let started = Instant::now();
    let api: Api<LlmRoute> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, route, |event| async {
        match event {
            FinalizerEvent::Apply(route) => apply(&route, &namespace, &ctx).await,
            FinalizerEvent::Cleanup(route) => cleanup(&route, &namespace, &ctx).await,
        }
    })
    .instrument(span.clone())
    .await;
    let result = match result {
        Ok(action) => Ok(action),
        // A second cleanup raced the first, which already removed the finalizer and with it
        // the route: nothing is left to do.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(status)))
            if status.code == 404 =>
        {
            Ok(Action::await_change())
        }
        Err(error) => Err(Error::Finalizer(Box::new(error))),
    };
    ctx.metrics
        .observe_reconcile(result.is_ok(), started.elapsed().as_secs_f64());
    if result.is_ok() {
        let key = route_key(&namespace, &name);
        ctx.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }
    result
}

/// Requeues a failed reconcile after `min(2^(n−1) s, 5 min)` for its `n`-th consecutive failure.
pub fn error_policy(route: Arc<LlmRoute>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = route_key(
        route.namespace().as_deref().unwrap_or(""),
        &route.name_any(),
    );
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let delay = Duration::from_secs(1u64 << (failures - 1).min(9)).min(MAX_BACKOFF);
    tracing::warn!(route = %key, error = %error, failures, retry_in_seconds = delay.as_secs(), "reconcile failed; retrying");
    Action::requeue(delay)
}

/// Why a route is not ready, as its `Ready` condition and an Event say it.
#[derive(Debug, Clone, PartialEq)]
struct NotReady {
    reason: &'static str,
    message: String,
    /// Whether the route still has a usable stable policy.
    policy_ready: bool,
    /// When to look again; `None` waits for a change of the route.
    requeue: Option<Duration>,
}

impl NotReady {
    fn new(reason: &'static str, message: String) -> Self {
        Self {
            reason,
            message,
            policy_ready: false,
            requeue: None,
        }
    }

    fn retry_in(mut self, delay: Duration) -> Self {
        self.requeue = Some(delay);
        self
    }
}

async fn apply(route: &LlmRoute, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let verdict = evaluate(route, namespace, ctx).await?;
    let generation = route.metadata.generation;
    let old = route.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = generation;
    status.models = Some(route.spec.models.len() as u32);
    let action = match &verdict {
        Ok(stable) => {
            let key = route_key(namespace, &route.name_any());
            let reference = PolicyRef {
                version: stable.spec.version.clone(),
                sha256: stable.spec.sha256.clone(),
            };
            let canary = status_canary(&route.spec, &old);
            let digest = config_digest(&key, &route.spec, &reference, canary.as_ref());
            let version = match (&old.config_digest, old.config_version) {
                (Some(previous), Some(version)) if *previous == digest => version,
                (_, version) => version.unwrap_or(0) + 1,
            };
            status.stable_policy = Some(reference.version.clone());
            status.stable_policy_sha256 = Some(reference.sha256.clone());
            status.config_version = Some(version);
            status.config_digest = Some(digest);
            conditions::set(
                &mut status.conditions,
                READY,
                ConditionStatus::True,
                "Serving",
                format!(
                    "sidecars get configuration version {version} with policy {} ({} models)",
                    reference.version,
                    route.spec.models.len()
                ),
                generation,
            );
            conditions::set(
                &mut status.conditions,
                POLICY_READY,
                ConditionStatus::True,
                "PolicyAvailable",
                format!(
                    "policy {} ({:?}) serves the route",
                    reference.version, stable.spec.origin
                ),
                generation,
            );
            match &old.canary_abort {
                Some(abort) => conditions::set(
                    &mut status.conditions,
                    DEGRADED,
                    ConditionStatus::True,
                    "CanaryAborted",
                    format!(
                        "{abort}; the route stays Degraded until a later candidate is promoted"
                    ),
                    generation,
                ),
                None => conditions::set(
                    &mut status.conditions,
                    DEGRADED,
                    ConditionStatus::False,
                    "AsExpected",
                    "sidecars serve the current spec",
                    generation,
                ),
            }
            match &canary {
                Some(canary) => conditions::set(
                    &mut status.conditions,
                    PROGRESSING,
                    ConditionStatus::True,
                    "CanaryInProgress",
                    format!(
                        "canary {} decides {:.0} % of routed requests at step {}",
                        canary.policy.version,
                        canary.weight * 100.0,
                        old.canary_step.map_or(1, |s| s + 1)
                    ),
                    generation,
                ),
                None => conditions::set(
                    &mut status.conditions,
                    PROGRESSING,
                    ConditionStatus::False,
                    "NoRollout",
                    "no policy rollout is in progress",
                    generation,
                ),
            }
            Action::requeue(RESYNC)
        }
        Err(not_ready) => {
            conditions::set(
                &mut status.conditions,
                READY,
                ConditionStatus::False,
                not_ready.reason,
                not_ready.message.clone(),
                generation,
            );
            if !not_ready.policy_ready {
                conditions::set(
                    &mut status.conditions,
                    POLICY_READY,
                    ConditionStatus::False,
                    not_ready.reason,
                    not_ready.message.clone(),
                    generation,
                );
            }
            match old.config_version {
                Some(version) => conditions::set(
                    &mut status.conditions,
                    DEGRADED,
                    ConditionStatus::True,
                    "ServingLastGoodConfig",
                    format!(
                        "sidecars keep configuration version {version} until the route is fixed"
                    ),
                    generation,
                ),
                None => conditions::set(
                    &mut status.conditions,
                    DEGRADED,
                    ConditionStatus::False,
                    "NeverServed",
                    "no configuration was served for this route yet",
                    generation,
                ),
            }
            conditions::set(
                &mut status.conditions,
                PROGRESSING,
                ConditionStatus::False,
                "NoRollout",
                "no policy rollout is in progress",
                generation,
            );
            not_ready
                .requeue
                .map_or_else(Action::await_change, Action::requeue)
        }
    };
    if status != old {
        write_status(route, namespace, &status, ctx).await?;
    }
    announce_transition(route, &old, &status, ctx).await;
    Ok(action)
}

/// Publishes an Event when the `Ready` condition changes status or reason.
async fn announce_transition(
    route: &LlmRoute,
    old: &LlmRouteStatus,
    new: &LlmRouteStatus,
    ctx: &Context,
) {
    let before = conditions::get(&old.conditions, READY);
    let Some(after) = conditions::get(&new.conditions, READY) else {
        return;
    };
    if before.is_some_and(|b| b.status == after.status && b.reason == after.reason) {
        return;
    }
    let type_ = if after.status == ConditionStatus::True {
        EventType::Normal
    } else {
        EventType::Warning
    };
    publish_event(
        route,
        ctx,
        type_,
        &after.reason,
        &after.message,
        "Reconcile",
    )
    .await;
}

async fn publish_event(
    route: &LlmRoute,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(note, 1000)),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &route.object_ref(&())).await {
        tracing::warn!(error = %error, reason, "failed to publish an Event; the status still records it");
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

async fn write_status(
    route: &LlmRoute,
    namespace: &str,
    status: &LlmRouteStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<LlmRoute> = Api::namespaced(ctx.client.clone(), namespace);
    // The pod counts belong to the injection webhook's field manager, the rollout fields to
    // the learning loop's.
    let mut status = status.clone();
    status.injected_pods = None;
    status.skipped_pods = None;
    status.canary_policy = None;
    status.canary_policy_sha256 = None;
    status.canary_weight = None;
    status.canary_step = None;
    status.last_training = None;
    status.canary_abort = None;
    status.highest_policy_version = None;
    let patch = json!({
        "apiVersion": llmroute_api::crd::API_VERSION,
        "kind": "LLMRoute",
        "status": status,
    });
    api.patch_status(
        &route.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Builds the sidecar configuration that a route's spec, stable policy and canary give, with
/// `version`.
pub fn route_config(
    key: &str,
    spec: &LlmRouteSpec,
    version: u64,
    stable: &PolicyRef,
    canary: Option<&Canary>,
) -> llmroute_api::SidecarConfig {
    let mut config = llmroute_control::sidecar_config(key, spec, version, Some(stable.clone()));
    if let Some(canary) = canary {
        config.canary = Some(canary.policy.clone());
        config.canary_weight = canary.weight;
    }
    config
}

/// sha256 of the sidecar configuration a route's spec, stable policy and canary give, without
/// its version: the status records it, and every replica's control API serves the
/// configuration only when its own computation gives the same digest.
pub fn config_digest(
    key: &str,
    spec: &LlmRouteSpec,
    stable: &PolicyRef,
    canary: Option<&Canary>,
) -> String {
    let config = route_config(key, spec, 0, stable, canary);
    let bytes = serde_json::to_vec(&config).expect("a configuration serialises");
    hex::encode(Sha256::digest(bytes))
}

/// A canary policy and the share of routed requests it decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    pub policy: PolicyRef,
    pub weight: f64,
}

/// Returns the canary that the learning loop wrote into a route's status, when one serves: a
/// version with its digest, a positive weight, and no pinned version in the spec.
pub fn status_canary(spec: &LlmRouteSpec, status: &LlmRouteStatus) -> Option<Canary> {
    if spec.policy.as_ref().is_some_and(|p| p.version.is_some()) {
        return None;
    }
    let weight = status.canary_weight.filter(|w| *w > 0.0 && *w <= 1.0)?;
    Some(Canary {
        policy: PolicyRef {
            version: status.canary_policy.clone()?,
            sha256: status.canary_policy_sha256.clone()?,
        },
        weight,
    })
}

/// Decides what the route serves: its stable policy, publishing one when needed, or why it
/// cannot be served.
async fn evaluate(
    route: &LlmRoute,
    namespace: &str,
    ctx: &Context,
) -> Result<Result<LlmPolicy, NotReady>, Error> {
    let spec = &route.spec;
    let errors = spec.check();
    if !errors.is_empty() {
        let message = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Ok(Err(NotReady::new("InvalidSpec", message)));
    }
    if let Some(not_ready) = check_secrets(spec, namespace, ctx).await? {
        return Ok(Err(not_ready));
    }

    let name = route.name_any();
    let policies_api: Api<LlmPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let mut policies = policies_api
        .list(&ListParams::default().labels(&format!("{ROUTE_LABEL}={name}")))
        .await?
        .items;
    policies.retain(|p| p.spec.route == name);
    policies.sort_by_key(|p| version_number(&p.spec.version));
    let model_names: Vec<String> = spec.models.iter().map(|m| m.name.clone()).collect();

    if let Some(pinned) = spec.policy.as_ref().and_then(|p| p.version.as_deref()) {
        let published: Vec<&str> = policies.iter().map(|p| p.spec.version.as_str()).collect();
        let Some(policy) = policies.iter().find(|p| p.spec.version == pinned) else {
            return Ok(Err(NotReady::new(
                "UnknownPolicyVersion",
                format!(
                    "spec.policy.version pins {pinned:?}, which is not a version of this route; published versions: {}",
                    if published.is_empty() {
                        "none".to_string()
                    } else {
                        published.join(", ")
                    }
                ),
            )));
        };
        if let Some(problem) = incompatibility(policy, &model_names, &ctx.encoder_digest) {
            return Ok(Err(NotReady::new(
                "PinnedPolicyIncompatible",
                format!(
                    "spec.policy.version pins {pinned:?}, but {problem}; pin another version or remove the pin"
                ),
            )));
        }
        set_phases(&policies_api, &policies, &policy.spec.version).await?;
        return Ok(Ok(policy.clone()));
    }

    // The stable version; else the newest one without a phase, whose publication was
    // interrupted before its phase was written (a restart must not publish it again). Trained
    // versions get their phase from the learning loop, which gates them first.
    let phase = |p: &LlmPolicy| p.status.as_ref().and_then(|s| s.phase);
    let stable = policies
        .iter()
        .rev()
        .find(|p| phase(p) == Some(PolicyPhase::Stable))
        .or_else(|| {
            policies
                .iter()
                .rev()
                .find(|p| phase(p).is_none() && p.spec.origin != PolicyOrigin::Trained)
        });
    if let Some(stable) = stable
        && incompatibility(stable, &model_names, &ctx.encoder_digest).is_none()
    {
        set_phases(&policies_api, &policies, &stable.spec.version).await?;
        return Ok(Ok(stable.clone()));
    }

    // A new version: the first of the route, or a replacement for a pool that changed. It is
    // numbered above every listed version and above the highest one the route has had, which
    // the learning loop records in the status, so a deleted version's name is not reused.
    let recorded = route
        .status
        .as_ref()
        .and_then(|s| s.highest_policy_version.as_deref())
        .map_or(0, version_number);
    // A ConfigMap whose LLMPolicy was never created (a publication that stopped half way)
    // also claims its version's name.
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = format!(
        "{MANAGED_BY}={MANAGED_BY_VALUE},{ROUTE_LABEL}={},{VERSION_LABEL}",
        route.name_any()
    );
    let claimed = configmaps
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .filter_map(|c| c.labels().get(VERSION_LABEL).map(|v| version_number(v)))
        .max()
        .unwrap_or(0);
    let next = policies
        .iter()
        .map(|p| version_number(&p.spec.version))
        .max()
        .unwrap_or(0)
        .max(recorded)
        .max(claimed)
        + 1;
    let version = format!("v{next}");
    let parent = stable.map(|p| p.spec.version.clone());
    let use_initial = policies.is_empty()
        && spec
            .policy
            .as_ref()
            .and_then(|p| p.initial.as_ref())
            .is_some();
    let (bytes, origin, source, cost_scale) = if use_initial {
        let reference = spec
            .policy
            .as_ref()
            .and_then(|p| p.initial.clone())
            .expect("checked above");
        match load_pretrained(&reference, namespace, &model_names, ctx).await? {
            Ok((bytes, tau)) => (bytes, PolicyOrigin::Pretrained, Some(reference), tau),
            Err(not_ready) => return Ok(Err(not_ready)),
        }
    } else {
        let models: Vec<PricedModel> = spec
            .models
            .iter()
            .map(|m| PricedModel {
                name: m.name.clone(),
                input_usd_per_million_tokens: m.pricing.input_usd_per_million_tokens,
                output_usd_per_million_tokens: m.pricing.output_usd_per_million_tokens,
            })
            .collect();
        let tau = spec
            .cost_scale_usd
            .unwrap_or_else(|| default_cost_scale(&models));
        let (network, metadata) = pricing_prior(
            &models,
            &version,
            &ctx.encoder_digest,
            ctx.embedding_dim,
            tau,
        );
        let bytes = llmroute_policy::policy::to_onnx_bytes(&network, &metadata);
        (bytes, PolicyOrigin::PricingPrior, None, tau)
    };
    let policy = publish_policy(
        route,
        namespace,
        &version,
        &bytes,
        origin,
        source,
        parent.clone(),
        model_names,
        cost_scale,
        ctx,
    )
    .await?;
    let mut all = policies.clone();
    all.push(policy.clone());
    set_phases(&policies_api, &all, &version).await?;
    let note = match &parent {
        Some(parent) => format!(
            "published policy {version} ({origin:?}, sha256 {}) to replace {parent}, whose models or encoder no longer match the route",
            &policy.spec.sha256[..12]
        ),
        None => format!(
            "published policy {version} ({origin:?}, sha256 {})",
            &policy.spec.sha256[..12]
        ),
    };
    tracing::info!(policy_version = %version, origin = ?origin, "{note}");
    publish_event(
        route,
        ctx,
        EventType::Normal,
        "PolicyPublished",
        &note,
        "PublishPolicy",
    )
    .await;
    Ok(Ok(policy))
}

/// Returns why `policy` cannot serve a route with these models and encoder, if it cannot.
fn incompatibility(policy: &LlmPolicy, models: &[String], encoder: &str) -> Option<String> {
    if policy.spec.models != models {
        return Some(format!(
            "policy {} was made for models [{}], and the route has [{}]",
            policy.spec.version,
            policy.spec.models.join(", "),
            models.join(", ")
        ));
    }
    if policy.spec.encoder != encoder {
        return Some(format!(
            "policy {} expects encoder {}, and the sidecars use {}",
            policy.spec.version,
            &policy.spec.encoder[..policy.spec.encoder.len().min(12)],
            &encoder[..encoder.len().min(12)]
        ));
    }
    None
}

/// Checks that every Secret key the route names exists.
async fn check_secrets(
    spec: &LlmRouteSpec,
    namespace: &str,
    ctx: &Context,
) -> Result<Option<NotReady>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut seen: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    for (index, model) in spec.models.iter().enumerate() {
        let Some(reference) = &model.api_key_secret_ref else {
            continue;
        };
        if !seen.contains_key(&reference.name) {
            let secret = secrets.get_opt(&reference.name).await?;
            seen.insert(reference.name.clone(), secret);
        }
        match &seen[&reference.name] {
            None => {
                return Ok(Some(
                    NotReady::new(
                        "SecretNotFound",
                        format!(
                            "Secret {namespace}/{} named by spec.models[{index}].apiKeySecretRef does not exist; create it with `kubectl create secret generic {} -n {namespace} --from-literal={}=<API key>`",
                            reference.name, reference.name, reference.key
                        ),
                    )
                    .retry_in(WAIT_FOR_OBJECT),
                ));
            }
            Some(secret) => {
                let has_key = secret
                    .data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(&reference.key))
                    || secret
                        .string_data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(&reference.key));
                if !has_key {
                    let keys: Vec<String> = secret
                        .data
                        .as_ref()
                        .map(|d| d.keys().cloned().collect())
                        .unwrap_or_default();
                    return Ok(Some(
                        NotReady::new(
                            "SecretKeyNotFound",
                            format!(
                                "Secret {namespace}/{} has no key {:?} (named by spec.models[{index}].apiKeySecretRef); its keys: {}",
                                reference.name,
                                reference.key,
                                if keys.is_empty() {
                                    "none".to_string()
                                } else {
                                    keys.join(", ")
                                }
                            ),
                        )
                        .retry_in(WAIT_FOR_OBJECT),
                    ));
                }
            }
        }
    }
    Ok(None)
}

/// Reads and checks a pretrained policy the route references: it must be a policy file whose
/// models are the route's, in order, and whose encoder is the sidecars'.
async fn load_pretrained(
    reference: &llmroute_api::crd::ConfigMapKeyRef,
    namespace: &str,
    models: &[String],
    ctx: &Context,
) -> Result<Result<(Vec<u8>, f64), NotReady>, Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(configmap) = api.get_opt(&reference.name).await? else {
        return Ok(Err(NotReady::new(
            "InitialPolicyNotFound",
            format!(
                "ConfigMap {namespace}/{} named by spec.policy.initial does not exist; create it with `kubectl create configmap {} -n {namespace} --from-file={}=policy.onnx`",
                reference.name, reference.name, reference.key
            ),
        )
        .retry_in(WAIT_FOR_OBJECT)));
    };
    let Some(ByteString(bytes)) = configmap
        .binary_data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .cloned()
    else {
        return Ok(Err(NotReady::new(
            "InitialPolicyNotFound",
            format!(
                "ConfigMap {namespace}/{} has no binaryData key {:?}; `kubectl create configmap --from-file` puts a binary file there",
                reference.name, reference.key
            ),
        )
        .retry_in(WAIT_FOR_OBJECT)));
    };
    let metadata = match decode_metadata(&bytes) {
        Ok(metadata) => metadata,
        Err(message) => {
            return Ok(Err(NotReady::new(
                "InitialPolicyInvalid",
                format!(
                    "ConfigMap {namespace}/{} key {:?} is not an llmroute policy: {message}",
                    reference.name, reference.key
                ),
            )
            .retry_in(WAIT_FOR_OBJECT)));
        }
    };
    if metadata.models != models {
        return Ok(Err(NotReady::new(
            "InitialPolicyInvalid",
            format!(
                "the policy in ConfigMap {namespace}/{} routes between [{}], and the route's models are [{}]; list the route's models in that order or train a policy for them",
                reference.name,
                metadata.models.join(", "),
                models.join(", ")
            ),
        )
        .retry_in(WAIT_FOR_OBJECT)));
    }
    if metadata.encoder != ctx.encoder_digest {
        return Ok(Err(NotReady::new(
            "InitialPolicyInvalid",
            format!(
                "the policy in ConfigMap {namespace}/{} was trained on encoder {}, and the sidecars use {}; retrain it with this release's encoder",
                reference.name, metadata.encoder, ctx.encoder_digest
            ),
        )
        .retry_in(WAIT_FOR_OBJECT)));
    }
    Ok(Ok((bytes, f64::from(metadata.cost_scale_usd))))
}

/// Reads the metadata of a policy file.
pub fn decode_metadata(bytes: &[u8]) -> Result<llmroute_policy::policy::PolicyMetadata, String> {
    use prost::Message;
    let model = llmroute_policy::onnx::proto::ModelProto::decode(bytes)
        .map_err(|e| format!("not an ONNX file: {e}"))?;
    llmroute_policy::policy::read_metadata(&model).map_err(|e| e.to_string())
}

fn owner_reference(route: &LlmRoute) -> OwnerReference {
    route
        .controller_owner_ref(&())
        .expect("a route read from the API server has a uid")
}

/// The fields of an `LLMPolicy` and its ConfigMap for one policy file.
#[derive(Debug, Clone)]
pub struct PolicyObjects<'a> {
    pub version: &'a str,
    pub bytes: &'a [u8],
    pub origin: PolicyOrigin,
    pub source: Option<llmroute_api::crd::ConfigMapKeyRef>,
    pub parent: Option<String>,
    pub models: Vec<String>,
    pub encoder: String,
    pub cost_scale_usd: f64,
}

/// A failed publication of a policy version.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// Another writer published this version name with another file first.
    #[error(
        "{kind} {name} already exists with another policy file (sha256 {existing}); the new policy needs another version"
    )]
    NameTaken {
        kind: &'static str,
        name: String,
        existing: String,
    },
}

/// Creates the ConfigMap that contains a policy file and the `LLMPolicy` that describes it, both
/// owned by `route`, with `field_manager`. The creation claims the version's name. The
/// reconciler (a new pricing prior after a pool change) and the learning loop (a candidate)
/// each number from their own read of the highest version, so both may pick one name at the
/// same moment. The second one gets [`PublishError::NameTaken`] and must publish under another
/// version. Objects that already exist with the same file (a publication that stopped half
/// way) are applied again.
pub async fn publish_policy_objects(
    client: &Client,
    field_manager: &str,
    route: &LlmRoute,
    namespace: &str,
    objects: PolicyObjects<'_>,
) -> Result<LlmPolicy, PublishError> {
    let route_name = route.name_any();
    let version = objects.version;
    let sha256 = hex::encode(Sha256::digest(objects.bytes));
    let owner = owner_reference(route);
    let params = PatchParams::apply(field_manager).force();
    let create = PostParams {
        field_manager: Some(field_manager.to_string()),
        ..PostParams::default()
    };

    let configmap_name = policy_configmap_name(&route_name, version);
    let configmap = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name,
            "namespace": namespace,
            "labels": {
                MANAGED_BY: MANAGED_BY_VALUE,
                ROUTE_LABEL: route_name,
                VERSION_LABEL: version,
            },
            "annotations": {SHA256_ANNOTATION: sha256},
            "ownerReferences": [owner],
        },
        "binaryData": {POLICY_KEY: ByteString(objects.bytes.to_vec())},
    });
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let typed: ConfigMap = serde_json::from_value(configmap.clone())
        .expect("the ConfigMap's JSON has the ConfigMap schema");
    let created_configmap = match configmaps.create(&create, &typed).await {
        Ok(_) => true,
        Err(kube::Error::Api(response)) if response.code == 409 => {
            let existing = configmaps.get(&configmap_name).await?;
            let existing = existing
                .annotations()
                .get(SHA256_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| format!("unknown: no {SHA256_ANNOTATION} annotation"));
            if existing != sha256 {
                return Err(PublishError::NameTaken {
                    kind: "ConfigMap",
                    name: configmap_name,
                    existing,
                });
            }
            configmaps
                .patch(&configmap_name, &params, &Patch::Apply(&configmap))
                .await?;
            false
        }
        Err(error) => return Err(error.into()),
    };

    let spec = LlmPolicySpec {
        route: route_name.clone(),
        version: version.to_string(),
        sha256: sha256.clone(),
        artifact: llmroute_api::crd::ConfigMapKeyRef {
            name: configmap_name.clone(),
            key: POLICY_KEY.to_string(),
        },
        models: objects.models,
        encoder: objects.encoder,
        cost_scale_usd: objects.cost_scale_usd,
        origin: objects.origin,
        parent: objects.parent,
        source: objects.source,
    };
    let name = policy_name(&route_name, version);
    let policy = json!({
        "apiVersion": llmroute_api::crd::API_VERSION,
        "kind": "LLMPolicy",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                MANAGED_BY: MANAGED_BY_VALUE,
                ROUTE_LABEL: route_name,
            },
            "ownerReferences": [owner],
        },
        "spec": spec,
    });
    let policies: Api<LlmPolicy> = Api::namespaced(client.clone(), namespace);
    let typed: LlmPolicy =
        serde_json::from_value(policy.clone()).expect("the LLMPolicy's JSON has its schema");
    match policies.create(&create, &typed).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(response)) if response.code == 409 => {
            let existing = policies.get(&name).await?.spec.sha256;
            if existing != sha256 {
                if created_configmap {
                    // The ConfigMap made above belongs to no policy.
                    configmaps
                        .delete(&configmap_name, &DeleteParams::default())
                        .await?;
                }
                return Err(PublishError::NameTaken {
                    kind: "LLMPolicy",
                    name,
                    existing,
                });
            }
            Ok(policies
                .patch(&name, &params, &Patch::Apply(&policy))
                .await?)
        }
        Err(error) => Err(error.into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish_policy(
    route: &LlmRoute,
    namespace: &str,
    version: &str,
    bytes: &[u8],
    origin: PolicyOrigin,
    source: Option<llmroute_api::crd::ConfigMapKeyRef>,
    parent: Option<String>,
    models: Vec<String>,
    cost_scale_usd: f64,
    ctx: &Context,
) -> Result<LlmPolicy, Error> {
    let objects = PolicyObjects {
        version,
        bytes,
        origin,
        source,
        parent,
        models,
        encoder: ctx.encoder_digest.clone(),
        cost_scale_usd,
    };
    // On `NameTaken` the learning loop took this version a moment ago. The retry lists it
    // and numbers above it.
    Ok(publish_policy_objects(&ctx.client, FIELD_MANAGER, route, namespace, objects).await?)
}

/// Marks `stable` as the `Stable` version and earlier stable versions as `Retired`.
async fn set_phases(
    api: &Api<LlmPolicy>,
    policies: &[LlmPolicy],
    stable: &str,
) -> Result<(), Error> {
    for policy in policies {
        let current = policy.status.as_ref().and_then(|s| s.phase);
        let unphased = current.is_none() && policy.spec.origin != PolicyOrigin::Trained;
        let wanted = if policy.spec.version == stable {
            Some((PolicyPhase::Stable, "serves the route".to_string()))
        } else if current == Some(PolicyPhase::Stable) || unphased {
            Some((PolicyPhase::Retired, format!("replaced by {stable}")))
        } else {
            None
        };
        let Some((phase, message)) = wanted else {
            continue;
        };
        if current == Some(phase) {
            continue;
        }
        let status = LlmPolicyStatus {
            phase: Some(phase),
            message: Some(message),
            // The history limit keeps the versions that ended last.
            end_time: (phase == PolicyPhase::Retired)
                .then(|| k8s_openapi::jiff::Timestamp::now().to_string()),
            ..LlmPolicyStatus::default()
        };
        let patch = json!({
            "apiVersion": llmroute_api::crd::API_VERSION,
            "kind": "LLMPolicy",
            "status": status,
        });
        api.patch_status(
            &policy.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(())
}

/// Deletes what the route owns (policies and their ConfigMaps, even where no garbage collector
/// runs) and its stored events, then lets the finalizer go.
async fn cleanup(route: &LlmRoute, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let name = route.name_any();
    let selector = format!("{MANAGED_BY}={MANAGED_BY_VALUE},{ROUTE_LABEL}={name}");
    let params = ListParams::default().labels(&selector);
    let policies: Api<LlmPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let deleted_policies = policies
        .delete_collection(&DeleteParams::background(), &params)
        .await?
        .map_left(|list| list.items.len())
        .left_or(0);
    let deleted_configmaps = configmaps
        .delete_collection(&DeleteParams::background(), &params)
        .await?
        .map_left(|list| list.items.len())
        .left_or(0);
    let key = route_key(namespace, &name);
    (ctx.on_cleanup)(&key);
    tracing::info!(
        policies = deleted_policies,
        configmaps = deleted_configmaps,
        "route deleted; removed its policies, ConfigMaps and events"
    );
    publish_event(
        route,
        ctx,
        EventType::Normal,
        "Deleted",
        &format!(
            "deleted {deleted_policies} policies and {deleted_configmaps} ConfigMaps of the route"
        ),
        "Cleanup",
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_by_number() {
        let mut versions = vec!["v10", "v2", "v1", "custom"];
        versions.sort_by_key(|v| version_number(v));
        assert_eq!(versions, ["custom", "v1", "v2", "v10"]);
    }

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000 + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short", 1000), "short");
    }
}
