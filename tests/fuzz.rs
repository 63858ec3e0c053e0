//! Property tests over the record parsers and the window stage's logic, with the bundled models'
//! mappings and preprocessors: arbitrary bytes and hostile-but-structured records (huge, tiny, NaN
//! and infinite numbers, empty and huge fields, odd, repeated and decreasing timestamps, long
//! series names).
//!
//! Properties: nothing panics; every window is all finite f32; every input line ends in exactly
//! one outcome (a header, a parse error with one reason, a row buffered, a window, or a window
//! drop with one reason), so the counts add up to the lines; and windows of sensor markers and
//! garbage score finite through the real model. `CASES` bounds the run time: the whole file takes
//! about 15 s on two busy cores (`cargo test --release --test fuzz`).

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anomalyd::flows::{parse_flow, FlowAggregator, FLOW_FEATURES};
use anomalyd::model::{as_windows, Model, Scorer};
use anomalyd::preprocess::Preprocessor;
use anomalyd::record::{line_text, FieldMap, LineFormat, LineParser, RawRecord, TimeFormat, Value};
use anomalyd::window::{Outcome, WindowSpec, Windower};
use common::repo;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per property (the ONNX one runs an eighth of them).
const CASES: u32 = 256;

fn config() -> Config {
    Config { cases: CASES, failure_persistence: None, ..Config::default() }
}

fn model(name: &str) -> &'static Model {
    static MODELS: OnceLock<BTreeMap<&'static str, Model>> = OnceLock::new();
    let models = MODELS.get_or_init(|| {
        ["skab-convae", "nslkdd-vae", "flows-vae"].into_iter().map(|n| (n, Model::load(repo().join("models").join(n)).unwrap())).collect()
    });
    &models[name]
}

/// The bundle's training mapping (as `anomalyd score` reads a file), with `series` fields if given.
fn field_map(model: &Model, series: &[&str]) -> FieldMap {
    let pre = Preprocessor::new(&model.meta);
    let timestamp = model.meta.preprocess.timestamp.as_ref().map(|t| (t.column.clone(), TimeFormat::parse(&t.format)));
    let series =
        if series.is_empty() { model.meta.preprocess.series_columns.clone() } else { series.iter().map(|s| s.to_string()).collect() };
    FieldMap { timestamp, series, fields: pre.fields().to_vec() }
}

/// Where each line ended: exactly one of these per line.
#[derive(Debug, Default)]
struct Tally {
    lines: usize,
    header: usize,
    rejected: BTreeMap<&'static str, usize>,
    buffered: usize,
    windows: usize,
    dropped: BTreeMap<&'static str, usize>,
}

impl Tally {
    fn outcomes(&self) -> usize {
        self.header + self.rejected.values().sum::<usize>() + self.buffered + self.windows + self.dropped.values().sum::<usize>()
    }
}

/// The window stage's logic for one record: the windower's outcome, checked against what it
/// appended (W × F finite values for a window, nothing otherwise).
fn push(windower: &mut Windower, record: &RawRecord, out: &mut Vec<f32>, tally: &mut Tally, wf: usize) {
    let before = out.len();
    match windower.push(record, out).outcome {
        Outcome::Buffered => tally.buffered += 1,
        Outcome::Window { start_ts, end_ts } => {
            assert!(start_ts <= end_ts, "window from {start_ts} to {end_ts}");
            tally.windows += 1;
        }
        Outcome::Dropped(reason) => *tally.dropped.entry(reason.reason()).or_default() += 1,
    }
    let added = out.len() - before;
    assert!(added == 0 || added == wf, "a push appended {added} values, not 0 or W × F = {wf}");
    assert!(out[before..].iter().all(|v| v.is_finite()), "non-finite value in a window of {record:?}");
}

/// Feeds lines as the file source and the window stage do: bytes → UTF-8 text (or `malformed`),
/// blank lines skipped, then the parser, then the windower. Returns the windows' values.
fn feed(model: &Model, format: LineFormat, map: FieldMap, header: Option<&[String]>, lines: &[Vec<u8>], tally: &mut Tally) -> Vec<f32> {
    let delimiter = model.meta.training_config.data.csv_delimiter.chars().next().unwrap_or(',');
    let mut parser = LineParser::for_format(format, map, header, delimiter).unwrap();
    let mut windower = Windower::with_max_series(WindowSpec::for_model(model, 1), Preprocessor::new(&model.meta), 8);
    let wf = model.window_len() * model.n_features();
    let mut out = Vec::new();
    for bytes in lines {
        let text = line_text(bytes.clone());
        if text.as_ref().is_ok_and(|t| t.trim().is_empty()) {
            continue; // not a record (the source skips it before counting)
        }
        tally.lines += 1;
        match text.map(|t| parser.parse(&t, "fuzz")) {
            Err(e) | Ok(Some(Err(e))) => *tally.rejected.entry(e.reason()).or_default() += 1,
            Ok(None) => tally.header += 1,
            Ok(Some(Ok(record))) => push(&mut windower, &record, &mut out, tally, wf),
        }
    }
    assert_eq!(tally.outcomes(), tally.lines, "{tally:?}");
    assert_eq!(out.len(), tally.windows * wf);
    out
}

// === Hostile values ===

/// Number text a sensor, a spreadsheet or an attacker might send.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (-1000.0f64..1000.0).prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| format!("{v:e}")),
        2 => prop::sample::select(vec![
            "3e38", "-3e38", "3.4028235e38", "1e308", "-1.7976931348623157e308", "1e309", "-1e309", "1e-320", "5e-324", "-0",
            "NaN", "nan", "inf", "-inf", "Infinity", "", " ", "null", "N/A", "0x10", "1_000", "1,5", "١٢", "+", "-", ".", "e5",
            "2.5e19", "1.8e19", "-1.8e19",
        ])
        .prop_map(String::from),
        1 => "[0-9]{300,400}",
        1 => ".{0,40}",
    ]
}

/// SKAB-style timestamps (`%Y-%m-%d %H:%M:%S`): mostly increasing, some repeated, decreasing,
/// out of chrono's range or not timestamps at all.
fn skab_times(n: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            600 => (1i64..3).prop_map(|step| format!("+{step}")),
            40 => Just("+0".to_string()),
            10 => (-100i64..0).prop_map(|step| format!("+{step}")),
            10 => prop::sample::select(vec![
                "2999-01-01 00:00:00", "0000-01-01 00:00:00", "1970-01-01 00:00:00", "2026-02-30 00:00:00", "2026-01-05 24:00:00",
                "2026-01-05T10:00:00", "", "yesterday", "262143-12-31 23:59:59", "-262144-01-01 00:00:00",
            ])
            .prop_map(String::from),
        ],
        n,
    )
    .prop_map(|steps| {
        let mut t = chrono::NaiveDate::from_ymd_opt(2026, 1, 5).unwrap().and_hms_opt(10, 0, 0).unwrap();
        steps
            .into_iter()
            .map(|s| match s.strip_prefix('+') {
                Some(step) => {
                    t += chrono::Duration::seconds(step.parse().unwrap());
                    t.format("%Y-%m-%d %H:%M:%S").to_string()
                }
                None => s,
            })
            .collect()
    })
}

/// `n` values: four rows in five all ordinary numbers (so that windows fill), else hostile ones.
fn mostly_good(n: usize) -> impl Strategy<Value = Vec<String>> {
    let good = prop::collection::vec((-1000.0f64..1000.0).prop_map(|v| v.to_string()), n);
    prop_oneof![4 => good, 1 => prop::collection::vec(number_text(), n)]
}

fn series_name() -> impl Strategy<Value = String> {
    prop_oneof![20 => "a", 4 => "b", 1 => "[a-z]{0,3}", 1 => "x{10000,20000}", 1 => ".{0,8}"]
}

/// SKAB CSV lines: header, then records with a series column (8 series at most are live).
fn skab_csv() -> impl Strategy<Value = (Vec<String>, Vec<Vec<u8>>)> {
    let columns: Vec<String> = model("skab-convae").meta.preprocess.columns.iter().map(|c| c.source.clone()).collect();
    (1usize..150).prop_flat_map(move |n| {
        let columns = columns.clone();
        let width = prop_oneof![8 => Just(columns.len()), 1 => Just(columns.len() - 1), 1 => Just(columns.len() + 1)];
        let row = (series_name(), width.prop_flat_map(mostly_good));
        (skab_times(n), prop::collection::vec(row, n)).prop_map(move |(times, rows)| {
            let header: Vec<String> = ["datetime", "series"].iter().map(|s| s.to_string()).chain(columns.iter().cloned()).collect();
            let lines = times
                .into_iter()
                .zip(rows)
                .map(|(t, (series, values))| {
                    let quote = |s: &str| {
                        if s.contains([';', '"', '\n', '\r']) {
                            format!("\"{}\"", s.replace('"', "\"\""))
                        } else {
                            s.to_string()
                        }
                    };
                    format!("{t};{};{}", quote(&series), values.iter().map(|v| quote(v)).collect::<Vec<_>>().join(";")).into_bytes()
                })
                .collect();
            (header, lines)
        })
    })
}

fn skab(lines: &[Vec<u8>], header: &[String], tally: &mut Tally) -> Vec<f32> {
    let m = model("skab-convae");
    feed(m, LineFormat::Csv, field_map(m, &["series"]), Some(header), lines, tally)
}

// === Properties ===

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_and_every_line_has_one_outcome(lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..50)) {
        let m = model("skab-convae");
        let header: Vec<String> = std::iter::once("datetime".to_string()).chain(m.meta.preprocess.columns.iter().map(|c| c.source.clone())).collect();
        for format in [LineFormat::Csv, LineFormat::Ndjson, LineFormat::Influx] {
            feed(m, format, field_map(m, &[]), Some(&header), &lines, &mut Tally::default());
        }
        // Without a header: the first line is one.
        feed(m, LineFormat::Csv, field_map(m, &[]), None, &lines, &mut Tally::default());
        let n = model("nslkdd-vae");
        feed(n, LineFormat::Ndjson, field_map(n, &[]), None, &lines, &mut Tally::default());
        for line in &lines {
            let _ = parse_flow(&String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn hostile_csv_records_give_only_finite_windows((header, lines) in skab_csv()) {
        let mut tally = Tally::default();
        skab(&lines, &header, &mut tally);
        prop_assert_eq!(tally.lines, lines.iter().filter(|l| !String::from_utf8_lossy(l).trim().is_empty()).count());
    }

    #[test]
    fn hostile_influx_records_give_only_finite_windows(
        rows in prop::collection::vec((series_name(), mostly_good(8), prop_oneof![
            // Seconds after the previous record (mostly forwards), or a timestamp of its own.
            // A far-future one stops the series (issue 14, item 3): rare, so that windows fill.
            600 => (1i64..3).prop_map(Ok),
            20 => (-100i64..=0).prop_map(Ok),
            1 => Just(Err(String::new())),
            1 => any::<i64>().prop_map(|t| Err(t.to_string())),
            1 => Just(Err("99999999999999999999".to_string())),
        ]), 1..150),
    ) {
        let m = model("skab-convae");
        let names: Vec<String> = m.meta.preprocess.columns.iter().map(|c| c.source.replace(' ', "\\ ")).collect();
        let mut now = 1_767_607_200i64;
        let lines: Vec<Vec<u8>> = rows.iter().map(|(series, values, ts)| {
            let ts = match ts {
                Ok(step) => {
                    now += step;
                    (now * 1_000_000_000).to_string()
                }
                Err(text) => text.clone(),
            };
            let tag = series.replace(['\\', ',', '=', ' ', '\n', '\r'], "_");
            let fields: Vec<String> = names.iter().zip(values).map(|(k, v)| {
                // A number the line protocol takes as is, else a quoted string (a wrong_type).
                if v.parse::<f64>().is_ok_and(|x| x.is_finite()) && !v.contains(['_', ' ', ',']) { format!("{k}={v}") } else { format!("{k}=\"{}\"", v.replace(['\\', '"', '\n'], "")) }
            }).collect();
            format!("pump,site={tag} {} {ts}", fields.join(",")).into_bytes()
        }).collect();
        let mut map = field_map(m, &["site"]);
        map.timestamp = Some(("time".into(), TimeFormat::UnixNanos));
        feed(m, LineFormat::Influx, map, None, &lines, &mut Tally::default());
    }

    #[test]
    fn hostile_ndjson_records_give_only_finite_windows(
        rows in prop::collection::vec(prop_oneof![4 => prop::collection::vec((-1000.0f64..1000.0).prop_map(serde_json::Value::from), 41), 1 => prop::collection::vec(prop_oneof![
            3 => number_text().prop_map(|t| t.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(serde_json::Value::Number).unwrap_or(serde_json::Value::String(t))),
            1 => number_text().prop_map(serde_json::Value::String),
            1 => Just(serde_json::Value::Null),
            1 => any::<bool>().prop_map(serde_json::Value::Bool),
            1 => Just(serde_json::json!([1, {"a": null}])),
            1 => "x{0,5000}".prop_map(serde_json::Value::String),
        ], 0..45)], 1..60),
    ) {
        let m = model("nslkdd-vae");
        let fields = Preprocessor::new(&m.meta).fields().to_vec();
        let lines: Vec<Vec<u8>> = rows.iter().map(|values| {
            let obj: serde_json::Map<String, serde_json::Value> = fields.iter().zip(values).map(|(f, v)| (f.name.clone(), v.clone())).collect();
            serde_json::Value::Object(obj).to_string().into_bytes()
        }).collect();
        feed(m, LineFormat::Ndjson, field_map(m, &[]), None, &lines, &mut Tally::default());
    }

    #[test]
    fn hostile_flows_are_each_rejected_late_or_aggregated_into_finite_windows(
        flows in prop::collection::vec((
            prop_oneof![4 => "10\\.0\\.0\\.[1-3]", 1 => Just(String::new()), 1 => "x{1000,3000}"],
            prop::collection::vec(prop_oneof![
                4 => (0u64..1_000_000).prop_map(serde_json::Value::from),
                1 => any::<u64>().prop_map(serde_json::Value::from),
                1 => any::<i64>().prop_map(serde_json::Value::from),
                1 => any::<f64>().prop_map(serde_json::Value::from),
                1 => Just(serde_json::Value::Null),
                1 => ".{0,6}".prop_map(serde_json::Value::from),
            ], 7),
            prop::sample::select(vec!["TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "", "GRE", "6"]),
            prop_oneof![6 => (0u64..600).prop_map(|s| s * 1_000_000_000), 1 => any::<u64>()],
        ), 1..80),
    ) {
        let m = model("flows-vae");
        let pre = Preprocessor::new(&m.meta);
        let order: Vec<usize> = pre.fields().iter().map(|f| FLOW_FEATURES.iter().position(|n| *n == f.name).unwrap()).collect();
        let mut windower = Windower::new(WindowSpec::for_model(m, 1), pre);
        let mut aggregator = FlowAggregator::new(m.meta.training_config.data.flow_bucket_secs, 5);
        let wf = m.window_len() * m.n_features();
        let (mut tally, mut rows, mut out) = (Tally::default(), Tally::default(), Vec::new());
        let mut push_rows = |closed: Vec<anomalyd::flows::FlowRow>, rows: &mut Tally, out: &mut Vec<f32>| {
            for row in closed {
                rows.lines += 1;
                let values = order.iter().map(|&j| Value::Num(row.features[j])).collect();
                push(&mut windower, &RawRecord { series: row.host, ts: Some(row.bucket_start as f64), values }, out, rows, wf);
            }
        };
        for (host, numbers, proto, end_ns) in &flows {
            let keys = ["bytes", "packets", "time_flow_start_ns", "src_port", "dst_port", "tcp_flags", "sampling_rate"];
            let mut obj: serde_json::Map<String, serde_json::Value> = keys.iter().zip(numbers).map(|(k, v)| (k.to_string(), v.clone())).collect();
            obj.insert("src_addr".into(), host.clone().into());
            obj.insert("dst_addr".into(), "10.9.9.9".into());
            obj.insert("proto".into(), (*proto).into());
            obj.insert("time_flow_end_ns".into(), (*end_ns).into());
            tally.lines += 1;
            match parse_flow(&serde_json::Value::Object(obj).to_string()) {
                Err(e) => *tally.rejected.entry(e.reason()).or_default() += 1,
                Ok(flow) if !aggregator.add(&flow) => *tally.rejected.entry("late_flow").or_default() += 1,
                Ok(_) => {
                    tally.buffered += 1; // aggregated: handled, its rows come as buckets close
                    push_rows(aggregator.closed(), &mut rows, &mut out);
                }
            }
        }
        push_rows(aggregator.drain(), &mut rows, &mut out);
        prop_assert_eq!(tally.outcomes(), tally.lines);
        prop_assert_eq!(rows.outcomes(), rows.lines);
        prop_assert_eq!(out.len(), rows.windows * wf);
    }
}

// === Through the real model ===

/// Golden SKAB records with cells replaced by sensor markers and garbage: the windows they give
/// score finite with the real model through ONNX Runtime.
fn marked_records() -> impl Strategy<Value = Vec<(usize, usize, &'static str)>> {
    let marker =
        prop::sample::select(vec!["3e38", "-3e38", "1e308", "NaN", "inf", "-inf", "", "null", "1e-320", "-0", "abc", "3.4028235e38"]);
    prop::collection::vec((0usize..200, 1usize..9, marker), 1..20)
}

proptest! {
    #![proptest_config(Config { cases: CASES / 8, ..config() })]

    #[test]
    fn windows_of_sensor_markers_and_garbage_score_finite(marks in marked_records()) {
        static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();
        let env = ENV.get_or_init(|| anomalyd::onnxruntime::init(None).expect("ONNX Runtime (scripts/fetch-onnxruntime)"));
        let m = model("skab-convae");
        let text = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
        let mut lines: Vec<Vec<String>> = text.lines().skip(1).map(|l| l.split(';').map(String::from).collect()).collect();
        for &(row, col, marker) in &marks {
            if let Some(cells) = lines.get_mut(row) {
                cells[col] = marker.to_string();
            }
        }
        let header: Vec<String> = text.lines().next().unwrap().split(';').map(String::from).collect();
        let lines: Vec<Vec<u8>> = lines.iter().map(|cells| cells.join(";").into_bytes()).collect();
        let mut tally = Tally::default();
        let windows = feed(m, LineFormat::Csv, field_map(m, &[]), Some(&header), &lines, &mut tally);
        if tally.windows > 0 {
            let scores = Scorer::new(env, m).unwrap().score(as_windows(&windows, m.window_len(), m.n_features())).unwrap();
            prop_assert!(scores.score.iter().all(|s| s.is_finite()), "{:?}", scores.score);
            prop_assert!(scores.feature_scores.iter().all(|s| s.is_finite()));
        }
    }
}
