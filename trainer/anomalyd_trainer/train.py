"""Training, top to bottom: data → splits → scaler → windows → model → thresholds.

Splits are by time within each series (train head, validation, then calibration tail), made
before windowing, so no window straddles two splits and no calibration row was ever trained on.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .calibrate import Thresholds
from .config import Config
from .data import (SERIES, TS, Preprocessor, Table, Windows, apply_nan_policy, gather_windows, load_table,
                   segment_ids, split_parts, window_ends)
from .errors import InputError
from .model import build_model, scorer_for

PART_NAMES = ("train", "val", "calib")


@dataclass
class Prepared:
    """Scaled rows of a table and their windows."""

    table: Table
    rows: np.ndarray  # (N, F) float32, scaled
    windows: Windows
    unknown_categories: int


@dataclass
class TrainResult:
    cfg: Config
    model: torch.nn.Module
    preprocessor: Preprocessor
    thresholds: Thresholds
    history: list[dict]
    best_epoch: int
    splits: dict[str, Windows]
    calib_scores: np.ndarray
    summary: dict
    seconds: float
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prepare(table: Table, pre: Preprocessor, cfg: Config, part: np.ndarray | None = None) -> Prepared:
    """Scale a table and cut its windows (segments also break where `part` changes)."""
    f = table.frame
    rows, unknown = pre.transform(f)
    seg = segment_ids(f[SERIES].to_numpy(), f[TS].to_numpy(), cfg.window.max_gap_secs, part)
    ends = window_ends(seg, cfg.window.length, cfg.window.stride)
    return Prepared(table, rows, gather_windows(rows, ends, cfg.window.length), unknown)


def _summary(table: Table, has_time: bool, counts: dict[str, int]) -> dict:
    f = table.frame
    span = [None, None]
    if has_time and len(f):
        span = [pd.Timestamp(f[TS].min(), unit="s", tz="UTC").isoformat(),
                pd.Timestamp(f[TS].max(), unit="s", tz="UTC").isoformat()]
    return {"rows": int(len(f)), "series": int(f[SERIES].nunique()), "files": table.files,
            "time_start": span[0], "time_end": span[1], "windows": counts, "dropped": dict(table.dropped)}


@torch.no_grad()
def score_windows(scorer: torch.nn.Module, x: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores and feature scores of (N, W, F) windows with the exported scorer."""
    device = next(scorer.parameters()).device
    scores, feats = [], []
    for i in range(0, len(x), batch_size):
        out = scorer(torch.from_numpy(x[i: i + batch_size]).to(device))
        scores.append(out[0].cpu().numpy())
        feats.append(out[1].cpu().numpy())
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, x.shape[2]), np.float32)
    return np.concatenate(scores), np.concatenate(feats)


@torch.no_grad()
def _mean_loss(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size]
        total += model.loss(xb).item() * len(xb)
    return total / len(x)


def train(cfg: Config, progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    seed_everything(cfg.train.seed)
    table = apply_nan_policy(load_table(cfg), cfg.window.nan_policy)
    f = table.frame
    W = cfg.window.length
    short = f.groupby(SERIES, sort=False).size()
    if (short < W).all():
        raise InputError(f"too few rows for one window: the longest series has {int(short.max())} rows, "
                         f"the window needs {W}", file=", ".join(table.files))

    part = split_parts(f[SERIES].to_numpy(), cfg.train.val_fraction, cfg.train.calib_fraction)
    train_rows = f[part == 0]
    pre = Preprocessor.fit(train_rows, table.numeric, table.categorical, cfg.data.log1p_columns,
                           cfg.window.constant_features, ", ".join(table.files))
    prepared = prepare(table, pre, cfg, part)
    end_part = part[prepared.windows.end_row]
    splits = {name: Windows(prepared.windows.x[end_part == i], prepared.windows.end_row[end_part == i])
              for i, name in enumerate(PART_NAMES)}
    for name, w in splits.items():
        if len(w.x) == 0:
            raise InputError(f"too few rows for one window (W={W}) in the {name} split; add data or shorten "
                             "[window].length", file=", ".join(table.files))

    rng = np.random.default_rng(cfg.train.seed)
    x_train = splits["train"].x
    if len(x_train) > cfg.train.max_train_windows:
        x_train = x_train[np.sort(rng.choice(len(x_train), cfg.train.max_train_windows, replace=False))]

    device = pick_device(cfg.train.device)
    model = build_model(cfg.model.kind, len(pre.columns), W, cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    xt = torch.from_numpy(x_train).to(device)
    xv = torch.from_numpy(splits["val"].x).to(device)
    gen = torch.Generator().manual_seed(cfg.train.seed)

    history: list[dict] = []
    best = (float("inf"), 0, None)
    bar = tqdm(range(1, cfg.train.epochs + 1), desc=f"train {cfg.export.name}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(xt), generator=gen).to(device)
        total = 0.0
        for i in range(0, len(xt), cfg.train.batch_size):
            xb = xt[order[i: i + cfg.train.batch_size]]
            loss = model.loss(xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        val = _mean_loss(model, xv, 4096)
        history.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val})
        bar.set_postfix(train=f"{total / len(xt):.4g}", val=f"{val:.4g}")
        if val < best[0]:
            best = (val, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= cfg.train.patience:
            break
    model.load_state_dict(best[2])
    model.eval()

    scorer = scorer_for(cfg.model, model)
    calib_scores, _ = score_windows(scorer, splits["calib"].x)
    thresholds = Thresholds(cfg.calibration).fit(calib_scores)
    summary = _summary(table, bool(cfg.data.timestamp_column) or cfg.data.format == "goflow2",
                       {name: int(len(w.x)) for name, w in splits.items()})
    return TrainResult(cfg, model, pre, thresholds, history, best[1], splits, calib_scores, summary,
                       time.perf_counter() - started)
