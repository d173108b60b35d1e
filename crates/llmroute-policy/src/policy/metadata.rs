//! Metadata of a policy version: what the ONNX file's `metadata_props` and the `policy.json`
//! beside it record, so that a sidecar can check a policy against its route before serving it.

use serde::{Deserialize, Serialize};

use super::train::{TrainConfig, TrainSummary};

/// Format tag written into every policy file; readers reject files with another tag.
pub const POLICY_FORMAT: &str = "llmroute.barp-policy.v1";

/// ONNX `metadata_props` keys.
pub mod keys {
    pub const FORMAT: &str = "llmroute.format";
    pub const VERSION: &str = "llmroute.policy_version";
    pub const MODELS: &str = "llmroute.models";
    pub const ENCODER: &str = "llmroute.encoder";
    pub const EMBEDDING_DIM: &str = "llmroute.embedding_dim";
    pub const COST_SCALE: &str = "llmroute.cost_scale_usd";
}

/// Graph input and output names of an exported policy.
pub mod tensors {
    /// `float32 [batch, embedding_dim]`: L2-normalised prompt embeddings.
    pub const EMBEDDING: &str = "embedding";
    /// `float32 [batch, 2]`: `(w_quality, w_cost)`, each row on the simplex.
    pub const PREFERENCE: &str = "preference";
    /// `float32 [batch, num_models]`: unnormalised scores.
    pub const LOGITS: &str = "logits";
    /// `float32 [batch, num_models]`: `softmax(logits)`, the propensities of each model.
    pub const PROBABILITIES: &str = "probabilities";
}

/// The identity of one policy version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyMetadata {
    pub format: String,
    /// Version label, unique within a route (for example `v1` or a timestamp).
    pub version: String,
    /// Model names in action order: output column `k` of the policy is `models[k]`.
    pub models: Vec<String>,
    /// Digest of the prompt encoder the policy was trained on; embeddings from another encoder
    /// are meaningless to it.
    pub encoder: String,
    pub embedding_dim: usize,
    /// Cost scale τ in USD per call that the policy's rewards were computed with.
    pub cost_scale_usd: f32,
}

/// Training record of a policy, written to `policy.json` next to the ONNX file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub dataset: String,
    pub split: String,
    pub prompts: usize,
    pub config: TrainConfig,
    pub interactions: u64,
    pub final_mean_reward: f32,
    pub seconds: f64,
}

impl TrainingRecord {
    pub fn new(
        dataset: &str,
        split: &str,
        prompts: usize,
        config: &TrainConfig,
        summary: &TrainSummary,
        seconds: f64,
    ) -> Self {
        Self {
            dataset: dataset.to_string(),
            split: split.to_string(),
            prompts,
            config: config.clone(),
            interactions: summary.interactions,
            final_mean_reward: summary.final_mean_reward,
            seconds,
        }
    }
}

/// Contents of `policy.json`: the metadata, the ONNX file's sha256 and the training record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyManifest {
    #[serde(flatten)]
    pub metadata: PolicyMetadata,
    /// Hex sha256 of the ONNX file's bytes.
    pub sha256: String,
    /// File name of the ONNX file, relative to the manifest.
    pub file: String,
    pub training: Option<TrainingRecord>,
}
