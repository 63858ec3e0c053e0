"""Evaluate a bundle on labelled data, next to trivial baselines scored the same way.

Each window is labelled by its last row, the row at which the daemon would score it. Every
detector's threshold comes from its own out-of-sample normal scores (never from these labels):
- the bundle: its calibrated threshold;
- `pca`: PCA reconstruction error of the flattened scaled window, trained on the bundle's training
  data and calibrated by the same procedure (`train.calibrate`: holdout tail or cross-fit) and
  calibration config as the bundle;
- `random`: uniform random scores, calibrated on as many random scores (so it alarms at about the
  calibrated false-alarm rate);
- `always anomalous`: every window is an alarm (the F1 a detector must beat on imbalanced data).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from .bundle import Bundle
from .calibrate import Thresholds
from .config import Config
from .data import LABEL, SERIES, Table, apply_nan_policy, load_table
from .errors import InputError
from .model import MIN_DEVIATION
from .train import Fitted, calibrate, fit_scaler, prepare


def operating_point(labels: np.ndarray, alarms: np.ndarray) -> dict:
    tp = int(np.sum(alarms & (labels == 1)))
    fp = int(np.sum(alarms & (labels == 0)))
    fn = int(np.sum(~alarms & (labels == 1)))
    tn = int(np.sum(~alarms & (labels == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    # SKAB's core/metrics.py writes F1 as TP / (TP + (FN + FP) / 2): the same number.
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


def pca_fit_fn(cfg: Config, table: Table):
    """A `train.FitFn` for the PCA baseline: its own scaler and components on the training rows."""

    def fit_fn(part, train_ids, val_id=None, epochs=None, seed=None) -> Fitted:
        pre, prepared = fit_scaler(cfg, table, part, train_ids)
        x = prepared.windows.x[np.isin(part[prepared.windows.end_row], list(train_ids))]
        pca = PCABaseline(x[:: max(1, len(x) // 50_000)])
        return Fitted(pre, pca, pca.score, [], 0, prepared, part)

    return fit_fn


def _skip_mask(frame, end_rows: np.ndarray, skip_rows: int) -> np.ndarray:
    """True for windows whose last row is at position >= skip_rows in its series."""
    series = frame[SERIES].to_numpy()
    starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(series)]))
    return (end_rows - first[end_rows]) >= skip_rows


@dataclass
class Scored:
    """Test windows' labels and every detector's normalised scores (1.0 = its own threshold)."""

    labels: np.ndarray
    scores: dict[str, np.ndarray]  # "model", "pca", "random"
    pca_k: int
    info: dict
    mu: np.ndarray | None = None  # the VAE's latent means of the test windows
    # Detectors whose alarms are not "score > 1" (the daemon's alert policy): key -> alarms.
    alarms: dict[str, np.ndarray] = field(default_factory=dict)


def score_detectors(bundle: Bundle, paths: list[str], label_column: str | None = None, skip_rows: int = 0,
                    labels_file: str | None = None, train_paths: list[str] | None = None, seed: int = 0) -> Scored:
    overrides = {"paths": paths, "head_rows": 0, "filter_column": ""}
    if label_column:
        overrides["label_column"] = label_column
    if labels_file:
        overrides["labels_file"] = labels_file
    cfg = bundle.data_config(**overrides)
    test = apply_nan_policy(load_table(cfg, with_labels=True), cfg.window.nan_policy)
    prepared = prepare(test, bundle.preprocessor, cfg)
    keep = _skip_mask(prepared.table.frame, prepared.windows.end_row, skip_rows)
    x_test = prepared.windows.x[keep]
    outputs = bundle.run(x_test)
    labels = prepared.table.frame[LABEL].to_numpy()[prepared.windows.end_row][keep]

    # Baselines are trained on the bundle's own training data, and calibrated as it was.
    train_cfg = bundle.data_config(**({"paths": train_paths} if train_paths else {}))
    for p in train_cfg.data.paths:
        if not glob.glob(p):
            raise InputError("the bundle's training data is not here (needed for the baselines); pass --train-data",
                             file=p)
    train_cfg.window.stride = bundle.meta["window"]["stride"]
    train_table = apply_nan_policy(load_table(train_cfg), train_cfg.window.nan_policy)
    cal = calibrate(train_cfg, train_table, pca_fit_fn(train_cfg, train_table))
    pca_t = Thresholds(train_cfg.calibration).fit(cal.scores, cal.source, MIN_DEVIATION**2)
    pca_scores = cal.final.score(prepare(test, cal.final.preprocessor, cfg).windows.x[keep])
    rng = np.random.default_rng(seed)
    rand_t = Thresholds(train_cfg.calibration).fit(rng.random(bundle.meta["thresholds"]["calibration_windows"]))
    return Scored(labels, {"model": outputs["score"] / bundle.threshold, "pca": pca_t.normalise(pca_scores),
                           "random": rand_t.normalise(rng.random(len(labels)))},
                  cal.final.model.k, {"unknown_categories": prepared.unknown_categories,
                                      "dropped": dict(prepared.table.dropped)}, outputs.get("mu"))


def report(scored: Scored, model_name: str) -> dict:
    """Metrics of every detector at its threshold (normalised score > 1), and threshold-free."""
    y, s = scored.labels, scored.scores
    detectors = {model_name: metrics(y, s["model"], s["model"] > 1),
                 f"pca (k={scored.pca_k})": metrics(y, s["pca"], s["pca"] > 1),
                 "random": metrics(y, s["random"], s["random"] > 1),
                 "always anomalous": metrics(y, np.ones(len(y)), np.ones(len(y), dtype=bool))}
    return {"windows": int(len(y)), "anomalous_share": float(y.mean()) if len(y) else 0.0, **scored.info,
            "detectors": detectors}


def evaluate(bundle: Bundle, paths: list[str], label_column: str | None = None, skip_rows: int = 0,
             labels_file: str | None = None, train_paths: list[str] | None = None, seed: int = 0) -> dict:
    scored = score_detectors(bundle, paths, label_column, skip_rows, labels_file, train_paths, seed)
    return report(scored, bundle.meta["name"])


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
