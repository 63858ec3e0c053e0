"""Training, top to bottom: data → splits → scaler → windows → model → calibration scores → thresholds.

Splits are by time within each series, made before windowing, so no window straddles two splits.
The calibration scores come from windows no model that scored them was trained on, in one of two
ways (docs/model-contract.md §4):

- holdout: train head | validation (early stopping) | calibration tail. The shipped model is the
  one trained on the head; the tail's scores set the threshold.
- cross-fit, when the tail would hold too few windows for a threshold: a first run on
  train head | validation finds the number of epochs; each series is cut into K time blocks and
  for each block a model (scaler included) is trained on the other blocks and scores it; the
  shipped model is trained on every row for the same number of epochs. Out-of-fold scores come
  from models that saw less data than the shipped one, so the threshold errs on the high side.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .calibrate import CalibrationError, Thresholds
from .config import Config, constant_policy
from .data import (
    SERIES,
    TS,
    Preprocessor,
    Table,
    Windows,
    apply_nan_policy,
    gather_windows,
    load_table,
    segment_ids,
    split_parts,
    time_blocks,
    window_ends,
)
from .errors import InputError
from .model import build_model, score_floor, scorer_for

PART_NAMES = ("train", "val", "calib")


@dataclass
class Prepared:
    """Scaled rows of a table and their windows."""

    table: Table
    rows: np.ndarray  # (N, F) float32, scaled
    windows: Windows
    unknown_categories: int


@dataclass
class Fitted:
    """One trained detector with the scaler it was trained behind."""

    preprocessor: Preprocessor
    model: object  # the torch model, or a baseline (evaluate.PCABaseline)
    score: Callable[[np.ndarray], np.ndarray]  # raw scores of (N, W, F) windows
    history: list[dict]
    best_epoch: int
    prepared: Prepared  # the whole table's windows, cut at `part` borders and scaled by this preprocessor
    part: np.ndarray  # per row

    def scores_of(self, ids) -> np.ndarray:
        """Scores of the windows whose rows are in these parts."""
        return self.score(_windows_of(self.prepared, self.part, ids).x)


# fit(part, train_ids, val_id, epochs, seed) → Fitted: how one detector is trained.
FitFn = Callable[..., Fitted]


@dataclass
class Calibrated:
    """The detector to ship and the out-of-sample normal scores that set its threshold."""

    main: Fitted  # trained on the train head with early stopping (its history is the one reported)
    final: Fitted  # what ships: `main` (holdout), or trained on every row (cross-fit)
    scores: np.ndarray
    source: dict
    counts: dict[str, int]
    part: np.ndarray  # train | val (| calib) per row


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
    windows = gather_windows(rows, ends, cfg.window.length)
    pre.center(windows.x)
    return Prepared(table, rows, windows, unknown)


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


def _windows_of(prepared: Prepared, part: np.ndarray, ids) -> Windows:
    keep = np.isin(part[prepared.windows.end_row], list(ids))
    return Windows(prepared.windows.x[keep], prepared.windows.end_row[keep])


def fit_scaler(cfg: Config, table: Table, part: np.ndarray, train_ids) -> tuple[Preprocessor, Prepared]:
    """The scaler fitted on the rows whose `part` is in `train_ids`, and the table's windows it scales."""
    rows = np.isin(part, list(train_ids))
    pre = Preprocessor.fit(table.frame[rows], table.numeric, table.categorical, cfg.data.log1p_columns,
                           cfg.data.center_columns, constant_policy(cfg), ", ".join(table.files))
    return pre, prepare(table, pre, cfg, part)


def fit(cfg: Config, table: Table, part: np.ndarray, train_ids=(0,), val_id: int | None = None,
        epochs: int | None = None, seed: int | None = None, desc: str = "", progress: bool = False) -> Fitted:
    """Scaler and model trained on the rows whose `part` is in `train_ids`.

    With `val_id`, training stops early on the validation loss of those rows' windows and keeps the
    best epoch; without, it runs `epochs` epochs (default `[train].epochs`) and keeps the last.
    """
    seed = cfg.train.seed if seed is None else seed
    seed_everything(seed)
    pre, prepared = fit_scaler(cfg, table, part, train_ids)
    x_train = _windows_of(prepared, part, train_ids).x
    rng = np.random.default_rng(seed)
    if len(x_train) > cfg.train.max_train_windows:
        x_train = x_train[np.sort(rng.choice(len(x_train), cfg.train.max_train_windows, replace=False))]

    device = pick_device(cfg.train.device)
    model = build_model(cfg.model.kind, len(pre.columns), cfg.window.length, cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    xt = torch.from_numpy(x_train).to(device)
    xv = torch.from_numpy(_windows_of(prepared, part, [val_id]).x).to(device) if val_id is not None else None
    gen = torch.Generator().manual_seed(seed)

    history: list[dict] = []
    best = (float("inf"), 0, None)
    bar = tqdm(range(1, (epochs or cfg.train.epochs) + 1), desc=desc, unit="epoch", disable=not progress)
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
        record = {"epoch": epoch, "train_loss": total / len(xt)}
        if xv is None:
            history.append(record)
            continue
        record["val_loss"] = _mean_loss(model, xv, 4096)
        history.append(record)
        bar.set_postfix(train=f"{record['train_loss']:.4g}", val=f"{record['val_loss']:.4g}")
        if record["val_loss"] < best[0]:
            best = (record["val_loss"], epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= cfg.train.patience:
            break
    if xv is not None:
        model.load_state_dict(best[2])
    model.eval()
    model.fit_normal(xt)
    scorer = scorer_for(cfg.model, model)
    return Fitted(pre, model, lambda x: score_windows(scorer, x)[0], history,
                  best[1] if xv is not None else len(history), prepared, part)


def _window_parts(table: Table, cfg: Config, part: np.ndarray) -> np.ndarray:
    """The part of every window's rows (windows are cut at part borders), without scaling anything."""
    f = table.frame
    seg = segment_ids(f[SERIES].to_numpy(), f[TS].to_numpy(), cfg.window.max_gap_secs, part)
    return part[window_ends(seg, cfg.window.length, cfg.window.stride)]


def calibrate(cfg: Config, table: Table, fit_fn: FitFn) -> Calibrated:
    """Train a detector with `fit_fn` and get out-of-sample normal scores for its threshold (module doc)."""
    series = table.frame[SERIES].to_numpy()
    W, c = cfg.window.length, cfg.calibration
    files = ", ".join(table.files)

    def split(val_fraction: float, calib_fraction: float, **kw) -> tuple[np.ndarray, dict[str, int]]:
        part = split_parts(series, val_fraction, calib_fraction, **kw)
        ends = _window_parts(table, cfg, part)
        return part, {name: int(np.sum(ends == i)) for i, name in enumerate(PART_NAMES)}

    part, counts = split(cfg.train.val_fraction, cfg.train.calib_fraction)
    if c.source == "holdout" or (c.source == "auto" and counts["calib"] >= c.min_holdout_windows):
        needed = PART_NAMES
        source = {"kind": "holdout", "calib_fraction": cfg.train.calib_fraction}
    else:
        # No calibration tail: the validation tail only picks the number of epochs.
        part, counts = split(cfg.train.val_fraction, 0.0, min_rows=W + 7)
        needed = PART_NAMES[:2]
    for name in needed:
        if counts[name] == 0:
            raise InputError(f"too few rows for one window (W={W}) in the {name} split; add data or shorten "
                             "[window].length", file=files)
    main = fit_fn(part, [0], 1)
    if len(needed) == 3:
        return Calibrated(main, main, main.scores_of([2]), source, counts, part)

    blocks = time_blocks(series, c.folds, min_rows=4 * W)
    k = int(blocks.max()) + 1
    scores = np.concatenate([
        fit_fn(blocks, [b for b in range(k) if b != i], epochs=main.best_epoch, seed=cfg.train.seed + 1 + i)
        .scores_of([i]) for i in range(k)])
    final = fit_fn(np.zeros(len(series), dtype=np.int8), [0], epochs=main.best_epoch)
    source = {"kind": "cross_fit", "folds": k, "epochs": main.best_epoch}
    counts = {"train": int(len(final.prepared.windows.x)), "val": counts["val"], "calib": int(len(scores))}
    return Calibrated(main, final, scores, source, counts, part)


def train(cfg: Config, progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    table = apply_nan_policy(load_table(cfg), cfg.window.nan_policy)
    W = cfg.window.length
    lengths = table.frame.groupby(SERIES, sort=False).size()
    if (lengths < W).all():
        raise InputError(f"too few rows for one window: the longest series has {int(lengths.max())} rows, "
                         f"the window needs {W}", file=", ".join(table.files))

    desc = f"train {cfg.export.name}"

    def fit_fn(part, train_ids, val_id=None, epochs=None, seed=None):
        shown = val_id is not None  # the progress bar follows the run with early stopping
        return fit(cfg, table, part, train_ids, val_id, epochs, seed, desc, progress and shown)

    cal = calibrate(cfg, table, fit_fn)
    final = cal.final
    floor = score_floor(cfg.model, W, len(final.preprocessor.columns))
    try:
        thresholds = Thresholds(cfg.calibration).fit(cal.scores, cal.source, floor)
    except CalibrationError as e:
        raise InputError(f"{e}; add normal data or shorten [window].length", file=", ".join(table.files)) from None

    # Validation windows, scaled as the shipped model scales them: for the parity check and the report.
    val = _windows_of(prepare(table, final.preprocessor, cfg, cal.part), cal.part, [1])
    summary = _summary(table, bool(cfg.data.timestamp_column) or cfg.data.format == "goflow2", cal.counts)
    return TrainResult(cfg, final.model, final.preprocessor, thresholds, cal.main.history, cal.main.best_epoch,
                       {"val": val}, cal.scores, summary, time.perf_counter() - started)
