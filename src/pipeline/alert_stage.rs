//! The alert stage: scored batches, in sequence order, → alert policy → alert events, scores and
//! per-series metrics; each batch's Kafka deliveries and offsets then go to the committer.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use rdkafka::producer::DeliveryFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::commit::Pending;
use super::{Batch, Scored};
use ndarray::s;

use crate::alert::{AlertState, Event, Observation};
use crate::config::{AlertRules, KafkaConfig};
use crate::judge::{Judge, Judged};
use crate::model::lifecycle::ModelInUse;
use crate::model::{as_windows, Scores};
use crate::sink::kafka::{KafkaOutput, KafkaSinks};
use crate::sink::JsonLines;
use crate::source::kafka::{read_back, Topics};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::LogEvery;
use crate::threshold::store::{self, Loaded};

/// Built by `app` from its parts; everything it holds is its own until the input closes.
pub struct AlertStage {
    pub metrics: Arc<Metrics>,
    /// Kafka source: each handled batch's outputs and offsets go to the committer.
    pub committer: Option<mpsc::Sender<Pending>>,
    /// Alert policy and per-series overrides, swapped by a reload.
    pub rules: watch::Receiver<AlertRules>,
    /// Every series' threshold (`[thresholds]`) and alert state.
    pub judge: Judge,
    /// `[thresholds] state_dir`: where the thresholds are restored from at start, and saved to at
    /// drain and every `save_interval_secs`.
    pub state_dir: Option<PathBuf>,
    /// The model the thresholds were learnt for; a batch of another one may reset them.
    pub model: Arc<ModelInUse>,
    /// Alert events (`output.sink`).
    pub sink: JsonLines,
    /// `output.scores_path`: every scored window.
    pub scores: Option<JsonLines>,
    /// Kafka outputs, for scores and alert events.
    pub sinks: Option<KafkaSinks>,
    pub save_errors: LogEvery,
    /// `kafka.thresholds_topic`: where each series' threshold state follows its partition.
    pub changelog: Option<Changelog>,
}

/// The thresholds' changelog: every series' input partition, and whether its state changed
/// since it was last written.
pub struct Changelog {
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub placed: HashMap<String, Placed>,
}

pub struct Placed {
    /// The input topic (index) and partition of its last window.
    input: (usize, i32),
    changed: bool,
}

impl Changelog {
    /// A window of `series` from `input` was judged: its state changed.
    fn judged(&mut self, series: &str, input: Option<(usize, i32)>) {
        let Some(input) = input else { return };
        match self.placed.get_mut(series) {
            Some(placed) => *placed = Placed { input, changed: true },
            None => {
                self.placed.insert(series.to_string(), Placed { input, changed: true });
            }
        }
    }
}

impl AlertStage {
    /// Handles batches strictly in sequence order: windows of one series must reach the alert
    /// state machine in event-time order, and batches can finish inference out of order.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Scored>) -> Result<()> {
        self.restore();
        let mut saving = None;
        let interval = Duration::from_secs(self.judge.thresholds.settings().save_interval_secs.max(1));
        // Saves come on time whether windows arrive or not (a quiet stream's last state too).
        let mut save = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = 0u64;
        let mut waiting: BTreeMap<u64, Scored> = BTreeMap::new();
        loop {
            tokio::select! {
                scored = rx.recv() => {
                    let Some(scored) = scored else { break };
                    waiting.insert(scored.batch.seq, scored);
                    while let Some(scored) = waiting.remove(&next) {
                        if let Err(error) = self.complete(scored).await {
                            self.flush();
                            return Err(error);
                        }
                        next += 1;
                    }
                }
                _ = save.tick() => {
                    self.save_in_background(&mut saving).await;
                    self.write_changed().await;
                }
            }
        }
        for (_, scored) in std::mem::take(&mut waiting) {
            if let Err(error) = self.complete(scored).await {
                self.flush();
                return Err(error);
            }
        }
        self.flush();
        self.write_changed().await;
        // The last word is the drain's: after any periodic save still writing.
        if let Some(running) = saving.take() {
            self.record_save(running.await.map_err(|e| e.to_string()).and_then(|r| r));
        }
        if let Some(dir) = &self.state_dir {
            let result = self.judge.thresholds.save(dir, &self.model.model.score_owner());
            self.record_save(result);
        }
        Ok(())
    }

    /// Thresholds from the state file, if there is one for this model.
    fn restore(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        let owner = self.model.model.score_owner();
        let m = &self.metrics;
        match self.judge.thresholds.load(dir, &owner) {
            Ok(Loaded::Restored { series, skipped }) => {
                if skipped > 0 {
                    m.threshold_resets.with_label_values(&["state_corrupt"]).inc_by(skipped as u64);
                    warn!(file = %store::path(dir).display(), skipped, "Threshold state lines that do not parse were skipped; those series warm up again.");
                }
                info!(file = %store::path(dir).display(), series, "Thresholds restored.");
            }
            Ok(Loaded::Missing) => info!(file = %store::path(dir).display(), "No threshold state yet; every series warms up."),
            Ok(Loaded::Foreign(other)) => {
                m.threshold_resets.with_label_values(&["state_foreign"]).inc();
                warn!(file = %store::path(dir).display(), saved_for = %other.model, onnx_sha256 = %other.onnx_sha256,
                    "Threshold state is for another model or score scale; every series warms up again.");
            }
            Err(error) => {
                m.threshold_resets.with_label_values(&["state_corrupt"]).inc();
                error!(%error, "Threshold state not usable; every series warms up again.");
            }
        }
        self.update_threshold_gauges();
    }

    /// The state of every series whose state changed since it was last written, to the
    /// changelog; delivered (awaited by the committer) like a batch's outputs.
    async fn write_changed(&mut self) {
        let (Some(changelog), Some(sinks), Some(committer)) = (&mut self.changelog, &self.sinks, &self.committer) else { return };
        let owner = self.model.model.score_owner();
        let mut deliveries = Vec::new();
        for (series, placed) in changelog.placed.iter_mut().filter(|(_, p)| p.changed) {
            placed.changed = false;
            let (topic, partition) = (changelog.topics.name(placed.input.0), placed.input.1);
            let Some(state) = self.judge.thresholds.change(series, &topic, &owner) else { continue };
            if let Some(delivery) = sinks.threshold(series, partition, Some(&state)).await {
                deliveries.push((delivery, KafkaOutput::Thresholds));
            }
        }
        if deliveries.is_empty() {
            return;
        }
        self.metrics.threshold_changelog.with_label_values(&["written"]).inc_by(deliveries.len() as u64);
        let _ = committer.send(super::commit::Pending { deliveries, ..Default::default() }).await;
    }

    /// Newly assigned partitions: their series' thresholds from the changelog, before any of
    /// their windows is judged. A replay that fails is logged; those series warm up.
    async fn replay(&mut self, assigned: &[(usize, i32)]) {
        let Some(changelog) = &self.changelog else { return };
        let named: Vec<(String, i32)> = assigned.iter().map(|&(t, p)| (changelog.topics.name(t), p)).collect();
        let started = Instant::now();
        let kafka = &changelog.kafka;
        let records = match read_back(kafka, "kafka.thresholds_topic", &kafka.thresholds_topic, assigned).await {
            Ok(records) => records,
            Err(error) => {
                error!(error = format!("{error:#}"), "Thresholds' changelog not replayed; the assigned partitions' series warm up.");
                return;
            }
        };
        let owner = self.model.model.score_owner();
        let found = self.judge.thresholds.replay(records, &named, &owner);
        let m = &self.metrics;
        m.threshold_changelog.with_label_values(&["restored"]).inc_by(found.restored as u64);
        m.threshold_resets.with_label_values(&["state_foreign"]).inc_by(found.foreign as u64);
        m.threshold_resets.with_label_values(&["state_corrupt"]).inc_by(found.corrupt as u64);
        info!(partitions = ?named, restored = found.restored, foreign = found.foreign, corrupt = found.corrupt,
            secs = started.elapsed().as_secs_f64(), "Thresholds replayed from the changelog.");
        self.update_threshold_gauges();
    }

    /// A periodic save: a snapshot of the thresholds, written on a blocking thread so the stage
    /// goes on judging windows (at 100,000 series the write takes about half a second). One at a
    /// time: while the last one still writes, this interval's is skipped.
    async fn save_in_background(&mut self, saving: &mut Option<JoinHandle<Result<u64, String>>>) {
        let Some(dir) = self.state_dir.clone() else { return };
        if saving.as_ref().is_some_and(|running| !running.is_finished()) {
            return;
        }
        if let Some(done) = saving.take() {
            self.record_save(done.await.map_err(|e| e.to_string()).and_then(|r| r));
        }
        let (snapshot, owner) = (self.judge.thresholds.snapshot(), self.model.model.score_owner());
        *saving = Some(tokio::task::spawn_blocking(move || snapshot.write(&dir, &owner)));
    }

    fn record_save(&mut self, result: Result<u64, String>) {
        match result {
            Ok(_) => self.metrics.threshold_saves.with_label_values(&["ok"]).inc(),
            Err(error) => {
                self.metrics.threshold_saves.with_label_values(&["error"]).inc();
                if let Some(count) = self.save_errors.tick() {
                    error!(%error, count, "Cannot save the threshold state.");
                }
            }
        }
    }

    /// A batch of a reloaded model: its threshold and tail apply; its scores are on another scale
    /// when its network or input scaling changed, and then every series' threshold starts again.
    fn follow_model(&mut self, model: &Arc<ModelInUse>) {
        if Arc::ptr_eq(&self.model, model) {
            return;
        }
        let rescaled = self.model.model.score_owner() != model.model.score_owner();
        let reset = self.judge.thresholds.set_model(model.threshold_start(), rescaled);
        if reset > 0 {
            self.metrics.threshold_resets.with_label_values(&["model_changed"]).inc_by(reset as u64);
            info!(series = reset, model = %model.model.meta.name, "The new model scores on another scale: every series' threshold warms up again.");
        }
        self.model = model.clone();
    }

    fn update_threshold_gauges(&self) {
        let (warming, own) = self.judge.thresholds.phases();
        self.metrics.threshold_series.with_label_values(&["warming"]).set(warming as i64);
        self.metrics.threshold_series.with_label_values(&["own"]).set(own as i64);
    }

    /// Handles a batch, then hands what it produced on Kafka and its offsets to the committer,
    /// which stores the offsets once the outputs are delivered. A batch that could not be scored
    /// fails the stage before its offsets go: a restart scores it again.
    async fn complete(&mut self, scored: Scored) -> Result<()> {
        let mut batch = scored.batch;
        let scores = scored.scores.map_err(|error| {
            self.metrics.errors.with_label_values(&["scoring", "inference"]).inc();
            anyhow!("inference failed on a batch of {} windows: {error}", batch.meta.len())
        })?;
        let acks = std::mem::take(&mut batch.acks);
        let checkpoints = std::mem::take(&mut batch.checkpoints);
        let mut deliveries = std::mem::take(&mut batch.deliveries);
        self.handle(batch, scores, &mut deliveries).await;
        if let Some(committer) = &self.committer {
            let _ = committer.send(Pending { deliveries, checkpoints, acks }).await;
        }
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(scores) = &mut self.scores {
            scores.flush();
        }
        self.sink.flush();
    }

    async fn handle(&mut self, batch: Batch, scores: Scores, out: &mut Vec<(DeliveryFuture, KafkaOutput)>) {
        let m = self.metrics.clone();
        if self.rules.has_changed().unwrap_or(false) {
            self.judge.set_rules(&self.rules.borrow_and_update());
        }
        self.follow_model(&batch.model);
        if !batch.assigned.is_empty() {
            self.replay(&batch.assigned).await;
        }
        let rules = self.rules.borrow().clone();
        let (w, f) = batch.model.dims();
        let windows = as_windows(&batch.windows, w, f);
        let model = &batch.model.model.meta;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        for (i, meta) in batch.meta.iter().enumerate() {
            let score = scores.score[i] as f64;
            if !score.is_finite() {
                // Nothing to judge: counted and logged, never a silent NaN score or a missed alert.
                if m.non_finite_score() {
                    warn!(series = %meta.series, score, window_end_ts = meta.end_ts, "Window scored non-finite; not judged.");
                }
                continue;
            }
            let obs = Observation {
                series: &meta.series,
                window_start_ts: meta.start_ts,
                window_end_ts: meta.end_ts,
                score,
                threshold: f64::NAN,
                feature_names: &model.features,
                feature_scores: scores.feature_scores.row(i).to_slice().expect("rows of a standard-layout array are contiguous"),
                latest: windows.slice(s![i, w - 1, ..]).to_slice().expect("a window's rows are contiguous"),
            };
            let Judged { threshold, anomaly_score, event } = self.judge.window(&rules, obs);
            if let Some(changelog) = &mut self.changelog {
                changelog.judged(&meta.series, meta.input);
            }
            m.windows_scored.inc();
            if anomaly_score > 1.0 {
                m.anomalous_windows.inc();
            }
            m.event_to_score.observe((now - meta.end_ts).max(0.0));
            let to_kafka = self.sinks.as_ref().filter(|s| s.has_scores());
            if self.scores.is_some() || to_kafka.is_some() {
                let line = serde_json::json!({
                    "series": meta.series, "window_start_ts": meta.start_ts, "window_end_ts": meta.end_ts,
                    "score": score, "threshold": threshold, "anomaly_score": anomaly_score, "model": model.name,
                })
                .to_string();
                if let Some(scores) = &mut self.scores {
                    scores.write(&line);
                }
                if let Some(sinks) = to_kafka {
                    match sinks.score(&meta.series, &line).await {
                        Some(delivery) => out.push((delivery, KafkaOutput::Score)),
                        None => m.produce_errors.with_label_values(&["score"]).inc(),
                    }
                }
            }
            if let Some(event) = event {
                self.emit(event, &model.name, out).await;
            }
            let firing = self.judge.tracker.state(&meta.series) == AlertState::Firing;
            m.series_score(&meta.series, anomaly_score, threshold, firing);
        }
        // A revoked series' last state goes to its new owner; an idle one's is dropped there too.
        for (series, revoked) in batch.revoked.iter().map(|s| (s, true)).chain(batch.evicted.iter().map(|s| (s, false))) {
            self.hand_over(series, revoked, out).await;
            let forgotten = self.judge.forget(series);
            if forgotten.firing {
                info!(series = %series, "Series dropped (idle, or its partition revoked) while its alert was firing.");
            }
            if forgotten.threshold {
                // Its threshold starts again if it comes back, here or on another consumer.
                m.threshold_resets.with_label_values(&["series_dropped"]).inc();
            }
            m.forget_series(series);
        }
        m.set_firing_series(self.judge.tracker.firing());
        self.update_threshold_gauges();
        self.flush();
    }

    /// A series leaves this consumer: its state (revoked) or a tombstone (idle) to the changelog.
    async fn hand_over(&mut self, series: &str, revoked: bool, out: &mut Vec<(DeliveryFuture, KafkaOutput)>) {
        let (Some(changelog), Some(sinks)) = (&mut self.changelog, &self.sinks) else { return };
        let Some(placed) = changelog.placed.remove(series) else { return };
        let (topic, partition) = (changelog.topics.name(placed.input.0), placed.input.1);
        let state = revoked.then(|| self.judge.thresholds.change(series, &topic, &self.model.model.score_owner())).flatten();
        if revoked && state.is_none() {
            return; // Nothing to hand over (a static threshold).
        }
        let event = if state.is_some() { "written" } else { "tombstone" };
        if let Some(delivery) = sinks.threshold(series, partition, state.as_deref()).await {
            out.push((delivery, KafkaOutput::Thresholds));
            self.metrics.threshold_changelog.with_label_values(&[event]).inc();
        }
    }

    async fn emit(&mut self, event: Event, model: &str, out: &mut Vec<(DeliveryFuture, KafkaOutput)>) {
        let (kind, alert) = event.parts();
        self.metrics.alerts.with_label_values(&[kind]).inc();
        let top = alert.top_features.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(",");
        self.metrics.series_alert(&alert.series, matches!(event, Event::Fired(_)).then_some((model, top.as_str())));
        let line = event.to_json(model);
        info!(series = %alert.series, event = kind, anomaly_score = alert.anomaly_score, "Alert.");
        if let Some(sinks) = &self.sinks {
            match sinks.alert(&alert.series, &line.to_string()).await {
                Some(delivery) => out.push((delivery, KafkaOutput::Alert)),
                None if sinks.has_alerts() => self.metrics.produce_errors.with_label_values(&["alert"]).inc(),
                None => {}
            }
        }
        self.sink.write(&line.to_string());
    }
}
