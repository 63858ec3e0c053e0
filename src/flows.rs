//! goflow2 flow records → per-host, per-bucket feature rows, exactly per docs/flow-features.md
//! (the trainer's `flows.py` is the reference; `contracts/flows/` are the shared vectors).
//!
//! A bucket is emitted once it is closed: when flows ending at least `lateness_secs` after the
//! bucket's end have been seen (a per-source watermark), or when the input ends. The contract's
//! batch semantics — every flow of a bucket counted — hold for flows that arrive no later than
//! that; a flow for an already emitted bucket is counted as late and dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;

use serde_json::Value as Json;

/// Feature names in model order (the trainer's `FLOW_FEATURES`).
pub const FLOW_FEATURES: [&str; 11] = [
    "flows",
    "bytes",
    "packets",
    "distinct_dst_addrs",
    "distinct_dst_ports",
    "syn_only_share",
    "tcp_share",
    "udp_share",
    "icmp_share",
    "mean_duration_secs",
    "mean_bytes_per_packet",
];

const INT_MAX: u64 = i64::MAX as u64;

/// One validated flow, reduced to what the features need (per-flow values of the contract).
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub host: String,
    pub dst_addr: String,
    pub end_ns: u64,
    pub duration_ns: u64,
    pub scaled_bytes: u64,
    pub scaled_packets: u64,
    pub dst_port: u64,
    pub proto: i64,
    pub tcp_flags: u64,
}

/// A bad flow record; `field` is the JSON key at fault. Messages follow the contract's table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{message}", field.map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct FlowError {
    pub field: Option<&'static str>,
    pub message: String,
}

impl FlowError {
    fn at(field: &'static str, message: impl Into<String>) -> FlowError {
        FlowError { field: Some(field), message: message.into() }
    }

    /// A stable metric label.
    pub fn reason(&self) -> &'static str {
        match self.field {
            None => "malformed",
            Some(_) if self.message.contains("missing") => "missing_field",
            Some(_) => "wrong_type",
        }
    }
}

fn integer(obj: &serde_json::Map<String, Json>, field: &'static str, default: Option<u64>) -> Result<u64, FlowError> {
    match (obj.get(field), default) {
        (None | Some(Json::Null), Some(d)) => Ok(d),
        (None, None) => Err(FlowError::at(field, "missing required field")),
        (Some(Json::Number(n)), _) if n.is_u64() => {
            let v = n.as_u64().expect("is_u64");
            if v > INT_MAX {
                Err(FlowError::at(field, format!("value {v} exceeds 2^63-1")))
            } else {
                Ok(v)
            }
        }
        (Some(Json::Number(n)), _) if n.is_i64() => Err(FlowError::at(field, format!("negative value {n}"))),
        (Some(v), _) => Err(FlowError::at(field, format!("expected a non-negative integer, got {v}"))),
    }
}

fn address(obj: &serde_json::Map<String, Json>, field: &'static str) -> Result<String, FlowError> {
    match obj.get(field) {
        None => Err(FlowError::at(field, "missing required field")),
        Some(Json::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(v) => Err(FlowError::at(field, format!("expected a non-empty address string, got {v}"))),
    }
}

/// `proto` of a protocol the contract cannot number: a name goflow2 prints for several numbers.
const OTHER_PROTO: i64 = -1;

/// goflow2's protocol names → number, `None` for a name it prints for several numbers. Generated
/// from goflow2's own `ProtoName` by scripts/goflow2_protocols.py; the trainer reads the same file.
static PROTO_NAMES: LazyLock<HashMap<String, Option<u32>>> = LazyLock::new(|| {
    #[derive(serde::Deserialize)]
    struct Table {
        names: HashMap<String, Option<u32>>,
    }
    let json = include_str!("../trainer/anomalyd_trainer/goflow2_protocols.json");
    serde_json::from_str::<Table>(json).expect("the embedded protocol table is valid JSON").names
});

/// goflow2 renders `proto` as a name; numbers are accepted too.
fn proto(obj: &serde_json::Map<String, Json>) -> Result<i64, FlowError> {
    match obj.get("proto") {
        Some(Json::String(s)) => match PROTO_NAMES.get(s) {
            Some(number) => Ok(number.map_or(OTHER_PROTO, i64::from)),
            None => Err(FlowError::at("proto", format!("unknown protocol name {s:?}"))),
        },
        _ => integer(obj, "proto", None).map(|v| v as i64),
    }
}

/// Validates one goflow2 JSON line; checks run in the contract's order.
pub fn parse_flow(line: &str) -> Result<Flow, FlowError> {
    let value: Json = serde_json::from_str(line).map_err(|e| FlowError { field: None, message: format!("not valid JSON ({e})") })?;
    let obj = value.as_object().ok_or(FlowError { field: None, message: "not a JSON object".into() })?;
    let host = address(obj, "src_addr")?;
    let dst_addr = address(obj, "dst_addr")?;
    let end_ns = integer(obj, "time_flow_end_ns", None)?;
    let bytes = integer(obj, "bytes", None)?;
    let packets = integer(obj, "packets", None)?;
    let start_ns = integer(obj, "time_flow_start_ns", Some(0))?;
    integer(obj, "src_port", Some(0))?;
    let dst_port = integer(obj, "dst_port", Some(0))?;
    let tcp_flags = integer(obj, "tcp_flags", Some(0))?;
    let rate = integer(obj, "sampling_rate", Some(1))?.max(1);
    let proto = proto(obj)?;
    let scale = |v: u64, field: &'static str| {
        v.checked_mul(rate).filter(|s| *s <= INT_MAX).ok_or_else(|| FlowError::at(field, format!("{field} x sampling_rate exceeds 2^63-1")))
    };
    Ok(Flow {
        host,
        dst_addr,
        end_ns,
        // A start of 0 is protobuf's "unset"; a start after the end is clock skew.
        duration_ns: if start_ns > 0 { end_ns.saturating_sub(start_ns) } else { 0 },
        scaled_bytes: scale(bytes, "bytes")?,
        scaled_packets: scale(packets, "packets")?,
        dst_port,
        proto,
        tcp_flags,
    })
}

#[derive(Default)]
struct Bucket {
    n: u64,
    bytes: u128,
    packets: u128,
    duration_ns: u128,
    syn_only: u64,
    tcp: u64,
    udp: u64,
    icmp: u64,
    dst_addrs: HashSet<String>,
    dst_ports: HashSet<u64>,
}

/// One feature row: the series (`host`), its event time (`bucket_start`, unix s) and the features.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRow {
    pub host: String,
    pub bucket_start: u64,
    pub features: [f64; 11],
}

impl Bucket {
    fn add(&mut self, f: &Flow) {
        self.n += 1;
        self.bytes += u128::from(f.scaled_bytes);
        self.packets += u128::from(f.scaled_packets);
        self.duration_ns += u128::from(f.duration_ns);
        let tcp = f.proto == 6;
        self.syn_only += u64::from(tcp && f.tcp_flags & 0x02 != 0 && f.tcp_flags & 0x10 == 0);
        self.tcp += u64::from(tcp);
        self.udp += u64::from(f.proto == 17);
        self.icmp += u64::from(f.proto == 1 || f.proto == 58);
        if !self.dst_addrs.contains(&f.dst_addr) {
            self.dst_addrs.insert(f.dst_addr.clone());
        }
        self.dst_ports.insert(f.dst_port);
    }

    fn features(&self) -> [f64; 11] {
        let n = self.n as f64;
        let (b, p) = (self.bytes as f64, self.packets as f64);
        [
            n,
            b,
            p,
            self.dst_addrs.len() as f64,
            self.dst_ports.len() as f64,
            self.syn_only as f64 / n,
            self.tcp as f64 / n,
            self.udp as f64 / n,
            self.icmp as f64 / n,
            self.duration_ns as f64 / n / 1e9,
            if self.packets > 0 { b / p } else { 0.0 },
        ]
    }
}

/// Open buckets by (bucket_start, host), so closing them is a walk from the front.
pub struct FlowAggregator {
    bucket_secs: u64,
    lateness_secs: u64,
    open: BTreeMap<(u64, String), Bucket>,
    /// Newest flow end seen, in unix seconds.
    watermark: u64,
    /// Buckets starting before this were emitted; later flows for them are late.
    emitted_before: u64,
}

impl FlowAggregator {
    pub fn new(bucket_secs: u64, lateness_secs: u64) -> FlowAggregator {
        assert!(bucket_secs > 0, "bucket_secs is validated to be positive");
        FlowAggregator { bucket_secs, lateness_secs, open: BTreeMap::new(), watermark: 0, emitted_before: 0 }
    }

    /// Adds a flow; returns false (and ignores it) when its bucket was already emitted.
    pub fn add(&mut self, flow: &Flow) -> bool {
        let bucket_start = flow.end_ns / (self.bucket_secs * 1_000_000_000) * self.bucket_secs;
        if bucket_start < self.emitted_before {
            return false;
        }
        self.watermark = self.watermark.max(flow.end_ns / 1_000_000_000);
        self.open.entry((bucket_start, flow.host.clone())).or_default().add(flow);
        true
    }

    /// Rows of the buckets that ended at least `lateness_secs` before the watermark, oldest first.
    pub fn closed(&mut self) -> Vec<FlowRow> {
        let limit = self.watermark.saturating_sub(self.lateness_secs);
        // A bucket [s, s + B) is closed when s + B <= limit: every start below ⌊limit / B⌋·B.
        self.take_before(limit / self.bucket_secs * self.bucket_secs)
    }

    /// Every open bucket (end of input), ordered by bucket start then host.
    pub fn drain(&mut self) -> Vec<FlowRow> {
        self.take_before(u64::MAX)
    }

    fn take_before(&mut self, before: u64) -> Vec<FlowRow> {
        let keep = self.open.split_off(&(before, String::new()));
        let done = std::mem::replace(&mut self.open, keep);
        self.emitted_before = self.emitted_before.max(before);
        done.into_iter().map(|((bucket_start, host), b)| FlowRow { host, bucket_start, features: b.features() }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(host: &str, end_s: u64) -> Flow {
        Flow {
            host: host.into(),
            dst_addr: "d".into(),
            end_ns: end_s * 1_000_000_000,
            duration_ns: 0,
            scaled_bytes: 1,
            scaled_packets: 1,
            dst_port: 0,
            proto: 6,
            tcp_flags: 0,
        }
    }

    #[test]
    fn buckets_close_after_the_lateness_and_late_flows_are_refused() {
        let mut a = FlowAggregator::new(60, 10);
        assert!(a.add(&flow("h", 5)));
        assert!(a.add(&flow("h", 65)));
        assert!(a.closed().is_empty(), "bucket 0 ends at 60, watermark 65 - 10 < 60");
        assert!(a.add(&flow("g", 71)));
        let rows = a.closed();
        assert_eq!(rows.iter().map(|r| (r.host.as_str(), r.bucket_start)).collect::<Vec<_>>(), [("h", 0)]);
        assert!(!a.add(&flow("h", 30)), "bucket 0 was emitted");
        assert_eq!(a.drain().len(), 2);
    }

    #[test]
    fn integers_are_strict_and_errors_name_the_field() {
        let e = parse_flow(r#"{"src_addr":"a","dst_addr":"b","time_flow_end_ns":1.5,"bytes":1,"packets":1,"proto":6}"#).unwrap_err();
        assert_eq!(e.field, Some("time_flow_end_ns"));
        assert!(e.message.contains("expected a non-negative integer"));
        let e = parse_flow(
            r#"{"src_addr":"a","dst_addr":"b","time_flow_end_ns":1,"bytes":10,"packets":1,"proto":6,"sampling_rate":9223372036854775807}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("bytes x sampling_rate exceeds 2^63-1"));
        assert_eq!(e.reason(), "wrong_type");
    }
}
