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

#[derive(Debug, Clone)]
pub struct Preprocessor {
    fields: Vec<FieldSpec>,
    columns: Vec<Column>,
    /// Per categorical source: category → column index.
    one_hot: HashMap<usize, HashMap<String, usize>>,
    /// Columns taken relative to their window's mean.
    centered: Vec<usize>,
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
        Preprocessor { fields, columns, one_hot, centered }
    }

    /// The source fields a record must carry, in the order `row` expects their values.
    pub fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }

    /// F: the number of feature columns.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Writes the scaled row for `values` (finite numerics, as the NaN policy leaves them) into
    /// `out` (length F). Returns true when a categorical value was never seen in training (all
    /// of that field's one-hot columns are then 0).
    pub fn row(&self, values: &[Value], out: &mut [f32]) -> bool {
        let mut unknown = false;
        for (j, c) in self.columns.iter().enumerate() {
            let t = match (c.transform, &values[c.source]) {
                (Transform::None, Value::Num(x)) => *x,
                (Transform::Log1p, Value::Num(x)) => x.max(0.0).ln_1p(),
                (Transform::OneHot, _) => 0.0,   // set below, once per source
                (_, Value::Text(_)) => f64::NAN, // the parser never gives text for a numeric field
            };
            out[j] = ((t - c.mean) / c.std) as f32;
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
    fn centers_only_the_centered_columns_of_a_window() {
        let mut level = col("t", "t", Transform::None, None, 0.0, 1.0);
        level.window = WindowTransform::Center;
        let p = Preprocessor::from_columns(&[level, col("x", "x", Transform::None, None, 0.0, 1.0)]);
        let mut window = [10.0, 1.0, 11.0, 2.0, 15.0, 3.0]; // W = 3 rows of (t, x)
        p.finish_window(&mut window);
        assert_eq!(window, [-2.0, 1.0, -1.0, 2.0, 3.0, 3.0]);
    }
}
