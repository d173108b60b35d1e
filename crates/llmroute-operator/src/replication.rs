//! Followers' copies of the leader's events. Only the leader stores the event batches that
//! sidecars send, so each follower pulls them from the leader's control API into its own
//! store (`llmroute_control::replication`). A follower that takes over then trains on the
//! events of the previous leader, up to its last pull.
//!
//! The replicas authenticate each other with a shared token in the Secret
//! `<lease name>-replication` of their namespace, which the first replica to start creates.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use llmroute_control::replication::Puller;
use tokio::sync::watch;

use crate::leader::LeaderView;
use crate::metrics::Metrics;
use crate::serving::ClusterBackend;

/// Key of the token in the replication Secret.
const TOKEN_KEY: &str = "token";
/// Default time between two pulls from the leader. Events that a leader stored within this
/// time before it crashed are the ones a new leader may lack.
pub const DEFAULT_PULL_INTERVAL: Duration = Duration::from_secs(2);

/// Name of the replication Secret of the replicas that elect with `lease_name`.
pub fn secret_name(lease_name: &str) -> String {
    format!("{lease_name}-replication")
}

/// A failure to read or create the replication Secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "failed to read or create the replication Secret {namespace}/{name}: {source}; the operator needs get and create on secrets in its namespace"
    )]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error(
        "the replication Secret {namespace}/{name} has no valid {TOKEN_KEY:?} key ({message}); delete the Secret and the operator makes a new one"
    )]
    Invalid {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("failed to generate a random token: {0}")]
    Random(String),
}

/// Returns the replicas' shared token from the Secret `name` in `namespace`, creating the
/// Secret with 32 random bytes (64 hex digits) when it does not exist. Two replicas that start
/// together both try to create it, and the one that loses reads the winner's token.
pub async fn ensure_token(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<String, TokenError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_error = |source| TokenError::Api {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(api_error)? {
        return read_token(&secret, namespace, name);
    }
    let mut bytes = [0u8; 32];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| TokenError::Random(format!("{e:?}")))?;
    let token = hex::encode(bytes);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "labels": {crate::names::MANAGED_BY: crate::names::MANAGED_BY_VALUE},
        },
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }))
    .expect("a Secret");
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, "created the replication Secret");
            Ok(token)
        }
        Err(kube::Error::Api(response)) if response.code == 409 => {
            let secret = api.get(name).await.map_err(api_error)?;
            read_token(&secret, namespace, name)
        }
        Err(error) => Err(api_error(error)),
    }
}

/// Reads and checks the token of the replication Secret.
fn read_token(secret: &Secret, namespace: &str, name: &str) -> Result<String, TokenError> {
    let invalid = |message: String| TokenError::Invalid {
        namespace: namespace.to_string(),
        name: name.to_string(),
        message,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(TOKEN_KEY))
        .ok_or_else(|| invalid("the key is missing".to_string()))?;
    let token = std::str::from_utf8(&bytes.0)
        .map_err(|_| invalid("the value is not UTF-8".to_string()))?
        .trim()
        .to_string();
    llmroute_control::auth::StaticTokenAuthenticator::new(&token).map_err(invalid)?;
    Ok(token)
}

/// Failed pulls from the previous leader, after this replica took over, before it stops
/// pulling from it: the previous leader's control API has closed.
const FINAL_PULL_ATTEMPTS: u32 = 3;
/// Time after taking over during which this replica keeps pulling from the previous leader.
/// A stopping leader serves for 5 s after it releases the Lease, and a batch that it accepted
/// just before may be committed after the first of these pulls.
const FINAL_PULL_WINDOW: Duration = Duration::from_secs(30);
/// Pulls in a row within one interval while the previous leader has more events.
const FINAL_PULLS_PER_TICK: usize = 20;

/// Pulls the leader's events into this replica's store every `interval` while another
/// replica leads and publishes its control address, until `stop` completes. When this replica
/// becomes the leader, it pulls from the previous leader at once and at every interval until
/// that fails [`FINAL_PULL_ATTEMPTS`] times or [`FINAL_PULL_WINDOW`] ends. A leader that stops
/// releases the Lease first and serves these pulls before its control API closes. Failures
/// are counted, logged once until a pull succeeds again, and retried at the next interval.
pub async fn follow_leader(
    backend: Arc<ClusterBackend>,
    mut view: watch::Receiver<LeaderView>,
    puller: Puller,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "event replication starting"
    );
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // The last other leader seen (identity, address), kept while this replica, leading, still
    // pulls from it.
    let mut previous: Option<(String, String)> = None;
    let mut final_failures = 0;
    // When this replica took over from `previous`.
    let mut took_over: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = view.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = &mut stop => break,
        }

        let current = view.borrow_and_update().clone();
        let (leader, address, last) = match current {
            LeaderView::Other {
                identity,
                control_address: Some(address),
            } => {
                previous = Some((identity.clone(), address.clone()));
                final_failures = 0;
                took_over = None;
                (identity, address, false)
            }
            LeaderView::Me => match &previous {
                Some((identity, address)) => {
                    let since = *took_over.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > FINAL_PULL_WINDOW {
                        previous = None;
                        continue;
                    }
                    (identity.clone(), address.clone(), true)
                }
                None => continue,
            },
            _ => continue,
        };

        // A previous leader far ahead gets several pulls in a row, each counted as it ends.
        let rounds = if last { FINAL_PULLS_PER_TICK } else { 1 };
        let mut round = 0;
        let pulled = loop {
            let pulled = tokio::select! {
                pulled = puller.pull(&address, backend.clone()) => pulled,
                () = &mut stop => return stopped(),
            };
            round += 1;
            match &pulled {
                Ok(report) if !report.caught_up && round < rounds => {
                    metrics.replicated_events.inc_by(report.stored as u64);
                }
                _ => break pulled,
            }
        };

        match pulled {
            Ok(report) => {
                metrics.replicated_events.inc_by(report.stored as u64);
                final_failures = 0;
                if failing {
                    tracing::info!(leader = %leader, address = %address, "pulling events from the leader works again");
                    failing = false;
                }
                if last && report.stored > 0 {
                    tracing::info!(previous_leader = %leader, read = report.read, stored = report.stored, "copied the previous leader's last events");
                } else if report.stored > 0 {
                    tracing::debug!(
                        leader = %leader,
                        source = %report.source,
                        read = report.read,
                        stored = report.stored,
                        caught_up = report.caught_up,
                        "copied events from the leader"
                    );
                }
            }
            Err(error) => {
                metrics.replication_failures.inc();
                if last {
                    final_failures += 1;
                    if final_failures >= FINAL_PULL_ATTEMPTS {
                        tracing::info!(previous_leader = %leader, address = %address, error = %error, attempts = final_failures, "stopped pulling from the previous leader, whose control API no longer responds");
                        previous = None;
                    }
                } else if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(leader = %leader, address = %address, error = %error, "failed to pull events from the leader; retrying every interval");
                } else {
                    tracing::debug!(leader = %leader, error = %error, "pulling events from the leader still fails");
                }
            }
        }
    }
    stopped();
}

/// Logs the end of [`follow_leader`].
fn stopped() {
    tracing::info!("event replication stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(token: Option<&str>) -> Secret {
        Secret {
            data: Some(
                token
                    .map(|token| {
                        (
                            TOKEN_KEY.to_string(),
                            k8s_openapi::ByteString(token.as_bytes().to_vec()),
                        )
                    })
                    .into_iter()
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn token_must_be_long_enough() {
        let good = "0123456789abcdef0123456789abcdef";
        let read = read_token(&secret(Some(&format!("{good}\n"))), "ns", "r").unwrap();
        assert_eq!(read, good, "the trailing newline goes");

        let short = read_token(&secret(Some("abc")), "ns", "r").unwrap_err();
        assert!(short.to_string().contains("delete the Secret"), "{short}");

        let missing = read_token(&secret(None), "ns", "r").unwrap_err();
        assert!(
            missing.to_string().contains("the key is missing"),
            "{missing}"
        );
    }
}
