//! Wire types shared by the llmroute sidecar, the control plane and the operator: the sidecar
//! configuration of a route, routing decisions, feedback, completed events and the
//! OpenAI-style error body, and the custom resources `LLMRoute` and `LLMPolicy`, whose
//! Kubernetes types exist only with the `crd` feature. With the `listen` feature, the binding
//! of listeners that other pods reach.

#![forbid(unsafe_code)]

pub mod config;
pub mod crd;
pub mod event;
#[cfg(feature = "listen")]
pub mod listen;
pub mod openai;
pub mod preference;
pub mod rollout;

pub use config::{
    ApiKeyRef, ConfigError, Exploration, ModelEndpoint, PolicyRef, Pricing, SidecarConfig,
};
pub use event::{
    CompletedEvent, DecisionRecord, EventBatch, FeedbackRequest, Outcome, new_decision_id,
};
pub use openai::{Endpoint, ErrorBody, ErrorDetail, prompt_text};
pub use preference::{Preference, PreferenceError};
