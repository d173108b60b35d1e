//! Parsing and checking of a completion request without I/O: from the path, the
//! `Content-Type` and preference headers and the body bytes to either a request ready for the
//! decision or the OpenAI-style error that the server sends. The server and the fuzz target in
//! `fuzz/` both call [`parse_request`].

use http::{HeaderValue, StatusCode};
use llmroute_api::openai::{Endpoint, prompt_text};
use llmroute_api::{ErrorBody, Preference, SidecarConfig};
use serde_json::Value;

use crate::limits::{self, Limits};
use crate::sidecar::{PREFERENCE_FIELD, PREFERENCE_HEADER};

/// Maximum length of an error message, in bytes. Some messages quote client input (the model
/// name, the preference), so longer messages lose their middle, see [`bounded_message`].
pub const MAX_ERROR_MESSAGE_BYTES: usize = 2048;

/// The parts of a completion request that the HTTP layer has before it reads the body.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The URI path, for example `/v1/chat/completions`.
    pub path: &'a str,
    /// The `Content-Type` header, if present.
    pub content_type: Option<&'a HeaderValue>,
    /// The [`PREFERENCE_HEADER`] header, if present.
    pub preference: Option<&'a HeaderValue>,
}

/// A completion request ready for the decision.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    /// The requested model: the route name, which lets the policy choose, or a model of the
    /// route's pool.
    pub model: String,
    /// Prompt text for the encoder, cut to [`Limits::max_prompt_bytes`] at a character
    /// boundary. `Some` exactly when `model` is the route name.
    pub prompt: Option<String>,
    pub preference: Preference,
    /// The client asked for a server-sent event stream.
    pub stream: bool,
    /// The client asked for a stream without usage, so the sidecar set
    /// `stream_options.include_usage` to account tokens and removes the usage chunk from the
    /// response.
    pub strip_usage: bool,
    /// The JSON object to forward: the client's body without [`PREFERENCE_FIELD`], with
    /// `stream_options.include_usage` set when `strip_usage` is true. Forwarding replaces
    /// `model` with the upstream model id of each model it tries.
    pub body: Value,
}

/// A rejected request: the response the server sends and the reason label of the
/// `rejected` metric.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// A 4xx status.
    pub status: StatusCode,
    /// The OpenAI-style error body, with a message of at most [`MAX_ERROR_MESSAGE_BYTES`].
    pub body: ErrorBody,
    pub reason: &'static str,
}

impl RequestError {
    fn new(status: StatusCode, mut body: ErrorBody, reason: &'static str) -> Self {
        body.error.message = bounded_message(body.error.message);
        Self {
            status,
            body,
            reason,
        }
    }

    fn invalid(status: StatusCode, message: impl Into<String>, reason: &'static str) -> Self {
        Self::new(
            status,
            ErrorBody::new("invalid_request_error", message),
            reason,
        )
    }
}

/// Returns the endpoint served at `path`, if any.
pub fn endpoint_of(path: &str) -> Option<Endpoint> {
    match path {
        "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
        "/v1/completions" => Some(Endpoint::Completions),
        _ => None,
    }
}

/// Builds the error for a path that the sidecar does not serve.
pub fn unknown_path_error(path: &str) -> ErrorBody {
    ErrorBody::new(
        "invalid_request_error",
        bounded_message(format!(
            "unknown path {path}; the sidecar serves /v1/chat/completions, /v1/completions, /v1/models and /v1/feedback"
        )),
    )
    .with_code("unknown_url")
}

/// Checks the path and the `Content-Type`, which the server does before it reads the body.
pub fn check_head(head: &RequestHead<'_>) -> Result<Endpoint, RequestError> {
    let Some(endpoint) = endpoint_of(head.path) else {
        return Err(RequestError::new(
            StatusCode::NOT_FOUND,
            unknown_path_error(head.path),
            "unknown_path",
        ));
    };
    let content_type = head
        .content_type
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !limits::is_json_content_type(content_type) {
        return Err(RequestError::invalid(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Type {content_type:?}; send application/json"),
            "content_type",
        ));
    }
    Ok(endpoint)
}

/// Builds the error for a body over [`Limits::max_body_bytes`].
pub fn body_too_large(limits: &Limits) -> RequestError {
    RequestError::invalid(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body exceeds {} bytes; send a smaller request",
            limits.max_body_bytes
        ),
        "body_too_large",
    )
}

/// Parses and checks a completion request for the route of `config`: the head, the body's size,
/// nesting depth and JSON, the preference, the model and, for routed requests, the prompt.
/// Rewrites the body for forwarding, see [`ParsedRequest::body`].
pub fn parse_request(
    config: &SidecarConfig,
    limits: &Limits,
    head: &RequestHead<'_>,
    body: &[u8],
) -> Result<ParsedRequest, RequestError> {
    let endpoint = check_head(head)?;
    if body.len() > limits.max_body_bytes {
        return Err(body_too_large(limits));
    }
    if limits::json_depth_exceeds(body, limits.max_json_depth) {
        return Err(RequestError::invalid(
            StatusCode::BAD_REQUEST,
            format!(
                "the request body nests arrays and objects deeper than {} levels",
                limits.max_json_depth
            ),
            "json_depth",
        ));
    }
    let mut body: Value = serde_json::from_slice(body).map_err(|error| {
        RequestError::invalid(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {error}"),
            "invalid_json",
        )
    })?;
    let Some(object) = body.as_object_mut() else {
        return Err(RequestError::invalid(
            StatusCode::BAD_REQUEST,
            "the request body must be a JSON object",
            "invalid_json",
        ));
    };
    let preference = read_preference(object, head.preference, config.default_preference)?;

    let route = &config.route;
    let Some(model) = object
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err(RequestError::new(
            StatusCode::BAD_REQUEST,
            ErrorBody::new(
                "invalid_request_error",
                format!("`model` is missing or not a string; use {route:?} to let llmroute choose, or a model of the route"),
            )
            .with_param("model"),
            "missing_model",
        ));
    };
    let prompt = if model == *route {
        let prompt = prompt_text(endpoint, &body).map_err(|message| {
            RequestError::invalid(StatusCode::BAD_REQUEST, message, "no_prompt")
        })?;
        Some(limits::truncate_at_char_boundary(&prompt, limits.max_prompt_bytes).to_string())
    } else if config.model(&model).is_some() {
        None
    } else {
        let known: Vec<&str> = std::iter::once(route.as_str())
            .chain(config.models.iter().map(|m| m.name.as_str()))
            .collect();
        return Err(RequestError::new(
            StatusCode::NOT_FOUND,
            ErrorBody::new(
                "invalid_request_error",
                format!(
                    "The model `{model}` does not exist on this route; use one of: {}",
                    known.join(", ")
                ),
            )
            .with_param("model")
            .with_code("model_not_found"),
            "unknown_model",
        ));
    };

    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_wants_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let strip_usage = stream && !client_wants_usage;
    if strip_usage {
        let object = body.as_object_mut().expect("checked to be an object");
        let options = object
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(options) = options.as_object_mut() {
            options.insert("include_usage".to_string(), Value::Bool(true));
        }
    }
    Ok(ParsedRequest {
        endpoint,
        model,
        prompt,
        preference,
        stream,
        strip_usage,
        body,
    })
}

/// Reads the preference from the header, else from the body field (which it removes), else
/// returns `default`.
fn read_preference(
    object: &mut serde_json::Map<String, Value>,
    header: Option<&HeaderValue>,
    default: Preference,
) -> Result<Preference, RequestError> {
    let invalid_preference = |message: String, param: &str| {
        RequestError::new(
            StatusCode::BAD_REQUEST,
            ErrorBody::new("invalid_request_error", message).with_param(param),
            "invalid_preference",
        )
    };
    let from_body = match object.remove(PREFERENCE_FIELD) {
        None => None,
        Some(Value::String(text)) => Some(Preference::parse(&text).map_err(|e| {
            invalid_preference(format!("invalid {PREFERENCE_FIELD}: {e}"), PREFERENCE_FIELD)
        })?),
        Some(value @ Value::Object(_)) => {
            Some(serde_json::from_value::<Preference>(value).map_err(|e| {
                invalid_preference(format!("invalid {PREFERENCE_FIELD}: {e}"), PREFERENCE_FIELD)
            })?)
        }
        Some(other) => {
            return Err(invalid_preference(
                format!(
                    "invalid {PREFERENCE_FIELD} {other}: expected a string such as \"quality=0.8\" or an object such as {{\"quality\": 0.8}}"
                ),
                PREFERENCE_FIELD,
            ));
        }
    };
    let from_header = match header {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                invalid_preference(
                    format!("the {PREFERENCE_HEADER} header is not visible ASCII"),
                    PREFERENCE_HEADER,
                )
            })?;
            Some(Preference::parse(text).map_err(|e| {
                invalid_preference(
                    format!("invalid {PREFERENCE_HEADER} header: {e}"),
                    PREFERENCE_HEADER,
                )
            })?)
        }
    };
    Ok(from_header.or(from_body).unwrap_or(default))
}

/// Cuts `message` to at most [`MAX_ERROR_MESSAGE_BYTES`] by replacing its middle with ` … `,
/// at character boundaries. The start names the failure and the end usually states the fix, so
/// both are kept.
pub fn bounded_message(message: String) -> String {
    if message.len() <= MAX_ERROR_MESSAGE_BYTES {
        return message;
    }
    const ELLIPSIS: &str = " … ";
    let keep = (MAX_ERROR_MESSAGE_BYTES - ELLIPSIS.len()) / 2;
    let head = limits::truncate_at_char_boundary(&message, keep);
    let mut tail_start = message.len() - keep;
    while !message.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!("{head}{ELLIPSIS}{}", &message[tail_start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_message_is_unchanged() {
        let message = "the request body must be a JSON object".to_string();
        assert_eq!(bounded_message(message.clone()), message);
    }

    #[test]
    fn long_message_keeps_both_ends() {
        let message = format!("start {} end", "é".repeat(5000));
        let bounded = bounded_message(message);
        assert!(
            bounded.len() <= MAX_ERROR_MESSAGE_BYTES,
            "{}",
            bounded.len()
        );
        assert!(bounded.starts_with("start é"), "{bounded}");
        assert!(bounded.ends_with("é end"), "{bounded}");
        assert!(bounded.contains(" … "), "{bounded}");
    }
}
