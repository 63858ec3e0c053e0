"""Per-host network-flow features from goflow2 NDJSON.

The trainer and the Rust daemon must compute bit-for-bit comparable features, so this module is
the reference implementation of docs/flow-features.md and deliberately keeps every rule simple:
one row per (source host, time bucket) that saw at least one flow, integer arithmetic for
bucketing and sums, and no dependence on the order of flows inside a bucket.

Input is the JSON output of the goflow2 collector (v2, snake_case keys taken from the protobuf
field names in pb/flow.proto). goflow2 renders `proto` as a protocol name ("TCP", "IPv6-ICMP",
"unassigned", ...) by default, so both names and plain numbers are accepted for that one field.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pandas as pd

from .errors import InputError

FLOW_FEATURES: list[str] = [
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
]

OTHER_PROTO = -1
"""`proto` of a protocol we cannot number: a name goflow2 prints for several numbers ("unassigned")."""


def _proto_codes() -> dict[str, int]:
    """goflow2's protocol names → number, from goflow2_protocols.json (package data, generated from
    goflow2's own `ProtoName` by scripts/goflow2_protocols.py; the Rust daemon embeds the same file)."""
    table = json.loads(resources.files(__package__).joinpath("goflow2_protocols.json").read_text(encoding="utf-8"))
    return {name: OTHER_PROTO if code is None else code for name, code in table["names"].items()}


_PROTO_CODES = _proto_codes()

INT64_MAX = 2**63 - 1

RAW_COLUMNS: list[str] = [
    "line",
    "src_addr",
    "dst_addr",
    "time_flow_start_ns",
    "time_flow_end_ns",
    "bytes",
    "packets",
    "proto",
    "src_port",
    "dst_port",
    "tcp_flags",
    "sampling_rate",
]

_REQUIRED_INTS = ("time_flow_end_ns", "bytes", "packets")
_OPTIONAL_INTS = {"time_flow_start_ns": 0, "src_port": 0, "dst_port": 0, "tcp_flags": 0, "sampling_rate": 1}


def read_goflow2_ndjson(path) -> pd.DataFrame:
    """Read and validate a goflow2 NDJSON file into one row per flow.

    Validation is strict because a silently skipped or misread record would shift the features
    the model is trained on; the first bad line raises `InputError` naming file, line and field.
    Blank lines are skipped but still counted, so `line` is the physical 1-based line number.

    Optional fields get their documented defaults (start 0 = unknown, ports 0, tcp_flags 0,
    sampling_rate 1); `proto` is an integer with OTHER_PROTO for goflow2's unnamed protocols.
    """
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read flow file: {exc.strerror or exc}", file=path) from None

    cols: dict[str, list] = {name: [] for name in RAW_COLUMNS}
    with fh:
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                _append_record(cols, _parse_line(raw, path, number), path, number)
    return pd.DataFrame(
        {
            name: pd.array(values, dtype=str) if name in ("src_addr", "dst_addr") else np.array(values, dtype=np.int64)
            for name, values in cols.items()
        }
    )


def _append_record(cols: dict[str, list], record: dict, path, number: int) -> None:
    """Validate one record and append its normalised values, checking fields in a fixed order so
    the reported field is deterministic when a line has several problems."""
    values = {"line": number}
    for field in ("src_addr", "dst_addr"):
        values[field] = _address(record, field, path, number)
    for field in _REQUIRED_INTS:
        if field not in record:
            raise _missing(field, path, number)
        values[field] = _integer(record[field], field, path, number)
    for field, default in _OPTIONAL_INTS.items():
        value = record.get(field)
        values[field] = default if value is None else _integer(value, field, path, number)
    if "proto" not in record:
        raise _missing("proto", path, number)
    values["proto"] = _proto(record["proto"], path, number)
    rate = max(values["sampling_rate"], 1)
    for field in ("bytes", "packets"):
        if values[field] * rate > INT64_MAX:
            raise _error(f"{field} x sampling_rate exceeds 2^63-1", path, number, field)
    for name, value in values.items():
        cols[name].append(value)


def _parse_line(raw: bytes, path, number: int) -> dict:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _error("line is not valid UTF-8", path, number) from None
    except json.JSONDecodeError as exc:
        raise _error(f"not valid JSON ({exc.msg})", path, number) from None
    if not isinstance(record, dict):
        raise _error("not a JSON object", path, number)
    return record


def _error(message: str, path, number: int, field: str | None = None) -> InputError:
    return InputError(message, file=path, location=f"line {number}", column=field)


def _missing(field: str, path, number: int) -> InputError:
    return _error("missing required field", path, number, field)


def _address(record: dict, field: str, path, number: int) -> str:
    if field not in record:
        raise _missing(field, path, number)
    value = record[field]
    if not isinstance(value, str) or not value:
        raise _error(f"expected a non-empty address string, got {json.dumps(value)}", path, number, field)
    return value


def _integer(value, field: str, path, number: int) -> int:
    """Accept JSON integers only: goflow2 prints uint64 counters without fraction or quotes,
    and a float cannot hold a nanosecond timestamp exactly."""
    if type(value) is not int:
        raise _error(f"expected a non-negative integer, got {json.dumps(value)}", path, number, field)
    if value < 0:
        raise _error(f"negative value {value}", path, number, field)
    if value > INT64_MAX:
        raise _error(f"value {value} exceeds 2^63-1", path, number, field)
    return value


def _proto(value, path, number: int) -> int:
    if not isinstance(value, str):
        return _integer(value, "proto", path, number)
    if value not in _PROTO_CODES:
        raise _error(f"unknown protocol name {json.dumps(value)}", path, number, "proto")
    return _PROTO_CODES[value]


def flow_features(flows: pd.DataFrame, bucket_secs: int = 60) -> pd.DataFrame:
    """Aggregate flows into one feature row per (host, bucket_start) that has at least one flow.

    Sums are exact int64 sums converted to float64 only at the end, so the result does not depend
    on row order and a streaming implementation can reproduce it exactly. Silent buckets produce
    no row; filling gaps is the windowing layer's decision, not this one's.
    """
    if isinstance(bucket_secs, bool) or not isinstance(bucket_secs, (int, np.integer)) or bucket_secs <= 0:
        raise ValueError(f"bucket_secs must be a positive integer, got {bucket_secs!r}")
    bucket_secs = int(bucket_secs)
    needed = [c for c in RAW_COLUMNS if c not in ("line", "src_port")]
    absent = [c for c in needed if c not in flows.columns]
    if absent:
        raise ValueError(f"flows DataFrame lacks columns {absent}")

    def ints(name: str) -> np.ndarray:
        return flows[name].to_numpy(dtype=np.int64)

    end = ints("time_flow_end_ns")
    start = ints("time_flow_start_ns")
    proto = ints("proto")
    flags = ints("tcp_flags")
    rate = np.maximum(ints("sampling_rate"), 1)
    is_tcp = proto == 6

    work = pd.DataFrame(
        {
            "host": flows["src_addr"].to_numpy(dtype=object),
            "bucket_start": end // (bucket_secs * 1_000_000_000) * bucket_secs,
            "dst_addr": pd.factorize(flows["dst_addr"])[0],
            "dst_port": ints("dst_port"),
            "bytes": ints("bytes") * rate,
            "packets": ints("packets") * rate,
            "duration_ns": np.where(start > 0, np.maximum(end - start, 0), 0),
            "syn_only": (is_tcp & ((flags & 0x02) != 0) & ((flags & 0x10) == 0)).astype(np.int64),
            "tcp": is_tcp.astype(np.int64),
            "udp": (proto == 17).astype(np.int64),
            "icmp": ((proto == 1) | (proto == 58)).astype(np.int64),
        }
    )
    _check_no_overflow(
        work,
        {
            "bytes": ints("bytes").astype(np.float64) * rate,
            "packets": ints("packets").astype(np.float64) * rate,
            "duration_ns": work["duration_ns"].to_numpy(dtype=np.float64),
        },
    )
    summed = ["bytes", "packets", "duration_ns", "syn_only", "tcp", "udp", "icmp"]
    groups = work.groupby(["host", "bucket_start"], sort=True)
    agg = groups[summed].sum()

    counts = groups.size().astype(np.float64)
    total_bytes = agg["bytes"].astype(np.float64)
    total_packets = agg["packets"].astype(np.float64)
    out = pd.DataFrame(
        {
            "flows": counts,
            "bytes": total_bytes,
            "packets": total_packets,
            "distinct_dst_addrs": groups["dst_addr"].nunique().astype(np.float64),
            "distinct_dst_ports": groups["dst_port"].nunique().astype(np.float64),
            "syn_only_share": agg["syn_only"] / counts,
            "tcp_share": agg["tcp"] / counts,
            "udp_share": agg["udp"] / counts,
            "icmp_share": agg["icmp"] / counts,
            "mean_duration_secs": agg["duration_ns"].astype(np.float64) / counts / 1e9,
            "mean_bytes_per_packet": (total_bytes / total_packets.where(total_packets > 0)).fillna(0.0),
        }
    )
    out = out.reset_index()
    out["host"] = out["host"].astype(str)
    out["bucket_start"] = out["bucket_start"].astype(np.int64)
    out[FLOW_FEATURES] = out[FLOW_FEATURES].astype(np.float64)
    return out[["host", "bucket_start", *FLOW_FEATURES]]


def _check_no_overflow(work: pd.DataFrame, as_float: dict[str, np.ndarray]) -> None:
    """Refuse rather than wrap around: int64 products and sums overflow silently. The float64
    total over all rows bounds every row and every bucket, so the grouped check only runs for
    absurd inputs."""
    limit = 2.0**63
    if all(values.sum() < limit for values in as_float.values()):
        return
    grouped = pd.DataFrame(as_float).groupby([work["host"].to_numpy(), work["bucket_start"].to_numpy()]).sum()
    if (grouped >= limit).any(axis=None):
        raise ValueError(f"a per-bucket sum of {sorted(as_float)} exceeds 2^63-1")


def load_flow_series(path, bucket_secs: int = 60) -> pd.DataFrame:
    """Read a goflow2 NDJSON file and return its per-host, per-bucket feature rows."""
    return flow_features(read_goflow2_ndjson(path), bucket_secs)
