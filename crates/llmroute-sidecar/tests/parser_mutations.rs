//! The invariants of the `request_parser` fuzz target on the stable toolchain, checked on the
//! seed corpus, on long client values and on 20 000 seeded mutations of the seeds. The
//! mutations are byte flips, cuts, duplicated keys, deep nesting, huge numbers, invalid UTF-8,
//! long strings, and other headers and paths. `scripts/fuzz` runs the same checks under
//! libFuzzer on nightly.

#[path = "../../../fuzz/src/lib.rs"]
mod fuzz_invariants;

use std::collections::BTreeMap;
use std::path::PathBuf;

use fuzz_invariants::{Outcome, ROUTE, check_input, join_input, split_input};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MUTATIONS: usize = 20_000;

/// Reads the seed corpus of the fuzz target, sorted by file name.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/request_parser");
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", folder.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("seed file"))
        })
        .collect();
    seeds.sort();
    seeds
}

/// Checks one input and fails the test with the input preview when an invariant fails or the
/// parser panics.
fn check(label: &str, data: &[u8]) -> Outcome {
    let result = std::panic::catch_unwind(|| check_input(data));
    let preview = String::from_utf8_lossy(&data[..data.len().min(600)]);
    match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(failure)) => panic!("{label}: {failure}\ninput: {preview:?}"),
        Err(_) => panic!("{label}: the parser panicked\ninput: {preview:?}"),
    }
}

#[test]
fn seed_corpus_keeps_invariants() {
    let expected = [
        ("chat-cost-header", Outcome::Parsed),
        ("chat-deep-nesting", Outcome::Rejected("json_depth")),
        ("chat-direct-model", Outcome::Parsed),
        ("chat-invalid-utf8", Outcome::Rejected("invalid_json")),
        (
            "chat-preference-garbage",
            Outcome::Rejected("invalid_preference"),
        ),
        ("chat-routed", Outcome::Parsed),
        ("chat-stream-preference-field", Outcome::Parsed),
        ("chat-stream-usage-header", Outcome::Parsed),
        ("chat-unknown-model", Outcome::Rejected("unknown_model")),
        ("completions-direct", Outcome::Parsed),
        ("completions-prompt-array", Outcome::Parsed),
        ("float-round-trip", Outcome::Parsed),
        ("numbers-and-escapes", Outcome::Parsed),
        ("text-content-type", Outcome::Rejected("content_type")),
        ("unknown-path", Outcome::Rejected("unknown_path")),
    ];
    let seeds = seeds();
    let names: Vec<&str> = seeds.iter().map(|(name, _)| name.as_str()).collect();
    let expected_names: Vec<&str> = expected.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, expected_names);
    for ((name, data), (_, outcome)) in seeds.iter().zip(expected) {
        assert_eq!(check(name, data), outcome, "{name}");
    }
}

#[test]
fn long_client_values_bound_messages() {
    let chat = "/v1/chat/completions";
    let json = "application/json";
    let long = "q".repeat(40_000);
    let messages = r#"[{"role": "user", "content": "hi"}]"#;
    let cases = [
        (
            "long unknown model",
            "",
            format!(r#"{{"model": "{long}", "messages": {messages}}}"#),
            "unknown_model",
        ),
        (
            "long preference string",
            "",
            format!(
                r#"{{"model": "{ROUTE}", "messages": {messages}, "llmroute_preference": "{long}"}}"#
            ),
            "invalid_preference",
        ),
        (
            "long preference array",
            "",
            format!(
                r#"{{"model": "{ROUTE}", "messages": {messages}, "llmroute_preference": ["{long}"]}}"#
            ),
            "invalid_preference",
        ),
        (
            "long preference key",
            "",
            format!(
                r#"{{"model": "{ROUTE}", "messages": {messages}, "llmroute_preference": {{"{long}": 1}}}}"#
            ),
            "invalid_preference",
        ),
        (
            "long preference header",
            long.as_str(),
            format!(r#"{{"model": "{ROUTE}", "messages": {messages}}}"#),
            "invalid_preference",
        ),
    ];
    for (name, preference, body, reason) in cases {
        let data = join_input(chat, json, preference, body.as_bytes());
        assert_eq!(check(name, &data), Outcome::Rejected(reason), "{name}");
    }
    let long_path = format!("/v1/{long}");
    let data = join_input(&long_path, json, "", b"{}");
    assert_eq!(check("long path", &data), Outcome::Rejected("unknown_path"));
}

/// Values spliced into bodies by the mutations.
const HUGE_NUMBERS: [&str; 10] = [
    "1e400",
    "-1e309",
    "18446744073709551616",
    "-9223372036854775809",
    "123456789012345678901234567890.5e-10",
    "1.7976931348623157e308",
    "5e-324",
    "2.2250738585072011e-308",
    "0.30000000000000004441",
    "-0",
];
const INVALID_UTF8: [&[u8]; 5] = [
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xc0\xaf",
];
const CONTENT_TYPES: [&str; 6] = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/jsonx",
    "text/plain",
    "application/json\t;x=\x7fy",
];
const PREFERENCES: [&str; 9] = [
    "",
    "quality=0.8",
    "cost=0.25",
    "quality=0.3,cost=0.7",
    "quality=NaN",
    "quality=1e400",
    "quality=0.5,quality=0.5",
    "speed=1",
    "quality=\u{e9}",
];
const PATHS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/chat/completions/",
    "",
];
const KEYS: [&str; 8] = [
    r#""model": "chat""#,
    r#""model": "small""#,
    r#""model": "gpt-4o""#,
    r#""model": null"#,
    r#""stream": true"#,
    r#""stream_options": 5"#,
    r#""llmroute_preference": {"quality": 0.25}"#,
    r#""llmroute_preference": "cost=0.9""#,
];
const PUNCTUATION: &[u8] = b"{}[]\":,\\ 0123456789.-eEtfnul\n\x00\xff";

/// Applies one random mutation to the body and, now and then, to the path or a header.
fn mutate(rng: &mut ChaCha8Rng, parts: &mut [Vec<u8>; 4]) {
    let body = &mut parts[3];
    let at = rng.random_range(0..=body.len());
    match rng.random_range(0..12) {
        0 if !body.is_empty() => {
            let index = rng.random_range(0..body.len());
            body[index] = PUNCTUATION[rng.random_range(0..PUNCTUATION.len())];
        }
        1 => body.insert(at, PUNCTUATION[rng.random_range(0..PUNCTUATION.len())]),
        2 => body.truncate(at),
        3 => {
            let end = (at + rng.random_range(1..60)).min(body.len());
            let slice = body[at..end].to_vec();
            body.splice(at..at, slice);
        }
        4 => {
            // A second key after the opening brace: duplicated keys, last one wins.
            let key = KEYS[rng.random_range(0..KEYS.len())];
            let after_brace = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
            body.splice(after_brace..after_brace, format!("{key},").into_bytes());
        }
        5 => {
            let depth = rng.random_range(55..75);
            let value = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let after_brace = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
            body.splice(
                after_brace..after_brace,
                format!(r#""deep": {value},"#).into_bytes(),
            );
        }
        6 => {
            let number = HUGE_NUMBERS[rng.random_range(0..HUGE_NUMBERS.len())];
            let after_brace = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
            body.splice(
                after_brace..after_brace,
                format!(r#""temperature": {number},"#).into_bytes(),
            );
        }
        7 => {
            let bytes = INVALID_UTF8[rng.random_range(0..INVALID_UTF8.len())];
            body.splice(at..at, bytes.iter().copied());
        }
        8 => {
            // Long text after a random quote: inside a string after an opening quote, or a
            // body over the size limit.
            let length = [300, 3_000, 70_000][rng.random_range(0..3)];
            let filler = ["x", "é", "\\u0001", "="][rng.random_range(0..4)].repeat(length);
            let quotes: Vec<usize> = (0..body.len()).filter(|&i| body[i] == b'"').collect();
            let after_quote = if quotes.is_empty() {
                0
            } else {
                quotes[rng.random_range(0..quotes.len())] + 1
            };
            body.splice(after_quote..after_quote, filler.into_bytes());
        }
        9 => parts[0] = PATHS[rng.random_range(0..PATHS.len())].as_bytes().to_vec(),
        10 => {
            parts[1] = CONTENT_TYPES[rng.random_range(0..CONTENT_TYPES.len())]
                .as_bytes()
                .to_vec()
        }
        _ => {
            let mut preference = PREFERENCES[rng.random_range(0..PREFERENCES.len())]
                .as_bytes()
                .to_vec();
            if rng.random_bool(0.1) {
                preference.push(0x80);
            }
            parts[2] = preference;
        }
    }
}

#[test]
fn mutated_seeds_keep_invariants() {
    let seeds = seeds();
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for case in 0..MUTATIONS {
        let (name, seed) = &seeds[rng.random_range(0..seeds.len())];
        let split = split_input(seed).expect("seeds have valid header values");
        let mut parts = [
            split.path.into_bytes(),
            split
                .content_type
                .map_or_else(Vec::new, |v| v.as_bytes().to_vec()),
            split
                .preference
                .map_or_else(Vec::new, |v| v.as_bytes().to_vec()),
            split.body.to_vec(),
        ];
        for _ in 0..rng.random_range(1..=4) {
            mutate(&mut rng, &mut parts);
        }
        let mut data = parts[..3].join(&b'\n');
        data.push(b'\n');
        data.extend_from_slice(&parts[3]);
        let outcome = check(&format!("case {case} from {name}"), &data);
        let label = match outcome {
            Outcome::Skipped => "skipped".to_string(),
            Outcome::Parsed => "parsed".to_string(),
            Outcome::Rejected(reason) => reason.to_string(),
        };
        *outcomes.entry(label).or_default() += 1;
    }
    // Every branch of the parser is reached, so the invariants were checked on each.
    for label in [
        "parsed",
        "unknown_path",
        "content_type",
        "body_too_large",
        "json_depth",
        "invalid_json",
        "invalid_preference",
        "missing_model",
        "unknown_model",
        "no_prompt",
    ] {
        let count = outcomes.get(label).copied().unwrap_or(0);
        assert!(count >= 20, "{label}: {count} of {MUTATIONS}: {outcomes:?}");
    }
}
