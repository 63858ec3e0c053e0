"""SKAB's outlier-detection protocol with the trainer's conv autoencoder.

The published leaderboard trains one detector per experiment file on its first 400 rows and tests
it on the rest, summing the results over all files. This script does exactly that with
`trainer/configs/skab-convae.toml` (any `--set` override applies), calibrating each file's
threshold on the held-out tail of those 400 rows only, and prints the summed metrics next to a
PCA-reconstruction detector and a random score handled the same way.

    .venv/bin/python scripts/skab_protocol.py [--set window.length=16] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from anomalyd_trainer.calibrate import Thresholds
from anomalyd_trainer.config import load_config
from anomalyd_trainer.data import LABEL, load_table, split_parts, SERIES
from anomalyd_trainer.evaluate import PCABaseline, format_table, metrics
from anomalyd_trainer.model import scorer_for
from anomalyd_trainer.train import prepare, score_windows, train

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ROWS = 400
# 400 rows make ~250 training windows: smaller batches and more patience than the default config,
# or early stopping ends training after a handful of optimiser steps.
SMALL_DATA = ["train.batch_size=32", "train.epochs=150", "train.patience=20"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "trainer/configs/skab-convae.toml"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/datasets/skab/data"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--json")
    args = p.parse_args()

    files = sorted(Path(args.data).glob("valve*/*.csv")) + sorted(Path(args.data).glob("other/*.csv"))
    collected = {"model": [], "pca": [], "random": []}
    labels_all = []
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for path in files:
        cfg = load_config(args.config, [*SMALL_DATA, *args.set])
        cfg.data = dataclasses.replace(cfg.data, paths=[str(path)], head_rows=TRAIN_ROWS)
        cfg.export.name = f"skab-{path.parent.name}-{path.stem}"
        result = train(cfg, progress=False)

        test_cfg = load_config(args.config, args.set)
        test_cfg.data = dataclasses.replace(test_cfg.data, paths=[str(path)])
        table = load_table(test_cfg, with_labels=True)
        prepared = prepare(table, result.preprocessor, test_cfg)
        keep = prepared.windows.end_row >= TRAIN_ROWS  # one series per file: row index = position
        x, labels = prepared.windows.x[keep], table.frame[LABEL].to_numpy()[prepared.windows.end_row[keep]]
        scores, _ = score_windows(scorer_for(cfg.model, result.model), x)
        collected["model"].append(result.thresholds.normalise(scores))

        # The PCA baseline sees the same 400 rows, split the same way.
        head = load_table(cfg)
        part = split_parts(head.frame[SERIES].to_numpy(), cfg.train.val_fraction, cfg.train.calib_fraction)
        hp = prepare(head, result.preprocessor, cfg, part)
        end_part = part[hp.windows.end_row]
        pca = PCABaseline(hp.windows.x[end_part == 0])
        collected["pca"].append(Thresholds(cfg.calibration).fit(pca.score(hp.windows.x[end_part == 2]))
                                .normalise(pca.score(x)))
        collected["random"].append(Thresholds(cfg.calibration).fit(rng.random(int((end_part == 2).sum())))
                                   .normalise(rng.random(len(x))))
        labels_all.append(labels)
        print(f"{path.parent.name}/{path.name}: {len(x)} test windows, {labels.mean():.0%} anomalous, "
              f"alarms {np.mean(collected['model'][-1] > 1):.0%}, threshold {result.thresholds.fitted['method']}, "
              f"{result.seconds:.1f} s", flush=True)

    labels = np.concatenate(labels_all)
    detectors = {}
    for name, parts in collected.items():
        s = np.concatenate(parts)  # normalised, so files are comparable: 1.0 is each file's threshold
        detectors[name] = metrics(labels, s, s > 1)
    detectors["always anomalous"] = metrics(labels, np.ones(len(labels)), np.ones(len(labels), dtype=bool))
    report = {"windows": int(len(labels)), "anomalous_share": float(labels.mean()), "unknown_categories": 0,
              "dropped": {}, "detectors": detectors, "files": len(files),
              "seconds": round(time.perf_counter() - started, 1)}
    print(format_table(report))
    print(f"{len(files)} files, {report['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
