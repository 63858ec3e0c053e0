//! Self-observation: Prometheus metrics and log setup.

pub mod logging;
pub mod metrics;

/// At most one warning per this many bad records (or failures) of a kind; the rest are counted,
/// and logged at debug.
pub const LOG_EVERY: u64 = 1000;
