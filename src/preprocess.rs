//! Raw field values → one scaled f32 feature row (docs/model-contract.md §1), and the per-column
//! step on an assembled window (§2.5).
//!
//! Built once per model from `preprocess.columns`; [`Preprocessor::fields`] tells the record
//! parser which source fields to extract and in which order.

use std::collections::HashMap;

use crate::model::{ColumnMeta, ModelMeta, Transform, WindowTransform};
use crate::record::{FieldKind, FieldSpec, Value};

#[derive(Debug, Clone)]
struct Column {
    /// Index into the record's values (one per distinct source field).
    source: usize,
    transform: Transform,
    mean: f64,
    std: f64,
}

/// The largest scaled feature a model can take, just under √f32::MAX ≈ 1.845e19 (contract §1):
/// the scores square the scaled inputs' errors in f32, so a larger value scores inf or NaN.
pub const MAX_SCALED: f64 = 1.8e19;

impl Column {
    /// The scaled feature of a numeric value, in f64 (contract §1; the row casts it to f32).
    fn scaled(&self, x: f64) -> f64 {
        let t = match self.transform {
            Transform::Log1p => x.max(0.0).ln_1p(),
            Transform::None | Transform::OneHot => x,
        };
        (t - self.mean) / self.std
    }

    /// The raw values whose scaled feature is within ±[`MAX_SCALED`]: an interval, since scaling
    /// does not decrease (log1p of a value below 0 is that of 0).
    fn raw_range(&self) -> (f64, f64) {
        let (low, high) = (self.mean - MAX_SCALED * self.std, self.mean + MAX_SCALED * self.std);
        match self.transform {
            Transform::None | Transform::OneHot => (low, high),
            // log1p(max(x, 0)) is at least 0: every value is in range below, or none at all.
            Transform::Log1p if high < 0.0 => (f64::INFINITY, f64::NEG_INFINITY),
            Transform::Log1p => (if low <= 0.0 { f64::NEG_INFINITY } else { low.exp_m1() }, high.exp_m1()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Preprocessor {
    fields: Vec<FieldSpec>,
    columns: Vec<Column>,
    /// Per categorical source: category → column index.
    one_hot: HashMap<usize, HashMap<String, usize>>,
    /// Columns taken relative to their window's mean.
    centered: Vec<usize>,
    /// Per source field: the raw values every numeric column it feeds takes in range.
    ranges: Vec<(f64, f64)>,
}

impl Preprocessor {
    pub fn new(meta: &ModelMeta) -> Preprocessor {
        Self::from_columns(&meta.preprocess.columns)
    }

    pub fn from_columns(meta_columns: &[ColumnMeta]) -> Preprocessor {
        let mut fields: Vec<FieldSpec> = Vec::new();
        let mut columns = Vec::with_capacity(meta_columns.len());
        let mut one_hot: HashMap<usize, HashMap<String, usize>> = HashMap::new();
        for (j, c) in meta_columns.iter().enumerate() {
            let kind = if c.transform == Transform::OneHot { FieldKind::Categorical } else { FieldKind::Numeric };
            let source = match fields.iter().position(|f| f.name == c.source) {
                Some(i) => i,
                None => {
                    fields.push(FieldSpec { name: c.source.clone(), kind });
                    fields.len() - 1
                }
            };
            if let Some(category) = &c.category {
                one_hot.entry(source).or_default().insert(category.clone(), j);
            }
            columns.push(Column { source, transform: c.transform, mean: c.mean, std: c.std });
        }
        let centered = meta_columns.iter().enumerate().filter(|(_, c)| c.window == WindowTransform::Center).map(|(j, _)| j).collect();
        let mut ranges = vec![(f64::NEG_INFINITY, f64::INFINITY); fields.len()];
        for c in columns.iter().filter(|c| c.transform != Transform::OneHot) {
            let ((low, high), range) = (c.raw_range(), &mut ranges[c.source]);
            *range = (range.0.max(low), range.1.min(high));
        }
        Preprocessor { fields, columns, one_hot, centered, ranges }
    }

    /// The source fields a record must carry, in the order `row` expects their values.
    pub fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }

    /// F: the number of feature columns.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Whether `x`, a value of source field `field`, is one the model can score: finite, and every
    /// feature it feeds at most [`MAX_SCALED`] once scaled. A value that is not — a sensor's
    /// "invalid" marker such as 3e38 — is treated as a non-finite value by the NaN policy
    /// (contract §1): it would make the window's score inf or NaN.
    pub fn in_range(&self, field: usize, x: f64) -> bool {
        let (low, high) = self.ranges[field];
        x.is_finite() && low <= x && x <= high
    }

    /// Writes the scaled row for `values` (numerics [`in_range`](Self::in_range), as the NaN policy leaves them) into
    /// `out` (length F). Returns true when a categorical value was never seen in training (all
    /// of that field's one-hot columns are then 0).
    pub fn row(&self, values: &[Value], out: &mut [f32]) -> bool {
        let mut unknown = false;
        for (j, c) in self.columns.iter().enumerate() {
            out[j] = match (c.transform, &values[c.source]) {
                (Transform::OneHot, _) => c.scaled(0.0) as f32, // "not this category"; set below, once per source
                (_, Value::Num(x)) => c.scaled(*x) as f32,
                (_, Value::Text(_)) => f32::NAN, // the parser never gives text for a numeric field
            };
        }
        for (source, categories) in &self.one_hot {
            if let Value::Text(v) = &values[*source] {
                match categories.get(v.as_str()) {
                    Some(&j) => out[j] = ((1.0 - self.columns[j].mean) / self.columns[j].std) as f32,
                    None => unknown = true,
                }
            }
        }
        unknown
    }

    /// Applies the window step to one assembled `W × F` window (row-major, oldest row first):
    /// each centered column minus its mean over the window, the mean taken in f64 as the trainer does.
    pub fn finish_window(&self, window: &mut [f32]) {
        let f = self.columns.len();
        for &j in &self.centered {
            let rows = window.len() / f;
            let mean = window.iter().skip(j).step_by(f).map(|&v| f64::from(v)).sum::<f64>() / rows as f64;
            for v in window.iter_mut().skip(j).step_by(f) {
                *v = (f64::from(*v) - mean) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, source: &str, transform: Transform, category: Option<&str>, mean: f64, std: f64) -> ColumnMeta {
        ColumnMeta {
            name: name.into(),
            source: source.into(),
            transform,
            category: category.map(Into::into),
            mean,
            std,
            window: WindowTransform::None,
        }
    }

    #[test]
    fn scales_log1p_and_one_hot_columns_like_the_trainer() {
        let p = Preprocessor::from_columns(&[
            col("bytes", "bytes", Transform::Log1p, None, 1.0, 2.0),
            col("proto=tcp", "proto", Transform::OneHot, Some("tcp"), 0.0, 1.0),
            col("proto=udp", "proto", Transform::OneHot, Some("udp"), 0.0, 1.0),
            col("x", "x", Transform::None, None, 10.0, 5.0),
        ]);
        assert_eq!(p.fields().iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["bytes", "proto", "x"]);
        let mut out = [0f32; 4];
        let unknown = p.row(&[Value::Num(-3.0), Value::Text("udp".into()), Value::Num(20.0)], &mut out);
        assert_eq!(out, [-0.5, 0.0, 1.0, 2.0]);
        assert!(!unknown);
        assert!(p.row(&[Value::Num(0.0), Value::Text("icmp".into()), Value::Num(0.0)], &mut out));
        assert_eq!(&out[1..3], &[0.0, 0.0]);
    }

    #[test]
    fn a_value_whose_scaled_feature_the_model_cannot_square_is_out_of_range() {
        let p = Preprocessor::from_columns(&[
            col("x", "x", Transform::None, None, 124.8, 1.67),
            col("b", "b", Transform::Log1p, None, 1.0, 2.0),
            col("proto=tcp", "proto", Transform::OneHot, Some("tcp"), 0.0, 1.0),
        ]);
        assert!(p.in_range(0, 1e19) && p.in_range(0, -1e19));
        // 3e38 is finite in f32 even once scaled (1.8e38), but its square is not.
        assert!(!p.in_range(0, 3e38) && !p.in_range(0, -3e38) && !p.in_range(0, 1e20) && !p.in_range(0, f64::MAX));
        assert!(!p.in_range(0, f64::NAN) && !p.in_range(0, f64::INFINITY));
        // log1p keeps any finite count in range.
        assert!(p.in_range(1, f64::MAX) && p.in_range(1, -f64::MAX));
        // Squared in f32, the largest scaled value in range is finite.
        assert!(((MAX_SCALED as f32) * (MAX_SCALED as f32)).is_finite());
    }

    #[test]
    fn the_nan_policy_treats_an_out_of_range_value_as_non_finite() {
        use crate::model::NanPolicy;
        use crate::record::RawRecord;
        use crate::window::{Dropped, Outcome, WindowSpec, Windower};
        let windower = |nan_policy| {
            let spec = WindowSpec { length: 1, stride: 1, max_gap_secs: 0.0, nan_policy };
            Windower::new(spec, Preprocessor::from_columns(&[col("x", "x", Transform::None, None, 0.0, 0.5)]))
        };
        let rec = |ts: f64, x: f64| RawRecord { series: "a".into(), ts: Some(ts), values: vec![Value::Num(x)] };
        let mut out = Vec::new();
        let mut error = windower(NanPolicy::Error);
        assert_eq!(error.push(&rec(1.0, 3e38), &mut out).outcome, Outcome::Dropped(Dropped::Nan));
        // ffill: the last value in range, never the huge one.
        let mut ffill = windower(NanPolicy::Ffill);
        assert_eq!(ffill.push(&rec(1.0, 3e38), &mut out).outcome, Outcome::Dropped(Dropped::Nan));
        assert!(matches!(ffill.push(&rec(2.0, 1.0), &mut out).outcome, Outcome::Window { .. }));
        assert!(matches!(ffill.push(&rec(3.0, -3e38), &mut out).outcome, Outcome::Window { .. }));
        assert_eq!(out, [2.0, 2.0]);
    }

    #[test]
    fn centers_only_the_centered_columns_of_a_window() {
        let mut level = col("t", "t", Transform::None, None, 0.0, 1.0);
        level.window = WindowTransform::Center;
        let p = Preprocessor::from_columns(&[level, col("x", "x", Transform::None, None, 0.0, 1.0)]);
        let mut window = [10.0, 1.0, 11.0, 2.0, 15.0, 3.0]; // W = 3 rows of (t, x)
        p.finish_window(&mut window);
        assert_eq!(window, [-2.0, 1.0, -1.0, 2.0, 3.0, 3.0]);
    }
}
