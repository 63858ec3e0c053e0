#!/usr/bin/env python3
"""Generate synthetic goflow2 NDJSON flows, with optional labelled anomalies, for the flow VAE.

Real flow captures with trustworthy labels are scarce, so training and evaluation use traffic
with known structure: each host follows one role profile (web client, DNS-heavy client, server,
night-time backup host) with Poisson flow counts that follow a daily cycle, and selected hosts
can be given injected attacks (port scan, host sweep, exfiltration, UDP flood) in a chosen time
window. The output is the JSON goflow2 v2 prints (snake_case keys, `proto` as a name), so it
goes through exactly the same reader as production data; see docs/flow-features.md.

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
from dataclasses import dataclass

import numpy as np

NS = 1_000_000_000
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
PROTO_NAME = {TCP: "TCP", UDP: "UDP", ICMP: "ICMP", ICMPV6: "ICMPv6"}
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
ANOMALY_KINDS = ("port_scan", "host_sweep", "exfiltration", "udp_flood")


@dataclass(frozen=True)
class Role:
    """A host profile: flows per minute at the daily peak, how that rate varies over the day,
    and which services its flows are drawn from (by day and, for backup hosts, by night)."""

    name: str
    peak_per_min: float
    floor: float
    day_mix: dict[str, float]
    night_per_min: float = 0.0
    night_mix: dict[str, float] | None = None


ROLES = {
    "web_client": Role("web_client", 6.0, 0.1, {"https": 0.78, "dns": 0.2, "ping": 0.02}),
    "dns_heavy": Role("dns_heavy", 9.0, 0.3, {"dns": 0.88, "https": 0.1, "ping": 0.02}),
    "server": Role("server", 10.0, 0.5, {"serve": 0.93, "dns": 0.05, "ping": 0.02}),
    "backup": Role(
        "backup", 1.0, 0.2, {"dns": 0.6, "https": 0.35, "ping": 0.05}, night_per_min=3.0, night_mix={"backup": 0.85, "dns": 0.15}
    ),
}
NIGHT_HOURS = (1, 5)


class Pools:
    """Destination address pools, each with a parallel IPv4 and IPv6 variant so that a host's
    peers are of its own address family. Documentation prefixes keep the data obviously fake."""

    def __init__(self) -> None:
        self.pools = {
            "resolver": self._pair(["10.0.255.53", "10.0.255.54"], ["2001:db8:ff::53", "2001:db8:ff::54"]),
            "gateway": self._pair(["10.0.0.1"], ["2001:db8:10::1"]),
            "backup_server": self._pair(["10.0.254.10"], ["2001:db8:ff::10"]),
            "web": self._pair(
                [f"198.51.100.{k + 1}" for k in range(40)], [f"2001:db8:cafe::{k + 1:x}" for k in range(40)]
            ),
            "client": self._pair(
                [f"100.64.{k // 250}.{k % 250 + 1}" for k in range(3000)], [f"2001:db8:c11e::{k + 1:x}" for k in range(3000)]
            ),
            "sweep": self._pair(
                [f"10.9.{k // 254}.{k % 254 + 1}" for k in range(4064)], [f"2001:db8:9::{k + 1:x}" for k in range(4064)]
            ),
            "exfil": self._pair(["203.0.113.66"], ["2001:db8:bad::66"]),
            "flood": self._pair(["198.51.100.200"], ["2001:db8:cafe::c8"]),
        }

    @staticmethod
    def _pair(v4: list[str], v6: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return np.array(v4, dtype=object), np.array(v6, dtype=object)

    def pick(self, name: str, index: np.ndarray, is_v6: np.ndarray) -> np.ndarray:
        v4, v6 = self.pools[name]
        return np.where(is_v6, v6[index % len(v6)], v4[index % len(v4)])

    def size(self, name: str) -> int:
        return len(self.pools[name][0])


def host_addresses(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every eighth host is IPv6-only so the IPv6 path of the feature code is always exercised."""
    is_v6 = np.arange(n) % 8 == 7
    addrs = [f"2001:db8:10::{i + 1:x}" if v6 else f"10.0.{i // 200}.{i % 200 + 10}" for i, v6 in enumerate(is_v6)]
    return np.array(addrs, dtype=object), is_v6


def assign_roles(n: int, rng: np.random.Generator) -> np.ndarray:
    backup = max(1, n // 10) if n >= 4 else 0
    server = n // 5
    dns = n // 5
    names = ["backup"] * backup + ["server"] * server + ["dns_heavy"] * dns
    names += ["web_client"] * (n - len(names))
    return rng.permutation(np.array(names[:n], dtype=object))


def daily_cycle(hour_of_day: np.ndarray, floor: float, phase: float) -> np.ndarray:
    """Activity between `floor` (night) and 1 (early afternoon UTC), a smooth office-hours bump."""
    bump = np.exp(-(((hour_of_day - 13.0 - phase) / 3.5) ** 2))
    return floor + (1.0 - floor) * bump


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

    @staticmethod
    def concat(parts: list[Flows]) -> Flows:
        if not parts:
            return Flows(*(np.zeros(0, dtype=object if f == "dst" else np.int64) for f in Flows.__dataclass_fields__))
        return Flows(*(np.concatenate([getattr(p, f) for p in parts]) for f in Flows.__dataclass_fields__))

    def take(self, order: np.ndarray) -> Flows:
        return Flows(*(getattr(self, f)[order] for f in Flows.__dataclass_fields__))


def lognormal_int(rng: np.random.Generator, median: float, sigma: float, size: int, low: int = 1) -> np.ndarray:
    return np.maximum(np.rint(rng.lognormal(np.log(median), sigma, size)), low).astype(np.int64)


def ephemeral(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(32768, 61000, size)


def service_flows(
    service: str, host: np.ndarray, bucket: np.ndarray, is_v6: np.ndarray, web_peers: np.ndarray, pools: Pools, rng
) -> Flows:
    """Draw the per-flow fields of one service for the given (host, bucket) slots."""
    n = len(host)
    v6 = is_v6[host]
    zeros = np.zeros(n, dtype=np.int64)
    if service == "https":
        flags = rng.choice(np.array([FIN | SYN | PSH | ACK, PSH | ACK, SYN]), n, p=[0.85, 0.13, 0.02])
        failed = flags == SYN
        packets = np.where(failed, rng.integers(1, 3, n), lognormal_int(rng, 15, 1.0, n, low=2))
        bpp = np.where(failed, 60, rng.integers(300, 1300, n))
        peers = web_peers[host, rng.integers(0, web_peers.shape[1], n)]
        return Flows(
            host, bucket, pools.pick("web", peers, v6), np.full(n, TCP), ephemeral(rng, n),
            rng.choice(np.array([443, 80]), n, p=[0.85, 0.15]), flags, packets, packets * bpp,
            np.where(failed, rng.integers(0, 3 * NS, n), lognormal_int(rng, 2 * NS, 1.0, n)), zeros,
        )
    if service == "dns":
        packets = rng.integers(1, 3, n)
        return Flows(
            host, bucket, pools.pick("resolver", rng.integers(0, 2, n), v6), np.full(n, UDP), ephemeral(rng, n),
            np.full(n, 53), zeros, packets, packets * rng.integers(60, 180, n), lognormal_int(rng, NS // 50, 0.5, n),
            zeros,
        )
    if service == "ping":
        packets = rng.integers(1, 6, n)
        return Flows(
            host, bucket, pools.pick("gateway", zeros, v6), np.where(v6, ICMPV6, ICMP), zeros, zeros, zeros,
            packets, packets * np.where(v6, 104, 84), (packets - 1) * NS, zeros,
        )
    if service == "serve":
        packets = lognormal_int(rng, 30, 1.2, n, low=2)
        clients = np.minimum(rng.zipf(1.3, n), pools.size("client")) - 1
        return Flows(
            host, bucket, pools.pick("client", clients, v6), np.full(n, TCP), np.full(n, 443), ephemeral(rng, n),
            rng.choice(np.array([FIN | SYN | PSH | ACK, PSH | ACK]), n), packets, packets * rng.integers(1000, 1450, n),
            lognormal_int(rng, 3 * NS, 1.0, n), zeros,
        )
    if service == "backup":
        packets = lognormal_int(rng, 20000, 0.7, n, low=100)
        return Flows(
            host, bucket, pools.pick("backup_server", zeros, v6), np.full(n, TCP), ephemeral(rng, n),
            rng.choice(np.array([873, 22]), n), rng.choice(np.array([PSH | ACK, FIN | SYN | PSH | ACK]), n), packets,
            packets * rng.integers(1400, 1449, n), rng.integers(20 * NS, 58 * NS, n), zeros,
        )
    raise ValueError(f"unknown service {service}")


def normal_traffic(roles, is_v6, n_buckets, bucket_secs, start, pools, rng) -> Flows:
    """Poisson flow counts per (host, bucket), each flow then assigned a service of its role."""
    n_hosts = len(roles)
    web_peers = rng.integers(0, pools.size("web"), (n_hosts, 6))
    hour = ((start + np.arange(n_buckets) * bucket_secs) % 86400) / 3600.0
    night = (hour >= NIGHT_HOURS[0]) & (hour < NIGHT_HOURS[1])
    scale = bucket_secs / 60.0
    parts = []
    for h in range(n_hosts):
        role = ROLES[roles[h]]
        rate = role.peak_per_min * daily_cycle(hour, role.floor, rng.normal(0, 1)) * rng.lognormal(0, 0.3)
        if role.night_mix is not None:
            rate = np.where(night, role.night_per_min, rate)
        counts = rng.poisson(rate * scale)
        bucket = np.repeat(np.arange(n_buckets), counts)
        for period_night, mix in ((False, role.day_mix), (True, role.night_mix or role.day_mix)):
            slot = bucket[night[bucket] == period_night]
            names = list(mix)
            choice = rng.choice(len(names), len(slot), p=np.array([mix[k] for k in names]))
            for k, service in enumerate(names):
                chosen = slot[choice == k]
                if len(chosen):
                    hosts = np.full(len(chosen), h)
                    parts.append(service_flows(service, hosts, chosen, is_v6, web_peers, pools, rng))
    return Flows.concat(parts)


def anomaly_flows(kind: str, code: int, host: int, bucket: int, v6: bool, targets, pools: Pools, scale, rng) -> Flows:
    """One bucket's worth of one attack from one host."""

    def count(low: int, high: int) -> int:
        return max(1, int(rng.integers(low, high) * scale))

    if kind == "port_scan":
        n = count(200, 600)
        dst = np.full(n, targets[0], dtype=object)
        proto, dport, flags = np.full(n, TCP), rng.choice(np.arange(1, 10000), n, replace=False), np.full(n, SYN)
        packets = np.ones(n, dtype=np.int64)
        nbytes, duration = packets * (80 if v6 else 60), np.zeros(n, dtype=np.int64)
    elif kind == "host_sweep":
        n = count(100, 254)
        dst = pools.pick("sweep", rng.choice(pools.size("sweep"), n, replace=False), np.full(n, v6))
        proto, dport, flags = np.full(n, TCP), np.full(n, 22), np.full(n, SYN)
        packets = rng.integers(1, 3, n)
        nbytes, duration = packets * (80 if v6 else 60), (packets - 1) * NS
    elif kind == "exfiltration":
        n = count(2, 6)
        dst = pools.pick("exfil", np.zeros(n, dtype=np.int64), np.full(n, v6))
        proto, dport, flags = np.full(n, TCP), np.full(n, 443), np.full(n, PSH | ACK)
        packets = rng.integers(30000, 120000, n)
        nbytes, duration = packets * rng.integers(1400, 1449, n), rng.integers(20 * NS, 58 * NS, n)
    elif kind == "udp_flood":
        n = count(300, 800)
        dst = pools.pick("flood", np.zeros(n, dtype=np.int64), np.full(n, v6))
        proto, dport, flags = np.full(n, UDP), rng.integers(1, 65536, n), np.zeros(n, dtype=np.int64)
        packets = rng.integers(50, 300, n)
        nbytes, duration = packets * rng.integers(64, 129, n), rng.integers(0, 2 * NS, n)
    else:
        raise ValueError(f"unknown anomaly kind {kind}")
    return Flows(
        np.full(n, host), np.full(n, bucket), dst, proto, ephemeral(rng, n), dport, flags, packets, nbytes, duration,
        np.full(n, code),
    )


def injected_anomalies(args, addrs, is_v6, n_buckets, pools, rng) -> tuple[Flows | None, list[str]]:
    """Anomaly k is ANOMALY_KINDS[k % 4] (so four anomalies give one of each), on a random host,
    lasting 3-10 buckets that start inside [--anomaly-from, --anomaly-to) hours."""
    if args.anomalies == 0:
        return None, []
    per_hour = 3600 // args.bucket_secs
    first = int(args.anomaly_from * per_hour)
    last = min(int(args.anomaly_to * per_hour), n_buckets)
    if not 0 <= first < last:
        sys.exit("gen_flows.py: empty anomaly window; check --anomaly-from/--anomaly-to against --hours")
    n_hosts = len(addrs)
    hosts = rng.choice(n_hosts, args.anomalies, replace=args.anomalies > n_hosts)
    parts, names = [], []
    for k, host in enumerate(hosts):
        kind = ANOMALY_KINDS[k % len(ANOMALY_KINDS)]
        names.append(kind)
        length = int(rng.integers(3, 11))
        begin = int(rng.integers(first, max(first + 1, last - length)))
        peers = np.flatnonzero((is_v6 == is_v6[host]) & (np.arange(n_hosts) != host))
        target = addrs[rng.choice(peers)] if len(peers) else pools.pick("gateway", np.zeros(1, dtype=np.int64), is_v6[host : host + 1])[0]
        for bucket in range(begin, min(begin + length, n_buckets)):
            parts.append(
                anomaly_flows(kind, k + 1, int(host), bucket, bool(is_v6[host]), [target], pools, args.bucket_secs / 60, rng)
            )
    return Flows.concat(parts), names


def write_flows(path: str, flows: Flows, addrs, is_v6, start: int, bucket_secs: int, rng) -> None:
    """Flows are written ordered by end time, as a collector would roughly emit them."""
    bucket_ns = bucket_secs * NS
    end = (start * NS) + flows.bucket * bucket_ns + rng.integers(0, bucket_ns, len(flows.bucket))
    order = np.argsort(end, kind="stable")
    flows, end = flows.take(order), end[order]
    begin = end - flows.duration_ns
    received = end + rng.integers(NS // 10, 2 * NS, len(end))
    v6 = is_v6[flows.host]
    columns = zip(
        received.tolist(), begin.tolist(), end.tolist(), flows.bytes.tolist(), flows.packets.tolist(),
        addrs[flows.host].tolist(), flows.dst.tolist(), np.where(v6, "IPv6", "IPv4").tolist(),
        [PROTO_NAME[p] for p in flows.proto.tolist()], flows.src_port.tolist(), flows.dst_port.tolist(),
        flows.flags.tolist(),
    )
    template = (
        '{"type":"IPFIX","time_received_ns":%d,"sequence_num":%d,"sampling_rate":0,"sampler_address":"192.0.2.1",'
        '"time_flow_start_ns":%d,"time_flow_end_ns":%d,"bytes":%d,"packets":%d,"src_addr":"%s","dst_addr":"%s",'
        '"etype":"%s","proto":"%s","src_port":%d,"dst_port":%d,"tcp_flags":%d}\n'
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(template % (rec[0], seq, *rec[1:]) for seq, rec in enumerate(columns, start=1))


def write_labels(path: str, flows: Flows, addrs, kinds: list[str], start: int, bucket_secs: int) -> None:
    """One row per (host, bucket) with flows, matching the rows flow_features produces."""
    n_buckets = int(flows.bucket.max()) + 1 if len(flows.bucket) else 1
    key = flows.host.astype(np.int64) * n_buckets + flows.bucket
    keys, inverse = np.unique(key, return_inverse=True)
    labels: dict[int, set[str]] = {}
    for i in np.flatnonzero(flows.kind):
        labels.setdefault(int(inverse[i]), set()).add(kinds[flows.kind[i] - 1])
    rows = []
    for idx, k in enumerate(keys.tolist()):
        host, bucket = divmod(k, n_buckets)
        found = labels.get(idx)
        rows.append((addrs[host], start + bucket * bucket_secs, 1 if found else 0, "+".join(sorted(found)) if found else "normal"))
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
    p.add_argument("--anomaly-from", type=float, default=None, help="window start, hours after --start (default: --hours/2)")
    p.add_argument("--anomaly-to", type=float, default=None, help="window end, hours after --start (default: --hours)")
    p.add_argument("--out-flows", required=True, help="NDJSON output path")
    p.add_argument("--out-labels", help="CSV host,bucket_start,label,kind output path")
    args = p.parse_args(argv)
    if args.hosts < 1 or args.anomalies < 0:
        p.error("--hosts must be positive, --anomalies non-negative")
    if args.bucket_secs <= 0 or 3600 % args.bucket_secs:
        p.error("--bucket-secs must be a positive divisor of 3600")
    if args.hours * 3600 < args.bucket_secs:
        p.error("--hours must cover at least one bucket")
    if args.start % args.bucket_secs:
        p.error("--start must be a multiple of --bucket-secs so generated buckets align with feature buckets")
    args.anomaly_from = args.hours / 2 if args.anomaly_from is None else args.anomaly_from
    args.anomaly_to = args.hours if args.anomaly_to is None else args.anomaly_to
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    pools = Pools()
    addrs, is_v6 = host_addresses(args.hosts)
    roles = assign_roles(args.hosts, rng)
    n_buckets = int(args.hours * 3600) // args.bucket_secs
    flows = normal_traffic(roles, is_v6, n_buckets, args.bucket_secs, args.start, pools, rng)
    attacks, kinds = injected_anomalies(args, addrs, is_v6, n_buckets, pools, rng)
    if attacks is not None:
        flows = Flows.concat([flows, attacks])
    write_flows(args.out_flows, flows, addrs, is_v6, args.start, args.bucket_secs, rng)
    if args.out_labels:
        write_labels(args.out_labels, flows, addrs, kinds, args.start, args.bucket_secs)
    print(f"{len(flows.host)} flows, {len(kinds)} anomalies -> {args.out_flows}", file=sys.stderr)


if __name__ == "__main__":
    main()
