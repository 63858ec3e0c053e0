"""Per-series thresholds on data the model has not seen, through `anomalyd score` (docs/thresholds.md).

1. "1.0 means what it says": on normal data, after warm-up, the share of windows above 1.0 next to
   the configured risk, per series: the second half of SKAB's anomaly-free file (the conv-AE is
   trained on its first half), and KDDTest+'s normal rows, one series per protocol (the default
   NSL-KDD VAE, trained on KDDTrain+_20Percent's normal rows).
2. Drift: the same SKAB half with Current, Pressure and Voltage drifting by 0, 2, 4 and 6 training
   standard deviations over the stream (one series each, rows 10 s apart: 13 hours), with spikes
   and level shifts injected at fixed places: false alarms per series per day and the share of
   injected anomalies caught, static against streaming thresholds, under the default alert policy.

Nothing here is tuned: every setting is the config default except the mode (and warmup_windows = 0
where it says "from the tail"). Needs the release build (cargo build --release) and the trainer.

    .venv/bin/python scripts/threshold_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from anomalyd_trainer.benchmark import DATASETS, REPO, anomalyd_binary
from anomalyd_trainer.bundle import write_bundle
from anomalyd_trainer.config import load_config
from anomalyd_trainer.train import train

SKAB_FREE = DATASETS / "skab/data/anomaly-free/anomaly-free.csv"
KDD_TEST = DATASETS / "nsl-kdd/KDDTest+.txt"
MODES = {"static": 'mode = "static"', "spot": 'mode = "spot"',
         "spot, from the tail": 'mode = "spot"\nwarmup_windows = 0', "dspot": 'mode = "dspot"'}
WARMUP = 1000
DEPTH = 32


def score(model: Path, data: Path, config: str, work: Path) -> tuple[pd.DataFrame, list[dict]]:
    cfg, out, alerts = work / "anomalyd.toml", work / "scores.ndjson", work / "alerts.jsonl"
    cfg.write_text(config)
    run = subprocess.run([str(anomalyd_binary()), "score", "--quiet", "--model", str(model), "--input", str(data),
                          "--config", str(cfg), "--output", str(out), "--output-format", "ndjson",
                          "--alerts", str(alerts)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"anomalyd score {data}: {run.stderr.strip()}")
    rows = pd.read_json(out, lines=True)
    return rows, [json.loads(line) for line in alerts.read_text().splitlines()]


def skab_half_bundle(work: Path) -> tuple[Path, pd.DataFrame]:
    """The SKAB conv-AE trained on the first half of the anomaly-free file; the second half, with
    the 31 rows before it that its first window needs."""
    frame = pd.read_csv(SKAB_FREE, sep=";")
    half = len(frame) // 2
    cfg = load_config(REPO / "trainer/configs/skab-convae.toml", [])
    cfg.data = dataclasses.replace(cfg.data, paths=[str(SKAB_FREE)], head_rows=half)
    cfg.export.name = "skab-free-half"
    write_bundle(train(cfg, progress=False), work / cfg.export.name)
    w = cfg.window.length
    return work / cfg.export.name, frame.iloc[half - (w - 1):].reset_index(drop=True)


def share_over(rows: pd.DataFrame, skip: int) -> dict:
    kept = rows.iloc[skip:]
    return {"windows": int(len(kept)), "over": int((kept["anomaly_score"] > 1).sum()),
            "share": float((kept["anomaly_score"] > 1).mean())}


def calibration(work: Path, bundle: Path, test: pd.DataFrame) -> list[dict]:
    out = []
    skab_file = work / "skab-free-second-half.csv"
    test.to_csv(skab_file, sep=";", index=False)
    kdd = pd.read_csv(KDD_TEST, header=None)
    meta = json.loads((REPO / "models/nslkdd-vae/model.json").read_text())
    kdd.columns = meta["training_config"]["data"]["column_names"][:kdd.shape[1]]
    normal = kdd[kdd["label"] == "normal"]
    series = [("SKAB anomaly-free, second half", Path(bundle), skab_file, 0.001)]
    for proto, rows in normal.groupby("protocol_type"):
        path = work / f"kdd-{proto}.txt"
        rows.to_csv(path, header=False, index=False)
        series.append((f"KDDTest+ normal, {proto}", REPO / "models/nslkdd-vae", path, 0.01))
    for name, model, path, risk in series:
        for mode, toml in MODES.items():
            rows, _ = score(model, path, f"[thresholds]\n{toml}\nrisk = {risk}\n", work)
            skip = 0 if mode in ("static", "spot, from the tail") else WARMUP + (DEPTH if mode == "dspot" else 0)
            out.append({"series": name, "mode": mode, "risk": risk, **share_over(rows, skip)})
    return out


def drifting(test: pd.DataFrame, sd: dict, drift_sd: float, seed: int) -> tuple[pd.DataFrame, list[tuple[int, int]]]:
    """`test` with a linear drift of `drift_sd` training standard deviations in Current, Pressure
    and Voltage, rows 10 s apart, and injected anomalies: 6 spikes (3 rows, +8 sd in Current) and
    4 level shifts (60 rows, +5 sd in Pressure). Returns the frame and the injected row ranges."""
    frame = test.copy()
    n = len(frame)
    start = pd.Timestamp("2026-01-01")
    frame["datetime"] = [(start + pd.Timedelta(seconds=10 * i)).strftime("%Y-%m-%d %H:%M:%S") for i in range(n)]
    ramp = np.linspace(0.0, drift_sd, n)
    for col in ("Current", "Pressure", "Voltage"):
        frame[col] = frame[col] + ramp * sd[col]
    rng = np.random.default_rng(seed)
    places = np.sort(rng.choice(np.arange(300, n - 100, 150), size=10, replace=False))
    injected = []
    for at, kind in zip(places, rng.permutation(["spike"] * 6 + ["shift"] * 4), strict=True):
        column, rows, size = ("Current", 3, 8) if kind == "spike" else ("Pressure", 60, 5)
        frame.loc[at:at + rows - 1, column] += size * sd[column]
        injected.append((int(at), int(at) + rows))
    return frame, injected


def drift(work: Path, bundle: Path, test: pd.DataFrame) -> list[dict]:
    meta = json.loads((bundle / "model.json").read_text())
    sd = {c["source"]: c["std"] for c in meta["preprocess"]["columns"]}
    w = meta["window"]["length"]
    out = []
    for k, drift_sd in enumerate((0.0, 2.0, 4.0, 6.0)):
        frame, injected = drifting(test, sd, drift_sd, seed=k)
        path = work / f"drift-{drift_sd:g}.csv"
        frame.to_csv(path, sep=";", index=False)
        ts = (pd.to_datetime(frame["datetime"]) - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1)
        days = (ts.iloc[-1] - ts.iloc[0]) / 86400
        # An alert "catches" an injection when it starts within the rows the injection touches
        # plus one window after; any other firing is a false alarm.
        spans = [(ts.iloc[a], ts.iloc[min(b + w, len(ts) - 1)]) for a, b in injected]
        for mode, toml in MODES.items():
            _, alerts = score(bundle, path, f"[thresholds]\n{toml}\n", work)
            fired = [a["started_ts"] for a in alerts if a["event"] == "firing"]
            inside = [any(lo <= f <= hi for lo, hi in spans) for f in fired]
            caught = sum(any(lo <= f <= hi for f in fired) for lo, hi in spans)
            out.append({"drift_sd": drift_sd, "mode": mode, "days": float(days), "alerts": len(fired),
                        "false_alarms_per_day": float((len(fired) - sum(inside)) / days),
                        "injected": len(injected), "caught": int(caught)})
    return out


def markdown(calib: list[dict], drifts: list[dict]) -> str:
    lines = ["| series | risk | static | spot | spot, from the tail | dspot |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["series"] for r in calib):
        rows = {r["mode"]: r for r in calib if r["series"] == name}
        cells = [f"{rows[m]['share']:.4f} ({rows[m]['over']}/{rows[m]['windows']})" for m in MODES]
        lines.append(f"| {name} | {rows['static']['risk']} | " + " | ".join(cells) + " |")
    lines += ["", "| drift (training sd) | " + " | ".join(f"{m}: false alarms/day, caught" for m in MODES) + " |",
              "|---|" + "---|" * len(MODES)]
    for d in dict.fromkeys(r["drift_sd"] for r in drifts):
        rows = {r["mode"]: r for r in drifts if r["drift_sd"] == d}
        cells = [f"{rows[m]['false_alarms_per_day']:.1f}, {rows[m]['caught']}/{rows[m]['injected']}" for m in MODES]
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, test = skab_half_bundle(work)
        calib, drifts = calibration(work, bundle, test), drift(work, bundle, test)
    print(markdown(calib, drifts))
    if args.out:
        Path(args.out).write_text(json.dumps({"calibration": calib, "drift": drifts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
