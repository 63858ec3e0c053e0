//! No silent pipeline death: a bundle or a setting that would break a stage is refused before it
//! is used, and a stage that fails anyway stops the daemon with exit code 1 (its cause logged),
//! instead of "all records scored" and exit 0.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{repo, stdin_config, temp_dir, Daemon};

fn records() -> Vec<String> {
    std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap().lines().map(String::from).collect()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `anomalyd <command> --config dir/anomalyd.toml` with `config` written there, to its end.
fn anomalyd(command: &str, dir: &std::path::Path, config: &str) -> Output {
    let path = dir.join("anomalyd.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
        .args([command, "--config", path.to_str().unwrap()])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "anomalyd {command} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The sample records from a file, with bundle `model`, in batches of up to 64 windows.
fn file_config(model: &str) -> String {
    let records = repo().join("contracts/skab-convae/records.csv");
    format!(
        r#"
[model]
path = "{model}"
[source]
kind = "file"
path = "{}"
format = "csv"
csv_delimiter = ";"
[scoring]
batch_max_windows = 64
batch_max_wait_ms = 200
[admin]
listen = "127.0.0.1:0"
"#,
        records.display()
    )
}

#[test]
fn a_reload_to_a_bundle_that_reads_other_fields_is_refused_and_scoring_goes_on() {
    let dir = temp_dir("reload-fields");
    let skab = repo().join("models/skab-convae");
    let mut d = Daemon::start_piped(&dir, &stdin_config(skab.to_str().unwrap(), 0.0));
    let lines = records();
    d.send(&lines[..41].iter().map(String::as_str).collect::<Vec<_>>());
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(9.0), "9 windows");

    // NSL-KDD's bundle reads connection records, not SKAB's sensors: the running source cannot
    // give it its fields, so the reload is refused (it used to be applied, then the window task
    // panicked on the first record).
    d.write_config(&stdin_config(repo().join("models/nslkdd-vae").to_str().unwrap(), 0.0));
    d.signal("HUP");
    d.wait_for(|d| d.metric("anomalyd_reloads_total{result=\"error\"}") == Some(1.0), "a refused reload");
    assert!(d.stderr().contains("reads other fields needs a restart"), "{}", d.stderr());

    d.send(&lines[41..51].iter().map(String::as_str).collect::<Vec<_>>());
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(19.0), "10 more windows of the running model");
    assert_eq!(d.get("/live").unwrap().0, 200);
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_bundle_whose_score_ignores_the_batch_size_is_refused_before_it_scores() {
    let dir = temp_dir("score-shape");
    let config = file_config("contracts/bundles/score-shape-1");
    for command in ["validate", "run"] {
        let out = anomalyd(command, &dir, &config);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{command}: {said}");
        assert!(said.contains("a batch of 3 windows gave `score` of shape [1]"), "{command}: {said}");
    }
}

#[test]
fn a_stage_that_fails_stops_the_daemon_with_exit_code_1_and_its_cause() {
    // The bundle scores only a batch's first three windows: it passes the start-up test runs (1
    // and 3 windows), then the first batch of more breaks the contract and the alert stage fails.
    let dir = temp_dir("stage-fails");
    let out = anomalyd("run", &dir, &file_config("contracts/bundles/score-first-3"));
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("the alert task failed") && said.contains("gave `score` of shape [3]"), "{said}");
    assert!(!said.contains("all records scored"), "{said}");
}

#[test]
fn a_replay_rate_too_slow_to_pace_is_a_config_error() {
    let dir = temp_dir("replay-rate");
    let config = file_config("models/skab-convae") + "";
    let config = config.replace("[source]\n", "[source]\nreplay_rate_per_sec = 1e-300\n");
    for command in ["validate", "run"] {
        let out = anomalyd(command, &dir, &config);
        assert_eq!(out.status.code(), Some(2), "{command}: {}", text(&out));
        assert!(text(&out).contains("source.replay_rate_per_sec"), "{}", text(&out));
    }
}

/// What `run` would fail on, `validate` fails on first, and both exit 2 but for a port in use
/// (worth a restart: exit 1 from `run`).
#[test]
fn validate_refuses_what_run_would_and_the_exit_codes_say_which() {
    let dir = temp_dir("validate");
    let base = file_config("models/skab-convae");
    let cases = [
        ("[output]\nsink = \"file\"\npath = \"/proc/anomalyd/alerts.jsonl\"\n", "output.path", 2),
        ("[output]\nscores_path = \"/proc/anomalyd/scores.jsonl\"\n", "output.scores_path", 2),
        ("[mapping]\nfields = { Current = \"Amps\" }\n", "CSV header", 2),
    ];
    for (extra, names, code) in cases {
        let config = base.clone() + extra;
        for command in ["validate", "run"] {
            let out = anomalyd(command, &dir, &config);
            assert_eq!(out.status.code(), Some(code), "{command} with {extra}: {}", text(&out));
            assert!(text(&out).contains(names), "{command} with {extra}: {}", text(&out));
        }
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = base.replace("127.0.0.1:0", &taken.local_addr().unwrap().to_string());
    for (command, code) in [("validate", 1), ("run", 1)] {
        let out = anomalyd(command, &dir, &config);
        assert_eq!(out.status.code(), Some(code), "{command}: {}", text(&out));
        assert!(text(&out).contains("admin.listen: cannot bind"), "{}", text(&out));
    }

    let kafka = "[source]\nkind = \"kafka\"\nformat = \"csv\"\ncsv_delimiter = \";\"\n\
                 csv_columns = [\"datetime\", \"Accelerometer1RMS\", \"Accelerometer2RMS\", \"Current\", \"Pressure\", \"Temperature\", \"Thermocouple\", \"Voltage\", \"Volume Flow RateRMS\"]\n\
                 [model]\npath = \"models/skab-convae\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [kafka]\nbrokers = \"127.0.0.1:1\"\ntopics = [\"metrics\"]\n[kafka.properties]\n\"fetch.wait.max.mz\" = \"100\"\n";
    let out = anomalyd("validate", &dir, kafka);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("fetch.wait.max.mz"), "{}", text(&out));
}
