//! Hostile input to `anomalyd run`: a record from a clock far ahead, and series names of hundreds
//! of kilobytes. Each is refused and counted, and the other series go on as if it never came.

mod common;

use common::{repo, temp_dir, Daemon};

/// `n` series of `rows` records each (one per second, interleaved), `ts;series;` and the
/// sample's sensor values, behind the header.
fn series_csv(n: usize, rows: usize) -> Vec<String> {
    let csv = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap().split_once(';').unwrap().1.to_string();
    let values: Vec<&str> = lines.map(|l| l.split_once(';').unwrap().1).collect();
    let mut out = vec![format!("ts;series;{header}")];
    for i in 0..rows {
        for s in 0..n {
            out.push(format!("{};s{s};{}", 1_700_000_000 + i, values[(i * n + s) % values.len()]));
        }
    }
    out
}

fn file_config(records: &std::path::Path) -> String {
    format!(
        r#"
[model]
path = "models/skab-convae"
[source]
kind = "file"
path = "{}"
format = "csv"
csv_delimiter = ";"
[mapping]
timestamp_field = "ts"
timestamp_format = "unix_s"
series_fields = ["series"]
[admin]
listen = "127.0.0.1:{{port}}"
"#,
        records.display()
    )
}

#[test]
fn a_record_from_a_clock_far_ahead_is_refused_and_no_series_is_harmed() {
    let dir = temp_dir("future");
    // 50 series x 120 records, and in the middle one record of s7 dated 2999-01-01: it used to
    // make s7 refuse every later record as out of order, and evict the 49 others at once.
    let mut lines = series_csv(50, 120);
    let values = lines[1].splitn(3, ';').nth(2).unwrap().to_string();
    lines.insert(3000, format!("32472144000;s7;{values}"));
    let records = dir.join("records.csv");
    std::fs::write(&records, lines.join("\n") + "\n").unwrap();
    let d = Daemon::start(&dir, &file_config(&records));
    // W = 32: 89 windows from each series' 120 records.
    d.wait_for(|d| d.metric("anomalyd_windows_scored_total") == Some(50.0 * 89.0), "every window of the 50 series");
    assert_eq!(d.metric("anomalyd_records_discarded_total{reason=\"future_timestamp\"}"), Some(1.0));
    assert_eq!(d.metric("anomalyd_records_discarded_total{reason=\"out_of_order\"}"), Some(0.0));
    assert_eq!(d.metric("anomalyd_series_evicted_total"), Some(0.0));
    assert!(d.stderr().contains("ahead of the clock"), "{}", d.stderr());
    assert_eq!(d.stop(), 0);
}

#[test]
fn series_names_of_300_kb_are_refused_and_the_scrape_stays_small() {
    let dir = temp_dir("long-names");
    let mut lines = series_csv(2, 60);
    let values = lines[1].splitn(3, ';').nth(2).unwrap().to_string();
    let long = "x".repeat(300_000);
    for i in 0..40 {
        lines.push(format!("{};{long}{i};{values}", 1_700_000_100 + i));
    }
    let records = dir.join("records.csv");
    std::fs::write(&records, lines.join("\n") + "\n").unwrap();
    let d = Daemon::start(&dir, &file_config(&records));
    d.wait_for(|d| d.metric("anomalyd_records_discarded_total{reason=\"series_name_too_long\"}") == Some(40.0), "40 names refused");
    assert_eq!(d.metric("anomalyd_windows_scored_total"), Some(2.0 * 29.0));
    assert_eq!(d.metric("anomalyd_series_live"), Some(2.0));
    let scrape = d.metrics();
    assert!(scrape.len() < 200_000, "a scrape of {} bytes", scrape.len());
    assert_eq!(d.stop(), 0);
}
