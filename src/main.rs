//! Composition root: CLI → config → tracing → runtime → command → exit code.
//!
//! Exit codes: 0 success; 2 a configuration, bundle or input refused before processing (`run`,
//! `validate`, `score`); 1 any other failure (a failed task, an admin port in use).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use anomalyd::app::Refused;
use anomalyd::config::Config;
use anomalyd::telemetry::logging::{self, LogFormat};

#[derive(Parser)]
#[command(name = "anomalyd", version, about = "Anomaly detection on metric series and network flows")]
struct Cli {
    /// Log format on stderr (filter with ANOMALYD_LOG, e.g. "info" or "warn,anomalyd=debug").
    #[arg(long, value_enum, default_value = "plain", global = true, env = "ANOMALYD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// TOML config (see config/anomalyd.toml); without it, the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check what `run` would before it reads a record (config, bundle, mapping, source,
    /// outputs, admin port, Kafka clients), then exit (non-zero with the reason).
    Validate {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Check only what a reload of the running daemon would: the config and its bundle.
        #[arg(long)]
        reload: bool,
    },
    /// Score a CSV or NDJSON file offline with a model bundle (backtests, threshold tuning).
    Score(anomalyd::backtest::ScoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let config = match cli.command {
        Command::Score(args) => {
            return match anomalyd::backtest::run(&args) {
                Ok(_) => ExitCode::SUCCESS,
                Err(error) => report(&error, 2),
            }
        }
        Command::Validate { ref config, .. } | Command::Run { ref config } => config.clone(),
    };
    let cfg = match Config::load(config.as_deref()) {
        Ok(cfg) => cfg,
        Err(error) => return report(&error.into(), 2),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => return report(&error.into(), 1),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Validate { reload, .. } => {
                let summary = if reload { anomalyd::app::validate_reload(&cfg) } else { anomalyd::app::validate(&cfg).await };
                summary.map(|summary| println!("config ok: {summary}"))
            }
            _ => {
                let shutdown = CancellationToken::new();
                anomalyd::signal::spawn(shutdown.clone())?;
                anomalyd::app::run(cfg, config, shutdown).await
            }
        }
    });
    // A blocking read of stdin cannot be cancelled; do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A config, bundle or input refused before processing: 2; anything else: 1.
        Err(error) => {
            let code = if error.is::<Refused>() { 2 } else { 1 };
            report(&error, code)
        }
    }
}

fn report(error: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("anomalyd: error: {error:#}");
    ExitCode::from(code)
}
