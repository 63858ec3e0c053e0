//! The composition root of `anomalyd run` and `anomalyd validate`: builds the source, the
//! pipeline stages (`pipeline`) and the sinks from the config, wires them with channels, raises
//! readiness, and owns the drain. Nothing imports this module.
//!
//! ```text
//! source task ──lines──▶ window stage ──Batch──▶ dispatch ──(blocking) scorers──▶ alert stage ──▶ committer
//! ```
//!
//! Shutdown is a cascade: the first SIGTERM/SIGINT cancels the source; each stage finishes what
//! it holds (the window task flushes its partial batch, the dispatcher waits for in-flight
//! inference, the alert task writes and flushes) and closes its output channel, which ends the
//! next stage. The whole drain is bounded by `shutdown.drain_timeout_ms`; a second signal exits
//! at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::alert::Tracker;
use crate::config::{Config, RecordFormat, SourceKind};
use crate::judge::Judge;
use crate::mapping::field_map;
use crate::model::lifecycle::{build_scorers, publish_model, ModelInUse};
use crate::model::Model;
use crate::pipeline::alert_stage::{AlertStage, Changelog};
use crate::pipeline::commit::Committer;
use crate::pipeline::dispatch::dispatch;
use crate::pipeline::window_stage::{flow_input, RecordInput, WindowStage};
use crate::preprocess::Preprocessor;
use crate::record::{CsvParser, LineParser};
use crate::sink::kafka::KafkaSinks;
use crate::sink::{open_scores, open_sink};
use crate::source::kafka::Topics;
use crate::source::lines::read_source;
use crate::source::LINE_QUEUE;
use crate::telemetry::metrics::Metrics;
use crate::threshold::{Mode, Thresholds};
use crate::window::{WindowSpec, Windower};

/// Handled batches whose outputs are still being delivered, at most.
const COMMIT_QUEUE: usize = 1024;

/// Loads and checks everything `run` would, without starting: `anomalyd validate`. That
/// includes ONNX Runtime scoring a window with the bundle.
pub fn validate(cfg: &Config) -> Result<String> {
    let model = Model::load(&cfg.model.path)?;
    let map = field_map(cfg, &model, &Preprocessor::new(&model.meta))?;
    build_scorers(&crate::onnxruntime::init(onnxruntime_library(cfg))?, &model, 1)?;
    if cfg.source.kind == SourceKind::File && !cfg.source.path.is_file() {
        return Err(anyhow!("source.path: {} is not a readable file", cfg.source.path.display()));
    }
    Ok(format!(
        "model {} ({:?}, W={}, F={}), {} record fields, series by {:?}, time from {:?}; threshold {}",
        model.meta.name,
        model.meta.model_kind,
        model.window_len(),
        model.n_features(),
        map.fields.len(),
        map.series,
        map.timestamp.as_ref().map(|t| &t.0),
        model.meta.thresholds.describe()
    ))
}

/// `scoring.onnxruntime_library`, when set.
fn onnxruntime_library(cfg: &Config) -> Option<&Path> {
    (!cfg.scoring.onnxruntime_library.is_empty()).then(|| Path::new(&cfg.scoring.onnxruntime_library))
}

/// Starts everything and runs until the source ends and a signal arrives, or a signal drains it.
pub async fn run(cfg: Config, config_path: Option<PathBuf>, shutdown: CancellationToken) -> Result<()> {
    let model = Model::load(&cfg.model.path)?;
    let metrics = Arc::new(Metrics::new(cfg.admin.max_series_metrics));
    let env = crate::onnxruntime::init(onnxruntime_library(&cfg))?;
    let scorers = build_scorers(&env, &model, cfg.scoring.workers)?;
    let pre = Preprocessor::new(&model.meta);
    let map = field_map(&cfg, &model, &pre)?;
    let map_series = map.series.clone();
    let in_use = Arc::new(ModelInUse::new(model.clone(), cfg.model.threshold));
    publish_model(&metrics, None, &in_use);

    let (reader, default_series): (Option<Box<dyn AsyncRead + Unpin + Send>>, String) = match cfg.source.kind {
        SourceKind::File => {
            let file = tokio::fs::File::open(&cfg.source.path)
                .await
                .with_context(|| format!("source.path: cannot open {}", cfg.source.path.display()))?;
            let name = cfg.source.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (Some(Box::new(file)), name)
        }
        SourceKind::Stdin => (Some(Box::new(tokio::io::stdin())), "stdin".to_string()),
        SourceKind::Kafka => (None, cfg.kafka.topics.join(",")),
    };
    let default_series = if cfg.source.series_name.is_empty() { default_series } else { cfg.source.series_name.clone() };
    let mut reader = reader.map(BufReader::new);
    let delimiter = cfg.source.csv_delimiter.chars().next().expect("validated: one character");
    let header = match cfg.source.format {
        RecordFormat::Csv if !cfg.source.csv_columns.is_empty() => Some(cfg.source.csv_columns.clone()),
        RecordFormat::Csv if cfg.source.kind == SourceKind::File => {
            // A file's header is there now: a field it lacks is a start-up error.
            let mut first = String::new();
            let reader = reader.as_mut().expect("a file source has a reader");
            reader.read_line(&mut first).await.context("source: reading the CSV header")?;
            Some(CsvParser::header(&first, delimiter))
        }
        _ => None, // stdin: the first line is the header (Kafka CSV names its columns: validated)
    };
    let parser = cfg
        .source
        .format
        .line_format()
        .map(|format| LineParser::for_format(format, map, header.as_deref(), delimiter))
        .transpose()
        .map_err(|e| anyhow!("source: CSV header: {e}"))?;

    let listener =
        tokio::net::TcpListener::bind(cfg.admin.listen).await.with_context(|| format!("admin.listen: cannot bind {}", cfg.admin.listen))?;
    info!(address = %listener.local_addr()?, "Admin server listening.");
    let ready = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin_state = AdminState { metrics: metrics.clone(), ready: ready.clone() };
    let admin = tokio::spawn(admin::serve(listener, admin_state, cfg.admin.clone(), admin_stop.clone()));

    let spec = WindowSpec::for_model(&model, cfg.windows.stride);
    let topics = Topics::default();
    let sinks = match cfg.source.kind {
        SourceKind::Kafka => KafkaSinks::new(&cfg.kafka, topics.clone())?,
        _ => None,
    };
    let input = match parser {
        Some(parser) => RecordInput::Lines(parser),
        None => RecordInput::Flows(flow_input(&model, &cfg)?),
    };
    let windows = WindowStage::new(
        &cfg,
        input,
        default_series,
        in_use.clone(),
        Windower::with_max_series(spec, pre, cfg.windows.max_series),
        metrics.clone(),
        sinks.clone(),
    );
    let label_names = map_series.clone();
    let (rules_tx, rules_rx) = watch::channel(cfg.alert_rules(&label_names));
    let changelog = (cfg.source.kind == SourceKind::Kafka && !cfg.kafka.thresholds_topic.is_empty()).then(|| Changelog {
        kafka: cfg.kafka.clone(),
        topics: topics.clone(),
        placed: Default::default(),
    });
    let (kafka, committer) = match cfg.source.kind {
        SourceKind::Kafka => {
            let (consumer, handle) = crate::source::kafka::connect(&cfg.kafka, topics, metrics.clone())?;
            // Deep: each batch waits for its outputs' delivery (linger plus a broker round trip),
            // and a shallow queue would make that wait the pace of scoring.
            let (tx, rx) = mpsc::channel(COMMIT_QUEUE);
            let committer = Committer { handle, sinks: sinks.clone(), metrics: metrics.clone() };
            (Some(consumer), Some((tx, tokio::spawn(committer.run(rx)))))
        }
        _ => (None, None),
    };
    let (committer_tx, committer_task) = committer.unzip();
    let alerts = AlertStage {
        metrics: metrics.clone(),
        committer: committer_tx,
        rules: rules_rx,
        judge: Judge {
            thresholds: Thresholds::new(cfg.thresholds.clone(), in_use.threshold_start()),
            tracker: Tracker::new(cfg.alert_policy.clone()),
        },
        state_dir: Some(cfg.thresholds.state_dir.clone()).filter(|d| !d.as_os_str().is_empty()),
        model: in_use.clone(),
        sink: open_sink(&cfg, metrics.clone())?,
        scores: open_scores(&cfg, metrics.clone())?,
        sinks: sinks.clone(),
        save_errors: Default::default(),
        changelog,
    };

    let (line_tx, line_rx) = mpsc::channel(LINE_QUEUE);
    let (swap_tx, swap_rx) = mpsc::channel(1);
    let (batch_tx, batch_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let (scored_tx, scored_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let header_next = windows.header_next();
    let source = match (reader, kafka) {
        (Some(reader), _) => {
            tokio::spawn(read_source(reader, header_next, cfg.source.replay_rate_per_sec, line_tx, shutdown.child_token(), metrics.clone()))
        }
        (None, Some(consumer)) => tokio::spawn(consumer.run(line_tx, shutdown.child_token(), metrics.clone())),
        (None, None) => unreachable!("a source is a reader or a Kafka consumer"),
    };
    let windows_in_flight = windows.in_flight();
    let window_task = tokio::spawn(windows.run(line_rx, swap_rx, batch_tx));
    let dispatch_task = tokio::spawn(dispatch(scorers, batch_rx, scored_tx, windows_in_flight, metrics.clone()));
    let alert_task = tokio::spawn(alerts.run(scored_rx));
    let reloader = crate::reload::Reloader {
        path: config_path,
        config: cfg.clone(),
        label_names,
        model: in_use.clone(),
        env,
        metrics: metrics.clone(),
        rules: rules_tx,
        swaps: swap_tx,
    };
    let reload_task = tokio::spawn(reloader.run(shutdown.child_token()));
    ready.store(true, Ordering::Release);
    metrics.ready.set(1);
    let streaming =
        cfg.thresholds.mode != Mode::Static || cfg.alert_overrides.iter().any(|o| o.threshold_mode.is_some_and(|m| m != Mode::Static));
    if cfg.source.kind == SourceKind::Kafka && streaming && cfg.kafka.thresholds_topic.is_empty() {
        warn!("Per-series thresholds with a Kafka consumer group: a series whose partition moves to another consumer starts its threshold again there; kafka.thresholds_topic makes thresholds follow their partitions (docs/thresholds.md, \"With a Kafka consumer group\").");
    }
    info!(model = %model.meta.name, threshold = in_use.threshold, "Ready.");

    let pipeline = async {
        let _ = source.await;
        let _ = window_task.await;
        let _ = dispatch_task.await;
        let _ = alert_task.await;
        if let Some(committer) = committer_task {
            let _ = committer.await;
        }
    };
    tokio::pin!(pipeline);
    // A replay that ends keeps serving /metrics until asked to stop.
    let drained = tokio::select! {
        _ = &mut pipeline => { info!("Pipeline idle: all records scored."); shutdown.cancelled().await; true }
        _ = shutdown.cancelled() => false,
    };
    if !drained {
        info!(timeout_ms = cfg.shutdown.drain_timeout_ms, "Draining.");
        if tokio::time::timeout(cfg.shutdown.drain_timeout(), &mut pipeline).await.is_err() {
            warn!("Drain deadline passed; exiting with windows unscored.");
        }
    }
    let _ = reload_task.await;
    admin_stop.cancel();
    let _ = admin.await;
    info!("Stopped.");
    Ok(())
}
