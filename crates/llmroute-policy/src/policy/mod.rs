//! The BaRP policy: network, REINFORCE trainer, ONNX export and inference through ONNX Runtime.

pub mod adam;
pub mod export;
pub mod inference;
pub mod metadata;
pub mod network;
pub mod prior;
pub mod router;
pub mod train;

pub use export::{PolicyFileError, from_onnx, read_metadata, to_onnx, to_onnx_bytes};
pub use inference::{InferenceError, OnnxPolicy};
pub use metadata::{PolicyManifest, PolicyMetadata, TrainingRecord};
pub use network::{NetworkShape, PolicyNetwork, argmax};
pub use router::BarpRouter;
pub use train::{TrainConfig, TrainSummary, train};
