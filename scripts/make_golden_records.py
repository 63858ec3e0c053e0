"""Raw records for the golden vectors of the default bundles (contracts/<bundle>/records.*).

The public datasets may not be copied into the repository, so the records are synthesised in
each bundle's input format from the bundle's own scaler statistics (values around the training
mean, then an injected anomaly), plus the edge cases the daemon must treat like the trainer:

- skab-convae: `;`-separated CSV with SKAB's columns; a gap longer than max_gap_secs (a new
  segment), a repeated timestamp (dropped), a level shift in two sensors.
- nslkdd-vae: headerless NSL-KDD CSV; a service the training data never had (all its one-hot
  columns 0), and attack-like rows (SYN-error floods, huge byte counts).
- flows-vae: goflow2 NDJSON from scripts/gen_flows.py with one injected attack.

    .venv/bin/python scripts/make_golden_records.py   (after the bundles exist in models/)
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def columns(bundle: str) -> list[dict]:
    return json.loads((ROOT / "models" / bundle / "model.json").read_text())["preprocess"]["columns"]


def raw_value(col: dict, z: float) -> float:
    """The raw value whose scaled value is z (inverse of docs/model-contract.md §1)."""
    t = col["mean"] + z * col["std"]
    return float(np.expm1(max(t, 0.0))) if col["transform"] == "log1p" else t


def skab(out: Path, rng: np.random.Generator) -> None:
    cols = columns("skab-convae")
    names = [c["name"] for c in cols]
    t0 = datetime(2026, 1, 5, 10, 0, 0)
    rows, ts = [], t0
    z = np.zeros(len(cols))
    for i in range(200):
        z = 0.8 * z + rng.normal(0, 0.3, len(cols))  # smooth noise around the training mean
        shifted = z.copy()
        if 130 <= i < 160:  # level shift in Current and Pressure
            shifted[names.index("Current")] += 4.0
            shifted[names.index("Pressure")] -= 3.0
        ts = ts + timedelta(seconds=30 if i == 70 else 1)  # a gap: new segment after row 70
        values = (f"{raw_value(c, v):.6g}" for c, v in zip(cols, shifted, strict=True))
        rows.append([ts.strftime("%Y-%m-%d %H:%M:%S"), *values])
        if i == 100:  # the same timestamp again: trainer and daemon both keep the first
            rows.append(rows[-1][:1] + [f"{raw_value(c, 5.0):.6g}" for c in cols])
    out.write_text("\n".join(";".join(r) for r in [["datetime", *names], *rows]) + "\n")


NSL_FIELDS = ["duration", "protocol_type", "service", "flag", "src_bytes", "dst_bytes", "land", "wrong_fragment",
              "urgent", "hot", "num_failed_logins", "logged_in", "num_compromised", "root_shell", "su_attempted",
              "num_root", "num_file_creations", "num_shells", "num_access_files", "num_outbound_cmds",
              "is_host_login", "is_guest_login", "count", "srv_count", "serror_rate", "srv_serror_rate",
              "rerror_rate", "srv_rerror_rate", "same_srv_rate", "diff_srv_rate", "srv_diff_host_rate",
              "dst_host_count", "dst_host_srv_count", "dst_host_same_srv_rate", "dst_host_diff_srv_rate",
              "dst_host_same_src_port_rate", "dst_host_srv_diff_host_rate", "dst_host_serror_rate",
              "dst_host_srv_serror_rate", "dst_host_rerror_rate", "dst_host_srv_rerror_rate", "label", "difficulty"]


def nslkdd(out: Path, rng: np.random.Generator) -> None:
    cols = columns("nslkdd-vae")
    numeric = {c["name"]: c for c in cols if c["transform"] != "one_hot"}
    vocab: dict[str, list[str]] = {}
    for c in cols:
        if c["transform"] == "one_hot":
            vocab.setdefault(c["source"], []).append(c["category"])
    lines = []
    for i in range(64):
        attack = i % 4 == 3
        row = {}
        for name, c in numeric.items():
            v = raw_value(c, float(rng.normal(0, 0.5)))
            row[name] = round(min(max(v, 0.0), 1.0), 2) if name.endswith("rate") else int(round(max(v, 0.0)))
        row["protocol_type"] = vocab["protocol_type"][i % len(vocab["protocol_type"])]
        row["service"] = "gopher_x" if i == 5 else vocab["service"][i % len(vocab["service"])]
        row["flag"] = vocab["flag"][0]
        if attack and i % 8 == 3:  # SYN flood: many half-open connections to one service
            row.update(count=500, srv_count=500, serror_rate=1.0, srv_serror_rate=1.0, dst_host_serror_rate=1.0,
                       same_srv_rate=0.02, src_bytes=0, flag="S0")
        elif attack:  # an enormous transfer
            row.update(src_bytes=10**8)
        row["label"] = "neptune" if attack else "normal"
        row["difficulty"] = 20
        lines.append(",".join(str(row[f]) for f in NSL_FIELDS))
    out.write_text("\n".join(lines) + "\n")


def flows(out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts/gen_flows.py"), "--hosts", "4", "--hours", "1", "--seed", "9",
                    "--anomalies", "1", "--anomaly-from", "0.5", "--out-flows", str(out),
                    "--out-labels", str(out.with_name("labels.csv"))], check=True)


def main() -> None:
    rng = np.random.default_rng(2026)
    for name in ("skab-convae", "nslkdd-vae", "flows-vae"):
        (ROOT / "contracts" / name).mkdir(parents=True, exist_ok=True)
    skab(ROOT / "contracts/skab-convae/records.csv", rng)
    nslkdd(ROOT / "contracts/nslkdd-vae/records.csv", rng)
    flows(ROOT / "contracts/flows-vae/records.ndjson")


if __name__ == "__main__":
    main()
