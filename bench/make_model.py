"""The benchmark's conv-AE bundle, trained once on the same synthetic series the bench topic holds.

    .venv/bin/python bench/make_model.py [--features 4] [--window 64] --out DIR

Writes a CSV of `SERIES` series x `ROWS` rows from `value()` (the formula the Rust preloader,
examples/bench_kafka.rs, writes to the topic) and a training config into a temporary folder, runs
the repository's trainer (`anomalyd-train train`, the public CLI) with few epochs, and moves the
bundle (model.json, model.onnx, report.png) into DIR. Does nothing when DIR already holds a bundle
of the same name, F and W whose model.onnx matches its sha256.

The model only has to be the right shape and sane (it learns the sine waves in a few epochs); the
benchmark measures throughput, not detection quality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERIES = 20
ROWS = 1500
T0 = 1_700_000_000  # ts of row 0, unix seconds
EPOCHS = 4
# Bounds the epoch time on a 2-core machine: ~8k windows x 4 epochs trains in well under a minute.
MAX_TRAIN_WINDOWS = 8000


def value(i: int, j: int, k: int) -> float:
    """Row i of series s{j}, feature f{k}: a phase-shifted sine per series, a level per feature, and
    a small deterministic ripple. Must stay identical to the preloader's formula."""
    return (math.sin(2 * math.pi * (i + 7 * j) / 60 + k) + 0.5 * k
            + 0.05 * (((i * 31 + j * 17 + k * 13) % 101) / 101 - 0.5))


def payload(i: int, j: int, features: int) -> str:
    """The Kafka payload of row i of series s{j}: `ts;f0;...;f{F-1}`, 4 decimals."""
    return ";".join([str(T0 + i), *(f"{value(i, j, k):.4f}" for k in range(features))])


def name(features: int, window: int) -> str:
    return f"bench-convae-f{features}-w{window}"


def write_training_csv(path: Path, features: int, series: int = SERIES, rows: int = ROWS) -> None:
    """Columns ts;series;f0..; rows interleaved by time as on the topic (the trainer sorts anyway)."""
    with open(path, "w") as f:
        f.write(";".join(["ts", "series", *(f"f{k}" for k in range(features))]) + "\n")
        for i in range(rows):
            for j in range(series):
                ts, *values = payload(i, j, features).split(";")
                f.write(";".join([ts, f"s{j}", *values]) + "\n")


def config_toml(features: int, window: int) -> str:
    feature_list = ", ".join(f'"f{k}"' for k in range(features))
    return f"""\
# Written by bench/make_model.py; paths are relative to this file.
[data]
paths = ["train.csv"]
csv_delimiter = ";"
timestamp_column = "ts"
timestamp_format = "unix_s"
series_columns = ["series"]
feature_columns = [{feature_list}]

[window]
length = {window}
stride = 1

[model]
kind = "conv_ae"

[train]
epochs = {EPOCHS}
patience = {EPOCHS}
max_train_windows = {MAX_TRAIN_WINDOWS}

[export]
name = "{name(features, window)}"
"""


def up_to_date(out: Path, features: int, window: int) -> bool:
    try:
        meta = json.loads((out / "model.json").read_text())
        onnx_sha = hashlib.sha256((out / meta["onnx"]["file"]).read_bytes()).hexdigest()
    except (OSError, ValueError, KeyError):
        return False
    return (meta.get("name") == name(features, window) and meta.get("model_kind") == "conv_ae"
            and meta["window"]["length"] == window and len(meta["features"]) == features
            and meta["onnx"]["sha256"] == onnx_sha)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=4, help="F, feature columns f0..f{F-1}")
    p.add_argument("--window", type=int, default=64, help="W, rows per window")
    p.add_argument("--out", required=True, type=Path, help="bundle folder")
    args = p.parse_args(argv)
    if args.features < 1 or args.window < 2 or args.window > ROWS // 4:
        p.error(f"need --features >= 1 and 2 <= --window <= {ROWS // 4}")
    if up_to_date(args.out, args.features, args.window):
        print(f"make_model: {args.out} already holds {name(args.features, args.window)}")
        return 0

    started = time.monotonic()
    trainer = Path(sys.executable).with_name("anomalyd-train")
    with tempfile.TemporaryDirectory(prefix="anomalyd-bench-model-") as tmp:
        tmp = Path(tmp)
        write_training_csv(tmp / "train.csv", args.features)
        (tmp / "config.toml").write_text(config_toml(args.features, args.window))
        cmd = [str(trainer), "train", "--config", str(tmp / "config.toml"), "--runs-dir", str(tmp / "runs"),
               "--out-dir", str(tmp / "models"), "--quiet"]
        # The trainer's summary line goes to our stderr: bench scripts keep our stdout for the folder.
        done = subprocess.run(cmd, stdout=sys.stderr)
        if done.returncode != 0:
            print(f"make_model: {' '.join(cmd)} failed with exit code {done.returncode}", file=sys.stderr)
            return done.returncode
        # Replace the folder's files only once the new bundle is complete.
        args.out.mkdir(parents=True, exist_ok=True)
        for f in sorted((tmp / "models" / name(args.features, args.window)).iterdir()):
            shutil.move(str(f), args.out / f.name)
    print(f"make_model: {name(args.features, args.window)} in {args.out} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
