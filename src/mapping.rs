//! How the config maps record fields onto the model's source fields, checked against the model.

use anyhow::{anyhow, Result};

use crate::config::{Config, SourceKind};
use crate::model::Model;
use crate::preprocess::Preprocessor;
use crate::record::{FieldMap, TimeFormat};

/// How records are read: the model's fields under the names the config maps them to. Also
/// checks the config against the model: renamed fields and override labels must exist.
pub fn field_map(cfg: &Config, model: &Model, pre: &Preprocessor) -> Result<FieldMap> {
    let m = &cfg.mapping;
    if let Some(unknown) = m.fields.keys().find(|k| !pre.fields().iter().any(|f| &f.name == *k)) {
        return Err(anyhow!("mapping.fields.{unknown}: the model has no source field of that name"));
    }
    let bundle_ts = model.meta.preprocess.timestamp.as_ref();
    let ts_field = if m.timestamp_field.is_empty() { bundle_ts.map(|t| t.column.clone()) } else { Some(m.timestamp_field.clone()) };
    let ts_format = if m.timestamp_format.is_empty() {
        bundle_ts.map(|t| t.format.clone()).unwrap_or_else(|| "auto".into())
    } else {
        m.timestamp_format.clone()
    };
    let mut fields = pre.fields().to_vec();
    for f in &mut fields {
        if let Some(renamed) = m.fields.get(&f.name) {
            f.name = renamed.clone();
        }
    }
    let series = if cfg.source.kind == SourceKind::Kafka && cfg.kafka.series_from_key {
        Vec::new() // the key is the series
    } else if m.series_fields.is_empty() {
        model.meta.preprocess.series_columns.clone()
    } else {
        m.series_fields.clone()
    };
    for (i, o) in cfg.alert_overrides.iter().enumerate() {
        if let Some(name) = o.labels.keys().find(|name| !series.contains(name)) {
            return Err(anyhow!("alert_overrides[{i}].labels.{name}: not a series field (series fields: {series:?})"));
        }
    }
    Ok(FieldMap { timestamp: ts_field.map(|f| (f, TimeFormat::parse(&ts_format))), series, fields })
}
