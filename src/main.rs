//! Composition root: CLI → command → exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "anomalyd", version, about = "Anomaly detection on metric series and network flows")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score a CSV or NDJSON file offline with a model bundle (backtests, threshold tuning).
    Score(anomalyd::backtest::ScoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Score(args) => anomalyd::backtest::run(&args).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("anomalyd: error: {error:#}");
            ExitCode::from(2)
        }
    }
}
