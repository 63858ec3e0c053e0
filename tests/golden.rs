//! Golden-vector parity with the trainer (contracts/<bundle>/golden.json, docs/model-contract.md §6):
//! the same raw records give the same windows and, through real ONNX Runtime, the same scores.

mod common;

use std::path::Path;

use anomalyd::model::{as_windows, Model, Scorer};
use anomalyd::preprocess::Preprocessor;
use anomalyd::record::{parse_ndjson, CsvParser, FieldMap, TimeFormat};
use anomalyd::window::{Outcome, WindowSpec, Windower};
use common::repo;
use serde_json::Value as Json;

const TOLERANCE: f64 = 1e-5;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOLERANCE * 1f64.max(a.abs())
}

struct Ours {
    windows: Vec<f32>,
    meta: Vec<(String, f64)>,
}

/// Reads the golden records with the mapping the trainer used and windows them at stride 1.
fn window_records(model: &Model, golden: &Json) -> Ours {
    let data = &golden["data"];
    let text = |k: &str| data[k].as_str().unwrap_or_default().to_string();
    let records = repo().join("contracts").join(&model.meta.name).join(golden["records"].as_str().unwrap());
    let pre = Preprocessor::new(&model.meta);
    let ts_col = text("timestamp_column");
    let map = FieldMap {
        timestamp: (!ts_col.is_empty()).then(|| (ts_col, TimeFormat::parse(&text("timestamp_format")))),
        series: data["series_columns"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect(),
        fields: pre.fields().to_vec(),
    };
    let spec = WindowSpec::for_model(model, 1);
    let mut windower = Windower::new(spec, pre);
    let name = records.file_name().unwrap().to_string_lossy().to_string();
    let body = std::fs::read_to_string(&records).unwrap();
    let mut lines = body.lines();
    let delimiter = text("csv_delimiter").chars().next().unwrap_or(',');
    let is_csv = records.extension().is_some_and(|e| e == "csv");
    let mut csv = is_csv.then(|| {
        let header = if data["csv_header"].as_bool().unwrap() {
            CsvParser::header(lines.next().unwrap(), delimiter)
        } else {
            data["column_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
        };
        CsvParser::new(map.clone(), &header, delimiter).unwrap()
    });
    let mut ours = Ours { windows: Vec::new(), meta: Vec::new() };
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let record = match &mut csv {
            Some(p) => p.parse(line, &name),
            None => parse_ndjson(&map, line, &name),
        }
        .unwrap();
        if let Outcome::Window { end_ts, .. } = windower.push(&record, &mut ours.windows).outcome {
            ours.meta.push((record.series.clone(), end_ts));
        }
    }
    ours
}

fn check_bundle(name: &str) {
    let env = anomalyd::onnxruntime::init(None).expect("ONNX Runtime (scripts/fetch-onnxruntime)");
    let model = Model::load(repo().join("models").join(name)).unwrap();
    let golden: Json =
        serde_json::from_str(&std::fs::read_to_string(repo().join("contracts").join(name).join("golden.json")).unwrap()).unwrap();
    assert_eq!(golden["model_sha256"].as_str().unwrap(), model.meta.onnx.sha256, "golden vectors are of another model");

    let ours = window_records(&model, &golden);
    let (w, f) = (model.window_len(), model.n_features());
    assert_eq!(ours.meta.len() as u64, golden["windows_total"].as_u64().unwrap(), "window count");

    let mut scorer = Scorer::new(&env, &model).unwrap();
    let scores = scorer.score(as_windows(&ours.windows, model.window_len(), model.n_features())).unwrap();
    for g in golden["windows"].as_array().unwrap() {
        let i = g["index"].as_u64().unwrap() as usize;
        assert_eq!(ours.meta[i].0, g["series"].as_str().unwrap(), "window {i}: series");
        assert_eq!(ours.meta[i].1, g["end_ts"].as_f64().unwrap(), "window {i}: end time");
        let x: Vec<f64> =
            g["x"].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter()).map(|v| v.as_f64().unwrap()).collect();
        let mine = &ours.windows[i * w * f..(i + 1) * w * f];
        for (k, (a, b)) in mine.iter().zip(&x).enumerate() {
            assert!(close(*a as f64, *b), "window {i} value {k} (row {}, feature {}): {a} vs {b}", k / f, k % f);
        }
        let s = scores.score[i] as f64;
        assert!(close(s, g["score"].as_f64().unwrap()), "window {i}: score {s} vs {}", g["score"]);
        let a = s / model.threshold();
        assert!(close(a, g["anomaly_score"].as_f64().unwrap()), "window {i}: anomaly_score {a} vs {}", g["anomaly_score"]);
        for (j, fs) in g["feature_scores"].as_array().unwrap().iter().enumerate() {
            let mine = scores.feature_scores[[i, j]] as f64;
            assert!(close(mine, fs.as_f64().unwrap()), "window {i}: feature_scores[{j}] {mine} vs {fs}");
        }
    }
}

#[test]
fn skab_convae_windows_and_scores_match_the_trainer() {
    check_bundle("skab-convae");
}

#[test]
fn nslkdd_vae_windows_and_scores_match_the_trainer() {
    check_bundle("nslkdd-vae");
}

#[test]
fn a_tampered_bundle_is_refused_with_its_path() {
    let dir = std::env::temp_dir().join(format!("anomalyd-tampered-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = repo().join("models/skab-convae");
    std::fs::copy(src.join("model.json"), dir.join("model.json")).unwrap();
    let mut onnx = std::fs::read(src.join("model.onnx")).unwrap();
    onnx.push(0);
    std::fs::write(dir.join("model.onnx"), onnx).unwrap();
    let err = Model::load(&dir).unwrap_err().to_string();
    assert!(err.contains("model.onnx") && err.contains("does not match"), "{err}");
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
