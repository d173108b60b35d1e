//! Copies of the leader's events in the other replicas. Only the leader stores the event
//! batches that sidecars send, so without copies a failover would leave the new leader
//! training without the old leader's events. Each follower pulls, page by page, the events
//! that the leader's store has beyond the follower's cursor (`GET /v1/replication/events`),
//! and stores them with their route, sender and reception time. The cursor is kept per
//! source store (by [`Store::id`]) in the follower's own database, in the transaction that
//! stores the page, so a restart neither skips nor repeats a page. Decision ids are unique, so
//! an event that a store already has is skipped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::server::ControlBackend;
use crate::store::ReplicatedEvent;

/// Path of the endpoint that serves pages of a store's events.
pub const REPLICATION_PATH: &str = "/v1/replication/events";
/// Events per page unless the request sets `limit`.
pub const DEFAULT_PAGE_EVENTS: usize = 256;
/// Largest `limit` a request may set. An event with a 384-dimensional embedding takes roughly
/// 5 KB of JSON (an estimate: 384 numbers of up to 12 characters), so a page stays near 5 MB.
pub const MAX_PAGE_EVENTS: usize = 1024;
/// Largest page body a puller reads.
const MAX_PAGE_BYTES: usize = 16 << 20;
/// Time allowed for one page request.
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pages one [`Puller::pull`] reads at most, so that one call ends and the caller can notice a
/// leadership change: 200 pages of 256 events.
const MAX_PAGES_PER_PULL: usize = 200;

/// One page of `GET /v1/replication/events`: the serving store's identity and its events with
/// ids above the request's `after`, in id order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationPage {
    pub store: String,
    pub events: Vec<ReplicatedEvent>,
}

/// Reads `after` (default 0) and `limit` (default [`DEFAULT_PAGE_EVENTS`], at most
/// [`MAX_PAGE_EVENTS`]) from a query string.
pub fn parse_page_query(query: &str) -> Result<(i64, usize), String> {
    let mut after = 0;
    let mut limit = DEFAULT_PAGE_EVENTS;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "after" => {
                after = value
                    .parse::<i64>()
                    .ok()
                    .filter(|after| *after >= 0)
                    .ok_or_else(|| {
                        format!("invalid after {value:?}: expected an event id, 0 or more")
                    })?;
            }
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|limit| *limit <= MAX_PAGE_EVENTS)
                    .ok_or_else(|| {
                        format!("invalid limit {value:?}: expected 0 to {MAX_PAGE_EVENTS} events")
                    })?;
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {key:?}; use after and limit"
                ));
            }
        }
    }
    Ok((after, limit))
}

/// Counts of one [`Puller::pull`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// Identity of the source store.
    pub source: String,
    /// Events read from the source.
    pub read: usize,
    /// Of those, events that this store did not have yet.
    pub stored: usize,
    /// True when the source had no more events beyond the last page read.
    pub caught_up: bool,
}

/// A failed pull. The events of the pages stored before it stay stored.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("failed to reach the leader's control API at {address}: {message}")]
    Request { address: String, message: String },
    #[error("the leader's control API at {address} responded {status}: {body}")]
    Status {
        address: String,
        status: StatusCode,
        body: String,
    },
    #[error("invalid replication page from {address}: {message}")]
    Page { address: String, message: String },
    #[error("failed to store the copied events: {0}")]
    Store(String),
}

/// Pulls events from another replica's control API into the local store.
pub struct Puller {
    client: Client<HttpConnector, Full<Bytes>>,
    token: String,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller").finish_non_exhaustive()
    }
}

impl Puller {
    /// Creates a puller that sends `token`, the replicas' shared token, as a bearer token.
    pub fn new(token: &str) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: token.to_string(),
        }
    }

    /// Copies the events that the store behind `address` (`host:port` of a control API) has
    /// beyond this store's cursor for it, page by page, until it has no more or
    /// [`MAX_PAGES_PER_PULL`] pages were read. Does nothing when `address` serves this very
    /// store.
    pub async fn pull(
        &self,
        address: &str,
        backend: Arc<dyn ControlBackend>,
    ) -> Result<PullReport, PullError> {
        // A page of no events names the source store, whose cursor this store keeps.
        let source = self.page(address, 0, 0).await?.store;
        let mut report = PullReport {
            source: source.clone(),
            read: 0,
            stored: 0,
            caught_up: true,
        };
        let local = backend.clone();
        if source == blocking(move || local.store().id()).await? {
            return Ok(report);
        }
        let lookup = backend.clone();
        let key = source.clone();
        let mut cursor = blocking(move || lookup.store().replication_cursor(&key)).await?;
        for _ in 0..MAX_PAGES_PER_PULL {
            let page = self.page(address, cursor, DEFAULT_PAGE_EVENTS).await?;
            if page.store != source {
                return Err(PullError::Page {
                    address: address.to_string(),
                    message: format!(
                        "the store changed from {source} to {} during the pull; the next pull starts over",
                        page.store
                    ),
                });
            }
            let Some(last) = page.events.last().map(|event| event.id) else {
                return Ok(report);
            };
            if page.events.iter().any(|event| event.id <= cursor) || last <= cursor {
                return Err(PullError::Page {
                    address: address.to_string(),
                    message: format!("the page has event ids at or below the requested {cursor}"),
                });
            }
            let full = page.events.len() >= DEFAULT_PAGE_EVENTS;
            report.read += page.events.len();
            let store = backend.clone();
            let key = source.clone();
            report.stored +=
                blocking(move || store.store().insert_replicated(&key, &page.events, last)).await?;
            cursor = last;
            if !full {
                return Ok(report);
            }
        }
        report.caught_up = false;
        Ok(report)
    }

    /// Requests one page of at most `limit` events with ids above `after`.
    async fn page(
        &self,
        address: &str,
        after: i64,
        limit: usize,
    ) -> Result<ReplicationPage, PullError> {
        let request_error = |message: String| PullError::Request {
            address: address.to_string(),
            message,
        };
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!(
                "http://{address}{REPLICATION_PATH}?after={after}&limit={limit}"
            ))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .map_err(|e| request_error(e.to_string()))?;
        let (status, body) = tokio::time::timeout(PAGE_TIMEOUT, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_PAGE_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        })
        .await
        .map_err(|_| request_error(format!("timed out after {} s", PAGE_TIMEOUT.as_secs())))?
        .map_err(request_error)?;
        if status != StatusCode::OK {
            return Err(PullError::Status {
                address: address.to_string(),
                status,
                body: String::from_utf8_lossy(&body).chars().take(300).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| PullError::Page {
            address: address.to_string(),
            message: e.to_string(),
        })
    }
}

/// Runs a store call on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, PullError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(PullError::Store(error.to_string())),
        Err(error) => Err(PullError::Store(format!("the store task failed: {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_query_defaults_and_bounds() {
        assert_eq!(parse_page_query(""), Ok((0, DEFAULT_PAGE_EVENTS)));
        assert_eq!(parse_page_query("after=17&limit=0"), Ok((17, 0)));
        assert_eq!(
            parse_page_query("limit=1024"),
            Ok((0, MAX_PAGE_EVENTS)),
            "the largest limit"
        );
        assert!(
            parse_page_query("limit=1025")
                .unwrap_err()
                .contains("0 to 1024")
        );
        assert!(
            parse_page_query("after=-1")
                .unwrap_err()
                .contains("0 or more")
        );
        assert!(parse_page_query("after=x").unwrap_err().contains("\"x\""));
        assert!(
            parse_page_query("route=chat")
                .unwrap_err()
                .contains("after and limit")
        );
    }
}
