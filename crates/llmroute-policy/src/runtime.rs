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
        "{path} is not a usable shared library ({detail}); run `llmroute setup` to restore the pinned release, or point to libonnxruntime.so {REQUIRED_ONNX_RUNTIME} or newer"
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
    if let Err(detail) = check_elf_file(&path) {
        return Err(RuntimeError::NotALibrary { path, detail });
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

/// Checks that `path` is a complete 64-bit little-endian ELF file before it is loaded.
///
/// The dynamic loader maps every loadable segment of a library straight from the file. A
/// truncated library keeps its ELF header, so the loader accepts it, and the process then dies
/// of SIGBUS when it touches a page past the end of the file. Reading the program and section
/// header tables and checking that each loadable segment and the section header table lie
/// within the file turns that crash into an error.
fn check_elf_file(path: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|error| error.to_string())?;
    let size = file.metadata().map_err(|error| error.to_string())?.len();
    let mut header = [0u8; ELF64_HEADER_LEN];
    let read = file.read(&mut header).map_err(|error| error.to_string())?;
    if read < ELF_MAGIC.len() || &header[..ELF_MAGIC.len()] != ELF_MAGIC {
        return Err("the file does not start with the ELF header".to_string());
    }
    if read < ELF64_HEADER_LEN || header[4] != ELFCLASS64 || header[5] != ELFDATA2LSB {
        return Err("not a 64-bit little-endian ELF file".to_string());
    }
    let u16_at =
        |offset: usize| u64::from(u16::from_le_bytes([header[offset], header[offset + 1]]));
    let u64_at =
        |offset: usize| u64::from_le_bytes(header[offset..offset + 8].try_into().expect("8 bytes"));
    let truncated = |what: &str, end: Option<u64>| {
        format!(
            "the file is truncated: it has {size} bytes, but its {what} ends at byte {}",
            end.map_or_else(|| "past 2^64".to_string(), |end| end.to_string())
        )
    };

    // Section header table: e_shoff (0x28), e_shentsize (0x3a), e_shnum (0x3c).
    let section_end = u64_at(0x28).checked_add(u16_at(0x3a) * u16_at(0x3c));
    if section_end.is_none_or(|end| end > size) {
        return Err(truncated("section header table", section_end));
    }
    // Program header table: e_phoff (0x20), e_phentsize (0x36), e_phnum (0x38).
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let table_end = phoff.checked_add(phentsize * phnum);
    if table_end.is_none_or(|end| end > size) {
        return Err(truncated("program header table", table_end));
    }
    if phnum > 0 && phentsize < ELF64_PROGRAM_HEADER_LEN {
        return Err(format!("invalid program header size {phentsize}"));
    }
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|error| error.to_string())?;
    for entry in table.chunks_exact(phentsize as usize) {
        // p_type (0x0), p_offset (0x8), p_filesz (0x20)
        let p_type = u32::from_le_bytes(entry[0..4].try_into().expect("4 bytes"));
        if p_type != PT_LOAD {
            continue;
        }
        let offset = u64::from_le_bytes(entry[0x8..0x10].try_into().expect("8 bytes"));
        let file_size = u64::from_le_bytes(entry[0x20..0x28].try_into().expect("8 bytes"));
        let end = offset.checked_add(file_size);
        if end.is_none_or(|end| end > size) {
            return Err(truncated(
                &format!("loadable segment at byte {offset}"),
                end,
            ));
        }
    }
    Ok(())
}

/// Length of the ELF64 file header.
const ELF64_HEADER_LEN: usize = 64;
/// Length of one ELF64 program header.
const ELF64_PROGRAM_HEADER_LEN: u64 = 56;
/// `e_ident[EI_CLASS]` of a 64-bit ELF file.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]` of a little-endian ELF file.
const ELFDATA2LSB: u8 = 1;
/// `p_type` of a loadable segment.
const PT_LOAD: u32 = 1;

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

    #[test]
    fn complete_elf_file_passes() {
        // The test binary itself is a complete 64-bit little-endian ELF file.
        check_elf_file(Path::new("/proc/self/exe")).unwrap();
    }

    #[test]
    fn truncated_library_rejected_before_loading() {
        let whole = std::fs::read("/proc/self/exe").unwrap();
        let directory = tempfile::tempdir().unwrap();
        for length in [100_000, whole.len() / 2, whole.len() - 1] {
            let path = directory.path().join(format!("libonnxruntime-{length}.so"));
            std::fs::write(&path, &whole[..length]).unwrap();
            let error = init_onnx_runtime(&path).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, RuntimeError::NotALibrary { .. }),
                "{message}"
            );
            assert!(message.contains("truncated"), "{message}");
            assert!(
                message.contains(&format!("has {length} bytes")),
                "{message}"
            );
            assert!(message.contains("llmroute setup"), "{message}");
        }
    }

    #[test]
    fn thirty_two_bit_elf_is_rejected() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("libonnxruntime.so");
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(ELF_MAGIC);
        header[4] = 1; // ELFCLASS32
        header[5] = ELFDATA2LSB;
        std::fs::write(&path, &header).unwrap();
        let message = init_onnx_runtime(&path).unwrap_err().to_string();
        assert!(
            message.contains("not a 64-bit little-endian ELF file"),
            "{message}"
        );
    }
}
