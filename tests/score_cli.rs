//! `anomalyd score` end to end: real bundle, real ONNX Runtime, files in and out.

mod common;

use std::process::Command;

use common::{repo, temp_dir};

fn score(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_anomalyd")).arg("score").arg("--quiet").args(args).output().unwrap()
}

#[test]
fn scores_every_window_of_the_golden_records_like_the_trainer() {
    let dir = temp_dir("score-golden");
    let out = dir.join("skab.csv");
    let records = repo().join("contracts/skab-convae/records.csv");
    let run = score(&["--model", "models/skab-convae", "--input", records.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("contracts/skab-convae/golden.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len() as u64, golden["windows_total"].as_u64().unwrap());
    for g in golden["windows"].as_array().unwrap() {
        let row = &rows[g["index"].as_u64().unwrap() as usize];
        let anomaly: f64 = row[4].parse().unwrap();
        let expected = g["anomaly_score"].as_f64().unwrap();
        assert!((anomaly - expected).abs() <= 1e-5 * expected.abs().max(1.0), "{row:?} vs {expected}");
    }
    // The level shift in Current and Pressure is what the alerting windows blame.
    let alerting: Vec<&Vec<&str>> = rows.iter().filter(|r| r[4].parse::<f64>().unwrap() > 1.0).collect();
    assert!(!alerting.is_empty());
    assert!(alerting.iter().all(|r| r[5].starts_with("Current") || r[5].starts_with("Pressure")), "{alerting:?}");
    // 200 records: one repeated timestamp dropped, reported on stderr.
    assert!(String::from_utf8_lossy(&run.stderr).contains("out_of_order"));
}

#[test]
fn bad_lines_are_counted_by_reason_and_skipped() {
    let dir = temp_dir("score-bad");
    let input = dir.join("bad.ndjson");
    let model = repo().join("models/flows-vae");
    let features: Vec<String> = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(model.join("model.json")).unwrap())
        .unwrap()["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let good = |ts: u32| {
        let fields: Vec<String> = features.iter().map(|f| format!("\"{f}\": 1.0")).collect();
        format!("{{\"host\": \"h\", \"bucket_start\": {ts}, {}}}", fields.join(", "))
    };
    let lines = [
        good(60),
        "{not json".into(),
        "[]".into(),
        good(120).replace("\"flows\": 1.0", "\"flows\": \"many\""),
        good(120).replace("\"bytes\": 1.0, ", ""),
        "x".repeat(2 << 20),
        good(180),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    // Flow feature rows keyed by host and bucket_start, given directly as NDJSON (`--format
    // ndjson`: for a flow model the default is goflow2 records, aggregated as `run` does).
    let run =
        score(&["--model", model.to_str().unwrap(), "--input", input.to_str().unwrap(), "--format", "ndjson", "--output-format", "ndjson"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let stderr = String::from_utf8_lossy(&run.stderr);
    for reason in ["\"malformed\": 2", "\"wrong_type\": 1", "\"missing_field\": 1", "\"too_long\": 1"] {
        assert!(stderr.contains(reason), "{reason} not in {stderr}");
    }
}

#[test]
fn a_missing_library_is_a_clear_start_up_error() {
    let run = score(&[
        "--model",
        "models/skab-convae",
        "--input",
        "contracts/skab-convae/records.csv",
        "--onnxruntime",
        "/nonexistent/libonnxruntime.so.1.32.0",
    ]);
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("ONNX Runtime 1.32.0 not found") && stderr.contains("/nonexistent/"), "{stderr}");
}

/// As a user runs it: from another folder, with no ONNX Runtime variable, as built and as a
/// copy elsewhere (`cargo install` puts it in `~/.cargo/bin`).
#[test]
fn the_binary_finds_onnx_runtime_from_any_folder_and_when_installed_elsewhere() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("anomalyd-anywhere-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("prefix/bin")).unwrap();
    let installed = dir.join("prefix/bin/anomalyd");
    std::fs::copy(env!("CARGO_BIN_EXE_anomalyd"), &installed).unwrap();
    for binary in [std::path::Path::new(env!("CARGO_BIN_EXE_anomalyd")), installed.as_path()] {
        let run = Command::new(binary)
            .current_dir(&dir)
            .env_remove("ORT_DYLIB_PATH")
            .args(["score", "--quiet", "--model"])
            .arg(repo.join("models/skab-convae"))
            .arg("--input")
            .arg(repo.join("contracts/skab-convae/records.csv"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{}: {stderr}", binary.display());
        assert_eq!(String::from_utf8_lossy(&run.stdout).lines().count(), 139, "{}: a header and 138 windows", binary.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// goflow2 flow records, aggregated into per-host buckets as `run` aggregates them: every window
/// of the trainer's golden vectors, with its score.
#[test]
fn scores_goflow2_flows_like_the_trainer() {
    let run = score(&["--model", "models/flows-vae", "--input", "contracts/flows-vae/records.ndjson", "--output-format", "ndjson"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("contracts/flows-vae/golden.json").unwrap()).unwrap();
    assert_eq!(rows.len() as u64, golden["windows_total"].as_u64().unwrap());
    for g in golden["windows"].as_array().unwrap() {
        let (series, end_ts) = (g["series"].as_str().unwrap(), g["end_ts"].as_f64().unwrap());
        let row = rows.iter().find(|r| r["series"] == series && r["end_ts"].as_f64() == Some(end_ts));
        let row = row.unwrap_or_else(|| panic!("no window of {series} ending at {end_ts}"));
        let (got, want) = (row["score"].as_f64().unwrap(), g["score"].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{series} at {end_ts}: score {got} vs {want}");
    }
}

#[test]
fn a_delimiter_csv_core_cannot_split_on_is_an_error_not_a_panic() {
    let records = repo().join("contracts/skab-convae/records.csv");
    let run = score(&["--model", "models/skab-convae", "--input", records.to_str().unwrap(), "--delimiter", "§"]);
    assert_eq!(run.status.code(), Some(2), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("is not one ASCII character"));
}

/// The golden SKAB records with `edit` applied to the data lines at `rows` (0 = first record).
fn golden_records_with(dir: &std::path::Path, rows: &[usize], edit: impl Fn(&str) -> Vec<u8>) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match i {
            0 => out.extend_from_slice(line.as_bytes()),
            i if rows.contains(&(i - 1)) => out.extend(edit(line)),
            _ => out.extend_from_slice(line.as_bytes()),
        }
        out.push(b'\n');
    }
    let path = dir.join("records.csv");
    std::fs::write(&path, out).unwrap();
    path
}

/// A SKAB record line with its last value replaced.
fn last_value(line: &str, value: &str) -> Vec<u8> {
    line.rsplit_once(';').map(|(a, _)| format!("{a};{value}")).unwrap().into_bytes()
}

#[test]
fn a_huge_finite_value_is_dropped_and_counted_not_scored_as_nan() {
    let dir = temp_dir("score-huge");
    // A sensor's "invalid" marker: finite, but the model cannot square its scaled feature.
    let input = golden_records_with(&dir, &[100], |line| last_value(line, "3e38"));
    let run = score(&["--model", "models/skab-convae", "--input", input.to_str().unwrap(), "--output-format", "ndjson"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.len() > 100);
    let bad: Vec<_> = rows.iter().filter(|r| !r["score"].as_f64().is_some_and(f64::is_finite)).collect();
    assert!(bad.is_empty(), "{} windows without a finite score, e.g. {}", bad.len(), bad[0]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("\"nan\": 1"), "{stderr}");
}

#[test]
fn a_line_that_is_not_utf8_is_counted_as_malformed_and_scoring_goes_on() {
    let dir = temp_dir("score-utf8");
    let input = golden_records_with(&dir, &[100], |line| {
        let mut bytes = line.as_bytes().to_vec();
        bytes[25] = 0xff;
        bytes
    });
    let out = dir.join("scores.csv");
    let run = score(&["--model", "models/skab-convae", "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("\"malformed\": 1"), "{stderr}");
    // Every line is read: the windows of the records after it are scored too.
    let rows = std::fs::read_to_string(&out).unwrap().lines().count() - 1;
    assert!(rows > 120, "{rows} windows");
}

#[test]
fn windows_the_model_scores_non_finite_are_counted_not_written() {
    let dir = temp_dir("score-overflow");
    // Each value alone is in range (its square is finite); three in a window overflow the score.
    let input = golden_records_with(&dir, &[100, 101, 102], |line| last_value(line, "2.5e19"));
    let run = score(&["--model", "models/skab-convae", "--input", input.to_str().unwrap(), "--output-format", "ndjson"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 138 - 31);
    assert!(rows.iter().all(|r| r["score"].as_f64().is_some_and(f64::is_finite)));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("107 windows scored") && stderr.contains("windows with a non-finite score (not written): 31"), "{stderr}");
}
