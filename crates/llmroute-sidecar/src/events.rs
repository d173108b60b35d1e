//! Completed events on their way to the control plane: a bounded queue whose `submit` uses
//! `try_send`, so it never waits, and a task that sends the events in batches with retries.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use llmroute_api::{CompletedEvent, EventBatch};
use tokio::sync::{mpsc, oneshot};

use crate::control::DeliveryError;
use crate::metrics::Metrics;

/// Destination of completed events.
#[derive(Debug, Clone)]
pub enum EventSink {
    /// Counted as dropped, for a sidecar without a control plane or event file.
    Discard,
    /// Appended to a JSON Lines file, one event per line.
    File(PathBuf),
    /// Posted as an [`EventBatch`] to `<url>/v1/events`.
    Http {
        url: String,
        client: Client<HttpConnector, Full<Bytes>>,
    },
    /// Posted through the control client, with its bearer token when it has one.
    Control(crate::control::ControlClient),
}

/// Batching and retry settings of the sender task.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Maximum events per batch.
    pub max_events: usize,
    /// Maximum time an event waits for its batch to fill.
    pub interval: Duration,
    /// Attempts per batch before it is dropped.
    pub attempts: u32,
    /// Delay before the first retry; it doubles with every retry.
    pub first_backoff: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_events: 256,
            interval: Duration::from_secs(1),
            attempts: 5,
            first_backoff: Duration::from_millis(250),
        }
    }
}

/// The sending end of the event queue.
#[derive(Debug, Clone)]
pub struct EventQueue {
    sender: mpsc::Sender<CompletedEvent>,
    route: String,
    metrics: Arc<Metrics>,
}

impl EventQueue {
    /// Queues `event` without waiting; a full or closed queue drops it and counts the drop.
    pub fn submit(&self, event: CompletedEvent) {
        if let Err(error) = self.sender.try_send(event) {
            let reason = match error {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "queue_closed",
            };
            Metrics::count(&self.metrics.events_dropped, &self.route, reason);
            tracing::debug!(route = %self.route, reason, "dropped a completed event");
        }
    }
}

/// Handle of the running sender task.
#[derive(Debug)]
pub struct EventSender {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl EventSender {
    /// Sends what is queued, then stops the task.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if let Err(error) = self.task.await {
            tracing::error!(error = %error, "the event sender task failed");
        }
    }
}

/// Starts the queue of `capacity` events and its sender task.
pub fn start(
    route: &str,
    sidecar: &str,
    capacity: usize,
    sink: EventSink,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
) -> (EventQueue, EventSender) {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    let (stop, stopped) = oneshot::channel();
    let worker = Worker {
        route: route.to_string(),
        sidecar: sidecar.to_string(),
        sink,
        settings,
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(worker.run(receiver, stopped));
    let queue = EventQueue {
        sender,
        route: route.to_string(),
        metrics,
    };
    (queue, EventSender { stop, task })
}

struct Worker {
    route: String,
    sidecar: String,
    sink: EventSink,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
}

impl Worker {
    async fn run(
        self,
        mut receiver: mpsc::Receiver<CompletedEvent>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let mut batch = Vec::new();
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = receiver.recv() => match received {
                    Some(event) => {
                        batch.push(event);
                        if batch.len() >= self.settings.max_events {
                            self.send(std::mem::take(&mut batch)).await;
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    if !batch.is_empty() {
                        self.send(std::mem::take(&mut batch)).await;
                    }
                }
                _ = &mut stopped => break,
            }
        }
        while let Ok(event) = receiver.try_recv() {
            batch.push(event);
        }
        for chunk in batch.chunks(self.settings.max_events.max(1)) {
            self.send(chunk.to_vec()).await;
        }
        tracing::info!(route = %self.route, "event sender stopped");
    }

    async fn send(&self, events: Vec<CompletedEvent>) {
        let count = events.len() as u64;
        if matches!(self.sink, EventSink::Discard) {
            self.count_dropped("no_sink", count);
            return;
        }
        let batch = EventBatch {
            route: self.route.clone(),
            sidecar: self.sidecar.clone(),
            events,
        };
        let mut backoff = self.settings.first_backoff;
        for attempt in 1..=self.settings.attempts.max(1) {
            match self.deliver(&batch).await {
                Ok(()) => {
                    self.metrics.events_sent.inc_by(count);
                    return;
                }
                Err(error) if error.rejected => {
                    tracing::error!(route = %self.route, events = count, error = %error, "the control plane rejected the batch; dropping it without a retry");
                    self.count_dropped("rejected", count);
                    return;
                }
                Err(error) if attempt < self.settings.attempts => {
                    tracing::warn!(route = %self.route, events = count, attempt, error = %error, retry_in_ms = backoff.as_millis() as u64, "failed to send events; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(error) => {
                    tracing::error!(route = %self.route, events = count, attempts = attempt, error = %error, "failed to send events; dropping the batch");
                }
            }
        }
        self.count_dropped("sink_failed", count);
    }

    fn count_dropped(&self, reason: &str, count: u64) {
        self.metrics
            .events_dropped
            .get_or_create(&crate::metrics::ReasonLabels {
                route: self.route.clone(),
                reason: reason.to_string(),
            })
            .inc_by(count);
    }

    async fn deliver(&self, batch: &EventBatch) -> Result<(), DeliveryError> {
        match &self.sink {
            EventSink::Discard => unreachable!("send() drops batches for the discard sink"),
            EventSink::File(path) => {
                let mut lines = String::new();
                for event in &batch.events {
                    let line = serde_json::to_string(event)
                        .map_err(|e| DeliveryError::retry(e.to_string()))?;
                    lines.push_str(&line);
                    lines.push('\n');
                }
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .and_then(|mut file| file.write_all(lines.as_bytes()))
                        .map_err(|e| format!("failed to append to {}: {e}", path.display()))
                })
                .await
                .map_err(|e| DeliveryError::retry(e.to_string()))?
                .map_err(DeliveryError::retry)
            }
            EventSink::Control(client) => client.post_events(batch, Duration::from_secs(10)).await,
            EventSink::Http { url, client } => {
                let body =
                    serde_json::to_vec(batch).map_err(|e| DeliveryError::retry(e.to_string()))?;
                let request = Request::builder()
                    .method(Method::POST)
                    .uri(format!("{url}/v1/events"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| DeliveryError::retry(e.to_string()))?;
                let response =
                    tokio::time::timeout(Duration::from_secs(10), client.request(request))
                        .await
                        .map_err(|_| DeliveryError::retry("timed out after 10 s".to_string()))?
                        .map_err(|e| DeliveryError::retry(crate::proxy::error_chain(&e)))?;
                let status = response.status();
                if status.is_success() {
                    return Ok(());
                }
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Err(DeliveryError {
                    message: format!(
                        "the control plane responded {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(500)])
                    ),
                    rejected: DeliveryError::is_rejection(status),
                })
            }
        }
    }
}
