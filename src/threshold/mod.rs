//! Per-series thresholds: for each series, the raw score that maps to `anomaly_score = 1.0` now.
//!
//! `[thresholds] mode`:
//! - `static`: the model's threshold (the bundle's `thresholds.value`, or `model.threshold`) for
//!   every series; nothing is stored per series.
//! - `spot`: each series its own SPOT threshold at risk `q` ([`spot::Spot`]), learnt from the peaks
//!   of its own scores; anomalies are not learnt.
//! - `dspot`: the same over a moving baseline of the series' last `depth` normal scores.
//!
//! Warm-up: a new series is judged against the model's threshold while it gathers its first
//! `warmup_windows` scores (DSPOT: after `depth` more that fill its baseline), keeping only the
//! largest `(1 − level)·warmup_windows + 1` of them; its level is then the smallest of those and its
//! peaks the rest, and it is judged against its own threshold from the next window on. With
//! `warmup_windows = 0` a series starts from the model's calibration tail (`thresholds.tail`), for
//! a model calibrated on this very series or on series alike.
//!
//! A window is judged against the threshold in force before it is learnt, so
//! `anomaly_score = score / threshold` means the same as in static mode: 1.0 is the threshold.

pub mod spot;
pub mod store;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use spot::{Dspot, Params, Seed, Spot};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Static,
    Spot,
    Dspot,
}

/// `[thresholds]`. Hot-reloadable: a new mode restarts the warm-up of the series it changes, a new
/// risk moves their thresholds at once (the fit is kept), the rest applies to series that start.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub mode: Mode,
    /// Share of normal windows expected above the threshold; 0 = the bundle's `false_alarm_rate`.
    pub risk: f64,
    pub warmup_windows: u32,
    /// Quantile of the warm-up scores that a series' peaks are over.
    pub level: f64,
    /// Peaks kept per series, the newest (4 bytes each).
    pub max_peaks: usize,
    /// DSPOT: normal scores in the baseline's moving mean.
    pub depth: usize,
    /// An anomaly is still learnt unless it is over the quantile at `risk × unlearnt_ratio`;
    /// 1 = no anomaly is (the paper's rule; see `spot`).
    pub unlearnt_ratio: f64,
    /// Where per-series threshold state is kept across restarts; empty = nowhere.
    pub state_dir: std::path::PathBuf,
    /// How often the state is saved, besides at drain.
    pub save_interval_secs: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mode: Mode::Static,
            risk: 0.0,
            warmup_windows: 1000,
            level: 0.98,
            max_peaks: 64,
            depth: 32,
            unlearnt_ratio: 0.01,
            state_dir: Default::default(),
            save_interval_secs: 60,
        }
    }
}

/// Bundles without a false-alarm rate (older ones) are thresholded at this risk.
pub const DEFAULT_RISK: f64 = 1e-3;

impl Settings {
    /// The first problem found, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.risk >= 0.0 && self.risk < 0.5) {
            return Err(format!("risk ({}) must be >= 0 (0 = the bundle's false-alarm rate) and < 0.5", self.risk));
        }
        if !(self.level > 0.5 && self.level < 1.0) {
            return Err(format!("level ({}) must be between 0.5 and 1", self.level));
        }
        if self.risk >= 1.0 - self.level {
            return Err(format!("risk ({}) must be below 1 − level ({})", self.risk, 1.0 - self.level));
        }
        if self.warmup_windows > 0 && self.peaks_from_warmup() < 10 {
            return Err(format!(
                "warmup_windows ({}) leaves {} peaks over level {}: at least 10 are needed",
                self.warmup_windows,
                self.peaks_from_warmup(),
                self.level
            ));
        }
        if self.max_peaks < 10 || self.max_peaks > 100_000 {
            return Err(format!("max_peaks ({}) must be between 10 and 100000", self.max_peaks));
        }
        if self.depth == 0 {
            return Err("depth must be >= 1".into());
        }
        if !(self.unlearnt_ratio > 0.0 && self.unlearnt_ratio <= 1.0) {
            return Err(format!("unlearnt_ratio ({}) must be > 0 and <= 1", self.unlearnt_ratio));
        }
        Ok(())
    }

    /// A detector's parameters at `risk`.
    pub fn params(&self, risk: f64) -> Params {
        Params { risk, max_peaks: self.max_peaks, unlearnt_ratio: self.unlearnt_ratio }
    }

    /// How many warm-up scores are over the level: the peaks a series starts with.
    fn peaks_from_warmup(&self) -> usize {
        ((1.0 - self.level) * f64::from(self.warmup_windows)).floor() as usize
    }
}

/// What a series' threshold follows: its mode and risk, after `[[alert_overrides]]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub mode: Mode,
    /// > 0.
    pub risk: f64,
}

/// The model's side: its threshold (static, and during warm-up), its calibration tail, and the
/// risk its threshold stands for.
#[derive(Debug, Clone)]
pub struct ModelThreshold {
    pub threshold: f64,
    pub tail: Option<Seed>,
    pub risk: f64,
}

impl ModelThreshold {
    /// `tail`: the bundle's calibration tail, if it has one; `false_alarm_rate`: what its
    /// threshold stands for (older bundles: none, and [`DEFAULT_RISK`] is used).
    pub fn new(threshold: f64, tail: Option<Seed>, false_alarm_rate: Option<f64>) -> ModelThreshold {
        ModelThreshold { threshold, tail, risk: false_alarm_rate.filter(|r| *r > 0.0).unwrap_or(DEFAULT_RISK) }
    }
}

/// A series' state, boxed: a hash-map slot holds 16 bytes whatever the phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum State {
    /// Judged against the model's threshold while its own start is gathered.
    Warming(Box<Warmup>),
    Spot(Box<Spot>),
    Dspot(Box<Dspot>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Warmup {
    mode: Mode,
    risk: f64,
    /// DSPOT: the first `depth` scores, the baseline's start.
    recent: Vec<f32>,
    /// Scores (residuals, for DSPOT) seen after the baseline filled.
    n: u32,
    /// The largest of them with their order, smallest first.
    top: Vec<(u32, f32)>,
}

impl State {
    fn mode(&self) -> Mode {
        match self {
            State::Warming(w) => w.mode,
            State::Spot(_) => Mode::Spot,
            State::Dspot(_) => Mode::Dspot,
        }
    }

    /// Read back from a state file: usable without a panic or a NaN later on.
    fn is_sound(&self) -> bool {
        match self {
            State::Warming(w) => {
                w.risk > 0.0 && w.risk < 1.0 && w.recent.iter().all(|v| v.is_finite()) && w.top.iter().all(|(_, v)| v.is_finite())
            }
            State::Spot(s) => s.is_sound(),
            State::Dspot(d) => d.is_sound(),
        }
    }

    fn threshold(&self) -> Option<f64> {
        match self {
            State::Warming(_) => None,
            State::Spot(s) => Some(s.threshold()),
            State::Dspot(d) => Some(d.threshold()),
        }
    }
}

/// Every series' threshold state, owned by the alert stage (or `anomalyd score`).
pub struct Thresholds {
    settings: Settings,
    model: ModelThreshold,
    series: HashMap<String, State>,
    /// How many of `series` are warming up.
    warming: usize,
    /// Warm-ups whose scores held no tail (all equal, say): the series stays on the model's
    /// threshold and warms up again.
    pub fallbacks: u64,
    /// SPOT fitted on the model's tail, for series that start from it (`warmup_windows = 0`):
    /// fitted once, cloned per series. `None` until needed, and after any change it depends on.
    from_tail: Option<Spot>,
}

impl Thresholds {
    pub fn new(settings: Settings, model: ModelThreshold) -> Thresholds {
        Thresholds { settings, model, series: HashMap::new(), warming: 0, fallbacks: 0, from_tail: None }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The choice of the settings for a series without an override.
    pub fn default_choice(&self) -> Choice {
        Choice { mode: self.settings.mode, risk: self.risk(None) }
    }

    /// A risk override, or the settings', or the model's.
    pub fn risk(&self, over: Option<f64>) -> f64 {
        over.filter(|r| *r > 0.0).or(Some(self.settings.risk).filter(|r| *r > 0.0)).unwrap_or(self.model.risk)
    }

    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
        self.from_tail = None;
    }

    /// A new model: its threshold and tail. `rescaled`: its scores are not on the old scale (a
    /// new network or scaling), so every series starts again; returns how many did.
    pub fn set_model(&mut self, model: ModelThreshold, rescaled: bool) -> usize {
        self.model = model;
        self.from_tail = None;
        if rescaled {
            let n = self.series.len();
            self.series.clear();
            self.warming = 0;
            n
        } else {
            0
        }
    }

    /// The threshold in force for `series`' next window.
    pub fn threshold(&self, series: &str) -> f64 {
        self.series.get(series).and_then(State::threshold).unwrap_or(self.model.threshold)
    }

    /// Judges one window's score: returns the threshold in force for it, then learns from it.
    pub fn observe(&mut self, series: &str, score: f64, choice: Choice) -> f64 {
        if choice.mode == Mode::Static {
            if !self.series.is_empty() {
                self.forget(series);
            }
            return self.model.threshold;
        }
        if self.series.get(series).is_none_or(|s| s.mode() != choice.mode) {
            let fresh = self.start(choice);
            self.put(series.to_owned(), fresh);
        }
        let state = self.series.get_mut(series).expect("inserted above");
        // A new risk (a reload, an override) moves the threshold before this window is judged.
        match state {
            State::Spot(s) if s.risk() != choice.risk => s.set_risk(choice.risk),
            State::Dspot(d) if d.spot().risk() != choice.risk => d.set_risk(choice.risk),
            _ => {}
        }
        let in_force = state.threshold().unwrap_or(self.model.threshold);
        match state {
            State::Spot(s) => {
                s.step(score);
            }
            State::Dspot(d) => {
                d.step(score);
            }
            State::Warming(w) if w.mode == Mode::Dspot && self.settings.warmup_windows == 0 && w.recent.len() == self.settings.depth => {
                // No warm-up: the model's tail, over the baseline its first `depth` scores give.
                let baseline = w.baseline();
                let recent: Vec<f64> = w.recent.iter().map(|&v| f64::from(v)).collect();
                let seed = self.model.tail.as_ref().map(|t| Seed { level: t.level - baseline, ..t.clone() });
                match seed.and_then(|seed| own(&seed, &recent, Mode::Dspot, self.settings.params(choice.risk))) {
                    Some(mut own) => {
                        self.warming -= 1;
                        if let State::Dspot(d) = &mut own {
                            d.step(score);
                        }
                        *state = own;
                    }
                    None => {
                        self.fallbacks += 1;
                        *state = Warmup::new(Mode::Dspot, choice.risk).into();
                    }
                }
            }
            State::Warming(w) => {
                w.risk = choice.risk;
                if let Some(done) = w.push(score, &self.settings) {
                    let params = self.settings.params(w.risk);
                    *state = match done.and_then(|(seed, recent)| own(&seed, &recent, w.mode, params)) {
                        Some(own) => {
                            self.warming -= 1;
                            own
                        }
                        None => {
                            self.fallbacks += 1;
                            Warmup::new(w.mode, w.risk).into()
                        }
                    };
                }
            }
        }
        in_force
    }

    /// Sets a series' state, replacing what it had.
    fn put(&mut self, series: String, state: State) {
        self.warming += usize::from(matches!(state, State::Warming(_)));
        if let Some(State::Warming(_)) = self.series.insert(series, state) {
            self.warming -= 1;
        }
    }

    /// Drops a series (idle eviction, revoked partition); true when it had a threshold state.
    pub fn forget(&mut self, series: &str) -> bool {
        match self.series.remove(series) {
            Some(State::Warming(_)) => {
                self.warming -= 1;
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Series (warming up, on their own threshold).
    pub fn phases(&self) -> (usize, usize) {
        (self.warming, self.series.len() - self.warming)
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// How a series starts: warming up, or from the model's tail when there is no warm-up.
    fn start(&mut self, choice: Choice) -> State {
        let warm = State::from(Warmup::new(choice.mode, choice.risk));
        if self.settings.warmup_windows > 0 || choice.mode == Mode::Dspot {
            return warm;
        }
        let params = self.settings.params(choice.risk);
        if self.from_tail.as_ref().is_none_or(|s| s.risk() != choice.risk) {
            self.from_tail = self.model.tail.as_ref().and_then(|tail| Spot::new(tail, params).ok());
        }
        match &self.from_tail {
            Some(spot) => State::Spot(Box::new(spot.clone())),
            None => {
                self.fallbacks += 1;
                warm
            }
        }
    }
}

/// A series' own detector from its warm-up; `None` when its scores gave no usable tail.
fn own(seed: &Seed, recent: &[f64], mode: Mode, params: Params) -> Option<State> {
    match mode {
        Mode::Dspot => Dspot::new(seed, recent, params).ok().map(|d| State::Dspot(Box::new(d))),
        _ => Spot::new(seed, params).ok().map(|s| State::Spot(Box::new(s))),
    }
    .filter(|s| s.threshold().is_some_and(f64::is_finite))
}

impl From<Warmup> for State {
    fn from(w: Warmup) -> State {
        State::Warming(Box::new(w))
    }
}

impl Warmup {
    fn new(mode: Mode, risk: f64) -> Warmup {
        Warmup { mode, risk, recent: Vec::new(), n: 0, top: Vec::new() }
    }

    /// DSPOT: the mean of the baseline's scores so far.
    fn baseline(&self) -> f64 {
        self.recent.iter().map(|&v| f64::from(v)).sum::<f64>() / self.recent.len() as f64
    }

    /// Takes one score. When the warm-up is over: `Some(Some((seed, baseline)))`, or `Some(None)`
    /// when its scores hold no tail (all equal, or NaN).
    fn push(&mut self, score: f64, settings: &Settings) -> Option<Option<(Seed, Vec<f64>)>> {
        if !score.is_finite() {
            return None;
        }
        let dspot = self.mode == Mode::Dspot;
        if dspot && self.recent.len() < settings.depth {
            self.recent.push(score as f32);
            return None;
        }
        let baseline = if dspot { self.baseline() } else { 0.0 };
        let x = (score - baseline) as f32;
        if dspot {
            // The baseline moves with the normal scores, as it will after the warm-up.
            self.recent.remove(0);
            self.recent.push(score as f32);
        }
        let keep = settings.peaks_from_warmup() + 1;
        self.top.reserve_exact(keep.saturating_sub(self.top.len()));
        let at = self.top.partition_point(|&(_, v)| v < x);
        if self.top.len() < keep {
            self.top.insert(at, (self.n, x));
        } else if at > 0 {
            self.top.remove(0);
            self.top.insert(at - 1, (self.n, x));
        }
        self.n += 1;
        if self.n < settings.warmup_windows.max(1) {
            return None;
        }
        let level = f64::from(self.top[0].1);
        let mut peaks: Vec<(u32, f64)> = self.top[1..].iter().map(|&(i, v)| (i, f64::from(v) - level)).filter(|(_, e)| *e > 0.0).collect();
        peaks.sort_by_key(|&(i, _)| i);
        let seed = Seed { n: u64::from(self.n), level, peaks: peaks.into_iter().map(|(_, e)| e).collect() };
        let recent = self.recent.iter().map(|&v| f64::from(v)).collect();
        Some((seed.peaks.len() >= 2).then_some((seed, recent)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: Mode, warmup_windows: u32) -> Settings {
        Settings { mode, warmup_windows, ..Settings::default() }
    }

    fn model() -> ModelThreshold {
        ModelThreshold { threshold: 10.0, tail: None, risk: 1e-3 }
    }

    /// A reproducible stream of uniform(0, 1) scores.
    fn uniform(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    #[test]
    fn a_series_is_judged_against_the_model_until_its_warmup_ends() {
        let mut t = Thresholds::new(settings(Mode::Spot, 500), model());
        let choice = t.default_choice();
        for (i, x) in uniform(500, 7).into_iter().enumerate() {
            assert_eq!(t.observe("a", x, choice), 10.0, "window {i}");
        }
        let own = t.threshold("a");
        assert!(own > 0.95 && own < 1.2, "a uniform(0,1) series' own threshold: {own}");
        assert_eq!(t.observe("a", 0.5, choice), own);
        assert_eq!(t.threshold("b"), 10.0, "another series still has the model's");
    }

    #[test]
    fn each_series_gets_its_own_scale() {
        let mut t = Thresholds::new(settings(Mode::Spot, 1000), model());
        let choice = t.default_choice();
        for x in uniform(3000, 3) {
            t.observe("small", x, choice);
            t.observe("large", 100.0 + 50.0 * x, choice);
        }
        let (small, large) = (t.threshold("small"), t.threshold("large"));
        assert!(small < 1.2 && large > 149.0 && large < 160.0, "{small} {large}");
    }

    #[test]
    fn without_warmup_a_series_starts_from_the_model_tail() {
        let tail = Seed { n: 1000, level: 1.0, peaks: (1..=20).map(|i| i as f64 / 20.0).collect() };
        let m = ModelThreshold::new(2.5, Some(tail), Some(1e-3));
        let mut t = Thresholds::new(settings(Mode::Spot, 0), m.clone());
        let first = t.observe("a", 0.3, t.default_choice());
        let spot = Spot::new(m.tail.as_ref().unwrap(), Settings::default().params(1e-3)).unwrap();
        assert_eq!(first, spot.threshold());
    }

    #[test]
    fn static_mode_and_a_mode_change_drop_the_series_state() {
        let mut t = Thresholds::new(settings(Mode::Spot, 100), model());
        for x in uniform(200, 1) {
            t.observe("a", x, t.default_choice());
        }
        assert_ne!(t.threshold("a"), 10.0);
        let dspot = Choice { mode: Mode::Dspot, risk: 1e-3 };
        assert_eq!(t.observe("a", 0.5, dspot), 10.0, "a new mode warms up again");
        assert_eq!(t.observe("a", 0.5, Choice { mode: Mode::Static, risk: 1e-3 }), 10.0);
        assert!(t.is_empty());
    }

    #[test]
    fn a_flat_warmup_stays_on_the_model_threshold() {
        let mut t = Thresholds::new(settings(Mode::Spot, 100), model());
        for _ in 0..300 {
            assert_eq!(t.observe("flat", 0.25, t.default_choice()), 10.0);
        }
        assert_eq!(t.fallbacks, 3);
    }

    #[test]
    fn settings_name_what_is_wrong() {
        let bad = |f: fn(&mut Settings)| {
            let mut s = Settings::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert!(bad(|s| s.risk = 0.05).contains("below 1 − level"));
        assert!(bad(|s| s.warmup_windows = 50).contains("warmup_windows (50)"));
        assert!(bad(|s| s.max_peaks = 2).contains("max_peaks"));
        assert!(bad(|s| s.level = 1.0).contains("level"));
        assert!(Settings::default().validate().is_ok());
    }
}
