//! tracing subscriber: plain or JSON lines on stderr, filtered by `ANOMALYD_LOG` (EnvFilter
//! syntax), default `warn,anomalyd=info,ort=warn` — ort logs ~100 lines per session at INFO.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub const DEFAULT_FILTER: &str = "warn,anomalyd=info,ort=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("ANOMALYD_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
