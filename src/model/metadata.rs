//! `model.json`: the part of the bundle contract the daemon reads (docs/model-contract.md §5).
//!
//! Fields the daemon does not use (training config, data summary, …) are ignored, so the trainer
//! can add provenance without breaking older daemons; `schema_version` guards real changes.

use serde::Deserialize;

/// The only `schema_version` this daemon understands.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelMeta {
    pub schema_version: u32,
    pub name: String,
    pub model_kind: ModelKind,
    pub score_kind: String,
    pub onnx: OnnxMeta,
    pub window: WindowMeta,
    pub features: Vec<String>,
    pub preprocess: PreprocessMeta,
    pub thresholds: ThresholdsMeta,
    #[serde(default)]
    pub training_config: TrainingConfigMeta,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub trainer_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    ConvAe,
    Vae,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OnnxMeta {
    pub file: String,
    pub opset: u32,
    pub sha256: String,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WindowMeta {
    /// W: rows per window.
    pub length: usize,
    /// S used in training; the daemon's own stride is configured separately.
    pub stride: usize,
    /// A larger step in event time starts a new segment; 0 disables gap splitting.
    pub max_gap_secs: f64,
    pub nan_policy: NanPolicy,
}

/// What happens to a missing, NaN or infinite numeric value (contract §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// Training refused such rows; at run time the record is dropped and counted.
    Error,
    Drop,
    /// Last valid value of the feature in the same series; dropped when there is none yet.
    Ffill,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessMeta {
    pub columns: Vec<ColumnMeta>,
    pub timestamp: Option<TimestampMeta>,
    #[serde(default)]
    pub series_columns: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TimestampMeta {
    pub column: String,
    pub format: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ColumnMeta {
    pub name: String,
    pub source: String,
    pub transform: Transform,
    pub category: Option<String>,
    pub mean: f64,
    pub std: f64,
    /// What happens to the column once its window is assembled; bundles before it have none.
    #[serde(default)]
    pub window: WindowTransform,
}

/// Contract §2.5: a per-column step on the assembled window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowTransform {
    #[default]
    None,
    /// The column's values minus their mean over the window (mean in f64, result cast to f32).
    Center,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    None,
    Log1p,
    OneHot,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ThresholdsMeta {
    pub method: String,
    /// The raw score that maps to `anomaly_score = 1.0`.
    pub value: f64,
    /// The share of normal windows expected above `value` (POT's target, or the quantile's tail).
    #[serde(default)]
    pub false_alarm_rate: Option<f64>,
    /// How many out-of-sample normal windows the threshold rests on.
    #[serde(default)]
    pub calibration_windows: Option<u64>,
    #[serde(default)]
    pub source: Option<CalibrationSource>,
    /// Where a streaming threshold starts from (contract §4); absent in bundles before issue 11.
    #[serde(default)]
    pub tail: Option<TailMeta>,
}

/// The calibration scores' tail: `n` scores, the level `threshold` at quantile `level`, and the
/// excesses over it (largest first).
#[derive(Debug, Clone, Deserialize)]
pub struct TailMeta {
    pub n: u64,
    pub level: f64,
    pub threshold: f64,
    pub peaks: Vec<f64>,
}

/// Where the calibration scores came from (contract §4).
#[derive(Debug, Clone, Deserialize)]
pub struct CalibrationSource {
    /// `holdout` or `cross_fit`.
    pub kind: String,
    #[serde(default)]
    pub folds: Option<u32>,
}

impl ThresholdsMeta {
    /// For people: "1.23 (pot, false-alarm rate 0.100%, from 306 windows of 3-fold cross-fitting)".
    pub fn describe(&self) -> String {
        let mut parts = vec![self.method.clone()];
        if let Some(rate) = self.false_alarm_rate {
            parts.push(format!("false-alarm rate {:.3}%", rate * 100.0));
        }
        if let Some(n) = self.calibration_windows {
            let source = match &self.source {
                Some(CalibrationSource { kind, folds: Some(k) }) if kind == "cross_fit" => format!(" of {k}-fold cross-fitting"),
                Some(s) => format!(" ({})", s.kind),
                None => String::new(),
            };
            parts.push(format!("from {n} windows{source}"));
        }
        format!("{} ({})", self.value, parts.join(", "))
    }
}

/// The parts of the trainer's config the daemon needs: how records were read (the defaults of
/// `anomalyd score`) and how flow records were bucketed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TrainingConfigMeta {
    #[serde(default)]
    pub data: TrainingDataMeta,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrainingDataMeta {
    /// `goflow2` for flow models.
    #[serde(default)]
    pub format: String,
    #[serde(default)]
    pub flow_bucket_secs: u64,
    #[serde(default)]
    pub csv_delimiter: String,
    /// false: the CSV had no header line and `column_names` named the columns.
    #[serde(default = "yes")]
    pub csv_header: bool,
    #[serde(default)]
    pub column_names: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for TrainingDataMeta {
    fn default() -> TrainingDataMeta {
        TrainingDataMeta {
            format: String::new(),
            flow_bucket_secs: 0,
            csv_delimiter: String::new(),
            csv_header: true,
            column_names: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_say_what_they_rest_on() {
        let t: ThresholdsMeta = serde_json::from_str(
            r#"{"method": "pot", "value": 1.5, "false_alarm_rate": 0.001, "calibration_windows": 307,
                "source": {"kind": "cross_fit", "folds": 3, "epochs": 12}, "tail": {"n": 307, "level": 0.98, "threshold": 1.2, "peaks": [0.3, 0.1]}}"#,
        )
        .unwrap();
        assert_eq!(t.describe(), "1.5 (pot, false-alarm rate 0.100%, from 307 windows of 3-fold cross-fitting)");
        let old: ThresholdsMeta = serde_json::from_str(r#"{"method": "quantile", "value": 2.0}"#).unwrap();
        assert_eq!(old.describe(), "2 (quantile)");
    }
}
