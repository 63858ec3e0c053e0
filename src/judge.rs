//! A scored window → the threshold in force for its series, its `anomaly_score`, and the alert
//! event it causes: the one path of the daemon's alert stage and of `anomalyd score`, so a
//! backtest alerts exactly as the daemon would have.

use crate::alert::{Event, Observation, Tracker};
use crate::config::AlertRules;
use crate::threshold::{Choice, Thresholds};

pub struct Judge {
    pub thresholds: Thresholds,
    pub tracker: Tracker,
}

/// What one window came to.
pub struct Judged {
    /// The raw score that was anomaly_score 1.0 for this window.
    pub threshold: f64,
    pub anomaly_score: f64,
    pub event: Option<Event>,
}

impl Judge {
    /// New rules (a reload): the policy and threshold settings apply from the next window on.
    pub fn set_rules(&mut self, rules: &AlertRules) {
        self.tracker.set_policy(rules.base.clone());
        self.thresholds.set_settings(rules.thresholds.clone());
    }

    /// Judges one window of `obs.series` (windows of a series in event-time order). The series'
    /// threshold replaces `obs.threshold`.
    pub fn window(&mut self, rules: &AlertRules, mut obs: Observation) -> Judged {
        let series = rules.for_series(obs.series);
        let choice = Choice { mode: series.threshold_mode, risk: self.thresholds.risk(series.threshold_risk) };
        obs.threshold = self.thresholds.observe(obs.series, obs.score, choice);
        let event = self.tracker.observe_with(&obs, &series.policy);
        Judged { threshold: obs.threshold, anomaly_score: obs.score / obs.threshold, event }
    }

    /// Drops a series' state (idle eviction, revoked partition): whether it had a threshold
    /// state, and whether its alert was firing.
    pub fn forget(&mut self, series: &str) -> Forgotten {
        Forgotten { threshold: self.thresholds.forget(series), firing: self.tracker.forget(series) }
    }
}

pub struct Forgotten {
    pub threshold: bool,
    pub firing: bool,
}
