//! An on-disk cache of prompt embeddings, so that a data set is embedded once per encoder.
//!
//! A cache file is keyed by the encoder digest ([`Encoder::digest`]) and by a SHA-256 over the
//! ordered prompt texts ([`prompts_digest`]). Layout, little-endian:
//!
//! | bytes  | content                                              |
//! |--------|------------------------------------------------------|
//! | 8      | magic `LLMREMB1`                                     |
//! | 4      | embedding dimension (u32)                            |
//! | 8      | number of prompts (u64)                              |
//! | 32     | encoder digest (raw SHA-256)                         |
//! | 32     | prompts digest (raw SHA-256)                         |
//! | 4·n·d  | embeddings, row-major f32                            |
//! | 32     | SHA-256 of all preceding bytes                       |
//!
//! Files are written to a temporary name and renamed. A file that fails any check is
//! reported and recomputed, never used.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use ndarray::Array2;
use sha2::{Digest, Sha256};

use crate::assets::{AssetError, write_atomically};
use crate::encoder::{EMBEDDING_DIM, Encoder, EncoderError};

const MAGIC: &[u8; 8] = b"LLMREMB1";
const HEADER_LEN: usize = 8 + 4 + 8 + 32 + 32;
const CHECKSUM_LEN: usize = 32;
/// Prompts per encoder run when filling the cache: large enough to amortise the per-run
/// overhead, small enough that padding to the longest prompt of a batch stays cheap after
/// sorting by length.
const BATCH_SIZE: usize = 32;

/// A failure of the embedding cache.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingCacheError {
    #[error(
        "invalid cache label {label:?}: use only ASCII letters, digits, '-', '_' and '.', not starting with '.'"
    )]
    InvalidLabel { label: String },
    #[error("invalid encoder digest {digest:?}: expected 64 hex digits")]
    InvalidDigest { digest: String },
    #[error("invalid embedding cache file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("failed to read the embedding cache file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write the embedding cache file: {0}")]
    Write(#[from] AssetError),
    #[error("the embeddings to write have {actual} columns, expected {EMBEDDING_DIM}")]
    Shape { actual: usize },
    #[error(transparent)]
    Encoder(#[from] EncoderError),
}

/// Returns the embeddings of `prompts`, `[prompts.len(), EMBEDDING_DIM]`, from the cache file
/// for `label` in `cache_dir`, or embeds them with `encoder` and writes that file. A failure
/// to write the file is logged as a warning and does not fail the call.
///
/// `label` names the data set in the file name, for people browsing the folder. The cache key
/// is the pair of digests. `progress` advances by one per embedded prompt on a miss.
pub fn embed_cached(
    encoder: &mut Encoder,
    cache_dir: &Path,
    label: &str,
    prompts: &[String],
    progress: &ProgressBar,
) -> Result<Array2<f32>, EmbeddingCacheError> {
    let key = CacheKey::new(encoder.digest(), prompts)?;
    let path = cache_file_path(cache_dir, label, &key)?;
    match read_embeddings(&path, &key, prompts.len()) {
        Ok(Some(embeddings)) => {
            tracing::info!(path = %path.display(), prompts = prompts.len(), "embedding cache hit");
            progress.inc(prompts.len() as u64);
            return Ok(embeddings);
        }
        Ok(None) => {
            tracing::info!(path = %path.display(), prompts = prompts.len(), "embedding cache miss");
        }
        Err(error) => {
            tracing::warn!(%error, "ignoring the embedding cache file and embedding again");
        }
    }

    let embeddings = encoder.embed_many(prompts, BATCH_SIZE, progress)?;
    // The cache only saves later runs the embedding, so a failure to fill it is no reason
    // to fail this run.
    match store_embeddings(cache_dir, &path, &key, &embeddings) {
        Ok(()) => tracing::info!(path = %path.display(), "wrote the embedding cache file"),
        Err(error) => tracing::warn!(
            path = %path.display(),
            %error,
            "failed to write the embedding cache file; later runs embed these prompts again"
        ),
    }
    Ok(embeddings)
}

/// Creates `cache_dir` when it is missing and writes the cache file `path` in it.
fn store_embeddings(
    cache_dir: &Path,
    path: &Path,
    key: &CacheKey,
    embeddings: &Array2<f32>,
) -> Result<(), EmbeddingCacheError> {
    std::fs::create_dir_all(cache_dir).map_err(|source| AssetError::Io {
        action: "create the folder",
        path: cache_dir.to_path_buf(),
        source,
    })?;
    write_embeddings(path, key, embeddings)
}

/// The two digests a cache file is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey {
    /// Raw SHA-256 identifying the encoder.
    pub encoder: [u8; 32],
    /// Raw SHA-256 over the ordered prompt texts.
    pub prompts: [u8; 32],
}

impl CacheKey {
    /// Builds the key from an encoder digest in hex and the prompts.
    pub fn new(encoder_digest: &str, prompts: &[String]) -> Result<CacheKey, EmbeddingCacheError> {
        let invalid = || EmbeddingCacheError::InvalidDigest {
            digest: encoder_digest.to_string(),
        };
        let bytes = hex::decode(encoder_digest).map_err(|_| invalid())?;
        let encoder = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| invalid())?;
        Ok(CacheKey {
            encoder,
            prompts: prompts_digest(prompts),
        })
    }
}

/// Returns the SHA-256 over the number of prompts and each prompt's length and UTF-8 bytes,
/// in order, so that reordering, splitting or joining prompts changes it.
pub fn prompts_digest(prompts: &[String]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((prompts.len() as u64).to_le_bytes());
    for prompt in prompts {
        hasher.update((prompt.len() as u64).to_le_bytes());
        hasher.update(prompt.as_bytes());
    }
    hasher.finalize().into()
}

/// Returns the cache file path for `label` and `key`: `{label}-{prompts}-{encoder}.emb` with
/// the first 16 hex digits of each digest.
pub fn cache_file_path(
    cache_dir: &Path,
    label: &str,
    key: &CacheKey,
) -> Result<PathBuf, EmbeddingCacheError> {
    let valid = !label.is_empty()
        && !label.starts_with('.')
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(EmbeddingCacheError::InvalidLabel {
            label: label.to_string(),
        });
    }
    let prompts = hex::encode(&key.prompts[..8]);
    let encoder = hex::encode(&key.encoder[..8]);
    Ok(cache_dir.join(format!("{label}-{prompts}-{encoder}.emb")))
}

/// Reads the cache file at `path`. Returns `Ok(None)` when it does not exist and
/// [`EmbeddingCacheError::Corrupt`] when it exists but is not a valid file for `key` with
/// `count` rows of [`EMBEDDING_DIM`].
pub fn read_embeddings(
    path: &Path,
    key: &CacheKey,
    count: usize,
) -> Result<Option<Array2<f32>>, EmbeddingCacheError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EmbeddingCacheError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let corrupt = |reason: String| EmbeddingCacheError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };

    let expected_len = HEADER_LEN + count * EMBEDDING_DIM * 4 + CHECKSUM_LEN;
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(corrupt("missing the LLMREMB1 header".to_string()));
    }
    let dim = u32::from_le_bytes(bytes[8..12].try_into().expect("4-byte slice"));
    let rows = u64::from_le_bytes(bytes[12..20].try_into().expect("8-byte slice"));
    if dim as usize != EMBEDDING_DIM {
        return Err(corrupt(format!(
            "dimension {dim}, expected {EMBEDDING_DIM}"
        )));
    }
    if rows != count as u64 {
        return Err(corrupt(format!("{rows} rows, expected {count}")));
    }
    if bytes[20..52] != key.encoder {
        return Err(corrupt(format!(
            "written by encoder {}, expected {}",
            hex::encode(&bytes[20..52]),
            hex::encode(key.encoder)
        )));
    }
    if bytes[52..84] != key.prompts {
        return Err(corrupt("written for different prompts".to_string()));
    }
    if bytes.len() != expected_len {
        return Err(corrupt(format!(
            "{} bytes, expected {expected_len} (truncated or padded)",
            bytes.len()
        )));
    }
    let (content, checksum) = bytes.split_at(expected_len - CHECKSUM_LEN);
    if Sha256::digest(content).as_slice() != checksum {
        return Err(corrupt("checksum mismatch".to_string()));
    }

    let values: Vec<f32> = content[HEADER_LEN..]
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().expect("4-byte chunk")))
        .collect();
    let embeddings = Array2::from_shape_vec((count, EMBEDDING_DIM), values)
        .map_err(|error| corrupt(error.to_string()))?;
    Ok(Some(embeddings))
}

/// Writes `embeddings` for `key` to `path`, atomically.
pub fn write_embeddings(
    path: &Path,
    key: &CacheKey,
    embeddings: &Array2<f32>,
) -> Result<(), EmbeddingCacheError> {
    if embeddings.ncols() != EMBEDDING_DIM {
        return Err(EmbeddingCacheError::Shape {
            actual: embeddings.ncols(),
        });
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + embeddings.len() * 4 + CHECKSUM_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(EMBEDDING_DIM as u32).to_le_bytes());
    bytes.extend_from_slice(&(embeddings.nrows() as u64).to_le_bytes());
    bytes.extend_from_slice(&key.encoder);
    bytes.extend_from_slice(&key.prompts);
    // `iter` walks in logical row-major order whatever the memory layout.
    for value in embeddings.iter() {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    let checksum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&checksum);

    let folder = path.parent().unwrap_or(Path::new("."));
    write_atomically(folder, path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_key(prompts: &[String]) -> CacheKey {
        CacheKey::new(&"ab".repeat(32), prompts).unwrap()
    }

    fn sample_embeddings(rows: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, EMBEDDING_DIM), |(row, column)| {
            row as f32 - column as f32 / 7.0
        })
    }

    fn prompts() -> Vec<String> {
        vec![
            "first prompt".to_string(),
            "second, longer prompt".to_string(),
        ]
    }

    #[test]
    fn round_trip_returns_same_values() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = cache_file_path(folder.path(), "train", &key).unwrap();
        let embeddings = sample_embeddings(prompts.len());
        write_embeddings(&path, &key, &embeddings).unwrap();
        let read = read_embeddings(&path, &key, prompts.len()).unwrap();
        assert_eq!(read, Some(embeddings));
    }

    #[test]
    fn missing_file_is_a_miss() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = cache_file_path(folder.path(), "train", &key).unwrap();
        assert_eq!(read_embeddings(&path, &key, prompts.len()).unwrap(), None);
    }

    #[test]
    fn truncated_file_is_corrupt() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = cache_file_path(folder.path(), "train", &key).unwrap();
        write_embeddings(&path, &key, &sample_embeddings(prompts.len())).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let error = read_embeddings(&path, &key, prompts.len()).unwrap_err();
        assert!(error.to_string().contains("truncated"), "{error}");
    }

    #[test]
    fn flipped_byte_fails_checksum() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = cache_file_path(folder.path(), "train", &key).unwrap();
        write_embeddings(&path, &key, &sample_embeddings(prompts.len())).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 10] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let error = read_embeddings(&path, &key, prompts.len()).unwrap_err();
        assert!(error.to_string().contains("checksum"), "{error}");
    }

    #[test]
    fn garbage_file_is_corrupt() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = cache_file_path(folder.path(), "train", &key).unwrap();
        std::fs::write(&path, b"not an embedding file").unwrap();
        let error = read_embeddings(&path, &key, prompts.len()).unwrap_err();
        assert!(error.to_string().contains("header"), "{error}");
    }

    #[test]
    fn other_encoder_is_rejected() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = folder.path().join("shared.emb");
        write_embeddings(&path, &key, &sample_embeddings(prompts.len())).unwrap();
        let other = CacheKey::new(&"cd".repeat(32), &prompts).unwrap();
        let error = read_embeddings(&path, &other, prompts.len()).unwrap_err();
        assert!(error.to_string().contains("encoder"), "{error}");
    }

    #[test]
    fn other_prompts_are_rejected() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = folder.path().join("shared.emb");
        write_embeddings(&path, &key, &sample_embeddings(prompts.len())).unwrap();
        let reordered = vec![prompts[1].clone(), prompts[0].clone()];
        let other = sample_key(&reordered);
        let error = read_embeddings(&path, &other, prompts.len()).unwrap_err();
        assert!(error.to_string().contains("different prompts"), "{error}");
    }

    #[test]
    fn wrong_row_count_is_rejected() {
        let folder = tempfile::tempdir().unwrap();
        let prompts = prompts();
        let key = sample_key(&prompts);
        let path = folder.path().join("shared.emb");
        write_embeddings(&path, &key, &sample_embeddings(prompts.len())).unwrap();
        let error = read_embeddings(&path, &key, 3).unwrap_err();
        assert!(error.to_string().contains("expected 3"), "{error}");
    }

    #[test]
    fn prompts_digest_separates_boundaries() {
        let joined = prompts_digest(&["ab".to_string(), "c".to_string()]);
        let split = prompts_digest(&["a".to_string(), "bc".to_string()]);
        assert_ne!(joined, split);
        assert_ne!(prompts_digest(&[]), prompts_digest(&[String::new()]));
    }

    #[test]
    fn label_with_path_separator_is_rejected() {
        let key = sample_key(&prompts());
        let folder = Path::new("/tmp");
        assert!(cache_file_path(folder, "../escape", &key).is_err());
        assert!(cache_file_path(folder, "a/b", &key).is_err());
        assert!(cache_file_path(folder, "", &key).is_err());
        assert!(cache_file_path(folder, "routerbench-train_v1.2", &key).is_ok());
    }

    #[test]
    fn short_digest_is_rejected() {
        let error = CacheKey::new("abcd", &prompts()).unwrap_err();
        assert!(matches!(error, EmbeddingCacheError::InvalidDigest { .. }));
    }
}
