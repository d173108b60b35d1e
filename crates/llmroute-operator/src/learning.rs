//! The learning loop under the operator: `llmroute_control::learning` run by the leader for
//! its routes, with the cluster as the record.
//!
//! The loop's logic works on a store (events, policy files, history, rollout state). Under
//! the operator that store is the leader's event store, and each pass keeps it in step with
//! the cluster:
//!
//! 1. Import: for every route whose status describes its current spec, the route's
//!    `LLMPolicy` objects become the store's history, with files from their ConfigMaps and
//!    phases and figures from their statuses. Versions the cluster no longer has leave the
//!    store. The rollout fields of the route's status become the store's rollout state, so a
//!    new leader continues where the last one stopped.
//! 2. The pass itself ([`LearningLoop::tick`]): train on schedule, gate, analyse the canary,
//!    promote or abort.
//! 3. Mirror: new versions become an `LLMPolicy` with a ConfigMap, changed phases and figures
//!    go to the policies' statuses, the rollout state goes to the route's status (under the
//!    field manager [`LEARNING_FIELD_MANAGER`]), and every decision becomes an Event on the
//!    route. Versions that the history limit deleted from the store are deleted from the
//!    cluster last. The reconciler serves what the status names: the newest `Stable` policy,
//!    and the canary at its weight.
//!
//! A route whose mirror failed keeps its store state (it is ahead of the cluster) and is
//! mirrored again at the next pass before anything is imported.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use llmroute_api::PolicyRef;
use llmroute_api::crd::{LlmPolicy, LlmPolicyStatus, LlmRoute, LlmRouteSpec, PolicyPhase};
use llmroute_control::LearningLoop;
use llmroute_control::history::{PolicyRecord, RolloutState, has_ended};
use llmroute_control::learning::{
    LearningHost, TickReport, publish_stable_version, version_number,
};
use llmroute_control::store::{Store, StoreError};
use serde_json::json;

use crate::names::{
    LEARNING_FIELD_MANAGER, MANAGED_BY, MANAGED_BY_VALUE, ROUTE_LABEL, VERSION_LABEL,
};
use crate::reconcile::{PolicyObjects, PublishError, decode_metadata, publish_policy_objects};
use crate::serving::{ClusterBackend, served_config};

/// A failure of one route's import or mirror; the route is retried at the next pass.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the event store failed: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Policy(String),
}

/// The operator's [`LearningHost`]: the leader's store, kept in step with the cluster.
pub struct ClusterLearning {
    client: Client,
    backend: Arc<ClusterBackend>,
    recorder: Recorder,
    /// Routes of the current pass: imported, with their specs.
    routes: RwLock<Vec<(String, Arc<LlmRoute>)>>,
    /// Routes whose last mirror failed, so their store is ahead of the cluster.
    dirty: Mutex<HashSet<String>>,
    /// Per route, versions that the history limit deleted from the store and that are still
    /// to be deleted from the cluster.
    pending_deletions: Mutex<HashMap<String, BTreeSet<String>>>,
}

impl std::fmt::Debug for ClusterLearning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLearning").finish_non_exhaustive()
    }
}

impl LearningHost for ClusterLearning {
    fn route_specs(&self) -> Vec<(String, LlmRouteSpec)> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(key, route)| (key.clone(), route.spec.clone()))
            .collect()
    }

    fn store(&self) -> &Store {
        use llmroute_control::ControlBackend;
        self.backend.store()
    }

    fn serving_stable(&self, route: &str) -> Result<Option<PolicyRef>, StoreError> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        Ok(routes
            .iter()
            .find(|(key, _)| key == route)
            .and_then(|(_, route)| stable_of(route)))
    }

    fn publish_version(
        &self,
        route: &str,
        version: &str,
        bytes: &[u8],
        origin: llmroute_api::crd::PolicyOrigin,
        parent: Option<String>,
        message: &str,
    ) -> Result<PolicyRef, StoreError> {
        // The mirror turns the new record into an `LLMPolicy`.
        publish_stable_version(self.store(), route, version, bytes, origin, parent, message)
    }

    fn changed(&self) {
        // The mirror that follows every pass writes the changes into the cluster, and the
        // reconciler serves them from there.
    }
}

/// The versions of `route` that must keep their objects: the pinned one, the stable one and
/// the canary.
fn protected_versions(route: &LlmRoute) -> HashSet<String> {
    let status = route.status.clone().unwrap_or_default();
    [
        route.spec.policy.as_ref().and_then(|p| p.version.clone()),
        status.stable_policy,
        status.canary_policy,
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Returns when an ended version that the import reads ended, in milliseconds since the Unix
/// epoch. The cluster's `endTime` comes first: another leader may have changed it since this
/// store saw the version, as for a pinned version that ended a second time. The store's own
/// time comes next. A version that the store has in a serving phase ends now (`None`: saving
/// the record sets the time). Versions that ended before end times were recorded count from
/// their creation, as in the store's own ranking.
fn imported_end(
    status: &LlmPolicyStatus,
    existing: Option<&PolicyRecord>,
    created_ms: u64,
) -> Option<u64> {
    if let Some(ms) = status.end_time.as_deref().and_then(parse_time_ms) {
        return Some(ms);
    }
    match existing {
        Some(record) if record.ended_ms.is_some() => record.ended_ms,
        Some(record) if !has_ended(record.phase) => None,
        _ => Some(created_ms),
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 time, as in a policy's `endTime`.
fn parse_time_ms(text: &str) -> Option<u64> {
    let time: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    u64::try_from(time.as_millisecond()).ok()
}

/// Formats a time in milliseconds since the Unix epoch as RFC 3339.
fn format_time_ms(ms: u64) -> Option<String> {
    let ms = i64::try_from(ms).ok()?;
    Some(
        k8s_openapi::jiff::Timestamp::from_millisecond(ms)
            .ok()?
            .to_string(),
    )
}

/// Deletes the object `name`; one that is already gone counts as deleted.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(response)) if response.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

/// Returns the stable policy that a route's status names.
fn stable_of(route: &LlmRoute) -> Option<PolicyRef> {
    let status = route.status.as_ref()?;
    Some(PolicyRef {
        version: status.stable_policy.clone()?,
        sha256: status.stable_policy_sha256.clone()?,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ClusterLearning {
    pub fn new(
        client: Client,
        backend: Arc<ClusterBackend>,
        recorder: Recorder,
    ) -> Result<Self, StoreError> {
        {
            use llmroute_control::ControlBackend;
            backend.store().ensure_history()?;
        }
        Ok(Self {
            client,
            backend,
            recorder,
            routes: RwLock::new(Vec::new()),
            dirty: Mutex::new(HashSet::new()),
            pending_deletions: Mutex::new(HashMap::new()),
        })
    }

    fn is_dirty(&self, key: &str) -> bool {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    fn set_dirty(&self, key: &str, dirty: bool) {
        let mut set = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if dirty {
            set.insert(key.to_string());
        } else {
            set.remove(key);
        }
    }

    /// Runs a pass every `period` until `stop` completes. The leader runs it.
    pub async fn run(
        self: Arc<Self>,
        period: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tracing::info!(
            period_seconds = period.as_secs_f64(),
            "learning loop started"
        );
        // Marks from an earlier term describe a store that another leader has since moved past:
        // the cluster is the record again.
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.pending_deletions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let learning = Arc::new(LearningLoop::new(self.clone(), None));
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.pass(&learning).await,
                () = &mut stop => break,
            }
        }
        tracing::info!("learning loop stopped");
    }

    /// Runs one pass: import, learn, mirror.
    pub async fn pass(self: &Arc<Self>, learning: &Arc<LearningLoop>) {
        let mut imported = Vec::new();
        for (key, watched) in self.backend.routes() {
            // The watch may lag behind the last pass's own status writes: read the route.
            let api: Api<LlmRoute> = Api::namespaced(
                self.client.clone(),
                &watched.namespace().unwrap_or_default(),
            );
            let route = match api.get_opt(&watched.name_any()).await {
                Ok(Some(route)) => Arc::new(route),
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(route = %key, error = %error, "failed to read the route for the learning loop; retrying at the next pass");
                    continue;
                }
            };
            match self.import(&key, &route).await {
                Ok(true) => imported.push((key, route)),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(route = %key, error = %error, "failed to read the route's policies for the learning loop; retrying at the next pass");
                }
            }
        }
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = imported.clone();
        let pass = learning.clone();
        let reports: HashMap<String, TickReport> = match tokio::task::spawn_blocking(move || {
            pass.tick()
        })
        .await
        {
            Ok(reports) => reports.into_iter().collect(),
            Err(error) => {
                tracing::error!(error = %error, "a learning loop pass panicked; the next pass starts on schedule");
                return;
            }
        };
        let present: HashSet<String> = self.backend.routes().into_iter().map(|(k, _)| k).collect();
        self.forget_absent_routes(&present);
        for (key, route) in imported {
            let report = reports.get(&key).cloned().unwrap_or_default();
            if !report.pruned.is_empty() {
                // Queued before the mirror, which may fail before it deletes them.
                self.pending_deletions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key.clone())
                    .or_default()
                    .extend(report.pruned.iter().cloned());
            }
            match self.mirror(&key, &route, &report).await {
                Ok(()) => self.set_dirty(&key, false),
                Err(error) => {
                    self.set_dirty(&key, true);
                    tracing::warn!(route = %key, error = %error, "failed to write the learning loop's decisions into the cluster; retrying at the next pass");
                }
            }
        }
    }

    /// Brings the store's history and rollout state of `route` in step with the cluster.
    /// Returns whether the route takes part in this pass: its status must describe its
    /// current spec, and every policy file must be at hand.
    async fn import(&self, key: &str, route: &LlmRoute) -> Result<bool, SyncError> {
        if served_config(key, route).is_none() {
            return Ok(false);
        }
        let Some(stable) = stable_of(route) else {
            return Ok(false);
        };
        let store = self.store();
        if let Some(highest) = route
            .status
            .as_ref()
            .and_then(|s| s.highest_policy_version.as_deref())
        {
            store.raise_highest_version(key, version_number(highest))?;
        }
        if self.is_dirty(key) {
            // The store contains decisions the cluster has not seen yet, so the mirror writes them.
            return Ok(true);
        }
        let namespace = route.namespace().unwrap_or_default();
        let name = route.name_any();
        let api: Api<LlmPolicy> = Api::namespaced(self.client.clone(), &namespace);
        let mut policies = api
            .list(&ListParams::default().labels(&format!("{ROUTE_LABEL}={name}")))
            .await?
            .items;
        policies.retain(|p| p.spec.route == name);
        let records: HashMap<String, PolicyRecord> = store
            .policy_records(key)?
            .into_iter()
            .map(|r| (r.version.clone(), r))
            .collect();
        for policy in &policies {
            let version = &policy.spec.version;
            let sha256 = &policy.spec.sha256;
            let published = store.stable_policy(key, Some(version))?;
            if published.as_ref().map(|p| &p.sha256) != Some(sha256)
                || !store.policy_path(sha256).exists()
            {
                let Some(bytes) = self.policy_bytes(&namespace, policy).await? else {
                    tracing::info!(route = %key, policy_version = %version, "waiting for the policy's ConfigMap before learning");
                    return Ok(false);
                };
                store.publish_policy(key, version, &bytes)?;
            }
            let status = policy.status.clone().unwrap_or_default();
            let existing = records.get(version);
            let phase = status.phase.unwrap_or_else(|| {
                if *version == stable.version {
                    PolicyPhase::Stable
                } else {
                    existing.map_or(PolicyPhase::Candidate, |r| r.phase)
                }
            });
            let created_ms = existing.map_or_else(
                || {
                    policy
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map_or(0, |t| t.0.as_millisecond().max(0) as u64)
                },
                |r| r.created_ms,
            );
            let record = PolicyRecord {
                version: version.clone(),
                sha256: sha256.clone(),
                phase,
                origin: policy.spec.origin,
                parent: policy.spec.parent.clone(),
                created_ms,
                message: status.message.clone(),
                training: status.training.clone(),
                off_policy: status.off_policy.clone(),
                live: status.live.clone(),
                ended_ms: if has_ended(phase) {
                    imported_end(&status, existing, created_ms)
                } else {
                    None
                },
            };
            if existing != Some(&record) {
                store.save_policy_record(key, &record)?;
            }
        }
        // The cluster is the record: versions deleted there (by hand, or by another leader's
        // history limit) leave this store too, instead of being published again by the mirror.
        // A store ahead of the cluster after a failed mirror is dirty and returned above.
        let listed: HashSet<&str> = policies.iter().map(|p| p.spec.version.as_str()).collect();
        let stale: Vec<String> = records
            .keys()
            .filter(|version| !listed.contains(version.as_str()))
            .cloned()
            .collect();
        if !stale.is_empty() {
            store.delete_policy_versions(key, &stale)?;
            tracing::info!(route = %key, versions = ?stale, "deleted policy versions from the event store that the cluster no longer has");
            // Their ConfigMaps go too, but only below the highest listed version (the
            // reconciler creates a new version's ConfigMap before its LLMPolicy), and never
            // the ConfigMap of a version the route serves or pins.
            let highest = listed.iter().map(|v| version_number(v)).max().unwrap_or(0);
            let protected = protected_versions(route);
            let mut pending = self
                .pending_deletions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pending
                .entry(key.to_string())
                .or_default()
                .extend(stale.into_iter().filter(|version| {
                    version_number(version) < highest && !protected.contains(version)
                }));
        }

        let status = route.status.clone().unwrap_or_default();
        let old = store.rollout_state(key)?;
        let mut state = old.clone();
        let step = status.canary_step.unwrap_or(0);
        if state.canary != status.canary_policy || state.step != step {
            // Another leader started this step, so the step's events are counted from the
            // first one this store contains.
            state.step_start_event_id = 0;
        }
        state.canary = status.canary_policy.clone();
        state.step = step;
        state.weight = if state.canary.is_some() {
            status.canary_weight.unwrap_or(0.0)
        } else {
            0.0
        };
        if state.last_training_ms == 0 && status.last_training.is_some() {
            // Trained by another leader at a time this store does not know: wait one interval
            // from now rather than train at once.
            state.last_training_ms = now_ms();
        }
        state.last_training = status.last_training.clone();
        state.degraded = status.canary_abort.clone();
        if state != old {
            store.save_rollout_state(key, &state)?;
        }
        Ok(true)
    }

    /// Reads the bytes of a policy's file from the control API's cache, else from its ConfigMap.
    async fn policy_bytes(
        &self,
        namespace: &str,
        policy: &LlmPolicy,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        use llmroute_control::ControlBackend;
        if let Ok(Some(bytes)) = self.backend.policy(&policy.spec.sha256) {
            return Ok(Some(bytes));
        }
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), namespace);
        let Some(configmap) = api.get_opt(&policy.spec.artifact.name).await? else {
            return Ok(None);
        };
        let Some(k8s_openapi::ByteString(bytes)) = configmap
            .binary_data
            .as_ref()
            .and_then(|d| d.get(&policy.spec.artifact.key))
            .cloned()
        else {
            return Ok(None);
        };
        use sha2::Digest;
        let actual = hex::encode(sha2::Sha256::digest(&bytes));
        if actual != policy.spec.sha256 {
            return Err(SyncError::Policy(format!(
                "ConfigMap {namespace}/{} contains a file with sha256 {actual}, and LLMPolicy {} expects {}: the ConfigMap was edited after publication, so restore its file or delete the LLMPolicy",
                policy.spec.artifact.name,
                policy.name_any(),
                policy.spec.sha256
            )));
        }
        Ok(Some(bytes))
    }

    /// Writes the store's history and rollout state of `route` into the cluster and publishes
    /// the pass's decisions as Events.
    async fn mirror(
        &self,
        key: &str,
        route: &LlmRoute,
        report: &TickReport,
    ) -> Result<(), SyncError> {
        let store = self.store();
        let namespace = route.namespace().unwrap_or_default();
        let name = route.name_any();
        let api: Api<LlmPolicy> = Api::namespaced(self.client.clone(), &namespace);
        let cluster: HashMap<String, LlmPolicy> = api
            .list(&ListParams::default().labels(&format!("{ROUTE_LABEL}={name}")))
            .await?
            .items
            .into_iter()
            .filter(|p| p.spec.route == name)
            .map(|p| (p.spec.version.clone(), p))
            .collect();
        let records = store.policy_records(key)?;
        let params = PatchParams::apply(LEARNING_FIELD_MANAGER).force();
        // A promotion writes the new `Stable` phase before it retires the old one: the
        // reconciler, which may run between the two writes, must always find a stable version
        // (it publishes a new pricing prior when it finds none).
        let mut ordered: Vec<&PolicyRecord> = records.iter().collect();
        ordered.sort_by_key(|r| r.phase != PolicyPhase::Stable);
        for record in ordered {
            let existing = match cluster.get(&record.version) {
                Some(policy)
                    if policy.spec.sha256 != record.sha256
                        && protected_versions(route).contains(&record.version) =>
                {
                    tracing::error!(
                        route = %key,
                        policy_version = %record.version,
                        cluster_sha256 = %policy.spec.sha256,
                        store_sha256 = %record.sha256,
                        "the cluster contains another file under this served version; keeping the cluster's"
                    );
                    continue;
                }
                Some(policy) if policy.spec.sha256 != record.sha256 => {
                    self.drop_taken(key, route, &record.version).await?;
                    continue;
                }
                Some(policy) => Some(policy.clone()),
                None => None,
            };
            if existing.is_none() {
                let path = store.policy_path(&record.sha256);
                let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?;
                let metadata = decode_metadata(&bytes).map_err(|message| {
                    SyncError::Policy(format!(
                        "policy {} of route {key} cannot be read: {message}",
                        record.version
                    ))
                })?;
                let objects = PolicyObjects {
                    version: &record.version,
                    bytes: &bytes,
                    origin: record.origin,
                    source: None,
                    parent: record.parent.clone(),
                    models: metadata.models.clone(),
                    encoder: metadata.encoder.clone(),
                    cost_scale_usd: f64::from(metadata.cost_scale_usd),
                };
                match publish_policy_objects(
                    &self.client,
                    LEARNING_FIELD_MANAGER,
                    route,
                    &namespace,
                    objects,
                )
                .await
                {
                    Ok(_) => {}
                    Err(PublishError::Kube(error)) => return Err(error.into()),
                    Err(PublishError::NameTaken { .. }) => {
                        self.drop_taken(key, route, &record.version).await?;
                        continue;
                    }
                }
                tracing::info!(route = %key, policy_version = %record.version, phase = ?record.phase, "published a policy version of the learning loop");
            }
            let wanted = LlmPolicyStatus {
                phase: Some(record.phase),
                message: record.message.clone(),
                training: record.training.clone(),
                off_policy: record.off_policy.clone(),
                live: record.live.clone(),
                end_time: record.ended_ms.and_then(format_time_ms),
            };
            let current = existing.and_then(|p| p.status).unwrap_or_default();
            if current != wanted {
                let patch = json!({
                    "apiVersion": llmroute_api::crd::API_VERSION,
                    "kind": "LLMPolicy",
                    "status": wanted,
                });
                api.patch_status(
                    &crate::names::policy_name(&name, &record.version),
                    &params,
                    &Patch::Apply(&patch),
                )
                .await?;
            }
        }

        let state = store.rollout_state(key)?;
        let routes: Api<LlmRoute> = Api::namespaced(self.client.clone(), &namespace);
        let current = routes
            .get_status(&name)
            .await?
            .status
            .map(|s| RolloutFields {
                canary_policy: s.canary_policy,
                canary_policy_sha256: s.canary_policy_sha256,
                canary_weight: s.canary_weight,
                canary_step: s.canary_step,
                last_training: s.last_training,
                canary_abort: s.canary_abort,
                highest_policy_version: s.highest_policy_version,
            })
            .unwrap_or_default();
        // The recorded highest version only rises, even when another writer raised it since
        // the import.
        if let Some(recorded) = &current.highest_policy_version {
            store.raise_highest_version(key, version_number(recorded))?;
        }
        let wanted = rollout_status(&state, &records, store.highest_version(key)?);
        if current != wanted {
            let patch = json!({
                "apiVersion": llmroute_api::crd::API_VERSION,
                "kind": "LLMRoute",
                "status": wanted,
            });
            routes
                .patch_status(&name, &params, &Patch::Apply(&patch))
                .await?;
        }

        for (reason, message) in report.reasons.iter().zip(&report.messages) {
            self.publish_event(route, reason, message).await;
        }
        // Last, so that a failed deletion holds up neither the rollout's status nor its Events.
        // The versions stay pending for the next pass.
        if let Err(error) = self.delete_pruned(key, &namespace, &name).await {
            tracing::warn!(route = %key, error = %error, "failed to delete policy versions beyond the route's history limit from the cluster; retrying at the next pass");
        }
        Ok(())
    }

    /// Drops the store's `version` of `key` before its publication, because another writer
    /// took its name in the cluster first. That writer is the reconciler, which publishes a
    /// version only when the route's models or encoder changed. A version of the learning
    /// loop made for the old pool could not serve anyway, and the next training run makes a
    /// new candidate. The version has not served, since the cluster never had it.
    async fn drop_taken(
        &self,
        key: &str,
        route: &LlmRoute,
        version: &str,
    ) -> Result<(), SyncError> {
        let store = self.store();
        store.raise_highest_version(key, version_number(version))?;
        store.delete_policy_versions(key, &[version.to_string()])?;
        let mut state = store.rollout_state(key)?;
        if state.canary.as_deref() == Some(version) {
            state.canary = None;
            state.weight = 0.0;
            state.step = 0;
            store.save_rollout_state(key, &state)?;
        }
        let message = format!(
            "dropped policy version {version} before publishing it: the cluster already has another policy named {version}, which the reconciler published for the route's changed models or encoder"
        );
        store.record_timeline(key, "PolicyDropped", &message)?;
        tracing::warn!(route = %key, policy_version = %version, "{message}");
        self.publish_event(route, "PolicyDropped", &message).await;
        Ok(())
    }

    /// Forgets the dirty mark and pending deletions of routes that no longer exist, so that a
    /// route created again under the same name starts clean.
    fn forget_absent_routes(&self, present: &HashSet<String>) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key| present.contains(key));
        self.pending_deletions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, _| present.contains(key));
    }

    /// Deletes from the cluster the policy versions pending for `key`: those that the history
    /// limit deleted from the store, and those that the import found deleted in the cluster
    /// (their ConfigMaps). Each goes with its `LLMPolicy` first and its ConfigMap second, so
    /// a failure in between leaves a ConfigMap without a policy rather than a policy whose
    /// file is gone, which the import would wait for. Such leftover ConfigMaps are deleted
    /// here too.
    async fn delete_pruned(&self, key: &str, namespace: &str, name: &str) -> Result<(), SyncError> {
        let versions: Vec<String> = self
            .pending_deletions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default();
        if versions.is_empty() {
            return Ok(());
        }
        // The route as it is now: a version pinned or served since this pass's import stays.
        let routes: Api<LlmRoute> = Api::namespaced(self.client.clone(), namespace);
        let protected = match routes.get_opt(name).await? {
            Some(route) => protected_versions(&route),
            None => return Ok(()),
        };
        let policies: Api<LlmPolicy> = Api::namespaced(self.client.clone(), namespace);
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let mut deleted = Vec::new();
        for version in &versions {
            if protected.contains(version) {
                tracing::info!(route = %key, policy_version = %version, "keeping a policy version that the route now pins or serves");
                self.pending_deletions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key.to_string())
                    .or_default()
                    .remove(version);
                continue;
            }
            delete_if_present(&policies, &crate::names::policy_name(name, version)).await?;
            delete_if_present(
                &configmaps,
                &crate::names::policy_configmap_name(name, version),
            )
            .await?;
            self.pending_deletions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.to_string())
                .or_default()
                .remove(version);
            deleted.push(version.clone());
        }
        if !deleted.is_empty() {
            tracing::info!(route = %key, versions = ?deleted, "deleted old policy versions from the cluster");
        }

        // ConfigMaps left by a deletion that stopped between the two requests. The reconciler
        // and the mirror create a version's ConfigMap before its LLMPolicy, but only for a
        // version above every listed one, so a ConfigMap below the highest listed version
        // without an LLMPolicy is such a leftover.
        let listed: Vec<LlmPolicy> = policies
            .list(&ListParams::default().labels(&format!("{ROUTE_LABEL}={name}")))
            .await?
            .items
            .into_iter()
            .filter(|p| p.spec.route == name)
            .collect();
        let highest = listed
            .iter()
            .map(|p| version_number(&p.spec.version))
            .max()
            .unwrap_or(0);
        let with_policy: HashSet<&str> = listed.iter().map(|p| p.spec.version.as_str()).collect();
        let selector =
            format!("{MANAGED_BY}={MANAGED_BY_VALUE},{ROUTE_LABEL}={name},{VERSION_LABEL}");
        for configmap in configmaps
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
        {
            let Some(version) = configmap.labels().get(VERSION_LABEL).cloned() else {
                continue;
            };
            let configmap_name = configmap.name_any();
            if with_policy.contains(version.as_str())
                || version_number(&version) >= highest
                || configmap_name != crate::names::policy_configmap_name(name, &version)
            {
                continue;
            }
            delete_if_present(&configmaps, &configmap_name).await?;
            tracing::info!(route = %key, policy_version = %version, configmap = %configmap_name, "deleted a policy ConfigMap whose LLMPolicy was deleted");
        }
        Ok(())
    }

    async fn publish_event(&self, route: &LlmRoute, reason: &str, message: &str) {
        let type_ = match reason {
            "GateRejected" | "CanaryAborted" | "TrainingFailed" | "PolicyDropped" => {
                EventType::Warning
            }
            _ => EventType::Normal,
        };
        let mut note = message.to_string();
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push('…');
        }
        let event = KubeEvent {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Learn".to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &route.object_ref(&())).await {
            tracing::warn!(error = %error, reason, "failed to publish an Event of the learning loop; the route's status still records the decision");
        }
    }
}

/// The route status fields the learning loop owns.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RolloutFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    canary_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary_policy_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary_weight: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary_step: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_training: Option<llmroute_api::crd::LastTraining>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary_abort: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    highest_policy_version: Option<String>,
}

/// Builds the route status fields that describe `state`, with `highest` the route's highest
/// version number so far.
fn rollout_status(state: &RolloutState, records: &[PolicyRecord], highest: u64) -> RolloutFields {
    let canary = state.canary.as_ref().and_then(|version| {
        records
            .iter()
            .find(|r| &r.version == version)
            .map(|r| (version.clone(), r.sha256.clone()))
    });
    let serving = canary.is_some() && state.weight > 0.0;
    RolloutFields {
        canary_policy: canary.as_ref().map(|c| c.0.clone()),
        canary_policy_sha256: canary.map(|c| c.1),
        canary_weight: serving.then_some(state.weight),
        canary_step: serving.then_some(state.step),
        last_training: state.last_training.clone(),
        canary_abort: state.degraded.clone(),
        highest_policy_version: (highest > 0).then(|| format!("v{highest}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmroute_api::crd::PolicyOrigin;

    fn record(version: &str, sha256: &str) -> PolicyRecord {
        PolicyRecord {
            version: version.into(),
            sha256: sha256.into(),
            phase: PolicyPhase::Canary,
            origin: PolicyOrigin::Trained,
            parent: Some("v1".into()),
            created_ms: 0,
            message: None,
            training: None,
            off_policy: None,
            live: None,
            ended_ms: None,
        }
    }

    #[test]
    fn imported_end_prefers_the_cluster() {
        let status = |end: Option<&str>| LlmPolicyStatus {
            phase: Some(PolicyPhase::Retired),
            end_time: end.map(String::from),
            ..LlmPolicyStatus::default()
        };
        let stored = |phase, ended_ms| PolicyRecord {
            phase,
            ended_ms,
            ..record("v5", "aa")
        };
        let cluster = "2026-12-06T12:00:00.123Z";
        // Another leader ended the version again since this store saw it.
        let retired = stored(PolicyPhase::Retired, Some(5));
        assert_eq!(
            imported_end(&status(Some(cluster)), Some(&retired), 1),
            Some(1_796_558_400_123)
        );
        assert_eq!(imported_end(&status(None), Some(&retired), 1), Some(5));
        // Serving in this store: it ends now.
        let stable = stored(PolicyPhase::Stable, None);
        assert_eq!(imported_end(&status(None), Some(&stable), 1), None);
        // Ended before end times were recorded: its creation counts.
        assert_eq!(imported_end(&status(None), None, 1), Some(1));
    }

    #[test]
    fn policy_end_times_survive_the_status() {
        let ms = 1_796_558_400_123;
        let text = format_time_ms(ms).unwrap();
        assert_eq!(text, "2026-12-06T12:00:00.123Z");
        assert_eq!(parse_time_ms(&text), Some(ms));
        assert_eq!(parse_time_ms("yesterday"), None);
    }

    #[test]
    fn rollout_status_names_the_canary_with_its_digest() {
        let state = RolloutState {
            canary: Some("v2".into()),
            step: 1,
            weight: 0.5,
            ..RolloutState::default()
        };
        let fields = rollout_status(&state, &[record("v1", "aa"), record("v2", "bb")], 7);
        assert_eq!(fields.highest_policy_version.as_deref(), Some("v7"));
        assert_eq!(fields.canary_policy.as_deref(), Some("v2"));
        assert_eq!(fields.canary_policy_sha256.as_deref(), Some("bb"));
        assert_eq!(fields.canary_weight, Some(0.5));
        assert_eq!(fields.canary_step, Some(1));
        let json = serde_json::to_value(&fields).unwrap();
        assert_eq!(json["canaryPolicySha256"], "bb");
    }

    #[test]
    fn rollout_status_without_canary_omits_the_canary_fields() {
        let state = RolloutState {
            degraded: Some("canary v2 aborted".into()),
            ..RolloutState::default()
        };
        let fields = rollout_status(&state, &[record("v1", "aa")], 0);
        let json = serde_json::to_value(&fields).unwrap();
        assert_eq!(json, json!({"canaryAbort": "canary v2 aborted"}));
    }

    #[test]
    fn rollout_status_skips_unknown_canary() {
        let state = RolloutState {
            canary: Some("v9".into()),
            weight: 0.1,
            ..RolloutState::default()
        };
        let fields = rollout_status(&state, &[record("v1", "aa")], 0);
        assert_eq!(fields, RolloutFields::default());
    }
}
