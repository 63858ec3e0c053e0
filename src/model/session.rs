//! One ONNX Runtime session per scoring worker.
//!
//! `Session::run` takes `&mut self`, and two single-threaded sessions score about twice as fast as
//! one session with two intra-op threads on this kind of model, so each worker owns a `Scorer`
//! built with one intra-op thread. Runs are blocking: call them off the async threads.

use ndarray::{Array1, Array2, ArrayView3, Ix1, Ix2};
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::{TensorElementType, TensorRef};

use super::Model;

/// Raw scores of a batch: `score[i]` and the row `feature_scores.row(i)` for window `i`.
#[derive(Debug, Default, Clone)]
pub struct Scores {
    pub score: Array1<f32>,
    /// `[n, F]`
    pub feature_scores: Array2<f32>,
}

/// A flat buffer of whole windows, oldest row first (what the window stage appends to), as the
/// `[n, W, F]` array the model scores.
pub fn as_windows(buffer: &[f32], window: usize, features: usize) -> ArrayView3<'_, f32> {
    let n = buffer.len() / (window * features).max(1);
    ArrayView3::from_shape((n, window, features), buffer).expect("the buffer holds whole windows of W x F")
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
        for (name, rank) in [("score", 1), ("feature_scores", 2)] {
            let output = session.outputs().iter().find(|o| o.name() == name);
            let ty = output.map(|o| (o.dtype().tensor_type(), o.dtype().tensor_shape().map(|s| s.len())));
            if ty != Some((Some(TensorElementType::Float32), Some(rank))) {
                return Err(ort::Error::new(format!(
                    "{}: output `{name}` is {ty:?} (element type, rank), the contract says float32 of rank {rank}",
                    model.onnx_path.display()
                )));
            }
        }
        Ok(Scorer { session, window, features })
    }

    /// Scores a `[n, W, F]` batch of windows (contract §2.4).
    pub fn score(&mut self, windows: ArrayView3<f32>) -> ort::Result<Scores> {
        assert_eq!(&windows.shape()[1..], [self.window, self.features], "windows must be [n, W, F] of this model");
        let input = TensorRef::from_array_view(windows)?;
        let outputs = self.session.run(ort::inputs!["window" => input])?;
        let shape = |e: ndarray::ShapeError| ort::Error::new(format!("unexpected output shape: {e}"));
        let score = outputs["score"].try_extract_array::<f32>()?.into_dimensionality::<Ix1>().map_err(shape)?.to_owned();
        let feature_scores = outputs["feature_scores"].try_extract_array::<f32>()?.into_dimensionality::<Ix2>().map_err(shape)?.to_owned();
        let n = windows.shape()[0];
        if score.len() != n || feature_scores.shape() != [n, self.features] {
            return Err(ort::Error::new(format!(
                "a batch of {n} windows gave `score` of shape {:?} and `feature_scores` of shape {:?}, not [{n}] and [{n}, {}]",
                score.shape(),
                feature_scores.shape(),
                self.features
            )));
        }
        Ok(Scores { score, feature_scores })
    }
}
