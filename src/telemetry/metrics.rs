//! The only place metric names and label values exist (`anomalyd_<name>_<unit>[_total]`).
//!
//! Self-monitoring metrics carry no series labels. The product metrics — per-series
//! `anomalyd_anomaly_score`, `anomalyd_series_threshold`, `anomalyd_alert_firing` and, while an alert fires,
//! `anomalyd_alert_info` (its model and top features, for Prometheus alert rules) — carry
//! `series`, for at most `admin.max_series_metrics` series; windows of further series are
//! counted in `anomalyd_series_metrics_dropped_total` instead of growing the scrape without bound.
//!
//! Counters whose label values are known in advance start at 0 ([`DISCARD_REASONS`],
//! [`ERROR_KINDS`], ...): a counter that first appears at 1 has no earlier sample, so
//! `increase()` in an alert rule (ModelReloadFailed, RecordsDeadLettered) would miss its first
//! event, and a dashboard would show "No data" rather than 0. Add new label values there.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::LogEvery;

/// `records_discarded_total{reason}`: parse errors (`record::ParseError::reason`, flows), late
/// flows, Kafka messages without a key for `kafka.series_from_key`, and records over the window
/// stage's limits (series name length, event time ahead of the clock) — the first
/// [`DEAD_LETTER_REASONS`], which also go to a dead-letter topic — then window drops
/// (`window::Dropped`).
const DISCARD_REASONS: [&str; 12] = [
    "malformed",
    "wrong_type",
    "missing_field",
    "too_long",
    "bad_timestamp",
    "late_flow",
    "missing_key",
    "series_name_too_long",
    "future_timestamp",
    "out_of_order",
    "nan",
    "series_limit",
];
const DEAD_LETTER_REASONS: usize = 9;
/// `errors_total{stage, error_type}`.
const ERROR_KINDS: [(&str, &str); 11] = [
    ("source", "read"),
    ("window", "unknown_category"),
    ("scoring", "inference"),
    ("scoring", "non_finite_score"),
    ("alert", "sink"),
    ("alert", "scores_sink"),
    ("kafka", "consume"),
    ("kafka", "offset_store"),
    ("kafka", "authentication"),
    ("kafka", "all_brokers_down"),
    ("kafka", "client"),
];

/// Why the admin server closed a connection early (`admin_connections_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminClose {
    /// At `admin.max_connections`: the oldest connection not inside a request made room.
    Evicted,
    /// At `admin.max_connections` with every connection inside a request: the new one.
    Rejected,
    /// No complete request head within `admin.header_read_timeout_ms`.
    HeaderTimeout,
    /// A request head over `admin.max_request_head_bytes` (answered 431).
    HeadTooLarge,
}

impl AdminClose {
    pub const ALL: [AdminClose; 4] = [AdminClose::Evicted, AdminClose::Rejected, AdminClose::HeaderTimeout, AdminClose::HeadTooLarge];

    pub fn label(self) -> &'static str {
        match self {
            AdminClose::Evicted => "evicted",
            AdminClose::Rejected => "rejected",
            AdminClose::HeaderTimeout => "header_timeout",
            AdminClose::HeadTooLarge => "head_too_large",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub records_received: IntCounter,
    pub records_discarded: IntCounterVec,
    pub windows_scored: IntCounter,
    pub anomalous_windows: IntCounter,
    pub alerts: IntCounterVec,
    /// Series whose alert fires now; `firing_series_deprecated` is the same under its old name
    /// `anomalyd_alerts_firing`, one letter from the per-series `anomalyd_alert_firing`.
    firing_series: IntGauge,
    firing_series_deprecated: IntGauge,
    pub errors: IntCounterVec,
    pub inference_duration: Histogram,
    pub inference_batch: Histogram,
    pub event_to_score: Histogram,
    pub series_live: IntGauge,
    pub series_warming: IntGauge,
    pub series_evicted: IntCounter,
    pub threshold_series: IntGaugeVec,
    pub threshold_resets: IntCounterVec,
    pub threshold_saves: IntCounterVec,
    pub threshold_changelog: IntCounterVec,
    pub window_checkpoints: IntCounterVec,
    pub replay_skipped: IntCounter,
    pub window_bytes: IntGauge,
    pub anomaly_score: GaugeVec,
    /// The raw score that is anomaly_score 1.0 for the series now (`[thresholds]`).
    series_threshold: GaugeVec,
    pub alert_firing: IntGaugeVec,
    /// `{series, model, top_features}` = 1 while the series' alert fires.
    alert_info: IntGaugeVec,
    pub series_metrics_dropped: IntCounter,
    pub model_info: IntGaugeVec,
    pub model_threshold: Gauge,
    pub model_loaded: Gauge,
    pub ready: IntGauge,
    pub reloads: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub produce_errors: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub rebalances: IntCounterVec,
    pub commits: IntCounterVec,
    admin_closed: IntCounterVec,
    /// Series that own per-series gauges (the cardinality cap), each with the `model` and
    /// `top_features` labels of its `alert_info` while its alert fires (needed to remove it).
    exported: Mutex<HashMap<String, Option<[String; 2]>>>,
    max_series_metrics: usize,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric name is valid");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric name is valid");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("metric name is valid");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric name is valid");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric name is valid");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl Metrics {
    /// How many series' alerts fire now (under both names while the old one is deprecated).
    pub fn set_firing_series(&self, n: usize) {
        self.firing_series.set(n as i64);
        self.firing_series_deprecated.set(n as i64);
    }

    pub fn new(max_series_metrics: usize) -> Metrics {
        let r = Registry::new();
        let anomaly_score = GaugeVec::new(
            Opts::new("anomalyd_anomaly_score", "Latest normalised anomaly score per series (1.0 = threshold)."),
            &["series"],
        )
        .expect("metric name is valid");
        r.register(Box::new(anomaly_score.clone())).expect("metric registered once");
        let series_threshold = GaugeVec::new(
            Opts::new("anomalyd_series_threshold", "Raw score threshold in force per series (anomaly_score 1.0; [thresholds])."),
            &["series"],
        )
        .expect("metric name is valid");
        r.register(Box::new(series_threshold.clone())).expect("metric registered once");
        let alert_firing =
            IntGaugeVec::new(Opts::new("anomalyd_alert_firing", "1 while an alert is firing for the series, else 0."), &["series"])
                .expect("metric name is valid");
        r.register(Box::new(alert_firing.clone())).expect("metric registered once");
        let alert_info = IntGaugeVec::new(
            Opts::new(
                "anomalyd_alert_info",
                "1 while an alert fires for the series: the model and the top features (comma-separated) of the window that fired.",
            ),
            &["series", "model", "top_features"],
        )
        .expect("metric name is valid");
        r.register(Box::new(alert_info.clone())).expect("metric registered once");
        let model_info = IntGaugeVec::new(
            Opts::new("anomalyd_model_info", "The loaded model bundle (value 1)."),
            &["model", "kind", "score_kind", "sha256", "trainer_version"],
        )
        .expect("metric name is valid");
        r.register(Box::new(model_info.clone())).expect("metric registered once");
        let model_threshold =
            Gauge::new("anomalyd_model_threshold", "Raw score threshold in force (anomaly_score 1.0).").expect("metric name is valid");
        r.register(Box::new(model_threshold.clone())).expect("metric registered once");
        let model_loaded =
            Gauge::new("anomalyd_model_loaded_timestamp_seconds", "When the model in use was loaded.").expect("metric name is valid");
        r.register(Box::new(model_loaded.clone())).expect("metric registered once");
        let build = IntGaugeVec::new(Opts::new("anomalyd_build_info", "Build of this anomalyd (value 1)."), &["version"])
            .expect("metric name is valid");
        r.register(Box::new(build.clone())).expect("metric registered once");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let latency = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
        let m = Metrics {
            records_received: counter(&r, "anomalyd_records_received_total", "Records read from the source."),
            records_discarded: counter_vec(
                &r,
                "anomalyd_records_discarded_total",
                "Records skipped, by reason (malformed, wrong_type, missing_field, too_long, bad_timestamp, late_flow, missing_key, series_name_too_long, future_timestamp, out_of_order, nan, series_limit).",
                &["reason"],
            ),
            windows_scored: counter(&r, "anomalyd_windows_scored_total", "Windows scored by the model."),
            anomalous_windows: counter(&r, "anomalyd_anomalous_windows_total", "Scored windows with anomaly_score > 1."),
            alerts: counter_vec(&r, "anomalyd_alerts_total", "Alert events, by state (firing, resolved).", &["state"]),
            firing_series: gauge(&r, "anomalyd_firing_series", "Series whose alert is firing now (all series, not capped)."),
            firing_series_deprecated: gauge(
                &r,
                "anomalyd_alerts_firing",
                "Deprecated: the same as anomalyd_firing_series, which replaces it (docs/operations.md).",
            ),
            errors: counter_vec(&r, "anomalyd_errors_total", "Errors, by stage and type.", &["stage", "error_type"]),
            inference_duration: histogram(
                &r,
                "anomalyd_inference_duration_seconds",
                "ONNX Runtime time per batch.",
                latency.clone(),
            ),
            inference_batch: histogram(
                &r,
                "anomalyd_inference_batch_windows",
                "Windows per inference batch.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            event_to_score: histogram(
                &r,
                "anomalyd_event_to_score_seconds",
                "From a window's last event time to its score (wall clock).",
                // Fine around tens of milliseconds, where a healthy stream's latency is, and up to
                // an hour for replays and stalled upstreams.
                vec![
                    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    30.0, 300.0, 3600.0,
                ],
            ),
            series_live: gauge(&r, "anomalyd_series_live", "Series with window state."),
            series_warming: gauge(&r, "anomalyd_series_warming", "Series still filling their first window."),
            series_evicted: counter(&r, "anomalyd_series_evicted_total", "Series dropped after idle_timeout_secs."),
            threshold_series: gauge_vec(
                &r,
                "anomalyd_threshold_series",
                "Series with threshold state ([thresholds]), by phase (warming: on the model's threshold; own).",
                &["phase"],
            ),
            threshold_resets: counter_vec(
                &r,
                "anomalyd_threshold_resets_total",
                "Series whose threshold state was dropped or not restored, by reason (model_changed, state_foreign, state_corrupt, series_dropped: idle or partition revoked).",
                &["reason"],
            ),
            threshold_saves: counter_vec(&r, "anomalyd_threshold_state_saves_total", "Saves of the threshold state file, by result.", &["result"]),
            threshold_changelog: counter_vec(
                &r,
                "anomalyd_threshold_changelog_records_total",
                "Records of the thresholds' changelog topic, by event (written, tombstone: sent; restored: series taken over from it).",
                &["event"],
            ),
            window_checkpoints: counter_vec(
                &r,
                "anomalyd_window_checkpoints_total",
                "Window checkpoints (kafka.checkpoints_topic), by event (written: sent; restored: read back for an assigned partition; resumed: a series resumed from one; stale: its series started afresh after it; foreign: for other windows; corrupt: not a checkpoint).",
                &["event"],
            ),
            replay_skipped: counter(
                &r,
                "anomalyd_replay_records_skipped_total",
                "Replayed records before their series' window checkpoint: handled, their windows were delivered before.",
            ),
            window_bytes: gauge(&r, "anomalyd_window_bytes", "Bytes held by window buffers."),
            series_metrics_dropped: counter(
                &r,
                "anomalyd_series_metrics_dropped_total",
                "Scored windows of series beyond admin.max_series_metrics (no per-series gauges).",
            ),
            ready: gauge(&r, "anomalyd_ready", "1 once config, model and source are up."),
            reloads: counter_vec(&r, "anomalyd_reloads_total", "Config and model reloads, by result (ok, error).", &["result"]),
            dead_letters: counter_vec(&r, "anomalyd_dead_letters_total", "Records sent to the dead-letter topic, by reason.", &["reason"]),
            consumer_lag: gauge_vec(
                &r,
                "anomalyd_kafka_consumer_lag_messages",
                "Messages behind the partition's end, from librdkafka statistics.",
                &["topic", "partition"],
            ),
            assigned_partitions: gauge(&r, "anomalyd_kafka_assigned_partitions", "Kafka partitions assigned to this consumer."),
            rebalances: counter_vec(&r, "anomalyd_kafka_rebalances_total", "Consumer group rebalances, by kind (assign, revoke, error).", &["kind"]),
            commits: counter_vec(&r, "anomalyd_kafka_commits_total", "Offset commits, by result (ok, error).", &["result"]),
            produce_errors: counter_vec(
                &r,
                "anomalyd_kafka_produce_errors_total",
                "Kafka messages not delivered, by output (dead_letter, score, alert, thresholds).",
                &["output"],
            ),
            admin_closed: counter_vec(
                &r,
                "anomalyd_admin_connections_closed_total",
                "Admin connections closed by the server's limits, by reason (evicted, rejected, header_timeout, head_too_large).",
                &["reason"],
            ),
            anomaly_score,
            series_threshold,
            alert_firing,
            alert_info,
            model_info,
            model_threshold,
            model_loaded,
            exported: Mutex::new(HashMap::new()),
            max_series_metrics,
            registry: r,
        };
        for reason in DISCARD_REASONS {
            m.records_discarded.with_label_values(&[reason]).reset();
        }
        for reason in &DISCARD_REASONS[..DEAD_LETTER_REASONS] {
            m.dead_letters.with_label_values(&[reason]).reset();
        }
        for (stage, error_type) in ERROR_KINDS {
            m.errors.with_label_values(&[stage, error_type]).reset();
        }
        for state in ["firing", "resolved"] {
            m.alerts.with_label_values(&[state]).reset();
        }
        for result in ["ok", "error"] {
            m.reloads.with_label_values(&[result]).reset();
            m.commits.with_label_values(&[result]).reset();
        }
        for output in ["dead_letter", "score", "alert", "thresholds", "checkpoint"] {
            m.produce_errors.with_label_values(&[output]).reset();
        }
        for reason in ["model_changed", "state_foreign", "state_corrupt", "series_dropped"] {
            m.threshold_resets.with_label_values(&[reason]).reset();
        }
        for result in ["ok", "error"] {
            m.threshold_saves.with_label_values(&[result]).reset();
        }
        for event in ["written", "tombstone", "restored"] {
            m.threshold_changelog.with_label_values(&[event]).reset();
        }
        for event in ["written", "restored", "resumed", "stale", "foreign", "corrupt"] {
            m.window_checkpoints.with_label_values(&[event]).reset();
        }
        for phase in ["warming", "own"] {
            m.threshold_series.with_label_values(&[phase]).set(0);
        }
        for kind in ["assign", "revoke", "error"] {
            m.rebalances.with_label_values(&[kind]).reset();
        }
        for reason in AdminClose::ALL {
            m.admin_closed.with_label_values(&[reason.label()]).reset();
        }
        m
    }

    /// A window whose score came back NaN or ±inf (the model overflowed on extreme input): counted
    /// in `errors_total{stage="scoring",error_type="non_finite_score"}`; the caller drops the
    /// window. True when this one is to be logged (the first, then one in [`LOG_EVERY`](super::LOG_EVERY)).
    pub fn non_finite_score(&self) -> bool {
        let counter = self.errors.with_label_values(&["scoring", "non_finite_score"]);
        counter.inc();
        LogEvery::due(counter.get())
    }

    pub fn admin_connection_closed(&self, reason: AdminClose) {
        self.admin_closed.with_label_values(&[reason.label()]).inc();
    }

    /// Sets the per-series gauges if the series has (or can get) a slot under the cap.
    pub fn series_score(&self, series: &str, anomaly_score: f64, threshold: f64, firing: bool) {
        let mut exported = self.exported.lock().expect("metrics lock is never poisoned: no panics while held");
        if self.slot(&mut exported, series).is_none() {
            self.series_metrics_dropped.inc();
            return;
        }
        self.anomaly_score.with_label_values(&[series]).set(anomaly_score);
        self.series_threshold.with_label_values(&[series]).set(threshold);
        self.alert_firing.with_label_values(&[series]).set(firing as i64);
    }

    /// An alert event: `Some((model, top_features))` when it fires exports `anomalyd_alert_info`
    /// for the series (under the cap, like its other gauges), `None` when it resolves removes it.
    pub fn series_alert(&self, series: &str, firing: Option<(&str, &str)>) {
        let mut exported = self.exported.lock().expect("metrics lock is never poisoned: no panics while held");
        let Some(info) = self.slot(&mut exported, series) else { return };
        if let Some([model, top]) = info.take() {
            let _ = self.alert_info.remove_label_values(&[series, &model, &top]);
        }
        if let Some((model, top)) = firing {
            self.alert_info.with_label_values(&[series, model, top]).set(1);
            *info = Some([model.to_string(), top.to_string()]);
        }
    }

    /// Removes an evicted series' gauges and frees its slot.
    pub fn forget_series(&self, series: &str) {
        let mut exported = self.exported.lock().expect("metrics lock is never poisoned: no panics while held");
        if let Some(info) = exported.remove(series) {
            let _ = self.anomaly_score.remove_label_values(&[series]);
            let _ = self.series_threshold.remove_label_values(&[series]);
            let _ = self.alert_firing.remove_label_values(&[series]);
            if let Some([model, top]) = info {
                let _ = self.alert_info.remove_label_values(&[series, &model, &top]);
            }
        }
    }

    /// The series' slot under the cap (taken if free), or None when the cap is reached.
    fn slot<'a>(&self, exported: &'a mut HashMap<String, Option<[String; 2]>>, series: &str) -> Option<&'a mut Option<[String; 2]>> {
        if !exported.contains_key(series) {
            if exported.len() >= self.max_series_metrics {
                return None;
            }
            exported.insert(series.to_string(), None);
        }
        exported.get_mut(series)
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("Prometheus text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_series_gauges_stop_at_the_cap_and_free_slots_on_eviction() {
        let m = Metrics::new(2);
        m.series_score("a", 0.5, 2.0, false);
        m.series_score("b", 2.0, 2.0, true);
        m.series_score("c", 3.0, 2.0, true);
        let text = m.render();
        assert!(text.contains("anomalyd_anomaly_score{series=\"b\"} 2"));
        assert!(!text.contains("series=\"c\""));
        assert!(text.contains("anomalyd_series_metrics_dropped_total 1"));
        m.forget_series("a");
        m.series_score("c", 3.0, 2.0, true);
        assert!(m.render().contains("anomalyd_alert_firing{series=\"c\"} 1"));
    }

    #[test]
    fn alert_info_carries_top_features_while_firing_under_the_cap() {
        let m = Metrics::new(1);
        let info = |text: &str| text.lines().filter(|l| l.starts_with("anomalyd_alert_info{")).map(String::from).collect::<Vec<_>>();
        m.series_alert("a", Some(("pump", "Current,Pressure")));
        m.series_score("a", 3.0, 2.0, true);
        assert_eq!(info(&m.render()), ["anomalyd_alert_info{model=\"pump\",series=\"a\",top_features=\"Current,Pressure\"} 1"]);
        // Beyond the cap: no gauge at all for "b", firing or not.
        m.series_alert("b", Some(("pump", "Temperature")));
        m.series_score("b", 3.0, 2.0, true);
        assert!(!m.render().contains("series=\"b\""));
        // Resolved: gone; fired again with other features: only the new label set.
        m.series_alert("a", None);
        assert!(info(&m.render()).is_empty());
        m.series_alert("a", Some(("pump", "Voltage")));
        assert_eq!(info(&m.render()), ["anomalyd_alert_info{model=\"pump\",series=\"a\",top_features=\"Voltage\"} 1"]);
        // Evicted while firing: gone, and its slot is free for "b".
        m.forget_series("a");
        assert!(info(&m.render()).is_empty());
        m.series_alert("b", Some(("pump", "Temperature")));
        assert_eq!(info(&m.render()).len(), 1);
    }

    #[test]
    fn counters_that_rules_take_increase_of_start_at_zero() {
        let text = Metrics::new(1).render();
        for sample in [
            "anomalyd_reloads_total{result=\"error\"} 0",
            "anomalyd_dead_letters_total{reason=\"malformed\"} 0",
            "anomalyd_records_discarded_total{reason=\"series_limit\"} 0",
            "anomalyd_errors_total{error_type=\"inference\",stage=\"scoring\"} 0",
            "anomalyd_alerts_total{state=\"firing\"} 0",
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample} missing");
        }
        assert!(!text.contains("anomalyd_dead_letters_total{reason=\"out_of_order\"}"), "window drops are never dead-lettered");
    }
}
