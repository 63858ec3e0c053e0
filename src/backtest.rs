//! `anomalyd score`: offline scoring of a file, for backtests and threshold tuning: CSV, NDJSON,
//! Influx line protocol, or goflow2 flow records (aggregated into per-host buckets as `run` does).
//!
//! Same parser, windows, ONNX scoring, per-series thresholds and alert policy as the daemon
//! (`--config`: its `[thresholds]`, `[alert_policy]`, `[[alert_overrides]]`, `model.threshold`);
//! every window (stride 1 unless told otherwise) becomes one output row: series, end time, raw
//! score, the series' threshold, anomaly_score (1.0 = that threshold) and the top contributing
//! features; `--alerts` also writes the alert events the daemon would have raised. Bad records
//! (a line that is not UTF-8 among them) are counted by reason and skipped; a window whose score
//! is not finite is counted and not written.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use ndarray::s;

use crate::alert::{ranked_features, Observation, Tracker, TOP_FEATURES};
use crate::config::Config;
use crate::flows::parse_flow;
use crate::judge::Judge;
use crate::model::lifecycle::ModelInUse;
use crate::model::{as_windows, Model, Scorer};
use crate::pipeline::window_stage::{flow_input, RecordInput};
use crate::preprocess::Preprocessor;
use crate::record::{line_text, CsvParser, FieldMap, LineFormat, LineParser, RawRecord, TimeFormat};
use crate::telemetry::LogEvery;
use crate::threshold::Thresholds;
use crate::window::{Outcome, WindowSpec, Windower};

/// Windows per ONNX Runtime call.
const BATCH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    Csv,
    Ndjson,
    /// InfluxDB line protocol.
    Influx,
    /// goflow2 JSON flow records (a flow model: they are aggregated into its per-host buckets).
    Goflow2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Csv,
    Ndjson,
}

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// Model bundle folder (model.json + model.onnx).
    #[arg(long)]
    pub model: PathBuf,
    /// Records to score.
    #[arg(long)]
    pub input: PathBuf,
    /// Where the scores go (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Input format (default: goflow2 for a flow model; else from the file extension: .csv/.txt =
    /// csv, .lp/.influx = influx, else ndjson).
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    #[arg(long, value_enum, default_value = "csv")]
    pub output_format: OutputFormat,
    /// CSV delimiter (default: the one the model was trained with).
    #[arg(long)]
    pub delimiter: Option<char>,
    /// Column names of a headerless CSV, comma-separated (default: as in training).
    #[arg(long, value_delimiter = ',')]
    pub columns: Option<Vec<String>>,
    /// Score every S-th window of a segment.
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Config file whose thresholds, alert policy and overrides apply, as in the daemon (default:
    /// the built-in defaults; ANOMALYD__ variables apply too).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also write the alert events the policy raises, as JSON lines (the daemon's alert events).
    #[arg(long)]
    pub alerts: Option<PathBuf>,
    /// ONNX Runtime library (default: see docs; ORT_DYLIB_PATH).
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The bundle's training input mapping: timestamp, series columns, CSV layout.
struct TrainingInput {
    map: FieldMap,
    delimiter: char,
    header: Option<Vec<String>>,
}

fn training_input(model: &Model, pre: &Preprocessor) -> TrainingInput {
    let data = &model.meta.training_config.data;
    let timestamp = model.meta.preprocess.timestamp.as_ref().map(|t| (t.column.clone(), TimeFormat::parse(&t.format)));
    let delimiter = data.csv_delimiter.chars().next().unwrap_or(',');
    let header = (!data.csv_header).then(|| data.column_names.clone());
    let map = FieldMap { timestamp, series: model.meta.preprocess.series_columns.clone(), fields: pre.fields().to_vec() };
    TrainingInput { map, delimiter, header }
}

struct ScoreWriter {
    out: Box<dyn Write>,
    format: OutputFormat,
    names: Vec<String>,
}

impl ScoreWriter {
    fn header(&mut self) -> Result<()> {
        if self.format == OutputFormat::Csv {
            writeln!(self.out, "series,end_ts,score,threshold,anomaly_score,top_features")?;
        }
        Ok(())
    }

    fn write(&mut self, series: &str, end_ts: f64, score: f32, threshold: f64, feature_scores: &[f32]) -> Result<()> {
        let top: Vec<&str> = ranked_features(feature_scores, TOP_FEATURES).into_iter().map(|j| self.names[j].as_str()).collect();
        let anomaly = score as f64 / threshold;
        match self.format {
            OutputFormat::Csv => {
                let quoted = |s: &str| if s.contains([',', '"']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
                writeln!(self.out, "{},{end_ts},{score},{threshold},{anomaly},{}", quoted(series), quoted(&top.join("|")))?
            }
            OutputFormat::Ndjson => writeln!(
                self.out,
                "{}",
                serde_json::json!({"series": series, "end_ts": end_ts, "score": score, "threshold": threshold,
                    "anomaly_score": anomaly, "top_features": top})
            )?,
        }
        Ok(())
    }
}

/// Where the alert events go (`--alerts`).
fn create(path: &Path) -> Result<Box<dyn Write>> {
    Ok(Box::new(std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?)))
}

/// Runs the whole file; returns the number of windows scored.
pub fn run(args: &ScoreArgs) -> Result<u64> {
    if args.stride == 0 {
        bail!("--stride must be >= 1");
    }
    let cfg = Config::load(args.config.as_deref())?;
    let model = Model::load(&args.model)?;
    let env = crate::onnxruntime::init(args.onnxruntime.as_deref())?;
    let mut scorer = Scorer::new(&env, &model).map_err(|e| anyhow::anyhow!("{}: {e}", model.onnx_path.display()))?;
    let pre = Preprocessor::new(&model.meta);
    let input = training_input(&model, &pre);
    let names = model.meta.features.clone();
    let spec = WindowSpec::for_model(&model, args.stride);
    let (w, f) = (model.window_len(), model.n_features());
    let mut windower = Windower::new(spec, pre);

    let file = std::fs::File::open(&args.input).with_context(|| format!("{}: cannot open", args.input.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut lines = BufReader::new(file).split(b'\n');
    let series_name = args.input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let flow_model = model.meta.training_config.data.format == "goflow2";
    let format = args.format.unwrap_or(match extension(&args.input) {
        _ if flow_model => InputFormat::Goflow2,
        "csv" | "txt" => InputFormat::Csv,
        "lp" | "influx" => InputFormat::Influx,
        _ => InputFormat::Ndjson,
    });
    let delimiter = args.delimiter.unwrap_or(input.delimiter);
    if !delimiter.is_ascii() {
        bail!("CSV delimiter {delimiter:?} is not one ASCII character (--delimiter, or the bundle's training csv_delimiter)");
    }
    let mut line_no = 0u64;
    let header = match (format, &args.columns, &input.header) {
        (InputFormat::Csv, Some(c), _) | (InputFormat::Csv, None, Some(c)) => Some(c.clone()),
        (InputFormat::Csv, None, None) => {
            line_no += 1;
            let header = line_text(lines.next().context("empty input")??).context("CSV header")?;
            Some(CsvParser::header(&header, delimiter))
        }
        _ => None,
    };
    let mut source = match format {
        InputFormat::Goflow2 => RecordInput::Flows(flow_input(&model, &cfg)?),
        InputFormat::Csv | InputFormat::Ndjson | InputFormat::Influx => {
            let line_format = match format {
                InputFormat::Csv => LineFormat::Csv,
                InputFormat::Influx => LineFormat::Influx,
                _ => LineFormat::Ndjson,
            };
            let parser = LineParser::for_format(line_format, input.map.clone(), header.as_deref(), delimiter)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
            RecordInput::Lines(parser)
        }
    };

    let sink: Box<dyn Write> = match &args.output {
        Some(path) => create(path)?,
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut alerts = args.alerts.as_deref().map(create).transpose()?;
    let mut out = ScoreWriter { out: sink, format: args.output_format, names: names.clone() };
    out.header()?;
    let rules = cfg.alert_rules(&model.meta.preprocess.series_columns);
    let in_use = ModelInUse::new(model.clone(), cfg.model.threshold);
    let mut judge = Judge {
        thresholds: Thresholds::new(cfg.thresholds.clone(), in_use.threshold_start()),
        tracker: Tracker::new(cfg.alert_policy.clone()),
    };
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(size) };
    bar.set_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {per_sec} eta {eta} {msg}")?);

    let mut batch: Vec<f32> = Vec::with_capacity(BATCH * w * f);
    let mut pending: Vec<(String, f64, f64)> = Vec::with_capacity(BATCH);
    let mut skipped: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut windows = 0u64;
    let mut non_finite = 0u64;
    let mut flush = |batch: &mut Vec<f32>, pending: &mut Vec<(String, f64, f64)>, out: &mut ScoreWriter| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let view = as_windows(batch, w, f);
        let scores = scorer.score(view).map_err(|e| anyhow::anyhow!("inference: {e}"))?;
        for (i, (series, start_ts, end_ts)) in pending.iter().enumerate() {
            if !scores.score[i].is_finite() {
                // Never a NaN row: the model overflowed on extreme input (counted, reported below).
                non_finite += 1;
                if LogEvery::due(non_finite) {
                    tracing::warn!(series = %series, window_end_ts = end_ts, count = non_finite, "Window scored non-finite; not written.");
                }
                continue;
            }
            let contributions = scores.feature_scores.row(i);
            let contributions = contributions.as_slice().expect("rows are contiguous");
            let obs = Observation {
                series,
                window_start_ts: *start_ts,
                window_end_ts: *end_ts,
                score: f64::from(scores.score[i]),
                threshold: f64::NAN,
                feature_names: &names,
                feature_scores: contributions,
                latest: view.slice(s![i, w - 1, ..]).to_slice().expect("a window's rows are contiguous"),
            };
            let judged = judge.window(&rules, obs);
            out.write(series, *end_ts, scores.score[i], judged.threshold, contributions)?;
            if let (Some(alerts), Some(event)) = (&mut alerts, judged.event) {
                writeln!(alerts, "{}", event.to_json(&model.meta.name))?;
            }
            windows += 1;
        }
        batch.clear();
        pending.clear();
        Ok(())
    };
    for line in lines {
        let line = line.with_context(|| format!("{}: read error after line {line_no}", args.input.display()))?;
        line_no += 1;
        bar.inc(line.len() as u64 + 1);
        let records = match line_text(line) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => match &mut source {
                RecordInput::Lines(parser) => match parser.parse(&line, &series_name) {
                    None => continue,
                    Some(parsed) => parsed.map(|r| vec![r]).map_err(|e| (e.reason(), e.to_string())),
                },
                RecordInput::Flows(flows) => parse_flow(&line).map_err(|e| (e.reason(), e.to_string())).and_then(|flow| flows.add(&flow)),
            },
            Err(e) => Err((e.reason(), e.to_string())),
        };
        match records {
            Ok(records) => {
                for record in records {
                    window(&mut windower, record, &mut batch, &mut pending, &mut skipped);
                }
            }
            Err((reason, error)) => {
                *skipped.entry(reason).or_default() += 1;
                tracing::debug!(line = line_no, error, "Skipped record.");
            }
        }
        if pending.len() >= BATCH {
            flush(&mut batch, &mut pending, &mut out)?;
        }
    }
    // The buckets still open are complete at the end of the input.
    if let RecordInput::Flows(flows) = &mut source {
        for record in flows.drain() {
            window(&mut windower, record, &mut batch, &mut pending, &mut skipped);
            if pending.len() >= BATCH {
                flush(&mut batch, &mut pending, &mut out)?;
            }
        }
    }
    flush(&mut batch, &mut pending, &mut out)?;
    out.out.flush()?;
    if let Some(alerts) = &mut alerts {
        alerts.flush()?;
    }
    bar.finish_and_clear();
    let skipped_text = if skipped.is_empty() { "none".to_string() } else { format!("{skipped:?}") };
    let non_finite_text =
        if non_finite > 0 { format!(", windows with a non-finite score (not written): {non_finite}") } else { String::new() };
    eprintln!("anomalyd score: {line_no} lines, {windows} windows scored, records skipped: {skipped_text}{non_finite_text}");
    Ok(windows)
}

/// Windows one record: a completed window goes to `pending` (its rows to `batch`), a dropped
/// record is counted by reason.
fn window(
    windower: &mut Windower,
    record: RawRecord,
    batch: &mut Vec<f32>,
    pending: &mut Vec<(String, f64, f64)>,
    skipped: &mut BTreeMap<&'static str, u64>,
) {
    match windower.push(&record, batch).outcome {
        Outcome::Window { start_ts, end_ts } => pending.push((record.series, start_ts, end_ts)),
        Outcome::Dropped(reason) => *skipped.entry(reason.reason()).or_default() += 1,
        Outcome::Buffered => {}
    }
}

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_same_top_features_as_an_alert_when_a_contribution_is_nan() {
        let path = std::env::temp_dir().join(format!("anomalyd-backtest-{}.csv", std::process::id()));
        let names = ["a", "b", "c", "d"].map(String::from).to_vec();
        let file = std::fs::File::create(&path).unwrap();
        let mut out = ScoreWriter { out: Box::new(file), format: OutputFormat::Csv, names };
        out.write("s", 10.0, 2.0, 1.0, &[0.1, f32::NAN, 0.5, 0.3]).unwrap();
        out.out.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "s,10,2,1,2,c|d|a\n");
        assert_eq!(ranked_features(&[0.1, f32::NAN, 0.5, 0.3], TOP_FEATURES), [2, 3, 0]);
    }
}
