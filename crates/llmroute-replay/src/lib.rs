//! replay-llm: OpenAI-compatible model endpoints that respond from a recorded routing data set,
//! so that the sidecar and the whole routing loop run on real routing data without API keys.
//!
//! Each model of the data set gets its own base URL, `http://HOST/m/<model>/v1`, serving
//! `POST chat/completions` and `POST completions`, streamed (SSE) or not, and `GET models`.
//! A recorded prompt gets that model's recorded outcome: token usage consistent with the
//! recorded cost and the model's prices ([`recording::usage_for_cost`]), and the recorded
//! quality in the `x-replay-quality` response header. The data sets record scores and costs
//! but no answer texts, so the answer text names the model and its recorded figures.

#![forbid(unsafe_code)]

pub mod faults;
pub mod recording;
pub mod server;

pub use faults::{Fault, FaultError, Faults};
pub use recording::{LookupError, RecordedAnswer, Recording, SplitChoice, usage_for_cost};
pub use server::{QUALITY_HEADER, ReplayServer, serve};
