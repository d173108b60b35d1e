//! The BaRP policy: network, REINFORCE trainer, ONNX export and inference through ONNX Runtime.

pub mod adam;
pub mod network;
pub mod train;

pub use network::{NetworkShape, PolicyNetwork, argmax};
pub use train::{TrainConfig, TrainSummary, train};
