//! Following the control API: long-polling the route's configuration, fetching policy
//! artifacts by sha256, and swapping the sidecar's route state. The last good state keeps
//! serving while the control plane is unreachable or sends something unusable.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmroute_api::{EventBatch, SidecarConfig};
use ort::environment::Environment;
use sha2::{Digest, Sha256};

use crate::sidecar::Sidecar;
use crate::state::RouteState;

/// Wait of one long poll, in seconds; the control API caps it at 60.
pub const LONG_POLL_SECONDS: u64 = 30;
/// Maximum size of a policy artifact, in bytes (a policy file is about 200 KB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024 * 1024;
/// Maximum size of a configuration response, in bytes.
const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
/// First delay after a failed poll; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Maximum delay between failed polls.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A failed delivery of an event batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    pub message: String,
    /// True when the control plane rejected the batch itself (400, 403, 413 or 422): sending
    /// the same batch again cannot succeed.
    pub rejected: bool,
}

impl DeliveryError {
    /// Creates a failure that a later attempt may not have, such as a timeout, a connection
    /// error or a 5xx response.
    pub fn retry(message: String) -> Self {
        Self {
            message,
            rejected: false,
        }
    }

    /// Tests whether a response status rejects the batch for good.
    pub fn is_rejection(status: http::StatusCode) -> bool {
        matches!(status.as_u16(), 400 | 403 | 413 | 422)
    }
}

/// A route state that could not be built from a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    pub message: String,
    /// True when fetching a policy failed in a way that may pass: the control API was
    /// unreachable, timed out or responded 5xx. The same configuration is then worth trying
    /// again.
    pub transient: bool,
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl BuildError {
    fn invalid(message: String) -> Self {
        Self {
            message,
            transient: false,
        }
    }
}

/// A bearer token for the control API, kept in a file that another process replaces: the
/// kubelet rewrites a projected service-account token before it expires. The file is read
/// again whenever its modification time or size changes.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
    cached: Arc<Mutex<TokenState>>,
}

#[derive(Debug, Default)]
struct TokenState {
    /// Modification time and size of the file when `header` was read.
    stamp: Option<(Option<SystemTime>, u64)>,
    header: Option<HeaderValue>,
    /// The last read error, so that a failure that repeats is logged once.
    last_error: Option<String>,
}

impl TokenFile {
    /// Creates a token source for `path`; the file is read at the first request.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            cached: Arc::new(Mutex::new(TokenState::default())),
        }
    }

    /// Path of the token file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the `Authorization` header value, reading the file again when it changed. When
    /// the file cannot be read, the last good token is used (and `None` before any), and the
    /// failure is logged once until the file reads again.
    pub fn header(&self) -> Option<HeaderValue> {
        let mut state = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = std::fs::metadata(&self.path).map(|m| (m.modified().ok(), m.len()));
        let result = match stamp {
            Ok(stamp) if state.stamp == Some(stamp) && state.header.is_some() => {
                return state.header.clone();
            }
            Ok(stamp) => read_token(&self.path).map(|header| (stamp, header)),
            Err(e) => Err(format!(
                "failed to read the control API token file {}: {e}",
                self.path.display()
            )),
        };
        match result {
            Ok((stamp, header)) => {
                if state.header.is_some() {
                    tracing::info!(path = %self.path.display(), "read the rotated control API token");
                }
                state.stamp = Some(stamp);
                state.header = Some(header);
                state.last_error = None;
            }
            Err(error) => {
                if state.last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(path = %self.path.display(), error = %error, using_previous_token = state.header.is_some(), "failed to read the control API token");
                    state.last_error = Some(error);
                }
            }
        }
        state.header.clone()
    }
}

/// Reads a token file into an `Authorization: Bearer` header value.
fn read_token(path: &Path) -> Result<HeaderValue, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "failed to read the control API token file {}: {e}",
            path.display()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "the control API token file {} is empty",
            path.display()
        ));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        format!(
            "the control API token file {} contains characters that an HTTP header cannot carry",
            path.display()
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// A client of one route's control API.
#[derive(Debug, Clone)]
pub struct ControlClient {
    base: String,
    route: String,
    client: Client<HttpConnector, Full<Bytes>>,
    token: Option<TokenFile>,
}

impl ControlClient {
    /// Creates a client for `route` at the control API `base` (for example
    /// `http://127.0.0.1:8070`).
    pub fn new(base: &str, route: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            route: route.to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: None,
        }
    }

    /// Sends the token in `token` as `Authorization: Bearer` on every request.
    pub fn with_token_file(mut self, token: TokenFile) -> Self {
        self.token = Some(token);
        self
    }

    fn authorize(&self, builder: http::request::Builder) -> http::request::Builder {
        match self.token.as_ref().and_then(TokenFile::header) {
            Some(value) => builder.header(header::AUTHORIZATION, value),
            None => builder,
        }
    }

    /// Posts `batch` to `/v1/events` and checks that the control API stored it.
    pub async fn post_events(
        &self,
        batch: &EventBatch,
        timeout: Duration,
    ) -> Result<(), DeliveryError> {
        let url = format!("{}/v1/events", self.base);
        let body = serde_json::to_vec(batch).map_err(|e| DeliveryError::retry(e.to_string()))?;
        let request = self
            .authorize(Request::builder().method(Method::POST).uri(&url))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| DeliveryError::retry(format!("invalid URL {url}: {e}")))?;
        let response = tokio::time::timeout(timeout, self.client.request(request))
            .await
            .map_err(|_| {
                DeliveryError::retry(format!(
                    "POST {url} timed out after {} s",
                    timeout.as_secs()
                ))
            })?
            .map_err(|e| {
                DeliveryError::retry(format!(
                    "POST {url} failed: {}",
                    crate::proxy::error_chain(&e)
                ))
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = tokio::time::timeout(
            timeout,
            Limited::new(response.into_body(), 64 * 1024).collect(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
        Err(DeliveryError {
            message: format!(
                "POST {url} responded {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            ),
            rejected: DeliveryError::is_rejection(status),
        })
    }

    /// Base URL of the control API.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Returns the HTTP client, shared with the event sender.
    pub fn http_client(&self) -> Client<HttpConnector, Full<Bytes>> {
        self.client.clone()
    }

    async fn get(
        &self,
        url: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), String> {
        let request = self
            .authorize(Request::builder().method(Method::GET).uri(url))
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("invalid URL {url}: {e}"))?;
        let response = tokio::time::timeout(timeout, self.client.request(request))
            .await
            .map_err(|_| format!("GET {url} timed out after {} s", timeout.as_secs()))?
            .map_err(|e| format!("GET {url} failed: {}", crate::proxy::error_chain(&e)))?;
        let status = response.status();
        let body =
            tokio::time::timeout(timeout, Limited::new(response.into_body(), limit).collect())
                .await
                .map_err(|_| format!("reading the response of GET {url} timed out"))?
                .map_err(|e| format!("failed to read the response of GET {url}: {e}"))?
                .to_bytes();
        Ok((status, body))
    }

    /// Fetches the configuration when its version is above `known`, waiting up to `wait`
    /// seconds for a change; `None` when nothing changed.
    pub async fn fetch_config(
        &self,
        known: u64,
        wait_seconds: u64,
    ) -> Result<Option<SidecarConfig>, String> {
        let url = format!(
            "{}/v1/routes/{}/config?version={known}&waitSeconds={wait_seconds}",
            self.base, self.route
        );
        let timeout = Duration::from_secs(wait_seconds + 15);
        let (status, body) = self.get(&url, timeout, MAX_CONFIG_BYTES).await?;
        match status {
            StatusCode::OK => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| format!("invalid configuration from {url}: {e}")),
            StatusCode::NOT_MODIFIED => Ok(None),
            _ => Err(format!(
                "GET {url} responded {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            )),
        }
    }

    /// Fetches a policy artifact and checks its digest.
    pub async fn fetch_policy(&self, sha256: &str) -> Result<Vec<u8>, BuildError> {
        let url = format!("{}/v1/policies/{sha256}", self.base);
        let (status, body) = self
            .get(&url, Duration::from_secs(60), MAX_POLICY_BYTES)
            .await
            .map_err(|message| BuildError {
                message,
                transient: true,
            })?;
        if status != StatusCode::OK {
            return Err(BuildError {
                message: format!("GET {url} responded {status}"),
                transient: status.is_server_error(),
            });
        }
        let actual = hex_digest(&body);
        if actual != sha256 {
            return Err(BuildError::invalid(format!(
                "policy from {url} has sha256 {actual}; the artifact is corrupt"
            )));
        }
        Ok(body.to_vec())
    }

    /// Builds the route state for `config`, fetching the policies that `previous` does not
    /// already have.
    pub async fn build_state(
        &self,
        config: SidecarConfig,
        previous: Option<&RouteState>,
        environment: Option<&Environment>,
        encoder_digest: &str,
    ) -> Result<RouteState, BuildError> {
        let mut artifacts = std::collections::HashMap::new();
        for reference in config.stable.iter().chain(config.canary.iter()) {
            let loaded = previous.is_some_and(|state| {
                [&state.stable, &state.canary]
                    .into_iter()
                    .flatten()
                    .any(|p| p.sha256 == reference.sha256)
            });
            if !loaded {
                let bytes = self.fetch_policy(&reference.sha256).await?;
                artifacts.insert(reference.sha256.clone(), bytes);
            }
        }
        RouteState::build(
            config,
            &|sha256| artifacts.get(sha256).cloned(),
            environment,
            encoder_digest,
            previous,
        )
        .map_err(|e| BuildError::invalid(e.to_string()))
    }

    /// Waits for the first usable configuration, retrying with backoff; `None` when
    /// `shutdown` completes first.
    pub async fn first_state(
        &self,
        environment: Option<&Environment>,
        encoder_digest: &str,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Option<RouteState> {
        tokio::pin!(shutdown);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let attempt = async {
                let config = self
                    .fetch_config(0, 0)
                    .await?
                    .ok_or_else(|| "the control API has no configuration yet".to_string())?;
                self.build_state(config, None, environment, encoder_digest)
                    .await
                    .map_err(|e| e.message)
            };
            tokio::select! {
                result = attempt => match result {
                    Ok(state) => return Some(state),
                    Err(error) => {
                        tracing::warn!(route = %self.route, control = %self.base, error = %error, retry_in_ms = backoff.as_millis() as u64, "failed to get the first route configuration; retrying");
                    }
                },
                () = &mut shutdown => return None,
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = &mut shutdown => return None,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Long-polls the control API and swaps the sidecar's route state on every new usable
/// configuration, until `shutdown` completes. Failures are logged and retried with backoff;
/// the current state keeps serving meanwhile.
pub async fn follow(
    sidecar: Arc<Sidecar>,
    client: ControlClient,
    environment: Option<Environment>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = FIRST_BACKOFF;
    // The newest version seen, also when it was rejected as invalid. A broken version is then
    // not fetched again in a loop, and the next version replaces it. A version whose policy
    // fetch failed transiently stays unknown, so that it is fetched again after the backoff.
    let mut known = sidecar.state().config.version;
    loop {
        let poll = client.fetch_config(known, LONG_POLL_SECONDS);
        let result = tokio::select! {
            result = poll => result,
            () = &mut shutdown => return,
        };
        let failed = match result {
            Ok(None) => false,
            Ok(Some(config)) => {
                let version = config.version;
                let current = sidecar.state();
                match client
                    .build_state(
                        config,
                        Some(&current),
                        environment.as_ref(),
                        sidecar.encoder_digest(),
                    )
                    .await
                {
                    Ok(state) => {
                        known = known.max(version);
                        sidecar.replace_state(state);
                        false
                    }
                    Err(error) if error.transient => {
                        tracing::warn!(route = %current.config.route, config_version = version, error = %error, retry_in_ms = backoff.as_millis() as u64, "failed to fetch a policy of a route configuration; the current configuration keeps serving");
                        true
                    }
                    Err(error) => {
                        known = known.max(version);
                        tracing::error!(route = %current.config.route, config_version = version, serving_version = current.config.version, error = %error, "rejected a route configuration; the previous one keeps serving");
                        false
                    }
                }
            }
            Err(error) => {
                tracing::warn!(control = %client.base, error = %error, retry_in_ms = backoff.as_millis() as u64, "failed to poll the control API; the current configuration keeps serving");
                true
            }
        };
        if failed {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = &mut shutdown => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = FIRST_BACKOFF;
        }
    }
}
