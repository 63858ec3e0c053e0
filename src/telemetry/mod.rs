//! Self-observation: Prometheus metrics and log setup.

pub mod logging;
pub mod metrics;
