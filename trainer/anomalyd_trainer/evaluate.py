"""Evaluate a bundle on labelled data, next to trivial baselines scored the same way.

Each window is labelled by its last row, the row at which the daemon would score it. Every
detector's threshold comes from its own held-out normal scores (never from these labels):
- the bundle: its calibrated threshold;
- `pca`: PCA reconstruction error of the flattened scaled window, fitted on the bundle's training
  split and calibrated on its calibration split with the same calibration config;
- `random`: uniform random scores, calibrated the same way (so it almost never alarms);
- `always anomalous`: every window is an alarm (the F1 a detector must beat on imbalanced data).
"""

from __future__ import annotations

import glob

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from .bundle import Bundle
from .calibrate import Thresholds
from .errors import InputError
from .data import LABEL, SERIES, apply_nan_policy, load_table, split_parts
from .train import prepare


def operating_point(labels: np.ndarray, alarms: np.ndarray) -> dict:
    tp = int(np.sum(alarms & (labels == 1)))
    fp = int(np.sum(alarms & (labels == 0)))
    fn = int(np.sum(~alarms & (labels == 1)))
    tn = int(np.sum(~alarms & (labels == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "false_alarm_rate": fp / (fp + tn) if fp + tn else 0.0,
            "missed_alarm_rate": fn / (fn + tp) if fn + tp else 0.0,
            "accuracy": (tp + tn) / len(labels), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def metrics(labels: np.ndarray, scores: np.ndarray, alarms: np.ndarray) -> dict:
    both = len(np.unique(labels)) == 2
    return {"roc_auc": float(roc_auc_score(labels, scores)) if both else None,
            "average_precision": float(average_precision_score(labels, scores)) if both else None,
            **operating_point(labels, alarms)}


class PCABaseline:
    """Reconstruction error of flattened windows from the top principal components."""

    def __init__(self, x_train: np.ndarray, variance: float = 0.95):
        flat = x_train.reshape(len(x_train), -1).astype(np.float64)
        self.mean = flat.mean(axis=0)
        _, s, vt = np.linalg.svd(flat - self.mean, full_matrices=False)
        explained = np.cumsum(s**2) / np.sum(s**2)
        self.k = int(np.searchsorted(explained, variance) + 1)
        self.components = vt[: self.k]

    def score(self, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1).astype(np.float64) - self.mean
        recon = flat @ self.components.T @ self.components
        return np.mean((flat - recon) ** 2, axis=1)


def _skip_mask(frame, end_rows: np.ndarray, skip_rows: int) -> np.ndarray:
    """True for windows whose last row is at position >= skip_rows in its series."""
    series = frame[SERIES].to_numpy()
    starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(series)]))
    return (end_rows - first[end_rows]) >= skip_rows


def evaluate(bundle: Bundle, paths: list[str], label_column: str | None = None, skip_rows: int = 0,
             labels_file: str | None = None, train_paths: list[str] | None = None, seed: int = 0) -> dict:
    overrides = {"paths": paths, "head_rows": 0, "filter_column": ""}
    if label_column:
        overrides["label_column"] = label_column
    if labels_file:
        overrides["labels_file"] = labels_file
    cfg = bundle.data_config(**overrides)
    test = load_table(cfg, with_labels=True)
    prepared, scores, _ = bundle.score_table(test, cfg)
    keep = _skip_mask(prepared.table.frame, prepared.windows.end_row, skip_rows)
    labels = prepared.table.frame[LABEL].to_numpy()[prepared.windows.end_row][keep]
    scores = scores[keep]
    x_test = prepared.windows.x[keep]

    # Baselines are fitted on the bundle's own training data, split exactly as in training.
    train_cfg = bundle.data_config(**({"paths": train_paths} if train_paths else {}))
    for p in train_cfg.data.paths:
        if not glob.glob(p):
            raise InputError(f"the bundle's training data is not here (needed for the baselines); pass --train-data",
                             file=p)
    train_cfg.window.stride = bundle.meta["window"]["stride"]
    train_table = apply_nan_policy(load_table(train_cfg), train_cfg.window.nan_policy)
    part = split_parts(train_table.frame[SERIES].to_numpy(), train_cfg.train.val_fraction,
                       train_cfg.train.calib_fraction)
    tr = prepare(train_table, bundle.preprocessor, train_cfg, part)
    end_part = part[tr.windows.end_row]
    x_fit, x_calib = tr.windows.x[end_part == 0], tr.windows.x[end_part == 2]
    pca = PCABaseline(x_fit[:: max(1, len(x_fit) // 50_000)])
    pca_t = Thresholds(train_cfg.calibration).fit(pca.score(x_calib))
    rng = np.random.default_rng(seed)
    rand_t = Thresholds(train_cfg.calibration).fit(rng.random(len(x_calib)))
    random_scores = rng.random(len(labels))
    pca_scores = pca.score(x_test)

    results = {
        bundle.meta["name"]: metrics(labels, scores, scores / bundle.threshold > 1),
        f"pca (k={pca.k})": metrics(labels, pca_scores, pca_t.normalise(pca_scores) > 1),
        "random": metrics(labels, random_scores, rand_t.normalise(random_scores) > 1),
        "always anomalous": metrics(labels, np.ones(len(labels)), np.ones(len(labels), dtype=bool)),
    }
    return {"windows": int(len(labels)), "anomalous_share": float(labels.mean()) if len(labels) else 0.0,
            "unknown_categories": prepared.unknown_categories, "dropped": dict(prepared.table.dropped),
            "detectors": results}


def format_table(report: dict) -> str:
    cols = ["roc_auc", "average_precision", "precision", "recall", "f1", "false_alarm_rate", "missed_alarm_rate",
            "accuracy"]
    head = ["detector", "ROC-AUC", "AUC-PR", "precision", "recall", "F1", "false-alarm", "missed", "accuracy"]
    width = max(len(k) for k in report["detectors"]) + 2
    lines = [f"{report['windows']} windows, {report['anomalous_share']:.1%} anomalous; "
             f"rows with unseen categories: {report['unknown_categories']}; dropped: {report['dropped'] or 'none'}",
             head[0].ljust(width) + "".join(h.rjust(12) for h in head[1:])]
    for name, m in report["detectors"].items():
        cells = ["-" if m[c] is None else f"{m[c]:.4f}" for c in cols]
        lines.append(name.ljust(width) + "".join(c.rjust(12) for c in cells))
    return "\n".join(lines)
