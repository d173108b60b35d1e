//! The input format and the invariants of the `request_parser` fuzz target. The stable test
//! `crates/llmroute-sidecar/tests/parser_mutations.rs` includes this file as a module, so that
//! CI checks the same invariants without the nightly toolchain.
//!
//! An input is `PATH \n CONTENT-TYPE \n PREFERENCE \n BODY`: the first three newlines end the
//! path and the two header values, and the rest is the body. An empty header value means that
//! the header is absent, and missing parts are empty.

use std::sync::OnceLock;

use http::HeaderValue;
use llmroute_api::SidecarConfig;
use llmroute_sidecar::Limits;
use llmroute_sidecar::request::{
    MAX_ERROR_MESSAGE_BYTES, ParsedRequest, RequestError, RequestHead, parse_request,
};
use llmroute_sidecar::sidecar::PREFERENCE_FIELD;
use serde_json::Value;

/// The route of [`config`], which clients request to let the policy choose.
pub const ROUTE: &str = "chat";

/// One input split into what the HTTP layer hands to the parser.
#[derive(Debug)]
pub struct SplitInput<'a> {
    pub path: String,
    pub content_type: Option<HeaderValue>,
    pub preference: Option<HeaderValue>,
    pub body: &'a [u8],
}

/// Result of one checked input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A header value that hyper never produces (a control character), so the parser did not run.
    Skipped,
    /// The parser accepted the request.
    Parsed,
    /// The parser rejected the request with this metric reason.
    Rejected(&'static str),
}

/// Returns the route configuration that the inputs run against: route [`ROUTE`] with the pool
/// models `small` and `large`.
pub fn config() -> &'static SidecarConfig {
    static CONFIG: OnceLock<SidecarConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        serde_json::from_value(serde_json::json!({
            "route": ROUTE,
            "version": 1,
            "models": [
                {
                    "name": "small",
                    "endpoint": "http://127.0.0.1:9/m/small/v1",
                    "upstreamModel": "small-1",
                    "pricing": {"inputUsdPerMillionTokens": 0.1, "outputUsdPerMillionTokens": 0.2}
                },
                {
                    "name": "large",
                    "endpoint": "http://127.0.0.1:9/m/large/v1",
                    "upstreamModel": "large-1",
                    "pricing": {"inputUsdPerMillionTokens": 1.0, "outputUsdPerMillionTokens": 4.0}
                }
            ],
            "defaultPreference": {"quality": 0.7},
            "fallback": "small"
        }))
        .expect("the fuzz configuration is valid")
    })
}

/// Returns the limits that the inputs run against: the sidecar's defaults with a 64 KiB body
/// and a 256-byte prompt, so that short inputs reach the size checks too.
pub fn limits() -> Limits {
    Limits {
        max_body_bytes: 64 * 1024,
        max_prompt_bytes: 256,
        ..Limits::default()
    }
}

/// Splits `data` into path, header values and body. Returns `None` when a header value contains
/// a byte that `HeaderValue` rejects (a control character other than tab).
pub fn split_input(data: &[u8]) -> Option<SplitInput<'_>> {
    let mut parts = data.splitn(4, |&byte| byte == b'\n');
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let header = |value: Option<&[u8]>| match value {
        None | Some([]) => Some(None),
        Some(bytes) => HeaderValue::from_bytes(bytes).ok().map(Some),
    };
    let content_type = header(parts.next())?;
    let preference = header(parts.next())?;
    let body = parts.next().unwrap_or_default();
    Some(SplitInput {
        path,
        content_type,
        preference,
        body,
    })
}

/// Joins path, header values and body into one input, the inverse of [`split_input`].
pub fn join_input(path: &str, content_type: &str, preference: &str, body: &[u8]) -> Vec<u8> {
    let mut data = format!("{path}\n{content_type}\n{preference}\n").into_bytes();
    data.extend_from_slice(body);
    data
}

/// Parses `data` and checks the invariants of the parser. The error describes the first
/// invariant that failed.
///
/// - A rejection has a 4xx status and a non-empty message of at most
///   [`MAX_ERROR_MESSAGE_BYTES`] that survives the trip through the JSON error body.
/// - An accepted request's body is a JSON object that serialises and parses back unchanged
///   (an integer and a float of the same value are equal, see [`same_json`]), without the
///   preference field, whose `model` is the route or a pool model. A routed request has a
///   prompt within the prompt limit, a direct one has none.
/// - Parsing the rewritten body again, with the parsed preference in the header, gives the same
///   request, and a stream that can carry usage no longer needs it stripped.
pub fn check_input(data: &[u8]) -> Result<Outcome, String> {
    let Some(input) = split_input(data) else {
        return Ok(Outcome::Skipped);
    };
    let config = config();
    let limits = limits();
    let head = RequestHead {
        path: &input.path,
        content_type: input.content_type.as_ref(),
        preference: input.preference.as_ref(),
    };
    match parse_request(config, &limits, &head, input.body) {
        Err(error) => {
            check_error(&error)?;
            Ok(Outcome::Rejected(error.reason))
        }
        Ok(parsed) => {
            check_parsed(config, &limits, &parsed)?;
            check_reparse(config, &limits, &head, &parsed)?;
            Ok(Outcome::Parsed)
        }
    }
}

fn check_error(error: &RequestError) -> Result<(), String> {
    let message = &error.body.error.message;
    if !error.status.is_client_error() {
        return Err(format!(
            "status {} is not 4xx for {message:?}",
            error.status
        ));
    }
    if message.is_empty() {
        return Err(format!("empty error message, reason {}", error.reason));
    }
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        return Err(format!(
            "error message of {} bytes is over {MAX_ERROR_MESSAGE_BYTES}, reason {}",
            message.len(),
            error.reason
        ));
    }
    if error.reason.is_empty() {
        return Err(format!("empty metric reason for {message:?}"));
    }
    let wire: Value = serde_json::from_slice(&error.body.to_json())
        .map_err(|e| format!("the error body is not valid JSON: {e}"))?;
    if wire.pointer("/error/message").and_then(Value::as_str) != Some(message.as_str()) {
        return Err(format!(
            "the error body {wire} lost the message {message:?}"
        ));
    }
    Ok(())
}

fn check_parsed(
    config: &SidecarConfig,
    limits: &Limits,
    parsed: &ParsedRequest,
) -> Result<(), String> {
    let Some(object) = parsed.body.as_object() else {
        return Err(format!(
            "the rewritten body {} is not an object",
            parsed.body
        ));
    };
    let bytes = serde_json::to_vec(&parsed.body)
        .map_err(|e| format!("the rewritten body does not serialise: {e}"))?;
    let reread: Value = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "the rewritten body {} is not valid JSON: {e}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    if !same_json(&reread, &parsed.body) {
        return Err(format!(
            "the rewritten body changes when read back: {} became {reread}",
            parsed.body
        ));
    }
    if object.contains_key(PREFERENCE_FIELD) {
        return Err(format!("the rewritten body keeps {PREFERENCE_FIELD}"));
    }
    if object.get("model").and_then(Value::as_str) != Some(parsed.model.as_str()) {
        return Err(format!(
            "the rewritten body's model {:?} is not the parsed model {:?}",
            object.get("model"),
            parsed.model
        ));
    }
    match &parsed.prompt {
        Some(prompt) => {
            if parsed.model != config.route {
                return Err(format!(
                    "model {:?} has a prompt but is not the route",
                    parsed.model
                ));
            }
            if prompt.len() > limits.max_prompt_bytes {
                return Err(format!(
                    "prompt of {} bytes is over the limit {}",
                    prompt.len(),
                    limits.max_prompt_bytes
                ));
            }
        }
        None => {
            if config.model(&parsed.model).is_none() {
                return Err(format!(
                    "model {:?} is neither the route nor a pool model",
                    parsed.model
                ));
            }
        }
    }
    let preference = parsed.preference;
    let on_simplex = (0.0..=1.0).contains(&preference.quality)
        && (0.0..=1.0).contains(&preference.cost)
        && (preference.quality + preference.cost - 1.0).abs() <= 1e-9;
    if !on_simplex {
        return Err(format!("preference {preference} is not on the simplex"));
    }
    if object
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        != parsed.stream
    {
        return Err(format!(
            "stream flag {} does not match the body",
            parsed.stream
        ));
    }
    if parsed.strip_usage && object.get("stream_options").is_some_and(Value::is_object) {
        let include_usage = parsed.body.pointer("/stream_options/include_usage");
        if include_usage != Some(&Value::Bool(true)) {
            return Err(format!(
                "usage is stripped but stream_options.include_usage is {include_usage:?}"
            ));
        }
    }
    Ok(())
}

fn check_reparse(
    config: &SidecarConfig,
    limits: &Limits,
    head: &RequestHead<'_>,
    parsed: &ParsedRequest,
) -> Result<(), String> {
    let bytes = serde_json::to_vec(&parsed.body).expect("checked to serialise");
    let preference = HeaderValue::from_str(&parsed.preference.to_string()).map_err(|e| {
        format!(
            "preference {} is not a header value: {e}",
            parsed.preference
        )
    })?;
    let again_head = RequestHead {
        preference: Some(&preference),
        ..*head
    };
    // The rewritten body may be longer than the client's (stream_options, `1E2` written as
    // `100.0`), and the size limit applies to what clients send.
    let again_limits = Limits {
        max_body_bytes: usize::MAX,
        ..*limits
    };
    let again = parse_request(config, &again_limits, &again_head, &bytes).map_err(|e| {
        format!(
            "the rewritten body {} is rejected: {} {}",
            parsed.body, e.status, e.body.error.message
        )
    })?;
    if again.preference != parsed.preference {
        return Err(format!(
            "the preference {:?} parses back from its text form {} as {:?}",
            parsed.preference, parsed.preference, again.preference
        ));
    }
    if !same_json(&again.body, &parsed.body) {
        return Err(format!(
            "parsing the rewritten body again gives body {} instead of {}",
            again.body, parsed.body
        ));
    }
    let expected = ParsedRequest {
        strip_usage: again.strip_usage,
        preference: again.preference,
        body: again.body.clone(),
        ..parsed.clone()
    };
    if again != expected {
        return Err(format!(
            "parsing the rewritten body again gives {again:?} instead of {parsed:?}"
        ));
    }
    let usage_options_is_object = parsed
        .body
        .get("stream_options")
        .is_some_and(Value::is_object);
    if again.strip_usage && usage_options_is_object {
        return Err(format!(
            "the rewritten body {} still needs its usage stripped",
            parsed.body
        ));
    }
    Ok(())
}

/// Compares two JSON values, with a number equal to another when both are the same double.
/// serde_json's `float_roundtrip` feature, which the workspace enables, reads its own output
/// back exactly. Without it, a 17-digit number such as `1.8446744073750598e+19` could come back
/// 1 ULP away, as `1.84467440737506e+19`.
fn same_json(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(a), Value::Number(b)) if a.is_f64() || b.is_f64() => {
            let (Some(a), Some(b)) = (a.as_f64(), b.as_f64()) else {
                return false;
            };
            a == b
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(key, x)| b.get(key).is_some_and(|y| same_json(x, y)))
        }
        _ => left == right,
    }
}
