"""Run folders: `runs/<name>/{checkpoint.pt, config.json, args.txt, history.json}`.

A run holds everything `export` needs to write the bundle again without retraining: weights,
fitted scaler and thresholds, loss history, data summary and a sample of validation windows (for
the ONNX parity check and the report).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .calibrate import Thresholds
from .config import config_from_dict
from .data import Preprocessor, Windows
from .errors import InputError
from .model import build_model
from .train import TrainResult

KEEP_VAL_WINDOWS = 2000


def save_run(result: TrainResult, runs_dir: Path, argv: list[str]) -> Path:
    cfg = result.cfg
    run_dir = runs_dir / cfg.export.name
    run_dir.mkdir(parents=True, exist_ok=True)
    val = result.splits["val"]
    torch.save({
        "config": cfg.to_dict(),
        "state_dict": {k: v.cpu() for k, v in result.model.state_dict().items()},
        "preprocess": result.preprocessor.columns,
        "thresholds": result.thresholds.fitted,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "val_x": torch.from_numpy(val.x[:KEEP_VAL_WINDOWS]),
        "calib_scores": torch.from_numpy(result.calib_scores),
        "summary": result.summary,
        "seconds": result.seconds,
    }, run_dir / "checkpoint.pt")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (run_dir / "args.txt").write_text(" ".join(["anomalyd-train", *argv]) + "\n")
    (run_dir / "history.json").write_text(json.dumps(result.history, indent=1) + "\n")
    return run_dir


def load_run(run_dir: Path) -> TrainResult:
    path = run_dir / "checkpoint.pt"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise InputError(f"not a run checkpoint: {e}", file=path) from None
    cfg = config_from_dict(ck["config"], str(path))
    pre = Preprocessor(ck["preprocess"])
    model = build_model(cfg.model.kind, len(pre.columns), cfg.window.length, cfg.model)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    thresholds = Thresholds(cfg.calibration, ck["thresholds"])
    val_x = ck["val_x"].numpy()
    splits = {"val": Windows(val_x, torch.arange(len(val_x)).numpy())}
    return TrainResult(cfg, model, pre, thresholds, ck["history"], ck["best_epoch"], splits,
                       ck["calib_scores"].numpy(), ck["summary"], ck["seconds"])
