//! The OpenAI error body, `{"error": {"message", "type", "param", "code"}}`, which every error
//! of the sidecar and of replay-llm uses so that OpenAI clients raise their usual exceptions.

use serde::{Deserialize, Serialize};

/// The body of an OpenAI-style error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The `error` object of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    /// Error class, for example `invalid_request_error`, `not_found_error`, `api_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if any.
    pub param: Option<String>,
    /// A machine-readable code, for example `model_not_found`.
    pub code: Option<String>,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: None,
                code: None,
            },
        }
    }

    /// Sets the `param` field.
    pub fn with_param(mut self, param: &str) -> Self {
        self.error.param = Some(param.to_string());
        self
    }

    /// Sets the `code` field.
    pub fn with_code(mut self, code: &str) -> Self {
        self.error.code = Some(code.to_string());
        self
    }

    /// Serialises the body to JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an error body always serialises")
    }
}
