//! Timeouts of one webhook connection: a client must send each request's head promptly, while
//! an idle keep-alive connection stays open until the client closes it.
//!
//! hyper's `header_read_timeout` starts its timer whenever the connection waits for a request
//! head, idle or not, so it also closes keep-alive connections that are idle for that long. The
//! API server's webhook client keeps idle connections for 90 s (Go's `http.DefaultTransport`,
//! which `k8s.io/apimachinery/pkg/util/net` applies). With a 10 s header timeout, a call after
//! a pause of 10 to 90 s found its pooled connection closed and paid a new TLS handshake. Here
//! the header timer starts at the first byte of a request instead. A separate idle timeout,
//! longer than the client's, closes only connections that the client has abandoned.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Timeouts and the connection cap of the webhook's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time from a connection's accept until its TLS handshake is complete.
    pub tls_handshake: Duration,
    /// Maximum number of connections open at once. At the cap the server stops accepting, so new connections
    /// wait in the listen backlog until one closes.
    pub max_open: usize,
    /// Time from a request's first byte until its head is complete.
    pub header_read: Duration,
    /// Time to read a request's body once its head is in.
    pub body_read: Duration,
    /// Time a connection may wait for its next request before the server closes it.
    pub idle: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            tls_handshake: Duration::from_secs(10),
            // An API server keeps at most 25 idle connections per webhook host and dials more
            // only for calls in flight: 68 at most with 64 pod creates in flight in the benchmark.
            max_open: 1024,
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(10),
            // Longer than the API server client's 90 s, so the client closes an idle
            // connection first and never sends a request on one the server is closing.
            idle: Duration::from_secs(120),
        }
    }
}

impl ConnectionLimits {
    /// Interval at which a connection checks its timeouts: a quarter of the shorter one, at
    /// most 1 s.
    pub fn check_interval(&self) -> Duration {
        (self.header_read.min(self.idle) / 4)
            .clamp(Duration::from_millis(1), Duration::from_secs(1))
    }
}

/// State of a connection between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the next request since the instant given.
    Idle(Instant),
    /// A request's first byte arrived at the instant given, and its head is not complete.
    Head(Instant),
    /// A request is being handled.
    Request,
}

/// Result of a connection's timeout check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Open,
    /// A request's head took longer than `header_read`: close the connection at once.
    HeadTimedOut,
    /// The connection waited longer than `idle` for a request: shut it down gracefully.
    IdleTimedOut,
}

/// The phase of one connection, updated by its reads and by the request handler.
#[derive(Debug)]
pub struct ConnectionClock {
    phase: Mutex<Phase>,
}

impl ConnectionClock {
    /// Creates the clock of a connection accepted at `now`, waiting for its first request.
    pub fn new(now: Instant) -> Self {
        Self {
            phase: Mutex::new(Phase::Idle(now)),
        }
    }

    fn with_phase<T>(&self, f: impl FnOnce(&mut Phase) -> T) -> T {
        f(&mut self.phase.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records bytes read at `now`: on an idle connection they start a request's head.
    pub fn on_bytes(&self, now: Instant) {
        self.with_phase(|phase| {
            if matches!(phase, Phase::Idle(_)) {
                *phase = Phase::Head(now);
            }
        });
    }

    /// Records that a request's head is complete and the handler runs.
    pub fn on_request(&self) {
        self.with_phase(|phase| *phase = Phase::Request);
    }

    /// Records that the handler returned its response at `now`.
    pub fn on_response(&self, now: Instant) {
        self.with_phase(|phase| *phase = Phase::Idle(now));
    }

    /// Checks the timeouts at `now`.
    pub fn check(&self, now: Instant, timeouts: &ConnectionLimits) -> Verdict {
        self.with_phase(|phase| match *phase {
            Phase::Head(since) if now.saturating_duration_since(since) > timeouts.header_read => {
                Verdict::HeadTimedOut
            }
            Phase::Idle(since) if now.saturating_duration_since(since) > timeouts.idle => {
                Verdict::IdleTimedOut
            }
            _ => Verdict::Open,
        })
    }
}

/// A stream that reports each read to a [`ConnectionClock`].
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    clock: std::sync::Arc<ConnectionClock>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, clock: std::sync::Arc<ConnectionClock>) -> Self {
        Self { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.on_bytes(Instant::now());
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> ConnectionLimits {
        ConnectionLimits {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn idle_connection_outlives_header_timeout() {
        let start = Instant::now();
        let clock = ConnectionClock::new(start);
        clock.on_bytes(start);
        clock.on_request();
        clock.on_response(start + Duration::from_secs(1));
        let later = start + Duration::from_secs(60);
        assert_eq!(clock.check(later, &timeouts()), Verdict::Open);
    }

    #[test]
    fn slow_head_times_out_from_first_byte() {
        let start = Instant::now();
        let clock = ConnectionClock::new(start);
        // The client sends its first byte after 50 s of idleness, then stalls.
        let first_byte = start + Duration::from_secs(50);
        clock.on_bytes(first_byte);
        // More bytes of the same head do not restart the timer.
        clock.on_bytes(first_byte + Duration::from_secs(5));
        let within = first_byte + Duration::from_secs(9);
        assert_eq!(clock.check(within, &timeouts()), Verdict::Open);
        let past = first_byte + Duration::from_secs(11);
        assert_eq!(clock.check(past, &timeouts()), Verdict::HeadTimedOut);
    }

    #[test]
    fn handled_request_never_times_out() {
        let start = Instant::now();
        let clock = ConnectionClock::new(start);
        clock.on_bytes(start);
        clock.on_request();
        let much_later = start + Duration::from_secs(600);
        assert_eq!(clock.check(much_later, &timeouts()), Verdict::Open);
    }

    #[test]
    fn abandoned_connection_times_out_idle() {
        let start = Instant::now();
        let clock = ConnectionClock::new(start);
        let past = start + Duration::from_secs(121);
        assert_eq!(clock.check(past, &timeouts()), Verdict::IdleTimedOut);
    }

    #[test]
    fn check_interval_follows_shorter_timeout() {
        assert_eq!(timeouts().check_interval(), Duration::from_secs(1));
        let short = ConnectionLimits {
            header_read: Duration::from_millis(200),
            ..timeouts()
        };
        assert_eq!(short.check_interval(), Duration::from_millis(50));
    }
}
