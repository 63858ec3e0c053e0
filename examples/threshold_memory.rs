//! Heap bytes the per-series thresholds hold (docs/thresholds.md, "Cost"), counted by the
//! allocator: for `--series` N series in SPOT and DSPOT, at three points of their lives — just
//! started from the model's calibration tail (`warmup_windows = 0`), with every ring of peaks full
//! (the most a series holds), and halfway through their own warm-up (`warmup_windows = 1000`).
//!
//!     cargo run --release --example threshold_memory [-- --series 100000]
//!
//! The tail is the bench model's shape: 65 peaks over its level out of 3,250 calibration windows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use anomalyd::threshold::spot::Seed;
use anomalyd::threshold::{Choice, Mode, ModelThreshold, Settings, Thresholds};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.iter().position(|a| a == "--series").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let tail = Seed { n: 3250, level: 1.0, peaks: (1..=65).map(|i| 0.02 * f64::from(i)).collect() };
    let model = ModelThreshold::new(3.0, Some(tail), Some(1e-3));
    let names: Vec<String> = (0..n).map(|i| format!("series-{i}")).collect();
    let keys: usize = names.iter().map(|s| s.len()).sum();
    println!("{n} series; bytes a series holds, its key's {} bytes included:", keys / n);
    println!("| mode | started from the tail | every ring full | halfway through its warm-up |");
    println!("|---|---|---|---|");
    for mode in [Mode::Spot, Mode::Dspot] {
        let choice = Choice { mode, risk: 1e-3 };
        let measure = |warmup_windows: u32, scores: &dyn Fn(usize) -> f64, count: usize| {
            let before = LIVE.load(Ordering::Relaxed);
            let mut t = Thresholds::new(Settings { mode, warmup_windows, ..Settings::default() }, model.clone());
            for i in 0..count {
                for name in &names {
                    t.observe(name, scores(i), choice);
                }
            }
            let bytes = LIVE.load(Ordering::Relaxed) - before;
            drop(t);
            bytes as f64 / n as f64
        };
        let max_peaks = Settings::default().max_peaks;
        // DSPOT: `depth` scores fill the baseline first. Then every score is a peak under the
        // threshold: SPOT's just over the tail's level, DSPOT's on a ramp that stays ahead of its
        // baseline by more than the level (0.5 over the first baseline).
        let depth = Settings::default().depth;
        let peak = |i: usize| match (i < depth, mode) {
            (true, _) => 0.5,
            (false, Mode::Dspot) => 0.04 * i as f64,
            (false, _) => 1.51 + 1e-4 * (i % 7) as f64,
        };
        let fresh = measure(0, &|_| 0.5, depth + 1);
        let full = measure(0, &peak, depth + max_peaks);
        let warming = measure(1000, &|i| (i * 7919 % 1000) as f64 / 1000.0, depth + 500);
        println!("| {mode:?} | {fresh:.0} | {full:.0} | {warming:.0} |");
    }
}
