//! Composition root: CLI → config → tracing → runtime → command → exit code.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad configuration, bundle or input.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

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
    /// Check a config and the model bundle it names, then exit (non-zero with the reason).
    Validate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Score a CSV or NDJSON file offline with a model bundle (backtests, threshold tuning).
    Score(anomalyd::backtest::ScoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Score(args) => report(anomalyd::backtest::run(&args).map(|_| ()), 2),
        Command::Validate { config } => match Config::load(config.as_deref()) {
            Err(error) => report(Err(error.into()), 2),
            Ok(cfg) => match anomalyd::app::validate(&cfg) {
                Ok(summary) => {
                    println!("config ok: {summary}");
                    ExitCode::SUCCESS
                }
                Err(error) => report(Err(error), 2),
            },
        },
        Command::Run { config } => {
            let cfg = match Config::load(config.as_deref()) {
                Ok(cfg) => cfg,
                Err(error) => return report(Err(error.into()), 2),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(error) => return report(Err(error.into()), 1),
            };
            let result = runtime.block_on(async {
                let shutdown = CancellationToken::new();
                anomalyd::signal::spawn(shutdown.clone())?;
                anomalyd::app::run(cfg, config, shutdown).await
            });
            // A blocking read of stdin cannot be cancelled; do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            report(result, 1)
        }
    }
}

fn report(result: anyhow::Result<()>, code: u8) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("anomalyd: error: {error:#}");
            ExitCode::from(code)
        }
    }
}
