//! `anomalyd run` end to end on the file source: real bundle, real ONNX Runtime, alerts and
//! /metrics scraped over HTTP.

mod common;

use common::{assert_flow_alert, attacked_host_minutes, metric, repo, temp_dir, Daemon};

const BASE: &str = r#"
[model]
path = "models/skab-convae"
[source]
kind = "file"
path = "{records}"
format = "csv"
csv_delimiter = ";"
[admin]
listen = "127.0.0.1:{port}"
[output]
sink = "file"
path = "{dir}/alerts.jsonl"
"#;

fn alerts(d: &Daemon) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.dir.join("alerts.jsonl")).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn sample_stream_anomaly_fires_and_resolves_and_metrics_say_so() {
    let dir = temp_dir("pipeline");
    let records = repo().join("contracts/skab-convae/records.csv");
    let d = Daemon::start(&dir, &BASE.replace("{records}", records.to_str().unwrap()));
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "all 138 windows scored");
    let m = d.metrics();
    assert_eq!(metric(&m, "anomalyd_records_received_total"), Some(201.0));
    assert_eq!(metric(&m, "anomalyd_records_discarded_total{reason=\"out_of_order\"}"), Some(1.0));
    assert_eq!(metric(&m, "anomalyd_alerts_total{state=\"firing\"}"), Some(1.0));
    assert_eq!(metric(&m, "anomalyd_series_live"), Some(1.0));
    assert!(metric(&m, "anomalyd_anomaly_score{series=\"records.csv\"}").is_some());
    assert!(m.contains("anomalyd_model_info{kind=\"conv_ae\",model=\"skab-convae\""));

    // The records shift Current and Pressure from their 131st row (2026-01-05 10:02:41 UTC, after
    // a 30 s gap at row 71) for 30 rows; the alert must start inside that stretch and blame them.
    let events = alerts(&d);
    let fired = events.iter().find(|e| e["event"] == "firing").expect("a firing event");
    let shift_start = 1767607361.0;
    let started = fired["started_ts"].as_f64().unwrap();
    assert!((shift_start..shift_start + 30.0).contains(&started), "fired at {started}");
    let top = fired["top_features"][0]["name"].as_str().unwrap();
    assert!(top == "Current" || top == "Pressure", "{fired}");
    assert!(events.iter().any(|e| e["event"] == "resolved"));

    // Names, types and help text pass Prometheus' own linter on this real scrape.
    let (ok, output) = promtool_check_metrics(&m);
    assert!(ok && output.trim().is_empty(), "promtool check metrics: {output}");
    assert_eq!(d.stop(), 0);
}

#[test]
fn bad_records_are_counted_by_reason_and_never_stop_the_stream() {
    let dir = temp_dir("badinput");
    let good = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut lines: Vec<String> = good.lines().map(String::from).collect();
    let header = lines.remove(0);
    let mut input = vec![header];
    for (i, line) in lines.iter().enumerate() {
        // Unparseable lines come in addition to the good ones; the NaN record replaces one (a
        // dropped record still takes its timestamp, so a copy would make its twin out of order).
        match i {
            10 => input.push("garbage".into()),
            30 => input.push(line.rsplit_once(';').map(|(a, _)| format!("{a};not-a-number")).unwrap()),
            50 => input.push(format!("{};{}", line, "x".repeat(2 << 20))),
            60 => input.push(line.replacen("2026-", "yesterday-", 1)),
            _ => {}
        }
        if i == 40 {
            input.push(line.rsplit_once(';').map(|(a, _)| format!("{a};NaN")).unwrap());
        } else {
            input.push(line.clone());
        }
    }
    let path = dir.join("bad.csv");
    std::fs::write(&path, input.join("\n")).unwrap();
    let d = Daemon::start(&dir, &BASE.replace("{records}", path.to_str().unwrap()));
    d.wait_for(|d| d.stderr().contains("Pipeline idle"), "the whole file processed");
    let m = d.metrics();
    assert_eq!(metric(&m, "anomalyd_records_received_total"), Some(205.0));
    assert!(metric(&m, "anomalyd_windows_scored_total").unwrap() > 100.0);
    let discarded = |r: &str| metric(&m, &format!("anomalyd_records_discarded_total{{reason=\"{r}\"}}")).unwrap_or(0.0);
    assert_eq!(discarded("missing_field"), 1.0, "garbage has the wrong column count\n{m}");
    assert_eq!(discarded("too_long"), 1.0);
    assert_eq!(discarded("wrong_type"), 1.0);
    assert_eq!(discarded("nan"), 1.0);
    assert_eq!(discarded("bad_timestamp"), 1.0);
    assert_eq!(discarded("out_of_order"), 1.0);
    assert_eq!(d.stop(), 0);
}

/// Reads from stdin, which stays open; batches never fill and never time out.
fn stdin_with_endless_batches(flush_when_idle: bool) -> String {
    BASE.replace("kind = \"file\"", "kind = \"stdin\"")
        + &format!("[scoring]\nbatch_max_windows = 100000\nbatch_max_wait_ms = 600000\nflush_when_idle = {flush_when_idle}\n")
}

#[test]
fn a_partial_batch_goes_to_an_idle_worker_at_once() {
    let records = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let dir = temp_dir("idle");
    let mut d = Daemon::start_piped(&dir, &stdin_with_endless_batches(true));
    let lines: Vec<&str> = records.lines().collect();
    d.send(&lines);
    // As many windows as from the file.
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "all 138 windows scored while the stream stays open");
    assert_eq!(d.stop(), 0);
}

#[test]
fn shutdown_scores_what_is_buffered_and_flushes_alerts() {
    let dir = temp_dir("drain");
    let records = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    // Only the signal ends intake, and batches do not go to idle workers either, so every
    // window waits in the window stage until the drain.
    let mut d = Daemon::start_piped(&dir, &stdin_with_endless_batches(false));
    let mut lines: Vec<&str> = records.lines().collect();
    // A last line the window stage drops: once it is counted, the stage has handled every line
    // before it (one task, in order), so no window can still be on its way to scoring.
    lines.push("2026-01-05 10:09:00;not a number;0;0;0;0;0;0;0");
    d.send(&lines);
    d.wait_for(|d| d.metric("anomalyd_records_discarded_total{reason=\"wrong_type\"}") == Some(1.0), "the whole stream handled");
    assert_eq!(d.metric("anomalyd_windows_scored_total"), Some(0.0));
    assert!(alerts(&d).is_empty());
    let dir = d.dir.clone();
    assert_eq!(d.stop(), 0);
    let events: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("alerts.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.iter().any(|e| e["event"] == "firing"), "buffered windows were scored at shutdown");
    let log = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(log.contains("Draining.") && log.contains("Stopped."), "{log}");
}

#[test]
fn idle_series_are_evicted_with_their_gauges() {
    let dir = temp_dir("evict");
    let csv = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut rows = csv.lines();
    let header = format!("ts;series;{}", rows.next().unwrap().split_once(';').unwrap().1);
    let values: Vec<&str> = rows.map(|r| r.split_once(';').unwrap().1).collect();
    // Series "a" for 40 s, then only "b" from 1000 s on: "a" is idle past the 60 s timeout.
    let mut lines = vec![header];
    lines.extend((0..40).map(|i| format!("{i};a;{}", values[i])));
    lines.extend((0..100).map(|i| format!("{};b;{}", 1000 + i, values[i])));
    let path = dir.join("two.csv");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let config = BASE.replace("{records}", path.to_str().unwrap())
        + "[mapping]\ntimestamp_field = \"ts\"\ntimestamp_format = \"unix_s\"\nseries_fields = [\"series\"]\n[windows]\nidle_timeout_secs = 60\n"
        + "[thresholds]\nmode = \"spot\"\n";
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.stderr().contains("Pipeline idle"), "the whole file processed");
    let m = d.metrics();
    assert_eq!(metric(&m, "anomalyd_series_evicted_total"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "anomalyd_series_live"), Some(1.0));
    assert!(metric(&m, "anomalyd_anomaly_score{series=\"a\"}").is_none(), "evicted series keeps no gauge");
    assert!(metric(&m, "anomalyd_series_threshold{series=\"a\"}").is_none());
    assert_eq!(metric(&m, "anomalyd_threshold_resets_total{reason=\"series_dropped\"}"), Some(1.0), "its threshold went with it");
    assert!(metric(&m, "anomalyd_anomaly_score{series=\"b\"}").is_some());
    assert_eq!(d.stop(), 0);
}

/// `promtool check metrics` on a scrape: (passed, what it printed).
fn promtool_check_metrics(text: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/setup (Debian package prometheus)");
    child.stdin.take().expect("piped").write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn influx_line_protocol_scores_like_csv() {
    let dir = temp_dir("influx");
    let csv = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(';').collect();
    let lines: Vec<String> = rows
        .map(|row| {
            let cells: Vec<&str> = row.split(';').collect();
            let ts = chrono::NaiveDateTime::parse_from_str(cells[0], "%Y-%m-%d %H:%M:%S").unwrap().and_utc();
            let fields: Vec<String> = header[1..].iter().zip(&cells[1..]).map(|(k, v)| format!("{}={v}", k.replace(' ', "\\ "))).collect();
            format!("pump,site=a {} {}", fields.join(","), ts.timestamp_nanos_opt().unwrap())
        })
        .collect();
    // One more series than windows.max_series allows: refused and counted, not scored.
    let mut lines = lines;
    lines.insert(5, lines[5].replace("site=a", "site=b"));
    let path = dir.join("records.lp");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let config = BASE.replace("{records}", path.to_str().unwrap()).replace("format = \"csv\"", "format = \"influx\"")
        + "[mapping]\ntimestamp_format = \"unix_ns\"\nseries_fields = [\"site\"]\n[windows]\nmax_series = 1\n";
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(138.0), "all 138 windows scored");
    let m = d.metrics();
    assert_eq!(metric(&m, "anomalyd_alerts_total{state=\"firing\"}"), Some(1.0));
    assert!(metric(&m, "anomalyd_anomaly_score{series=\"a\"}").is_some());
    assert_eq!(metric(&m, "anomalyd_records_discarded_total{reason=\"series_limit\"}"), Some(1.0));
    assert_eq!(metric(&m, "anomalyd_series_live"), Some(1.0));
    assert_eq!(d.stop(), 0);
}

#[test]
fn goflow2_flows_are_bucketed_scored_and_alert_on_the_attacking_host() {
    let dir = temp_dir("flows");
    let records = repo().join("contracts/flows-vae/records.ndjson");
    // Late flows beyond the lateness are counted, not scored: repeat an early flow at the end.
    let mut text = std::fs::read_to_string(&records).unwrap();
    let first = text.lines().next().unwrap().to_string();
    text.push_str(&first);
    text.push('\n');
    let path = dir.join("flows.ndjson");
    std::fs::write(&path, text).unwrap();
    let config = BASE
        .replace("models/skab-convae", "models/flows-vae")
        .replace("{records}", path.to_str().unwrap())
        .replace("format = \"csv\"", "format = \"goflow2\"");
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.stderr().contains("Pipeline idle"), "the whole file processed");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("contracts/flows-vae/golden.json")).unwrap()).unwrap();
    let m = d.metrics();
    assert_eq!(metric(&m, "anomalyd_windows_scored_total"), golden["windows_total"].as_f64(), "one window per host-minute");
    assert_eq!(metric(&m, "anomalyd_records_discarded_total{reason=\"late_flow\"}"), Some(1.0));

    // The generator's labels name the attacked host-minutes; alerts go to that host only, during the attack.
    let attacked = attacked_host_minutes();
    let events = alerts(&d);
    let fired: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "firing").collect();
    assert!(!fired.is_empty());
    fired.iter().for_each(|e| assert_flow_alert(e, &attacked));
    assert_eq!(d.stop(), 0);
}

/// Runs the golden records with the last value of some data rows (0 = the first) replaced; the
/// metrics and the scores written once the file is processed.
fn run_with_last_values(name: &str, replaced: &[(usize, &str)]) -> (String, Vec<serde_json::Value>) {
    let dir = temp_dir(name);
    let good = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let lines: Vec<String> = good
        .lines()
        .enumerate()
        .map(|(i, l)| match replaced.iter().find(|(row, _)| row + 1 == i) {
            Some((_, v)) => l.rsplit_once(';').map(|(a, _)| format!("{a};{v}")).unwrap(),
            None => l.to_string(),
        })
        .collect();
    let path = dir.join("records.csv");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let config =
        BASE.replace("{records}", path.to_str().unwrap()).replace("[output]\n", "[output]\nscores_path = \"{dir}/scores.jsonl\"\n");
    let d = Daemon::start(&dir, &config);
    d.wait_for(|d| d.stderr().contains("Pipeline idle"), "the whole file processed");
    let m = d.metrics();
    let scores = std::fs::read_to_string(d.dir.join("scores.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(d.stop(), 0);
    (m, scores)
}

fn assert_all_finite(scores: &[serde_json::Value]) {
    let bad: Vec<_> = scores.iter().filter(|s| !s["score"].as_f64().is_some_and(f64::is_finite)).collect();
    assert!(bad.is_empty(), "{} windows without a finite score, e.g. {}", bad.len(), bad[0]);
}

#[test]
fn a_huge_finite_value_is_dropped_and_counted_not_scored_as_nan() {
    // A sensor's "invalid" marker: finite, but the model cannot square its scaled feature.
    let (m, scores) = run_with_last_values("huge", &[(100, "3e38")]);
    assert_eq!(metric(&m, "anomalyd_records_discarded_total{reason=\"nan\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "anomalyd_errors_total{error_type=\"non_finite_score\",stage=\"scoring\"}"), Some(0.0), "{m}");
    assert_all_finite(&scores);
    // One row fewer: one window fewer, none lost around it.
    assert_eq!(scores.len(), 137);
    assert_eq!(metric(&m, "anomalyd_windows_scored_total"), Some(137.0));
}

#[test]
fn windows_the_model_scores_non_finite_are_counted_not_judged() {
    // Each value alone is in range (its square is finite), but three in a window overflow the
    // model's mean squared error.
    let (m, scores) = run_with_last_values("overflow", &[(100, "2.5e19"), (101, "2.5e19"), (102, "2.5e19")]);
    assert_eq!(metric(&m, "anomalyd_records_discarded_total{reason=\"nan\"}"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "anomalyd_errors_total{error_type=\"non_finite_score\",stage=\"scoring\"}"), Some(31.0), "{m}");
    assert_all_finite(&scores);
    assert_eq!(scores.len(), 138 - 31);
    assert_eq!(metric(&m, "anomalyd_windows_scored_total"), Some(107.0));
}
