//! SPOT and DSPOT (Siffer et al., "Anomaly Detection in Streams with Extreme Value Theory",
//! KDD 2017): a streaming threshold at risk `q` from the peaks of a score stream over a level `t`.
//!
//! The peaks (excesses `x − t > 0`) are modelled by a generalized Pareto distribution (shape
//! `gamma`, scale `sigma`), fitted by the method of moments and by Grimshaw's maximum likelihood;
//! the fit with the higher log-likelihood wins. With `n` scores seen and `n_t` peaks, the threshold
//! is `z_q = t + sigma/gamma · ((q·n/n_t)^(−gamma) − 1)` (`t − sigma·ln(q·n/n_t)` when `gamma = 0`).
//! Each new score is judged against `z_q` first: above it, an anomaly; at or above `t`, a peak that
//! refits the tail; below, it only counts toward `n`.
//!
//! Which anomalies are learnt: the paper (and libspot) learns none. On a long normal stream that
//! truncates the tail the GPD is fitted to (the largest peaks, those over `z_q`, never enter it),
//! each underestimate of `z_q` keeps more of them out, and the threshold sinks: on normal streams
//! of five shapes, 200,000 windows each at risk 0.001, 0.24–0.60 % of windows ended above it
//! (`examples/threshold_streams.rs`, 1,000 peaks kept; 0.62–1.2 % with 64). So an anomaly is
//! learnt unless it is also over `z_{q·r}`, the quantile `1/r` times rarer (`unlearnt_ratio` r,
//! default 0.01), which normal data almost never reaches and a real incident does; `r = 1` is the
//! paper's rule.
//!
//! DSPOT runs the same on `x − baseline`, the baseline being the mean of the last `depth` scores
//! that were not anomalies, so the threshold follows slow drift but not an anomaly.
//!
//! Written from the paper; checked against the reference implementation (PyPI `libspot` 3.1.0) by
//! golden vectors (`tests/thresholds.rs`). Memory is bounded: the newest `max_peaks` peaks are kept
//! (8 bytes each), so an old peak leaves the fit when a new one arrives, as in libspot. Detectors
//! cloned from one (series started from the model's tail) share its peaks until they learn one.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a score was to the detector that judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Above the threshold: not learned.
    Anomaly,
    /// Over the level: a new peak, the tail refitted.
    Peak,
    Normal,
}

/// The starting point of a detector: `n` scores seen, the level `t`, and the excesses over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    pub n: u64,
    pub level: f64,
    /// Excesses over `level` (> 0), oldest first.
    pub peaks: Vec<f64>,
}

/// Generalized Pareto parameters of the excesses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gpd {
    pub gamma: f64,
    pub sigma: f64,
}

/// How a detector thresholds and learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// `q`: the share of normal scores expected above the threshold.
    pub risk: f64,
    /// Peaks kept (the newest).
    pub max_peaks: usize,
    /// An anomaly over the quantile at `risk × unlearnt_ratio` is not learnt; 1 = none is.
    pub unlearnt_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spot {
    risk: f64,
    unlearnt_ratio: f64,
    /// Over this, an anomaly is not learnt.
    cutoff: f64,
    level: f64,
    n: u64,
    n_peaks: u64,
    peaks: Arc<Peaks>,
    gpd: Gpd,
    threshold: f64,
}

impl Spot {
    /// A detector from its seed. Errors name what is wrong with the seed or the parameters.
    pub fn new(seed: &Seed, params: Params) -> Result<Spot, String> {
        let Params { risk, max_peaks, unlearnt_ratio } = params;
        if !(risk > 0.0 && risk < 1.0) {
            return Err(format!("risk ({risk}) must be between 0 and 1"));
        }
        if !(unlearnt_ratio > 0.0 && unlearnt_ratio <= 1.0) {
            return Err(format!("unlearnt_ratio ({unlearnt_ratio}) must be in (0, 1]"));
        }
        if !seed.level.is_finite() {
            return Err(format!("level ({}) is not a finite number", seed.level));
        }
        if seed.peaks.is_empty() || seed.peaks.iter().any(|p| !(p.is_finite() && *p > 0.0)) {
            return Err("the seed needs at least one peak, each a finite excess > 0".into());
        }
        if (seed.peaks.len() as u64) > seed.n {
            return Err(format!("{} peaks out of n = {} scores", seed.peaks.len(), seed.n));
        }
        let mut peaks = Peaks::new(max_peaks);
        for &p in &seed.peaks {
            peaks.push(p);
        }
        let mut spot = Spot {
            risk,
            unlearnt_ratio,
            cutoff: f64::NAN,
            level: seed.level,
            n: seed.n,
            n_peaks: seed.peaks.len() as u64,
            peaks: Arc::new(peaks),
            gpd: Gpd { gamma: 0.0, sigma: 1.0 },
            threshold: f64::NAN,
        };
        spot.refit();
        Ok(spot)
    }

    /// The score above which the next one is an anomaly.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn gpd(&self) -> Gpd {
        self.gpd
    }

    pub fn risk(&self) -> f64 {
        self.risk
    }

    /// A new risk keeps the fit: only the quantile moves.
    pub fn set_risk(&mut self, risk: f64) {
        self.risk = risk;
        self.update_thresholds();
    }

    /// Judges `x` against the current threshold, then learns from it unless it is an anomaly over
    /// the cutoff (see the module doc). A NaN score is judged normal and not learned.
    pub fn step(&mut self, x: f64) -> Verdict {
        if x.is_nan() {
            return Verdict::Normal;
        }
        let anomaly = x > self.threshold;
        if anomaly && (self.unlearnt_ratio >= 1.0 || x > self.cutoff) {
            return Verdict::Anomaly;
        }
        self.n += 1;
        let excess = x - self.level;
        if excess < 0.0 {
            return Verdict::Normal;
        }
        self.n_peaks += 1;
        Arc::make_mut(&mut self.peaks).push(excess);
        self.refit();
        if anomaly {
            Verdict::Anomaly
        } else {
            Verdict::Peak
        }
    }

    /// Whether a detector read back from a state file holds together (a parseable but edited or
    /// foreign line must not make a later step index out of its ring or divide by zero).
    pub fn is_sound(&self) -> bool {
        let p = &self.peaks;
        let finite = [self.risk, self.level, self.gpd.gamma, self.gpd.sigma].iter().all(|v| v.is_finite());
        finite
            && self.risk > 0.0
            && self.risk < 1.0
            && self.unlearnt_ratio > 0.0
            && self.unlearnt_ratio <= 1.0
            && p.max >= 1
            && !p.data.is_empty()
            && p.data.len() <= p.max as usize
            && p.next < p.max
            && p.data.iter().all(|v| v.is_finite() && *v >= 0.0)
            && self.n_peaks >= 1
            && self.n >= self.n_peaks
    }

    /// The score exceeded with probability `q`.
    pub fn quantile(&self, q: f64) -> f64 {
        let r = q * self.n as f64 / self.n_peaks as f64;
        let Gpd { gamma, sigma } = self.gpd;
        if gamma == 0.0 {
            self.level - sigma * r.ln()
        } else {
            self.level + sigma / gamma * (r.powf(-gamma) - 1.0)
        }
    }

    fn refit(&mut self) {
        self.gpd = fit(&self.peaks.data);
        self.update_thresholds();
    }

    fn update_thresholds(&mut self) {
        self.threshold = self.quantile(self.risk);
        self.cutoff = if self.unlearnt_ratio >= 1.0 { self.threshold } else { self.quantile(self.risk * self.unlearnt_ratio) };
    }
}

/// The newest `max` peaks in a ring: once full, a new peak takes the oldest one's slot. The fit
/// sums over the slots in storage order, as libspot does, so the two round alike (Grimshaw's
/// bracket starts where `w(x)` is within rounding of 0, and its sign there decides whether a root
/// is found). As f64: on an ill-conditioned tail, storing f32 (a relative error of 6e-8 on a peak)
/// already moves which root is found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Peaks {
    data: Vec<f64>,
    max: u32,
    /// The oldest slot, once full.
    next: u32,
}

impl Peaks {
    fn new(max: usize) -> Peaks {
        let max = max.clamp(1, u32::MAX as usize);
        Peaks { data: Vec::new(), max: max as u32, next: 0 }
    }

    fn push(&mut self, x: f64) {
        if self.data.len() < self.max as usize {
            self.data.push(x);
        } else {
            self.data[self.next as usize] = x;
            self.next = (self.next + 1) % self.max;
        }
    }
}

/// The better of the method-of-moments and Grimshaw fits, by log-likelihood.
pub fn fit(peaks: &[f64]) -> Gpd {
    let mom = moments(peaks);
    let ml = grimshaw(peaks);
    if log_likelihood(peaks, ml) > log_likelihood(peaks, mom) || log_likelihood(peaks, mom).is_nan() {
        ml
    } else {
        mom
    }
}

fn mean(peaks: &[f64]) -> f64 {
    peaks.iter().sum::<f64>() / peaks.len() as f64
}

fn moments(peaks: &[f64]) -> Gpd {
    let e = mean(peaks);
    let v = peaks.iter().map(|p| p * p).sum::<f64>() / peaks.len() as f64 - e * e;
    let r = e * e / v;
    Gpd { gamma: 0.5 * (1.0 - r), sigma: 0.5 * e * (1.0 + r) }
}

fn log_likelihood(peaks: &[f64], Gpd { gamma, sigma }: Gpd) -> f64 {
    let k = peaks.len() as f64;
    if gamma == 0.0 {
        return -k * sigma.ln() - peaks.iter().sum::<f64>() / sigma;
    }
    let c = 1.0 + 1.0 / gamma;
    let x = gamma / sigma;
    -k * sigma.ln() - c * peaks.iter().map(|p| (1.0 + x * p).ln()).sum::<f64>()
}

const EPSILON: f64 = 2e-8;

/// Grimshaw's reduction of the GPD likelihood to one variable `x = gamma/sigma`: the roots of
/// `w(x) = (1/k Σ 1/(1 + x·y)) (1 + 1/k Σ ln(1 + x·y)) − 1` on either side of 0, and `x = 0`
/// itself (the exponential), each giving `gamma = 1/k Σ ln(1 + x·y)`, `sigma = gamma/x`.
fn grimshaw(peaks: &[f64]) -> Gpd {
    let k = peaks.len() as f64;
    let (min, max) = peaks.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    let m = mean(peaks);
    let w = |x: f64| {
        let (u, v) = peaks.iter().fold((0.0, 0.0), |(u, v), &y| {
            let s = 1.0 + x * y;
            (u + 1.0 / s, v + s.ln())
        });
        (u / k) * (1.0 + v / k) - 1.0
    };
    let from_root = |x: f64| {
        if x == 0.0 {
            Gpd { gamma: 0.0, sigma: m }
        } else {
            let gamma = peaks.iter().map(|y| (1.0 + x * y).ln()).sum::<f64>() / k;
            Gpd { gamma, sigma: gamma / x }
        }
    };
    let eps = EPSILON.min(0.5 / max);
    let roots = [brent(&w, -1.0 / max + eps, -eps), brent(&w, eps, 2.0 * (m - min) / (min * min))];
    let mut best = from_root(0.0);
    let mut best_ll = log_likelihood(peaks, best);
    for x in roots.into_iter().flatten() {
        let candidate = from_root(x);
        let ll = log_likelihood(peaks, candidate);
        if ll > best_ll {
            (best, best_ll) = (candidate, ll);
        }
    }
    best
}

/// A root of `f` in `[a, b]` by Brent's method, or `None` when `f` has the same sign at both ends
/// (or the iterations run out).
fn brent(f: &impl Fn(f64) -> f64, a: f64, b: f64) -> Option<f64> {
    let (mut a, mut b) = (a, b);
    let (mut fa, mut fb) = (f(a), f(b));
    if !(fa.is_finite() && fb.is_finite()) || (fa > 0.0 && fb > 0.0) || (fa < 0.0 && fb < 0.0) {
        return None;
    }
    let (mut c, mut fc) = (b, fb);
    let (mut d, mut e) = (0.0f64, 0.0f64);
    for _ in 0..200 {
        if (fb > 0.0 && fc > 0.0) || (fb < 0.0 && fc < 0.0) {
            (c, fc) = (a, fa);
            d = b - a;
            e = d;
        }
        if fc.abs() < fb.abs() {
            (a, b, c) = (b, c, b);
            (fa, fb, fc) = (fb, fc, fb);
        }
        let tol = 2.0 * EPSILON * b.abs() + 0.5 * EPSILON;
        let xm = 0.5 * (c - b);
        if xm.abs() <= tol || fb == 0.0 {
            return Some(b);
        }
        if e.abs() >= tol && fa.abs() > fb.abs() {
            // Inverse quadratic interpolation, or the secant when only two points differ.
            let s = fb / fa;
            let (mut p, mut q) = if a == c {
                (2.0 * xm * s, 1.0 - s)
            } else {
                let (q, r) = (fa / fc, fb / fc);
                (s * (2.0 * xm * q * (q - r) - (b - a) * (r - 1.0)), (q - 1.0) * (r - 1.0) * (s - 1.0))
            };
            if p > 0.0 {
                q = -q;
            }
            p = p.abs();
            if 2.0 * p < (3.0 * xm * q - (tol * q).abs()).min((e * q).abs()) {
                e = d;
                d = p / q;
            } else {
                d = xm;
                e = d;
            }
        } else {
            d = xm;
            e = d;
        }
        (a, fa) = (b, fb);
        b += if d.abs() > tol { d } else { tol.copysign(xm) };
        fb = f(b);
    }
    None
}

/// SPOT on the score minus the mean of the last `depth` scores that were not anomalies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dspot {
    spot: Spot,
    depth: usize,
    /// As f32, like the peaks.
    recent: VecDeque<f32>,
    sum: f64,
}

impl Dspot {
    /// `recent`: the last `depth` normal scores (the baseline's window); `seed` is over
    /// `x − baseline` of the scores after them.
    pub fn new(seed: &Seed, recent: &[f64], params: Params) -> Result<Dspot, String> {
        if recent.is_empty() || recent.iter().any(|x| !x.is_finite()) {
            return Err("the baseline needs at least one finite score".into());
        }
        let recent: VecDeque<f32> = recent.iter().map(|&x| x as f32).collect();
        let sum = recent.iter().map(|&x| f64::from(x)).sum();
        Ok(Dspot { spot: Spot::new(seed, params)?, depth: recent.len(), recent, sum })
    }

    pub fn baseline(&self) -> f64 {
        self.sum / self.recent.len() as f64
    }

    /// As [`Spot::is_sound`], with a baseline to stand on.
    pub fn is_sound(&self) -> bool {
        self.spot.is_sound()
            && self.depth >= 1
            && !self.recent.is_empty()
            && self.recent.len() <= self.depth
            && self.recent.iter().all(|v| v.is_finite())
    }

    /// On the score's scale: the baseline plus SPOT's threshold on the residual.
    pub fn threshold(&self) -> f64 {
        self.baseline() + self.spot.threshold()
    }

    pub fn spot(&self) -> &Spot {
        &self.spot
    }

    pub fn set_risk(&mut self, risk: f64) {
        self.spot.set_risk(risk);
    }

    pub fn step(&mut self, x: f64) -> Verdict {
        if x.is_nan() {
            return Verdict::Normal;
        }
        let learnt_before = self.spot.n;
        let verdict = self.spot.step(x - self.baseline());
        // What SPOT learnt moves the baseline too; an anomaly it did not learn moves neither.
        if self.spot.n > learnt_before {
            if self.recent.len() == self.depth {
                self.recent.pop_front();
            }
            self.recent.push_back(x as f32);
            // Summed afresh, so float error does not build up over a long stream.
            self.sum = self.recent.iter().map(|&x| f64::from(x)).sum();
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's rule: no anomaly is learnt.
    fn params(risk: f64, max_peaks: usize) -> Params {
        Params { risk, max_peaks, unlearnt_ratio: 1.0 }
    }

    /// Exponential(1) excesses: the fit is near gamma 0, sigma 1, and z_q near t + ln(s/q).
    #[test]
    fn exponential_peaks_give_the_exponential_quantile() {
        let peaks: Vec<f64> = (1..=400).map(|i| -(1.0 - (i as f64 - 0.5) / 400.0).ln()).collect();
        let spot = Spot::new(&Seed { n: 20_000, level: 5.0, peaks }, params(1e-4, 1000)).unwrap();
        let Gpd { gamma, sigma } = spot.gpd();
        assert!(gamma.abs() < 0.05 && (sigma - 1.0).abs() < 0.05, "{gamma} {sigma}");
        let expected = 5.0 + (400.0f64 / 20_000.0 / 1e-4).ln();
        assert!((spot.threshold() - expected).abs() / expected < 0.02, "{} vs {expected}", spot.threshold());
    }

    #[test]
    fn anomalies_are_not_learned_and_peaks_are() {
        let peaks: Vec<f64> = (1..=50).map(|i| i as f64 / 50.0).collect();
        let mut spot = Spot::new(&Seed { n: 2500, level: 1.0, peaks }, params(1e-3, 64)).unwrap();
        let before = spot.clone();
        assert_eq!(spot.step(spot.threshold() * 10.0), Verdict::Anomaly);
        assert_eq!(spot, before);
        assert_eq!(spot.step(0.5), Verdict::Normal);
        assert_eq!((spot.n, spot.n_peaks), (2501, 50));
        assert_eq!(spot.step(1.5), Verdict::Peak);
        assert_eq!((spot.n, spot.n_peaks, spot.peaks.data.len()), (2502, 51, 51));
        for _ in 0..100 {
            spot.step(1.2);
        }
        assert_eq!(spot.peaks.data.len(), 64, "the newest max_peaks are kept");
    }

    #[test]
    fn an_anomaly_under_the_cutoff_is_learnt_and_one_over_it_is_not() {
        let peaks: Vec<f64> = (1..=50).map(|i| i as f64 / 50.0).collect();
        let seed = Seed { n: 2500, level: 1.0, peaks };
        let mut spot = Spot::new(&seed, Params { risk: 1e-3, max_peaks: 64, unlearnt_ratio: 0.01 }).unwrap();
        let (z, cutoff) = (spot.threshold(), spot.quantile(1e-5));
        assert!(cutoff > z);
        let before = spot.clone();
        assert_eq!(spot.step(cutoff * 2.0), Verdict::Anomaly);
        assert_eq!(spot, before, "far over the threshold: not learnt");
        assert_eq!(spot.step((z + cutoff) / 2.0), Verdict::Anomaly);
        assert_eq!((spot.n, spot.n_peaks), (2501, 51), "just over it: an anomaly, and learnt");
        assert!(spot.threshold() > z);
    }

    #[test]
    fn a_bad_seed_is_an_error_that_says_why() {
        let seed = |peaks: Vec<f64>, n| Seed { n, level: 1.0, peaks };
        assert!(Spot::new(&seed(vec![], 10), params(1e-3, 8)).unwrap_err().contains("at least one peak"));
        assert!(Spot::new(&seed(vec![0.5, f64::NAN], 10), params(1e-3, 8)).unwrap_err().contains("finite"));
        assert!(Spot::new(&seed(vec![0.5; 3], 2), params(1e-3, 8)).unwrap_err().contains("3 peaks out of n = 2"));
        assert!(Spot::new(&seed(vec![0.5], 10), params(1.5, 8)).unwrap_err().contains("risk"));
        let ratio = Params { unlearnt_ratio: 0.0, ..params(1e-3, 8) };
        assert!(Spot::new(&seed(vec![0.5], 10), ratio).unwrap_err().contains("unlearnt_ratio"));
    }

    #[test]
    fn dspot_follows_a_drifting_level_but_not_a_spike() {
        let noise = |i: usize| ((i * 7919) % 101) as f64 / 100.0;
        let recent: Vec<f64> = (0..32).map(noise).collect();
        let peaks: Vec<f64> = (0..40).map(|i| 0.5 + noise(i) * 0.5).collect();
        let mut d = Dspot::new(&Seed { n: 2000, level: 0.5, peaks }, &recent, params(1e-3, 64)).unwrap();
        let start = d.threshold();
        for i in 0..5000 {
            let x = i as f64 / 1000.0 + noise(i);
            assert_ne!(d.step(x), Verdict::Anomaly, "window {i}: {x} over {}", d.threshold());
        }
        assert!(d.baseline() > 4.5 && d.threshold() > start + 2.0, "the threshold rose with the level: {start} → {}", d.threshold());
        let before = d.threshold();
        assert_eq!(d.step(before + 10.0), Verdict::Anomaly);
        assert_eq!(d.threshold(), before, "an anomaly moves neither the baseline nor the tail");
    }
}
