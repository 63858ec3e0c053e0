//! Model bundles: `models/<name>/{model.onnx, model.json}` loaded, checked, and scored.
//!
//! A bundle is validated as a whole before anything uses it (schema version, the ONNX file's
//! sha256 against `model.json`, feature and scaler consistency, a positive finite threshold), so a
//! broken bundle is refused with a message naming the file and the reason, and a running daemon
//! can keep its old model.

pub mod lifecycle;
pub mod metadata;
pub mod session;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::threshold::spot::Seed;
use crate::threshold::store::Owner;

pub use metadata::{ColumnMeta, ModelKind, ModelMeta, NanPolicy, Transform, WindowTransform};
pub use session::{as_windows, Scorer, Scores};

/// Why a bundle was refused. Always names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ModelLoadError {
    pub path: PathBuf,
    pub reason: String,
}

fn refuse(path: &Path, reason: impl Into<String>) -> ModelLoadError {
    ModelLoadError { path: path.to_path_buf(), reason: reason.into() }
}

/// A validated bundle: its metadata and where its ONNX graph is.
#[derive(Debug, Clone)]
pub struct Model {
    pub dir: PathBuf,
    pub meta: ModelMeta,
    pub onnx_path: PathBuf,
    /// sha256 of `model.json` as read: a bundle is another model when either file changed.
    pub json_sha256: String,
}

impl Model {
    pub fn load(dir: impl AsRef<Path>) -> Result<Model, ModelLoadError> {
        let dir = dir.as_ref();
        let json_path = dir.join("model.json");
        let text = std::fs::read_to_string(&json_path).map_err(|e| refuse(&json_path, format!("cannot read: {e}")))?;
        let meta: ModelMeta = serde_json::from_str(&text).map_err(|e| refuse(&json_path, format!("not a valid model.json: {e}")))?;
        validate(&meta).map_err(|reason| refuse(&json_path, reason))?;

        let onnx_path = dir.join(&meta.onnx.file);
        let bytes = std::fs::read(&onnx_path).map_err(|e| refuse(&onnx_path, format!("cannot read: {e}")))?;
        let digest = format!("{:x}", Sha256::digest(&bytes));
        if digest != meta.onnx.sha256 {
            return Err(refuse(&onnx_path, format!("sha256 {digest} does not match model.json ({})", meta.onnx.sha256)));
        }
        let json_sha256 = format!("{:x}", Sha256::digest(text.as_bytes()));
        Ok(Model { dir: dir.to_path_buf(), meta, onnx_path, json_sha256 })
    }

    /// W: rows per window.
    pub fn window_len(&self) -> usize {
        self.meta.window.length
    }

    /// F: features per row.
    pub fn n_features(&self) -> usize {
        self.meta.features.len()
    }

    /// Another bundle than `other`: its graph or its `model.json` (scaling, windowing, threshold) differ.
    pub fn differs_from(&self, other: &Model) -> bool {
        self.meta.onnx.sha256 != other.meta.onnx.sha256 || self.json_sha256 != other.json_sha256 || self.dir != other.dir
    }

    pub fn threshold(&self) -> f64 {
        self.meta.thresholds.value
    }

    /// Where a streaming threshold starts from: the calibration tail (`thresholds.tail`), its
    /// peaks oldest-first as SPOT keeps them (the bundle lists them largest first, so the
    /// smallest are the first to leave a full buffer).
    pub fn tail_seed(&self) -> Option<Seed> {
        let t = self.meta.thresholds.tail.as_ref().filter(|t| !t.peaks.is_empty())?;
        Some(Seed { n: t.n, level: t.threshold, peaks: t.peaks.iter().rev().copied().collect() })
    }

    /// Whose scores these are: threshold state learnt on them is valid only for the same owner
    /// (network, score kind, input scaling).
    pub fn score_owner(&self) -> Owner {
        let m = &self.meta;
        let columns: Vec<String> =
            m.preprocess.columns.iter().map(|c| format!("{:?}", (&c.source, c.transform, &c.category, c.mean, c.std))).collect();
        let digest = Sha256::digest(columns.join("\n").as_bytes());
        Owner {
            model: m.name.clone(),
            onnx_sha256: m.onnx.sha256.clone(),
            score_kind: m.score_kind.clone(),
            scaling: format!("{digest:x}")[..16].to_string(),
        }
    }
}

fn validate(meta: &ModelMeta) -> Result<(), String> {
    if meta.schema_version != metadata::SCHEMA_VERSION {
        return Err(format!("schema_version {} is not supported (this anomalyd reads {})", meta.schema_version, metadata::SCHEMA_VERSION));
    }
    if meta.window.length == 0 || meta.window.stride == 0 {
        return Err("window.length and window.stride must be >= 1".into());
    }
    let columns = &meta.preprocess.columns;
    if columns.is_empty() || columns.len() != meta.features.len() {
        return Err(format!("features has {} names but preprocess.columns has {} entries", meta.features.len(), columns.len()));
    }
    for (c, name) in columns.iter().zip(&meta.features) {
        if &c.name != name {
            return Err(format!("preprocess column {:?} is out of order with features ({name:?})", c.name));
        }
        if !(c.std.is_finite() && c.std > 0.0 && c.mean.is_finite()) {
            return Err(format!("column {:?}: scaler mean {} / std {} is not usable", c.name, c.mean, c.std));
        }
        if (c.transform == Transform::OneHot) != c.category.is_some() {
            return Err(format!("column {:?}: a category goes with transform one_hot, and only with it", c.name));
        }
        if c.window == WindowTransform::Center && (c.transform == Transform::OneHot || meta.window.length < 2) {
            return Err(format!("column {:?}: window centering needs a numeric column and W >= 2", c.name));
        }
    }
    let t = meta.thresholds.value;
    if !(t.is_finite() && t > 0.0) {
        return Err(format!("thresholds.value {t} must be a positive number"));
    }
    let input = meta.onnx.inputs.first().ok_or("onnx.inputs is empty")?;
    if input.name != "window" || input.dtype != "float32" {
        return Err(format!("onnx input must be float32 `window`, not {} `{}`", input.dtype, input.name));
    }
    for needed in ["score", "feature_scores"] {
        if !meta.onnx.outputs.iter().any(|o| o.name == needed) {
            return Err(format!("onnx.outputs lacks `{needed}`"));
        }
    }
    Ok(())
}
