//! Alert policy: when a series' scored windows turn into a firing alert, and when it resolves.
//!
//! A single window over threshold is weak evidence: scores are noisy, and an alert per window would
//! flap. So an alert fires only when N of the last M windows are hits, resolves only after K
//! consecutive clean windows, and may then stay quiet for a cooldown in event time. All of it is
//! tunable ([`Policy`]) and swappable on reload without losing per-series state: the tracker keeps
//! the raw hit history (one bit per window), not a verdict, so a new N of M re-reads the same
//! history.
//!
//! Scores are compared on the normalised scale `anomaly_score = score / threshold` (> 1 is
//! anomalous at the bundle's threshold), so one `min_anomaly_score` means the same thing for
//! every model.
//!
//! Time is event time (`window_end_ts`), never the wall clock: a replay or a backtest alerts
//! exactly as the live daemon did.
//!
//! Each series moves through this state machine, one window at a time:
//!
//! ```text
//!                        hit, fewer than N in the last M
//!                 ┌──────────────────────────────────────────────┐
//!                 │                                              ▼
//!    ┌─────┬────▶ Ok ◀────────── no hits left in the last M ── Pending
//!    │     │      │                                              │
//!    │     │      │ hit making N of the last M                   │ hit making N of the last M:
//!    │     │      │ (so N = 1): emit Fired                       │ emit Fired
//!    │     │      ▼                                              │
//!    │     │    Firing ◀─────────────────────────────────────────┘
//!    │     │      │
//!    │     └──────┤ K consecutive clean windows: emit Resolved;
//!    │            │ to Ok when cooldown_secs = 0, else to Cooldown
//!    │            ▼
//!    │         Cooldown    (hits are not recorded)
//!    │            │
//!    └────────────┘ a window with event time >= resolved_ts + cooldown_secs
//!                   (that same window is then evaluated from Ok as usual)
//! ```
//!
//! `Resolved` is an event kind, never a resting state. Resolving clears the hit history: the
//! hits that made the last alert must not count toward the next one, or a series would re-fire
//! on its first new hit.
//!
//! Over half of this file is its unit tests, kept inline (STYLE.md): the policy's edge cases
//! (N of M on reload, cooldown with NaN times, out-of-range policies) are its specification.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Tunable in the config file; swapped on reload. Missing fields take their defaults, unknown
/// fields are rejected (a misspelt threshold must not silently fall back to the default).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// A window is a hit when anomaly_score > min_anomaly_score (and direction/min_deviation allow it).
    pub min_anomaly_score: f64,
    pub direction: Direction,
    /// Minimum |latest scaled value| (training standard deviations) of the window's top feature for a hit.
    pub min_deviation: f64,
    /// Fire when at least `fire_hits` of the last `fire_windows` windows are hits (N of M); 1 <= N <= M <= 64.
    pub fire_hits: u32,
    pub fire_windows: u32,
    /// Resolve after this many consecutive non-hit windows.
    pub resolve_after: u32,
    /// After a resolve, no new alert for this series until event time has advanced this much.
    pub cooldown_secs: f64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            min_anomaly_score: 1.0,
            direction: Direction::Both,
            min_deviation: 0.0,
            fire_hits: 1,
            fire_windows: 1,
            resolve_after: 3,
            cooldown_secs: 0.0,
        }
    }
}

/// The hit history is one u64 per series.
const MAX_FIRE_WINDOWS: u32 = 64;

impl Policy {
    /// The first problem found, naming the field. The tracker never panics on a policy that fails
    /// this, but its behaviour then is unspecified; config loading is where this is enforced.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in
            [("min_anomaly_score", self.min_anomaly_score), ("min_deviation", self.min_deviation), ("cooldown_secs", self.cooldown_secs)]
        {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} ({v}) must be a finite number >= 0"));
            }
        }
        if !(1..=MAX_FIRE_WINDOWS).contains(&self.fire_windows) {
            return Err(format!("fire_windows ({}) must be between 1 and {MAX_FIRE_WINDOWS}", self.fire_windows));
        }
        if self.fire_hits < 1 {
            return Err(format!("fire_hits ({}) must be >= 1", self.fire_hits));
        }
        if self.fire_hits > self.fire_windows {
            return Err(format!("fire_hits ({}) must be <= fire_windows ({})", self.fire_hits, self.fire_windows));
        }
        if self.resolve_after < 1 {
            return Err(format!("resolve_after ({}) must be >= 1", self.resolve_after));
        }
        Ok(())
    }

    /// The bits of the hit history that the N of M rule reads.
    fn window_mask(&self) -> u64 {
        match self.fire_windows {
            0 => 0,
            m if m >= MAX_FIRE_WINDOWS => u64::MAX,
            m => (1u64 << m) - 1,
        }
    }

    /// Whether a window is a hit, and its anomaly score.
    fn judge(&self, obs: &Observation) -> (bool, f64) {
        let anomaly_score = obs.score / obs.threshold;
        // A broken score or threshold says nothing about the series; alerting on it would page
        // someone for a model or config fault.
        let valid = obs.score.is_finite() && obs.threshold.is_finite() && obs.threshold > 0.0;
        if !(valid && anomaly_score.is_finite() && anomaly_score > self.min_anomaly_score) {
            return (false, anomaly_score);
        }
        let md = self.min_deviation;
        if self.direction == Direction::Both && md <= 0.0 {
            return (true, anomaly_score);
        }
        let value = top_feature(obs.feature_scores).and_then(|i| obs.latest.get(i)).map(|&v| f64::from(v));
        let passes = match self.direction {
            Direction::Above => value.is_some_and(|v| v > md),
            Direction::Below => value.is_some_and(|v| v < -md),
            Direction::Both => value.is_some_and(|v| v.abs() >= md),
        };
        (passes, anomaly_score)
    }
}

/// Which side of its training mean the top feature must be on for a hit: a CPU metric may only
/// matter when high, a throughput metric only when it drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The top feature's latest scaled value is > +min_deviation.
    Above,
    /// The top feature's latest scaled value is < -min_deviation.
    Below,
    /// |latest scaled value| >= min_deviation (always passes when min_deviation is 0).
    Both,
}

/// One scored window, as the alert stage sees it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub series: &'a str,
    /// Unix seconds: event time of the window's first row.
    pub window_start_ts: f64,
    /// Event time of the window's last row; the clock of the state machine.
    pub window_end_ts: f64,
    /// Raw model score.
    pub score: f64,
    /// Raw threshold in force for this series (> 0).
    pub threshold: f64,
    pub feature_names: &'a [String],
    /// Per-feature contributions, len F.
    pub feature_scores: &'a [f32],
    /// The window's last row, scaled, len F.
    pub latest: &'a [f32],
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub series: String,
    /// Firing or Resolved: the kind of event.
    pub state: AlertState,
    /// Of the window that triggered this event.
    pub anomaly_score: f64,
    pub score: f64,
    pub threshold: f64,
    /// Max anomaly score of the alert's hit windows so far.
    pub peak_anomaly_score: f64,
    pub window_start_ts: f64,
    pub window_end_ts: f64,
    /// window_end_ts of the window that fired.
    pub started_ts: f64,
    /// Top 3 contributions of the firing window (for Resolved: of the resolving window).
    pub top_features: Vec<TopFeature>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopFeature {
    pub name: String,
    pub contribution: f32,
    /// Latest scaled value.
    pub value: f32,
}

/// A series' resting state (see the module doc), and in [`Alert::state`] the kind of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Ok,
    Pending,
    Firing,
    /// Only an event kind, never a resting state.
    Resolved,
    Cooldown,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Fired(Alert),
    Resolved(Alert),
}

impl Event {
    /// "firing" or "resolved", and the alert.
    pub fn parts(&self) -> (&'static str, &Alert) {
        match self {
            Event::Fired(a) => ("firing", a),
            Event::Resolved(a) => ("resolved", a),
        }
    }

    /// The alert event line of the daemon's outputs and `anomalyd score --alerts`: the alert's
    /// fields, `event` and `model`.
    pub fn to_json(&self, model: &str) -> serde_json::Value {
        let (kind, alert) = self.parts();
        let mut line = serde_json::to_value(alert).expect("alerts serialise");
        line["event"] = kind.into();
        line["model"] = model.into();
        line
    }
}

/// Per-series state. Ok and Pending are one phase here: which one a series is in depends on the
/// current policy's M, so deriving it lets a reload re-read the history without a pass over all
/// series.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Watching,
    Firing { started_ts: f64, peak: f64, clean_run: u32 },
    Cooldown { resolved_ts: f64 },
}

/// About 32 bytes a series. A series is only stored while it has something to remember (a hit
/// in its last 64 windows, or an alert or cooldown in progress), so the many quiet series of a
/// large fleet cost nothing, not even an allocation per window.
#[derive(Debug, Clone, Copy)]
struct Series {
    /// Bit 0 is the latest window; a set bit is a hit.
    hits: u64,
    phase: Phase,
}

pub struct Tracker {
    policy: Policy,
    series: HashMap<String, Series>,
    firing: usize,
}

impl Tracker {
    pub fn new(policy: Policy) -> Tracker {
        Tracker { policy, series: HashMap::new(), firing: 0 }
    }

    /// Swap the policy (hot reload); per-series state is kept. The hit history is kept but re-read
    /// against the new N of M. A series whose history already holds N hits under the new policy
    /// fires on its next hit, so every Fired alert is for a window that is itself a hit.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Feed one window (windows of a series in event-time order); returns the event it causes, if any.
    pub fn observe(&mut self, obs: &Observation) -> Option<Event> {
        let policy = self.policy.clone();
        self.observe_with(obs, &policy)
    }

    /// As [`Tracker::observe`], under a per-series policy (config overrides) instead of the
    /// tracker's own.
    pub fn observe_with(&mut self, obs: &Observation, policy: &Policy) -> Option<Event> {
        let (hit, anomaly_score) = policy.judge(obs);
        let s = match self.series.get_mut(obs.series) {
            Some(s) => s,
            None if !hit => return None,
            None => self.series.entry(obs.series.to_owned()).or_insert(Series { hits: 0, phase: Phase::Watching }),
        };
        let ts = obs.window_end_ts;
        let hits = (s.hits << 1) | u64::from(hit);
        let p = policy;

        let (phase, hits, event) = match s.phase {
            // Hits are not recorded: they would fire the next alert the moment the cooldown ends.
            // Written as "before the end" so a NaN time cannot hold a series in cooldown forever.
            Phase::Cooldown { resolved_ts } if ts < resolved_ts + p.cooldown_secs => return None,
            // A cooldown this window ends is left before the window is evaluated, as from Ok.
            Phase::Watching | Phase::Cooldown { .. } => {
                if hit && (hits & p.window_mask()).count_ones() >= p.fire_hits {
                    self.firing += 1;
                    let fired = alert(obs, AlertState::Firing, anomaly_score, ts, anomaly_score);
                    (Phase::Firing { started_ts: ts, peak: anomaly_score, clean_run: 0 }, hits, Some(Event::Fired(fired)))
                } else {
                    (Phase::Watching, hits, None)
                }
            }
            Phase::Firing { started_ts, peak, clean_run } => {
                let clean_run = if hit { 0 } else { clean_run.saturating_add(1) };
                let peak = if hit { peak.max(anomaly_score) } else { peak };
                if hit || clean_run < p.resolve_after {
                    (Phase::Firing { started_ts, peak, clean_run }, hits, None)
                } else {
                    self.firing -= 1;
                    let resolved = alert(obs, AlertState::Resolved, anomaly_score, started_ts, peak);
                    let next = if p.cooldown_secs > 0.0 { Phase::Cooldown { resolved_ts: ts } } else { Phase::Watching };
                    // The hits that made this alert must not count toward the next one.
                    (next, 0, Some(Event::Resolved(resolved)))
                }
            }
        };

        if matches!(phase, Phase::Watching) && hits == 0 {
            self.series.remove(obs.series);
        } else {
            *s = Series { hits, phase };
        }
        event
    }

    /// The series' resting state (Ok for unknown series).
    pub fn state(&self, series: &str) -> AlertState {
        match self.series.get(series).map(|s| (s.phase, s.hits)) {
            None => AlertState::Ok,
            Some((Phase::Watching, hits)) if hits & self.policy.window_mask() == 0 => AlertState::Ok,
            Some((Phase::Watching, _)) => AlertState::Pending,
            Some((Phase::Firing { .. }, _)) => AlertState::Firing,
            Some((Phase::Cooldown { .. }, _)) => AlertState::Cooldown,
        }
    }

    /// Drop a series' state (idle eviction / revoked partition). Returns true when it was firing.
    /// No Resolved event: the caller knows why the series went away and reports it if needed.
    pub fn forget(&mut self, series: &str) -> bool {
        let was_firing = matches!(self.series.remove(series), Some(Series { phase: Phase::Firing { .. }, .. }));
        if was_firing {
            self.firing -= 1;
        }
        was_firing
    }

    /// Number of series currently Firing.
    pub fn firing(&self) -> usize {
        self.firing
    }
}

/// How many features an alert (and `anomalyd score`) names.
pub const TOP_FEATURES: usize = 3;

/// The indices of the `k` largest contributions, largest first; ties go to the lowest index and
/// NaN contributions (a feature the model could not score) are never named. The one ranking the
/// daemon's alerts and `anomalyd score` both use, so the two blame the same features.
pub fn ranked_features(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| !scores[i].is_nan()).collect();
    // Stable, and NaN was filtered out, so equal contributions keep index order.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order.truncate(k);
    order
}

fn top_feature(scores: &[f32]) -> Option<usize> {
    ranked_features(scores, 1).first().copied()
}

/// The [`TOP_FEATURES`] largest contributions, in [`ranked_features`] order.
fn top_features(obs: &Observation) -> Vec<TopFeature> {
    let scores = obs.feature_scores;
    ranked_features(scores, TOP_FEATURES)
        .into_iter()
        .map(|i| TopFeature {
            // Lengths come from the bundle; a mismatch degrades the report, not the alert.
            name: obs.feature_names.get(i).cloned().unwrap_or_else(|| format!("feature_{i}")),
            contribution: scores[i],
            value: obs.latest.get(i).copied().unwrap_or(f32::NAN),
        })
        .collect()
}

fn alert(obs: &Observation, state: AlertState, anomaly_score: f64, started_ts: f64, peak: f64) -> Alert {
    Alert {
        series: obs.series.to_owned(),
        state,
        anomaly_score,
        score: obs.score,
        threshold: obs.threshold,
        peak_anomaly_score: peak,
        window_start_ts: obs.window_start_ts,
        window_end_ts: obs.window_end_ts,
        started_ts,
        top_features: top_features(obs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owns what an `Observation` borrows. Default: 4 features, the top one (index 1) at +3.0 sd.
    struct Window {
        series: &'static str,
        end_ts: f64,
        score: f64,
        threshold: f64,
        names: Vec<String>,
        scores: Vec<f32>,
        latest: Vec<f32>,
    }

    impl Window {
        fn obs(&self) -> Observation<'_> {
            Observation {
                series: self.series,
                window_start_ts: self.end_ts - 9.0,
                window_end_ts: self.end_ts,
                score: self.score,
                threshold: self.threshold,
                feature_names: &self.names,
                feature_scores: &self.scores,
                latest: &self.latest,
            }
        }
    }

    /// Threshold 2, so anomaly_score = score / 2.
    fn window(series: &'static str, end_ts: f64, score: f64) -> Window {
        Window {
            series,
            end_ts,
            score,
            threshold: 2.0,
            names: ["a", "b", "c", "d"].map(String::from).to_vec(),
            scores: vec![0.1, 0.5, 0.2, 0.05],
            latest: vec![-4.0, 3.0, 1.0, 0.0],
        }
    }

    const HIT: f64 = 4.0;
    const CLEAN: f64 = 1.0;

    fn policy(fire_hits: u32, fire_windows: u32, resolve_after: u32, cooldown_secs: f64) -> Policy {
        Policy { fire_hits, fire_windows, resolve_after, cooldown_secs, ..Policy::default() }
    }

    /// Feeds `series` one window per score at ts 0, 1, 2, ... after `start`; returns the events by window.
    fn feed(t: &mut Tracker, series: &'static str, start: f64, scores: &[f64]) -> Vec<Option<Event>> {
        scores.iter().enumerate().map(|(i, &s)| t.observe(&window(series, start + i as f64, s).obs())).collect()
    }

    fn fired(e: &Option<Event>) -> bool {
        matches!(e, Some(Event::Fired(_)))
    }

    #[test]
    fn fires_on_the_nth_hit_within_m_and_not_before() {
        let mut t = Tracker::new(policy(3, 5, 3, 0.0));
        let events = feed(&mut t, "a", 0.0, &[HIT, CLEAN, HIT, CLEAN]);
        assert!(events.iter().all(Option::is_none));
        assert_eq!(t.state("a"), AlertState::Pending);
        let events = feed(&mut t, "a", 4.0, &[HIT]);
        let Some(Event::Fired(alert)) = &events[0] else { panic!("3 of the last 5 must fire: {events:?}") };
        assert_eq!((alert.state, alert.started_ts, alert.anomaly_score), (AlertState::Firing, 4.0, 2.0));
        assert_eq!(t.state("a"), AlertState::Firing);
        assert_eq!(t.firing(), 1);

        // The first hit has left the last 5 windows when the third arrives.
        let events = feed(&mut t, "b", 0.0, &[HIT, CLEAN, CLEAN, CLEAN, CLEAN, HIT, HIT]);
        assert!(events.iter().all(Option::is_none), "{events:?}");
        assert_eq!(t.state("b"), AlertState::Pending);
        assert!(fired(&feed(&mut t, "b", 7.0, &[HIT])[0]));
    }

    #[test]
    fn an_isolated_hit_then_clean_windows_returns_to_ok_without_firing() {
        let mut t = Tracker::new(policy(2, 3, 3, 0.0));
        assert!(feed(&mut t, "a", 0.0, &[HIT, CLEAN, CLEAN]).iter().all(Option::is_none));
        assert_eq!(t.state("a"), AlertState::Pending, "the hit is still within the last 3");
        assert!(feed(&mut t, "a", 3.0, &[CLEAN])[0].is_none());
        assert_eq!(t.state("a"), AlertState::Ok);
        assert_eq!(t.firing(), 0);
    }

    #[test]
    fn resolves_after_exactly_k_clean_windows_and_a_hit_restarts_the_count() {
        let mut t = Tracker::new(policy(1, 1, 3, 0.0));
        let events = feed(&mut t, "a", 0.0, &[HIT, 10.0, CLEAN, CLEAN, HIT, CLEAN, CLEAN]);
        assert!(fired(&events[0]));
        assert!(events[1..].iter().all(Option::is_none), "{events:?}");
        assert_eq!(t.state("a"), AlertState::Firing);

        let events = feed(&mut t, "a", 7.0, &[CLEAN]);
        let Some(Event::Resolved(alert)) = &events[0] else { panic!("3rd clean window must resolve: {events:?}") };
        assert_eq!(alert.state, AlertState::Resolved);
        assert_eq!(alert.started_ts, 0.0);
        assert_eq!(alert.peak_anomaly_score, 5.0);
        assert_eq!((alert.anomaly_score, alert.window_end_ts), (0.5, 7.0));
        assert_eq!(t.state("a"), AlertState::Ok);
        assert_eq!(t.firing(), 0);
    }

    #[test]
    fn cooldown_suppresses_a_new_alert_until_event_time_passes_then_allows_one() {
        let mut t = Tracker::new(policy(1, 1, 1, 100.0));
        assert!(fired(&t.observe(&window("a", 0.0, HIT).obs())));
        assert!(matches!(t.observe(&window("a", 10.0, CLEAN).obs()), Some(Event::Resolved(_))));
        assert_eq!(t.state("a"), AlertState::Cooldown);
        for ts in [50.0, 109.9] {
            assert_eq!(t.observe(&window("a", ts, HIT).obs()), None, "at {ts}");
            assert_eq!(t.state("a"), AlertState::Cooldown);
        }
        // resolved at 10 + 100 s: the window at 110 ends the cooldown and is itself evaluated.
        assert!(fired(&t.observe(&window("a", 110.0, HIT).obs())));
    }

    #[test]
    fn hits_during_cooldown_do_not_count_toward_the_next_alert() {
        let mut t = Tracker::new(policy(2, 10, 1, 100.0));
        let events = feed(&mut t, "a", 0.0, &[HIT, HIT, CLEAN]);
        assert!(fired(&events[1]) && matches!(events[2], Some(Event::Resolved(_))));
        assert!(feed(&mut t, "a", 20.0, &[HIT, HIT, HIT]).iter().all(Option::is_none));
        assert_eq!(t.observe(&window("a", 102.0, HIT).obs()), None, "one hit since the cooldown is not 2 of 10");
        assert_eq!(t.state("a"), AlertState::Pending);
        assert!(fired(&t.observe(&window("a", 103.0, HIT).obs())));
    }

    #[test]
    fn direction_and_min_deviation_gate_hits_on_the_top_features_latest_value() {
        let hits = |direction, min_deviation, latest: [f32; 4]| {
            let mut t = Tracker::new(Policy { direction, min_deviation, ..Policy::default() });
            let mut w = window("a", 0.0, HIT);
            w.latest = latest.to_vec();
            fired(&t.observe(&w.obs()))
        };
        // The top feature is index 1 (largest contribution), whatever the other values.
        let up = [-9.0, 3.0, 0.0, 0.0];
        let down = [9.0, -3.0, 0.0, 0.0];
        assert!(hits(Direction::Above, 2.0, up));
        assert!(!hits(Direction::Above, 2.0, down));
        assert!(!hits(Direction::Above, 3.0, up), "Above is strict");
        assert!(hits(Direction::Below, 2.0, down));
        assert!(!hits(Direction::Below, 2.0, up));
        assert!(hits(Direction::Both, 2.0, down) && hits(Direction::Both, 2.0, up));
        assert!(!hits(Direction::Both, 3.5, up));
        assert!(hits(Direction::Both, 3.0, up), "Both is inclusive");

        // Without features there is no top feature: only the ungated policy passes.
        let no_features = |direction, min_deviation| {
            let mut t = Tracker::new(Policy { direction, min_deviation, ..Policy::default() });
            let mut w = window("a", 0.0, HIT);
            (w.names, w.scores, w.latest) = (vec![], vec![], vec![]);
            let e = t.observe(&w.obs());
            if let Some(Event::Fired(a)) = &e {
                assert!(a.top_features.is_empty());
            }
            fired(&e)
        };
        assert!(no_features(Direction::Both, 0.0));
        assert!(!no_features(Direction::Above, 0.0));
        assert!(!no_features(Direction::Both, 0.5));
    }

    #[test]
    fn top_features_are_the_three_largest_contributions_ties_by_lowest_index() {
        let mut t = Tracker::new(Policy { direction: Direction::Below, ..Policy::default() });
        let mut w = window("a", 0.0, HIT);
        w.names = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        w.scores = vec![0.2, f32::NAN, 0.7, 0.2, 0.7];
        w.latest = vec![1.0, 2.0, -3.0, 4.0, 5.0];
        let Some(Event::Fired(alert)) = t.observe(&w.obs()) else { panic!("top feature c is below 0") };
        let top: Vec<_> = alert.top_features.iter().map(|f| (f.name.as_str(), f.contribution, f.value)).collect();
        assert_eq!(top, [("c", 0.7, -3.0), ("e", 0.7, 5.0), ("a", 0.2, 1.0)]);
    }

    #[test]
    fn set_policy_keeps_a_firing_series_firing_and_applies_the_new_resolve_after() {
        let mut t = Tracker::new(policy(1, 1, 5, 0.0));
        let events = feed(&mut t, "a", 0.0, &[HIT, CLEAN, CLEAN]);
        assert!(fired(&events[0]));
        t.set_policy(policy(1, 1, 3, 0.0));
        assert_eq!((t.state("a"), t.firing()), (AlertState::Firing, 1));
        let events = feed(&mut t, "a", 3.0, &[CLEAN]);
        let Some(Event::Resolved(alert)) = &events[0] else { panic!("3rd clean under K = 3: {events:?}") };
        assert_eq!(alert.started_ts, 0.0, "the alert survived the reload");
    }

    #[test]
    fn set_policy_rereads_the_hit_history_against_the_new_n_of_m() {
        let mut t = Tracker::new(policy(3, 8, 3, 0.0));
        feed(&mut t, "a", 0.0, &[HIT, CLEAN]);
        feed(&mut t, "b", 0.0, &[HIT, CLEAN, CLEAN]);
        feed(&mut t, "c", 0.0, &[HIT, HIT]);
        t.set_policy(policy(2, 2, 3, 0.0));
        assert_eq!(t.state("b"), AlertState::Ok, "b's hit is not within the last 2");
        t.set_policy(policy(2, 3, 3, 0.0));
        assert_eq!(t.state("b"), AlertState::Pending, "b's history was kept");
        // 3 of 8 would need another hit; 2 of 3 fires now.
        assert!(fired(&feed(&mut t, "a", 2.0, &[HIT])[0]));
        // c already holds 2 of the last 3, but an alert fires only on a window that is itself a hit.
        assert_eq!(feed(&mut t, "c", 2.0, &[CLEAN, HIT]).iter().map(fired).collect::<Vec<_>>(), [false, true]);
    }

    #[test]
    fn forget_reports_whether_it_was_firing() {
        let mut t = Tracker::new(policy(2, 2, 3, 0.0));
        feed(&mut t, "firing", 0.0, &[HIT, HIT]);
        feed(&mut t, "pending", 0.0, &[HIT]);
        assert_eq!(t.firing(), 1);
        assert!(t.forget("firing"));
        assert_eq!((t.state("firing"), t.firing()), (AlertState::Ok, 0));
        assert!(!t.forget("pending"));
        assert_eq!(t.state("pending"), AlertState::Ok);
        assert!(!t.forget("unknown"));
        assert!(!t.forget("firing"), "already forgotten");
    }

    #[test]
    fn nan_and_infinite_scores_are_not_hits() {
        let mut t = Tracker::new(Policy::default());
        for score in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(t.observe(&window("a", 0.0, score).obs()), None, "score {score}");
            assert_eq!(t.state("a"), AlertState::Ok);
        }
        for threshold in [0.0, -1.0, f64::NAN, 1e-320] {
            let mut w = window("a", 0.0, HIT);
            w.threshold = threshold;
            assert_eq!(t.observe(&w.obs()), None, "threshold {threshold}");
        }
        // Nor a broken contribution or value vector: no panic, the ungated policy still fires.
        let mut w = window("a", 0.0, HIT);
        (w.scores, w.latest) = (vec![f32::NAN; 4], vec![f32::NAN; 2]);
        assert!(fired(&t.observe(&w.obs())));

        // A NaN window while firing is clean, so it counts toward the resolve.
        let mut t = Tracker::new(policy(1, 1, 1, 0.0));
        let events = feed(&mut t, "a", 0.0, &[HIT, f64::NAN]);
        assert!(matches!(events[1], Some(Event::Resolved(_))));
    }

    #[test]
    fn out_of_range_policies_do_not_panic_and_keep_events_consistent() {
        for p in [policy(0, 0, 0, 0.0), policy(100, 200, 0, f64::NAN), policy(1, 64, u32::MAX, -1.0)] {
            let mut t = Tracker::new(p.clone());
            let scores: Vec<f64> = (0..70).map(|i| if i % 3 == 0 { CLEAN } else { HIT }).collect();
            let mut events = feed(&mut t, "a", 0.0, &scores);
            events.push(t.observe(&window("a", f64::NAN, HIT).obs()));
            // Whatever the policy, a series fires only on a hit, and fired and resolved alternate.
            let mut firing = false;
            for e in events.iter().flatten() {
                match e {
                    Event::Fired(a) => {
                        assert!(!firing && a.anomaly_score > 1.0, "{p:?}: fired twice, or on a clean window");
                        firing = true;
                    }
                    Event::Resolved(_) => {
                        assert!(firing, "{p:?}: resolved without firing");
                        firing = false;
                    }
                }
            }
            assert_eq!(t.state("a") == AlertState::Firing, firing, "{p:?}");
            assert_eq!(t.firing(), usize::from(firing), "{p:?}: the firing count follows the events");
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(Policy::default().validate(), Ok(()));
        assert_eq!(policy(64, 64, 1, 0.0).validate(), Ok(()));
        assert_eq!(policy(5, 3, 3, 0.0).validate(), Err("fire_hits (5) must be <= fire_windows (3)".into()));
        let bad = [
            (policy(0, 3, 3, 0.0), "fire_hits"),
            (policy(1, 0, 3, 0.0), "fire_windows"),
            (policy(1, 65, 3, 0.0), "fire_windows"),
            (policy(1, 1, 0, 0.0), "resolve_after"),
            (policy(1, 1, 1, -1.0), "cooldown_secs"),
            (policy(1, 1, 1, f64::INFINITY), "cooldown_secs"),
            (Policy { min_anomaly_score: f64::NAN, ..Policy::default() }, "min_anomaly_score"),
            (Policy { min_deviation: -0.5, ..Policy::default() }, "min_deviation"),
        ];
        for (p, field) in bad {
            let err = p.validate().expect_err(field);
            assert!(err.starts_with(field), "{err:?} should name {field}");
        }
    }

    #[test]
    fn policy_deserialises_with_snake_case_direction_and_defaults() {
        let p: Policy = serde_json::from_str(r#"{"min_anomaly_score": 1.5, "direction": "below", "fire_hits": 2, "fire_windows": 4}"#)
            .expect("valid policy");
        assert_eq!(p, Policy { min_anomaly_score: 1.5, direction: Direction::Below, fire_hits: 2, fire_windows: 4, ..Policy::default() });
        let p: Policy = serde_json::from_str("{}").expect("all fields default");
        assert_eq!(p, Policy::default());
        assert!(serde_json::from_str::<Policy>(r#"{"direction": "Below"}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"resolve_afterr": 2}"#).is_err(), "a typo must not fall back to the default");
    }

    #[test]
    fn alert_serialises_with_snake_case_state() {
        let mut t = Tracker::new(Policy::default());
        let Some(Event::Fired(alert)) = t.observe(&window("a", 10.0, HIT).obs()) else { panic!("default policy fires") };
        let json = serde_json::to_value(&alert).expect("serialisable");
        assert_eq!(json["state"], "firing");
        assert_eq!(json["series"], "a");
        assert_eq!(json["anomaly_score"], 2.0);
        assert_eq!(json["started_ts"], 10.0);
        assert_eq!(json["top_features"][0], serde_json::json!({"name": "b", "contribution": 0.5, "value": 3.0}));
        assert_eq!(serde_json::to_value(AlertState::Cooldown).expect("serialisable"), "cooldown");
        assert_eq!(serde_json::to_value(AlertState::Resolved).expect("serialisable"), "resolved");
    }
}
