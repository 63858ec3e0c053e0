//! "1.0 means what it says", per series, on synthetic normal score streams of several shapes:
//! after each series' warm-up, the share of windows with anomaly_score > 1 next to the configured
//! risk, for the daemon's static, SPOT and DSPOT thresholds, and SPOT under the paper's rule of
//! learning no anomaly (docs/thresholds.md, "Calibration"). "worst / risk" is how far the share
//! is from the risk, either way (2× = twice or half).
//!
//!     cargo run --release --example threshold_streams [-- --windows 200000 --risk 0.001 --unlearnt-ratio 0.01]
//!
//! The static threshold is what a model calibrated on one series would give all of them: the
//! first series' (1 − risk) quantile over its warm-up. Streams are reproducible (xorshift).

use anomalyd::threshold::spot::Seed;
use anomalyd::threshold::{Choice, Mode, ModelThreshold, Settings, Thresholds};

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
}

/// A normal stream's anomaly score at window `i` (one window a minute): a reconstruction error is
/// positive and right-skewed, so each shape is the square of a noisy signal.
fn score(shape: &str, i: usize, rng: &mut Rng) -> f64 {
    let day = (i % 1440) as f64 / 1440.0;
    match shape {
        // Error that swings with the daily load.
        "daily cycle" => (1.0 + 0.8 * (2.0 * std::f64::consts::PI * day).sin()) * rng.normal().powi(2),
        // Two regimes an hour each, the error four times larger in one.
        "square wave" => (if (i / 60) % 2 == 0 { 1.0 } else { 4.0 }) * rng.normal().powi(2),
        // A flat metric: tiny float noise around a constant error.
        "flat line" => 1e-4 * (1.0 + 1e-3 * rng.normal()),
        // Counts with a heavy (Pareto, alpha 3) tail.
        "heavy-tailed counts" => (rng.uniform().powf(-1.0 / 3.0) - 1.0).floor() + rng.uniform() * 0.1,
        // The SKAB-like case: chi-square with 8 degrees of freedom (8 features' squared errors).
        _ => (0..8).map(|_| rng.normal().powi(2)).sum::<f64>() / 8.0,
    }
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let windows = arg("--windows", 200_000.0) as usize;
    let risk = arg("--risk", 0.001);
    let ratio = arg("--unlearnt-ratio", Settings::default().unlearnt_ratio);
    let warmup = 1000usize;
    let shapes = ["chi-square(8)/8", "daily cycle", "square wave", "flat line", "heavy-tailed counts"];
    // The static threshold: the (1 − risk) quantile of the first shape's first 20,000 windows.
    let mut rng = Rng(42);
    let mut calib: Vec<f64> = (0..20_000).map(|i| score(shapes[0], i, &mut rng)).collect();
    calib.sort_by(f64::total_cmp);
    let fixed = calib[((1.0 - risk) * calib.len() as f64) as usize];
    println!("{windows} windows a series (one a minute: {:.0} days), warm-up {warmup}, risk {risk}", windows as f64 / 1440.0);
    println!("static threshold {fixed:.4} (the (1 − risk) quantile of the first shape)\n");
    // (column, mode, unlearnt_ratio): the settings', and SPOT under the paper's rule (no anomaly learnt).
    let runs = [
        ("static", Mode::Static, ratio),
        ("spot", Mode::Spot, ratio),
        ("dspot", Mode::Dspot, ratio),
        ("spot, paper's rule", Mode::Spot, 1.0),
    ];
    println!("| series shape | {} | worst / risk (spot, dspot) |", runs.map(|r| r.0).join(" | "));
    println!("|---|---|---|---|---|---|");
    for (k, shape) in shapes.iter().enumerate() {
        let mut shares = Vec::new();
        for (_, mode, unlearnt_ratio) in runs {
            let settings = Settings { mode, risk, warmup_windows: warmup as u32, unlearnt_ratio, ..Settings::default() };
            let mut t = Thresholds::new(settings, ModelThreshold::new(fixed, None::<Seed>, Some(risk)));
            let choice = Choice { mode, risk };
            let mut rng = Rng(1000 + k as u64);
            let start = warmup + if mode == Mode::Dspot { 32 } else { 0 };
            let mut over = 0usize;
            for i in 0..windows {
                let x = score(shape, i, &mut rng);
                let threshold = t.observe("s", x, choice);
                if i >= start && x / threshold > 1.0 {
                    over += 1;
                }
            }
            shares.push(over as f64 / (windows - start) as f64);
        }
        let worst = [shares[1], shares[2]].map(|s| if s > risk { s / risk } else { risk / s.max(1e-12) }).into_iter().fold(0.0, f64::max);
        println!("| {shape} | {:.5} | {:.5} | {:.5} | {:.5} | {worst:.2}× |", shares[0], shares[1], shares[2], shares[3]);
    }
}
