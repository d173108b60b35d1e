//! Reading token usage out of a streamed (SSE) OpenAI response while passing it through.
//!
//! When the client did not request `stream_options.include_usage`, the sidecar requests it
//! upstream and then removes what the client did not request: the last chunk, which carries
//! `usage` and no choices, and the `"usage":null` member of the other chunks.

use bytes::Bytes;

/// Token counts reported by an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Reads the `usage` object of an OpenAI response; `None` when it is absent or null.
    pub fn from_response(value: &serde_json::Value) -> Option<Self> {
        let usage = value.get("usage")?;
        Some(Self {
            prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
            completion_tokens: usage.get("completion_tokens")?.as_u64()?,
        })
    }
}

/// Maximum length of one SSE line that is scanned for usage; longer lines pass through
/// unscanned.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Incremental SSE scanner: feeds through the bytes the client gets and records the usage.
#[derive(Debug)]
pub struct UsageScanner {
    /// Whether the usage chunk and `"usage":null` members are removed.
    strip: bool,
    /// Bytes of the current incomplete line (pass-through mode) or event (strip mode).
    pending: Vec<u8>,
    /// Set when a line exceeded [`MAX_LINE_BYTES`]; the rest passes through unscanned.
    overflowed: bool,
    usage: Option<Usage>,
}

impl UsageScanner {
    /// Starts a scanner; `strip` removes the usage the client did not request.
    pub fn new(strip: bool) -> Self {
        Self {
            strip,
            pending: Vec::new(),
            overflowed: false,
            usage: None,
        }
    }

    /// Returns the usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Tests whether a line was too long to scan.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Consumes one upstream chunk and returns the bytes to send to the client now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.overflowed {
            return Bytes::copy_from_slice(chunk);
        }
        if !self.strip {
            self.scan_lines(chunk);
            return Bytes::copy_from_slice(chunk);
        }
        self.pending.extend_from_slice(chunk);
        let mut output = Vec::new();
        // An event ends at a blank line; `\r\n` line ends are accepted too.
        while let Some(end) = find_event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            if event.len() > MAX_LINE_BYTES {
                self.overflowed = true;
                output.extend_from_slice(&event);
                output.append(&mut self.pending);
                return Bytes::from(output);
            }
            if let Some(kept) = self.filter_event(&event) {
                output.extend_from_slice(&kept);
            }
        }
        if self.pending.len() > MAX_LINE_BYTES {
            self.overflowed = true;
            output.append(&mut self.pending);
        }
        Bytes::from(output)
    }

    /// Returns what is still held at the end of the stream (an unterminated event).
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }

    /// Scans complete lines for usage without changing anything.
    fn scan_lines(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&rest[..newline]);
            let line = std::mem::take(&mut self.pending);
            if line.len() > MAX_LINE_BYTES {
                self.overflowed = true;
                return;
            }
            self.record_usage(&line);
            rest = &rest[newline + 1..];
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > MAX_LINE_BYTES {
            self.overflowed = true;
            self.pending.clear();
        }
    }

    fn record_usage(&mut self, line: &[u8]) {
        let Some(payload) = data_payload(line) else {
            return;
        };
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload)
            && let Some(usage) = Usage::from_response(&value)
        {
            self.usage = Some(usage);
        }
    }

    /// Returns the event to forward, or `None` for the usage chunk the client did not request.
    fn filter_event(&mut self, event: &[u8]) -> Option<Vec<u8>> {
        let mut kept = Vec::with_capacity(event.len());
        for line in event.split_inclusive(|&b| b == b'\n') {
            let Some(payload) = data_payload(line) else {
                kept.extend_from_slice(line);
                continue;
            };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
                kept.extend_from_slice(line);
                continue;
            };
            if let Some(usage) = Usage::from_response(&value) {
                self.usage = Some(usage);
                let no_choices = value
                    .get("choices")
                    .and_then(|c| c.as_array())
                    .is_none_or(|c| c.is_empty());
                if no_choices {
                    return None;
                }
            }
            kept.extend_from_slice(&remove_null_usage(line));
        }
        Some(kept)
    }
}

/// Finds the end (exclusive) of the first complete event: the index after its blank line.
fn find_event_end(bytes: &[u8]) -> Option<usize> {
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Returns the payload of a `data:` line, without the line end; `None` for other lines and
/// for `data: [DONE]`.
fn data_payload(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let payload = line.strip_prefix(b"data:")?;
    let payload = payload.strip_prefix(b" ").unwrap_or(payload);
    (payload != b"[DONE]").then_some(payload)
}

/// Removes a `"usage":null` member (compact or with one space after the colon) and its comma.
fn remove_null_usage(line: &[u8]) -> Vec<u8> {
    for pattern in [
        &b",\"usage\":null"[..],
        b",\"usage\": null",
        b"\"usage\":null,",
        b"\"usage\": null,",
    ] {
        if let Some(at) = line.windows(pattern.len()).position(|w| w == pattern) {
            let mut out = line[..at].to_vec();
            out.extend_from_slice(&line[at + pattern.len()..]);
            return out;
        }
    }
    line.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_USAGE: &str = concat!(
        "data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"1\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n",
        "data: [DONE]\n\n",
    );

    fn run(scanner: &mut UsageScanner, input: &str, piece: usize) -> String {
        let mut output = Vec::new();
        for chunk in input.as_bytes().chunks(piece) {
            output.extend_from_slice(&scanner.push(chunk));
        }
        output.extend_from_slice(&scanner.finish());
        String::from_utf8(output).unwrap()
    }

    #[test]
    fn strip_removes_usage_at_any_split() {
        let expected = concat!(
            "data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"1\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        for piece in [1, 2, 7, 64, WITH_USAGE.len()] {
            let mut scanner = UsageScanner::new(true);
            let output = run(&mut scanner, WITH_USAGE, piece);
            assert_eq!(output, expected, "piece size {piece}");
            let usage = scanner.usage().expect("usage found");
            assert_eq!(usage.prompt_tokens, 7);
            assert_eq!(usage.completion_tokens, 3);
        }
    }

    #[test]
    fn pass_through_keeps_bytes() {
        for piece in [1, 5, WITH_USAGE.len()] {
            let mut scanner = UsageScanner::new(false);
            let output = run(&mut scanner, WITH_USAGE, piece);
            assert_eq!(output, WITH_USAGE, "piece size {piece}");
            assert_eq!(
                scanner.usage(),
                Some(Usage {
                    prompt_tokens: 7,
                    completion_tokens: 3
                })
            );
        }
    }

    #[test]
    fn crlf_events_are_stripped() {
        let input = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\r\n\r\n";
        let mut scanner = UsageScanner::new(true);
        let output = run(&mut scanner, input, 3);
        assert_eq!(output, "data: [DONE]\r\n\r\n");
        assert_eq!(scanner.usage().map(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn long_line_passes_unscanned() {
        let long = format!("data: {}\n\n", "x".repeat(MAX_LINE_BYTES + 10));
        for strip in [false, true] {
            let mut scanner = UsageScanner::new(strip);
            let output = run(&mut scanner, &long, 4096);
            assert_eq!(output.len(), long.len(), "strip {strip}");
            assert!(scanner.overflowed(), "strip {strip}");
        }
    }
}
