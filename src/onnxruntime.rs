//! Finding and loading the ONNX Runtime shared library (ort's `load-dynamic`).
//!
//! The daemon ships without ONNX Runtime inside; it loads `libonnxruntime.so.1.32.0` at start-up
//! from the first of: the configured path, `ORT_DYLIB_PATH`, next to the executable, the install
//! prefix's `lib/anomalyd/` (beside `bin/`, as `cargo install` lays it out), the package
//! location `/usr/lib/anomalyd/`, and the `.cache/onnxruntime/` of the repository the binary was
//! built from (where `scripts/fetch-onnxruntime` puts it: so the binary, and one installed with
//! `cargo install --path .`, runs from any folder) or of the working folder. A missing or too old
//! library is a start-up error that says where it looked, and what fetches it.

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
    let mut dirs = Vec::new();
    if let Some(bin) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        let prefix = bin.parent().map(|prefix| prefix.join("lib/anomalyd"));
        dirs.push(bin);
        dirs.extend(prefix);
    }
    dirs.push(PathBuf::from("/usr/lib/anomalyd"));
    dirs.push(Path::new(REPOSITORY).join(".cache/onnxruntime"));
    dirs.push(PathBuf::from(".cache/onnxruntime"));
    let mut out: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let path = dir.join(&name);
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// The repository this binary was built from.
const REPOSITORY: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime {ORT_VERSION} not found (looked at {looked}); run {REPOSITORY}/scripts/fetch-onnxruntime \
         (or put libonnxruntime.so.{ORT_VERSION} beside the binary, or set ORT_DYLIB_PATH or scoring.onnxruntime_library)"
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
