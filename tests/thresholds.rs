//! Per-series thresholds: the daemon's SPOT and DSPOT against the reference implementation
//! (libspot 3.1.0: the same score streams, started from the same fitted state, give the same
//! verdicts and thresholds; `contracts/spot/golden.json`, made by `scripts/spot_golden.py`), and
//! the running daemon's threshold state across restarts, corrupt state files and reloads.

mod common;

use anomalyd::threshold::spot::{Dspot, Params, Seed, Spot, Verdict};
use common::{repo, stdin_config, temp_dir, Daemon};

/// Relative tolerance on thresholds. Measured: below 3e-14 on three SPOT streams, 1.6e-9 on
/// "ring", where libspot's running sum of squared peaks drifts as old peaks leave (ours is summed
/// afresh), 2.6e-8 on DSPOT (its baseline holds f32 scores).
const TOLERANCE: f64 = 1e-6;

enum Detector {
    Spot(Spot),
    Dspot(Dspot),
}

impl Detector {
    fn step(&mut self, x: f64) -> (Verdict, f64) {
        match self {
            Detector::Spot(s) => {
                let v = s.step(x);
                (v, s.threshold())
            }
            Detector::Dspot(d) => {
                let v = d.step(x);
                (v, d.threshold())
            }
        }
    }
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn spot_and_dspot_match_libspot_step_by_step() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("contracts/spot/golden.json")).unwrap()).unwrap();
    assert_eq!(golden["reference"], "libspot 3.1.0");
    let streams = golden["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 5);
    for case in streams {
        let name = case["name"].as_str().unwrap();
        let init = &case["init"];
        let seed = Seed { n: init["n"].as_u64().unwrap(), level: init["level"].as_f64().unwrap(), peaks: floats(&init["peaks"]) };
        // libspot learns no anomaly: unlearnt_ratio 1.
        let params =
            Params { risk: case["q"].as_f64().unwrap(), max_peaks: case["max_excess"].as_u64().unwrap() as usize, unlearnt_ratio: 1.0 };
        let mut detector = if case["depth"].as_u64().unwrap() > 0 {
            Detector::Dspot(Dspot::new(&seed, &floats(&case["recent"]), params).unwrap())
        } else {
            Detector::Spot(Spot::new(&seed, params).unwrap())
        };
        if let Detector::Spot(s) = &detector {
            let want = case["initial_threshold"].as_f64().unwrap();
            assert!((s.threshold() - want).abs() <= TOLERANCE * want.abs(), "{name}: initial {} vs {want}", s.threshold());
        }
        let (stream, thresholds) = (floats(&case["stream"]), floats(&case["thresholds"]));
        let verdicts = case["verdicts"].as_array().unwrap();
        let mut worst = 0.0f64;
        for (i, &x) in stream.iter().enumerate() {
            let (verdict, threshold) = detector.step(x);
            let want = match verdicts[i].as_str().unwrap() {
                "anomaly" => Verdict::Anomaly,
                "peak" => Verdict::Peak,
                _ => Verdict::Normal,
            };
            assert_eq!(verdict, want, "{name} step {i}: x = {x}");
            let error = (threshold - thresholds[i]).abs() / thresholds[i].abs();
            assert!(error <= TOLERANCE, "{name} step {i}: threshold {threshold} vs libspot {}", thresholds[i]);
            worst = worst.max(error);
        }
        eprintln!("{name}: {} steps, worst relative threshold difference {worst:.2e}", stream.len());
    }
}

/// SPOT from the bundle's calibration tail (no warm-up), state kept in `{dir}/state`, every
/// window's threshold in `{dir}/scores.jsonl`.
const SPOT: &str = "[thresholds]\nmode = \"spot\"\nwarmup_windows = 0\nstate_dir = \"{dir}/state\"\n";

fn file_config() -> String {
    let records = repo().join("contracts/skab-convae/records.csv");
    stdin_config("models/skab-convae", 0.0).replace("kind = \"stdin\"", &format!("kind = \"file\"\npath = {:?}", records.to_str().unwrap()))
        + "scores_path = \"{dir}/scores.jsonl\"\n"
        + SPOT
}

/// The threshold of every scored window, in order.
fn thresholds(dir: &std::path::Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("scores.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["threshold"].as_f64().unwrap()).collect()
}

fn run_file_to_the_end(dir: &std::path::Path) -> (Vec<f64>, String) {
    let _ = std::fs::remove_file(dir.join("scores.jsonl"));
    let d = Daemon::start(dir, &file_config());
    d.wait_for(|d| d.stderr().contains("Pipeline idle"), "the whole file scored");
    let last = d.metric("anomalyd_series_threshold{series=\"records.csv\"}").unwrap();
    let log = d.stderr();
    assert_eq!(d.stop(), 0);
    let t = thresholds(dir);
    assert_eq!(t.len(), 138);
    // The gauge is the threshold in force for the next window, after the last one was learnt.
    assert!(last.is_finite() && last > 0.0);
    (t.into_iter().chain([last]).collect(), log)
}

#[test]
fn a_restart_keeps_each_series_threshold() {
    let dir = temp_dir("thresholds-restart");
    let (first, log) = run_file_to_the_end(&dir);
    assert!(log.contains("No threshold state yet"), "{log}");
    let learnt = *first.last().unwrap();
    assert_ne!(first[0], learnt, "the stream's peaks moved the threshold");
    let state = std::fs::read_to_string(dir.join("state/thresholds.jsonl")).unwrap();
    assert!(state.starts_with("{\"format\":\"anomalyd-thresholds\""), "{state}");

    let (second, log) = run_file_to_the_end(&dir);
    assert!(log.contains("Thresholds restored.") && log.contains("series=1"), "{log}");
    assert!((second[0] - learnt).abs() <= 1e-12 * learnt, "restored {} vs saved {learnt}", second[0]);
}

#[test]
fn a_corrupt_state_file_is_logged_and_the_daemon_starts_without_it() {
    let dir = temp_dir("thresholds-corrupt");
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(dir.join("state/thresholds.jsonl"), "not a state file\n\u{0}").unwrap();
    let d = Daemon::start(&dir, &file_config());
    d.wait_for(|d| d.stderr().contains("Pipeline idle"), "the whole file scored");
    assert_eq!(d.metric("anomalyd_threshold_resets_total{reason=\"state_corrupt\"}"), Some(1.0));
    let log = d.stderr();
    assert!(log.contains("Threshold state not usable") && log.contains("not an anomalyd threshold state file"), "{log}");
    assert_eq!(d.stop(), 0);
    // Every window was scored, and the drain wrote a good file over the bad one.
    assert_eq!(thresholds(&dir).len(), 138);
    let state = std::fs::read_to_string(dir.join("state/thresholds.jsonl")).unwrap();
    assert!(state.starts_with("{\"format\":\"anomalyd-thresholds\""), "{state}");
}

#[test]
fn a_reload_moves_the_risk_at_once_and_a_rescaled_model_resets_thresholds() {
    let dir = temp_dir("thresholds-reload");
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for f in ["model.json", "model.onnx"] {
        std::fs::copy(repo().join("models/skab-convae").join(f), bundle.join(f)).unwrap();
    }
    let config = |risk: f64| {
        stdin_config(bundle.to_str().unwrap(), 0.0) + "scores_path = \"{dir}/scores.jsonl\"\n" + SPOT + &format!("risk = {risk}\n")
    };
    let mut d = Daemon::start_piped(&dir, &config(0.001));
    let records = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let lines: Vec<&str> = records.lines().collect();
    d.send(&lines[..61]);
    d.wait_for(|d| thresholds(&d.dir).len() == 29, "29 windows");
    let before = *thresholds(&dir).last().unwrap();

    // A higher risk: a lower threshold from the very next window, the fit kept.
    d.write_config(&config(0.01));
    d.signal("HUP");
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"ok\"}").is_some_and(|n| n >= 1.0), "the first reload");
    d.send(&lines[61..62]);
    d.wait_for(|d| thresholds(&d.dir).len() == 30, "the 30th window");
    let after = *thresholds(&dir).last().unwrap();
    assert!(after < before, "risk 0.01: {after} vs risk 0.001: {before}");

    // Other input scaling: scores on another scale, so the series' threshold starts again.
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("model.json")).unwrap()).unwrap();
    let std = meta["preprocess"]["columns"][0]["std"].as_f64().unwrap();
    meta["preprocess"]["columns"][0]["std"] = (std * 2.0).into();
    let loaded = d.metric("anomalyd_model_loaded_timestamp_seconds");
    std::fs::write(bundle.join("model.json"), serde_json::to_string(&meta).unwrap()).unwrap();
    d.signal("HUP");
    d.wait_for(|d| d.metric("anomalyd_model_loaded_timestamp_seconds") != loaded, "the new model");
    assert_eq!(d.metric("anomalyd_threshold_resets_total{reason=\"model_changed\"}"), Some(0.0), "no batch of the new model yet");
    d.send(&lines[62..140]);
    d.wait_for(|d| d.metric("anomalyd_threshold_resets_total{reason=\"model_changed\"}") == Some(1.0), "the reset");
    assert!(d.stderr().contains("The new model scores on another scale"));
    assert_eq!(d.stop(), 0);
}

#[test]
fn periodic_saves_are_written_while_the_daemon_keeps_scoring() {
    let dir = temp_dir("thresholds-periodic");
    // Unix seconds for time, so the test can write records of any second.
    let config = stdin_config("models/skab-convae", 0.0)
        + "[mapping]\ntimestamp_field = \"datetime\"\ntimestamp_format = \"unix_s\"\n"
        + SPOT
        + "save_interval_secs = 1\n";
    let mut d = Daemon::start_piped(&dir, &config);
    let records = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let rows: Vec<&str> = records.lines().collect();
    d.send(&rows[..1]);
    // One record every 20 ms, a second apart in event time, until a save has landed.
    let started = std::time::Instant::now();
    let start = 1_767_700_000i64;
    let mut sent = 0;
    for i in 0.. {
        if d.metric("anomalyd_threshold_state_saves_total{result=\"ok\"}").is_some_and(|n| n >= 1.0) {
            sent = i;
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "no periodic save; stderr:\n{}", d.stderr());
        let ts = start + i;
        let values = rows[1 + (i as usize % 200)].split_once(';').unwrap().1;
        d.send(&[format!("{ts};{values}").as_str()]);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let scored = d.metric("anomalyd_windows_scored_total").unwrap();
    let state = std::fs::read_to_string(dir.join("state/thresholds.jsonl")).unwrap();
    assert!(state.starts_with("{\"format\":\"anomalyd-thresholds\"") && state.lines().count() == 2, "{state}");
    // Scoring went on after the save: the next second's record completes a window.
    let next = start + sent;
    let values = rows[1].split_once(';').unwrap().1;
    d.send(&[format!("{next};{values}").as_str()]);
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total").is_some_and(|n| n > scored), "a window after the save");
    assert_eq!(d.stop(), 0);
}
