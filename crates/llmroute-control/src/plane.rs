//! The control plane's routes: `LLMRoute` files turned into versioned sidecar configurations,
//! reloaded when the folder changes, with a watch channel per route for long-polling sidecars.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use llmroute_api::{PolicyRef, SidecarConfig};
use tokio::sync::watch;

use llmroute_api::crd::{LlmRouteSpec, PolicyOrigin};

use crate::history::PolicyRecord;
use crate::route::{LlmRoute, load_routes};
use crate::store::{Store, StoreError};

/// Result of one reload.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReloadReport {
    /// Routes whose configuration got a new version.
    pub changed: Vec<String>,
    /// Routes that disappeared from the folder.
    pub removed: Vec<String>,
    /// Files or routes that could not be used, with the reason; their last good configuration
    /// keeps serving.
    pub errors: Vec<String>,
}

struct RouteEntry {
    route: LlmRoute,
    sender: watch::Sender<Arc<SidecarConfig>>,
}

/// Routes, their current configurations, and the store behind them.
pub struct ControlPlane {
    store: Arc<Store>,
    folder: PathBuf,
    routes: RwLock<HashMap<String, RouteEntry>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("folder", &self.folder)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Creates the control plane for the route files in `folder` and loads them once.
    pub fn new(folder: &Path, store: Arc<Store>) -> (Arc<Self>, ReloadReport) {
        if let Err(error) = store.ensure_history() {
            tracing::error!(error = %error, "failed to create the policy history tables; routes serve their newest published policy");
        }
        let plane = Arc::new(Self {
            store,
            folder: folder.to_path_buf(),
            routes: RwLock::new(HashMap::new()),
        });
        let report = plane.reload();
        (plane, report)
    }

    /// Returns the store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Re-reads every route file and publishes the configurations that changed.
    pub fn reload(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        let files = match load_routes(&self.folder) {
            Ok(files) => files,
            Err(error) => {
                tracing::error!(error = %error, "failed to list the route folder; keeping every route");
                report.errors.push(error.to_string());
                return report;
            }
        };
        let mut seen: HashMap<String, PathBuf> = HashMap::new();
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let mut failed_names = Vec::new();
        for (path, parsed) in files {
            let route = match parsed {
                Ok(route) => route,
                Err(error) => {
                    tracing::error!(file = %path.display(), error = %error, "invalid route file; its route keeps its last good configuration");
                    report.errors.push(error.to_string());
                    // The file's route name is unknown, so a removed route cannot be
                    // distinguished from this one. Every route stays until the file is fixed.
                    failed_names.push(path);
                    continue;
                }
            };
            let name = route.metadata.name.clone();
            if let Some(first) = seen.get(&name) {
                let message = format!(
                    "route {name:?} in {} is already defined in {}; rename one of them",
                    path.display(),
                    first.display()
                );
                tracing::error!(route = %name, "{message}");
                report.errors.push(message);
                continue;
            }
            seen.insert(name.clone(), path.clone());
            match self.configure(&route, routes.get(&name)) {
                Ok((config, changed)) => {
                    if changed {
                        tracing::info!(route = %name, config_version = config.version, stable = config.stable.as_ref().map(|p| p.version.as_str()).unwrap_or("none"), "route configuration changed");
                        report.changed.push(name.clone());
                    }
                    match routes.get_mut(&name) {
                        Some(entry) => {
                            entry.route = route;
                            if changed {
                                entry.sender.send_replace(Arc::new(config));
                            }
                        }
                        None => {
                            let (sender, _) = watch::channel(Arc::new(config));
                            routes.insert(name, RouteEntry { route, sender });
                        }
                    }
                }
                Err(message) => {
                    tracing::error!(route = %name, file = %path.display(), error = %message, "invalid route; it keeps its last good configuration");
                    report.errors.push(format!("{}: {message}", path.display()));
                }
            }
        }
        if failed_names.is_empty() {
            let removed: Vec<String> = routes
                .keys()
                .filter(|name| !seen.contains_key(*name))
                .cloned()
                .collect();
            for name in removed {
                tracing::info!(route = %name, "route file removed; the route is no longer served");
                routes.remove(&name);
                report.removed.push(name);
            }
        }
        report
    }

    /// Builds the configuration of `route`, keeping the stored version when nothing but the
    /// version would change. Returns the configuration and whether it is new.
    fn configure(
        &self,
        route: &LlmRoute,
        current: Option<&RouteEntry>,
    ) -> Result<(SidecarConfig, bool), String> {
        let name = &route.metadata.name;
        let pinned = route
            .spec
            .policy
            .as_ref()
            .and_then(|p| p.version.as_deref());
        let stable = self
            .serving_stable_for(name, pinned)
            .map_err(|e| e.to_string())?;
        if let (Some(version), None) = (pinned, &stable) {
            return Err(format!(
                "spec.policy.version pins {version:?}, which is not published for this route"
            ));
        }
        let (canary, canary_weight) = if pinned.is_none() {
            self.serving_canary(name).map_err(|e| e.to_string())?
        } else {
            (None, 0.0)
        };
        let mut candidate = route.sidecar_config(0, stable);
        candidate.canary = canary;
        candidate.canary_weight = canary_weight;
        candidate.validate().map_err(|e| e.to_string())?;
        let candidate_json = serde_json::to_string(&candidate).map_err(|e| e.to_string())?;
        let stored = self.store.route_config(name).map_err(|e| e.to_string())?;
        if let Some((version, json)) = &stored
            && *json == candidate_json
        {
            let unchanged = current.is_some_and(|entry| entry.sender.borrow().version == *version);
            candidate.version = *version;
            return Ok((candidate, !unchanged));
        }
        let version = stored.map(|(version, _)| version).unwrap_or(0) + 1;
        self.store
            .save_route_config(name, version, &candidate_json)
            .map_err(|e| e.to_string())?;
        candidate.version = version;
        Ok((candidate, true))
    }

    /// The policy that serves `route` as stable: the pinned version, else the history's
    /// `Stable` version, else (for state folders written before the history existed) the
    /// newest published one.
    fn serving_stable_for(
        &self,
        route: &str,
        pinned: Option<&str>,
    ) -> Result<Option<PolicyRef>, StoreError> {
        if pinned.is_some() {
            return self.store.stable_policy(route, pinned);
        }
        if let Some(record) = self.history_stable(route)? {
            return self.store.stable_policy(route, Some(&record.version));
        }
        self.store.stable_policy(route, None)
    }

    /// Returns the history's `Stable` record of `route`, the newest when several claim it.
    pub fn history_stable(&self, route: &str) -> Result<Option<PolicyRecord>, StoreError> {
        crate::learning::history_stable(&self.store, route)
    }

    /// Returns the canary policy of `route` and its weight, from the rollout state.
    fn serving_canary(&self, route: &str) -> Result<(Option<PolicyRef>, f64), StoreError> {
        let state = self.store.rollout_state(route)?;
        match state.canary {
            Some(version) if state.weight > 0.0 => {
                let reference = self.store.stable_policy(route, Some(&version))?;
                let weight = if reference.is_some() {
                    state.weight
                } else {
                    0.0
                };
                Ok((reference, weight))
            }
            _ => Ok((None, 0.0)),
        }
    }

    /// Subscribes to the configuration of `route`.
    pub fn subscribe(&self, route: &str) -> Option<watch::Receiver<Arc<SidecarConfig>>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.get(route).map(|entry| entry.sender.subscribe())
    }

    /// Names of the served routes, sorted.
    pub fn route_names(&self) -> Vec<String> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = routes.keys().cloned().collect();
        names.sort();
        names
    }

    /// Publishes a policy file as `version` of `route` and reloads, so that a route without a
    /// pinned version serves it.
    pub fn publish_policy(
        &self,
        route: &str,
        version: &str,
        bytes: &[u8],
    ) -> Result<PolicyRef, StoreError> {
        let reference = crate::learning::publish_stable_version(
            &self.store,
            route,
            version,
            bytes,
            PolicyOrigin::Pretrained,
            None,
            "published with llmroute standalone --publish",
        )?;
        self.reload();
        Ok(reference)
    }

    /// Polls the route folder every `period` and reloads when a file was added, removed or
    /// modified, until `shutdown` completes.
    pub async fn watch_folder(
        self: Arc<Self>,
        period: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut last = fingerprint(&self.folder);
        let mut ticker = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let now = fingerprint(&self.folder);
                    if now != last {
                        last = now;
                        let plane = self.clone();
                        match tokio::task::spawn_blocking(move || plane.reload()).await {
                            Ok(report) => tracing::info!(changed = ?report.changed, removed = ?report.removed, errors = report.errors.len(), "reloaded the route folder"),
                            Err(error) => tracing::error!(error = %error, "the reload task failed"),
                        }
                    }
                }
                () = &mut shutdown => break,
            }
        }
    }
}

/// Names, sizes and modification times of the folder's files, to detect changes by polling.
fn fingerprint(folder: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            Some((entry.path(), metadata.len(), metadata.modified().ok()))
        })
        .collect();
    files.sort();
    files
}

/// The standalone plane's side of the learning loop: routes come from the route folder, and
/// a pass that changed what a route serves reloads the configurations.
impl crate::learning::LearningHost for ControlPlane {
    fn route_specs(&self) -> Vec<(String, LlmRouteSpec)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut specs: Vec<(String, LlmRouteSpec)> = routes
            .iter()
            .map(|(name, entry)| (name.clone(), entry.route.spec.clone()))
            .collect();
        specs.sort_by(|a, b| a.0.cmp(&b.0));
        specs
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn serving_stable(&self, route: &str) -> Result<Option<PolicyRef>, StoreError> {
        let pinned = {
            let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
            routes.get(route).and_then(|entry| {
                entry
                    .route
                    .spec
                    .policy
                    .as_ref()
                    .and_then(|p| p.version.clone())
            })
        };
        self.serving_stable_for(route, pinned.as_deref())
    }

    /// Does not reload: [`changed`](crate::learning::LearningHost::changed) does, once per pass.
    fn publish_version(
        &self,
        route: &str,
        version: &str,
        bytes: &[u8],
        origin: PolicyOrigin,
        parent: Option<String>,
        message: &str,
    ) -> Result<PolicyRef, StoreError> {
        crate::learning::publish_stable_version(
            &self.store,
            route,
            version,
            bytes,
            origin,
            parent,
            message,
        )
    }

    fn changed(&self) {
        self.reload();
    }
}
