#!/usr/bin/env python3
"""Generate synthetic goflow2 NDJSON flows, with optional labelled anomalies, for the flow VAE.

Real flow captures with trustworthy labels are scarce, so training and evaluation use traffic
with known structure: each host follows one role profile (web client, DNS-heavy client, server,
night-time backup host) with Poisson flow counts that follow a daily cycle, and selected hosts
can be given injected attacks (port scan, host sweep, exfiltration, UDP flood) in a chosen time
window. The output is the JSON goflow2 v2.2 prints (snake_case keys, `proto` as a name from its
IANA table), so it goes through exactly the same reader as production data; see
docs/flow-features.md.

Everything is drawn from one seeded numpy Generator, so a given command line always produces
the same files. Only numpy and the standard library are used.

Example:
    python3 scripts/gen_flows.py --hosts 40 --hours 24 --anomalies 8 \\
        --out-flows flows.ndjson --out-labels labels.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, fields

import numpy as np

NS = 1_000_000_000
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
PROTO_NAME = {TCP: "TCP", UDP: "UDP", ICMP: "ICMP", ICMPV6: "IPv6-ICMP"}
FIN, SYN, PSH, ACK = 0x01, 0x02, 0x08, 0x10
FULL_TCP = FIN | SYN | PSH | ACK
ANOMALY_KINDS = ("port_scan", "host_sweep", "exfiltration", "udp_flood")
NIGHT_HOURS = (1, 5)


@dataclass(frozen=True)
class Role:
    """A host profile: flows per minute at the daily peak, the night-time fraction of that rate,
    and the services its flows are drawn from; backup hosts switch to a separate night profile."""

    peak_per_min: float
    floor: float
    day_mix: dict[str, float]
    night_per_min: float = 0.0
    night_mix: dict[str, float] | None = None


ROLES = {
    "web_client": Role(6.0, 0.1, {"https": 0.78, "dns": 0.2, "ping": 0.02}),
    "dns_heavy": Role(9.0, 0.3, {"dns": 0.88, "https": 0.1, "ping": 0.02}),
    "server": Role(10.0, 0.5, {"serve": 0.93, "dns": 0.05, "ping": 0.02}),
    "backup": Role(1.0, 0.2, {"dns": 0.6, "https": 0.35, "ping": 0.05}, 3.0, {"backup": 0.85, "dns": 0.15}),
}


class Pools:
    """Destination address pools, each with a parallel IPv4 and IPv6 variant so that a host's
    peers are of its own address family. Documentation prefixes keep the data obviously fake."""

    def __init__(self) -> None:
        def pair(v4: list[str], v6: list[str]) -> tuple[np.ndarray, np.ndarray]:
            return np.array(v4, dtype=object), np.array(v6, dtype=object)

        self.pools = {
            "resolver": pair(["10.0.255.53", "10.0.255.54"], ["2001:db8:ff::53", "2001:db8:ff::54"]),
            "gateway": pair(["10.0.0.1"], ["2001:db8:10::1"]),
            "backup_server": pair(["10.0.254.10"], ["2001:db8:ff::10"]),
            "web": pair([f"198.51.100.{k + 1}" for k in range(40)], [f"2001:db8:cafe::{k + 1:x}" for k in range(40)]),
            "client": pair(
                [f"100.64.{k // 250}.{k % 250 + 1}" for k in range(3000)],
                [f"2001:db8:c11e::{k + 1:x}" for k in range(3000)],
            ),
            "sweep": pair(
                [f"10.9.{k // 254}.{k % 254 + 1}" for k in range(4064)],
                [f"2001:db8:9::{k + 1:x}" for k in range(4064)],
            ),
            "exfil": pair(["203.0.113.66"], ["2001:db8:bad::66"]),
            "flood": pair(["198.51.100.200"], ["2001:db8:cafe::c8"]),
        }

    def pick(self, name: str, index, is_v6) -> np.ndarray:
        v4, v6 = self.pools[name]
        index = np.asarray(index)
        return np.where(is_v6, v6[index % len(v6)], v4[index % len(v4)]).astype(object)

    def size(self, name: str) -> int:
        return len(self.pools[name][0])


@dataclass
class Flows:
    """Column arrays for a batch of flows; `kind` is 0 for normal traffic, else 1 + anomaly index."""

    host: np.ndarray
    bucket: np.ndarray
    dst: np.ndarray
    proto: np.ndarray
    src_port: np.ndarray
    dst_port: np.ndarray
    flags: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray
    duration_ns: np.ndarray
    kind: np.ndarray

    @classmethod
    def build(cls, n: int, **columns) -> Flows:
        """Broadcast scalars to length-n arrays; `bytes` defaults to packets x `bytes_per_packet`."""
        columns.setdefault("kind", 0)
        columns["bytes"] = np.asarray(columns["packets"]) * columns.pop("bytes_per_packet")
        return cls(**{k: np.broadcast_to(v, (n,)).copy() for k, v in columns.items()})

    @classmethod
    def concat(cls, parts: list[Flows]) -> Flows:
        if not parts:
            return cls(*(np.zeros(0, dtype=object if f.name == "dst" else np.int64) for f in fields(cls)))
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def take(self, order: np.ndarray) -> Flows:
        return Flows(*(getattr(self, f.name)[order] for f in fields(self)))


def lognormal_int(rng: np.random.Generator, median: float, sigma: float, size: int, low: int = 1) -> np.ndarray:
    return np.maximum(np.rint(rng.lognormal(np.log(median), sigma, size)), low).astype(np.int64)


def ephemeral(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(32768, 61000, size)


def service_flows(service: str, host: int, bucket: np.ndarray, v6: bool, peers: np.ndarray, pools, rng) -> Flows:
    """Draw the per-flow fields of one service for one host's flows in the given buckets."""
    n = len(bucket)
    common = {"host": host, "bucket": bucket, "src_port": ephemeral(rng, n)}
    if service == "https":
        flags = rng.choice(np.array([FULL_TCP, PSH | ACK, SYN]), n, p=[0.85, 0.13, 0.02])
        failed = flags == SYN
        return Flows.build(
            n, **common, dst=pools.pick("web", rng.choice(peers, n), v6), proto=TCP,
            dst_port=rng.choice(np.array([443, 80]), n, p=[0.85, 0.15]), flags=flags,
            packets=np.where(failed, rng.integers(1, 3, n), lognormal_int(rng, 15, 1.0, n, low=2)),
            bytes_per_packet=np.where(failed, 60, rng.integers(300, 1300, n)),
            duration_ns=np.where(failed, rng.integers(0, 3 * NS, n), lognormal_int(rng, 2 * NS, 1.0, n)),
        )
    if service == "dns":
        return Flows.build(
            n, **common, dst=pools.pick("resolver", rng.integers(0, 2, n), v6), proto=UDP, dst_port=53, flags=0,
            packets=rng.integers(1, 3, n), bytes_per_packet=rng.integers(60, 180, n),
            duration_ns=lognormal_int(rng, NS // 50, 0.5, n),
        )
    if service == "ping":
        packets = rng.integers(1, 6, n)
        return Flows.build(
            n, host=host, bucket=bucket, src_port=0, dst=pools.pick("gateway", 0, v6), proto=ICMPV6 if v6 else ICMP,
            dst_port=0, flags=0, packets=packets, bytes_per_packet=104 if v6 else 84, duration_ns=(packets - 1) * NS,
        )
    if service == "serve":
        clients = np.minimum(rng.zipf(1.3, n), pools.size("client")) - 1
        return Flows.build(
            n, host=host, bucket=bucket, src_port=443, dst=pools.pick("client", clients, v6), proto=TCP,
            dst_port=ephemeral(rng, n), flags=rng.choice(np.array([FULL_TCP, PSH | ACK]), n),
            packets=lognormal_int(rng, 30, 1.2, n, low=2), bytes_per_packet=rng.integers(1000, 1450, n),
            duration_ns=lognormal_int(rng, 3 * NS, 1.0, n),
        )
    if service == "backup":
        return Flows.build(
            n, **common, dst=pools.pick("backup_server", 0, v6), proto=TCP, dst_port=rng.choice(np.array([873, 22]), n),
            flags=rng.choice(np.array([PSH | ACK, FULL_TCP]), n), packets=lognormal_int(rng, 20000, 0.7, n, low=100),
            bytes_per_packet=rng.integers(1400, 1449, n), duration_ns=rng.integers(20 * NS, 58 * NS, n),
        )
    raise ValueError(f"unknown service {service}")


def anomaly_flows(kind: str, code: int, host: int, bucket: int, v6: bool, target: str, pools, scale: float, rng):
    """One bucket's worth of one attack from one host; flow counts are per minute, scaled to the
    bucket length and capped by the number of distinct ports or addresses available."""

    def count(low: int, high: int, cap: int | None = None) -> int:
        n = max(1, int(rng.integers(low, high) * scale))
        return n if cap is None else min(n, cap)

    common = {"host": host, "bucket": bucket, "kind": code}
    syn_bytes = 80 if v6 else 60
    if kind == "port_scan":
        n = count(200, 600, cap=9999)
        return Flows.build(
            n, **common, src_port=ephemeral(rng, n), dst=np.array([target], dtype=object), proto=TCP,
            dst_port=rng.choice(np.arange(1, 10000), n, replace=False), flags=SYN, packets=1,
            bytes_per_packet=syn_bytes, duration_ns=0,
        )
    if kind == "host_sweep":
        n = count(100, 254, cap=pools.size("sweep"))
        packets = rng.integers(1, 3, n)
        addresses = rng.choice(pools.size("sweep"), n, replace=False)
        return Flows.build(
            n, **common, src_port=ephemeral(rng, n), dst=pools.pick("sweep", addresses, v6), proto=TCP, dst_port=22,
            flags=SYN, packets=packets, bytes_per_packet=syn_bytes, duration_ns=(packets - 1) * NS,
        )
    if kind == "exfiltration":
        n = count(2, 6)
        return Flows.build(
            n, **common, src_port=ephemeral(rng, n), dst=pools.pick("exfil", 0, v6), proto=TCP, dst_port=443,
            flags=PSH | ACK, packets=rng.integers(30000, 120000, n), bytes_per_packet=rng.integers(1400, 1449, n),
            duration_ns=rng.integers(20 * NS, 58 * NS, n),
        )
    if kind == "udp_flood":
        n = count(300, 800)
        return Flows.build(
            n, **common, src_port=ephemeral(rng, n), dst=pools.pick("flood", 0, v6), proto=UDP,
            dst_port=rng.integers(1, 65536, n), flags=0, packets=rng.integers(50, 300, n),
            bytes_per_packet=rng.integers(64, 129, n), duration_ns=rng.integers(0, 2 * NS, n),
        )
    raise ValueError(f"unknown anomaly kind {kind}")


def host_addresses(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every eighth host is IPv6-only so the IPv6 path of the feature code is always exercised."""
    is_v6 = np.arange(n) % 8 == 7
    addrs = [f"2001:db8:10::{i + 1:x}" if v6 else f"10.0.{i // 200}.{i % 200 + 10}" for i, v6 in enumerate(is_v6)]
    return np.array(addrs, dtype=object), is_v6


def assign_roles(n: int, rng: np.random.Generator) -> np.ndarray:
    backup = max(1, n // 10) if n >= 4 else 0
    names = ["backup"] * backup + ["server"] * (n // 5) + ["dns_heavy"] * (n // 5)
    names += ["web_client"] * (n - len(names))
    return rng.permutation(np.array(names[:n], dtype=object))


def daily_cycle(hour_of_day: np.ndarray, floor: float, phase: float) -> np.ndarray:
    """Activity between `floor` (night) and 1 (early afternoon UTC), a smooth office-hours bump."""
    bump = np.exp(-(((hour_of_day - 13.0 - phase) / 3.5) ** 2))
    return floor + (1.0 - floor) * bump


def normal_traffic(roles, is_v6, n_buckets: int, bucket_secs: int, start: int, pools: Pools, rng) -> Flows:
    """Poisson flow counts per (host, bucket), each flow then assigned a service of its role."""
    hour = ((start + np.arange(n_buckets) * bucket_secs) % 86400) / 3600.0
    night = (hour >= NIGHT_HOURS[0]) & (hour < NIGHT_HOURS[1])
    parts = []
    for h, role_name in enumerate(roles):
        role = ROLES[role_name]
        peers = rng.integers(0, pools.size("web"), 6)
        rate = role.peak_per_min * daily_cycle(hour, role.floor, rng.normal(0, 1)) * rng.lognormal(0, 0.3)
        if role.night_mix is not None:
            rate = np.where(night, role.night_per_min, rate)
        bucket = np.repeat(np.arange(n_buckets), rng.poisson(rate * bucket_secs / 60.0))
        for is_night, mix in ((False, role.day_mix), (True, role.night_mix or role.day_mix)):
            slots = bucket[night[bucket] == is_night]
            choice = rng.choice(len(mix), len(slots), p=list(mix.values()))
            for k, service in enumerate(mix):
                if (choice == k).any():
                    parts.append(service_flows(service, h, slots[choice == k], bool(is_v6[h]), peers, pools, rng))
    return Flows.concat(parts)


def injected_anomalies(args, addrs, is_v6, n_buckets: int, pools: Pools, rng) -> tuple[Flows, list[str]]:
    """Anomaly k is ANOMALY_KINDS[k % 4] (so four anomalies give one of each), on a random host,
    lasting 3-10 buckets that start inside [--anomaly-from, --anomaly-to) hours. A port scan
    targets another monitored host of the same address family (the gateway if there is none)."""
    per_hour = 3600 // args.bucket_secs
    first = int(args.anomaly_from * per_hour)
    last = max(first + 1, min(int(args.anomaly_to * per_hour), n_buckets))
    n_hosts = len(addrs)
    hosts = rng.choice(n_hosts, args.anomalies, replace=args.anomalies > n_hosts)
    parts, kinds = [], []
    for k, host in enumerate(hosts.tolist()):
        kind = ANOMALY_KINDS[k % len(ANOMALY_KINDS)]
        kinds.append(kind)
        length = int(rng.integers(3, 11))
        begin = int(rng.integers(first, max(first + 1, last - length)))
        peers = np.flatnonzero((is_v6 == is_v6[host]) & (np.arange(n_hosts) != host))
        target = addrs[rng.choice(peers)] if len(peers) else pools.pick("gateway", 0, is_v6[host])[()]
        for bucket in range(begin, min(begin + length, n_buckets)):
            parts.append(
                anomaly_flows(kind, k + 1, host, bucket, bool(is_v6[host]), target, pools, args.bucket_secs / 60, rng)
            )
    return Flows.concat(parts), kinds


def write_flows(path: str, flows: Flows, addrs, is_v6, start: int, bucket_secs: int, rng) -> None:
    """Flows are written ordered by end time, as a collector would roughly emit them."""
    bucket_ns = bucket_secs * NS
    end = start * NS + flows.bucket * bucket_ns + rng.integers(0, bucket_ns, len(flows.bucket))
    order = np.argsort(end, kind="stable")
    flows, end = flows.take(order), end[order]
    received = end + rng.integers(NS // 10, 2 * NS, len(end))
    records = zip(
        received.tolist(),
        (end - flows.duration_ns).tolist(),
        end.tolist(),
        flows.bytes.tolist(),
        flows.packets.tolist(),
        addrs[flows.host].tolist(),
        flows.dst.tolist(),
        np.where(is_v6[flows.host], "IPv6", "IPv4").tolist(),
        [PROTO_NAME[p] for p in flows.proto.tolist()],
        flows.src_port.tolist(),
        flows.dst_port.tolist(),
        flows.flags.tolist(), strict=True,
    )
    template = (
        '{"type":"IPFIX","time_received_ns":%d,"sequence_num":%d,"sampling_rate":0,"sampler_address":"192.0.2.1",'
        '"time_flow_start_ns":%d,"time_flow_end_ns":%d,"bytes":%d,"packets":%d,"src_addr":"%s","dst_addr":"%s",'
        '"etype":"%s","proto":"%s","src_port":%d,"dst_port":%d,"tcp_flags":%d}\n'
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(template % (rec[0], seq, *rec[1:]) for seq, rec in enumerate(records, start=1))


def write_labels(path: str, flows: Flows, addrs, kinds: list[str], start: int, bucket_secs: int) -> None:
    """One row per (host, bucket) with flows, in the same order as flow_features' rows."""
    n_buckets = int(flows.bucket.max()) + 1 if len(flows.bucket) else 1
    keys, inverse = np.unique(flows.host * n_buckets + flows.bucket, return_inverse=True)
    found: dict[int, set[str]] = {}
    for i in np.flatnonzero(flows.kind).tolist():
        found.setdefault(int(inverse[i]), set()).add(kinds[flows.kind[i] - 1])
    rows = []
    for idx, key in enumerate(keys.tolist()):
        host, bucket = divmod(key, n_buckets)
        kind = "+".join(sorted(found[idx])) if idx in found else "normal"
        rows.append((addrs[host], start + bucket * bucket_secs, int(idx in found), kind))
    rows.sort(key=lambda r: (r[0], r[1]))
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["host", "bucket_start", "label", "kind"])
        writer.writerows(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=40)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--bucket-secs", type=int, default=60, help="must divide 3600")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=1767225600, help="unix seconds, default 2026-01-01T00:00:00Z")
    p.add_argument("--anomalies", type=int, default=0, help="number of injected attack episodes")
    p.add_argument("--anomaly-from", type=float, help="window start, hours after --start (default: --hours/2)")
    p.add_argument("--anomaly-to", type=float, help="window end, hours after --start (default: --hours)")
    p.add_argument("--out-flows", required=True, help="NDJSON output path")
    p.add_argument("--out-labels", help="CSV output path: host,bucket_start,label,kind")
    args = p.parse_args(argv)
    if args.hosts < 1 or args.anomalies < 0:
        p.error("--hosts must be positive and --anomalies non-negative")
    if args.bucket_secs <= 0 or 3600 % args.bucket_secs:
        p.error("--bucket-secs must be a positive divisor of 3600")
    if args.hours * 3600 < args.bucket_secs:
        p.error("--hours must cover at least one bucket")
    if args.start % args.bucket_secs:
        p.error("--start must be a multiple of --bucket-secs so generated buckets align with feature buckets")
    args.anomaly_from = args.hours / 2 if args.anomaly_from is None else args.anomaly_from
    args.anomaly_to = args.hours if args.anomaly_to is None else args.anomaly_to
    if args.anomalies and not 0 <= args.anomaly_from < min(args.anomaly_to, args.hours):
        p.error("need 0 <= --anomaly-from < min(--anomaly-to, --hours)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    pools = Pools()
    addrs, is_v6 = host_addresses(args.hosts)
    roles = assign_roles(args.hosts, rng)
    n_buckets = int(args.hours * 3600) // args.bucket_secs
    normal = normal_traffic(roles, is_v6, n_buckets, args.bucket_secs, args.start, pools, rng)
    attacks, kinds = injected_anomalies(args, addrs, is_v6, n_buckets, pools, rng)
    flows = Flows.concat([normal, attacks])
    write_flows(args.out_flows, flows, addrs, is_v6, args.start, args.bucket_secs, rng)
    if args.out_labels:
        write_labels(args.out_labels, flows, addrs, kinds, args.start, args.bucket_secs)
    print(f"gen_flows.py: {len(flows.host)} flows, {len(kinds)} anomalies -> {args.out_flows}", file=sys.stderr)


if __name__ == "__main__":
    main()
