//! Checks the Rust encoder against sentence-transformers: token ids and embeddings of 40
//! reference inputs (see `tests/data/minilm-reference/SOURCE.md`), plus batching and
//! truncation. Needs the assets from `llmroute setup` and fails, rather than skips, without.

use std::sync::{Mutex, MutexGuard, OnceLock};

use llmroute_policy::assets::{self, Assets};
use llmroute_policy::encoder::{EMBEDDING_DIM, Encoder, MAX_TOKENS};

const REFERENCE: &str = include_str!("data/minilm-reference/reference.jsonl");
/// Minimum cosine similarity to the reference embeddings. SOURCE.md expects a float32
/// implementation above 0.99999.
const MIN_COSINE: f64 = 0.9999;

/// Returns the encoder shared by all tests of this binary, because loading takes about a second.
fn encoder() -> MutexGuard<'static, Encoder> {
    static ENCODER: OnceLock<Mutex<Encoder>> = OnceLock::new();
    ENCODER
        .get_or_init(|| {
            let cache = assets::default_cache_dir().unwrap_or_else(|error| panic!("{error}"));
            let assets = Assets::locate(&cache).unwrap_or_else(|error| {
                panic!(
                    "encoder assets not found in {}: {error}\nThe example `cargo run -p llmroute-policy --example setup` also sets them up; set LLMROUTE_CACHE to use another folder.",
                    cache.display()
                )
            });
            Mutex::new(Encoder::load(&assets, 1).unwrap_or_else(|error| panic!("{error}")))
        })
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Reference {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn references() -> Vec<Reference> {
    REFERENCE
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            Reference {
                text: value["text"].as_str().unwrap().to_string(),
                token_ids: serde_json::from_value(value["token_ids"].clone()).unwrap(),
                embedding: serde_json::from_value(value["embedding"].clone()).unwrap(),
            }
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn reference_inputs_match_sentence_transformers() {
    let references = references();
    assert_eq!(references.len(), 40, "reference.jsonl should have 40 lines");
    let mut encoder = encoder();

    let mut token_mismatches = Vec::new();
    let mut worst_cosine = (f64::INFINITY, 0);
    let mut worst_difference = (0.0f32, 0);
    for (index, reference) in references.iter().enumerate() {
        let ids = encoder.tokenize(&reference.text).unwrap();
        if ids != reference.token_ids {
            token_mismatches.push(format!(
                "line {}: got {} ids {:?}..., expected {} ids {:?}...",
                index + 1,
                ids.len(),
                &ids[..ids.len().min(12)],
                reference.token_ids.len(),
                &reference.token_ids[..reference.token_ids.len().min(12)]
            ));
        }
        let embedding = encoder.embed(&reference.text).unwrap();
        assert_eq!(embedding.len(), EMBEDDING_DIM);
        let similarity = cosine(&embedding, &reference.embedding);
        if similarity < worst_cosine.0 {
            worst_cosine = (similarity, index + 1);
        }
        let difference = max_abs_difference(&embedding, &reference.embedding);
        if difference > worst_difference.0 {
            worst_difference = (difference, index + 1);
        }
    }

    println!(
        "worst cosine {:.12} (1 - cosine = {:.3e}, line {}), worst max-abs difference {:.3e} (line {}) over {} inputs",
        worst_cosine.0,
        1.0 - worst_cosine.0,
        worst_cosine.1,
        worst_difference.0,
        worst_difference.1,
        references.len()
    );
    assert!(
        token_mismatches.is_empty(),
        "token ids differ on {} inputs:\n{}",
        token_mismatches.len(),
        token_mismatches.join("\n")
    );
    assert!(
        worst_cosine.0 >= MIN_COSINE,
        "worst cosine {:.9} on line {} is below {MIN_COSINE}; worst max-abs difference {:.3e} on line {}",
        worst_cosine.0,
        worst_cosine.1,
        worst_difference.0,
        worst_difference.1
    );
}

#[test]
fn long_reference_inputs_are_truncated() {
    let references = references();
    let encoder = encoder();
    // Lines 36 and 37 have 537 and 740 word pieces before truncation.
    for line in [36, 37] {
        let ids = encoder.tokenize(&references[line - 1].text).unwrap();
        assert_eq!(ids.len(), MAX_TOKENS, "line {line}");
        assert_eq!(ids.first(), Some(&101), "line {line} starts with [CLS]");
        assert_eq!(ids.last(), Some(&102), "line {line} ends with [SEP]");
    }
}

#[test]
fn batch_equals_single_embeddings() {
    let texts = [
        "hello",
        "What is the capital of France?",
        "Write a Rust function that parses an ISO 8601 date and returns an error on invalid input.",
        "  leading and trailing spaces  ",
        "",
    ];
    let mut encoder = encoder();
    let batch = encoder.embed_batch(&texts).unwrap();
    assert_eq!(batch.dim(), (texts.len(), EMBEDDING_DIM));
    for (row, text) in texts.iter().enumerate() {
        let single = encoder.embed(text).unwrap();
        let difference = max_abs_difference(batch.row(row).as_slice().unwrap(), &single);
        assert!(
            difference <= 1e-5,
            "row {row} ({text:?}): batched and single embeddings differ by {difference:.3e}"
        );
    }
}

#[test]
fn embed_many_keeps_input_order() {
    let texts: Vec<String> = references().into_iter().map(|r| r.text).take(12).collect();
    let mut encoder = encoder();
    let progress = indicatif::ProgressBar::hidden();
    let many = encoder.embed_many(&texts, 5, &progress).unwrap();
    assert_eq!(many.dim(), (texts.len(), EMBEDDING_DIM));
    assert_eq!(progress.position(), texts.len() as u64);
    for (row, text) in texts.iter().enumerate() {
        let single = encoder.embed(text).unwrap();
        let difference = max_abs_difference(many.row(row).as_slice().unwrap(), &single);
        assert!(difference <= 1e-5, "row {row}: differs by {difference:.3e}");
    }
}

#[test]
fn ten_thousand_words_truncate_to_max() {
    let text = "lorem ipsum dolor sit amet ".repeat(2000);
    let mut encoder = encoder();
    let ids = encoder.tokenize(&text).unwrap();
    assert_eq!(ids.len(), MAX_TOKENS);
    assert_eq!(ids.last(), Some(&102), "ends with [SEP]");
    let embedding = encoder.embed(&text).unwrap();
    let norm: f32 = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
}

#[test]
fn digest_is_stable_hex() {
    let encoder = encoder();
    let digest = encoder.digest();
    assert_eq!(digest.len(), 64);
    assert!(digest.chars().all(|c| c.is_ascii_hexdigit()), "{digest}");
}

#[test]
fn second_library_path_is_rejected() {
    let cache = assets::default_cache_dir().unwrap();
    let assets = Assets::locate(&cache).unwrap();
    drop(encoder());
    let folder = tempfile::tempdir().unwrap();
    let copy = folder.path().join("libonnxruntime.so.1.31.1");
    std::fs::copy(&assets.onnx_runtime, &copy).unwrap();
    let error = llmroute_policy::runtime::init_onnx_runtime(&copy).unwrap_err();
    assert!(
        matches!(
            error,
            llmroute_policy::runtime::RuntimeError::AlreadyLoaded { .. }
        ),
        "{error}"
    );
    // The same file again is fine.
    llmroute_policy::runtime::init_onnx_runtime(&assets.onnx_runtime).unwrap();
}
