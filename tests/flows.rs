//! The flow-feature contract (docs/flow-features.md) against the shared vectors and against what
//! the real goflow2 collector prints, and golden parity of the flow VAE from raw goflow2 records to
//! ONNX scores.

mod common;

use anomalyd::flows::{parse_flow, FlowAggregator, FlowRow, FLOW_FEATURES};
use anomalyd::model::{as_windows, Model, Scorer};
use anomalyd::preprocess::Preprocessor;
use anomalyd::record::{RawRecord, Value};
use anomalyd::window::{Outcome, WindowSpec, Windower};
use common::repo;
use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

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

/// (number sent, name goflow2 v2.2.6 prints for it, number the contract reads back; -1 is other).
const GOFLOW2_PROTOCOLS: [(u8, &str, i64); 10] = [
    (1, "ICMP", 1),
    (6, "TCP", 6),
    (17, "UDP", 17),
    (58, "IPv6-ICMP", 58),
    (0, "HOPOPT", 0),
    (2, "IGMP", 2),
    (47, "GRE", 47),
    (50, "ESP", 50),
    (89, "OSPFIGP", 89),
    (200, "unassigned", -1),
];

/// A NetFlow v5 packet (Cisco's fixed format: a 24-byte header, then 48-byte records, big-endian)
/// from 10.0.0.5 to 10.0.0.9 with one flow per protocol; flow `i` has source port 1000 + i.
fn netflow_v5(unix_secs: u32, protocols: &[u8]) -> Vec<u8> {
    let uptime_ms: u32 = 100_000;
    let mut p = Vec::new();
    p.extend(5u16.to_be_bytes()); // version
    p.extend((protocols.len() as u16).to_be_bytes());
    p.extend(uptime_ms.to_be_bytes());
    p.extend(unix_secs.to_be_bytes());
    p.extend([0; 4]); // unix_nsecs
    p.extend([0; 4]); // flow_sequence
    p.extend([0; 4]); // engine type and id, sampling interval
    for (i, &proto) in protocols.iter().enumerate() {
        p.extend([10, 0, 0, 5, 10, 0, 0, 9, 0, 0, 0, 0]); // src, dst, next hop
        p.extend([0; 4]); // input and output interface
        p.extend(3u32.to_be_bytes()); // packets
        p.extend(300u32.to_be_bytes()); // bytes
        p.extend((uptime_ms - 2_000).to_be_bytes()); // first, in uptime ms
        p.extend((uptime_ms - 1_000).to_be_bytes()); // last
        p.extend((1000 + i as u16).to_be_bytes());
        p.extend(443u16.to_be_bytes());
        p.extend([0, 0x12, proto, 0]); // pad, tcp_flags (SYN+ACK), protocol, tos
        p.extend([0; 8]); // src and dst AS, masks, pad
    }
    p
}

/// The real goflow2 v2.2.6 (scripts/setup builds it) turns NetFlow v5 into the JSON the daemon
/// reads; every flow it prints parses, whatever the protocol, and lands in the right share.
#[test]
fn parses_what_real_goflow2_prints_for_every_protocol() {
    let goflow2 = repo().join(".cache/goflow2/goflow2");
    assert!(goflow2.is_file(), "{} is missing: run scripts/setup (it builds goflow2)", goflow2.display());
    let dir = common::temp_dir("goflow2");
    let out = dir.join("flows.ndjson");
    // goflow2 binds with SO_REUSEPORT and names no port it chose, so take one that was just free.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // One worker: goflow2's file transport writes a record and its newline in two unlocked
    // writes, so two workers could interleave the copies of a resent packet.
    let listen = format!("netflow://127.0.0.1:{port}?workers=1");
    let child = Command::new(&goflow2)
        .args(["-listen", &listen, "-addr", "", "-format", "json", "-transport", "file", "-transport.file"])
        .arg(&out)
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut goflow2 = KillOnDrop(child);
    let stderr = || std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let protocols: Vec<u8> = GOFLOW2_PROTOCOLS.iter().map(|p| p.0).collect();
    let unix_secs = 1_767_225_600;
    let packet = netflow_v5(unix_secs, &protocols);
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    // goflow2 listens some time after it starts and NetFlow v5 needs no template, so the packet is
    // resent until each of its flows was printed at least once (by source port).
    let mut printed = BTreeMap::new();
    let started = Instant::now();
    while printed.len() < protocols.len() {
        if let Some(status) = goflow2.0.try_wait().unwrap() {
            panic!("goflow2 exited ({status}); stderr:\n{}", stderr());
        }
        let ports: Vec<&u64> = printed.keys().collect();
        assert!(started.elapsed() < Duration::from_secs(30), "goflow2 printed flows {ports:?} only; stderr:\n{}", stderr());
        sender.send_to(&packet, ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        for line in complete.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            printed.insert(record["src_port"].as_u64().unwrap(), line.to_string());
        }
    }
    let mut agg = FlowAggregator::new(60, 0);
    for (i, (sent, name, number)) in GOFLOW2_PROTOCOLS.iter().enumerate() {
        let line = &printed[&(1000 + i as u64)];
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["proto"], *name, "goflow2's name for protocol {sent}");
        let flow = parse_flow(line).unwrap_or_else(|e| panic!("protocol {sent} ({name}): {e}\n{line}"));
        assert_eq!(flow.proto, *number, "{name}");
        assert!(agg.add(&flow));
    }
    let rows = agg.drain();
    assert_eq!(rows.len(), 1, "one host, one bucket");
    let f = |name: &str| rows[0].features[FLOW_FEATURES.iter().position(|n| *n == name).unwrap()];
    assert_eq!((f("flows"), f("bytes"), f("packets")), (10.0, 3000.0, 30.0));
    assert_eq!((f("tcp_share"), f("udp_share"), f("icmp_share")), (0.1, 0.1, 0.2), "ICMP and IPv6-ICMP are ICMP");
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
