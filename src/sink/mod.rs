//! Outputs: alert events and window scores as JSON lines (stdout or files), and on Kafka.

pub mod kafka;

use std::io::Write;

use anyhow::{Context, Result};

use crate::config::{Config, SinkKind};

pub fn open_sink(cfg: &Config) -> Result<Box<dyn Write + Send>> {
    Ok(match cfg.alerts.sink {
        SinkKind::Stdout => Box::new(std::io::stdout()),
        SinkKind::File => Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&cfg.alerts.path)
                .with_context(|| format!("alerts.path: cannot open {}", cfg.alerts.path.display()))?,
        )),
    })
}

pub fn open_scores(cfg: &Config) -> Result<Option<Box<dyn Write + Send>>> {
    if cfg.alerts.scores_path.as_os_str().is_empty() {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.alerts.scores_path)
        .with_context(|| format!("alerts.scores_path: cannot open {}", cfg.alerts.scores_path.display()))?;
    Ok(Some(Box::new(std::io::BufWriter::new(file))))
}
