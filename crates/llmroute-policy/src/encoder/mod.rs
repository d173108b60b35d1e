//! The frozen prompt encoder: all-MiniLM-L6-v2 run through ONNX Runtime, giving one
//! L2-normalised 384-dimensional embedding per prompt, matching sentence-transformers.
//!
//! Tokenisation follows sentence-transformers: leading and trailing whitespace is stripped,
//! then BERT uncased WordPiece adds `[CLS]` and `[SEP]` and truncates to [`MAX_TOKENS`] ids.

pub mod bert;

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use ndarray::Array2;
use ort::session::Session;
use ort::value::Tensor;
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationParams};

use crate::assets::Assets;
use crate::runtime::{RuntimeError, init_onnx_runtime};

/// Maximum number of token ids per prompt, including `[CLS]` and `[SEP]`: all-MiniLM-L6-v2's
/// `max_seq_length` in `sentence_bert_config.json`. Longer prompts are truncated.
pub const MAX_TOKENS: usize = 256;
/// Length of an embedding.
pub const EMBEDDING_DIM: usize = bert::HIDDEN;

/// A failure to load or run the encoder.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("failed to read {path}: {source}; run `llmroute setup` to restore it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid tokenizer {path}: {detail}; delete it and run `llmroute setup` again")]
    Tokenizer { path: PathBuf, detail: String },
    #[error(
        "failed to tokenize the prompt starting {prefix:?}: {detail}; if {tokenizer} was changed, run `llmroute setup` to restore it"
    )]
    Tokenize {
        prefix: String,
        detail: String,
        tokenizer: PathBuf,
    },
    #[error(
        "{path} is not the prompt encoder: it has no {kind} `{name}`; delete it and run `llmroute setup` again"
    )]
    Interface {
        path: PathBuf,
        kind: &'static str,
        name: &'static str,
    },
    #[error(
        "the encoder {path} returned {count} NaN or infinite values for a batch of {batch} prompts; the file is corrupt: delete it and run `llmroute setup` again"
    )]
    NonFinite {
        path: PathBuf,
        count: usize,
        batch: usize,
    },
    #[error(
        "failed to create an ONNX Runtime session from {path}: {detail}; delete it and run `llmroute setup` again"
    )]
    Session { path: PathBuf, detail: String },
    #[error("the encoder failed on a batch of {batch} prompts of up to {tokens} tokens: {detail}")]
    Run {
        batch: usize,
        tokens: usize,
        detail: String,
    },
    #[error("the encoder returned shape {actual:?}, expected {expected:?}")]
    OutputShape {
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("invalid batch size 0; use at least 1")]
    ZeroBatchSize,
}

/// The all-MiniLM-L6-v2 encoder with its tokenizer and ONNX Runtime session.
pub struct Encoder {
    session: Session,
    tokenizer: Tokenizer,
    digest: String,
    /// `encoder.onnx` and `tokenizer.json`, named in errors.
    model_path: PathBuf,
    tokenizer_path: PathBuf,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Encoder")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// Loads ONNX Runtime, the tokenizer and `encoder.onnx` from `assets`. `threads` is the
    /// number of intra-op threads of the session (at least 1).
    pub fn load(assets: &Assets, threads: usize) -> Result<Encoder, EncoderError> {
        let environment = init_onnx_runtime(&assets.onnx_runtime)?;
        let tokenizer_bytes = read(&assets.tokenizer)?;
        let model_bytes = read(&assets.encoder)?;
        let tokenizer =
            configure_tokenizer(&tokenizer_bytes).map_err(|detail| EncoderError::Tokenizer {
                path: assets.tokenizer.clone(),
                detail,
            })?;
        let digest = encoder_digest(&model_bytes, &tokenizer_bytes);
        // ONNX Runtime reads the file itself. Handing it these 90 MB as well would keep two
        // copies of the weights alive while it builds the session, which set the process's
        // peak memory.
        drop(model_bytes);

        let session_error = |error: ort::Error| EncoderError::Session {
            path: assets.encoder.clone(),
            detail: error.to_string(),
        };
        let session = Session::builder(&environment)
            .map_err(session_error)?
            .with_intra_threads(threads.max(1))
            .map_err(|error| session_error(error.into()))?
            .with_inter_threads(1)
            .map_err(|error| session_error(error.into()))?
            .commit_from_file(&assets.encoder)
            .map_err(session_error)?;
        check_interface(&session, &assets.encoder)?;
        let mut encoder = Encoder {
            session,
            tokenizer,
            digest,
            model_path: assets.encoder.clone(),
            tokenizer_path: assets.tokenizer.clone(),
        };
        // A trial embedding at load, so that corrupt weights fail here rather than on the first
        // request (the output check in `run` rejects NaN or infinite values).
        encoder.embed("llmroute")?;
        tracing::info!(
            encoder = %assets.encoder.display(),
            digest = %encoder.digest,
            threads = threads.max(1),
            "loaded the prompt encoder"
        );
        Ok(encoder)
    }

    /// Returns the token ids the model receives for `text`: `[CLS]`, word pieces, `[SEP]`,
    /// at most [`MAX_TOKENS`] in all.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EncoderError> {
        let encoding = self
            .tokenizer
            .encode(strip_like_python(text), true)
            .map_err(|error| EncoderError::Tokenize {
                prefix: text.chars().take(40).collect(),
                detail: error.to_string(),
                tokenizer: self.tokenizer_path.clone(),
            })?;
        let ids = encoding.get_ids();
        // An id past the embedding table would fail inside ONNX Runtime's Gather with a
        // message that names neither file.
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= bert::VOCABULARY) {
            return Err(EncoderError::Tokenize {
                prefix: text.chars().take(40).collect(),
                detail: format!(
                    "token id {id} is outside the encoder's vocabulary of {} word-pieces",
                    bert::VOCABULARY
                ),
                tokenizer: self.tokenizer_path.clone(),
            });
        }
        Ok(ids.to_vec())
    }

    /// Embeds one prompt.
    pub fn embed(&mut self, text: &str) -> Result<Vec<f32>, EncoderError> {
        let ids = self.tokenize(text)?;
        let embeddings = self.run(&[ids.as_slice()])?;
        Ok(embeddings.row(0).to_vec())
    }

    /// Embeds prompts in one run, padding each to the longest in the batch. Returns
    /// `[texts.len(), EMBEDDING_DIM]`.
    pub fn embed_batch(&mut self, texts: &[&str]) -> Result<Array2<f32>, EncoderError> {
        let ids = texts
            .iter()
            .map(|text| self.tokenize(text))
            .collect::<Result<Vec<_>, _>>()?;
        let slices: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        self.run(&slices)
    }

    /// Embeds many prompts in batches of `batch_size`, grouping prompts of similar length so
    /// that little padding is computed. Returns `[texts.len(), EMBEDDING_DIM]` in input order
    /// and advances `progress` by one per prompt.
    pub fn embed_many<S: AsRef<str>>(
        &mut self,
        texts: &[S],
        batch_size: usize,
        progress: &ProgressBar,
    ) -> Result<Array2<f32>, EncoderError> {
        if batch_size == 0 {
            return Err(EncoderError::ZeroBatchSize);
        }
        let ids = texts
            .iter()
            .map(|text| self.tokenize(text.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&index| ids[index].len());

        let mut embeddings = Array2::zeros((texts.len(), EMBEDDING_DIM));
        for chunk in order.chunks(batch_size) {
            let slices: Vec<&[u32]> = chunk.iter().map(|&index| ids[index].as_slice()).collect();
            let batch = self.run(&slices)?;
            for (row, &index) in chunk.iter().enumerate() {
                embeddings.row_mut(index).assign(&batch.row(row));
            }
            progress.inc(chunk.len() as u64);
        }
        Ok(embeddings)
    }

    /// Returns a hex SHA-256 identifying this encoder: over the `encoder.onnx` bytes, the
    /// `tokenizer.json` bytes and [`MAX_TOKENS`]. Embeddings with equal digests are comparable.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Runs the model on token id sequences, padding them with id 0 and mask 0.
    fn run(&mut self, sequences: &[&[u32]]) -> Result<Array2<f32>, EncoderError> {
        let batch = sequences.len();
        if batch == 0 {
            return Ok(Array2::zeros((0, EMBEDDING_DIM)));
        }
        let length = sequences.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut input_ids = Array2::<i64>::zeros((batch, length));
        let mut attention_mask = Array2::<i64>::zeros((batch, length));
        for (row, ids) in sequences.iter().enumerate() {
            for (column, &id) in ids.iter().enumerate() {
                input_ids[[row, column]] = i64::from(id);
                attention_mask[[row, column]] = 1;
            }
        }

        let run_error = |error: ort::Error| EncoderError::Run {
            batch,
            tokens: length,
            detail: error.to_string(),
        };
        let input_ids = Tensor::from_array(input_ids).map_err(run_error)?;
        let attention_mask = Tensor::from_array(attention_mask).map_err(run_error)?;
        let outputs = self
            .session
            .run(ort::inputs![
                "input_ids" => input_ids,
                "attention_mask" => attention_mask,
            ])
            .map_err(run_error)?;
        let embedding = outputs["embedding"]
            .try_extract_array::<f32>()
            .map_err(run_error)?;
        let expected = vec![batch, EMBEDDING_DIM];
        if embedding.shape() != expected.as_slice() {
            return Err(EncoderError::OutputShape {
                actual: embedding.shape().to_vec(),
                expected,
            });
        }
        let count = embedding.iter().filter(|value| !value.is_finite()).count();
        if count > 0 {
            return Err(EncoderError::NonFinite {
                path: self.model_path.clone(),
                count,
                batch,
            });
        }
        let values: Vec<f32> = embedding.iter().copied().collect();
        Array2::from_shape_vec((batch, EMBEDDING_DIM), values).map_err(|_| {
            EncoderError::OutputShape {
                actual: embedding.shape().to_vec(),
                expected: vec![batch, EMBEDDING_DIM],
            }
        })
    }
}

/// Checks that the session has the encoder's inputs and output, so that another ONNX model in
/// `encoder.onnx`'s place is named as such rather than failing each run with ONNX Runtime's
/// message about an input name.
fn check_interface(session: &Session, path: &Path) -> Result<(), EncoderError> {
    let has = |outlets: &[ort::value::Outlet], name: &str| {
        outlets.iter().any(|outlet| outlet.name() == name)
    };
    for name in ["input_ids", "attention_mask"] {
        if !has(session.inputs(), name) {
            return Err(EncoderError::Interface {
                path: path.to_path_buf(),
                kind: "input",
                name,
            });
        }
    }
    if !has(session.outputs(), "embedding") {
        return Err(EncoderError::Interface {
            path: path.to_path_buf(),
            kind: "output",
            name: "embedding",
        });
    }
    Ok(())
}

/// Parses `tokenizer.json` and replaces its shipped settings, which are for a different use:
/// it pads every input to 128 ids and truncates at 128, while sentence-transformers runs
/// the model without padding and truncates at 256.
fn configure_tokenizer(bytes: &[u8]) -> Result<Tokenizer, String> {
    let mut tokenizer = Tokenizer::from_bytes(bytes).map_err(|error| error.to_string())?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: MAX_TOKENS,
            ..TruncationParams::default()
        }))
        .map_err(|error| error.to_string())?;
    Ok(tokenizer)
}

/// The digest [`Encoder::digest`] reports for the encoder files at these paths, computed without
/// loading ONNX Runtime (the operator records it in the policies it builds).
pub fn digest_of_files(model: &Path, tokenizer: &Path) -> std::io::Result<String> {
    Ok(encoder_digest(
        &std::fs::read(model)?,
        &std::fs::read(tokenizer)?,
    ))
}

fn encoder_digest(model: &[u8], tokenizer: &[u8]) -> String {
    let mut hasher = Sha256::new();
    // Length prefixes keep the boundary between the two files unambiguous.
    for part in [model, tokenizer] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.update(format!("max_tokens={MAX_TOKENS}").as_bytes());
    hex::encode(hasher.finalize())
}

/// Strips leading and trailing whitespace as Python's `str.strip()` does, which
/// sentence-transformers applies before tokenising. Python also counts the separators
/// U+001C..U+001F as whitespace, which Rust's `char::is_whitespace` does not.
fn strip_like_python(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

fn read(path: &Path) -> Result<Vec<u8>, EncoderError> {
    std::fs::read(path).map_err(|source| EncoderError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_matches_python_whitespace() {
        assert_eq!(strip_like_python(" \t\r\n\u{a0}text \u{1f}"), "text");
        assert_eq!(strip_like_python("\u{200b}text"), "\u{200b}text");
        assert_eq!(strip_like_python("a b"), "a b");
    }

    #[test]
    fn digest_depends_on_both_files() {
        let base = encoder_digest(b"model", b"tokenizer");
        assert_eq!(base.len(), 64);
        assert_ne!(base, encoder_digest(b"model2", b"tokenizer"));
        assert_ne!(base, encoder_digest(b"model", b"tokenizer2"));
        assert_ne!(
            encoder_digest(b"ab", b"c"),
            encoder_digest(b"a", b"bc"),
            "moving bytes between the files must change the digest"
        );
    }
}
