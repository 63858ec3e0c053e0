"""Shared fixtures: small synthetic metric series written as real files, and tiny training configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO.parent / "shared" / "datasets"


def write_series_csv(path: Path, rows: int = 600, series: int = 2, seed: int = 0, anomaly_at: int | None = None,
                     delimiter: str = ",") -> Path:
    """Two sines and a noisy level per series, 1 s apart; optional level shift + spike from `anomaly_at`."""
    rng = np.random.default_rng(seed)
    lines = [delimiter.join(["ts", "host", "cpu", "mem", "lat", "label"])]
    for s in range(series):
        t = np.arange(rows)
        cpu = 50 + 10 * np.sin(2 * np.pi * t / 40 + s) + rng.normal(0, 1, rows)
        mem = 30 + 5 * np.cos(2 * np.pi * t / 25 + s) + rng.normal(0, 0.5, rows)
        lat = 10 + rng.normal(0, 1, rows)
        label = np.zeros(rows, dtype=int)
        if anomaly_at is not None:
            cpu[anomaly_at: anomaly_at + 30] += 40
            lat[anomaly_at + 10: anomaly_at + 20] *= 4
            label[anomaly_at: anomaly_at + 30] = 1
        for i in range(rows):
            lines.append(delimiter.join([str(1_700_000_000 + i), f"h{s}", f"{cpu[i]:.4f}", f"{mem[i]:.4f}",
                                         f"{lat[i]:.4f}", str(label[i])]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(path: Path, data_path: Path, **sections) -> Path:
    """A training config for the synthetic CSV; `sections` override whole keys, e.g. window={"length": 8}."""
    base = {
        "data": {"paths": [str(data_path)], "timestamp_column": "ts", "timestamp_format": "unix_s",
                 "series_columns": ["host"], "feature_columns": ["cpu", "mem", "lat"], "label_column": "label"},
        "window": {"length": 16, "stride": 2},
        "model": {"kind": "conv_ae", "channels": [16, 8], "kernel_size": 5},
        "train": {"epochs": 15, "batch_size": 64, "patience": 15},
        "calibration": {"min_excesses": 5},
        "export": {"name": "tiny", "parity_batches": 6},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)

    def value(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    text = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in kv.items()) + "\n"
                     for s, kv in base.items())
    path.write_text(text)
    return path


@pytest.fixture
def series_csv(tmp_path: Path) -> Path:
    return write_series_csv(tmp_path / "train.csv")


@pytest.fixture
def tiny_config(tmp_path: Path, series_csv: Path) -> Path:
    return write_config(tmp_path / "tiny.toml", series_csv)
