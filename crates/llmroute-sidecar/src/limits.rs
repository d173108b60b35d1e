//! Limits on what a client may send: body size, JSON nesting depth, header size and count, and
//! the share of the prompt that is embedded.

use std::time::Duration;

/// Request limits of one sidecar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Maximum request body, in bytes.
    pub max_body_bytes: usize,
    /// Maximum nesting depth of arrays and objects in a request body.
    pub max_json_depth: usize,
    /// Maximum number of request headers.
    pub max_headers: usize,
    /// Maximum size of the request line and headers together, in bytes.
    pub max_header_bytes: usize,
    /// Time a client gets to send the request headers.
    pub header_read_timeout: Duration,
    /// Maximum bytes of prompt text given to the encoder, cut at a character boundary. The
    /// encoder keeps at most 256 tokens, which English text fills in well under this.
    pub max_prompt_bytes: usize,
    /// Maximum size of an upstream response body, streamed or not, in bytes.
    pub max_upstream_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            max_json_depth: 64,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            max_prompt_bytes: 16 * 1024,
            max_upstream_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Computes the maximum nesting depth of arrays and objects in `bytes`, stopping early once it
/// exceeds `limit`. Brackets inside strings do not count. The input need not be valid JSON: a
/// parser rejects it afterwards, and this scan only keeps deep nesting away from that parser.
pub fn json_depth_exceeds(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Cuts `text` to at most `max_bytes`, at a character boundary.
pub fn truncate_at_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Tests whether a `Content-Type` value is JSON: `application/json`, with optional parameters.
pub fn is_json_content_type(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_nesting_outside_strings() {
        assert!(!json_depth_exceeds(br#"{"a": [1, {"b": 2}]}"#, 3));
        assert!(json_depth_exceeds(br#"{"a": [1, {"b": 2}]}"#, 2));
        assert!(!json_depth_exceeds(br#"{"a": "[[[[[[\"[[["}"#, 1));
        let deep = "[".repeat(10_000);
        assert!(json_depth_exceeds(deep.as_bytes(), 64));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_at_char_boundary("héllo", 2), "h");
        assert_eq!(truncate_at_char_boundary("héllo", 3), "hé");
        assert_eq!(truncate_at_char_boundary("abc", 10), "abc");
    }

    #[test]
    fn content_type_accepts_parameters() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/jsonx"));
    }
}
