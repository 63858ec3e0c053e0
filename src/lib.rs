//! anomalyd: per-series sliding windows scored by ONNX autoencoders and VAEs.
//!
//! # Layout
//!
//! By pipeline role (docs/ARCHITECTURE.md, "Modules"; dependencies point down this list's groups):
//!
//! - [`app`]: the composition root of `anomalyd run` and `validate`; nothing imports it
//! - [`reload`]: SIGHUP and file changes → validated config and model swaps
//! - [`backtest`]: `anomalyd score`, offline scoring of a file
//! - [`admin`]: HTTP `/metrics`, `/live`, `/ready`
//! - [`signal`]: OS signals → drain, quit
//! - [`supervisor`]: the daemon's tasks watched: a failed one stops the daemon (exit 1), `/live` and `/ready` false
//! - [`pipeline`]: the stages (window stage, dispatch, alert stage, committer) and what travels between them
//! - [`source`]: where lines come from (file, stdin, Kafka) and the Kafka offsets safe to store
//! - [`sink`]: where results go (JSON lines, Kafka topics)
//! - [`model`]: bundles (`model.json` + `model.onnx`), validation, sessions, the model in use
//! - [`mapping`]: record fields ↔ the model's source fields
//! - [`judge`]: a scored window → its series' threshold, anomaly_score and alert event (daemon and backtest)
//! - [`threshold`]: per-series thresholds (static, SPOT, DSPOT), their warm-up and saved state
//! - [`alert`]: per-series alert policy (N of M to fire, K clean to resolve, cooldown), hot-swappable
//! - [`window`]: per-series windows (order, gaps, NaN policy, stride) per docs/model-contract.md
//! - [`preprocess`]: raw field values → scaled feature rows, exactly as the trainer
//! - [`record`]: CSV / NDJSON / Influx payloads → raw records (series, event time, field values)
//! - [`flows`]: goflow2 flow records → per-host, per-bucket feature rows (docs/flow-features.md)
//! - [`onnxruntime`]: finding and loading the ONNX Runtime shared library
//! - [`config`]: the config tree and its layered loading
//! - [`telemetry`]: metric definitions, log setup, the log rate limit
//!
//! The contract these modules implement is docs/model-contract.md; `tests/golden.rs` proves the
//! windows and scores match the trainer's golden vectors.

pub mod admin;
pub mod alert;
pub mod app;
pub mod backtest;
pub mod config;
pub mod flows;
pub mod judge;
pub mod mapping;
pub mod model;
pub mod onnxruntime;
pub mod pipeline;
pub mod preprocess;
pub mod record;
pub mod reload;
pub mod signal;
pub mod sink;
pub mod source;
pub mod supervisor;
pub mod telemetry;
pub mod threshold;
pub mod window;
