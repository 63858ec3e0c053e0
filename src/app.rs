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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::alert::{AlertState, Event, Observation, Tracker};
use crate::config::{AlertRules, Config, RecordFormat, SinkKind, SourceKind};
use crate::flows::{parse_flow, FlowAggregator, FlowRow, FLOW_FEATURES};
use crate::source::kafka::{Ack, Acks, Committer, KafkaSinks, OffsetTracker, Origin, Output, Pending, Topics};
use rdkafka::producer::DeliveryFuture;
use crate::model::{Model, Scorer, Scores};
use crate::preprocess::Preprocessor;
use crate::record::{CsvParser, FieldMap, LineParser, RawRecord, TimeFormat, Value, MAX_LINE_BYTES};
use crate::telemetry::metrics::Metrics;
use crate::window::{Outcome, WindowSpec, Windower};

/// Line batches buffered between the source and the window task ...
const LINE_QUEUE: usize = 64;
/// ... each of at most this many lines: what the source has at hand, so a quiet stream is not
/// delayed and a busy one crosses the channel (a task wake-up) once per batch, not per line.
pub(crate) const MAX_LINE_BATCH: usize = 1024;
/// Handled batches whose outputs are still being delivered, at most.
const COMMIT_QUEUE: usize = 1024;
/// At most one warning per this many bad records of a kind (the rest are counted, and logged at debug).
pub(crate) const LOG_EVERY: u64 = 1000;

/// The model a batch was windowed for and is scored with. Swapped by a reload; every batch
/// carries its own, so scaling, scoring and threshold always belong together.
pub struct ModelInUse {
    pub model: Model,
    /// Raw score for anomaly_score 1.0: the config's `model.threshold`, else the bundle's.
    pub threshold: f64,
}

impl ModelInUse {
    pub fn new(model: Model, configured_threshold: f64) -> ModelInUse {
        let threshold = if configured_threshold > 0.0 { configured_threshold } else { model.threshold() };
        ModelInUse { model, threshold }
    }

    fn dims(&self) -> (usize, usize) {
        (self.model.window_len(), self.model.n_features())
    }
}

/// A reload's new model: the window stage switches at a batch boundary and passes the scorers
/// on to the dispatcher in the same channel, so no batch is scored by a model it was not
/// windowed for.
pub struct ModelSwap {
    pub model: Arc<ModelInUse>,
    /// New sessions, or `None` when only the threshold changed.
    pub scorers: Option<Vec<Scorer>>,
}

/// Windows of one inference call, with what the alert stage needs to know about each.
struct Batch {
    seq: u64,
    model: Arc<ModelInUse>,
    windows: Vec<f32>,
    meta: Vec<WindowMeta>,
    /// Series evicted (idle) since the previous batch: the alert stage forgets them after this
    /// batch's windows, so their per-series state and gauges go too.
    evicted: Vec<String>,
    /// Kafka offsets safe to store once this batch is scored.
    acks: Acks,
    /// Dead letters enqueued since the previous batch: delivered before the batch's offsets are
    /// stored.
    deliveries: Vec<(DeliveryFuture, Output)>,
}

struct WindowMeta {
    series: String,
    start_ts: f64,
    end_ts: f64,
}

enum ToScoring {
    Batch(Batch),
    Swap(Vec<Scorer>),
}

/// Batches sent to scoring whose inference has not finished. While fewer are in flight than
/// there are scorers, one sits idle: the window stage then sends what it has rather than wait
/// for a full batch, so a quiet stream is scored at once and a busy one still in full batches.
#[derive(Clone, Default)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn sent(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn done(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    fn below(&self, scorers: usize) -> bool {
        self.0.load(Ordering::Relaxed) < scorers
    }
}

struct Scored {
    batch: Batch,
    scores: Result<Scores, String>,
}

/// How records are read: the model's fields under the names the config maps them to. Also
/// checks the config against the model: renamed fields and override labels must exist.
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
    let series = if cfg.source.kind == SourceKind::Kafka && cfg.kafka.series_from_key {
        Vec::new() // the key is the series
    } else if m.series_fields.is_empty() {
        model.meta.preprocess.series_columns.clone()
    } else {
        m.series_fields.clone()
    };
    for (i, o) in cfg.alert_overrides.iter().enumerate() {
        if let Some(name) = o.labels.keys().find(|name| !series.contains(name)) {
            return Err(anyhow!("alert_overrides[{i}].labels.{name}: not a series field (series fields: {series:?})"));
        }
    }
    Ok(FieldMap { timestamp: ts_field.map(|f| (f, TimeFormat::parse(&ts_format))), series, fields })
}

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

// === Source ===

/// One line from the source, or why it could not be one.
pub enum Input {
    /// A stream's CSV header line (not a record, not counted as one).
    Header(String),
    /// A record line, with its Kafka position and key when it came from Kafka.
    Line(String, Option<Origin>),
    /// A Kafka message whose payload is not UTF-8 (dead-lettered as it is).
    Undecodable(Vec<u8>, Origin),
    /// Partitions this consumer no longer owns (after the records it read from them).
    Revoked(Vec<(usize, i32)>),
    Bad { reason: &'static str, detail: String },
}

/// Reads one line of at most `MAX_LINE_BYTES`: a longer one is skipped to its end without being
/// held in memory, so a runaway producer cannot exhaust it. `None` at EOF.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<Input>> {
    buf.clear();
    let mut skipped = 0usize;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(match (buf.is_empty(), skipped) {
                (true, 0) => None,
                _ => Some(finish_line(buf, skipped)),
            });
        }
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if skipped > 0 || buf.len() + part.len() > MAX_LINE_BYTES {
            skipped += buf.len() + part.len();
            buf.clear();
        } else {
            buf.extend_from_slice(part);
        }
        let used = done.unwrap_or(chunk.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(finish_line(buf, skipped)));
        }
    }
}

fn finish_line(buf: &mut Vec<u8>, skipped: usize) -> Input {
    if skipped > 0 {
        return Input::Bad { reason: "too_long", detail: format!("line of {skipped} bytes or more") };
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    match String::from_utf8(std::mem::take(buf)) {
        Ok(line) => Input::Line(line, None),
        Err(_) => Input::Bad { reason: "malformed", detail: "line is not UTF-8".into() },
    }
}

/// Reads lines from the file or stdin, paced by `replay_rate_per_sec`, until EOF or cancellation.
/// Lines go in batches of what is already buffered (at most [`MAX_LINE_BATCH`]); paced, one by one.
async fn read_source<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    mut header_next: bool,
    rate: f64,
    tx: mpsc::Sender<Vec<Input>>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let started = Instant::now();
    let mut n = 0u64;
    let mut buf = Vec::new();
    let mut batch = Vec::new();
    loop {
        let due = !batch.is_empty() && (reader.buffer().is_empty() || batch.len() >= MAX_LINE_BATCH || rate > 0.0);
        if due && tx.send(std::mem::take(&mut batch)).await.is_err() {
            return;
        }
        if rate > 0.0 && n > 0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(due.into()) => {}
            }
        }
        let input = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            input = read_line(&mut reader, &mut buf) => input,
        };
        match input {
            Ok(Some(Input::Line(line, _))) if line.trim().is_empty() => continue,
            Ok(Some(Input::Line(line, _))) if header_next => {
                header_next = false;
                batch.push(Input::Header(line));
            }
            Ok(Some(input)) => {
                metrics.records_received.inc();
                n += 1;
                batch.push(input);
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
    // Lines already read are handled (the drain scores them).
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
}

// === Window stage ===

/// goflow2 input: flows are aggregated into per-host bucket rows first (docs/flow-features.md),
/// and those rows are the records.
struct FlowInput {
    aggregator: FlowAggregator,
    /// For each model source field, its index in `FLOW_FEATURES`.
    order: Vec<usize>,
}

impl FlowInput {
    fn record(&self, row: FlowRow) -> RawRecord {
        let values = self.order.iter().map(|&j| Value::Num(row.features[j])).collect();
        RawRecord { series: row.host, ts: Some(row.bucket_start as f64), values }
    }
}

/// What turns input lines into records.
enum RecordInput {
    Lines(LineParser),
    Flows(FlowInput),
}

struct WindowStage {
    input: RecordInput,
    default_series: String,
    model: Arc<ModelInUse>,
    windower: Windower,
    spec: WindowSpec,
    max_series: usize,
    batch_max: usize,
    batch_wait: Duration,
    /// Scorers, and batches in flight on them: a partial batch goes early to an idle one
    /// (`scoring.flush_when_idle`).
    flush_when_idle: bool,
    scorers: usize,
    in_flight: InFlight,
    idle_secs: f64,
    metrics: Arc<Metrics>,
    bad: BTreeMap<&'static str, u64>,
    seq: u64,
    batch: Batch,
    /// When the current batch must go even if not full (set by its first window).
    deadline: Option<tokio::time::Instant>,
    /// Newest event time seen, and when to look for idle series next.
    newest_ts: f64,
    next_eviction_ts: f64,
    /// Kafka input: which offsets a replay must start from; `dirty` once it changed since the
    /// last batch.
    offsets: Option<OffsetTracker>,
    offsets_dirty: bool,
    /// Kafka outputs, for dead letters.
    sinks: Option<KafkaSinks>,
    /// `kafka.series_from_key`: the message key names the series.
    series_from_key: bool,
}

impl WindowStage {
    fn discard(&mut self, reason: &'static str, detail: &dyn std::fmt::Display) {
        self.metrics.records_discarded.with_label_values(&[reason]).inc();
        let n = self.bad.entry(reason).or_default();
        *n += 1;
        if *n % LOG_EVERY == 1 {
            warn!(reason, error = %detail, count = *n, "Dropped record.");
        } else {
            debug!(reason, error = %detail, "Dropped record.");
        }
    }

    fn new_batch(&mut self) -> Batch {
        let (w, f) = self.model.dims();
        self.seq += 1;
        Batch {
            seq: self.seq - 1,
            model: self.model.clone(),
            // Reserve for a typical batch, not for a huge configured maximum.
            windows: Vec::with_capacity(self.batch_max.min(256) * w * f),
            meta: Vec::with_capacity(self.batch_max.min(256)),
            evicted: Vec::new(),
            acks: Acks::default(),
            deliveries: Vec::new(),
        }
    }

    /// Sends the batch (if it holds anything) and starts a new one; false when scoring is gone.
    async fn flush(&mut self, tx: &mpsc::Sender<ToScoring>) -> bool {
        self.deadline = None;
        if self.offsets_dirty {
            self.offsets_dirty = false;
            self.batch.acks = self.offsets.as_ref().map(OffsetTracker::safe).unwrap_or_default();
        }
        let idle = self.batch.acks.is_empty() && self.batch.deliveries.is_empty();
        if self.batch.meta.is_empty() && self.batch.evicted.is_empty() && idle {
            return true;
        }
        let next = self.new_batch();
        let full = std::mem::replace(&mut self.batch, next);
        self.update_gauges();
        self.in_flight.sent();
        tx.send(ToScoring::Batch(full)).await.is_ok()
    }

    /// Switches to a reloaded model at a batch boundary. Window state survives when the new
    /// bundle windows and scales exactly as the old one; otherwise every series warms up again.
    async fn swap(&mut self, swap: ModelSwap, tx: &mpsc::Sender<ToScoring>) -> bool {
        if !self.flush(tx).await {
            return false;
        }
        if !same_layout(&self.model.model, &swap.model.model) {
            let dropped = self.windower.live_series();
            self.spec.length = swap.model.model.window_len();
            self.windower = Windower::with_max_series(self.spec, Preprocessor::new(&swap.model.model.meta), self.max_series);
            warn!(series = dropped, "New model windows or scales differently; all series warm up again.");
        }
        self.model = swap.model;
        // The flush left an empty batch: it keeps its sequence number (the alert stage waits
        // for every number in turn) and takes the new model.
        self.batch.model = self.model.clone();
        match swap.scorers {
            Some(scorers) => {
                self.scorers = scorers.len();
                tx.send(ToScoring::Swap(scorers)).await.is_ok()
            }
            None => true,
        }
    }

    /// Windows one record; sends the batch when full. False when scoring is gone.
    async fn push(&mut self, record: RawRecord, ack: Option<Ack>, tx: &mpsc::Sender<ToScoring>) -> bool {
        let pushed = self.windower.push(&record, &mut self.batch.windows);
        if pushed.unknown_category {
            self.metrics.errors.with_label_values(&["window", "unknown_category"]).inc();
        }
        if let (Some(offsets), Some(ack)) = (&mut self.offsets, ack) {
            match pushed.outcome {
                Outcome::Dropped(_) => offsets.dropped(ack),
                _ => offsets.windowed(ack, &record.series, pushed.held),
            }
            self.offsets_dirty = true;
        }
        // Idle eviction compares event times across series: only real ones (sequence
        // numbers of time-less inputs count per series and mean nothing across them).
        if let Some(ts) = record.ts {
            self.newest_ts = self.newest_ts.max(ts);
        }
        match pushed.outcome {
            Outcome::Window { start_ts, end_ts } => {
                self.batch.meta.push(WindowMeta { series: record.series, start_ts, end_ts });
                let wait = self.batch_wait;
                self.deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
            }
            Outcome::Dropped(reason) => self.discard(reason.reason(), &format!("series {}", record.series)),
            Outcome::Buffered => {}
        }
        if self.batch.meta.len() >= self.batch_max && !self.flush(tx).await {
            return false;
        }
        // Scanning for idle series costs O(series): do it each tenth of the idle timeout of
        // event time.
        if self.newest_ts.is_finite() && self.newest_ts >= self.next_eviction_ts {
            self.next_eviction_ts = self.newest_ts + self.idle_secs / 10.0;
            let gone = self.windower.evict_idle(self.newest_ts, self.idle_secs);
            self.metrics.series_evicted.inc_by(gone.len() as u64);
            if let Some(offsets) = &mut self.offsets {
                gone.iter().for_each(|s| offsets.forget(s));
                self.offsets_dirty = true;
            }
            self.batch.evicted.extend(gone);
        }
        true
    }

    /// Handles one input line: a record, or a flow that may close buckets. False when scoring is gone.
    async fn line(&mut self, line: &str, origin: Option<Origin>, tx: &mpsc::Sender<ToScoring>) -> bool {
        let ack = origin.as_ref().map(|o| o.ack);
        let parsed = match &mut self.input {
            RecordInput::Lines(parser) => {
                let series = match (self.series_from_key, origin.as_ref()) {
                    (true, Some(o)) => o.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()),
                    _ => Some(self.default_series.as_str()),
                };
                match series.map(|series| parser.parse(line, series)) {
                    None => Err(("missing_key", "the message has no UTF-8 key to name its series (kafka.series_from_key)".to_string())),
                    Some(None) => return true,
                    Some(Some(Ok(record))) => return self.push(record, ack, tx).await,
                    Some(Some(Err(e))) => Err((e.reason(), e.to_string())),
                }
            }
            RecordInput::Flows(flows) => match parse_flow(line) {
                Err(e) => Err((e.reason(), e.to_string())),
                Ok(flow) if !flows.aggregator.add(&flow) => {
                    Err(("late_flow", format!("host {}: its bucket was already scored", flow.host)))
                }
                Ok(_) => Ok(flows.aggregator.closed().into_iter().map(|row| flows.record(row)).collect::<Vec<_>>()),
            },
        };
        match parsed {
            Ok(records) => {
                // A flow is handled once aggregated: open buckets are not replayed after a crash.
                if let Some(ack) = ack {
                    self.handled(ack);
                }
                self.push_all(records, tx).await
            }
            Err((reason, detail)) => {
                self.reject(line.as_bytes(), origin.as_ref(), reason, &detail).await;
                true
            }
        }
    }

    /// A Kafka record that holds no window rows: its offset may move past it.
    fn handled(&mut self, ack: Ack) {
        if let Some(offsets) = &mut self.offsets {
            offsets.dropped(ack);
            self.offsets_dirty = true;
        }
    }

    /// A record that cannot be parsed or mapped: counted, logged, and dead-lettered if configured.
    async fn reject(&mut self, payload: &[u8], origin: Option<&Origin>, reason: &'static str, detail: &str) {
        self.discard(reason, &detail);
        let Some(origin) = origin else { return };
        self.handled(origin.ack);
        let Some(sinks) = self.sinks.as_ref().filter(|s| s.dead_letters()) else { return };
        match sinks.dead_letter(payload, origin, reason, detail).await {
            Some(delivery) => self.batch.deliveries.push((delivery, Output::DeadLetter(reason))),
            None => self.metrics.produce_errors.with_label_values(&["dead_letter"]).inc(),
        }
    }

    /// Partitions went to another consumer: their series' window state goes (the new owner
    /// rebuilds it from the committed offsets), and the alert stage forgets them.
    async fn revoke(&mut self, partitions: &[(usize, i32)], tx: &mpsc::Sender<ToScoring>) -> bool {
        let Some(offsets) = &mut self.offsets else { return true };
        let gone = offsets.revoke(partitions);
        self.offsets_dirty = true;
        self.windower.drop_series(&gone);
        info!(partitions = partitions.len(), series = gone.len(), "Dropped the window state of revoked partitions' series.");
        self.batch.evicted.extend(gone);
        self.flush(tx).await
    }

    async fn push_all(&mut self, records: Vec<RawRecord>, tx: &mpsc::Sender<ToScoring>) -> bool {
        for record in records {
            if !self.push(record, None, tx).await {
                return false;
            }
        }
        true
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Vec<Input>>, mut swaps: mpsc::Receiver<ModelSwap>, tx: mpsc::Sender<ToScoring>) {
        loop {
            // Biased: a reload is applied before more input, and a due batch before new lines.
            let deadline = self.deadline;
            let input = tokio::select! {
                biased;
                Some(swap) = swaps.recv() => {
                    if !self.swap(swap, &tx).await { return; }
                    continue;
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded by the if")).await }, if deadline.is_some() => {
                    if !self.flush(&tx).await { return; }
                    continue;
                }
                input = rx.recv() => input,
            };
            let Some(inputs) = input else { break };
            for input in inputs {
                let alive = match input {
                    Input::Bad { reason, detail } => {
                        self.discard(reason, &detail);
                        true
                    }
                    Input::Header(line) => self.line(&line, None, &tx).await,
                    Input::Line(line, origin) => self.line(&line, origin, &tx).await,
                    Input::Undecodable(payload, origin) => {
                        self.reject(&payload, Some(&origin), "malformed", "the payload is not UTF-8").await;
                        true
                    }
                    Input::Revoked(partitions) => self.revoke(&partitions, &tx).await,
                };
                if !alive {
                    return;
                }
            }
            if self.flush_when_idle && !self.batch.meta.is_empty() && rx.is_empty() && self.in_flight.below(self.scorers) {
                // Nothing more to read now and a scorer idle: waiting would only add latency.
                if !self.flush(&tx).await {
                    return;
                }
            } else if self.offsets_dirty && self.deadline.is_none() {
                // Offsets move with batches: make sure one goes even without windows.
                self.deadline = Some(tokio::time::Instant::now() + self.batch_wait);
            }
        }
        // End of input: the buckets still open are complete now.
        if let RecordInput::Flows(flows) = &mut self.input {
            let records = flows.aggregator.drain().into_iter().map(|row| flows.record(row)).collect();
            if !self.push_all(records, &tx).await {
                return;
            }
        }
        self.flush(&tx).await;
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.series_live.set(self.windower.live_series() as i64);
        m.series_warming.set(self.windower.warming_series() as i64);
        m.window_bytes.set(self.windower.window_bytes() as i64);
    }
}

/// Windows built for `a` mean the same to `b`: same W, features and scaling.
fn same_layout(a: &Model, b: &Model) -> bool {
    let cols = |m: &Model| {
        m.meta.preprocess.columns.iter().map(|c| (c.source.clone(), c.transform, c.category.clone(), c.mean, c.std)).collect::<Vec<_>>()
    };
    a.window_len() == b.window_len()
        && a.meta.window.max_gap_secs == b.meta.window.max_gap_secs
        && a.meta.window.nan_policy == b.meta.window.nan_policy
        && cols(a) == cols(b)
}

// === Scoring ===

/// Runs batches on the scorer pool (blocking threads), as many at once as there are scorers. A
/// `Swap` replaces the pool: scorers of batches still in flight go back to the old pool, which
/// nobody reads any more, and are dropped there.
async fn dispatch(scorers: Vec<Scorer>, mut rx: mpsc::Receiver<ToScoring>, tx: mpsc::Sender<Scored>, in_flight: InFlight, metrics: Arc<Metrics>) {
    let new_pool = |scorers: Vec<Scorer>| {
        let (pool_tx, pool_rx) = mpsc::channel(scorers.len().max(1));
        for s in scorers {
            pool_tx.try_send(s).expect("pool channel holds every scorer");
        }
        (pool_tx, pool_rx)
    };
    let (mut pool_tx, mut pool_rx) = new_pool(scorers);
    let mut inflight = tokio::task::JoinSet::new();
    while let Some(msg) = rx.recv().await {
        let batch = match msg {
            ToScoring::Swap(scorers) => {
                (pool_tx, pool_rx) = new_pool(scorers);
                continue;
            }
            ToScoring::Batch(batch) if batch.meta.is_empty() => {
                // Evictions only: nothing to score, but the alert stage must see it in order.
                in_flight.done();
                let _ = tx.send(Scored { batch, scores: Ok(Scores::default()) }).await;
                continue;
            }
            ToScoring::Batch(batch) => batch,
        };
        let mut scorer: Scorer = pool_rx.recv().await.expect("the pool sender lives in this function");
        let (pool_tx, tx, in_flight, metrics) = (pool_tx.clone(), tx.clone(), in_flight.clone(), metrics.clone());
        inflight.spawn(async move {
            let n = batch.meta.len();
            let (scorer, batch, scores, took) = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let scores = scorer.score(&batch.windows, n).map_err(|e| e.to_string());
                (scorer, batch, scores, started.elapsed())
            })
            .await
            .expect("inference does not panic on valid buffers");
            in_flight.done();
            metrics.inference_duration.observe(took.as_secs_f64());
            metrics.inference_batch.observe(n as f64);
            let _ = pool_tx.send(scorer).await;
            let _ = tx.send(Scored { batch, scores }).await;
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

// === Alert stage ===

struct AlertStage {
    metrics: Arc<Metrics>,
    /// Kafka source: each handled batch's outputs and offsets go to the committer.
    committer: Option<mpsc::Sender<Pending>>,
    rules: watch::Receiver<AlertRules>,
    tracker: Tracker,
    sink: Box<dyn Write + Send>,
    /// `alerts.scores_path`: every scored window.
    scores: Option<Box<dyn Write + Send>>,
    /// Kafka outputs, for scores and alert events.
    sinks: Option<KafkaSinks>,
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
                self.complete(scored).await;
                next += 1;
            }
        }
        for (_, scored) in std::mem::take(&mut waiting) {
            self.complete(scored).await;
        }
        self.flush();
    }

    /// Handles a batch, then hands what it produced on Kafka and its offsets to the committer,
    /// which stores the offsets once the outputs are delivered.
    async fn complete(&mut self, mut scored: Scored) {
        let acks = std::mem::take(&mut scored.batch.acks);
        let mut deliveries = std::mem::take(&mut scored.batch.deliveries);
        self.handle(scored, &mut deliveries).await;
        if let Some(committer) = &self.committer {
            let _ = committer.send(Pending { deliveries, acks }).await;
        }
    }

    fn flush(&mut self) {
        if let Some(Err(error)) = self.scores.as_mut().map(|w| w.flush()) {
            self.metrics.errors.with_label_values(&["alert", "scores_sink"]).inc();
            error!(%error, "Scores sink flush failed.");
        }
        if let Err(error) = self.sink.flush() {
            self.metrics.errors.with_label_values(&["alert", "sink"]).inc();
            error!(%error, "Alert sink flush failed.");
        }
    }

    async fn handle(&mut self, scored: Scored, out: &mut Vec<(DeliveryFuture, Output)>) {
        let m = self.metrics.clone();
        let batch = scored.batch;
        let scores = match scored.scores {
            Ok(s) => s,
            Err(error) => {
                m.errors.with_label_values(&["scoring", "inference"]).inc();
                error!(%error, windows = batch.meta.len(), "Inference failed; windows not scored.");
                return;
            }
        };
        if self.rules.has_changed().unwrap_or(false) {
            let base = self.rules.borrow_and_update().base.clone();
            self.tracker.set_policy(base);
        }
        let rules = self.rules.borrow().clone();
        let (w, f) = batch.model.dims();
        let threshold = batch.model.threshold;
        let model = &batch.model.model.meta;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        for (i, meta) in batch.meta.iter().enumerate() {
            let score = scores.score[i] as f64;
            let anomaly = score / threshold;
            m.windows_scored.inc();
            if anomaly > 1.0 {
                m.anomalous_windows.inc();
            }
            m.event_to_score.observe((now - meta.end_ts).max(0.0));
            let to_kafka = self.sinks.as_ref().filter(|s| s.scores());
            if self.scores.is_some() || to_kafka.is_some() {
                let line = serde_json::json!({
                    "series": meta.series, "window_start_ts": meta.start_ts, "window_end_ts": meta.end_ts,
                    "score": score, "anomaly_score": anomaly, "model": model.name,
                })
                .to_string();
                if let Some(Err(error)) = self.scores.as_mut().map(|w| writeln!(w, "{line}")) {
                    m.errors.with_label_values(&["alert", "scores_sink"]).inc();
                    error!(%error, "Scores sink write failed.");
                }
                if let Some(sinks) = to_kafka {
                    match sinks.score(&meta.series, &line).await {
                        Some(delivery) => out.push((delivery, Output::Score)),
                        None => m.produce_errors.with_label_values(&["score"]).inc(),
                    }
                }
            }
            let window = &batch.windows[i * w * f..(i + 1) * w * f];
            let obs = Observation {
                series: &meta.series,
                window_start_ts: meta.start_ts,
                window_end_ts: meta.end_ts,
                score,
                threshold,
                feature_names: &model.features,
                feature_scores: &scores.feature_scores[i * f..(i + 1) * f],
                latest: &window[(w - 1) * f..],
            };
            if let Some(event) = self.tracker.observe_with(&obs, &rules.policy_for(&meta.series)) {
                self.emit(event, &model.name, out).await;
            }
            let firing = self.tracker.state(&meta.series) == AlertState::Firing;
            m.series_score(&meta.series, anomaly, firing);
        }
        for series in &batch.evicted {
            if self.tracker.forget(series) {
                info!(series = %series, "Series dropped (idle, or its partition revoked) while its alert was firing.");
            }
            m.forget_series(series);
        }
        m.alerts_firing.set(self.tracker.firing() as i64);
        self.flush();
    }

    async fn emit(&mut self, event: Event, model: &str, out: &mut Vec<(DeliveryFuture, Output)>) {
        let (kind, alert) = match &event {
            Event::Fired(a) => ("firing", a),
            Event::Resolved(a) => ("resolved", a),
        };
        self.metrics.alerts.with_label_values(&[kind]).inc();
        let top = alert.top_features.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(",");
        self.metrics.series_alert(&alert.series, matches!(event, Event::Fired(_)).then_some((model, top.as_str())));
        let mut line = serde_json::to_value(alert).expect("alerts serialise");
        line["event"] = kind.into();
        line["model"] = model.into();
        info!(series = %alert.series, event = kind, anomaly_score = alert.anomaly_score, "Alert.");
        if let Some(sinks) = &self.sinks {
            match sinks.alert(&alert.series, &line.to_string()).await {
                Some(delivery) => out.push((delivery, Output::Alert)),
                None if sinks.alerts() => self.metrics.produce_errors.with_label_values(&["alert"]).inc(),
                None => {}
            }
        }
        if let Err(error) = writeln!(self.sink, "{line}") {
            self.metrics.errors.with_label_values(&["alert", "sink"]).inc();
            error!(%error, "Alert sink write failed.");
        }
    }
}

// === Wiring ===

/// The flow aggregation a flow model was trained with (its bucket width), fed by goflow2 lines.
fn flow_input(model: &Model, cfg: &Config) -> Result<FlowInput> {
    let data = &model.meta.training_config.data;
    if data.format != "goflow2" || data.flow_bucket_secs == 0 {
        return Err(anyhow!(
            "source.format: \"goflow2\" needs a flow model (trained on goflow2 records); {} was trained on {:?}",
            model.meta.name,
            data.format
        ));
    }
    let pre = Preprocessor::new(&model.meta);
    let order = pre
        .fields()
        .iter()
        .map(|f| FLOW_FEATURES.iter().position(|n| *n == f.name).ok_or_else(|| anyhow!("model field {:?} is not a flow feature", f.name)))
        .collect::<Result<_>>()?;
    Ok(FlowInput { aggregator: FlowAggregator::new(data.flow_bucket_secs, cfg.source.flow_lateness_secs), order })
}

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

fn open_scores(cfg: &Config) -> Result<Option<Box<dyn Write + Send>>> {
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

/// `scoring.onnxruntime_library`, when set.
fn onnxruntime_library(cfg: &Config) -> Option<&Path> {
    (!cfg.scoring.onnxruntime_library.is_empty()).then(|| Path::new(&cfg.scoring.onnxruntime_library))
}

/// One session per worker, each checked with a one-window run, so a bundle that loads but
/// cannot score is refused at start-up or reload rather than on the first batch.
pub fn build_scorers(env: &ort::environment::Environment, model: &Model, n: usize) -> Result<Vec<Scorer>> {
    let fail = |e: ort::Error| anyhow!("{}: {e}", model.onnx_path.display());
    let zeros = vec![0f32; model.window_len() * model.n_features()];
    (0..n)
        .map(|_| {
            let mut s = Scorer::new(env, model).map_err(fail)?;
            s.score(&zeros, 1).map_err(fail)?;
            Ok(s)
        })
        .collect()
}

/// Publishes the model in use as metrics (the old label set is removed on a swap).
pub fn publish_model(metrics: &Metrics, old: Option<&ModelInUse>, new: &ModelInUse) {
    let labels = |m: &ModelInUse| {
        let meta = &m.model.meta;
        let kind = match meta.model_kind {
            crate::model::ModelKind::ConvAe => "conv_ae",
            crate::model::ModelKind::Vae => "vae",
        };
        [meta.name.clone(), kind.to_string(), meta.score_kind.clone(), meta.onnx.sha256.clone(), meta.trainer_version.clone()]
    };
    if let Some(old) = old {
        let l = labels(old);
        let _ = metrics.model_info.remove_label_values(&l.each_ref().map(String::as_str));
    }
    let l = labels(new);
    metrics.model_info.with_label_values(&l.each_ref().map(String::as_str)).set(1);
    metrics.model_threshold.set(new.threshold);
    metrics.model_loaded.set(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0));
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
    let parser = match cfg.source.format {
        RecordFormat::Goflow2 => None,
        RecordFormat::Ndjson => Some(LineParser::Ndjson(map)),
        RecordFormat::Influx => Some(LineParser::Influx(map)),
        RecordFormat::Csv if cfg.source.csv_columns.is_empty() && cfg.source.kind == SourceKind::Stdin => {
            Some(LineParser::CsvHeaderNext { map, delimiter })
        }
        RecordFormat::Csv => {
            let header = if cfg.source.csv_columns.is_empty() {
                // A file's header is there now: a field it lacks is a start-up error.
                let mut first = String::new();
                let reader = reader.as_mut().expect("validated: CSV from Kafka names its columns");
                reader.read_line(&mut first).await.context("source: reading the CSV header")?;
                CsvParser::header(&first, delimiter)
            } else {
                cfg.source.csv_columns.clone()
            };
            Some(LineParser::Csv(CsvParser::new(map, &header, delimiter).map_err(|e| anyhow!("source: CSV header: {e}"))?))
        }
    };

    let listener = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", cfg.admin.listen))?;
    info!(address = %listener.local_addr()?, "Admin server listening.");
    let ready = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(listener, AdminState { metrics: metrics.clone(), ready: ready.clone() }, admin_stop.clone()));

    let spec = WindowSpec {
        length: model.window_len(),
        stride: cfg.windows.stride,
        max_gap_secs: model.meta.window.max_gap_secs,
        nan_policy: model.meta.window.nan_policy,
    };
    let topics = Topics::default();
    let sinks = match cfg.source.kind {
        SourceKind::Kafka => KafkaSinks::new(&cfg.kafka, topics.clone())?,
        _ => None,
    };
    let input = match parser {
        Some(parser) => RecordInput::Lines(parser),
        None => RecordInput::Flows(flow_input(&model, &cfg)?),
    };
    let mut windows = WindowStage {
        input,
        default_series,
        model: in_use.clone(),
        windower: Windower::with_max_series(spec, pre, cfg.windows.max_series),
        spec,
        max_series: cfg.windows.max_series,
        batch_max: cfg.scoring.batch_max_windows,
        batch_wait: cfg.scoring.batch_max_wait(),
        flush_when_idle: cfg.scoring.flush_when_idle,
        scorers: cfg.scoring.workers,
        in_flight: InFlight::default(),
        idle_secs: cfg.windows.idle_timeout_secs,
        metrics: metrics.clone(),
        bad: BTreeMap::new(),
        seq: 0,
        batch: Batch {
            seq: 0,
            model: in_use.clone(),
            windows: Vec::new(),
            meta: Vec::new(),
            evicted: Vec::new(),
            acks: Acks::default(),
            deliveries: Vec::new(),
        },
        deadline: None,
        newest_ts: f64::NEG_INFINITY,
        next_eviction_ts: f64::NEG_INFINITY,
        offsets: (cfg.source.kind == SourceKind::Kafka).then(OffsetTracker::default),
        offsets_dirty: false,
        sinks: sinks.clone(),
        series_from_key: cfg.kafka.series_from_key,
    };
    windows.batch = windows.new_batch();
    let label_names = map_series.clone();
    let (rules_tx, rules_rx) = watch::channel(cfg.alert_rules(&label_names));
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
        tracker: Tracker::new(cfg.alerting.clone()),
        sink: open_sink(&cfg)?,
        scores: open_scores(&cfg)?,
        sinks: sinks.clone(),
    };

    let (line_tx, line_rx) = mpsc::channel(LINE_QUEUE);
    let (swap_tx, swap_rx) = mpsc::channel(1);
    let (batch_tx, batch_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let (scored_tx, scored_rx) = mpsc::channel(cfg.scoring.workers * 2);
    let header_next = matches!(windows.input, RecordInput::Lines(LineParser::CsvHeaderNext { .. }));
    let source = match (reader, kafka) {
        (Some(reader), _) => tokio::spawn(read_source(reader, header_next, cfg.source.replay_rate_per_sec, line_tx, shutdown.child_token(), metrics.clone())),
        (None, Some(consumer)) => tokio::spawn(consumer.run(line_tx, shutdown.child_token(), metrics.clone())),
        (None, None) => unreachable!("a source is a reader or a Kafka consumer"),
    };
    let windows_in_flight = windows.in_flight.clone();
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
