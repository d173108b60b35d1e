//! Errors of `init_onnx_runtime` for files that are not a usable ONNX Runtime. This binary
//! never loads the real library, because `ort` keeps the first library a process loads.

use std::path::Path;

use llmroute_policy::runtime::{RuntimeError, init_onnx_runtime};

/// Standard locations of the C library on x86-64 Linux: a real shared library that does not
/// export `OrtGetApiBase`.
const C_LIBRARY_CANDIDATES: &[&str] = &[
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib64/libc.so.6",
    "/lib64/libc.so.6",
];

#[test]
fn other_library_is_not_onnx_runtime() {
    let library = C_LIBRARY_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no C library found at any of {C_LIBRARY_CANDIDATES:?}"));
    let error = init_onnx_runtime(library).unwrap_err();
    assert!(
        matches!(error, RuntimeError::NotOnnxRuntime { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("libc.so.6"), "{error}");
}
