//! `anomalyd run`: wires the stages of docs/ARCHITECTURE.md and owns shutdown.
//!
//! ```text
//! source task ──lines──▶ window task ──Batch──▶ dispatcher ──(blocking) scorers──▶ alert task
//! ```
//!
//! Shutdown is a cascade: the first SIGTERM/SIGINT cancels the source; each stage finishes what
//! it holds (the window task flushes its partial batch, the dispatcher waits for in-flight
//! inference, the alert task writes and flushes) and closes its output channel, which ends the
//! next stage. The whole drain is bounded by `shutdown.drain_timeout_ms`; a second signal exits
//! at once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::alert::{Event, Observation, Tracker};
use crate::config::{AlertRules, Config, RecordFormat, SinkKind, SourceKind};
use crate::model::{Model, Scorer, Scores};
use crate::preprocess::Preprocessor;
use crate::record::{parse_ndjson, CsvParser, FieldMap, ParseError, RawRecord, TimeFormat};
use crate::telemetry::metrics::Metrics;
use crate::window::{Outcome, WindowSpec, Windower};

/// Lines buffered between the source and the window task.
const LINE_QUEUE: usize = 4096;
/// At most one warning per this many bad records of a kind (the rest are counted, and logged at debug).
const LOG_EVERY: u64 = 1000;

/// Windows of one inference call, with what the alert stage needs to know about each.
struct Batch {
    seq: u64,
    windows: Vec<f32>,
    meta: Vec<WindowMeta>,
}

struct WindowMeta {
    series: String,
    start_ts: f64,
    end_ts: f64,
}

struct Scored {
    batch: Batch,
    scores: Result<Scores, String>,
}

/// Everything the stages share that does not change while running.
struct Shared {
    metrics: Arc<Metrics>,
    model: Model,
    threshold: f64,
    width: usize,
    window: usize,
}

/// How records are read: the model's fields under the names the config maps them to.
pub fn field_map(cfg: &Config, model: &Model, pre: &Preprocessor) -> Result<FieldMap> {
    let m = &cfg.mapping;
    if let Some(unknown) = m.fields.keys().find(|k| !pre.fields().iter().any(|f| &f.name == *k)) {
        return Err(anyhow!("mapping.fields.{unknown}: the model has no source field of that name"));
    }
    let bundle_ts = model.meta.preprocess.timestamp.as_ref();
    let ts_field = if m.timestamp_field.is_empty() { bundle_ts.map(|t| t.column.clone()) } else { Some(m.timestamp_field.clone()) };
    let ts_format = if m.timestamp_format.is_empty() {
        bundle_ts.map(|t| t.format.clone()).unwrap_or_else(|| "auto".into())
    } else {
        m.timestamp_format.clone()
    };
    let mut fields = pre.fields().to_vec();
    for f in &mut fields {
        if let Some(renamed) = m.fields.get(&f.name) {
            f.name = renamed.clone();
        }
    }
    Ok(FieldMap {
        timestamp: ts_field.map(|f| (f, TimeFormat::parse(&ts_format))),
        series: if m.series_fields.is_empty() { model.meta.preprocess.series_columns.clone() } else { m.series_fields.clone() },
        fields,
    })
}

/// Loads and checks everything `run` would, without starting: `anomalyd validate`.
pub fn validate(cfg: &Config) -> Result<String> {
    let model = Model::load(&cfg.model.path)?;
    let map = field_map(cfg, &model, &Preprocessor::new(&model.meta))?;
    if cfg.source.kind == SourceKind::File && !cfg.source.path.is_file() {
        return Err(anyhow!("source.path: {} is not a readable file", cfg.source.path.display()));
    }
    Ok(format!(
        "model {} ({:?}, W={}, F={}), {} record fields, series by {:?}, time from {:?}",
        model.meta.name,
        model.meta.model_kind,
        model.window_len(),
        model.n_features(),
        map.fields.len(),
        map.series,
        map.timestamp.as_ref().map(|t| &t.0)
    ))
}

// === Parsing ===

enum Parser {
    Csv(CsvParser),
    Ndjson(FieldMap),
}

impl Parser {
    fn parse(&self, line: &str, default_series: &str) -> Result<RawRecord, ParseError> {
        match self {
            Parser::Csv(p) => p.parse(line, default_series),
            Parser::Ndjson(map) => parse_ndjson(map, line, default_series),
        }
    }
}

// === Source ===

/// Reads lines from the file or stdin, paced by `replay_rate_per_sec`, until EOF or cancellation.
async fn read_source<R: AsyncRead + Unpin>(
    reader: R,
    rate: f64,
    tx: mpsc::Sender<String>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let mut lines = BufReader::new(reader).lines();
    let started = Instant::now();
    let mut n = 0u64;
    loop {
        let line = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            line = lines.next_line() => line,
        };
        match line {
            Ok(Some(line)) => {
                if line.trim().is_empty() {
                    continue;
                }
                metrics.records_received.inc();
                n += 1;
                if tx.send(line).await.is_err() {
                    break;
                }
                if rate > 0.0 {
                    let due = started + Duration::from_secs_f64(n as f64 / rate);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep_until(due.into()) => {}
                    }
                }
            }
            Ok(None) => {
                info!(records = n, "Source reached its end.");
                break;
            }
            Err(error) => {
                metrics.errors.with_label_values(&["source", "read"]).inc();
                error!(%error, "Source read failed; no more records.");
                break;
            }
        }
    }
}

// === Window stage ===

struct WindowStage {
    parser: Parser,
    default_series: String,
    windower: Windower,
    batch_max: usize,
    batch_wait: Duration,
    idle_secs: f64,
    shared: Arc<Shared>,
    bad: BTreeMap<&'static str, u64>,
}

impl WindowStage {
    fn discard(&mut self, reason: &'static str, detail: &dyn std::fmt::Display) {
        self.shared.metrics.records_discarded.with_label_values(&[reason]).inc();
        let n = self.bad.entry(reason).or_default();
        *n += 1;
        if *n % LOG_EVERY == 1 {
            warn!(reason, error = %detail, count = *n, "Dropped record.");
        } else {
            debug!(reason, error = %detail, "Dropped record.");
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<String>, tx: mpsc::Sender<Batch>) {
        let (w, f) = (self.shared.window, self.shared.width);
        let mut seq = 0u64;
        let batch_max = self.batch_max;
        let new_batch = move |seq| Batch { seq, windows: Vec::with_capacity(batch_max * w * f), meta: Vec::with_capacity(batch_max) };
        let mut batch = new_batch(seq);
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut newest_ts = f64::NEG_INFINITY;
        let mut since_eviction = 0u64;
        loop {
            let line = tokio::select! {
                biased;
                line = rx.recv() => line,
                _ = async { tokio::time::sleep_until(deadline.expect("guarded by the if")).await }, if deadline.is_some() => {
                    deadline = None;
                    seq += 1;
                    if tx.send(std::mem::replace(&mut batch, new_batch(seq))).await.is_err() { return; }
                    self.update_gauges();
                    continue;
                }
            };
            let Some(line) = line else { break };
            let record = match self.parser.parse(&line, &self.default_series) {
                Ok(r) => r,
                Err(e) => {
                    self.discard(e.reason(), &e);
                    continue;
                }
            };
            let pushed = self.windower.push(&record, &mut batch.windows);
            if pushed.unknown_category {
                self.shared.metrics.errors.with_label_values(&["window", "unknown_category"]).inc();
            }
            match pushed.outcome {
                Outcome::Window { start_ts, end_ts } => {
                    newest_ts = newest_ts.max(end_ts);
                    batch.meta.push(WindowMeta { series: record.series, start_ts, end_ts });
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.batch_wait);
                }
                Outcome::Dropped(reason) => self.discard(reason.reason(), &format!("series {}", record.series)),
                Outcome::Buffered => newest_ts = newest_ts.max(record.ts.unwrap_or(f64::NEG_INFINITY)),
            }
            if batch.meta.len() >= self.batch_max {
                deadline = None;
                seq += 1;
                if tx.send(std::mem::replace(&mut batch, new_batch(seq))).await.is_err() {
                    return;
                }
                self.update_gauges();
            }
            since_eviction += 1;
            if since_eviction >= 10_000 && newest_ts.is_finite() {
                since_eviction = 0;
                for gone in self.windower.evict_idle(newest_ts, self.idle_secs) {
                    self.shared.metrics.series_evicted.inc();
                    self.shared.metrics.forget_series(&gone);
                }
            }
        }
        if !batch.meta.is_empty() {
            let _ = tx.send(batch).await;
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = &self.shared.metrics;
        m.series_live.set(self.windower.live_series() as i64);
        m.series_warming.set(self.windower.warming_series() as i64);
        m.window_bytes.set(self.windower.window_bytes() as i64);
    }
}

// === Scoring ===

/// Runs batches on the scorer pool (blocking threads), as many at once as there are scorers.
async fn dispatch(scorers: Vec<Scorer>, mut rx: mpsc::Receiver<Batch>, tx: mpsc::Sender<Scored>, shared: Arc<Shared>) {
    let (pool_tx, mut pool_rx) = mpsc::channel(scorers.len());
    for s in scorers {
        pool_tx.try_send(s).expect("pool channel holds every scorer");
    }
    let mut inflight = tokio::task::JoinSet::new();
    while let Some(batch) = rx.recv().await {
        let mut scorer: Scorer = pool_rx.recv().await.expect("the pool sender lives in this function");
        let (pool_tx, tx, shared) = (pool_tx.clone(), tx.clone(), shared.clone());
        inflight.spawn(async move {
            let n = batch.meta.len();
            let (scorer, batch, scores, took) = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let scores = scorer.score(&batch.windows, n).map_err(|e| e.to_string());
                (scorer, batch, scores, started.elapsed())
            })
            .await
            .expect("inference does not panic on valid buffers");
            shared.metrics.inference_duration.observe(took.as_secs_f64());
            shared.metrics.inference_batch.observe(n as f64);
            let _ = pool_tx.send(scorer).await;
            let _ = tx.send(Scored { batch, scores }).await;
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

// === Alert stage ===

struct AlertStage {
    shared: Arc<Shared>,
    rules: AlertRules,
    tracker: Tracker,
    sink: Box<dyn Write + Send>,
}

impl AlertStage {
    /// Handles batches strictly in sequence order: windows of one series must reach the alert
    /// state machine in event-time order, and batches can finish inference out of order.
    async fn run(mut self, mut rx: mpsc::Receiver<Scored>) {
        let mut next = 0u64;
        let mut waiting: BTreeMap<u64, Scored> = BTreeMap::new();
        while let Some(scored) = rx.recv().await {
            waiting.insert(scored.batch.seq, scored);
            while let Some(scored) = waiting.remove(&next) {
                self.handle(scored);
                next += 1;
            }
        }
        for (_, scored) in std::mem::take(&mut waiting) {
            self.handle(scored);
        }
        if let Err(error) = self.sink.flush() {
            self.shared.metrics.errors.with_label_values(&["alert", "sink"]).inc();
            error!(%error, "Alert sink flush failed.");
        }
    }

    fn handle(&mut self, scored: Scored) {
        let m = self.shared.metrics.clone();
        let (w, f) = (self.shared.window, self.shared.width);
        let scores = match scored.scores {
            Ok(s) => s,
            Err(error) => {
                m.errors.with_label_values(&["scoring", "inference"]).inc();
                error!(%error, windows = scored.batch.meta.len(), "Inference failed; windows not scored.");
                return;
            }
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let shared = self.shared.clone();
        let names = &shared.model.meta.features;
        for (i, meta) in scored.batch.meta.iter().enumerate() {
            let score = scores.score[i] as f64;
            let anomaly = score / self.shared.threshold;
            m.windows_scored.inc();
            if anomaly > 1.0 {
                m.anomalous_windows.inc();
            }
            m.event_to_score.observe((now - meta.end_ts).max(0.0));
            let window = &scored.batch.windows[i * w * f..(i + 1) * w * f];
            let obs = Observation {
                series: &meta.series,
                window_start_ts: meta.start_ts,
                window_end_ts: meta.end_ts,
                score,
                threshold: self.shared.threshold,
                feature_names: names,
                feature_scores: &scores.feature_scores[i * f..(i + 1) * f],
                latest: &window[(w - 1) * f..],
            };
            let policy = self.rules.policy_for(&meta.series);
            let event = self.tracker.observe_with(&obs, &policy);
            if let Some(event) = event {
                self.emit(event);
            }
            let firing = self.tracker.state(&meta.series) == crate::alert::AlertState::Firing;
            m.series_score(&meta.series, anomaly, firing);
        }
        if let Err(error) = self.sink.flush() {
            m.errors.with_label_values(&["alert", "sink"]).inc();
            error!(%error, "Alert sink flush failed.");
        }
    }

    fn emit(&mut self, event: Event) {
        let (kind, alert) = match &event {
            Event::Fired(a) => ("firing", a),
            Event::Resolved(a) => ("resolved", a),
        };
        self.shared.metrics.alerts.with_label_values(&[kind]).inc();
        let mut line = serde_json::to_value(alert).expect("alerts serialise");
        line["event"] = kind.into();
        line["model"] = self.shared.model.meta.name.clone().into();
        info!(series = %alert.series, event = kind, anomaly_score = alert.anomaly_score, "Alert.");
        if let Err(error) = writeln!(self.sink, "{line}") {
            self.shared.metrics.errors.with_label_values(&["alert", "sink"]).inc();
            error!(%error, "Alert sink write failed.");
        }
    }
}

// === Wiring ===

fn open_sink(cfg: &Config) -> Result<Box<dyn Write + Send>> {
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

fn build_scorers(env: &ort::environment::Environment, model: &Model, n: usize) -> ort::Result<Vec<Scorer>> {
    (0..n).map(|_| Scorer::new(env, model)).collect()
}

/// Starts everything and runs until the source ends and a signal arrives, or a signal drains it.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<()> {
    let model = Model::load(&cfg.model.path)?;
    let metrics = Arc::new(Metrics::new(cfg.admin.max_series_metrics));
    let lib = (!cfg.scoring.onnxruntime_library.is_empty()).then(|| Path::new(&cfg.scoring.onnxruntime_library));
    let env = crate::onnxruntime::init(lib)?;
    let scorers = build_scorers(&env, &model, cfg.scoring.workers).map_err(|e| anyhow!("{}: {e}", model.onnx_path.display()))?;
    let pre = Preprocessor::new(&model.meta);
    let map = field_map(&cfg, &model, &pre)?;
    let threshold = if cfg.model.threshold > 0.0 { cfg.model.threshold } else { model.threshold() };
    let meta = &model.meta;
    metrics
        .model_info
        .with_label_values(&[&meta.name, &format!("{:?}", meta.model_kind).to_lowercase(), &meta.score_kind, &meta.onnx.sha256, &meta.trainer_version])
        .set(1);
    metrics.model_threshold.set(threshold);
    metrics.model_loaded.set(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0));

    let (reader, default_series): (Box<dyn AsyncRead + Unpin + Send>, String) = match cfg.source.kind {
        SourceKind::File => {
            let file = tokio::fs::File::open(&cfg.source.path)
                .await
                .with_context(|| format!("source.path: cannot open {}", cfg.source.path.display()))?;
            let name = cfg.source.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (Box::new(file), name)
        }
        SourceKind::Stdin => (Box::new(tokio::io::stdin()), "stdin".to_string()),
    };
    let default_series = if cfg.source.series_name.is_empty() { default_series } else { cfg.source.series_name.clone() };
    let mut reader = BufReader::new(reader);
    let delimiter = cfg.source.csv_delimiter.chars().next().expect("validated: one character");
    let parser = match cfg.source.format {
        RecordFormat::Ndjson => Parser::Ndjson(map),
        RecordFormat::Csv => {
            let header = if cfg.source.csv_columns.is_empty() {
                let mut first = String::new();
                reader.read_line(&mut first).await.context("source: reading the CSV header")?;
                CsvParser::header(&first, delimiter)
            } else {
                cfg.source.csv_columns.clone()
            };
            Parser::Csv(CsvParser::new(map, &header, delimiter).map_err(|e| anyhow!("source: CSV header: {e}"))?)
        }
    };

    let listener = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", cfg.admin.listen))?;
    info!(address = %listener.local_addr()?, "Admin server listening.");
    let ready = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(listener, AdminState { metrics: metrics.clone(), ready: ready.clone() }, admin_stop.clone()));

    let shared = Arc::new(Shared { metrics: metrics.clone(), threshold, width: model.n_features(), window: model.window_len(), model: model.clone() });
    let spec = WindowSpec {
        length: model.window_len(),
        stride: cfg.windows.stride,
        max_gap_secs: model.meta.window.max_gap_secs,
        nan_policy: model.meta.window.nan_policy,
    };
    let windows = WindowStage {
        parser,
        default_series,
        windower: Windower::with_max_series(spec, pre, cfg.windows.max_series),
        batch_max: cfg.scoring.batch_max_windows,
        batch_wait: cfg.scoring.batch_max_wait(),
        idle_secs: cfg.windows.idle_timeout_secs,
        shared: shared.clone(),
        bad: BTreeMap::new(),
    };
    let alerts = AlertStage { shared: shared.clone(), rules: cfg.alert_rules(), tracker: Tracker::new(cfg.alerting.clone()), sink: open_sink(&cfg)? };

    let (line_tx, line_rx) = mpsc::channel(LINE_QUEUE);
    let (batch_tx, batch_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let (scored_tx, scored_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let source_stop = shutdown.child_token();
    let source = tokio::spawn(read_source(reader, cfg.source.replay_rate_per_sec, line_tx, source_stop, metrics.clone()));
    let window_task = tokio::spawn(windows.run(line_rx, batch_tx));
    let dispatch_task = tokio::spawn(dispatch(scorers, batch_rx, scored_tx, shared.clone()));
    let alert_task = tokio::spawn(alerts.run(scored_rx));
    ready.store(true, Ordering::Release);
    metrics.ready.set(1);
    info!(model = %model.meta.name, threshold, "Ready.");

    let pipeline = async {
        let _ = source.await;
        let _ = window_task.await;
        let _ = dispatch_task.await;
        let _ = alert_task.await;
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
    admin_stop.cancel();
    let _ = admin.await;
    info!("Stopped.");
    Ok(())
}
