//! The control API's view of the cluster: sidecar configurations from the routes' specs and
//! statuses, policy artifacts from the policy ConfigMaps, events into the local store.
//!
//! Every replica serves, leader or not. A route's configuration is served once the leader has
//! reconciled its current spec: the status records the configuration's version and digest,
//! and a replica serves what it computes from spec and status only when the digests agree.
//! Until then it keeps serving the previous configuration, so sidecars never see a spec that
//! the operator has not checked.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher::watcher};
use kube::{Api, ResourceExt};
use llmroute_api::crd::LlmRoute;
use llmroute_api::{PolicyRef, SidecarConfig};
use llmroute_control::store::Store;
use llmroute_control::{ControlBackend, EventDestination};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::leader::LeaderView;
use crate::metrics::Metrics;
use crate::names::{MANAGED_BY, MANAGED_BY_VALUE, POLICY_KEY, SHA256_ANNOTATION, route_key};
use crate::reconcile::{config_digest, route_config, status_canary};

/// Routes and policies as the control API serves them.
pub struct ClusterBackend {
    routes: RwLock<HashMap<String, watch::Sender<Arc<SidecarConfig>>>>,
    /// The route objects, for the injection webhook.
    objects: RwLock<HashMap<String, Arc<LlmRoute>>>,
    policies: RwLock<PolicyCache>,
    store: Store,
    routes_synced: AtomicBool,
    policies_synced: AtomicBool,
    metrics: Arc<Metrics>,
    /// The Lease holder from the last election round, set when this replica forwards event
    /// batches to the leader. Unset, every replica stores the events it receives.
    leader_view: OnceLock<watch::Receiver<LeaderView>>,
}

impl std::fmt::Debug for ClusterBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBackend").finish_non_exhaustive()
    }
}

impl ControlBackend for ClusterBackend {
    fn subscribe(&self, route: &str) -> Option<watch::Receiver<Arc<SidecarConfig>>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.get(route).map(watch::Sender::subscribe)
    }

    fn route_names(&self) -> Vec<String> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = routes.keys().cloned().collect();
        names.sort();
        names
    }

    fn policy(&self, sha256: &str) -> Result<Option<Vec<u8>>, String> {
        let policies = self.policies.read().unwrap_or_else(|p| p.into_inner());
        Ok(policies.files.get(sha256).cloned())
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn route_retention(&self, route: &str) -> Option<(Option<Duration>, Option<u64>)> {
        llmroute_control::server::retention_limits(&self.route(route)?.spec)
    }

    /// Events go to the leader, which trains on them: stored here when this replica leads,
    /// forwarded when another replica leads and publishes its control address.
    fn event_destination(&self) -> EventDestination {
        let Some(view) = self.leader_view.get() else {
            return EventDestination::Local;
        };
        match &*view.borrow() {
            LeaderView::Me => EventDestination::Local,
            LeaderView::Other {
                identity,
                control_address: Some(address),
            } => EventDestination::Forward {
                leader: identity.clone(),
                address: address.clone(),
            },
            // A leader that publishes no address stores only what it receives itself, as
            // every replica did before forwarding existed.
            LeaderView::Other {
                control_address: None,
                ..
            } => EventDestination::Local,
            LeaderView::Unknown => EventDestination::NoLeader,
        }
    }
}

impl ClusterBackend {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            routes: RwLock::new(HashMap::new()),
            objects: RwLock::new(HashMap::new()),
            policies: RwLock::new(PolicyCache::default()),
            store,
            routes_synced: AtomicBool::new(false),
            policies_synced: AtomicBool::new(false),
            metrics,
            leader_view: OnceLock::new(),
        }
    }

    /// Sends the event batches this replica receives to the leader that `view` names, from
    /// now on. Only the first call has an effect.
    pub fn forward_events_to_leader(&self, view: watch::Receiver<LeaderView>) {
        let _ = self.leader_view.set(view);
    }

    /// The route with this key, as last seen by the watch.
    pub fn route(&self, key: &str) -> Option<Arc<LlmRoute>> {
        self.objects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Every route the watch has seen, sorted by key.
    pub fn routes(&self) -> Vec<(String, Arc<LlmRoute>)> {
        let objects = self.objects.read().unwrap_or_else(|p| p.into_inner());
        let mut routes: Vec<(String, Arc<LlmRoute>)> = objects
            .iter()
            .map(|(key, route)| (key.clone(), route.clone()))
            .collect();
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        routes
    }

    fn remember(&self, key: &str, route: Option<LlmRoute>) {
        let mut objects = self.objects.write().unwrap_or_else(|p| p.into_inner());
        match route {
            Some(route) => {
                objects.insert(key.to_string(), Arc::new(route));
            }
            None => {
                objects.remove(key);
            }
        }
    }

    /// Whether both watches have listed their objects once.
    pub fn is_synced(&self) -> bool {
        self.routes_synced.load(Ordering::Relaxed) && self.policies_synced.load(Ordering::Relaxed)
    }

    /// Serves the configuration that `route`'s spec and status give, when the status describes
    /// the current spec. Returns whether a new configuration was published.
    pub fn update_route(&self, route: &LlmRoute) -> bool {
        let Some(namespace) = route.namespace() else {
            return false;
        };
        let key = route_key(&namespace, &route.name_any());
        let Some(config) = served_config(&key, route) else {
            return false;
        };
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let changed = match routes.get(&key) {
            Some(sender) => {
                if sender.borrow().version >= config.version && **sender.borrow() == config {
                    false
                } else if sender.borrow().version > config.version {
                    // An older status than the one served (a stale watch event).
                    false
                } else {
                    sender.send_replace(Arc::new(config));
                    true
                }
            }
            None => {
                routes.insert(key.clone(), watch::channel(Arc::new(config)).0);
                true
            }
        };
        self.metrics.routes_served.set(routes.len() as i64);
        if changed {
            let version = routes[&key].borrow().version;
            tracing::info!(route = %key, config_version = version, "serving a new sidecar configuration");
        }
        changed
    }

    /// Stops serving `key`; sidecars waiting on it get 404.
    pub fn remove_route(&self, key: &str) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.remove(key).is_some() {
            tracing::info!(route = %key, "route removed from the control API");
        }
        self.metrics.routes_served.set(routes.len() as i64);
    }

    /// Runs [`ClusterBackend::forget_route`] on a blocking thread: deleting a route's events
    /// may take seconds.
    async fn forget_route_blocking(self: Arc<Self>, key: String) {
        if let Err(error) = tokio::task::spawn_blocking(move || self.forget_route(&key)).await {
            tracing::error!(error = %error, "the task that deletes a route's events failed");
        }
    }

    /// Deletes the stored events and policies of every route that is neither in `listed` (a complete list
    /// of the routes) nor served.
    async fn forget_unlisted_routes(self: Arc<Self>, listed: HashSet<String>) {
        let backend = self.clone();
        let counted = tokio::task::spawn_blocking(move || backend.store.stored_routes()).await;
        let stored = match counted {
            Ok(Ok(routes)) => routes,
            Ok(Err(error)) => {
                tracing::error!(error = %error, "failed to list the routes of the event store; their events and policies stay until the next list");
                return;
            }
            Err(error) => {
                tracing::error!(error = %error, "the task that lists the routes of the event store failed");
                return;
            }
        };
        let served: HashSet<String> = self.route_names().into_iter().collect();
        for key in stored {
            if !listed.contains(&key) && !served.contains(&key) {
                self.clone().forget_route_blocking(key).await;
            }
        }
    }

    /// Removes a deleted route, its stored events and its policy versions in the store.
    pub fn forget_route(&self, key: &str) {
        self.remove_route(key);
        match self.store.delete_route(key) {
            Ok(events) => {
                tracing::info!(route = %key, events, "deleted the route's stored events and policy versions")
            }
            Err(error) => {
                tracing::error!(route = %key, error = %error, "failed to delete the route's stored events and policy versions")
            }
        }
    }

    /// Keeps the file of a policy ConfigMap; returns the ConfigMap's key and the digest.
    fn update_policy(&self, configmap: &ConfigMap) -> Option<(String, String)> {
        let (sha256, bytes) = policy_artifact(configmap)?;
        let holder = configmap_key(configmap);
        let changed = {
            let mut policies = self.policies.write().unwrap_or_else(|p| p.into_inner());
            policies.files.insert(sha256.clone(), bytes);
            let previous = policies.holders.insert(holder.clone(), sha256.clone());
            self.metrics
                .policies_served
                .set(policies.files.len() as i64);
            previous.is_some_and(|p| p != sha256)
        };
        if changed {
            // The ConfigMap held another file before.
            self.forget_unheld_policies();
        }
        Some((holder, sha256))
    }

    /// Forgets a deleted policy ConfigMap, and the file it held if nothing else needs it.
    fn remove_policy(&self, configmap: &ConfigMap) {
        self.policies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .holders
            .remove(&configmap_key(configmap));
        self.forget_unheld_policies();
    }

    /// Drops the files that no ConfigMap holds, unless a served configuration names them,
    /// because a sidecar may still be loading one (digests never change meaning). Two
    /// ConfigMaps can hold the same file, as when two routes start from one pretrained policy.
    fn forget_unheld_policies(&self) {
        let served: HashSet<String> = {
            let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
            routes
                .values()
                .flat_map(|sender| {
                    let config = sender.borrow();
                    [&config.stable, &config.canary]
                        .into_iter()
                        .flatten()
                        .map(|p| p.sha256.clone())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let mut policies = self.policies.write().unwrap_or_else(|p| p.into_inner());
        let held: HashSet<String> = policies.holders.values().cloned().collect();
        let before = policies.files.len();
        policies
            .files
            .retain(|digest, _| held.contains(digest) || served.contains(digest));
        let after = policies.files.len();
        if after != before {
            tracing::info!(
                forgotten = before - after,
                kept = after,
                "dropped the files of deleted policy ConfigMaps from memory"
            );
        }
        self.metrics.policies_served.set(after as i64);
    }

    /// Watches every LLMRoute until the stream ends (it does not: the watcher retries with
    /// backoff and logs each failure).
    pub async fn watch_routes(self: Arc<Self>, api: Api<LlmRoute>) {
        let mut seen = HashSet::new();
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        loop {
            match stream.try_next().await {
                Ok(Some(Event::Apply(route) | Event::InitApply(route))) => {
                    let key = route_key(&route.namespace().unwrap_or_default(), &route.name_any());
                    seen.insert(key.clone());
                    self.update_route(&route);
                    self.remember(&key, Some(route));
                }
                Ok(Some(Event::Delete(route))) => {
                    let key = route_key(&route.namespace().unwrap_or_default(), &route.name_any());
                    // The leader deleted its events before it released the finalizer. A
                    // follower deletes its copies here, so that a route created again with
                    // this name does not inherit them after a failover.
                    self.clone().forget_route_blocking(key.clone()).await;
                    self.remember(&key, None);
                }
                Ok(Some(Event::Init)) => seen.clear(),
                Ok(Some(Event::InitDone)) => {
                    let stale: Vec<String> = self
                        .route_names()
                        .into_iter()
                        .filter(|key| !seen.contains(key))
                        .collect();
                    // Deleted while the watch was down.
                    for key in stale {
                        self.clone().forget_route_blocking(key).await;
                    }
                    // Deleted while this replica was not running: its store still has the
                    // route's events (a follower's copies), but it never served the route.
                    self.clone().forget_unlisted_routes(seen.clone()).await;
                    let gone: Vec<String> = self
                        .objects
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .keys()
                        .filter(|key| !seen.contains(*key))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.remember(&key, None);
                    }
                    if !self.routes_synced.swap(true, Ordering::Relaxed) {
                        tracing::info!(routes = seen.len(), "listed the routes");
                    }
                }
                Ok(None) => {
                    tracing::error!("the route watch ended; the control API serves what it has");
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "the route watch failed; retrying with backoff");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Watches the policy ConfigMaps the operator manages.
    pub async fn watch_policies(self: Arc<Self>, api: Api<ConfigMap>) {
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_VALUE}"));
        let mut stream = watcher(api, config).default_backoff().boxed();
        // ConfigMaps seen during a (re)list, to forget those deleted while unwatched.
        let mut listed: HashMap<String, String> = HashMap::new();
        loop {
            match stream.try_next().await {
                Ok(Some(Event::Apply(configmap))) => {
                    self.update_policy(&configmap);
                }
                Ok(Some(Event::InitApply(configmap))) => {
                    if let Some((holder, sha256)) = self.update_policy(&configmap) {
                        listed.insert(holder, sha256);
                    }
                }
                Ok(Some(Event::Delete(configmap))) => self.remove_policy(&configmap),
                Ok(Some(Event::Init)) => listed.clear(),
                Ok(Some(Event::InitDone)) => {
                    self.policies
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .holders = std::mem::take(&mut listed);
                    self.forget_unheld_policies();
                    if !self.policies_synced.swap(true, Ordering::Relaxed) {
                        tracing::info!("listed the policy ConfigMaps");
                    }
                }
                Ok(None) => {
                    tracing::error!("the policy watch ended; the control API serves what it has");
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "the policy watch failed; retrying with backoff");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The configuration to serve for `route`, when its status describes its current spec.
pub fn served_config(key: &str, route: &LlmRoute) -> Option<SidecarConfig> {
    let status = route.status.as_ref()?;
    let stable = PolicyRef {
        version: status.stable_policy.clone()?,
        sha256: status.stable_policy_sha256.clone()?,
    };
    let version = status.config_version?;
    let canary = status_canary(&route.spec, status);
    if status.config_digest.as_deref()? != config_digest(key, &route.spec, &stable, canary.as_ref())
    {
        return None;
    }
    Some(route_config(
        key,
        &route.spec,
        version,
        &stable,
        canary.as_ref(),
    ))
}

/// Policy files from the watched ConfigMaps, by digest.
#[derive(Debug, Default)]
struct PolicyCache {
    files: HashMap<String, Vec<u8>>,
    /// The digest each ConfigMap (`namespace/name`) holds.
    holders: HashMap<String, String>,
}

fn configmap_key(configmap: &ConfigMap) -> String {
    format!(
        "{}/{}",
        configmap.namespace().unwrap_or_default(),
        configmap.name_any()
    )
}

/// The digest and bytes of a policy ConfigMap, when its bytes match its digest annotation.
fn policy_artifact(configmap: &ConfigMap) -> Option<(String, Vec<u8>)> {
    let claimed = configmap.annotations().get(SHA256_ANNOTATION)?;
    let ByteString(bytes) = configmap.binary_data.as_ref()?.get(POLICY_KEY)?;
    let actual = hex::encode(Sha256::digest(bytes));
    if *claimed != actual {
        tracing::error!(
            configmap = %configmap.name_any(),
            namespace = %configmap.namespace().unwrap_or_default(),
            claimed = %claimed,
            actual = %actual,
            "a policy ConfigMap's bytes do not match its sha256 annotation; not serving it"
        );
        return None;
    }
    Some((actual, bytes.clone()))
}

#[cfg(test)]
mod tests {
    use llmroute_api::{CompletedEvent, DecisionRecord, Outcome, Preference};

    use super::*;

    fn event(route: &str, n: u32) -> CompletedEvent {
        CompletedEvent {
            decision: DecisionRecord {
                decision_id: format!("{n:032x}"),
                route: route.into(),
                config_version: 1,
                model: "small".into(),
                routed: true,
                preference: Preference::from_quality(0.5).unwrap(),
                policy_version: Some("v1".into()),
                propensity: Some(0.5),
            },
            served_model: "small".into(),
            embedding: vec![0.5; 4],
            quality: Some(0.5),
            cost_usd: Some(1e-5),
            prompt_tokens: Some(10),
            completion_tokens: Some(20),
            latency_ms: 12.5,
            outcome: Outcome::Success,
            attempts: 1,
            timestamp_ms: 1,
        }
    }

    fn policy_configmap(name: &str, bytes: &[u8]) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "namespace": "shop",
                "annotations": {SHA256_ANNOTATION: hex::encode(Sha256::digest(bytes))},
            },
            "binaryData": {POLICY_KEY: ByteString(bytes.to_vec())},
        }))
        .unwrap()
    }

    /// A deleted ConfigMap's file leaves memory, unless another ConfigMap contains it or a
    /// served configuration names it.
    #[test]
    fn deleted_policies_leave_memory_unless_held_or_served() {
        let state = tempfile::tempdir().unwrap();
        let backend = ClusterBackend::new(
            Store::open(state.path()).unwrap(),
            Arc::new(Metrics::default()),
        );
        let served = policy_configmap("chat-policy-v1", b"served");
        let retired = policy_configmap("chat-policy-v2", b"retired");
        let shared = [
            policy_configmap("a-policy-v1", b"shared"),
            policy_configmap("b-policy-v1", b"shared"),
        ];
        let (_, served_sha) = backend.update_policy(&served).unwrap();
        let (_, retired_sha) = backend.update_policy(&retired).unwrap();
        let (_, shared_sha) = backend.update_policy(&shared[0]).unwrap();
        backend.update_policy(&shared[1]).unwrap();

        let config = SidecarConfig {
            route: "shop/chat".into(),
            version: 1,
            models: Vec::new(),
            default_preference: llmroute_api::Preference::from_quality(0.5).unwrap(),
            exploration: Default::default(),
            stable: Some(PolicyRef {
                version: "v1".into(),
                sha256: served_sha.clone(),
            }),
            canary: None,
            canary_weight: 0.0,
            fallback: "small".into(),
            max_attempts: 1,
        };
        backend
            .routes
            .write()
            .unwrap()
            .insert("shop/chat".into(), watch::channel(Arc::new(config)).0);

        for configmap in [&served, &retired, &shared[0]] {
            backend.remove_policy(configmap);
        }
        assert_eq!(
            backend.policy(&served_sha).unwrap(),
            Some(b"served".to_vec())
        );
        assert_eq!(backend.policy(&retired_sha).unwrap(), None);
        assert_eq!(
            backend.policy(&shared_sha).unwrap(),
            Some(b"shared".to_vec())
        );
        backend.remove_policy(&shared[1]);
        assert_eq!(backend.policy(&shared_sha).unwrap(), None);
    }

    /// A replica that was not running when a route was deleted still has the route's events
    /// (copies from the leader). Its first list of the routes deletes them.
    #[tokio::test]
    async fn unlisted_routes_lose_their_events() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        store
            .insert_events("shop/gone", "pod", &[event("shop/gone", 1)])
            .unwrap();
        store
            .insert_events("shop/kept", "pod", &[event("shop/kept", 2)])
            .unwrap();
        let backend = Arc::new(ClusterBackend::new(store, Arc::new(Metrics::default())));
        let listed: HashSet<String> = ["shop/kept".to_string()].into();
        backend.clone().forget_unlisted_routes(listed).await;
        assert_eq!(
            backend.store.event_counts().unwrap(),
            vec![("shop/kept".to_string(), 1)]
        );
    }
}
