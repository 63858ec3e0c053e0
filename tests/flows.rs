//! The flow-feature contract (docs/flow-features.md) against the shared vectors, and golden
//! parity of the flow VAE from raw goflow2 records to ONNX scores.

mod common;

use anomalyd::flows::{parse_flow, FlowAggregator, FlowRow, FLOW_FEATURES};
use anomalyd::model::{as_windows, Model, Scorer};
use anomalyd::preprocess::Preprocessor;
use anomalyd::record::{RawRecord, Value};
use anomalyd::window::{Outcome, WindowSpec, Windower};
use common::repo;

/// Every row of a file, sorted by host then bucket as the reference prints them.
fn aggregate(path: &str) -> Vec<FlowRow> {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    let mut agg = FlowAggregator::new(60, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(agg.add(&parse_flow(line).unwrap()));
    }
    let mut rows = agg.drain();
    rows.sort_by(|a, b| (a.host.as_bytes(), a.bucket_start).cmp(&(b.host.as_bytes(), b.bucket_start)));
    rows
}

#[test]
fn features_match_the_contract_vectors() {
    let rows = aggregate("contracts/flows/flows.ndjson");
    let expected = std::fs::read_to_string(repo().join("contracts/flows/features.csv")).unwrap();
    let mut lines = expected.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&header[2..], &FLOW_FEATURES);
    let expected: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), expected.len());
    for (row, e) in rows.iter().zip(&expected) {
        assert_eq!((row.host.as_str(), row.bucket_start.to_string().as_str()), (e[0], e[1]));
        for (j, (got, want)) in row.features.iter().zip(&e[2..]).enumerate() {
            let want: f64 = want.parse().unwrap();
            assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{} {}: {} = {got}, want {want}", e[0], e[1], FLOW_FEATURES[j]);
        }
    }
}

#[test]
fn bad_records_fail_like_the_reference() {
    let dir = repo().join("contracts/flows/bad");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected_errors.json")).unwrap()).unwrap();
    for (file, want) in expected.as_object().unwrap() {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let (line_no, err) = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .find_map(|(i, l)| parse_flow(l).err().map(|e| (i + 1, e)))
            .unwrap_or_else(|| panic!("{file}: no line was refused"));
        assert_eq!(format!("line {line_no}"), want["location"].as_str().unwrap(), "{file}");
        assert_eq!(err.field, want["column"].as_str(), "{file}");
        assert!(err.message.contains(want["message"].as_str().unwrap()), "{file}: {}", err.message);
    }
}

#[test]
fn flow_vae_scores_raw_goflow2_records_like_the_trainer() {
    let model = Model::load(repo().join("models/flows-vae")).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("contracts/flows-vae/golden.json")).unwrap()).unwrap();
    let pre = Preprocessor::new(&model.meta);
    let order: Vec<usize> = pre.fields().iter().map(|f| FLOW_FEATURES.iter().position(|n| *n == f.name).unwrap()).collect();
    let spec = WindowSpec::for_model(&model, 1);
    let mut windower = Windower::new(spec, pre);
    let (mut windows, mut meta) = (Vec::new(), Vec::new());
    for row in aggregate("contracts/flows-vae/records.ndjson") {
        let record = RawRecord {
            series: row.host.clone(),
            ts: Some(row.bucket_start as f64),
            values: order.iter().map(|&j| Value::Num(row.features[j])).collect(),
        };
        if let Outcome::Window { end_ts, .. } = windower.push(&record, &mut windows).outcome {
            meta.push((row.host, end_ts));
        }
    }
    assert_eq!(meta.len() as u64, golden["windows_total"].as_u64().unwrap());
    let env = anomalyd::onnxruntime::init(None).expect("ONNX Runtime (scripts/fetch-onnxruntime)");
    let scores = Scorer::new(&env, &model).unwrap().score(as_windows(&windows, model.window_len(), model.n_features())).unwrap();
    let f = model.n_features();
    for g in golden["windows"].as_array().unwrap() {
        let i = g["index"].as_u64().unwrap() as usize;
        assert_eq!((meta[i].0.as_str(), meta[i].1), (g["series"].as_str().unwrap(), g["end_ts"].as_f64().unwrap()));
        let x: Vec<f64> = g["x"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (k, want) in x.iter().enumerate() {
            let got = windows[i * f + k] as f64;
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "window {i} feature {k}: {got} vs {want}");
        }
        let (got, want) = (scores.score[i] as f64, g["score"].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "window {i}: score {got} vs {want}");
    }
}

/// Every name in goflow2's protocol table (the file the daemon embeds) parses to its number, or to
/// "other" (-1) when goflow2 prints it for several numbers.
#[test]
fn reads_every_protocol_name_goflow2_prints() {
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("trainer/anomalyd_trainer/goflow2_protocols.json")).unwrap()).unwrap();
    let names = table["names"].as_object().unwrap();
    assert!(names.len() > 150, "the full table, not a handful: {} names", names.len());
    for (name, number) in names {
        let line = serde_json::json!({"src_addr": "10.0.0.5", "dst_addr": "10.0.0.9", "time_flow_end_ns": 0, "bytes": 1, "packets": 1, "proto": name});
        let flow = parse_flow(&line.to_string()).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(flow.proto, number.as_i64().unwrap_or(-1), "{name:?}");
    }
}
