//! Finding and loading the ONNX Runtime shared library (ort's `load-dynamic`).
//!
//! The daemon ships without ONNX Runtime inside; it loads `libonnxruntime.so.1.32.0` at start-up
//! from the first of: the configured path, `ORT_DYLIB_PATH`, next to the executable, the package
//! location `/usr/lib/anomalyd/`, and `.cache/onnxruntime/` (where `scripts/fetch-onnxruntime`
//! puts it). A missing or too old library is a start-up error that says where it looked.

use std::path::{Path, PathBuf};

/// The runtime version the bundles are tested with (trainer/pyproject.toml pins the same wheel).
pub const ORT_VERSION: &str = "1.32.0";

fn library_name() -> String {
    format!("libonnxruntime.so.{ORT_VERSION}")
}

/// Where to look, in order. The first existing file wins; if none exists, the first candidate is
/// used so that the error names it.
pub fn candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(path) = configured {
        return vec![path.to_path_buf()];
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return vec![PathBuf::from(path)];
    }
    let name = library_name();
    let mut out = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        out.push(dir.join(&name));
    }
    out.push(Path::new("/usr/lib/anomalyd").join(&name));
    out.push(Path::new(".cache/onnxruntime").join(&name));
    out
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime {ORT_VERSION} not found (looked at {looked}); run scripts/fetch-onnxruntime, or set \
         ORT_DYLIB_PATH or scoring.onnxruntime_library"
    )]
    NotFound { looked: String },
    #[error("ONNX Runtime at {path} cannot be used: {reason}")]
    Unusable { path: PathBuf, reason: String },
}

/// Loads the library (once per process) and builds the ONNX Runtime environment.
pub fn init(configured: Option<&Path>) -> Result<ort::environment::Environment, RuntimeError> {
    let candidates = candidates(configured);
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let looked = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(RuntimeError::NotFound { looked });
    };
    let unusable = |reason: String| RuntimeError::Unusable { path: path.clone(), reason };
    let builder = ort::init_from(path).map_err(|e| unusable(e.to_string()))?;
    builder.with_name("anomalyd").with_telemetry(false).build().map_err(|e| unusable(e.to_string()))
}
