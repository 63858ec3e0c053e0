//! The alert stage: scored batches, in sequence order, → alert policy → alert events, scores and
//! per-series metrics; each batch's Kafka deliveries and offsets then go to the committer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::producer::DeliveryFuture;
use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use super::commit::Pending;
use super::Scored;
use ndarray::s;

use crate::alert::{AlertState, Event, Observation, Tracker};
use crate::config::AlertRules;
use crate::model::as_windows;
use crate::sink::kafka::{KafkaOutput, KafkaSinks};
use crate::sink::JsonLines;
use crate::telemetry::metrics::Metrics;

/// Built by `app` from its parts; everything it holds is its own until the input closes.
pub struct AlertStage {
    pub metrics: Arc<Metrics>,
    /// Kafka source: each handled batch's outputs and offsets go to the committer.
    pub committer: Option<mpsc::Sender<Pending>>,
    /// Alert policy and per-series overrides, swapped by a reload.
    pub rules: watch::Receiver<AlertRules>,
    pub tracker: Tracker,
    /// Alert events (`output.sink`).
    pub sink: JsonLines,
    /// `output.scores_path`: every scored window.
    pub scores: Option<JsonLines>,
    /// Kafka outputs, for scores and alert events.
    pub sinks: Option<KafkaSinks>,
}

impl AlertStage {
    /// Handles batches strictly in sequence order: windows of one series must reach the alert
    /// state machine in event-time order, and batches can finish inference out of order.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Scored>) {
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
        if let Some(scores) = &mut self.scores {
            scores.flush();
        }
        self.sink.flush();
    }

    async fn handle(&mut self, scored: Scored, out: &mut Vec<(DeliveryFuture, KafkaOutput)>) {
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
        let windows = as_windows(&batch.windows, w, f);
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
            let to_kafka = self.sinks.as_ref().filter(|s| s.has_scores());
            if self.scores.is_some() || to_kafka.is_some() {
                let line = serde_json::json!({
                    "series": meta.series, "window_start_ts": meta.start_ts, "window_end_ts": meta.end_ts,
                    "score": score, "anomaly_score": anomaly, "model": model.name,
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
            let obs = Observation {
                series: &meta.series,
                window_start_ts: meta.start_ts,
                window_end_ts: meta.end_ts,
                score,
                threshold,
                feature_names: &model.features,
                feature_scores: scores.feature_scores.row(i).to_slice().expect("rows of a standard-layout array are contiguous"),
                latest: windows.slice(s![i, w - 1, ..]).to_slice().expect("a window's rows are contiguous"),
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
        m.set_firing_series(self.tracker.firing());
        self.flush();
    }

    async fn emit(&mut self, event: Event, model: &str, out: &mut Vec<(DeliveryFuture, KafkaOutput)>) {
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
                Some(delivery) => out.push((delivery, KafkaOutput::Alert)),
                None if sinks.has_alerts() => self.metrics.produce_errors.with_label_values(&["alert"]).inc(),
                None => {}
            }
        }
        self.sink.write(&line.to_string());
    }
}
