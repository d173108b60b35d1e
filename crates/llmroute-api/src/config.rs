//! The configuration a sidecar serves one route with: the model pool, prices, the default
//! preference, exploration, the stable and canary policy versions, and the fallback model.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::preference::Preference;

/// Default per-model timeout for the upstream response headers and for each gap between
/// streamed chunks, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 120_000;
/// Default number of models a request is tried on before its error reaches the client.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 2;

/// One route's sidecar configuration, as the control API serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// Route name; also the model name that clients request to be routed.
    pub route: String,
    /// Version of this configuration; it increases with every change, and long-polling
    /// sidecars send the last version they have.
    pub version: u64,
    /// The pool, in any order; a policy's own model list gives the action order.
    pub models: Vec<ModelEndpoint>,
    /// Preference used when a request sets none.
    pub default_preference: Preference,
    #[serde(default)]
    pub exploration: Exploration,
    /// Policy serving the requests that do not go to the canary.
    #[serde(default)]
    pub stable: Option<PolicyRef>,
    /// Policy under test, served to `canary_weight` of the routed requests.
    #[serde(default)]
    pub canary: Option<PolicyRef>,
    /// Share of routed requests, in `[0, 1]`, decided by the canary policy.
    #[serde(default)]
    pub canary_weight: f64,
    /// Model used when no policy can run.
    pub fallback: String,
    /// Maximum number of models one request is tried on (1 disables retries).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

/// One model of the pool and how to call it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelEndpoint {
    /// Name of the model in the route and in policies (the action name).
    pub name: String,
    /// Base URL of an OpenAI-compatible API, up to and including `/v1`, for example
    /// `http://127.0.0.1:8081/m/gpt/v1`.
    pub endpoint: String,
    /// Model id sent upstream in the request's `model` field.
    pub upstream_model: String,
    /// Source of the API key; `None` sends no `Authorization` header.
    #[serde(default)]
    pub api_key: Option<ApiKeyRef>,
    pub pricing: Pricing,
    /// Timeout for the response headers and for each gap between streamed chunks, in
    /// milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// Reference to an API key; the key itself never appears in a configuration. The sidecar
/// reads the key from the file that the variable `<env>_FILE` names when it is set, again
/// every few seconds, and from the variable `<env>` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ApiKeyRef {
    /// Name of an environment variable of the sidecar's process.
    Env(String),
    /// A key of a Kubernetes Secret. The injection webhook mounts it as a file of the
    /// sidecar's projected volume and sets `<env>_FILE` to that file's path.
    #[serde(rename_all = "camelCase")]
    Secret {
        name: String,
        key: String,
        env: String,
    },
}

impl ApiKeyRef {
    /// Name of the environment variable the sidecar reads the key from.
    pub fn env_var(&self) -> &str {
        match self {
            ApiKeyRef::Env(name) => name,
            ApiKeyRef::Secret { env, .. } => env,
        }
    }
}

/// Prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pricing {
    pub input_usd_per_million_tokens: f64,
    pub output_usd_per_million_tokens: f64,
}

impl Pricing {
    /// Cost in USD of a call with these token counts.
    pub fn cost_usd(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_usd_per_million_tokens
            + completion_tokens as f64 * self.output_usd_per_million_tokens)
            / 1e6
    }
}

/// Rule that draws a decision from the policy's probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "mode", deny_unknown_fields)]
pub enum Exploration {
    /// The model of maximum probability, whose propensity is 1.
    #[default]
    Greedy,
    /// A model drawn from the policy's probabilities; its propensity is its probability.
    Sample,
    /// The model of maximum probability with probability `1 - epsilon`, otherwise a uniformly
    /// drawn one. Propensity: `(1 - epsilon)·[a = argmax] + epsilon / K`.
    EpsilonGreedy { epsilon: f64 },
}

/// One policy version, identified by the sha256 of its ONNX file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRef {
    pub version: String,
    /// Lowercase hex sha256 of the policy file's bytes.
    pub sha256: String,
}

/// A configuration that a sidecar cannot serve.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid configuration of route {route:?}: {message}")]
pub struct ConfigError {
    pub route: String,
    pub message: String,
}

impl SidecarConfig {
    /// Checks every rule that serde cannot express: unique model names, a known fallback,
    /// URLs that the sidecar can call, positive prices and timeouts, a canary weight in
    /// `[0, 1]`, well-formed digests and an epsilon in `[0, 1]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| {
            Err(ConfigError {
                route: self.route.clone(),
                message,
            })
        };
        if self.route.is_empty() {
            return fail("the route name is empty".to_string());
        }
        if self.models.is_empty() {
            return fail("`models` is empty; list at least one model".to_string());
        }
        let mut names = HashSet::new();
        for model in &self.models {
            if !names.insert(model.name.as_str()) {
                return fail(format!("model name {:?} appears twice", model.name));
            }
            if let Err(message) = self.validate_model(model) {
                return fail(message);
            }
        }

        if !names.contains(self.fallback.as_str()) {
            return fail(format!(
                "fallback model {:?} is not in `models`; name one of {:?}",
                self.fallback,
                self.models.iter().map(|m| &m.name).collect::<Vec<_>>()
            ));
        }
        if !(0.0..=1.0).contains(&self.canary_weight) {
            return fail(format!(
                "canaryWeight {} is outside [0, 1]",
                self.canary_weight
            ));
        }
        if self.canary_weight > 0.0 && self.canary.is_none() {
            return fail(format!(
                "canaryWeight is {} but no canary policy is set",
                self.canary_weight
            ));
        }
        if let Exploration::EpsilonGreedy { epsilon } = self.exploration
            && !(0.0..=1.0).contains(&epsilon)
        {
            return fail(format!("exploration epsilon {epsilon} is outside [0, 1]"));
        }
        if self.max_attempts == 0 {
            return fail("maxAttempts is 0; use at least 1".to_string());
        }
        for policy in self.stable.iter().chain(self.canary.iter()) {
            if !is_sha256_hex(&policy.sha256) {
                return fail(format!(
                    "policy {:?} has sha256 {:?}; expected 64 lowercase hex digits",
                    policy.version, policy.sha256
                ));
            }
        }
        Ok(())
    }

    /// Checks one model of the pool: its name, endpoint URL, prices and timeout.
    fn validate_model(&self, model: &ModelEndpoint) -> Result<(), String> {
        if model.name.is_empty() {
            return Err("a model has an empty `name`".to_string());
        }
        if model.name == self.route {
            return Err(format!(
                "model {:?} has the route's own name, which clients use to ask for routing; rename the model",
                model.name
            ));
        }
        if let Err(reason) = check_endpoint(&model.endpoint) {
            return Err(format!(
                "model {:?} has endpoint {:?}: {reason}",
                model.name, model.endpoint
            ));
        }
        let prices = [
            model.pricing.input_usd_per_million_tokens,
            model.pricing.output_usd_per_million_tokens,
        ];
        if prices.iter().any(|p| !p.is_finite() || *p < 0.0) {
            return Err(format!(
                "model {:?} has prices {prices:?}; use non-negative USD per million tokens",
                model.name
            ));
        }
        if model.timeout_ms == 0 {
            return Err(format!(
                "model {:?} has timeoutMs 0; use a positive number of milliseconds",
                model.name
            ));
        }
        Ok(())
    }

    /// Finds the model named `name` in the pool.
    pub fn model(&self, name: &str) -> Option<&ModelEndpoint> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// Checks that `endpoint` is an absolute `http://` URL with a host and no query or fragment.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let Some(rest) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return Err("expected an absolute URL starting with http:// or https://".to_string());
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err("the URL has no host".to_string());
    }
    if rest.contains(['?', '#']) || rest.chars().any(char::is_whitespace) {
        return Err("the URL must not contain a query, a fragment or whitespace".to_string());
    }
    Ok(())
}

/// Tests whether `value` is 64 lowercase hex digits.
pub fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SidecarConfig {
        serde_json::from_value(serde_json::json!({
            "route": "chat",
            "version": 3,
            "models": [
                {
                    "name": "small",
                    "endpoint": "http://127.0.0.1:9000/m/small/v1",
                    "upstreamModel": "small-1",
                    "apiKey": {"env": "SMALL_KEY"},
                    "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.2}
                },
                {
                    "name": "large",
                    "endpoint": "http://127.0.0.1:9000/m/large/v1",
                    "upstreamModel": "large-1",
                    "pricing": {"inputUsdPerMillionTokens": 1.0, "outputUsdPerMillionTokens": 4.0},
                    "timeoutMs": 5000
                }
            ],
            "defaultPreference": {"quality": 0.7},
            "exploration": {"mode": "epsilonGreedy", "epsilon": 0.05},
            "stable": {"version": "v1", "sha256": "a".repeat(64)},
            "fallback": "small"
        }))
        .expect("valid configuration")
    }

    #[test]
    fn config_parses_with_defaults() {
        let config = config();
        config.validate().unwrap();
        assert_eq!(config.models[0].timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(config.models[1].timeout_ms, 5000);
        assert_eq!(config.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(config.canary_weight, 0.0);
        assert_eq!(
            config.models[0].api_key.as_ref().map(ApiKeyRef::env_var),
            Some("SMALL_KEY")
        );
        assert_eq!(
            config.exploration,
            Exploration::EpsilonGreedy { epsilon: 0.05 }
        );
        let round_trip: SidecarConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(round_trip, config);
    }

    #[test]
    fn validate_rejects_each_rule() {
        type Edit = fn(&mut SidecarConfig);
        let cases: [(&str, Edit); 11] = [
            ("appears twice", |c| c.models[1].name = "small".into()),
            ("not in `models`", |c| c.fallback = "medium".into()),
            ("a query", |c| {
                c.models[0].endpoint = "https://api.example.test/v1?key=1".into()
            }),
            ("starting with http://", |c| {
                c.models[0].endpoint = "127.0.0.1:9000".into()
            }),
            ("no host", |c| c.models[0].endpoint = "http:///v1".into()),
            ("non-negative USD", |c| {
                c.models[0].pricing.input_usd_per_million_tokens = -1.0
            }),
            ("timeoutMs 0", |c| c.models[0].timeout_ms = 0),
            ("canaryWeight 1.5", |c| c.canary_weight = 1.5),
            ("no canary policy", |c| c.canary_weight = 0.5),
            ("64 lowercase hex", |c| {
                c.stable.as_mut().unwrap().sha256 = "ABC".into()
            }),
            ("route's own name", |c| c.models[0].name = "chat".into()),
        ];
        for (expected, edit) in cases {
            let mut config = config();
            edit(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(expected), "{expected}: {message}");
            assert!(message.contains("\"chat\""), "{message}");
        }
    }

    #[test]
    fn unknown_field_is_rejected() {
        let mut value = serde_json::to_value(config()).unwrap();
        value["canaryWieght"] = serde_json::json!(0.1);
        let error = serde_json::from_value::<SidecarConfig>(value).unwrap_err();
        assert!(error.to_string().contains("canaryWieght"), "{error}");
    }

    #[test]
    fn pricing_gives_cost() {
        let pricing = Pricing {
            input_usd_per_million_tokens: 2.0,
            output_usd_per_million_tokens: 8.0,
        };
        assert!((pricing.cost_usd(1000, 500) - 0.006).abs() < 1e-12);
    }
}
