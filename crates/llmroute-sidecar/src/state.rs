//! The route a sidecar serves: its checked configuration, the loaded stable and canary
//! policies, and the API keys of its models.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use llmroute_api::{PolicyRef, SidecarConfig};
use llmroute_policy::policy::{InferenceError, OnnxPolicy};
use ort::environment::Environment;

use crate::keys::ApiKeys;

/// A configuration or policy that the sidecar cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Config(#[from] llmroute_api::ConfigError),
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid sidecar configuration {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error(
        "policy {version} (sha256 {sha256}) is not available; provide its file with --policy or publish it to the control plane"
    )]
    MissingPolicy { version: String, sha256: String },
    #[error(transparent)]
    Policy(#[from] InferenceError),
    #[error(
        "policy {version} routes to model {model:?}, which route {route:?} does not list; add the model to the route or use a policy trained on its models"
    )]
    UnknownModel {
        version: String,
        model: String,
        route: String,
    },
    #[error(
        "policy {version} was trained with encoder {policy_encoder}, but this sidecar runs encoder {encoder}; train the policy with this encoder"
    )]
    EncoderMismatch {
        version: String,
        policy_encoder: String,
        encoder: String,
    },
    #[error(
        "policy {version} file has sha256 {actual}, but the configuration names {expected}; the file is not the published artifact"
    )]
    DigestMismatch {
        version: String,
        expected: String,
        actual: String,
    },
    #[error("policy {version} is named in the configuration, but ONNX Runtime is not loaded")]
    NoRuntime { version: String },
}

/// One policy version ready to serve.
#[derive(Debug)]
pub struct LoadedPolicy {
    pub version: String,
    pub sha256: String,
    /// Model names in the policy's action order.
    pub models: Vec<String>,
    /// `ort` sessions run with `&mut self`, so requests take turns.
    session: Mutex<OnnxPolicy>,
}

impl LoadedPolicy {
    /// Loads a policy file's bytes and checks them against `reference`, the route's models and
    /// the encoder digest.
    pub fn load(
        bytes: &[u8],
        reference: &PolicyRef,
        config: &SidecarConfig,
        environment: &Environment,
        encoder_digest: &str,
    ) -> Result<Self, StateError> {
        let policy = OnnxPolicy::from_bytes(bytes, environment, &reference.version)?;
        if policy.sha256() != reference.sha256 {
            return Err(StateError::DigestMismatch {
                version: reference.version.clone(),
                expected: reference.sha256.clone(),
                actual: policy.sha256().to_string(),
            });
        }
        let metadata = policy.metadata().clone();
        if metadata.encoder != encoder_digest {
            return Err(StateError::EncoderMismatch {
                version: reference.version.clone(),
                policy_encoder: metadata.encoder,
                encoder: encoder_digest.to_string(),
            });
        }
        if let Some(model) = metadata.models.iter().find(|m| config.model(m).is_none()) {
            return Err(StateError::UnknownModel {
                version: reference.version.clone(),
                model: model.clone(),
                route: config.route.clone(),
            });
        }
        Ok(Self {
            version: reference.version.clone(),
            sha256: reference.sha256.clone(),
            models: metadata.models,
            session: Mutex::new(policy),
        })
    }

    /// Computes the propensities of every model, in [`LoadedPolicy::models`] order.
    pub fn probabilities(
        &self,
        embedding: &[f32],
        w_quality: f32,
    ) -> Result<Vec<f32>, InferenceError> {
        // A poisoned lock means a panic inside ONNX Runtime's call; the session holds no
        // state between runs, so it stays usable.
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        session.probabilities(embedding, w_quality)
    }
}

/// Everything one request needs from the route, swapped whole on every configuration change.
#[derive(Debug)]
pub struct RouteState {
    pub config: SidecarConfig,
    pub stable: Option<Arc<LoadedPolicy>>,
    pub canary: Option<Arc<LoadedPolicy>>,
    api_keys: ApiKeys,
}

impl RouteState {
    /// Checks `config`, reads its API keys from the environment and loads its policies.
    /// `artifact` returns a policy file's bytes by sha256; `previous` lends policies that are
    /// already loaded, so that a configuration change does not load them again.
    pub fn build(
        config: SidecarConfig,
        artifact: &dyn Fn(&str) -> Option<Vec<u8>>,
        environment: Option<&Environment>,
        encoder_digest: &str,
        previous: Option<&RouteState>,
    ) -> Result<Self, StateError> {
        config.validate()?;
        let api_keys = ApiKeys::read(&config.route, &config.models);
        let load =
            |reference: &Option<PolicyRef>| -> Result<Option<Arc<LoadedPolicy>>, StateError> {
                let Some(reference) = reference else {
                    return Ok(None);
                };
                if let Some(loaded) = previous.and_then(|p| p.policy_by_digest(&reference.sha256)) {
                    return Ok(Some(loaded));
                }
                let environment = environment.ok_or_else(|| StateError::NoRuntime {
                    version: reference.version.clone(),
                })?;
                let bytes =
                    artifact(&reference.sha256).ok_or_else(|| StateError::MissingPolicy {
                        version: reference.version.clone(),
                        sha256: reference.sha256.clone(),
                    })?;
                let policy =
                    LoadedPolicy::load(&bytes, reference, &config, environment, encoder_digest)?;
                Ok(Some(Arc::new(policy)))
            };
        let stable = load(&config.stable)?;
        let canary = load(&config.canary)?;
        Ok(Self {
            config,
            stable,
            canary,
            api_keys,
        })
    }

    /// Tests whether `model` can be called: it needs no API key or has one.
    pub fn is_available(&self, model: &str) -> bool {
        !matches!(self.api_keys.get(model), Some(Err(_)))
    }

    /// Models that cannot be called because their API key is missing, with the reason, sorted
    /// by name.
    pub fn unavailable(&self) -> BTreeMap<String, String> {
        self.api_keys.missing()
    }

    /// Returns the API key of `model`, if it has one.
    pub fn api_key(&self, model: &str) -> Option<String> {
        self.api_keys.get(model)?.ok()
    }

    fn policy_by_digest(&self, sha256: &str) -> Option<Arc<LoadedPolicy>> {
        [&self.stable, &self.canary]
            .into_iter()
            .flatten()
            .find(|p| p.sha256 == sha256)
            .cloned()
    }
}

/// Reads a sidecar configuration from a JSON file.
pub fn read_config(path: &Path) -> Result<SidecarConfig, StateError> {
    let text = std::fs::read_to_string(path).map_err(|source| StateError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| StateError::Parse {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> SidecarConfig {
        serde_json::from_value(serde_json::json!({
            "route": "chat",
            "version": 1,
            "models": [{
                "name": "small",
                "endpoint": endpoint,
                "upstreamModel": "s",
                "pricing": {"inputUsdPerMillionTokens": 1.0, "outputUsdPerMillionTokens": 2.0},
                "timeoutMs": 1000
            }],
            "defaultPreference": {"quality": 0.5},
            "fallback": "small"
        }))
        .unwrap()
    }

    #[test]
    fn https_endpoints_pass_validation() {
        assert!(config("https://127.0.0.1:9000/v1").validate().is_ok());
        assert!(config("http://127.0.0.1:9000/v1").validate().is_ok());
        let error = config("https://127.0.0.1:9000/v1?x=1")
            .validate()
            .unwrap_err();
        assert!(
            error.message.contains("\"https://127.0.0.1:9000/v1?x=1\""),
            "{}",
            error.message
        );
        assert!(config("ftp://127.0.0.1/v1").validate().is_err());
    }
}
