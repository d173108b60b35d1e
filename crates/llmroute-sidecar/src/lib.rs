//! The llmroute data plane: an OpenAI-compatible HTTP proxy on 127.0.0.1 in the application's
//! pod. For each request it reads the preference, embeds the prompt, runs the route's policy
//! and forwards to the chosen model. On connect errors, timeouts, 429 and 5xx before any byte
//! reached the client, it retries the next-best model. It accounts tokens and cost, and sends
//! completed events, joined with the application's quality feedback, to the control plane.

#![forbid(unsafe_code)]

pub mod body;
pub mod control;
pub mod decision;
mod encoder_thread;
pub mod events;
pub mod feedback;
pub mod keys;
pub mod limits;
pub mod metrics;
mod proxy;
pub mod request;
pub mod server;
pub mod shutdown;
pub mod sidecar;
pub mod sse;
pub mod state;
pub mod tls;

pub use control::{ControlClient, TokenFile, follow};
pub use events::{BatchSettings, EventSender, EventSink};
pub use limits::Limits;
pub use server::{AdminTarget, serve, serve_admin, serve_not_ready};
pub use shutdown::ShutdownSwitch;
pub use sidecar::{Sidecar, SidecarOptions};
pub use state::{LoadedPolicy, RouteState, StateError, read_config};
pub use tls::{TlsError, UpstreamTls};
