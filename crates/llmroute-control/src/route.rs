//! The `LLMRoute` resource as YAML files define it for `llmroute standalone` (the same spec as
//! the custom resource), and the translation of a route spec into a sidecar configuration.

use std::path::{Path, PathBuf};

pub use llmroute_api::crd::{
    ConfigMapKeyRef, ExplorationSpec, LlmRouteSpec, PolicySpec, RouteModel, RoutePricing,
    SecretKeyRef,
};
use llmroute_api::{ApiKeyRef, ModelEndpoint, PolicyRef, Pricing, SidecarConfig};
use serde::{Deserialize, Serialize};

/// API group and version of the resource.
pub const API_VERSION: &str = llmroute_api::crd::API_VERSION;
/// Kind of the resource.
pub const KIND: &str = "LLMRoute";

/// One `LLMRoute` resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LlmRoute {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: LlmRouteSpec,
}

/// Name and namespace of a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A route file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid LLMRoute in {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl LlmRoute {
    /// Parses one YAML document and checks its kind and API version.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, RouteError> {
        let invalid = |message: String| RouteError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let route: LlmRoute = serde_yaml_ng::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if route.api_version != API_VERSION || route.kind != KIND {
            return Err(invalid(format!(
                "apiVersion {:?} and kind {:?}; expected {API_VERSION} and {KIND}",
                route.api_version, route.kind
            )));
        }
        if route.metadata.name.is_empty() {
            return Err(invalid("metadata.name is empty".to_string()));
        }
        let errors = route.spec.check();
        if !errors.is_empty() {
            return Err(invalid(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        Ok(route)
    }

    /// Builds the sidecar configuration of this route with the given version and policy.
    pub fn sidecar_config(&self, version: u64, stable: Option<PolicyRef>) -> SidecarConfig {
        sidecar_config(&self.metadata.name, &self.spec, version, stable)
    }
}

/// Builds the sidecar configuration of the route `route` (its key in the control API) from its
/// spec, with the given configuration version and stable policy.
pub fn sidecar_config(
    route: &str,
    spec: &LlmRouteSpec,
    version: u64,
    stable: Option<PolicyRef>,
) -> SidecarConfig {
    let models = spec
        .models
        .iter()
        .map(|model| ModelEndpoint {
            name: model.name.clone(),
            endpoint: model.endpoint.clone(),
            upstream_model: model.model.clone(),
            api_key: model
                .api_key_secret_ref
                .as_ref()
                .map(|secret| ApiKeyRef::Secret {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    env: api_key_env(&model.name),
                }),
            pricing: Pricing {
                input_usd_per_million_tokens: model.pricing.input_usd_per_million_tokens,
                output_usd_per_million_tokens: model.pricing.output_usd_per_million_tokens,
            },
            timeout_ms: model
                .timeout_seconds
                .map(|s| (s * 1000.0).round().max(0.0) as u64)
                .unwrap_or(llmroute_api::config::DEFAULT_TIMEOUT_MS),
        })
        .collect();
    SidecarConfig {
        route: route.to_string(),
        version,
        models,
        default_preference: spec.default_preference,
        exploration: spec.exploration(),
        stable,
        canary: None,
        canary_weight: 0.0,
        fallback: spec.fallback.clone(),
        max_attempts: spec
            .max_attempts
            .unwrap_or(llmroute_api::config::DEFAULT_MAX_ATTEMPTS),
    }
}

/// Name of the environment variable that carries a model's API key in the sidecar:
/// `LLMROUTE_API_KEY_` and the model name, upper-cased, with other characters than letters and
/// digits replaced by `_`.
pub fn api_key_env(model: &str) -> String {
    let suffix: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("LLMROUTE_API_KEY_{suffix}")
}

/// One route file and what it contains: its route, or why it cannot be used.
pub type RouteFile = (PathBuf, Result<LlmRoute, RouteError>);

/// Reads every `*.yaml` and `*.yml` file of `folder`, sorted by name. Each file yields its
/// route or its error, so that one broken file does not hide the others.
pub fn load_routes(folder: &Path) -> Result<Vec<RouteFile>, RouteError> {
    let entries = std::fs::read_dir(folder).map_err(|source| RouteError::Read {
        path: folder.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|path| {
            let route = std::fs::read_to_string(&path)
                .map_err(|source| RouteError::Read {
                    path: path.clone(),
                    source,
                })
                .and_then(|text| LlmRoute::from_yaml(&text, &path));
            (path, route)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmroute_api::Exploration;

    const ROUTE: &str = r#"
apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata:
  name: chat
spec:
  models:
    - name: small
      endpoint: http://127.0.0.1:9000/m/small/v1
      model: small-1
      apiKeySecretRef: {name: keys, key: small}
      pricing: {inputUsdPerMillionTokens: 0.1, outputUsdPerMillionTokens: 0.2}
      timeoutSeconds: 2.5
    - name: large
      endpoint: http://127.0.0.1:9000/m/large/v1
      model: large-1
      pricing: {inputUsdPerMillionTokens: 1, outputUsdPerMillionTokens: 4}
  defaultPreference: {quality: 0.7}
  exploration: {mode: epsilonGreedy, epsilon: 0.1}
  fallback: small
"#;

    #[test]
    fn route_becomes_valid_config() {
        let route = LlmRoute::from_yaml(ROUTE, Path::new("chat.yaml")).unwrap();
        let config = route.sidecar_config(4, None);
        config.validate().unwrap();
        assert_eq!(config.version, 4);
        assert_eq!(config.models[0].timeout_ms, 2500);
        assert_eq!(
            config.models[0].api_key.as_ref().unwrap().env_var(),
            "LLMROUTE_API_KEY_SMALL"
        );
        assert_eq!(config.models[1].api_key, None);
        assert_eq!(
            config.exploration,
            Exploration::EpsilonGreedy { epsilon: 0.1 }
        );
    }

    #[test]
    fn wrong_kind_and_fields_are_rejected() {
        let cases = [
            (
                ROUTE.replace("kind: LLMRoute", "kind: Route"),
                "expected llmroute.dev/v1alpha1",
            ),
            (
                ROUTE.replace("fallback: small", "fallback: small\n  fallbak: x"),
                "fallbak",
            ),
            (
                ROUTE.replace("quality: 0.7", "quality: 7"),
                "outside [0, 1]",
            ),
        ];
        for (text, expected) in cases {
            let message = LlmRoute::from_yaml(&text, Path::new("r.yaml"))
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("r.yaml"), "{message}");
        }
    }

    #[test]
    fn api_key_env_is_upper_snake() {
        assert_eq!(api_key_env("gpt-4o.mini"), "LLMROUTE_API_KEY_GPT_4O_MINI");
    }
}
