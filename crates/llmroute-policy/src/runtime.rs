//! Loading the ONNX Runtime shared library once per process.
//!
//! `ort` is built with `load-dynamic`, so no ONNX Runtime is linked in: the library that
//! `llmroute setup` extracts is opened at run time. `ort` keeps one library and one environment
//! per process, so this module loads it at most once and hands out clones of the environment
//! that every [`ort::session::Session`] is built from.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;

/// The oldest ONNX Runtime release the `ort` API level of this build (`api-31`) accepts.
pub const REQUIRED_ONNX_RUNTIME: &str = "1.31";

/// The first four bytes of every ELF file (Linux shared libraries are ELF).
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// A failure to load the ONNX Runtime library.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found at {path}: {source}; run `llmroute setup` to download it"
    )]
    NotFound {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a shared library ({detail}); point to libonnxruntime.so {REQUIRED_ONNX_RUNTIME} or newer, as installed by `llmroute setup`"
    )]
    NotALibrary { path: PathBuf, detail: String },
    #[error(
        "failed to load the shared library {path}: {detail}; check that it is libonnxruntime.so for this platform, or run `llmroute setup` again"
    )]
    LoadFailed { path: PathBuf, detail: String },
    #[error(
        "{path} is a shared library but not ONNX Runtime (it exports no valid `OrtGetApiBase`); point to libonnxruntime.so {REQUIRED_ONNX_RUNTIME} or newer"
    )]
    NotOnnxRuntime { path: PathBuf },
    #[error(
        "ONNX Runtime at {path} is version {found}, but llmroute requires {REQUIRED_ONNX_RUNTIME} or newer; run `llmroute setup` to install the pinned release"
    )]
    WrongVersion { path: PathBuf, found: String },
    #[error(
        "ONNX Runtime is already loaded from {loaded} in this process, so {requested} cannot be loaded as well; use one library per process"
    )]
    AlreadyLoaded { loaded: PathBuf, requested: PathBuf },
    #[error("failed to create the ONNX Runtime environment from {path}: {detail}")]
    Environment { path: PathBuf, detail: String },
}

/// The library loaded in this process and the environment created from it.
static LOADED: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads the ONNX Runtime library at `library` and returns the process-wide environment.
///
/// Calling it again with the same file (after resolving symbolic links) returns the same
/// environment. A different file is rejected with [`RuntimeError::AlreadyLoaded`], because
/// `ort` cannot unload or replace a library once loaded. Safe to call from several threads.
pub fn init_onnx_runtime(library: &Path) -> Result<Environment, RuntimeError> {
    let path = library
        .canonicalize()
        .map_err(|source| RuntimeError::NotFound {
            path: library.to_path_buf(),
            source,
        })?;
    // Checked before anything is loaded, so the error does not depend on what this process
    // loaded earlier.
    if !starts_with_elf_magic(&path) {
        return Err(RuntimeError::NotALibrary {
            path,
            detail: "the file does not start with the ELF header".to_string(),
        });
    }

    // A poisoned lock only means another thread panicked while holding it: the stored value
    // is still either None or a fully built environment.
    let mut loaded = LOADED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((loaded_path, environment)) = loaded.as_ref() {
        if *loaded_path == path {
            return Ok(environment.clone());
        }
        return Err(RuntimeError::AlreadyLoaded {
            loaded: loaded_path.clone(),
            requested: path,
        });
    }

    let builder = ort::init_from(&path).map_err(|error| load_error(&path, error))?;
    let environment =
        builder
            .with_name("llmroute")
            .build()
            .map_err(|error| RuntimeError::Environment {
                path: path.clone(),
                detail: error.to_string(),
            })?;
    tracing::info!(library = %path.display(), "loaded ONNX Runtime");
    *loaded = Some((path, environment.clone()));
    Ok(environment)
}

/// Maps `ort`'s load error to a [`RuntimeError`] that names the file and the fix.
fn load_error(path: &Path, error: ort::LoadDynamicError) -> RuntimeError {
    match error {
        ort::LoadDynamicError::Dlopen { error, .. } => RuntimeError::LoadFailed {
            path: path.to_path_buf(),
            detail: error.to_string(),
        },
        ort::LoadDynamicError::MissingApi { .. } | ort::LoadDynamicError::InvalidVersionString => {
            RuntimeError::NotOnnxRuntime {
                path: path.to_path_buf(),
            }
        }
        ort::LoadDynamicError::BadVersion { version_str, .. } => RuntimeError::WrongVersion {
            path: path.to_path_buf(),
            found: version_str,
        },
    }
}

fn starts_with_elf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok_and(|()| &magic == ELF_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_version_names_file_and_requirement() {
        let path = PathBuf::from("/opt/onnxruntime/libonnxruntime.so.1.30.0");
        let error = load_error(
            &path,
            ort::LoadDynamicError::BadVersion {
                version_str: "1.30.0".to_string(),
                path: path.clone(),
            },
        );
        let message = error.to_string();
        assert!(matches!(error, RuntimeError::WrongVersion { .. }));
        assert!(
            message.contains("/opt/onnxruntime/libonnxruntime.so.1.30.0"),
            "{message}"
        );
        assert!(message.contains("1.30.0"), "{message}");
        assert!(message.contains("requires 1.31 or newer"), "{message}");
    }

    #[test]
    fn missing_library_is_not_found() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("libonnxruntime.so");
        let error = init_onnx_runtime(&path).unwrap_err();
        assert!(matches!(error, RuntimeError::NotFound { .. }), "{error}");
        assert!(error.to_string().contains("llmroute setup"), "{error}");
    }

    #[test]
    fn text_file_is_not_a_library() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("libonnxruntime.so");
        std::fs::write(&path, "not a shared library\n").unwrap();
        let error = init_onnx_runtime(&path).unwrap_err();
        assert!(matches!(error, RuntimeError::NotALibrary { .. }), "{error}");
        assert!(error.to_string().contains("libonnxruntime.so"), "{error}");
    }
}
