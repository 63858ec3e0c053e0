//! The window stage: input lines → records → per-series windows → batches for scoring, with the
//! Kafka offsets a batch makes safe and the dead letters of records that could not be read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::{Batch, InFlight, ToScoring, WindowInfo};
use crate::config::{Config, KafkaConfig, SourceKind};
use crate::flows::{parse_flow, Flow, FlowAggregator, FlowRow, FLOW_FEATURES};
use crate::model::lifecycle::{ModelInUse, ModelSwap};
use crate::model::Model;
use crate::preprocess::Preprocessor;
use crate::record::{LineParser, RawRecord, Value};
use crate::sink::kafka::{KafkaOutput, KafkaSinks};
use crate::source::checkpoints::{Replay, Resumes};
use crate::source::kafka::{read_back, Topics};
use crate::source::offsets::OffsetTracker;
use crate::source::{Ack, Input, Origin};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::LogEvery;
use crate::window::{Outcome, WindowSpec, Windower};

/// goflow2 input: flows are aggregated into per-host bucket rows first (docs/flow-features.md),
/// and those rows are the records.
pub struct FlowInput {
    aggregator: FlowAggregator,
    /// For each model source field, its index in `FLOW_FEATURES`.
    order: Vec<usize>,
}

impl FlowInput {
    fn record(&self, row: FlowRow) -> RawRecord {
        let values = self.order.iter().map(|&j| Value::Num(row.features[j])).collect();
        RawRecord { series: row.host, ts: Some(row.bucket_start as f64), values }
    }

    /// Aggregates a flow; returns the bucket rows it closed, as records. A flow for a bucket
    /// already closed is refused: (reason, detail).
    pub fn add(&mut self, flow: &Flow) -> Result<Vec<RawRecord>, (&'static str, String)> {
        if !self.aggregator.add(flow) {
            return Err(("late_flow", format!("host {}: its bucket was already scored", flow.host)));
        }
        Ok(self.aggregator.closed().into_iter().map(|row| self.record(row)).collect())
    }

    /// The buckets still open, as records: at the end of the input they are complete.
    pub fn drain(&mut self) -> Vec<RawRecord> {
        self.aggregator.drain().into_iter().map(|row| self.record(row)).collect()
    }
}

/// What turns input lines into records.
pub enum RecordInput {
    Lines(LineParser),
    Flows(FlowInput),
}

pub struct WindowStage {
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
    bad: BTreeMap<&'static str, LogEvery>,
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
    /// `kafka.checkpoints_topic`: where a replay resumes each series.
    checkpoints: Option<Checkpoints>,
    /// Kafka outputs, for dead letters.
    sinks: Option<KafkaSinks>,
    /// `kafka.series_from_key`: the message key names the series.
    series_from_key: bool,
    limits: Limits,
}

/// Window checkpoints ([`crate::source::checkpoints`]): read back for assigned partitions.
struct Checkpoints {
    kafka: KafkaConfig,
    topics: Topics,
    /// Those of assigned partitions whose series have not reached them yet.
    resumes: Resumes,
}

/// What a parsed record must meet before it is windowed.
struct Limits {
    max_series_name_bytes: usize,
    /// 0 = no limit.
    max_future_secs: f64,
    /// The clock, read once per batch of lines rather than per record.
    now: f64,
}

impl Limits {
    fn clock_now(&mut self) {
        self.now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    }

    /// Refuses a series name over the length limit, and an event time too far ahead of the
    /// clock (it would reject its series' later records as out of order, and move event-time
    /// idle eviction past every other series): (reason, detail).
    fn admit(&self, series: &str, ts: Option<f64>) -> Result<(), (&'static str, String)> {
        if series.len() > self.max_series_name_bytes {
            let head: String = series.chars().take(64).collect();
            let detail =
                format!("series name of {} bytes (windows.max_series_name_bytes = {}): {head}…", series.len(), self.max_series_name_bytes);
            return Err(("series_name_too_long", detail));
        }
        if let (Some(ts), true) = (ts, self.max_future_secs > 0.0) {
            if ts > self.now + self.max_future_secs {
                let detail = format!(
                    "series {series}: event time {ts} is {:.0} s ahead of the clock (windows.max_future_secs = {})",
                    ts - self.now,
                    self.max_future_secs
                );
                return Err(("future_timestamp", detail));
            }
        }
        Ok(())
    }
}

impl WindowStage {
    pub fn new(
        cfg: &Config,
        input: RecordInput,
        default_series: String,
        model: Arc<ModelInUse>,
        windower: Windower,
        metrics: Arc<Metrics>,
        sinks: Option<KafkaSinks>,
    ) -> WindowStage {
        let checkpoints = sinks
            .as_ref()
            .filter(|_| cfg.source.kind == SourceKind::Kafka && !cfg.kafka.checkpoints_topic.is_empty())
            .map(|sinks| Checkpoints { kafka: cfg.kafka.clone(), topics: sinks.topics().clone(), resumes: Resumes::default() });
        let first = Batch::empty(0, model.clone());
        let mut stage = WindowStage {
            input,
            default_series,
            spec: windower.spec(),
            model,
            windower,
            max_series: cfg.windows.max_series,
            batch_max: cfg.scoring.batch_max_windows,
            batch_wait: cfg.scoring.batch_max_wait(),
            flush_when_idle: cfg.scoring.flush_when_idle,
            scorers: cfg.scoring.workers,
            in_flight: InFlight::default(),
            idle_secs: cfg.windows.idle_timeout_secs,
            metrics,
            bad: BTreeMap::new(),
            seq: 0,
            batch: first,
            deadline: None,
            newest_ts: f64::NEG_INFINITY,
            next_eviction_ts: f64::NEG_INFINITY,
            offsets: (cfg.source.kind == SourceKind::Kafka).then(|| {
                if checkpoints.is_some() {
                    OffsetTracker::with_checkpoints()
                } else {
                    OffsetTracker::default()
                }
            }),
            offsets_dirty: false,
            checkpoints,
            sinks,
            series_from_key: cfg.kafka.series_from_key,
            limits: Limits {
                max_series_name_bytes: cfg.windows.max_series_name_bytes,
                max_future_secs: cfg.windows.max_future_secs,
                now: 0.0,
            },
        };
        stage.batch = stage.new_batch();
        stage
    }

    /// A CSV stream whose first line is its header.
    pub fn header_next(&self) -> bool {
        matches!(self.input, RecordInput::Lines(LineParser::CsvHeaderNext { .. }))
    }

    /// Batches this stage sent whose inference has not finished (the dispatcher counts them down).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.clone()
    }

    fn discard(&mut self, reason: &'static str, detail: &dyn std::fmt::Display) {
        self.metrics.records_discarded.with_label_values(&[reason]).inc();
        match self.bad.entry(reason).or_default().tick() {
            Some(count) => warn!(reason, error = %detail, count, "Dropped record."),
            None => debug!(reason, error = %detail, "Dropped record."),
        }
    }

    fn new_batch(&mut self) -> Batch {
        let (w, f) = self.model.dims();
        self.seq += 1;
        Batch {
            // Reserve for a typical batch, not for a huge configured maximum.
            windows: Vec::with_capacity(self.batch_max.min(256) * w * f),
            meta: Vec::with_capacity(self.batch_max.min(256)),
            ..Batch::empty(self.seq - 1, self.model.clone())
        }
    }

    /// Sends the batch (if it holds anything) and starts a new one; false when scoring is gone.
    async fn flush(&mut self, tx: &mpsc::Sender<ToScoring>) -> bool {
        self.deadline = None;
        if let (true, Some(offsets)) = (self.offsets_dirty, &mut self.offsets) {
            self.offsets_dirty = false;
            // Checkpoints first: the offsets safe to store trail to them.
            if let Some(c) = &self.checkpoints {
                let spec = self.spec;
                let encoded = offsets.checkpoints().into_iter().map(|cp| {
                    let topic = c.topics.name(cp.ack.topic);
                    cp.encode(&topic, spec)
                });
                self.batch.checkpoints.extend(encoded);
            }
            self.batch.acks = offsets.safe();
        }
        let idle = self.batch.acks.is_empty() && self.batch.deliveries.is_empty() && self.batch.checkpoints.is_empty();
        let moved = !(self.batch.evicted.is_empty() && self.batch.revoked.is_empty() && self.batch.assigned.is_empty());
        if self.batch.meta.is_empty() && !moved && idle {
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
            self.spec = WindowSpec::for_model(&swap.model.model, self.spec.stride);
            self.windower = Windower::with_max_series(self.spec, Preprocessor::new(&swap.model.model.meta), self.max_series);
            // Windows restart here, in a new phase: what the offsets held and the checkpoints
            // read back were for the old ones.
            if let Some(offsets) = &mut self.offsets {
                offsets.forget_all();
                self.offsets_dirty = true;
            }
            if let Some(c) = &mut self.checkpoints {
                c.resumes = Resumes::default();
            }
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

    /// A replayed record of a series with a checkpoint: resumes the series at it, or says to
    /// skip it (its windows were delivered before).
    fn replay(&mut self, series: &str, ack: Ack) -> bool {
        let Some(c) = self.checkpoints.as_mut().filter(|c| !c.resumes.is_empty()) else { return false };
        let event = match c.resumes.at(series, ack) {
            Replay::Window => return false,
            Replay::Skip => {
                self.metrics.replay_skipped.inc();
                self.handled(ack);
                return true;
            }
            Replay::Resume(resume) if self.windower.resume(series, &resume) => "resumed",
            Replay::Resume(_) | Replay::Stale => "stale",
        };
        self.metrics.window_checkpoints.with_label_values(&[event]).inc();
        false
    }

    /// Windows one record; sends the batch when full. False when scoring is gone.
    async fn push(&mut self, record: RawRecord, ack: Option<Ack>, tx: &mpsc::Sender<ToScoring>) -> bool {
        if ack.is_some_and(|ack| self.replay(&record.series, ack)) {
            return true;
        }
        let pushed = self.windower.push(&record, &mut self.batch.windows);
        if pushed.unknown_category {
            self.metrics.errors.with_label_values(&["window", "unknown_category"]).inc();
        }
        if let (Some(offsets), Some(ack)) = (&mut self.offsets, ack) {
            let windower = &self.windower;
            let resume = || pushed.start.and_then(|start| windower.resume_point(&record.series, start));
            match pushed.outcome {
                Outcome::Dropped(_) => offsets.dropped(ack),
                _ => offsets.windowed(ack, &record.series, pushed.held, pushed.start.is_some(), resume),
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
                let input = ack.map(|a| (a.topic, a.partition));
                self.batch.meta.push(WindowInfo { series: record.series, input, start_ts, end_ts });
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
                    Some(Some(Ok(record))) => match self.limits.admit(&record.series, record.ts) {
                        Ok(()) => return self.push(record, ack, tx).await,
                        Err(refused) => Err(refused),
                    },
                    Some(Some(Err(e))) => Err((e.reason(), e.to_string())),
                }
            }
            RecordInput::Flows(flows) => match parse_flow(line).map_err(|e| (e.reason(), e.to_string())) {
                Ok(flow) => self.limits.admit(&flow.host, Some(flow.end_ns as f64 / 1e9)).and_then(|()| flows.add(&flow)),
                Err(e) => Err(e),
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
        let Some(sinks) = self.sinks.as_ref().filter(|s| s.has_dead_letters()) else { return };
        match sinks.dead_letter(payload, origin, reason, detail).await {
            Some(delivery) => self.batch.deliveries.push((delivery, KafkaOutput::DeadLetter(reason))),
            None => self.metrics.produce_errors.with_label_values(&["dead_letter"]).inc(),
        }
    }

    /// Partitions went to another consumer: their series' window state goes (the new owner
    /// rebuilds it from the committed offsets), and the alert stage forgets them.
    async fn revoke(&mut self, partitions: &[(usize, i32)], tx: &mpsc::Sender<ToScoring>) -> bool {
        let Some(offsets) = &mut self.offsets else { return true };
        let gone = offsets.revoke(partitions);
        self.offsets_dirty = true;
        if let Some(c) = &mut self.checkpoints {
            c.resumes.revoke(partitions);
        }
        self.windower.drop_series(&gone);
        info!(partitions = partitions.len(), series = gone.len(), "Dropped the window state of revoked partitions' series.");
        self.batch.revoked.extend(gone);
        self.flush(tx).await
    }

    /// Newly assigned partitions: their series' checkpoints, before any of their records. A
    /// read that fails is logged; those series start afresh.
    async fn restore(&mut self, assigned: &[(usize, i32)]) {
        let Some(c) = &mut self.checkpoints else { return };
        let started = Instant::now();
        let records = match read_back(&c.kafka, "kafka.checkpoints_topic", &c.kafka.checkpoints_topic, assigned).await {
            Ok(records) => records,
            Err(error) => {
                error!(error = format!("{error:#}"), "Window checkpoints not read; the assigned partitions' series start afresh.");
                return;
            }
        };
        let topics = c.topics.clone();
        let found = c.resumes.restore(records, assigned, |name| topics.index(name), self.spec);
        let m = &self.metrics;
        m.window_checkpoints.with_label_values(&["restored"]).inc_by(found.checkpoints as u64);
        m.window_checkpoints.with_label_values(&["foreign"]).inc_by(found.foreign as u64);
        m.window_checkpoints.with_label_values(&["corrupt"]).inc_by(found.corrupt as u64);
        info!(
            partitions = assigned.len(),
            restored = found.checkpoints,
            foreign = found.foreign,
            corrupt = found.corrupt,
            secs = started.elapsed().as_secs_f64(),
            "Window checkpoints read back."
        );
    }

    async fn push_all(&mut self, records: Vec<RawRecord>, tx: &mpsc::Sender<ToScoring>) -> bool {
        for record in records {
            if !self.push(record, None, tx).await {
                return false;
            }
        }
        true
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<Input>>, mut swaps: mpsc::Receiver<ModelSwap>, tx: mpsc::Sender<ToScoring>) {
        loop {
            // Biased: a reload is applied before more input, and a due batch before new lines.
            let deadline = self.deadline;
            let freed = self.in_flight.freed();
            let waits_for_scorer = self.flush_when_idle && !self.batch.meta.is_empty();
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
                _ = freed.notified(), if waits_for_scorer => {
                    if rx.is_empty() && self.in_flight.below(self.scorers) && !self.flush(&tx).await { return; }
                    continue;
                }
            };
            let Some(inputs) = input else { break };
            self.limits.clock_now();
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
                    Input::Assigned(partitions) => {
                        self.restore(&partitions).await;
                        self.batch.assigned.extend(partitions);
                        true
                    }
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
            let records = flows.drain();
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

/// The flow aggregation a flow model was trained with (its bucket width), fed by goflow2 lines.
pub fn flow_input(model: &Model, cfg: &Config) -> Result<FlowInput> {
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
