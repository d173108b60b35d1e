//! The thread that owns the prompt encoder and runs every decision.
//!
//! The sidecar has one encoder, so decisions run one at a time whatever the number of
//! requests in flight. They run on one long-lived thread, not on Tokio's blocking pool. That
//! pool starts a thread for each waiting decision, about 32 at 32 routed requests in flight,
//! and glibc keeps the malloc arena that each of them allocated into after it exits. Measured
//! with `scripts/bench-proxy --soak 16000`: with a full feedback buffer, the sidecar's
//! resident size fell from 195.8 MiB to 180.7 MiB.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use llmroute_policy::encoder::Encoder;
use tokio::sync::oneshot;

/// A unit of work for the encoder thread.
type Job<E> = Box<dyn FnOnce(&mut E) + Send>;

/// The sending end of the encoder thread's queue. The thread stops when this is dropped.
/// `E` is the encoder, generic so that tests need no model.
#[derive(Debug)]
pub(crate) struct EncoderThread<E = Encoder> {
    jobs: mpsc::Sender<Job<E>>,
}

impl<E: Send + 'static> EncoderThread<E> {
    /// Starts the thread `llmroute-encoder`, which owns `encoder`.
    pub(crate) fn spawn(encoder: E) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job<E>>();
        std::thread::Builder::new()
            .name("llmroute-encoder".into())
            .spawn(move || run(encoder, queue))?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the encoder thread after the jobs queued before it, and returns its
    /// result. Returns `None` when the thread has stopped or `work` panicked.
    pub(crate) async fn run<T, F>(&self, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut E) -> T + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let job: Job<E> = Box::new(move |encoder| {
            // The request may have gone away, and then the result is dropped.
            let _ = reply.send(work(encoder));
        });
        self.jobs.send(job).ok()?;
        result.await.ok()
    }
}

fn run<E>(mut encoder: E, queue: mpsc::Receiver<Job<E>>) {
    tracing::info!("the encoder thread started");
    for job in queue {
        // A panicking job drops its reply, so its request falls back to the route's fallback
        // model. The encoder keeps no state between runs, so the next job can use it.
        if catch_unwind(AssertUnwindSafe(|| job(&mut encoder))).is_err() {
            tracing::error!("a decision panicked on the encoder thread; its request falls back");
        }
    }
    tracing::info!("the encoder thread stopped: its queue was closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_one_thread() {
        let thread = EncoderThread::spawn(Vec::<u32>::new()).unwrap();
        for value in 1..=3 {
            let name = thread
                .run(move |seen| {
                    seen.push(value);
                    std::thread::current().name().map(str::to_string)
                })
                .await;
            assert_eq!(name, Some(Some("llmroute-encoder".to_string())));
        }
        let seen = thread.run(|seen| seen.clone()).await;
        assert_eq!(seen, Some(vec![1, 2, 3]));
    }

    #[tokio::test]
    async fn panicking_job_leaves_thread_running() {
        let thread = EncoderThread::spawn(0u32).unwrap();
        let panicked: Option<()> = thread.run(|_| panic!("a failing decision")).await;
        assert_eq!(panicked, None);
        let next = thread
            .run(|count| {
                *count += 1;
                *count
            })
            .await;
        assert_eq!(next, Some(1));
    }
}
