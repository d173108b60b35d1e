//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! the holder renews the Lease every [`LeaderElection::renew_every`]; another replica takes it
//! over only when it has seen the Lease's holder and `renewTime` unchanged for
//! `leaseDurationSeconds`, timed by its own monotonic clock. It never compares `renewTime` with
//! its own wall clock, so clocks that differ between nodes neither let a replica take a live
//! holder's Lease nor keep a dead holder's Lease from expiring. Every write carries the
//! Lease's `resourceVersion`, so of two replicas that try at once, the API server lets one win
//! and responds 409 Conflict to the other.
//!
//! The holder also writes the address of its control API into the Lease's annotation
//! [`CONTROL_ADDRESS_ANNOTATION`], so that the other replicas can forward event batches to it
//! ([`LeaderView`]).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

/// Annotation of the Lease with the `host:port` of the holder's control API.
pub const CONTROL_ADDRESS_ANNOTATION: &str = "llmroute.dev/control-address";

/// The replica that holds the Lease, as this replica saw it in its last election round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderView {
    /// No round has finished yet, the Lease is free or expired, or another replica won a race
    /// for it a moment ago.
    Unknown,
    /// This replica holds the Lease.
    Me,
    /// Another replica holds the Lease.
    Other {
        identity: String,
        /// Its control API from [`CONTROL_ADDRESS_ANNOTATION`]; `None` when it sets none.
        control_address: Option<String>,
    },
}

/// The Lease record as this replica last saw it change, and when, by the monotonic clock.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    /// Holder and `renewTime` (as written) of the record.
    record: (Option<String>, Option<String>),
    at: tokio::time::Instant,
}

impl Observed {
    /// Notes the record seen `now`, and returns whether it has stayed unchanged for at least
    /// `lease_duration`, so that its holder counts as gone.
    fn expired(
        observed: &mut Option<Self>,
        record: (Option<String>, Option<String>),
        lease_duration: Duration,
        now: tokio::time::Instant,
    ) -> bool {
        match observed {
            Some(seen) if seen.record == record => now.duration_since(seen.at) >= lease_duration,
            _ => {
                *observed = Some(Self { record, at: now });
                false
            }
        }
    }
}

/// Settings of one elector.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's identity, written into the Lease (its pod name in a cluster).
    pub identity: String,
    /// How long a Lease stays held without renewal.
    pub lease_duration: Duration,
    /// Period of renewals and of attempts to acquire.
    pub renew_every: Duration,
    /// `host:port` at which the other replicas reach this replica's control API (its pod IP
    /// in a cluster), written into the Lease while this replica leads.
    pub control_address: Option<String>,
}

impl LeaderElection {
    pub fn new(namespace: &str, lease_name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            lease_name: lease_name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            control_address: None,
        }
    }

    /// Runs the election until `shutdown` completes, publishing leadership on `leader` and the
    /// holder as each round saw it on `view`. On shutdown a leader releases the Lease, so that
    /// another replica takes over at once.
    pub async fn run(
        self,
        client: Client,
        leader: watch::Sender<bool>,
        view: watch::Sender<LeaderView>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        tokio::pin!(shutdown);
        let mut last_renewal: Option<tokio::time::Instant> = None;
        let mut observed: Option<Observed> = None;
        tracing::info!(lease = %self.lease_name, namespace = %self.namespace, identity = %self.identity, "leader election started");
        loop {
            let held = match self.try_acquire_or_renew(&api, &mut observed).await {
                Ok((held, seen)) => {
                    if let LeaderView::Other {
                        identity,
                        control_address,
                    } = &seen
                        && *view.borrow() != seen
                    {
                        tracing::info!(leader = %identity, control_address = ?control_address, "another replica leads");
                    }
                    view.send_if_modified(|current| {
                        let changed = *current != seen;
                        *current = seen;
                        changed
                    });
                    held
                }
                Err(error) => {
                    tracing::warn!(error = %error, "failed to read or write the leader Lease; retrying");
                    // Keep leading until the Lease could have expired.
                    *leader.borrow()
                        && last_renewal.is_some_and(|at| {
                            at.elapsed() < self.lease_duration.saturating_sub(self.renew_every)
                        })
                }
            };
            if held {
                last_renewal = Some(tokio::time::Instant::now());
            } else if *view.borrow() == LeaderView::Me {
                // The Lease could not be renewed in time, so this replica may have lost it.
                view.send_replace(LeaderView::Unknown);
            }
            if held != *leader.borrow() {
                if held {
                    tracing::info!(identity = %self.identity, "became the leader");
                } else {
                    tracing::warn!(identity = %self.identity, "lost the leadership");
                }
                leader.send_replace(held);
            }
            tokio::select! {
                () = tokio::time::sleep(self.renew_every) => {}
                () = &mut shutdown => break,
            }
        }
        view.send_replace(LeaderView::Unknown);
        if *leader.borrow() {
            leader.send_replace(false);
            match self.release(&api).await {
                Ok(()) => tracing::info!(identity = %self.identity, "released the leader Lease"),
                Err(error) => {
                    tracing::warn!(error = %error, "failed to release the leader Lease; another replica takes over when it expires")
                }
            }
        }
        tracing::info!("leader election stopped");
    }

    /// Takes or renews the Lease. Returns whether this replica is the holder, and the holder
    /// as this round saw it.
    async fn try_acquire_or_renew(
        &self,
        api: &Api<Lease>,
        observed: &mut Option<Observed>,
    ) -> Result<(bool, LeaderView), kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = api.get_opt(&self.lease_name).await? else {
            let mut metadata = ObjectMeta {
                name: Some(self.lease_name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            };
            self.annotate(&mut metadata);
            let lease = Lease {
                metadata,
                spec: Some(self.spec(now, now, 0)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok((true, LeaderView::Me)),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    Ok((false, LeaderView::Unknown))
                }
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(renewed)), Some(seconds)) => Observed::expired(
                observed,
                (holder.map(str::to_string), Some(renewed.to_string())),
                Duration::from_secs(u64::try_from(seconds).unwrap_or(0)),
                tokio::time::Instant::now(),
            ),
            _ => true,
        };
        if let Some(holder) = holder.filter(|_| !mine && !expired) {
            let control_address = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(CONTROL_ADDRESS_ANNOTATION))
                .filter(|address| !address.is_empty())
                .cloned();
            let view = LeaderView::Other {
                identity: holder.to_string(),
                control_address,
            };
            return Ok((false, view));
        }
        let acquired_at = if mine {
            spec.acquire_time.map(|MicroTime(t)| t).unwrap_or(now)
        } else {
            now
        };
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        lease.spec = Some(self.spec(acquired_at, now, transitions));
        self.annotate(&mut lease.metadata);
        match api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok((true, LeaderView::Me)),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok((false, LeaderView::Unknown)),
            Err(error) => Err(error),
        }
    }

    /// Writes this replica's control address into the Lease's annotations, or removes an
    /// earlier holder's address when this replica has none.
    fn annotate(&self, metadata: &mut ObjectMeta) {
        let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
        match &self.control_address {
            Some(address) => {
                annotations.insert(CONTROL_ADDRESS_ANNOTATION.to_string(), address.clone());
            }
            None => {
                annotations.remove(CONTROL_ADDRESS_ANNOTATION);
            }
        }
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Gives the Lease up: an empty holder lets the next replica take it without waiting.
    async fn release(&self, api: &Api<Lease>) -> Result<(), kube::Error> {
        let Some(mut lease) = api.get_opt(&self.lease_name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        api.replace(&self.lease_name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str, renewed: &str) -> (Option<String>, Option<String>) {
        (Some(holder.to_string()), Some(renewed.to_string()))
    }

    #[test]
    fn lease_expiry_uses_local_clock() {
        let duration = Duration::from_secs(15);
        let start = tokio::time::Instant::now();
        let mut observed = None;
        // A renewTime far behind this node's clock, as a holder on a node whose clock is
        // behind writes it: the first sight starts the count instead of expiring the Lease.
        let behind = record("operator-1", "2001-01-01T00:00:00Z");
        assert!(!Observed::expired(
            &mut observed,
            behind.clone(),
            duration,
            start
        ));
        let later = start + Duration::from_secs(14);
        assert!(!Observed::expired(
            &mut observed,
            behind.clone(),
            duration,
            later
        ));

        // The holder renews: the count starts again from the change.
        let renewed = record("operator-1", "2001-01-01T00:00:02Z");
        let at = start + Duration::from_secs(16);
        assert!(!Observed::expired(
            &mut observed,
            renewed.clone(),
            duration,
            at
        ));
        assert!(!Observed::expired(
            &mut observed,
            renewed.clone(),
            duration,
            at + Duration::from_secs(14)
        ));
        assert!(Observed::expired(
            &mut observed,
            renewed,
            duration,
            at + Duration::from_secs(15)
        ));

        // A renewTime far ahead of this node's clock still expires once it stops changing.
        let mut observed = None;
        let ahead = record("operator-2", "2999-01-01T00:00:00Z");
        assert!(!Observed::expired(
            &mut observed,
            ahead.clone(),
            duration,
            start
        ));
        assert!(Observed::expired(
            &mut observed,
            ahead,
            duration,
            start + duration
        ));
    }

    #[test]
    fn new_holder_restarts_the_count() {
        let duration = Duration::from_secs(15);
        let start = tokio::time::Instant::now();
        let mut observed = None;
        let same_time = "2026-01-01T00:00:00Z";
        assert!(!Observed::expired(
            &mut observed,
            record("operator-1", same_time),
            duration,
            start
        ));
        // Another holder with the same renewTime is a change.
        assert!(!Observed::expired(
            &mut observed,
            record("operator-2", same_time),
            duration,
            start + Duration::from_secs(20)
        ));
    }
}
