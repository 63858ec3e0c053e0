//! anomalyd: per-series sliding windows scored by ONNX autoencoders and VAEs.
//!
//! # Layout
//!
//! - [`alert`]: per-series alert policy (N of M to fire, K clean to resolve, cooldown), hot-swappable
//! - [`backtest`]: `anomalyd score`, offline scoring of a file
//! - [`flows`]: goflow2 flow records → per-host, per-bucket feature rows (docs/flow-features.md)
//! - [`model`]: bundles (`model.json` + `model.onnx`), validation, one ONNX Runtime session per worker
//! - [`onnxruntime`]: finding and loading the ONNX Runtime shared library
//! - [`record`]: CSV / NDJSON payloads → raw records (series, event time, field values)
//! - [`source`]: the Kafka consumer (offsets stored only for handled records)
//! - [`preprocess`]: raw field values → scaled feature rows, exactly as the trainer
//! - [`window`]: per-series windows (order, gaps, NaN policy, stride) per docs/model-contract.md
//!
//! The contract these modules implement is docs/model-contract.md; `tests/golden.rs` proves the
//! windows and scores match the trainer's golden vectors.

pub mod admin;
pub mod alert;
pub mod app;
pub mod backtest;
pub mod config;
pub mod flows;
pub mod model;
pub mod onnxruntime;
pub mod preprocess;
pub mod record;
pub mod reload;
pub mod signal;
pub mod source;
pub mod telemetry;
pub mod window;
