//! The llmroute control plane without Kubernetes: it turns `LLMRoute` definitions into sidecar
//! configurations with increasing versions, serves them to long-polling sidecars together with
//! policy artifacts by sha256, and stores the completed events that sidecars send in an
//! embedded SQLite database. `llmroute standalone` runs it from a folder of YAML files; the
//! operator will run the same logic from custom resources.

#![forbid(unsafe_code)]

pub mod auth;
pub mod canary;
pub mod history;
pub mod learning;
pub mod plane;
pub mod replication;
pub mod route;
pub mod server;
pub mod store;

pub use learning::{LearningHost, LearningLoop};
pub use plane::{ControlPlane, ReloadReport};
pub use route::{LlmRoute, RouteError, load_routes, sidecar_config};
pub use server::{ControlBackend, EventDestination, serve, serve_backend};
pub use store::{Store, StoreError};
