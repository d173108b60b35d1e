//! The shared state of a running sidecar and the request path of the two completion
//! endpoints: parse and check, decide, forward with retries, account, and record the event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use llmroute_api::{CompletedEvent, DecisionRecord, ErrorBody, Outcome, Preference};
use llmroute_policy::encoder::Encoder;
use rand::Rng;

use crate::body::{ResponseBody, error_response};
use crate::decision::{choose, retry_order};
use crate::encoder_thread::EncoderThread;
use crate::events::{BatchSettings, EventQueue, EventSender, EventSink};
use crate::feedback::FeedbackBuffer;
use crate::limits::Limits;
use crate::metrics::{Metrics, ModelLabels, RequestLabels, TokenLabels};
use crate::request::{
    ParsedRequest, RequestError, RequestHead, body_too_large, check_head, parse_request,
};
use crate::shutdown::ShutdownSwitch;
use crate::sse::Usage;
use crate::state::{LoadedPolicy, RouteState};
use crate::tls::{UpstreamClient, UpstreamTls};

/// Request header that sets the preference, in the format of [`Preference::parse`].
pub const PREFERENCE_HEADER: &str = "x-llmroute-preference";
/// Request body field that sets the preference: a string in the header format or an object
/// `{"quality": Q, "cost": C}`. The sidecar removes it before forwarding; the header wins
/// when both are set.
pub const PREFERENCE_FIELD: &str = "llmroute_preference";
/// Response header with the decision id to post feedback for.
pub const DECISION_ID_HEADER: &str = "x-llmroute-decision-id";
/// Response header with the model that produced the response.
pub const MODEL_HEADER: &str = "x-llmroute-model";
/// Response header with the policy version that decided (absent when not routed).
pub const POLICY_VERSION_HEADER: &str = "x-llmroute-policy-version";
/// Response header with the propensity of the decision (absent when not routed).
pub const PROPENSITY_HEADER: &str = "x-llmroute-propensity";
/// Response header with the cost in USD; absent on streams, whose usage arrives last.
pub const COST_HEADER: &str = "x-llmroute-cost-usd";
/// Response header: `true` when the policy chose the model.
pub const ROUTED_HEADER: &str = "x-llmroute-routed";
/// Response header with the number of models tried.
pub const ATTEMPTS_HEADER: &str = "x-llmroute-attempts";

/// Settings of a sidecar besides its route.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    pub limits: Limits,
    /// Time a finished request waits for feedback.
    pub feedback_ttl: Duration,
    /// Maximum number of finished requests waiting for feedback. Each keeps its event with
    /// the 384-dimensional embedding: the resident size grew by 2.2 MiB per 1,000 waiting
    /// events under routed load, so the default of 12,000 takes about 26 MiB. With the
    /// default TTL of 600 s, it keeps every decision for the whole TTL up to 20 requests/s.
    pub feedback_capacity: usize,
    /// Maximum number of completed events queued for sending, about 2.2 KiB each as above.
    /// The default of 4,096 is 16 full batches. A larger queue would not carry events through
    /// a longer outage, because the sender drops a batch after its retries.
    pub event_queue_capacity: usize,
    pub batch: BatchSettings,
    /// Identity sent with event batches (for example the pod name).
    pub sidecar_id: String,
    pub sink: EventSink,
    /// Root certificates for `https://` model endpoints: the system roots (or those of
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR` when set), plus the CA certificates of an optional
    /// PEM file loaded with [`UpstreamTls::with_ca_file`].
    pub upstream_tls: UpstreamTls,
    /// Turns on `POST /shutdown`, which turns this switch on (`None`: the endpoint is off).
    pub shutdown: Option<ShutdownSwitch>,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            feedback_ttl: Duration::from_secs(600),
            feedback_capacity: 12_000,
            event_queue_capacity: 4_096,
            batch: BatchSettings::default(),
            sidecar_id: "sidecar".to_string(),
            sink: EventSink::Discard,
            upstream_tls: UpstreamTls::default(),
            shutdown: None,
        }
    }
}

/// A running sidecar: route state, encoder, upstream client, buffers and metrics.
pub struct Sidecar {
    state: RwLock<Arc<RouteState>>,
    encoder: Option<EncoderThread>,
    encoder_digest: String,
    pub(crate) client: UpstreamClient,
    pub(crate) options: SidecarOptions,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) feedback: FeedbackBuffer,
    pub(crate) events: EventQueue,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("route", &self.state().config.route)
            .finish_non_exhaustive()
    }
}

/// Reason a routed request went to the fallback model.
#[derive(Debug, Clone, Copy)]
enum FallbackReason {
    NoPolicy,
    NoEncoder,
    DecisionFailed,
    NoModelAvailable,
}

impl FallbackReason {
    fn label(self) -> &'static str {
        match self {
            FallbackReason::NoPolicy => "no_policy",
            FallbackReason::NoEncoder => "no_encoder",
            FallbackReason::DecisionFailed => "decision_failed",
            FallbackReason::NoModelAvailable => "no_model_available",
        }
    }
}

/// A decision and the models to try, in order.
struct Plan {
    record: DecisionRecord,
    order: Vec<String>,
    embedding: Vec<f32>,
}

impl Sidecar {
    /// Creates a sidecar for `state` and starts its event sender. Must run inside a Tokio
    /// runtime. `encoder` is `None` when routing is off; routed requests then go to the
    /// fallback model.
    pub fn new(
        state: RouteState,
        encoder: Option<Encoder>,
        options: SidecarOptions,
    ) -> (Arc<Self>, EventSender) {
        let metrics = Arc::new(Metrics::new());
        let (events, sender) = crate::events::start(
            &state.config.route,
            &options.sidecar_id,
            options.event_queue_capacity,
            options.sink.clone(),
            options.batch,
            metrics.clone(),
        );
        let encoder_digest = encoder
            .as_ref()
            .map(|e| e.digest().to_string())
            .unwrap_or_default();
        let encoder = encoder.and_then(|encoder| match EncoderThread::spawn(encoder) {
            Ok(thread) => Some(thread),
            Err(error) => {
                tracing::error!(%error, "failed to start the encoder thread; routed requests go to the fallback model");
                None
            }
        });
        let client = options.upstream_tls.client();
        metrics.set_availability(&state);
        let sidecar = Arc::new(Self {
            state: RwLock::new(Arc::new(state)),
            encoder,
            encoder_digest,
            client,
            feedback: FeedbackBuffer::new(options.feedback_ttl, options.feedback_capacity),
            options,
            metrics,
            events,
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        });
        (sidecar, sender)
    }

    /// Returns the current route state.
    pub fn state(&self) -> Arc<RouteState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the route state, for a new configuration or policy.
    pub fn replace_state(&self, state: RouteState) {
        tracing::info!(
            route = %state.config.route,
            config_version = state.config.version,
            stable = state.stable.as_ref().map(|p| p.version.as_str()).unwrap_or("none"),
            canary = state.canary.as_ref().map(|p| p.version.as_str()).unwrap_or("none"),
            "serving a new route configuration"
        );
        self.metrics.set_availability(&state);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
        self.ready.store(true, Ordering::Release);
    }

    /// Digest of the loaded encoder; empty when none is loaded.
    pub fn encoder_digest(&self) -> &str {
        &self.encoder_digest
    }

    /// Tests whether the sidecar has a configuration to serve.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Reports the sidecar not ready from now on, while it keeps proxying: the shutdown's
    /// drain, for an app that gets SIGTERM together with the sidecar and still calls it.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Tests whether the sidecar is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Returns the metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves `POST /v1/chat/completions` or `POST /v1/completions`.
    pub(crate) async fn complete(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let state = self.state();
        let route = state.config.route.clone();
        let (parts, body) = request.into_parts();
        let parsed = match self.read_request(&state, &parts, body).await {
            Ok(parsed) => parsed,
            Err(error) => {
                Metrics::count(&self.metrics.rejected, &route, error.reason);
                tracing::debug!(route = %route, reason = error.reason, message = %error.body.error.message, "rejected a request");
                return error_response(error.status, error.body);
            }
        };
        // The model the client names, or `None` when it requests a route.
        let requested = parsed.prompt.is_none().then(|| parsed.model.clone());
        let plan = match parsed.prompt {
            Some(prompt) => self.decide(&state, prompt, parsed.preference).await,
            None => Plan {
                record: new_record(&state, &parsed.model, false, parsed.preference, None, None),
                order: vec![parsed.model]
                    .into_iter()
                    .filter(|name| state.is_available(name))
                    .collect(),
                embedding: Vec::new(),
            },
        };
        if plan.order.is_empty() {
            let body = no_model_available(&state, requested.as_deref());
            Metrics::count(&self.metrics.rejected, &route, "model_unavailable");
            tracing::debug!(route = %route, reason = "model_unavailable", message = %body.error.message, "rejected a request");
            return error_response(StatusCode::SERVICE_UNAVAILABLE, body);
        }
        crate::proxy::forward(
            self,
            state,
            parsed.endpoint,
            plan.record,
            plan.order,
            plan.embedding,
            parsed.body,
            parsed.stream,
            parsed.strip_usage,
            started,
        )
        .await
    }

    /// Checks the head, reads the body within the limit and parses the request with
    /// [`parse_request`].
    async fn read_request(
        &self,
        state: &RouteState,
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Result<ParsedRequest, RequestError> {
        let limits = &self.options.limits;
        let head = RequestHead {
            path: parts.uri.path(),
            content_type: parts.headers.get(header::CONTENT_TYPE),
            preference: parts.headers.get(PREFERENCE_HEADER),
        };
        check_head(&head)?;
        // A declared length over the limit is rejected before reading, so that the client does
        // not have to send the body first.
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limits.max_body_bytes as u64) {
            return Err(body_too_large(limits));
        }
        let bytes = match Limited::new(body, limits.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                if error
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return Err(body_too_large(limits));
                }
                return Err(RequestError {
                    status: StatusCode::BAD_REQUEST,
                    body: ErrorBody::new(
                        "invalid_request_error",
                        format!("failed to read the request body: {error}"),
                    ),
                    reason: "body_read",
                });
            }
        };
        parse_request(&state.config, limits, &head, &bytes)
    }

    /// Picks the stable or canary policy, embeds the prompt, runs the policy and draws a model.
    /// Falls back to the route's fallback model when no policy can run.
    async fn decide(
        &self,
        state: &Arc<RouteState>,
        prompt: String,
        preference: Preference,
    ) -> Plan {
        let config = &state.config;
        let use_canary = state.canary.is_some()
            && config.canary_weight > 0.0
            && rand::rng().random::<f64>() < config.canary_weight;
        let policy = if use_canary {
            state.canary.clone()
        } else {
            state.stable.clone()
        };
        let Some(policy) = policy else {
            return self.fallback_plan(state, preference, FallbackReason::NoPolicy, None);
        };
        let Some(encoder) = self.encoder.as_ref() else {
            return self.fallback_plan(state, preference, FallbackReason::NoEncoder, None);
        };
        let decision_started = Instant::now();
        let run_policy = policy.clone();
        let outcome = encoder
            .run(move |encoder| {
                let embedding = encoder.embed(&prompt).map_err(|e| e.to_string())?;
                let probabilities = run_policy
                    .probabilities(&embedding, preference.quality as f32)
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((embedding, probabilities))
            })
            .await
            .unwrap_or_else(|| {
                Err("the decision panicked or the encoder thread stopped".to_string())
            });
        self.metrics
            .decision_seconds
            .observe(decision_started.elapsed().as_secs_f64());
        let (embedding, probabilities) = match outcome {
            Ok(result) => result,
            Err(error) => {
                return self.fallback_plan(
                    state,
                    preference,
                    FallbackReason::DecisionFailed,
                    Some((&policy, error)),
                );
            }
        };
        let available: Vec<bool> = policy
            .models
            .iter()
            .map(|model| state.is_available(model))
            .collect();
        let Some(choice) = choose(
            &probabilities,
            &available,
            config.exploration,
            &mut rand::rng(),
        ) else {
            // Every model of the policy lacks its API key. The route may list others.
            return self.fallback_plan(state, preference, FallbackReason::NoModelAvailable, None);
        };
        let order: Vec<String> = retry_order(&probabilities, choice.index)
            .into_iter()
            .filter(|&k| available[k])
            .map(|k| policy.models[k].clone())
            .collect();
        let record = new_record(
            state,
            &order[0],
            true,
            preference,
            Some(policy.version.clone()),
            Some(choice.propensity),
        );
        Plan {
            record,
            order,
            embedding,
        }
    }

    fn fallback_plan(
        &self,
        state: &RouteState,
        preference: Preference,
        reason: FallbackReason,
        failure: Option<(&Arc<LoadedPolicy>, String)>,
    ) -> Plan {
        let config = &state.config;
        // The fallback first, then the route's other models, without those lacking a key.
        let order: Vec<String> = std::iter::once(config.fallback.clone())
            .chain(
                config
                    .models
                    .iter()
                    .map(|m| m.name.clone())
                    .filter(|name| *name != config.fallback),
            )
            .filter(|name| state.is_available(name))
            .collect();
        // With no model to call, the caller rejects the request, so no fallback is counted.
        if !order.is_empty() {
            Metrics::count(&self.metrics.fallbacks, &config.route, reason.label());
            match failure {
                Some((policy, error)) => tracing::warn!(
                    route = %config.route,
                    policy_version = %policy.version,
                    fallback = %order[0],
                    error = %error,
                    "the policy failed; using the fallback model"
                ),
                None => tracing::debug!(
                    route = %config.route,
                    fallback = %order[0],
                    reason = reason.label(),
                    "no policy can run, or none of its models can be called; using the fallback model"
                ),
            }
        }
        let first = order.first().unwrap_or(&config.fallback);
        Plan {
            record: new_record(state, first, false, preference, None, None),
            order,
            embedding: Vec::new(),
        }
    }

    /// Records a finished request: metrics, then the feedback buffer.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish(
        &self,
        state: &RouteState,
        record: DecisionRecord,
        served_model: &str,
        embedding: Vec<f32>,
        usage: Option<Usage>,
        outcome: Outcome,
        attempts: u32,
        started: Instant,
    ) {
        let route = &state.config.route;
        let event = self.completed_event(
            state,
            record,
            served_model,
            embedding,
            usage,
            outcome,
            attempts,
            started,
        );
        let released = self.feedback.insert(event, Instant::now());
        for evicted in released.evicted {
            Metrics::count(&self.metrics.feedback, route, "evicted_without_feedback");
            self.events.submit(evicted);
        }
        if let Some(joined) = released.joined {
            tracing::debug!(route = %route, decision_id = %joined.decision.decision_id, "joined feedback posted during the stream");
            self.events.submit(joined);
        }
    }

    /// Records a request that the client cancelled before it received the response headers.
    /// The client never saw the decision id, so the event goes to the queue without waiting for
    /// feedback.
    pub(crate) fn cancel(
        &self,
        state: &RouteState,
        record: DecisionRecord,
        served_model: &str,
        embedding: Vec<f32>,
        attempts: u32,
        started: Instant,
    ) {
        let event = self.completed_event(
            state,
            record,
            served_model,
            embedding,
            None,
            Outcome::ClientCancelled,
            attempts,
            started,
        );
        self.events.submit(event);
    }

    /// Counts a finished request in the metrics and builds its event, without quality.
    #[allow(clippy::too_many_arguments)]
    fn completed_event(
        &self,
        state: &RouteState,
        record: DecisionRecord,
        served_model: &str,
        embedding: Vec<f32>,
        usage: Option<Usage>,
        outcome: Outcome,
        attempts: u32,
        started: Instant,
    ) -> CompletedEvent {
        let route = &state.config.route;
        let latency = started.elapsed();
        self.metrics.request_seconds.observe(latency.as_secs_f64());
        let outcome_label = match &outcome {
            Outcome::Success => "success".to_string(),
            Outcome::UpstreamStatus { status } => format!("status_{status}"),
            Outcome::Unreachable => "unreachable".to_string(),
            Outcome::StreamInterrupted => "stream_interrupted".to_string(),
            Outcome::ClientCancelled => "client_cancelled".to_string(),
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                model: served_model.to_string(),
                routed: record.routed.to_string(),
                outcome: outcome_label,
            })
            .inc();
        let cost = usage.and_then(|u| cost_of(state, served_model, u));
        if let (Some(usage), Some(cost)) = (usage, cost) {
            self.metrics
                .cost_usd
                .get_or_create(&ModelLabels {
                    route: route.clone(),
                    model: served_model.to_string(),
                })
                .inc_by(cost);
            for (kind, count) in [
                ("prompt", usage.prompt_tokens),
                ("completion", usage.completion_tokens),
            ] {
                self.metrics
                    .tokens
                    .get_or_create(&TokenLabels {
                        route: route.clone(),
                        model: served_model.to_string(),
                        kind: kind.to_string(),
                    })
                    .inc_by(count);
            }
        }
        let arrival = SystemTime::now()
            .checked_sub(latency)
            .unwrap_or(SystemTime::now());
        CompletedEvent {
            decision: record,
            served_model: served_model.to_string(),
            embedding,
            quality: None,
            cost_usd: cost,
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            completion_tokens: usage.map(|u| u.completion_tokens),
            latency_ms: latency.as_secs_f64() * 1e3,
            outcome,
            attempts,
            timestamp_ms: arrival
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

/// Cost in USD of `usage` on `model` at the route's prices.
pub(crate) fn cost_of(state: &RouteState, model: &str, usage: Usage) -> Option<f64> {
    let model = state.config.model(model)?;
    Some(
        model
            .pricing
            .cost_usd(usage.prompt_tokens, usage.completion_tokens),
    )
}

/// Returns the current Unix time in milliseconds, or 0 when the clock is before 1970.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Builds the error body of a request that no model can serve because of missing API keys.
/// It names the model the client requested (`requested`), or else every model of the route.
fn no_model_available(state: &RouteState, requested: Option<&str>) -> ErrorBody {
    let route = &state.config.route;
    let message = match requested {
        Some(model) => format!(
            "model {model:?} of route {route} cannot be called: {}",
            state
                .unavailable()
                .get(model)
                .map_or("it is not available", String::as_str)
        ),
        None => format!(
            "no model of route {route} can be called: {}",
            state
                .unavailable()
                .iter()
                .map(|(model, reason)| format!("{model}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    ErrorBody::new("api_error", crate::request::bounded_message(message))
        .with_code("model_unavailable")
}

fn new_record(
    state: &RouteState,
    model: &str,
    routed: bool,
    preference: Preference,
    policy_version: Option<String>,
    propensity: Option<f64>,
) -> DecisionRecord {
    DecisionRecord {
        decision_id: llmroute_api::new_decision_id(unix_ms(), rand::rng().random()),
        route: state.config.route.clone(),
        config_version: state.config.version,
        model: model.to_string(),
        routed,
        preference,
        policy_version,
        propensity,
    }
}

/// Adds the decision headers to a response.
pub(crate) fn decision_headers(
    headers: &mut HeaderMap,
    record: &DecisionRecord,
    served_model: &str,
    attempts: u32,
    cost: Option<f64>,
) {
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(DECISION_ID_HEADER, record.decision_id.clone());
    set(MODEL_HEADER, served_model.to_string());
    set(ROUTED_HEADER, record.routed.to_string());
    set(ATTEMPTS_HEADER, attempts.to_string());
    if let Some(version) = &record.policy_version {
        set(POLICY_VERSION_HEADER, version.clone());
    }
    if let Some(propensity) = record.propensity {
        set(PROPENSITY_HEADER, propensity.to_string());
    }
    if let Some(cost) = cost {
        set(COST_HEADER, format!("{cost:.10}"));
    }
}
