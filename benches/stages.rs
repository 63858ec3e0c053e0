//! Stage throughput: records parsed, windows assembled, per-series thresholds updated (static,
//! SPOT, DSPOT) and windows scored by batch size, with the bundled conv-AE (W = 32, F = 8) on the
//! bundled sample records, and inference also with the benchmark's conv-AE (W = 64, F = 4) once
//! bench/run has trained it. `cargo bench --bench stages`.

use std::path::PathBuf;

use anomalyd::model::{as_windows, Model, Scorer};
use anomalyd::preprocess::Preprocessor;
use anomalyd::record::{CsvParser, FieldMap, RawRecord, TimeFormat};
use anomalyd::threshold::{Choice, Mode, ModelThreshold, Settings, Thresholds};
use anomalyd::window::{WindowSpec, Windower};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const RECORDS: usize = 10_000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Fixture {
    model: Model,
    parser: CsvParser,
    lines: Vec<String>,
}

/// 10,000 CSV lines: the sample records' values over 50 series, one second apart.
fn fixture() -> Fixture {
    let model = Model::load(repo().join("models/skab-convae")).unwrap();
    let pre = Preprocessor::new(&model.meta);
    let map =
        FieldMap { timestamp: Some(("ts".into(), TimeFormat::UnixSecs)), series: vec!["series".into()], fields: pre.fields().to_vec() };
    let text = std::fs::read_to_string(repo().join("contracts/skab-convae/records.csv")).unwrap();
    let mut rows = text.lines();
    let header: Vec<String> = rows.next().unwrap().split(';').skip(1).map(String::from).collect();
    let values: Vec<String> = rows.map(|r| r.split_once(';').unwrap().1.to_string()).collect();
    let lines = (0..RECORDS).map(|i| format!("{};s{};{}", 1_700_000_000 + i / 50, i % 50, values[i % values.len()])).collect();
    let mut columns = vec!["ts".to_string(), "series".to_string()];
    columns.extend(header);
    let parser = CsvParser::new(map, &columns, ';').unwrap();
    Fixture { model, parser, lines }
}

fn stages(c: &mut Criterion) {
    let mut f = fixture();
    let records: Vec<RawRecord> = f.lines.iter().map(|l| f.parser.parse(l, "x").unwrap()).collect();

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("csv_records", |b| b.iter(|| f.lines.iter().map(|l| f.parser.parse(l, "x").unwrap().values.len()).sum::<usize>()));
    g.finish();

    let mut g = c.benchmark_group("window");
    g.throughput(Throughput::Elements(RECORDS as u64));
    for stride in [1usize, 8] {
        g.bench_with_input(BenchmarkId::new("records_stride", stride), &stride, |b, &stride| {
            let spec = WindowSpec::for_model(&f.model, stride);
            b.iter_batched(
                || (Windower::new(spec, Preprocessor::new(&f.model.meta)), Vec::with_capacity(RECORDS * 32 * 8)),
                |(mut w, mut out)| {
                    for r in &records {
                        w.push(r, &mut out);
                    }
                    out.len()
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    // Per-window threshold cost: 10,000 windows over 1,000 series, each series started from the
    // model's calibration tail; exponential-tailed scores put about 2 % over the tail's level
    // (each a refit), as a series' own level would.
    let mut g = c.benchmark_group("thresholds");
    let level = f.model.tail_seed().expect("the bundle has a calibration tail").level;
    let scores: Vec<f64> = (0..10_000).map(|i| level * (0.5 - (1.0 - ((i * 7919) % 10_007) as f64 / 10_007.0).ln() / 8.0)).collect();
    g.throughput(Throughput::Elements(scores.len() as u64));
    let start = ModelThreshold::new(f.model.threshold(), f.model.tail_seed(), f.model.meta.thresholds.false_alarm_rate);
    for mode in [Mode::Static, Mode::Spot, Mode::Dspot] {
        let settings = Settings { mode, warmup_windows: 0, ..Settings::default() };
        let mut t = Thresholds::new(settings, start.clone());
        let choice = Choice { mode, risk: t.risk(None) };
        let names: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
        // Every series past its start before timing.
        for (i, &x) in scores.iter().enumerate() {
            t.observe(&names[i % 1000], x, choice);
        }
        g.bench_function(BenchmarkId::new("observe", format!("{mode:?}").to_lowercase()), |b| {
            b.iter(|| scores.iter().enumerate().map(|(i, &x)| t.observe(&names[i % 1000], x, choice)).sum::<f64>())
        });
    }
    g.finish();

    // The bundled conv-AE, and the benchmark's (bench/run trains it into .cache/bench/) when present.
    let env = anomalyd::onnxruntime::init(None).expect("ONNX Runtime (scripts/fetch-onnxruntime)");
    let bench_model = repo().join(".cache/bench/models/convae-f4-w64");
    let models = std::iter::once(f.model.clone()).chain(bench_model.is_dir().then(|| Model::load(&bench_model).unwrap()));
    for model in models {
        let mut scorer = Scorer::new(&env, &model).unwrap();
        let (w, n) = (model.window_len(), model.n_features());
        let mut g = c.benchmark_group(format!("inference/{}", model.meta.name));
        for batch in [1usize, 16, 64, 256] {
            let windows: Vec<f32> = (0..batch * w * n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(BenchmarkId::new("windows_batch", batch), &batch, |b, _| {
                b.iter(|| scorer.score(as_windows(&windows, w, n)).unwrap().score.len())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, stages);
criterion_main!(benches);
