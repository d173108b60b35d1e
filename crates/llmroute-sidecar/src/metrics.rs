//! Prometheus metrics of the sidecar, served at `/metrics` in the OpenMetrics text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::state::RouteState;

/// Labels of a finished request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub model: String,
    pub routed: String,
    pub outcome: String,
}

/// Labels that name a route and a model.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub route: String,
    pub model: String,
}

/// Labels that name a route and a reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub route: String,
    pub reason: String,
}

/// Labels of token counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: String,
    pub model: String,
    pub kind: String,
}

/// Every metric of one sidecar.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub retries: Family<ReasonLabels, Counter>,
    pub fallbacks: Family<ReasonLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub cost_usd: Family<ModelLabels, Counter<f64, AtomicU64>>,
    pub tokens: Family<TokenLabels, Counter>,
    pub feedback: Family<ReasonLabels, Counter>,
    pub events_dropped: Family<ReasonLabels, Counter>,
    pub events_sent: Counter,
    pub model_available: Family<ModelLabels, Gauge>,
    pub decision_seconds: Histogram,
    pub request_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmroute");
        let requests = Family::<RequestLabels, Counter>::default();
        let retries = Family::<ReasonLabels, Counter>::default();
        let fallbacks = Family::<ReasonLabels, Counter>::default();
        let rejected = Family::<ReasonLabels, Counter>::default();
        let cost_usd = Family::<ModelLabels, Counter<f64, AtomicU64>>::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let feedback = Family::<ReasonLabels, Counter>::default();
        let events_dropped = Family::<ReasonLabels, Counter>::default();
        let events_sent = Counter::default();
        let model_available = Family::<ModelLabels, Gauge>::default();
        // 100 µs to about 52 s, doubling.
        let decision_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 20));
        let request_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 20));
        registry.register(
            "requests",
            "Finished proxied requests by model, routing and outcome",
            requests.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests retried on the next model, by reason",
            retries.clone(),
        );
        registry.register(
            "fallbacks",
            "Routed requests sent to the fallback model because no policy could run, by reason",
            fallbacks.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests rejected before any upstream call, by reason",
            rejected.clone(),
        );
        registry.register(
            "cost_usd",
            "Cost of upstream calls in USD from reported usage and the route's prices",
            cost_usd.clone(),
        );
        registry.register(
            "tokens",
            "Tokens reported by upstreams, by kind (prompt or completion)",
            tokens.clone(),
        );
        registry.register("feedback", "Feedback requests by result", feedback.clone());
        registry.register(
            "events_dropped",
            "Completed events that never reached the control plane, by reason",
            events_dropped.clone(),
        );
        registry.register(
            "events_sent",
            "Completed events accepted by the event sink",
            events_sent.clone(),
        );
        registry.register(
            "model_available",
            "1 for each model of the route that can be called, 0 for one whose API key is missing",
            model_available.clone(),
        );
        registry.register(
            "decision_seconds",
            "Time to embed the prompt and run the policy",
            decision_seconds.clone(),
        );
        registry.register(
            "request_seconds",
            "Time from a request's arrival to the end of its response",
            request_seconds.clone(),
        );
        Self {
            registry,
            requests,
            retries,
            fallbacks,
            rejected,
            cost_usd,
            tokens,
            feedback,
            events_dropped,
            events_sent,
            model_available,
            decision_seconds,
            request_seconds,
        }
    }

    /// Encodes every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }

    /// Sets `model_available` to the models of `state`, dropping the models of an earlier
    /// configuration.
    pub fn set_availability(&self, state: &RouteState) {
        self.model_available.clear();
        for model in &state.config.models {
            self.model_available
                .get_or_create(&ModelLabels {
                    route: state.config.route.clone(),
                    model: model.name.clone(),
                })
                .set(i64::from(state.is_available(&model.name)));
        }
    }

    /// Counts one event of `family` for `route` and `reason`.
    pub fn count(family: &Family<ReasonLabels, Counter>, route: &str, reason: &str) {
        family
            .get_or_create(&ReasonLabels {
                route: route.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }
}
