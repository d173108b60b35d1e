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

/// The two OpenAI endpoints that carry a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
}

impl Endpoint {
    /// Path of the endpoint below an API base URL ending in `/v1`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
}

/// Extracts the prompt of a request body. For a chat request it is the text of the last
/// `user` message: its string content, or the `text` parts of array content joined by
/// newlines. For a completions request it is `prompt`, a string or an array's first string.
///
/// The error names the field at fault and the expected form.
pub fn prompt_text(endpoint: Endpoint, body: &serde_json::Value) -> Result<String, String> {
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = body
                .get("messages")
                .and_then(|m| m.as_array())
                .ok_or("`messages` is missing or not an array")?;
            let last_user = messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"))
                .ok_or("`messages` contains no message with role `user`")?;
            match last_user.get("content") {
                Some(serde_json::Value::String(text)) => Ok(text.clone()),
                Some(serde_json::Value::Array(parts)) => {
                    let texts: Vec<&str> = parts
                        .iter()
                        .filter(|p| p.get("type").and_then(|t| t.as_str()) == Some("text"))
                        .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                        .collect();
                    if texts.is_empty() {
                        Err("the last `user` message has no text part".to_string())
                    } else {
                        Ok(texts.join("\n"))
                    }
                }
                _ => Err(
                    "the last `user` message has no `content` string or array of parts".to_string(),
                ),
            }
        }
        Endpoint::Completions => match body.get("prompt") {
            Some(serde_json::Value::String(text)) => Ok(text.clone()),
            Some(serde_json::Value::Array(items)) => items
                .first()
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .ok_or_else(|| "`prompt` must be a string or an array of strings".to_string()),
            _ => Err("`prompt` is missing or not a string".to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn chat_prompt_is_last_user_message() {
        let body = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": [
                {"type": "text", "text": "second"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"type": "text", "text": "part"}
            ]}
        ]});
        let prompt = prompt_text(Endpoint::ChatCompletions, &body).unwrap();
        assert_eq!(prompt, "second\npart");
    }

    #[test]
    fn prompt_errors_name_field() {
        let cases = [
            (Endpoint::ChatCompletions, json!({}), "`messages`"),
            (
                Endpoint::ChatCompletions,
                json!({"messages": [{"role": "system", "content": "x"}]}),
                "role `user`",
            ),
            (
                Endpoint::ChatCompletions,
                json!({"messages": [{"role": "user", "content": 3}]}),
                "`content`",
            ),
            (Endpoint::Completions, json!({"prompt": 3}), "`prompt`"),
            (Endpoint::Completions, json!({"prompt": [1]}), "`prompt`"),
        ];
        for (endpoint, body, field) in cases {
            let message = prompt_text(endpoint, &body).unwrap_err();
            assert!(message.contains(field), "{body}: {message}");
        }
    }

    #[test]
    fn completions_prompt_accepts_array() {
        let body = json!({"prompt": ["one", "two"]});
        let prompt = prompt_text(Endpoint::Completions, &body).unwrap();
        assert_eq!(prompt, "one");
    }
}
