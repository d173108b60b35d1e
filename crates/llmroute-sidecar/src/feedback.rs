//! Completed requests waiting for quality feedback: a bounded buffer with a time to live.
//!
//! Each finished request waits here until the application posts feedback for its decision id
//! or the TTL passes. It then leaves as a completed event, with quality or without.
//! When the buffer is full, the oldest waiting event leaves without quality.
//!
//! A streamed response sends its decision id in the headers, before it finishes. Its decision
//! is registered when the headers go out, so that feedback posted during the stream is kept
//! and joined with the event when the stream ends.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llmroute_api::CompletedEvent;

/// The bounded TTL buffer of events waiting for feedback.
#[derive(Debug)]
pub struct FeedbackBuffer {
    inner: Mutex<Inner>,
    ttl: Duration,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// Boxed, because an event is 280 bytes besides its heap data and the table has 8/7 to
    /// 16/7 slots per entry: unboxed, the empty slots would cost up to 360 bytes per event.
    waiting: HashMap<String, (Instant, Box<CompletedEvent>)>,
    /// Insertion order; entries whose id already left `waiting` are skipped.
    order: VecDeque<(Instant, String)>,
    /// Decisions whose response is still streaming, with the score posted so far. The
    /// streaming task always ends with [`FeedbackBuffer::insert`], which removes the entry.
    streaming: HashMap<String, Option<f64>>,
}

/// Result of posting feedback for a decision.
#[derive(Debug)]
pub enum Joined {
    /// The decision's event had finished; it now carries the score and leaves the buffer.
    Event(Box<CompletedEvent>),
    /// The decision's response is still streaming; the score joins its event at the end.
    Held,
    /// No decision with this id waits for feedback: it is unknown, its time to live passed,
    /// or it already has feedback.
    NotWaiting,
}

/// Events that [`FeedbackBuffer::insert`] releases at once.
#[derive(Debug, Default)]
pub struct Released {
    /// The inserted event itself, when feedback for it arrived while it was streaming.
    pub joined: Option<CompletedEvent>,
    /// Events pushed out without feedback because the buffer was full.
    pub evicted: Vec<CompletedEvent>,
}

impl FeedbackBuffer {
    /// Creates a buffer holding at most `capacity` events (at least 1) for `ttl` each.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The maps stay consistent across a panic of another holder: every method updates
        // them with single insert and remove calls.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a decision whose response has started streaming, so that feedback posted
    /// before the response finishes is kept until [`FeedbackBuffer::insert`].
    pub fn start_streaming(&self, decision_id: &str) {
        self.lock().streaming.insert(decision_id.to_string(), None);
    }

    /// Adds a finished request, keyed by its decision id. When feedback for it arrived while
    /// it was streaming, the event leaves at once with its quality. Otherwise it waits, and
    /// the events pushed out because the buffer was full are returned.
    pub fn insert(&self, mut event: CompletedEvent, now: Instant) -> Released {
        let mut inner = self.lock();
        let held = inner
            .streaming
            .remove(&event.decision.decision_id)
            .flatten();
        if held.is_some() {
            event.quality = held;
            return Released {
                joined: Some(event),
                evicted: Vec::new(),
            };
        }
        let mut evicted = Vec::new();
        while inner.waiting.len() >= self.capacity {
            let Some((_, id)) = inner.order.pop_front() else {
                break;
            };
            if let Some((_, old)) = inner.waiting.remove(&id) {
                evicted.push(*old);
            }
        }
        let id = event.decision.decision_id.clone();
        inner.order.push_back((now, id.clone()));
        inner.waiting.insert(id, (now, Box::new(event)));
        Released {
            joined: None,
            evicted,
        }
    }

    /// Joins `score` with the event of `decision_id`, or keeps it until the decision's stream
    /// ends.
    pub fn feedback(&self, decision_id: &str, score: f64) -> Joined {
        let mut inner = self.lock();
        if let Some((_, mut event)) = inner.waiting.remove(decision_id) {
            event.quality = Some(score);
            return Joined::Event(event);
        }
        match inner.streaming.get_mut(decision_id) {
            Some(held @ None) => {
                *held = Some(score);
                Joined::Held
            }
            Some(Some(_)) | None => Joined::NotWaiting,
        }
    }

    /// Removes and returns the events older than the TTL.
    pub fn expire(&self, now: Instant) -> Vec<CompletedEvent> {
        let mut inner = self.lock();
        let mut expired = Vec::new();
        while let Some((inserted, _)) = inner.order.front() {
            if now.duration_since(*inserted) < self.ttl {
                break;
            }
            let (inserted, id) = inner.order.pop_front().expect("front exists");
            if inner
                .waiting
                .get(&id)
                .is_some_and(|(at, _)| *at == inserted)
            {
                let (_, event) = inner.waiting.remove(&id).expect("entry exists");
                expired.push(*event);
            }
        }
        expired
    }

    /// Removes and returns every waiting event, for shutdown.
    pub fn drain(&self) -> Vec<CompletedEvent> {
        let mut inner = self.lock();
        inner.order.clear();
        inner
            .waiting
            .drain()
            .map(|(_, (_, event))| *event)
            .collect()
    }

    /// Number of waiting events.
    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Tests whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use llmroute_api::{DecisionRecord, Outcome, Preference};

    use super::*;

    fn event(id: &str) -> CompletedEvent {
        CompletedEvent {
            decision: DecisionRecord {
                decision_id: id.to_string(),
                route: "r".into(),
                config_version: 1,
                model: "m".into(),
                routed: true,
                preference: Preference::from_quality(0.5).unwrap(),
                policy_version: Some("v1".into()),
                propensity: Some(1.0),
            },
            served_model: "m".into(),
            embedding: vec![],
            quality: None,
            cost_usd: None,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: 1.0,
            outcome: Outcome::Success,
            attempts: 1,
            timestamp_ms: 0,
        }
    }

    #[test]
    fn feedback_joins_once() {
        let buffer = FeedbackBuffer::new(Duration::from_secs(60), 10);
        let now = Instant::now();
        assert!(buffer.insert(event("a"), now).evicted.is_empty());
        let Joined::Event(joined) = buffer.feedback("a", 0.7) else {
            panic!("event a is not waiting");
        };
        assert_eq!(joined.quality, Some(0.7));
        assert!(matches!(buffer.feedback("a", 0.7), Joined::NotWaiting));
        assert!(matches!(buffer.feedback("b", 0.7), Joined::NotWaiting));
    }

    #[test]
    fn expire_releases_old_events() {
        let buffer = FeedbackBuffer::new(Duration::from_secs(10), 10);
        let start = Instant::now();
        buffer.insert(event("a"), start);
        buffer.insert(event("b"), start + Duration::from_secs(5));
        buffer.feedback("a", 1.0);
        assert!(buffer.expire(start + Duration::from_secs(9)).is_empty());
        let expired = buffer.expire(start + Duration::from_secs(15));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].decision.decision_id, "b");
        assert_eq!(expired[0].quality, None);
        assert!(buffer.is_empty());
    }

    #[test]
    fn full_buffer_evicts_oldest() {
        let buffer = FeedbackBuffer::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        buffer.insert(event("a"), now);
        buffer.insert(event("b"), now);
        let evicted = buffer.insert(event("c"), now).evicted;
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].decision.decision_id, "a");
        assert_eq!(buffer.len(), 2);
        assert!(matches!(buffer.feedback("c", 0.1), Joined::Event(_)));
    }

    #[test]
    fn feedback_during_stream_joins_at_end() {
        let buffer = FeedbackBuffer::new(Duration::from_secs(60), 10);
        let now = Instant::now();
        buffer.start_streaming("a");
        buffer.start_streaming("b");
        assert!(matches!(buffer.feedback("a", 0.4), Joined::Held));
        assert!(
            matches!(buffer.feedback("a", 0.9), Joined::NotWaiting),
            "a second score for the same decision is rejected"
        );

        let released = buffer.insert(event("a"), now);
        let joined = released.joined.expect("a leaves with its score");
        assert_eq!(joined.quality, Some(0.4));
        assert!(buffer.is_empty(), "a does not wait for feedback again");

        // Without feedback during the stream, the event waits as a non-streamed one does.
        assert!(buffer.insert(event("b"), now).joined.is_none());
        assert_eq!(buffer.len(), 1);
        assert!(matches!(buffer.feedback("b", 0.6), Joined::Event(_)));
    }
}
