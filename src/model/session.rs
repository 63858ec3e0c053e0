//! One ONNX Runtime session per scoring worker.
//!
//! `Session::run` takes `&mut self`, and two single-threaded sessions score about twice as fast as
//! one session with two intra-op threads on this kind of model, so each worker owns a `Scorer`
//! built with one intra-op thread. Runs are blocking: call them off the async threads.

use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::TensorRef;

use super::Model;

/// Raw scores of a batch: `score[i]` and `feature_scores[i * F .. (i + 1) * F]` for window `i`.
#[derive(Debug, Default, Clone)]
pub struct Scores {
    pub score: Vec<f32>,
    pub feature_scores: Vec<f32>,
}

pub struct Scorer {
    session: Session,
    window: usize,
    features: usize,
}

impl Scorer {
    /// Builds the session and checks its graph against the bundle's declared shape.
    ///
    /// Returns `ort::Result` because the builder's own error type is neither `Send` nor `Sync`.
    pub fn new(env: &ort::environment::Environment, model: &Model) -> ort::Result<Scorer> {
        let session = Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)?
            .with_intra_threads(1)?
            .with_inter_threads(1)?
            .commit_from_file(&model.onnx_path)?;
        let (window, features) = (model.window_len(), model.n_features());
        let input = session.inputs().iter().find(|i| i.name() == "window");
        let shape = input.and_then(|i| i.dtype().tensor_shape()).map(|s| s.to_vec());
        match shape.as_deref() {
            Some([_, w, f]) if *w == window as i64 && *f == features as i64 => {}
            other => {
                return Err(ort::Error::new(format!(
                    "{}: input `window` has shape {other:?}, model.json says [batch, {window}, {features}]",
                    model.onnx_path.display()
                )))
            }
        }
        Ok(Scorer { session, window, features })
    }

    /// Scores `n` windows laid out contiguously as `[n, W, F]` f32 (contract §2.4).
    pub fn score(&mut self, windows: &[f32], n: usize) -> ort::Result<Scores> {
        assert_eq!(windows.len(), n * self.window * self.features, "batch buffer must hold exactly n windows");
        let input = TensorRef::from_array_view(([n, self.window, self.features], windows))?;
        let outputs = self.session.run(ort::inputs!["window" => input])?;
        let (_, score) = outputs["score"].try_extract_tensor::<f32>()?;
        let (_, feature_scores) = outputs["feature_scores"].try_extract_tensor::<f32>()?;
        Ok(Scores { score: score.to_vec(), feature_scores: feature_scores.to_vec() })
    }
}
