//! The model in use and how it changes: the bundle a batch is windowed and scored with, the swap a
//! reload sends through the pipeline, the scorers built (and test-run) for it, and its metrics.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};

use super::{Model, Scorer};
use crate::telemetry::metrics::Metrics;
use crate::threshold::ModelThreshold;

/// The model a batch was windowed for and is scored with. Swapped by a reload; every batch
/// carries its own, so scaling, scoring and threshold always belong together.
pub struct ModelInUse {
    pub model: Model,
    /// Raw score for anomaly_score 1.0: the config's `model.threshold`, else the bundle's.
    pub threshold: f64,
}

impl ModelInUse {
    pub fn new(model: Model, configured_threshold: f64) -> ModelInUse {
        let threshold = if configured_threshold > 0.0 { configured_threshold } else { model.threshold() };
        ModelInUse { model, threshold }
    }

    /// The model's side of per-series thresholds: its threshold (after `model.threshold`), the
    /// bundle's calibration tail and false-alarm rate.
    pub fn threshold_start(&self) -> ModelThreshold {
        ModelThreshold::new(self.threshold, self.model.tail_seed(), self.model.meta.thresholds.false_alarm_rate)
    }

    /// (W, F) of the windows this model scores.
    pub fn dims(&self) -> (usize, usize) {
        (self.model.window_len(), self.model.n_features())
    }
}

/// A reload's new model: the window stage switches at a batch boundary and passes the scorers
/// on to the dispatcher in the same channel, so no batch is scored by a model it was not
/// windowed for.
pub struct ModelSwap {
    pub model: Arc<ModelInUse>,
    /// New sessions, or `None` when only the threshold changed.
    pub scorers: Option<Vec<Scorer>>,
}

/// Batch sizes of the test runs: one window, and more than one, since a graph whose output does
/// not follow its batch dimension still scores a single window right.
const TEST_BATCHES: [usize; 2] = [1, 3];

/// One session per worker, each checked against the contract (output names, dtypes and shapes)
/// with test runs at two batch sizes, so a bundle that loads but cannot score is refused at
/// start-up or reload rather than on the first batch.
pub fn build_scorers(env: &ort::environment::Environment, model: &Model, n: usize) -> Result<Vec<Scorer>> {
    let fail = |e: ort::Error| anyhow!("{}: {e}", model.onnx_path.display());
    (0..n)
        .map(|_| {
            let mut s = Scorer::new(env, model).map_err(fail)?;
            for batch in TEST_BATCHES {
                s.score(ndarray::Array3::<f32>::zeros((batch, model.window_len(), model.n_features())).view()).map_err(fail)?;
            }
            Ok(s)
        })
        .collect()
}

/// Publishes the model in use as metrics (the old label set is removed on a swap).
pub fn publish_model(metrics: &Metrics, old: Option<&ModelInUse>, new: &ModelInUse) {
    let labels = |m: &ModelInUse| {
        let meta = &m.model.meta;
        let kind = match meta.model_kind {
            crate::model::ModelKind::ConvAe => "conv_ae",
            crate::model::ModelKind::Vae => "vae",
        };
        [meta.name.clone(), kind.to_string(), meta.score_kind.clone(), meta.onnx.sha256.clone(), meta.trainer_version.clone()]
    };
    if let Some(old) = old {
        let l = labels(old);
        let _ = metrics.model_info.remove_label_values(&l.each_ref().map(String::as_str));
    }
    let l = labels(new);
    metrics.model_info.with_label_values(&l.each_ref().map(String::as_str)).set(1);
    metrics.model_threshold.set(new.threshold);
    metrics.model_loaded.set(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0));
}
