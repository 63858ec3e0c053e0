//! Outputs: alert events and window scores as JSON lines (stdout or files), and on Kafka.

pub mod kafka;

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::error;

use crate::config::{Config, SinkKind};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::LogEvery;

/// One JSON object per line. A write or flush that fails is counted in
/// `errors_total{stage="alert", error_type=<kind>}` and logged at a limited rate: a full disk
/// must not stop scoring, nor write a log line per window.
pub struct JsonLines {
    out: Box<dyn Write + Send>,
    /// The metric label: `sink` (alert events) or `scores_sink`.
    kind: &'static str,
    metrics: Arc<Metrics>,
    errors: LogEvery,
}

impl JsonLines {
    pub fn write(&mut self, line: &str) {
        if let Err(error) = writeln!(self.out, "{line}") {
            self.failed("write", &error);
        }
    }

    pub fn flush(&mut self) {
        if let Err(error) = self.out.flush() {
            self.failed("flush", &error);
        }
    }

    fn failed(&mut self, op: &'static str, error: &std::io::Error) {
        self.metrics.errors.with_label_values(&["alert", self.kind]).inc();
        if let Some(count) = self.errors.tick() {
            error!(%error, sink = self.kind, op, count, "JSON-lines sink failed; the line is lost.");
        }
    }
}

fn append(path: &std::path::Path, key: &str) -> Result<Box<dyn Write + Send>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{key}: cannot open {}", path.display()))?;
    Ok(Box::new(std::io::BufWriter::new(file)))
}

/// Alert events: stdout, or `output.path`.
pub fn open_sink(cfg: &Config, metrics: Arc<Metrics>) -> Result<JsonLines> {
    let out: Box<dyn Write + Send> = match cfg.output.sink {
        SinkKind::Stdout => Box::new(std::io::stdout()),
        SinkKind::File => append(&cfg.output.path, "output.path")?,
    };
    Ok(JsonLines { out, kind: "sink", metrics, errors: LogEvery::default() })
}

/// Every window's score, when `output.scores_path` is set.
pub fn open_scores(cfg: &Config, metrics: Arc<Metrics>) -> Result<Option<JsonLines>> {
    if cfg.output.scores_path.as_os_str().is_empty() {
        return Ok(None);
    }
    let out = append(&cfg.output.scores_path, "output.scores_path")?;
    Ok(Some(JsonLines { out, kind: "scores_sink", metrics, errors: LogEvery::default() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that is full.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("no space left on device"))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("no space left on device"))
        }
    }

    #[test]
    fn a_failing_sink_counts_every_lost_line_and_keeps_going() {
        let metrics = Arc::new(Metrics::new(10));
        let mut sink = JsonLines { out: Box::new(Full), kind: "scores_sink", metrics: metrics.clone(), errors: LogEvery::default() };
        for _ in 0..3 {
            sink.write("{}");
        }
        sink.flush();
        assert_eq!(metrics.errors.with_label_values(&["alert", "scores_sink"]).get(), 4);
        assert_eq!(sink.errors.tick(), None, "5th failure: the log waits for the 1001st");
    }
}
