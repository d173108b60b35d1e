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
        Self {
            registry,
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

    /// The text exposition format.
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
