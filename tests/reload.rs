//! Hot reload against the running daemon: SIGHUP and file changes, window state kept, a broken
//! bundle refused while the old one keeps scoring.

mod common;

use common::{repo, stdin_config, temp_dir, Daemon};

fn records() -> Vec<String> {
    std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap().lines().map(String::from).collect()
}

/// The default SKAB bundle copied into `dir/bundle`, for a test to change under the daemon.
fn copy_of_skab_bundle(dir: &std::path::Path) -> std::path::PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for f in ["model.json", "model.onnx"] {
        std::fs::copy(repo().join("models/skab-convae").join(f), bundle.join(f)).unwrap();
    }
    bundle
}

fn scored(d: &Daemon) -> f64 {
    d.metric("anomalyd_windows_scored_total").unwrap_or(0.0)
}

#[test]
fn a_threshold_change_applies_to_the_next_window_and_keeps_windows() {
    let dir = temp_dir("reload-threshold");
    let model = repo().join("models/skab-convae");
    let mut d = Daemon::start_piped(&dir, &stdin_config(model.to_str().unwrap(), 0.0));
    let lines = records();
    // Header and the first 60 records: one segment of 60 rows, 29 windows of W = 32.
    d.send(&lines[..61].iter().map(String::as_str).collect::<Vec<_>>());
    d.wait_for(|d| scored(d) == 29.0, "29 windows");
    let anomalous = d.metric("anomalyd_anomalous_windows_total").unwrap();

    d.write_config(&stdin_config(model.to_str().unwrap(), 1e-6));
    d.signal("HUP");
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"ok\"}").is_some_and(|v| v >= 1.0), "reload");
    assert_eq!(d.metric("anomalyd_model_threshold"), Some(1e-6));

    // The very next record completes a window (no warm-up: windows were kept), and it is
    // anomalous under the new threshold.
    d.send(&[lines[61].as_str()]);
    d.wait_for(|d| scored(d) == 30.0, "the 30th window");
    assert_eq!(d.metric("anomalyd_anomalous_windows_total"), Some(anomalous + 1.0));
    assert_eq!(d.metric("anomalyd_series_warming"), Some(0.0));
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_broken_bundle_is_refused_and_the_old_model_keeps_scoring() {
    let dir = temp_dir("reload-broken");
    let bundle = copy_of_skab_bundle(&dir);
    let mut d = Daemon::start_piped(&dir, &stdin_config(bundle.to_str().unwrap(), 0.0));
    let info = d.metrics().lines().find(|l| l.starts_with("anomalyd_model_info")).unwrap().to_string();
    let lines = records();
    d.send(&lines[..41].iter().map(String::as_str).collect::<Vec<_>>());
    d.wait_for(|d| scored(d) == 9.0, "9 windows");

    // A bundle whose graph no longer matches its model.json: the reload fails on the sha256.
    let mut onnx = std::fs::read(bundle.join("model.onnx")).unwrap();
    onnx.extend_from_slice(b"garbage");
    std::fs::write(bundle.join("model.onnx"), onnx).unwrap();
    let json = std::fs::read_to_string(bundle.join("model.json")).unwrap();
    std::fs::write(bundle.join("model.json"), json + " ").unwrap();
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"error\"}").is_some_and(|v| v >= 1.0), "failed reload");
    assert!(d.stderr().contains("Reload failed") && d.stderr().contains("does not match"), "{}", d.stderr());

    d.send(&lines[41..51].iter().map(String::as_str).collect::<Vec<_>>());
    d.wait_for(|d| scored(d) == 19.0, "10 more windows from the old model");
    assert!(d.metrics().contains(&info), "model_info changed after a failed reload");
    assert_eq!(d.stderr().matches("Reload failed").count(), 1, "logged once, not on every poll");
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_new_bundle_brings_its_own_gap_and_nan_policy() {
    let dir = temp_dir("reload-gap");
    let bundle = copy_of_skab_bundle(&dir);
    let mut d = Daemon::start_piped(&dir, &stdin_config(bundle.to_str().unwrap(), 0.0));
    // The records hold a 30 s gap (after 70 rows 1 s apart): the bundle's max_gap_secs of 10
    // restarts the window there. A new bundle that allows 1000 s must not.
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("model.json")).unwrap()).unwrap();
    assert_eq!(meta["window"]["max_gap_secs"], 10.0);
    meta["window"]["max_gap_secs"] = 1000.0.into();
    meta["window"]["nan_policy"] = "ffill".into();
    std::fs::write(bundle.join("model.json"), meta.to_string()).unwrap();
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"ok\"}").is_some_and(|v| v >= 1.0), "reload");

    let lines = records();
    let mut sent: Vec<String> = lines[..101].to_vec();
    // A NaN after the gap: dropped under the old policy ("error"), filled under "ffill".
    let last: Vec<&str> = lines[100].split(';').collect();
    sent.push(format!("2026-01-05 10:03:00;nan;{}", last[2..].join(";")));
    d.send(&sent.iter().map(String::as_str).collect::<Vec<_>>());
    // 100 data rows and the filled one, one segment: every row from the 32nd completes a window.
    d.wait_for(|d| scored(d) == 70.0, "70 windows: no restart at the gap, the NaN row filled");
    assert_eq!(d.metric("anomalyd_records_discarded_total{reason=\"nan\"}"), Some(0.0));
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_reload_of_a_file_with_a_broken_password_line_logs_the_line_not_the_password() {
    let dir = temp_dir("reload-secret");
    let config = stdin_config(repo().join("models/skab-convae").to_str().unwrap(), 0.0);
    let d = Daemon::start_piped(&dir, &config);
    let secret = "S3cr3t-pw-4242";
    // The closing quote is missing.
    d.write_config(&format!("{config}[kafka.properties]\n\"sasl.password\" = \"{secret}\n"));
    d.signal("HUP");
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"error\"}").is_some_and(|v| v >= 1.0), "failed reload");
    let log = d.stderr();
    assert!(log.contains("Reload failed") && log.contains("line"), "{log}");
    assert!(!log.contains(secret), "the reload error printed the password:\n{log}");
    assert_eq!(d.stop(), 0);
}
