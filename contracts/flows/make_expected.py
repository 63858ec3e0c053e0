"""Recompute features.csv from flows.ndjson with a plain loop, independent of anomalyd_trainer.

This is the contract's second opinion: it follows docs/flow-features.md literally, one record at a
time, with Python integers, so the pandas implementation is tested against something that shares
none of its code. It reads only the protocol-name table, which is data taken from goflow2
(scripts/goflow2_protocols.py). Run: python3 contracts/flows/make_expected.py (standard library only).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUCKET_SECS = 60
PROTOCOLS = HERE.parents[1] / "trainer" / "anomalyd_trainer" / "goflow2_protocols.json"
FEATURES = [
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


def main() -> None:
    names = json.loads(PROTOCOLS.read_text(encoding="utf-8"))["names"]
    buckets: dict[tuple[str, int], dict] = {}
    for text in (HERE / "flows.ndjson").read_text(encoding="utf-8").splitlines():
        if not text.strip():
            continue
        rec = json.loads(text)
        proto = rec["proto"]
        if isinstance(proto, str):  # null: a name shared by several numbers, so "other"
            proto = -1 if names[proto] is None else names[proto]
        rate = max(rec.get("sampling_rate", 1), 1)
        end = rec["time_flow_end_ns"]
        start = rec.get("time_flow_start_ns", 0)
        flags = rec.get("tcp_flags", 0)
        key = (rec["src_addr"], end // (BUCKET_SECS * 10**9) * BUCKET_SECS)
        b = buckets.setdefault(key, {"addrs": set(), "ports": set()})
        for counter in ("n", "bytes", "packets", "syn", "tcp", "udp", "icmp", "dur"):
            b.setdefault(counter, 0)
        b["n"] += 1
        b["bytes"] += rec["bytes"] * rate
        b["packets"] += rec["packets"] * rate
        b["addrs"].add(rec["dst_addr"])
        b["ports"].add(rec.get("dst_port", 0))
        b["syn"] += proto == 6 and flags & 0x02 != 0 and flags & 0x10 == 0
        b["tcp"] += proto == 6
        b["udp"] += proto == 17
        b["icmp"] += proto in (1, 58)
        b["dur"] += max(end - start, 0) if start > 0 else 0

    rows = ["host,bucket_start," + ",".join(FEATURES)]
    for (host, bucket), b in sorted(buckets.items()):
        n = float(b["n"])
        values = [
            n,
            float(b["bytes"]),
            float(b["packets"]),
            float(len(b["addrs"])),
            float(len(b["ports"])),
            b["syn"] / n,
            b["tcp"] / n,
            b["udp"] / n,
            b["icmp"] / n,
            float(b["dur"]) / n / 1e9,
            float(b["bytes"]) / float(b["packets"]) if b["packets"] else 0.0,
        ]
        rows.append(",".join([host, str(bucket)] + [repr(v) for v in values]))
    (HERE / "features.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
