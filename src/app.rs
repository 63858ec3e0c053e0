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
use crate::record::{CsvParser, FieldMap, LineParser};
use crate::sink::kafka::KafkaSinks;
use crate::sink::{open_scores, open_sink, JsonLines};
use crate::source::kafka::{KafkaHandle, KafkaSource, Topics};
use crate::source::lines::read_source;
use crate::source::LINE_QUEUE;
use crate::supervisor::{Ends, Health, Tasks};
use crate::telemetry::metrics::Metrics;
use crate::threshold::{Mode, Thresholds};
use crate::window::{WindowSpec, Windower};

/// Handled batches whose outputs are still being delivered, at most.
const COMMIT_QUEUE: usize = 1024;

/// An error of the config, the bundle or the input, found before any record is processed: exit
/// code 2, which systemd does not restart on (`RestartPreventExitStatus=2`).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct Refused(anyhow::Error);

fn refused(error: impl Into<anyhow::Error>) -> anyhow::Error {
    Refused(error.into()).into()
}

/// What `run` builds before it reads a record, each part checked: `validate` builds it too.
struct Prepared {
    model: Model,
    metrics: Arc<Metrics>,
    env: ort::environment::Environment,
    scorers: Vec<crate::model::Scorer>,
    map: FieldMap,
    input: RecordInput,
    reader: Option<BufReader<Box<dyn AsyncRead + Unpin + Send>>>,
    default_series: String,
    listener: tokio::net::TcpListener,
    topics: Topics,
    sinks: Option<KafkaSinks>,
    kafka: Option<(KafkaSource, KafkaHandle)>,
    sink: JsonLines,
    scores: Option<JsonLines>,
}

/// The bundle loaded and test-run, the mapping checked against it (and against a file's CSV
/// header), the source opened, the outputs opened, the admin port bound and the Kafka clients
/// created (which checks their properties). A failure is [`Refused`], but for the admin port:
/// a port still held by the previous process is worth a restart.
async fn prepare(cfg: &Config, workers: usize) -> Result<Prepared> {
    let model = Model::load(&cfg.model.path).map_err(refused)?;
    let metrics = Arc::new(Metrics::new(cfg.admin.max_series_metrics));
    let env = crate::onnxruntime::init(onnxruntime_library(cfg)).map_err(refused)?;
    let scorers = build_scorers(&env, &model, workers).map_err(refused)?;
    let map = field_map(cfg, &model, &Preprocessor::new(&model.meta)).map_err(refused)?;

    let (reader, default_series): (Option<Box<dyn AsyncRead + Unpin + Send>>, String) = match cfg.source.kind {
        SourceKind::File => {
            let file = tokio::fs::File::open(&cfg.source.path)
                .await
                .with_context(|| format!("source.path: cannot open {}", cfg.source.path.display()))
                .map_err(refused)?;
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
            reader.read_line(&mut first).await.context("source: reading the CSV header").map_err(refused)?;
            Some(CsvParser::header(&first, delimiter))
        }
        _ => None, // stdin: the first line is the header (Kafka CSV names its columns: validated)
    };
    let input = match cfg.source.format.line_format() {
        Some(format) => RecordInput::Lines(
            LineParser::for_format(format, map.clone(), header.as_deref(), delimiter)
                .map_err(|e| refused(anyhow!("source: CSV header: {e}")))?,
        ),
        None => RecordInput::Flows(flow_input(&model, cfg).map_err(refused)?),
    };

    let listener =
        tokio::net::TcpListener::bind(cfg.admin.listen).await.with_context(|| format!("admin.listen: cannot bind {}", cfg.admin.listen))?;
    let topics = Topics::default();
    let (sinks, kafka) = match cfg.source.kind {
        SourceKind::Kafka => (
            KafkaSinks::new(&cfg.kafka, topics.clone()).map_err(refused)?,
            Some(crate::source::kafka::connect(&cfg.kafka, topics.clone(), metrics.clone()).map_err(refused)?),
        ),
        _ => (None, None),
    };
    let sink = open_sink(cfg, metrics.clone()).map_err(refused)?;
    let scores = open_scores(cfg, metrics.clone()).map_err(refused)?;
    Ok(Prepared { model, metrics, env, scorers, map, input, reader, default_series, listener, topics, sinks, kafka, sink, scores })
}

/// Checks everything `run` would before it processes a record, without starting: `anomalyd
/// validate`. That includes ONNX Runtime scoring test batches with the bundle, and opening (so
/// creating, when missing) the output files.
pub async fn validate(cfg: &Config) -> Result<String> {
    let Prepared { model, map, .. } = prepare(cfg, 1).await?;
    Ok(summary(&model, &map))
}

/// Checks what a reload of the running daemon would (`anomalyd validate --reload`, systemd's
/// `ExecReload`): the config and its bundle; the admin port, the source and the outputs stay
/// the running daemon's.
pub fn validate_reload(cfg: &Config) -> Result<String> {
    let model = Model::load(&cfg.model.path).map_err(refused)?;
    let map = field_map(cfg, &model, &Preprocessor::new(&model.meta)).map_err(refused)?;
    build_scorers(&crate::onnxruntime::init(onnxruntime_library(cfg)).map_err(refused)?, &model, 1).map_err(refused)?;
    Ok(summary(&model, &map))
}

fn summary(model: &Model, map: &FieldMap) -> String {
    format!(
        "model {} ({:?}, W={}, F={}), {} record fields, series by {:?}, time from {:?}; threshold {}",
        model.meta.name,
        model.meta.model_kind,
        model.window_len(),
        model.n_features(),
        map.fields.len(),
        map.series,
        map.timestamp.as_ref().map(|t| &t.0),
        model.meta.thresholds.describe()
    )
}

/// `scoring.onnxruntime_library`, when set.
fn onnxruntime_library(cfg: &Config) -> Option<&Path> {
    (!cfg.scoring.onnxruntime_library.is_empty()).then(|| Path::new(&cfg.scoring.onnxruntime_library))
}

/// Starts everything and runs until the source ends and a signal arrives, or a signal drains it.
pub async fn run(cfg: Config, config_path: Option<PathBuf>, shutdown: CancellationToken) -> Result<()> {
    let Prepared { model, metrics, env, scorers, map, input, reader, default_series, listener, topics, sinks, kafka, sink, scores } =
        prepare(&cfg, cfg.scoring.workers).await?;
    let pre = Preprocessor::new(&model.meta);
    let in_use = Arc::new(ModelInUse::new(model.clone(), cfg.model.threshold));
    publish_model(&metrics, None, &in_use);
    info!(address = %listener.local_addr()?, "Admin server listening.");
    let health = Arc::new(Health::default());
    let mut tasks = Tasks::new(shutdown.clone(), health.clone());
    let admin_stop = CancellationToken::new();
    let admin_state = AdminState { metrics: metrics.clone(), health: health.clone() };
    let admin = admin::serve(listener, admin_state, cfg.admin.clone(), admin_stop.clone());
    tasks.spawn("admin server", Ends::AtShutdown, async { admin.await.context("admin server") });

    let spec = WindowSpec::for_model(&model, cfg.windows.stride);
    let windows = WindowStage::new(
        &cfg,
        input,
        default_series,
        in_use.clone(),
        Windower::with_max_series(spec, pre, cfg.windows.max_series),
        metrics.clone(),
        sinks.clone(),
    );
    let (rules_tx, rules_rx) = watch::channel(cfg.alert_rules(&map.series));
    let changelog = (cfg.source.kind == SourceKind::Kafka && !cfg.kafka.thresholds_topic.is_empty()).then(|| Changelog {
        kafka: cfg.kafka.clone(),
        topics: topics.clone(),
        placed: Default::default(),
    });
    let (kafka, committer) = match kafka {
        Some((consumer, handle)) => {
            // Deep: each batch waits for its outputs' delivery (linger plus a broker round trip),
            // and a shallow queue would make that wait the pace of scoring.
            let (tx, rx) = mpsc::channel(COMMIT_QUEUE);
            let committer = Committer { handle, sinks: sinks.clone(), metrics: metrics.clone() };
            (Some(consumer), Some((tx, committer.run(rx))))
        }
        None => (None, None),
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
        sink,
        scores,
        sinks: sinks.clone(),
        save_errors: Default::default(),
        changelog,
    };

    let (line_tx, line_rx) = mpsc::channel(LINE_QUEUE);
    let (swap_tx, swap_rx) = mpsc::channel(1);
    let (batch_tx, batch_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let (scored_tx, scored_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let header_next = windows.header_next();
    match (reader, kafka) {
        (Some(reader), _) => {
            let source = read_source(reader, header_next, cfg.source.replay_rate_per_sec, line_tx, shutdown.child_token(), metrics.clone());
            tasks.spawn("source", Ends::WithInput, infallible(source));
        }
        (None, Some(consumer)) => {
            tasks.spawn("kafka source", Ends::AtShutdown, infallible(consumer.run(line_tx, shutdown.child_token(), metrics.clone())))
        }
        (None, None) => unreachable!("a source is a reader or a Kafka consumer"),
    }
    let windows_in_flight = windows.in_flight();
    tasks.spawn("window", Ends::WithInput, infallible(windows.run(line_rx, swap_rx, batch_tx)));
    tasks.spawn("dispatch", Ends::WithInput, infallible(dispatch(scorers, batch_rx, scored_tx, windows_in_flight, metrics.clone())));
    tasks.spawn("alert", Ends::WithInput, alerts.run(scored_rx));
    if let Some(committer) = committer_task {
        tasks.spawn("committer", Ends::WithInput, infallible(committer));
    }
    let reloader = crate::reload::Reloader {
        path: config_path,
        config: cfg.clone(),
        mapping: map,
        model: in_use.clone(),
        env,
        metrics: metrics.clone(),
        rules: rules_tx,
        swaps: swap_tx,
    };
    tasks.spawn("reload", Ends::AtShutdown, infallible(reloader.run(shutdown.child_token())));
    health.set_ready();
    metrics.ready.set(1);
    let streaming =
        cfg.thresholds.mode != Mode::Static || cfg.alert_overrides.iter().any(|o| o.threshold_mode.is_some_and(|m| m != Mode::Static));
    if cfg.source.kind == SourceKind::Kafka && streaming && cfg.kafka.thresholds_topic.is_empty() {
        warn!("Per-series thresholds with a Kafka consumer group: a series whose partition moves to another consumer starts its threshold again there; kafka.thresholds_topic makes thresholds follow their partitions (docs/thresholds.md, \"With a Kafka consumer group\").");
    }
    if cfg.source.kind == SourceKind::Kafka && cfg.windows.stride > 1 && cfg.kafka.checkpoints_topic.is_empty() {
        warn!(stride = cfg.windows.stride, "Windows at a stride from Kafka without kafka.checkpoints_topic: a replay (after a crash, or a partition moving) starts each series' stride anew, so some windows are never scored and others end on other rows (docs/ARCHITECTURE.md, \"Window checkpoints\").");
    }
    info!(model = %model.meta.name, threshold = in_use.threshold, "Ready.");

    let outcome = watch(&mut tasks, &shutdown, cfg.shutdown.drain_timeout()).await;
    if outcome.is_err() {
        metrics.ready.set(0);
        // What the other stages still hold is theirs to finish (its offsets then go in), within the drain deadline.
        let _ = tokio::time::timeout(cfg.shutdown.drain_timeout(), tasks.stages_ended()).await;
    }
    admin_stop.cancel();
    outcome?;
    tasks.all_ended().await?;
    info!("Stopped.");
    Ok(())
}

/// Runs until a signal and the drain, or a task's failure: a replay that ends keeps serving
/// /metrics until asked to stop.
async fn watch(tasks: &mut Tasks, shutdown: &CancellationToken, drain: std::time::Duration) -> Result<()> {
    let drained = tokio::select! {
        ended = tasks.stages_ended() => {
            ended?;
            info!("Pipeline idle: all records scored.");
            shutdown.cancelled().await;
            true
        }
        _ = shutdown.cancelled() => false,
    };
    if !drained {
        info!(timeout_ms = drain.as_millis() as u64, "Draining.");
        if tokio::time::timeout(drain, tasks.stages_ended()).await.is_err() {
            warn!("Drain deadline passed; exiting with windows unscored.");
        }
    }
    Ok(())
}

/// A task that cannot fail but by panicking.
async fn infallible(task: impl std::future::Future<Output = ()>) -> Result<()> {
    task.await;
    Ok(())
}
