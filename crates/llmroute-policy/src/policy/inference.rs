//! Serving a policy file through ONNX Runtime: one decision per prompt embedding and preference.

use std::path::Path;

use ndarray::{Array2, ArrayView2};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;
use sha2::{Digest, Sha256};

use super::export::{PolicyFileError, check_graph, read_metadata};
use super::metadata::{PolicyMetadata, tensors};
use crate::onnx;

/// A policy that cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("failed to read policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed policy file {path}: {source}")]
    Malformed {
        path: String,
        source: PolicyFileError,
    },
    #[error(
        "ONNX Runtime rejected policy file {path}: {detail}; the file is corrupt or was written by an incompatible llmroute"
    )]
    Session { path: String, detail: String },
    #[error(
        "embedding has {found} values, but policy {version} expects {expected}; the prompt encoder does not match the policy"
    )]
    EmbeddingSize {
        version: String,
        found: usize,
        expected: usize,
    },
    #[error("invalid preference w_quality = {0}: expected a number in [0, 1]")]
    Preference(f32),
    #[error("ONNX Runtime failed to run policy {version}: {detail}")]
    Run { version: String, detail: String },
    #[error(
        "policy {version} returned {detail}; its outputs are not propensities, so the file is corrupt or was not written by `llmroute train`"
    )]
    NotPropensities { version: String, detail: String },
    #[error(
        "policy file {path} failed a trial decision at load: {source}; its graph does not match its metadata (llmroute.models, llmroute.embedding_dim), so retrain it with `llmroute train`"
    )]
    TrialDecision {
        path: String,
        source: Box<InferenceError>,
    },
}

/// Largest distance of a row's propensities from summing to 1 that a decision accepts: far above
/// the float32 rounding of a softmax over a few models, far below a real fault.
const PROPENSITY_SUM_TOLERANCE: f32 = 1e-3;

/// A loaded policy version. `ort` sessions run with `&mut self`, so use one per worker thread
/// or guard it with a lock.
pub struct OnnxPolicy {
    session: Session,
    metadata: PolicyMetadata,
    sha256: String,
}

impl std::fmt::Debug for OnnxPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxPolicy")
            .field("metadata", &self.metadata)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl OnnxPolicy {
    /// Loads a policy file written by `llmroute train`.
    pub fn load(path: &Path, environment: &Environment) -> Result<Self, InferenceError> {
        let bytes = std::fs::read(path).map_err(|source| InferenceError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes, environment, &path.display().to_string())
    }

    /// Loads a policy from the bytes of its file; `origin` names it in errors.
    pub fn from_bytes(
        bytes: &[u8],
        environment: &Environment,
        origin: &str,
    ) -> Result<Self, InferenceError> {
        let malformed = |source| InferenceError::Malformed {
            path: origin.to_string(),
            source,
        };
        // The metadata is checked before ONNX Runtime reads the file, so a wrong file gets an
        // error about policies rather than about graphs.
        let model = onnx::decode(bytes).map_err(|e| malformed(e.into()))?;
        let metadata = read_metadata(&model).map_err(malformed)?;
        check_graph(&model).map_err(malformed)?;

        let session_error = |detail: String| InferenceError::Session {
            path: origin.to_string(),
            detail,
        };
        let session = Session::builder(environment)
            .map_err(|e| session_error(e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| session_error(e.to_string()))?
            .commit_from_memory(bytes)
            .map_err(|e| session_error(e.to_string()))?;

        let mut policy = Self {
            session,
            metadata,
            sha256: hex::encode(Sha256::digest(bytes)),
        };
        policy
            .trial_decision()
            .map_err(|source| InferenceError::TrialDecision {
                path: origin.to_string(),
                source: Box::new(source),
            })?;
        Ok(policy)
    }

    /// Runs the policy once on a zero embedding at three preferences, so that a graph whose
    /// output does not fit its metadata, or whose outputs are not propensities, fails at load
    /// rather than on a request.
    fn trial_decision(&mut self) -> Result<(), InferenceError> {
        let embeddings = Array2::<f32>::zeros((3, self.metadata.embedding_dim));
        self.probabilities_batch(embeddings.view(), &[0.0, 0.5, 1.0])
            .map(drop)
    }

    pub fn metadata(&self) -> &PolicyMetadata {
        &self.metadata
    }

    /// Hex sha256 of the policy file's bytes: the artifact's identity.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Propensities `π(· | x, w)` of every model for one prompt embedding, in model order.
    pub fn probabilities(
        &mut self,
        embedding: &[f32],
        w_quality: f32,
    ) -> Result<Vec<f32>, InferenceError> {
        let view = ArrayView2::from_shape((1, embedding.len()), embedding).expect("one row");
        let batch = self.probabilities_batch(view, &[w_quality])?;
        Ok(batch.into_raw_vec_and_offset().0)
    }

    /// Propensities for a batch: `embeddings` is `[batch × embedding_dim]`.
    pub fn probabilities_batch(
        &mut self,
        embeddings: ArrayView2<f32>,
        w_quality: &[f32],
    ) -> Result<Array2<f32>, InferenceError> {
        if embeddings.ncols() != self.metadata.embedding_dim {
            return Err(InferenceError::EmbeddingSize {
                version: self.metadata.version.clone(),
                found: embeddings.ncols(),
                expected: self.metadata.embedding_dim,
            });
        }
        assert_eq!(
            embeddings.nrows(),
            w_quality.len(),
            "one preference per embedding row"
        );
        if let Some(&bad) = w_quality.iter().find(|w| !(0.0..=1.0).contains(*w)) {
            return Err(InferenceError::Preference(bad));
        }
        let preference: Vec<f32> = w_quality.iter().flat_map(|&w| [w, 1.0 - w]).collect();
        let embeddings = embeddings.as_standard_layout();

        let run_error = |detail: String| InferenceError::Run {
            version: self.metadata.version.clone(),
            detail,
        };
        let embedding_tensor =
            TensorRef::from_array_view(embeddings.view()).map_err(|e| run_error(e.to_string()))?;
        let preference_tensor =
            TensorRef::from_array_view(([w_quality.len(), 2], preference.as_slice()))
                .map_err(|e| run_error(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![
                tensors::EMBEDDING => embedding_tensor,
                tensors::PREFERENCE => preference_tensor,
            ])
            .map_err(|e| run_error(e.to_string()))?;
        let output = outputs.get(tensors::PROBABILITIES).ok_or_else(|| {
            run_error(format!(
                "the graph has no output `{}`",
                tensors::PROBABILITIES
            ))
        })?;
        let (shape, values) = output
            .try_extract_tensor::<f32>()
            .map_err(|e| run_error(e.to_string()))?;
        let models = self.metadata.models.len();
        let expected = [w_quality.len() as i64, models as i64];
        if **shape != expected {
            return Err(run_error(format!(
                "output `{}` has shape {:?}, but {} prompts and the {models} models of \
                 llmroute.models need {expected:?}",
                tensors::PROBABILITIES,
                &**shape,
                w_quality.len(),
            )));
        }
        check_propensities(values, models).map_err(|detail| InferenceError::NotPropensities {
            version: self.metadata.version.clone(),
            detail,
        })?;
        Array2::from_shape_vec((w_quality.len(), models), values.to_vec())
            .map_err(|e| run_error(format!("output has an unexpected shape: {e}")))
    }
}

/// Checks that every row of `models` values is a probability distribution: finite values in
/// [0, 1] summing to 1 within [`PROPENSITY_SUM_TOLERANCE`]. The importance weights of off-policy evaluation divide
/// by these values, so a NaN or a row that does not sum to 1 would corrupt them silently.
fn check_propensities(probabilities: &[f32], models: usize) -> Result<(), String> {
    for (row, values) in probabilities.chunks_exact(models).enumerate() {
        if let Some(bad) = values
            .iter()
            .find(|p| !p.is_finite() || !(0.0..=1.0).contains(*p))
        {
            return Err(format!("propensity {bad} for prompt {row}, outside [0, 1]"));
        }
        let sum: f32 = values.iter().sum();
        if (sum - 1.0).abs() > PROPENSITY_SUM_TOLERANCE {
            return Err(format!(
                "propensities summing to {sum} for prompt {row}, not 1"
            ));
        }
    }
    Ok(())
}
