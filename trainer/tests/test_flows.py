"""Tests for anomalyd_trainer.flows against the contract in docs/flow-features.md.

The contract vectors in contracts/flows/ were computed without this module, and the random tests
compare against a deliberately naive per-flow loop, so a mistake in the vectorised pandas code
cannot make its own expected values.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomalyd_trainer.errors import InputError
from anomalyd_trainer.flows import (
    FLOW_FEATURES,
    OTHER_PROTO,
    RAW_COLUMNS,
    flow_features,
    load_flow_series,
    read_goflow2_ndjson,
)

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "contracts" / "flows"
BAD = CONTRACT / "bad"
EXPECTED_ERRORS = json.loads((BAD / "expected_errors.json").read_text())
T0 = 1767225600
NS = 1_000_000_000


def reference_features(flows: pd.DataFrame, bucket_secs: int) -> pd.DataFrame:
    """The spec, flow by flow, with Python integers and no pandas grouping."""
    buckets: dict[tuple[str, int], dict] = {}
    for f in flows.to_dict("records"):
        key = (f["src_addr"], f["time_flow_end_ns"] // (bucket_secs * NS) * bucket_secs)
        if key not in buckets:
            buckets[key] = {"n": 0, "bytes": 0, "packets": 0, "syn": 0, "tcp": 0, "udp": 0, "icmp": 0, "dur": 0}
            buckets[key].update(addrs=set(), ports=set())
        b = buckets[key]
        rate = max(f["sampling_rate"], 1)
        flags = f["tcp_flags"]
        b["n"] += 1
        b["bytes"] += f["bytes"] * rate
        b["packets"] += f["packets"] * rate
        b["addrs"].add(f["dst_addr"])
        b["ports"].add(f["dst_port"])
        b["syn"] += f["proto"] == 6 and bool(flags & 0x02) and not flags & 0x10
        b["tcp"] += f["proto"] == 6
        b["udp"] += f["proto"] == 17
        b["icmp"] += f["proto"] in (1, 58)
        if f["time_flow_start_ns"] > 0:
            b["dur"] += max(f["time_flow_end_ns"] - f["time_flow_start_ns"], 0)
    rows = []
    for (host, start), b in sorted(buckets.items()):
        n = b["n"]
        rows.append(
            [host, start, n, b["bytes"], b["packets"], len(b["addrs"]), len(b["ports"]), b["syn"] / n, b["tcp"] / n,
             b["udp"] / n, b["icmp"] / n, b["dur"] / n / 1e9, b["bytes"] / b["packets"] if b["packets"] else 0.0]
        )
    return pd.DataFrame(rows, columns=["host", "bucket_start", *FLOW_FEATURES])


def random_flows(seed: int, n: int = 3000) -> pd.DataFrame:
    """Flows that hit the edge cases often: exact bucket boundaries, unknown starts, starts after
    ends, zero packets, sampling rates 0/1/large, IPv6 hosts and unnamed protocols."""
    rng = np.random.default_rng(seed)
    hosts = np.array(["10.0.0.1", "10.0.0.2", "192.168.1.20", "2001:db8::1", "2001:db8::a:b"], dtype=object)
    dsts = np.array([f"10.1.0.{i}" for i in range(12)] + ["2001:db8::53", "2001:db8::99"], dtype=object)
    end = T0 * NS + rng.integers(0, 900 * NS, n)
    on_boundary = rng.random(n) < 0.1
    end[on_boundary] = (T0 + 60 * rng.integers(0, 15, on_boundary.sum())) * NS
    start = end - rng.integers(-2 * NS, 120 * NS, n)
    start[rng.random(n) < 0.15] = 0
    packets = rng.integers(0, 50, n)
    return pd.DataFrame(
        {
            "line": np.arange(1, n + 1),
            "src_addr": rng.choice(hosts, n),
            "dst_addr": rng.choice(dsts, n),
            "time_flow_start_ns": start,
            "time_flow_end_ns": end,
            "bytes": packets * rng.integers(0, 1500, n),
            "packets": packets,
            "proto": rng.choice(np.array([6, 6, 6, 17, 17, 1, 58, 47, OTHER_PROTO]), n),
            "src_port": rng.integers(0, 65536, n),
            "dst_port": rng.choice(np.array([0, 22, 53, 80, 443, 8080, 51000]), n),
            "tcp_flags": rng.integers(0, 256, n),
            "sampling_rate": rng.choice(np.array([0, 1, 1, 1, 10, 4096]), n),
        }
    )


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "flows.ndjson"
    path.write_text("\n".join(lines) + "\n")
    return path


def flow(**fields) -> str:
    base = {"src_addr": "10.0.0.5", "dst_addr": "10.0.0.9", "proto": "TCP"}
    return json.dumps({"time_flow_end_ns": T0 * NS, "bytes": 100, "packets": 2, **base, **fields})


def test_contract_vectors_reproduced():
    got = load_flow_series(CONTRACT / "flows.ndjson")
    expected = pd.read_csv(CONTRACT / "features.csv", dtype={"host": str})
    assert list(got.columns) == ["host", "bucket_start", *FLOW_FEATURES]
    assert list(expected.columns) == list(got.columns)
    assert got["bucket_start"].dtype == np.int64
    assert all(got[c].dtype == np.float64 for c in FLOW_FEATURES)
    assert got["host"].tolist() == expected["host"].tolist()
    assert got["bucket_start"].tolist() == expected["bucket_start"].tolist()
    np.testing.assert_allclose(got[FLOW_FEATURES].to_numpy(), expected[FLOW_FEATURES].to_numpy(), rtol=1e-9, atol=1e-9)


def test_raw_columns_normalised():
    raw = read_goflow2_ndjson(CONTRACT / "flows.ndjson")
    assert list(raw.columns) == RAW_COLUMNS
    assert raw["line"].tolist() == [n for n in range(1, 36) if n != 8]
    assert set(raw["proto"]) == {0, 1, 2, 6, 17, 47, 50, 58, 89, 255, OTHER_PROTO}
    assert all(raw[c].dtype == np.int64 for c in RAW_COLUMNS if c not in ("src_addr", "dst_addr"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("bucket_secs", [60, 7, 300])
def test_matches_reference_on_random_flows(seed, bucket_secs):
    flows = random_flows(seed)
    got = flow_features(flows, bucket_secs)
    expected = reference_features(flows, bucket_secs)
    assert got["host"].tolist() == expected["host"].tolist()
    assert got["bucket_start"].tolist() == expected["bucket_start"].tolist()
    expected_values = expected[FLOW_FEATURES].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(got[FLOW_FEATURES].to_numpy(), expected_values, rtol=1e-12, atol=0)


def test_row_order_does_not_matter():
    flows = random_flows(7)
    shuffled = flows.sample(frac=1.0, random_state=1).reset_index(drop=True)
    pd.testing.assert_frame_equal(flow_features(flows), flow_features(shuffled))


def test_bucket_assigned_by_end_time(tmp_path):
    path = write_lines(
        tmp_path,
        [
            flow(time_flow_start_ns=(T0 - 30) * NS, time_flow_end_ns=T0 * NS),
            flow(time_flow_end_ns=(T0 + 60) * NS - 1),
            flow(time_flow_end_ns=(T0 + 60) * NS),
            flow(time_flow_end_ns=(T0 + 299) * NS),
            flow(time_flow_end_ns=(T0 + 300) * NS),
        ],
    )
    assert load_flow_series(path)["bucket_start"].tolist() == [T0, T0 + 60, T0 + 240, T0 + 300]
    assert load_flow_series(path)["flows"].tolist() == [2.0, 1.0, 1.0, 1.0]
    assert load_flow_series(path, bucket_secs=300)["bucket_start"].tolist() == [T0, T0 + 300]


def test_silent_buckets_have_no_rows(tmp_path):
    path = write_lines(tmp_path, [flow(time_flow_end_ns=T0 * NS), flow(time_flow_end_ns=(T0 + 3600) * NS)])
    assert load_flow_series(path)["bucket_start"].tolist() == [T0, T0 + 3600]


def test_optional_fields_and_proto_names(tmp_path):
    path = write_lines(
        tmp_path,
        [
            flow(),
            flow(proto="UDP", sampling_rate=None, tcp_flags=None, dst_port=None, time_flow_start_ns=None),
            flow(proto="ICMPv6"),
            flow(proto="IPv6-ICMP"),
            flow(proto=""),
            flow(proto="unassigned"),
            flow(proto="ISIS over IPv4"),
            flow(proto=132),
        ],
    )
    raw = read_goflow2_ndjson(path)
    assert raw["proto"].tolist() == [6, 17, 58, 58, OTHER_PROTO, OTHER_PROTO, 124, 132]
    assert set(raw["sampling_rate"]) == {1}
    assert set(raw["tcp_flags"]) == set(raw["dst_port"]) == set(raw["time_flow_start_ns"]) == {0}


def test_every_protocol_name_goflow2_prints_is_read(tmp_path):
    """The whole table the trainer ships (as package data) and the daemon embeds; null is "other"."""
    table = json.loads((ROOT / "trainer" / "anomalyd_trainer" / "goflow2_protocols.json").read_text())["names"]
    assert len(table) > 150
    raw = read_goflow2_ndjson(write_lines(tmp_path, [flow(proto=name) for name in table]))
    assert raw["proto"].tolist() == [OTHER_PROTO if code is None else code for code in table.values()]


def test_sampling_scaling_and_zero_packets(tmp_path):
    path = write_lines(
        tmp_path,
        [
            flow(bytes=100, packets=2, sampling_rate=0),
            flow(bytes=50, packets=1, sampling_rate=100),
            flow(src_addr="2001:db8::1", bytes=0, packets=0, sampling_rate=10),
        ],
    )
    rows = load_flow_series(path).set_index("host")
    assert rows.loc["10.0.0.5", "bytes"] == 5100.0
    assert rows.loc["10.0.0.5", "packets"] == 102.0
    assert rows.loc["10.0.0.5", "mean_bytes_per_packet"] == 5100.0 / 102.0
    assert rows.loc["2001:db8::1", "mean_bytes_per_packet"] == 0.0


def test_syn_only_needs_syn_without_ack_on_tcp(tmp_path):
    path = write_lines(
        tmp_path,
        [
            flow(tcp_flags=0x02),
            flow(tcp_flags=0xC2),
            flow(tcp_flags=0x12),
            flow(tcp_flags=0x10),
            flow(proto="UDP", tcp_flags=0x02),
        ],
    )
    assert load_flow_series(path)["syn_only_share"].tolist() == [2 / 5]


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_inputs_raise_input_error(name):
    expected = EXPECTED_ERRORS[name]
    with pytest.raises(InputError) as info:
        read_goflow2_ndjson(BAD / name)
    err = info.value
    assert err.file == str(BAD / name)
    assert err.location == expected["location"]
    assert err.column == expected["column"]
    assert expected["message"] in err.message
    text = str(err)
    assert str(BAD / name) in text and expected["location"] in text
    if expected["column"] is not None:
        assert f"column '{expected['column']}'" in text


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_lines(tmp_path, [flow(), "", "   ", flow(), flow(packets=-1)])
    with pytest.raises(InputError, match=r"line 5, column 'packets': negative"):
        read_goflow2_ndjson(path)
    assert read_goflow2_ndjson(write_lines(tmp_path, [flow(), "", flow()]))["line"].tolist() == [1, 3]


@pytest.mark.parametrize(
    ("line", "column", "message"),
    [
        (b'{"bytes": 1, "src_addr": "\xff"}', None, "not valid UTF-8"),
        (flow(time_flow_end_ns=2**63).encode(), "time_flow_end_ns", "exceeds 2^63-1"),
        (flow(bytes=None).encode(), "bytes", "expected a non-negative integer, got null"),
        (flow(dst_addr=None).encode(), "dst_addr", "expected a non-empty address string"),
        (flow(sampling_rate="1").encode(), "sampling_rate", "expected a non-negative integer"),
        (flow(proto=None).encode(), "proto", "expected a non-negative integer"),
    ],
)
def test_more_invalid_values(tmp_path, line, column, message):
    path = tmp_path / "bad.ndjson"
    path.write_bytes(flow().encode() + b"\n" + line + b"\n")
    with pytest.raises(InputError) as info:
        read_goflow2_ndjson(path)
    assert (info.value.location, info.value.column) == ("line 2", column)
    assert message in info.value.message


def test_sampled_bytes_beyond_int64_rejected(tmp_path):
    path = write_lines(tmp_path, [flow(bytes=2**62, sampling_rate=4)])
    with pytest.raises(InputError, match=r"column 'bytes'.*exceeds"):
        read_goflow2_ndjson(path)


def test_bucket_sum_overflow_refused():
    flows = random_flows(0, n=3).assign(src_addr="10.0.0.1", time_flow_end_ns=T0 * NS, bytes=2**62, sampling_rate=1)
    with pytest.raises(ValueError, match="exceeds"):
        flow_features(flows)


def test_missing_file_names_file(tmp_path):
    missing = tmp_path / "nope.ndjson"
    with pytest.raises(InputError) as info:
        read_goflow2_ndjson(missing)
    assert info.value.file == str(missing) and str(missing) in str(info.value)


def test_empty_file_gives_empty_frame(tmp_path):
    out = load_flow_series(write_lines(tmp_path, [""]))
    assert out.empty and list(out.columns) == ["host", "bucket_start", *FLOW_FEATURES]


@pytest.mark.parametrize("bucket_secs", [0, -60, 1.5, True])
def test_bucket_secs_must_be_positive_int(bucket_secs):
    with pytest.raises(ValueError):
        flow_features(random_flows(0, n=5), bucket_secs)


def test_generator_labels_line_up_with_feature_rows(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gen_flows", ROOT / "scripts" / "gen_flows.py")
    gen = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gen_flows", gen)
    spec.loader.exec_module(gen)
    flows_path, labels_path = tmp_path / "f.ndjson", tmp_path / "l.csv"
    args = ["--hosts", "9", "--hours", "2", "--anomalies", "4", "--seed", "5"]
    gen.main([*args, "--out-flows", str(flows_path), "--out-labels", str(labels_path)])
    features = load_flow_series(flows_path)
    labels = pd.read_csv(labels_path, dtype={"host": str})
    assert features["host"].tolist() == labels["host"].tolist()
    assert features["bucket_start"].tolist() == labels["bucket_start"].tolist()
    assert set(labels.loc[labels["label"] == 1, "kind"]) == {"port_scan", "host_sweep", "exfiltration", "udp_flood"}
    assert (labels.loc[labels["label"] == 0, "kind"] == "normal").all()
    again = tmp_path / "g.ndjson"
    gen.main([*args, "--out-flows", str(again)])
    assert again.read_bytes() == flows_path.read_bytes()
