//! The BaRP routing policy of llmroute: the frozen prompt encoder, the preference-conditioned
//! policy network and its REINFORCE trainer, ONNX export and inference through ONNX Runtime,
//! the routing data sets, baseline routers and the offline evaluation that compares them.

pub mod assets;
pub mod bandit;
pub mod baselines;
pub mod data;
pub mod embedding_cache;
pub mod encoder;
pub mod eval;
pub mod offpolicy;
pub mod onnx;
pub mod output;
pub mod policy;
pub mod reward;
pub mod runtime;
