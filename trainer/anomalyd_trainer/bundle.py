"""Bundles: export a trained model to `models/<name>/{model.onnx, model.json, report.png}` and load one back.

A loaded `Bundle` scores with onnxruntime only — the same path the daemon takes — so evaluation
and golden vectors measure what ships, not the PyTorch model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import __version__
from .config import Config, config_from_dict
from .data import SERIES, TS, Preprocessor, Table, apply_nan_policy, load_table
from .errors import ExportError, InputError
from .model import OUTPUTS, multiply_adds, score_kind, scorer_for
from .train import TrainResult, prepare

SCHEMA_VERSION = 1


def export_onnx(scorer: torch.nn.Module, kind: str, window: int, n_features: int, path: Path, opset: int) -> list[str]:
    outputs = OUTPUTS[kind]
    dummy = torch.zeros(2, window, n_features)
    torch.onnx.export(
        scorer, (dummy,), str(path), input_names=["window"], output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in ["window", *outputs]},
        opset_version=opset, dynamo=False,
    )
    return outputs


def parity_check(scorer: torch.nn.Module, onnx_path: Path, real: np.ndarray, trials: int, seed: int) -> dict:
    """PyTorch against onnxruntime over random batch sizes of real and random windows.

    `max_abs_error` is the largest difference of any output value; `max_error` the same, each output
    divided by its own scale (its largest magnitude, at least 1): float32 keeps about 7 digits, so
    scores around 1e5 (byte counts far outside the training range) differ by 1e-2 without anything wrong.
    """
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = {"max_abs_error": 0.0, "max_error": 0.0}
    for trial in range(trials):
        size = int(rng.integers(1, 257))
        if trial % 2 == 0 and len(real):
            x = real[rng.integers(0, len(real), size)]
        else:
            x = rng.standard_normal((size, *real.shape[1:])).astype(np.float32)
        with torch.no_grad():
            expected = [t.numpy() for t in scorer(torch.from_numpy(x))]
        got = sess.run(None, {"window": x})
        for a, b in zip(expected, got, strict=True):
            diff = float(np.max(np.abs(a - b)))
            worst["max_abs_error"] = max(worst["max_abs_error"], diff)
            worst["max_error"] = max(worst["max_error"], diff / max(1.0, float(np.max(np.abs(a)))))
    return worst


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_keys(cfg: Config) -> dict:
    """Where a record's event time and series key come from; flow features carry their own."""
    if cfg.data.format == "goflow2":
        return {"timestamp": {"column": "bucket_start", "format": "unix_s"}, "series_columns": ["host"]}
    timestamp = cfg.data.timestamp_column
    return {"timestamp": {"column": timestamp, "format": cfg.data.timestamp_format} if timestamp else None,
            "series_columns": cfg.data.series_columns}


def write_bundle(result: TrainResult, out_dir: Path, max_error: float = 1e-4) -> dict:
    cfg = result.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = scorer_for(cfg.model, copy.deepcopy(result.model).cpu())
    W, F = cfg.window.length, len(result.preprocessor.columns)
    onnx_path = out_dir / "model.onnx"
    outputs = export_onnx(scorer, cfg.model.kind, W, F, onnx_path, cfg.export.opset)
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    parity = parity_check(scorer, onnx_path, result.splits["val"].x, cfg.export.parity_batches, cfg.train.seed)
    if not parity["max_error"] < max_error:
        raise ExportError(f"onnxruntime differs from PyTorch by {parity['max_error']:.3g} of the scores' scale "
                          f"(limit {max_error:g}); the exported graph does not compute what was trained",
                          file=onnx_path)

    kind = cfg.model.kind
    meta = {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.export.name,
        "model_kind": kind,
        "score_kind": score_kind(cfg.model),
        "onnx": {
            "file": "model.onnx",
            "opset": cfg.export.opset,
            "sha256": None,  # set after the metadata_props are written
            "inputs": [{"name": "window", "shape": ["batch", W, F], "dtype": "float32"}],
            "outputs": [{"name": n, "shape": ["batch"] if n == "score" else ["batch", F if n == "feature_scores"
                                                                           else cfg.model.latent_dim],
                         "dtype": "float32"} for n in outputs],
        },
        "window": {"length": W, "stride": cfg.window.stride, "max_gap_secs": cfg.window.max_gap_secs,
                   "nan_policy": cfg.window.nan_policy},
        "features": result.preprocessor.names,
        "preprocess": {"columns": result.preprocessor.columns, **_record_keys(cfg)},
        "thresholds": result.thresholds.fitted,
        "training_data": result.summary,
        "training_config": cfg.to_dict(),
        "validation": {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "train_loss": result.history[result.best_epoch - 1]["train_loss"],
            "val_loss": result.history[result.best_epoch - 1]["val_loss"],
            "calibration_scores": {k: float(getattr(np, k)(result.calib_scores)) for k in ("mean", "median", "max")},
            "onnx_max_abs_error": parity["max_abs_error"],
            "onnx_max_error": parity["max_error"],
            "multiply_adds": multiply_adds(scorer, W, F),
            "training_seconds": round(result.seconds, 2),
        },
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "trainer_version": __version__,
    }
    props = {
        "anomalyd.schema_version": str(SCHEMA_VERSION), "anomalyd.name": meta["name"],
        "anomalyd.model_kind": kind, "anomalyd.score_kind": meta["score_kind"],
        "anomalyd.window_length": str(W), "anomalyd.stride": str(cfg.window.stride),
        "anomalyd.features": json.dumps(meta["features"]), "anomalyd.threshold": repr(result.thresholds.value),
        "anomalyd.trainer_version": __version__, "anomalyd.created_at": meta["created_at"],
    }
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "anomalyd-train"
    proto.doc_string = f"anomalyd {kind} scorer: window [batch, {W}, {F}] float32 -> {', '.join(outputs)}"
    onnx.save(proto, str(onnx_path))
    meta["onnx"]["sha256"] = _sha256(onnx_path)
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# === Loading ===


class Bundle:
    """A bundle read back from disk, scoring through onnxruntime."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "model.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"not a model bundle: {e}", file=self.path / "model.json") from None
        if self.meta.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"schema_version {self.meta.get('schema_version')!r} is not {SCHEMA_VERSION}",
                             file=self.path / "model.json")
        onnx_path = self.path / self.meta["onnx"]["file"]
        if _sha256(onnx_path) != self.meta["onnx"]["sha256"]:
            raise InputError("model.onnx does not match the sha256 in model.json", file=onnx_path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.cfg: Config = config_from_dict(self.meta["training_config"])
        self.preprocessor = Preprocessor(self.meta["preprocess"]["columns"])
        self.threshold = float(self.meta["thresholds"]["value"])

    @property
    def window(self) -> int:
        return self.meta["window"]["length"]

    def data_config(self, **overrides) -> Config:
        """The training config's data section with the given fields replaced (e.g. other paths)."""
        cfg = config_from_dict(self.meta["training_config"])
        cfg.data = dataclasses.replace(cfg.data, **overrides)
        cfg.window.stride = 1  # the daemon scores every window
        return cfg

    def run(self, x: np.ndarray, batch_size: int = 4096) -> dict[str, np.ndarray]:
        """Every output of the graph (score, feature_scores, and a VAE's mu, logvar) for (N, W, F) windows."""
        outputs = self.session.get_outputs()
        if len(x) == 0:
            return {o.name: np.zeros((0, *o.shape[1:]), np.float32) for o in outputs}
        names = [o.name for o in outputs]
        parts = [self.session.run(names, {"window": x[i: i + batch_size]}) for i in range(0, len(x), batch_size)]
        return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}

    def score_table(self, table: Table, cfg: Config):
        """Windows of a table (stride 1, as the daemon) and their ONNX outputs."""
        table = apply_nan_policy(table, cfg.window.nan_policy)
        prepared = prepare(table, self.preprocessor, cfg)
        return prepared, self.run(prepared.windows.x)


def write_golden(bundle: Bundle, records: Path, out_dir: Path, data_overrides: dict, max_windows: int = 64) -> dict:
    """Golden vectors for the daemon: the raw records, their scaled windows and the ONNX scores."""
    cfg = bundle.data_config(paths=[str(records)], head_rows=0, filter_column="", **data_overrides)
    table = load_table(cfg)
    prepared, outputs = bundle.score_table(table, cfg)
    scores, feats = outputs["score"], outputs["feature_scores"]
    n = min(max_windows, len(scores))
    if n == 0:
        raise InputError(f"too few rows for one window (W={bundle.window})", file=records)
    pick = np.linspace(0, len(scores) - 1, n).round().astype(int)
    f = prepared.table.frame
    ends = prepared.windows.end_row[pick]
    # A file without series columns is one series named by its path; name it by the file alone here.
    series = f[SERIES].astype(str).str.replace(str(records), records.name, regex=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    if records.resolve() != (out_dir / records.name).resolve():
        shutil.copyfile(records, out_dir / records.name)
    golden = {
        "bundle": bundle.meta["name"],
        "model_sha256": bundle.meta["onnx"]["sha256"],
        "records": records.name,
        "data": dataclasses.asdict(cfg.data) | {"paths": [records.name]},
        "windows_total": int(len(scores)),
        "windows": [
            {"index": int(i), "series": series.iat[e], "end_ts": float(f[TS].iat[e]),
             "end_line": int(f["_line"].iat[e]),
             "x": prepared.windows.x[i].tolist(), "score": float(scores[i]),
             "feature_scores": feats[i].tolist(), "anomaly_score": float(scores[i]) / bundle.threshold}
            for i, e in zip(pick, ends, strict=True)
        ],
    }
    (out_dir / "golden.json").write_text(json.dumps(golden) + "\n")
    return golden


