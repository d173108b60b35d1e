//! The operator's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the reconcile counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of the injection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectionLabels {
    /// `injected`, `skipped`, `already_injected`, `not_requested` or `invalid_review`.
    pub outcome: String,
}

/// Labels of the skip counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub reason: String,
}

/// Labels of the webhook's connection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `established`, `tls_failed` or `tls_timeout`.
    pub result: String,
}

/// Metrics of one operator process.
pub struct Metrics {
    registry: Registry,
    /// Reconciles of LLMRoutes, by result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Duration of each reconcile, in seconds.
    pub reconcile_duration: Histogram,
    /// 1 while this replica holds the leader Lease, 0 otherwise.
    pub leader: Gauge,
    /// Routes whose configuration the control API serves.
    pub routes_served: Gauge,
    /// Policy artifacts the control API can serve.
    pub policies_served: Gauge,
    /// Admission reviews handled by the injection webhook, by outcome.
    pub injections: Family<InjectionLabels, Counter>,
    /// Pods not injected, by reason.
    pub injection_skips: Family<SkipLabels, Counter>,
    /// Time to handle one admission review, in seconds.
    pub webhook_duration: Histogram,
    /// TCP connections the webhook accepted, by the result of their TLS handshake. The API
    /// server reuses idle connections, so a new one means its pool had none free.
    pub webhook_connections: Family<ConnectionLabels, Counter>,
    /// Time of each TLS handshake of the webhook, in seconds.
    pub webhook_tls_handshake: Histogram,
    /// Events that this follower copied from the leader's store and did not have yet.
    pub replicated_events: Counter,
    /// Pulls from the leader's store that failed.
    pub replication_failures: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("llmroute_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of LLMRoutes, by result",
            reconciles.clone(),
        );
        // 1 ms to about 16 s.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of LLMRoute reconciles",
            reconcile_duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let routes_served = Gauge::default();
        registry.register(
            "routes_served",
            "Routes whose sidecar configuration the control API serves",
            routes_served.clone(),
        );
        let policies_served = Gauge::default();
        registry.register(
            "policies_served",
            "Policy artifacts the control API serves",
            policies_served.clone(),
        );
        let injections = Family::<InjectionLabels, Counter>::default();
        registry.register(
            "webhook_reviews",
            "Admission reviews handled by the injection webhook, by outcome",
            injections.clone(),
        );
        let injection_skips = Family::<SkipLabels, Counter>::default();
        registry.register(
            "injection_skips",
            "Pods that ask for a route but were not injected, by reason",
            injection_skips.clone(),
        );
        // 50 µs to about 1.6 s.
        let webhook_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "webhook_duration_seconds",
            "Time to handle one admission review",
            webhook_duration.clone(),
        );
        let webhook_connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "webhook_connections",
            "TCP connections the injection webhook accepted, by the result of the TLS handshake",
            webhook_connections.clone(),
        );
        // 50 µs to about 1.6 s.
        let webhook_tls_handshake = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "webhook_tls_handshake_seconds",
            "Time of the injection webhook's TLS handshakes",
            webhook_tls_handshake.clone(),
        );
        let replicated_events = Counter::default();
        registry.register(
            "replicated_events",
            "Events this follower copied from the leader's event store",
            replicated_events.clone(),
        );
        let replication_failures = Counter::default();
        registry.register(
            "replication_failures",
            "Pulls of events from the leader's event store that failed",
            replication_failures.clone(),
        );
        Self {
            registry,
            replicated_events,
            replication_failures,
            webhook_connections,
            webhook_tls_handshake,
            injections,
            injection_skips,
            webhook_duration,
            reconciles,
            reconcile_duration,
            leader,
            routes_served,
            policies_served,
        }
    }
}

impl Metrics {
    /// Counts one reconcile and its duration.
    pub fn observe_reconcile(&self, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ReconcileLabels {
                result: result.to_string(),
            })
            .inc();
        self.reconcile_duration.observe(seconds);
    }

    /// Counts one admission review and its duration.
    pub fn observe_injection(&self, outcome: &str, started: std::time::Instant) {
        self.injections
            .get_or_create(&InjectionLabels {
                outcome: outcome.to_string(),
            })
            .inc();
        self.webhook_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts one connection of the webhook by the result of its TLS handshake, and the
    /// handshake's duration when it completed.
    pub fn observe_connection(&self, result: &str, handshake: Option<std::time::Duration>) {
        self.webhook_connections
            .get_or_create(&ConnectionLabels {
                result: result.to_string(),
            })
            .inc();
        if let Some(handshake) = handshake {
            self.webhook_tls_handshake.observe(handshake.as_secs_f64());
        }
    }

    /// Counts one skipped pod.
    pub fn observe_skip(&self, reason: &str) {
        self.injection_skips
            .get_or_create(&SkipLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Encodes the metrics in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let metrics = Metrics::default();
        metrics.observe_reconcile(true, 0.01);
        metrics.observe_reconcile(false, 0.02);
        metrics.leader.set(1);
        let text = metrics.encode();
        for needle in [
            "llmroute_operator_reconciles_total{result=\"ok\"} 1",
            "llmroute_operator_reconciles_total{result=\"error\"} 1",
            "llmroute_operator_reconcile_duration_seconds_count 2",
            "llmroute_operator_leader 1",
            "llmroute_operator_routes_served 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
