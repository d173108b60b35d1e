//! Authentication of control API callers: the `Authorization: Bearer` token of a request
//! becomes an [`Identity`] or a typed [`AuthError`].
//!
//! Two authenticators live here: [`StaticTokenAuthenticator`] (one shared token from a file,
//! for `llmroute standalone`) and [`CachedAuthenticator`], which wraps a slow one (the
//! operator's TokenReview) so that a burst of requests with the same token costs one review.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// The boxed future that [`Authenticator::authenticate`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, AuthError>> + Send + 'a>>;

/// Turns a bearer token into the caller's identity.
pub trait Authenticator: Send + Sync + 'static {
    /// Checks `token` and returns who presented it. Returns [`AuthError::Unavailable`] when
    /// the check itself could not run, so that the server responds 503 instead of 401.
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Namespace the caller may write routes of; `None` allows every route (the static token
    /// of `llmroute standalone`).
    pub namespace: Option<String>,
    /// Caller name for logs: the service account, with the pod name when the token carries
    /// one (`default/pod-1` style), or `token-file`.
    pub name: String,
}

impl Identity {
    /// Tests whether this caller may send events for the route with key `route`.
    /// Route keys under the operator are `<namespace>/<name>`.
    pub fn may_access_route(&self, route: &str) -> bool {
        match &self.namespace {
            None => true,
            Some(namespace) => route
                .strip_prefix(namespace.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|name| !name.is_empty() && !name.contains('/')),
        }
    }
}

/// The reason a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing Authorization header; send `Authorization: Bearer <token>` (the sidecar reads the token from LLMROUTE_CONTROL_TOKEN_FILE or --control-token-file)"
    )]
    Missing,
    #[error("invalid Authorization header: {0}; expected `Bearer <token>`")]
    Malformed(String),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token is not valid for audience {expected:?} (token audiences: {actual:?})")]
    WrongAudience {
        expected: String,
        actual: Vec<String>,
    },
    #[error("failed to check the token: {0}; retry later")]
    Unavailable(String),
}

impl AuthError {
    /// Short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed(_) => "malformed_header",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::WrongAudience { .. } => "wrong_audience",
            AuthError::Unavailable(_) => "auth_unavailable",
        }
    }
}

/// Extracts the token from an `Authorization: Bearer <token>` header value. The scheme is
/// case-insensitive, as RFC 9110 section 11.1 specifies for authentication schemes.
pub fn bearer_token(header: Option<&HeaderValue>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let text = header
        .to_str()
        .map_err(|_| AuthError::Malformed("the value is not visible ASCII".to_string()))?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or_else(|| AuthError::Malformed("no space after the scheme".to_string()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed(format!("scheme {scheme:?}")));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed("the token is empty".to_string()));
    }
    Ok(token)
}

/// Minimum length of a static token, in bytes.
pub const MIN_STATIC_TOKEN_BYTES: usize = 16;

/// One shared token, compared in constant time.
pub struct StaticTokenAuthenticator {
    digest: [u8; 32],
}

impl std::fmt::Debug for StaticTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokenAuthenticator")
            .finish_non_exhaustive()
    }
}

impl StaticTokenAuthenticator {
    /// Reads the token from `path`; surrounding whitespace (a trailing newline) is ignored.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("failed to read the token file {}: {e}", path.display()))?;
        Self::new(text.trim()).map_err(|e| format!("invalid token file {}: {e}", path.display()))
    }

    /// Accepts exactly `token`, which must have at least [`MIN_STATIC_TOKEN_BYTES`] bytes.
    pub fn new(token: &str) -> Result<Self, String> {
        if token.len() < MIN_STATIC_TOKEN_BYTES {
            return Err(format!(
                "the token has {} bytes; use at least {MIN_STATIC_TOKEN_BYTES}, for example the output of `openssl rand -hex 32`",
                token.len()
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(
                "the token contains whitespace or control characters, which an Authorization header cannot carry".to_string(),
            );
        }
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }
}

/// Compares two digests without an early exit, so the time taken does not depend on where
/// they differ. Comparing digests instead of the tokens also hides the token's length.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

impl Authenticator for StaticTokenAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let result = if digests_equal(&presented, &self.digest) {
            Ok(Identity {
                namespace: None,
                name: "token-file".to_string(),
            })
        } else {
            Err(AuthError::Invalid(
                "the token does not match the server's --token-file".to_string(),
            ))
        };
        Box::pin(std::future::ready(result))
    }
}

/// How long [`CachedAuthenticator`] keeps results, and how many.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Lifetime of an accepted token's identity.
    pub accepted_ttl: Duration,
    /// Lifetime of a rejection, so that a sender of a bad token does not cause one review per
    /// request either.
    pub rejected_ttl: Duration,
    /// Maximum number of cached tokens.
    pub capacity: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            accepted_ttl: Duration::from_secs(30),
            rejected_ttl: Duration::from_secs(5),
            capacity: 4096,
        }
    }
}

type CachedResult = (Instant, Result<Identity, AuthError>);

/// A bounded cache in front of another authenticator, keyed by the sha256 of the token so
/// that tokens are not kept in memory. Concurrent requests with the same token wait for one
/// check. [`AuthError::Unavailable`] is never cached.
pub struct CachedAuthenticator<A> {
    inner: A,
    settings: CacheSettings,
    entries: Mutex<HashMap<[u8; 32], Arc<OnceCell<CachedResult>>>>,
}

impl<A> std::fmt::Debug for CachedAuthenticator<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedAuthenticator")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<A: Authenticator> CachedAuthenticator<A> {
    pub fn new(inner: A, settings: CacheSettings) -> Self {
        Self {
            inner,
            settings,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Number of cached tokens, including checks in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Tests whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<OnceCell<CachedResult>>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the cell for `key`: the cached one while it is fresh or in flight, else a new
    /// one. Makes room first when the cache is full.
    fn cell(&self, key: [u8; 32], now: Instant) -> Arc<OnceCell<CachedResult>> {
        let mut entries = self.lock();
        if let Some(cell) = entries.get(&key) {
            match cell.get() {
                Some((expires, _)) if *expires <= now => {}
                _ => return cell.clone(),
            }
        }
        if entries.len() >= self.settings.capacity.max(1) && !entries.contains_key(&key) {
            entries.retain(|_, cell| cell.get().is_none_or(|(expires, _)| *expires > now));
            if entries.len() >= self.settings.capacity.max(1) {
                // Still full of fresh results: drop the one that expires first.
                let oldest = entries
                    .iter()
                    .filter_map(|(key, cell)| cell.get().map(|(expires, _)| (*expires, *key)))
                    .min();
                if let Some((_, oldest)) = oldest {
                    entries.remove(&oldest);
                }
            }
        }
        let cell = Arc::new(OnceCell::new());
        entries.insert(key, cell.clone());
        cell
    }
}

impl<A: Authenticator> Authenticator for CachedAuthenticator<A> {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let cell = self.cell(key, Instant::now());
            let (_, result) = cell
                .get_or_init(|| async {
                    let result = self.inner.authenticate(token).await;
                    let ttl = match &result {
                        Ok(_) => self.settings.accepted_ttl,
                        Err(_) => self.settings.rejected_ttl,
                    };
                    (Instant::now() + ttl, result)
                })
                .await;
            if matches!(result, Err(AuthError::Unavailable(_))) {
                let mut entries = self.lock();
                if entries.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    entries.remove(&key);
                }
            }
            result.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn bearer_token_parses_header() {
        let value = HeaderValue::from_static("Bearer abc.def");
        assert_eq!(bearer_token(Some(&value)), Ok("abc.def"));
        let lower = HeaderValue::from_static("bearer abc");
        assert_eq!(bearer_token(Some(&lower)), Ok("abc"));
        assert_eq!(bearer_token(None), Err(AuthError::Missing));
        let basic = HeaderValue::from_static("Basic dXNlcjpwYXNz");
        assert!(matches!(
            bearer_token(Some(&basic)),
            Err(AuthError::Malformed(m)) if m.contains("\"Basic\"")
        ));
        let empty = HeaderValue::from_static("Bearer  ");
        assert!(matches!(
            bearer_token(Some(&empty)),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn identity_namespace_limits_routes() {
        let caller = Identity {
            namespace: Some("team-a".into()),
            name: "team-a/default".into(),
        };
        assert!(caller.may_access_route("team-a/chat"));
        assert!(!caller.may_access_route("team-b/chat"));
        assert!(!caller.may_access_route("team-a"));
        assert!(!caller.may_access_route("team-a/"));
        assert!(!caller.may_access_route("team-ab/chat"));
        assert!(!caller.may_access_route("chat"));
        let any = Identity {
            namespace: None,
            name: "token-file".into(),
        };
        assert!(any.may_access_route("chat"));
    }

    #[tokio::test]
    async fn static_token_matches_exactly() {
        let auth = StaticTokenAuthenticator::new("0123456789abcdef0123").unwrap();
        assert!(auth.authenticate("0123456789abcdef0123").await.is_ok());
        assert!(matches!(
            auth.authenticate("0123456789abcdef012").await,
            Err(AuthError::Invalid(_))
        ));
        assert!(
            StaticTokenAuthenticator::new("short")
                .unwrap_err()
                .contains("5 bytes")
        );
        assert!(StaticTokenAuthenticator::new("0123456789 abcdef0123").is_err());
    }

    /// Counts calls and accepts tokens starting with `good`, returns `Unavailable` for
    /// `down` and rejects the rest.
    struct Counting(Arc<AtomicUsize>);

    impl Authenticator for Counting {
        fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                if token.starts_with("good") {
                    Ok(Identity {
                        namespace: Some("ns".into()),
                        name: token.to_string(),
                    })
                } else if token == "down" {
                    Err(AuthError::Unavailable("API server down".into()))
                } else {
                    Err(AuthError::Invalid("rejected".into()))
                }
            })
        }
    }

    #[tokio::test]
    async fn cache_coalesces_and_bounds() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = Arc::new(CachedAuthenticator::new(
            Counting(calls.clone()),
            CacheSettings {
                accepted_ttl: Duration::from_secs(600),
                rejected_ttl: Duration::from_secs(600),
                capacity: 3,
            },
        ));
        let burst: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.authenticate("good-1").await })
            })
            .collect();
        for task in burst {
            assert!(task.await.unwrap().is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one check for a burst");

        assert!(cache.authenticate("forged").await.is_err());
        assert!(cache.authenticate("forged").await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "rejections are cached");

        assert!(cache.authenticate("down").await.is_err());
        assert!(cache.authenticate("down").await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4, "unavailable is not cached");

        for token in ["good-2", "good-3", "good-4", "good-5"] {
            cache.authenticate(token).await.unwrap();
        }
        assert_eq!(cache.len(), 3, "the capacity bounds the cache");
    }

    #[tokio::test]
    async fn cache_expires_results() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = CachedAuthenticator::new(
            Counting(calls.clone()),
            CacheSettings {
                accepted_ttl: Duration::ZERO,
                rejected_ttl: Duration::ZERO,
                capacity: 10,
            },
        );
        cache.authenticate("good-1").await.unwrap();
        cache.authenticate("good-1").await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "an expired result is checked again"
        );
    }
}
