"""Records → validated table → scaled feature rows → windows, per docs/model-contract.md.

The daemon (src/window.rs) implements the same steps on a stream; keep the two in step.

Every bad value raises `InputError` naming the file, the line (or Parquet row) and the column, so
the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config, DataConfig
from .errors import InputError
from .flows import FLOW_FEATURES, load_flow_series

# Meta columns carried next to the data columns.
SERIES, TS, FILE, LINE, LABEL = "_series", "_ts", "_file", "_line", "_label"
MISSING_TEXT = {"", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A"}


def expand_paths(data: DataConfig, paths: list[str] | None = None) -> list[Path]:
    out: list[Path] = []
    for p in paths if paths is not None else data.paths:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise InputError("no file matches this pattern", file=p)
        out.extend(Path(m) for m in matches)
    if not out:
        raise InputError("no input files", location="[data].paths")
    return out


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    return {".csv": "csv", ".txt": "csv", ".parquet": "parquet", ".ndjson": "ndjson", ".jsonl": "ndjson"}.get(
        suffix, "csv"
    )


def _read_raw(path: Path, data: DataConfig) -> tuple[pd.DataFrame, int, str]:
    """Read one file as strings (CSV) or native values. Returns (frame, first data line, unit)."""
    fmt = _detect_format(path, data.format)
    try:
        if fmt == "csv":
            df = pd.read_csv(
                path,
                sep=data.csv_delimiter,
                header=0 if data.csv_header else None,
                names=None if data.csv_header else data.column_names,
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=False,
            )
            return df, 2 if data.csv_header else 1, "line"
        if fmt == "parquet":
            return pd.read_parquet(path), 1, "row"
        if fmt == "ndjson":
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, text in enumerate(f, 1):
                    if not text.strip():
                        continue
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise InputError(f"not valid JSON: {e.msg}", file=path, location=f"line {n}") from None
                    if not isinstance(obj, dict):
                        raise InputError("not a JSON object", file=path, location=f"line {n}")
                    obj[LINE] = n
                    rows.append(obj)
            df = pd.DataFrame(rows)
            return df, 0, "line"
        if fmt == "goflow2":
            df = load_flow_series(path, data.flow_bucket_secs)
            return df, 0, "bucket"
    except InputError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read file: {getattr(e, 'strerror', None) or e}", file=path) from None
    except (pd.errors.ParserError, ValueError) as e:
        raise InputError(f"cannot parse as {fmt}: {str(e).splitlines()[0]}", file=path) from None
    raise InputError(f"unknown format {fmt!r}", file=path, location="[data].format")


def _location(df: pd.DataFrame, i: int, first_line: int, unit: str) -> str:
    if LINE in df.columns:
        return f"line {int(df[LINE].iloc[i])}"
    return f"{unit} {i + first_line}"


def _to_float(df: pd.DataFrame, col: str, path: Path, first_line: int, unit: str) -> np.ndarray:
    """Numeric column → float64; missing/NaN/inf stay NaN/inf; anything else is an error."""
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce")
    failed = values.isna() & ~raw.isna()
    if not pd.api.types.is_numeric_dtype(raw):
        failed &= ~raw.astype(str).str.strip().isin(MISSING_TEXT)
    if failed.any():
        i = int(np.flatnonzero(failed.to_numpy())[0])
        raise InputError(f"not a number: {raw.iloc[i]!r}", file=path, location=_location(df, i, first_line, unit),
                         column=col)
    return values.to_numpy(dtype=np.float64)


def _parse_timestamps(df: pd.DataFrame, data: DataConfig, path: Path, first_line: int, unit: str) -> np.ndarray:
    """→ float64 unix seconds."""
    col = data.timestamp_column
    fmt = data.timestamp_format
    if fmt in ("unix_s", "unix_ms", "unix_ns"):
        scale = {"unix_s": 1.0, "unix_ms": 1e-3, "unix_ns": 1e-9}[fmt]
        ts = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64) * scale
        bad = ~np.isfinite(ts)
    else:
        raw = df[col].astype(str)
        parsed = pd.to_datetime(raw, format=None if fmt == "auto" else fmt, errors="coerce", utc=True)
        bad = parsed.isna().to_numpy()
        ts = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"not a timestamp ({fmt}): {df[col].iloc[i]!r}", file=path,
                         location=_location(df, i, first_line, unit), column=col)
    return ts


def is_anomalous_label(values: pd.Series, normal_labels: list[str]) -> np.ndarray:
    text = values.astype(str).str.strip()
    return (~text.isin(set(normal_labels))).to_numpy(dtype=np.int8)


@dataclass
class Table:
    """Validated rows of all files, ordered by series then time."""

    frame: pd.DataFrame
    numeric: list[str]
    categorical: list[str]
    dropped: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)


def feature_columns(data: DataConfig) -> list[str]:
    if data.format == "goflow2" and not data.feature_columns:
        return list(FLOW_FEATURES)
    return list(data.feature_columns)


def load_table(cfg: Config, paths: list[str] | None = None, with_labels: bool = False) -> Table:
    """Read, validate and order every input file (config paths unless `paths` is given)."""
    data = cfg.data
    numeric = feature_columns(data)
    categorical = list(data.categorical_columns)
    frames = []
    dropped: Counter = Counter()
    files = expand_paths(data, paths)
    for path in files:
        df, first_line, unit = _read_raw(path, data)
        if data.format == "goflow2":
            series_cols, ts_col = ["host"], "bucket_start"
            ts_fmt_data = DataConfig(timestamp_column=ts_col, timestamp_format="unix_s")
        else:
            series_cols, ts_col, ts_fmt_data = data.series_columns, data.timestamp_column, data
        needed = numeric + categorical + series_cols + ([ts_col] if ts_col else [])
        if with_labels and not data.label_column:
            raise InputError("evaluation needs a label column", location="[data].label_column")
        if with_labels and not data.labels_file:
            needed.append(data.label_column)
        if data.filter_column:
            needed.append(data.filter_column)
        missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
        if missing:
            have = [c for c in df.columns if c != LINE][:20]
            raise InputError(f"missing column(s) {missing}; the file has {have}", file=path, column=missing[0])
        if data.filter_column:
            keep = df[data.filter_column].astype(str).str.strip().isin(set(data.filter_values)).to_numpy()
            dropped["filtered"] += int((~keep).sum())
            if LINE not in df.columns:
                df[LINE] = np.arange(len(df)) + first_line
            df = df[keep].reset_index(drop=True)
        if data.head_rows > 0:
            df = df.iloc[: data.head_rows]
        if len(df) == 0:
            raise InputError("no data rows", file=path)

        out = pd.DataFrame(index=range(len(df)))
        for col in numeric:
            out[col] = _to_float(df, col, path, first_line, unit)
        for col in categorical:
            out[col] = df[col].astype(str).str.strip().to_numpy()
        # Without series columns each file is one series, named by its path (names repeat across folders).
        out[SERIES] = df[series_cols].astype(str).agg("/".join, axis=1).to_numpy() if series_cols else str(path)
        out[TS] = (_parse_timestamps(df, ts_fmt_data, path, first_line, unit) if ts_col
                   else np.arange(len(df), dtype=float))
        out[FILE] = str(path)
        out[LINE] = df[LINE].to_numpy() if LINE in df.columns else np.arange(len(df)) + first_line
        if with_labels:
            labels = df[data.label_column] if not data.labels_file else _joined_labels(out, data, series_cols, ts_col,
                                                                                      ts_fmt_data)
            out[LABEL] = is_anomalous_label(labels, data.normal_labels)
        frames.append(out)

    frame = pd.concat(frames, ignore_index=True)
    frame = frame.sort_values([SERIES, TS], kind="stable").reset_index(drop=True)
    dup = frame.duplicated([SERIES, TS], keep="first").to_numpy()
    if dup.any():
        dropped["duplicate_timestamp"] += int(dup.sum())
        frame = frame[~dup].reset_index(drop=True)
    return Table(frame, numeric, categorical, dropped, [str(f) for f in files])


def _joined_labels(out: pd.DataFrame, data: DataConfig, series_cols: list[str], ts_col: str,
                   ts_data: DataConfig) -> pd.Series:
    """Labels from `data.labels_file`, matched to rows on (series key, timestamp); every row needs one."""
    path = Path(data.labels_file)
    try:
        labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read labels: {e}", file=path) from None
    missing = [c for c in [*series_cols, ts_col, data.label_column] if c not in labels.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", file=path, column=missing[0])
    key = labels[series_cols].astype(str).agg("/".join, axis=1) if series_cols else pd.Series("", index=labels.index)
    ts = _parse_timestamps(labels, ts_data, path, 2, "line")
    lookup = pd.Series(labels[data.label_column].to_numpy(), index=pd.MultiIndex.from_arrays([key.to_numpy(), ts]))
    lookup = lookup[~lookup.index.duplicated()]
    rows = pd.MultiIndex.from_arrays([out[SERIES].to_numpy() if series_cols else np.full(len(out), ""),
                                      out[TS].to_numpy()])
    found = lookup.reindex(rows)
    if found.isna().any():
        i = int(np.flatnonzero(found.isna().to_numpy())[0])
        raise InputError(f"no label for series {rows[i][0]!r} at {rows[i][1]:g}", file=path, column=data.label_column)
    return pd.Series(found.to_numpy(), index=out.index)


def apply_nan_policy(table: Table, policy: str) -> Table:
    """Resolve missing/NaN/inf numeric values per docs/model-contract.md §1."""
    f = table.frame
    if not table.numeric:
        return table
    values = f[table.numeric].to_numpy()
    bad = ~np.isfinite(values)
    if not bad.any():
        return table
    if policy == "error":
        r, c = np.argwhere(bad)[0]
        raise InputError(
            f"missing, NaN or infinite value ({values[r, c]}); set [window].nan_policy to drop or ffill to accept",
            file=f[FILE].iat[r], location=f"line {int(f[LINE].iat[r])}", column=table.numeric[c])
    clean = f[table.numeric].where(np.isfinite(values))
    if policy == "ffill":
        clean = clean.groupby(f[SERIES], sort=False).ffill()
    keep = clean.notna().all(axis=1).to_numpy()
    out = f.copy()
    out[table.numeric] = clean
    table.dropped["nan"] += int((~keep).sum())
    return Table(out[keep].reset_index(drop=True), table.numeric, table.categorical, table.dropped, table.files)


# === Preprocessor ===


# A feature constant in training is kept (constant_features = "keep") with this scale, relative to
# its magnitude: a departure by 1% of the constant counts as one training standard deviation would.
CONSTANT_SCALE = 0.01


@dataclass
class Preprocessor:
    """Per-feature transform and standard scaling, fitted on training rows only; optional window centering."""

    columns: list[dict]

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.columns]

    @classmethod
    def fit(cls, frame: pd.DataFrame, numeric: list[str], categorical: list[str], log1p: list[str] = (),
            center: list[str] = (), constant_features: str = "error", source: str = "") -> Preprocessor:
        columns = []
        for col in numeric:
            transform = "log1p" if col in log1p else "none"
            t = _transform(frame[col].to_numpy(dtype=np.float64), transform)
            mean, std = float(t.mean()), float(t.std())
            if not std > 1e-12:
                if constant_features == "error":
                    raise InputError(
                        f"constant in the training data ({mean:g}), so it cannot be scaled; drop the column or set "
                        "[window].constant_features = \"keep\"", file=source, column=col)
                std = CONSTANT_SCALE * max(1.0, abs(mean))
            columns.append({"name": col, "source": col, "transform": transform, "category": None,
                            "mean": mean, "std": std, "window": "center" if col in center else "none"})
        for col in categorical:
            for value in sorted(frame[col].unique()):
                columns.append({"name": f"{col}={value}", "source": col, "transform": "one_hot",
                                "category": value, "mean": 0.0, "std": 1.0, "window": "none"})
        return cls(columns)

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, int]:
        """→ (rows × F float32, number of rows with a category unseen in training)."""
        out = np.empty((len(frame), len(self.columns)), dtype=np.float64)
        unknown = np.zeros(len(frame), dtype=bool)
        seen: dict[str, np.ndarray] = {}
        for j, c in enumerate(self.columns):
            if c["transform"] == "one_hot":
                values = frame[c["source"]].to_numpy()
                out[:, j] = values == c["category"]
                seen[c["source"]] = seen.get(c["source"], np.zeros(len(frame), dtype=bool)) | (values == c["category"])
            else:
                out[:, j] = _transform(frame[c["source"]].to_numpy(dtype=np.float64), c["transform"])
            out[:, j] = (out[:, j] - c["mean"]) / c["std"]
        for hit in seen.values():
            unknown |= ~hit
        return out.astype(np.float32), int(unknown.sum())

    def center(self, x: np.ndarray) -> np.ndarray:
        """(N, W, F) windows with the `center` columns taken relative to their window's mean (in place).

        The mean is taken in f64 over the f32 values and the difference cast back to f32, as the daemon does.
        """
        for j, c in enumerate(self.columns):
            if c.get("window", "none") == "center":
                v = x[:, :, j].astype(np.float64)
                x[:, :, j] = (v - v.mean(axis=1, keepdims=True)).astype(np.float32)
        return x


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    return x


# === Windows ===


@dataclass
class Windows:
    """Windows as (N, W, F) float32 with, per window, the row index of its last row."""

    x: np.ndarray
    end_row: np.ndarray


def segment_ids(series: np.ndarray, ts: np.ndarray, max_gap_secs: float, part: np.ndarray | None = None) -> np.ndarray:
    """A new segment starts where the series (or part) changes or time jumps by more than the gap."""
    n = len(series)
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = series[1:] != series[:-1]
        if part is not None:
            new[1:] |= part[1:] != part[:-1]
        if max_gap_secs > 0:
            new[1:] |= np.diff(ts) > max_gap_secs
    return np.cumsum(new) - 1


def window_ends(segments: np.ndarray, length: int, stride: int) -> np.ndarray:
    """Row indices after which a window is emitted (contract §2.3)."""
    n = len(segments)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])
    seg_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    pos = np.arange(n) - seg_start  # 0-based position within the segment
    emit = (pos + 1 >= length) & ((pos + 1 - length) % stride == 0)
    return np.flatnonzero(emit)


def gather_windows(rows: np.ndarray, ends: np.ndarray, length: int) -> Windows:
    offsets = np.arange(-length + 1, 1)
    idx = ends[:, None] + offsets[None, :]  # (N, W)
    return Windows(rows[idx], ends)  # (N, W, F)


def _series_bounds(series: np.ndarray) -> list[tuple[int, int]]:
    starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
    return list(zip(starts, np.r_[starts[1:], len(series)], strict=True))


def split_parts(series: np.ndarray, val_fraction: float, calib_fraction: float, min_rows: int = 0) -> np.ndarray:
    """0 = train, 1 = validation, 2 = calibration: the head, then the two tails of each series in time.

    `min_rows` is the least a validation tail gets while the head keeps as many (so that short
    series still give it a few windows).
    """
    part = np.zeros(len(series), dtype=np.int8)
    for s, e in _series_bounds(series):
        n = e - s
        n_calib = int(round(n * calib_fraction))
        n_val = int(round(n * val_fraction))
        if n - n_calib >= 2 * min_rows:
            n_val = max(n_val, min_rows)
        part[e - n_calib - n_val: e - n_calib] = 1
        part[e - n_calib: e] = 2
    return part


def time_blocks(series: np.ndarray, folds: int, min_rows: int) -> np.ndarray:
    """Block id per row: each series cut into K equal runs in time, oldest first.

    K is `folds`, fewer when the median series has under `min_rows` rows per block, and at least 2.
    """
    bounds = _series_bounds(series)
    k = int(np.clip(np.median([e - s for s, e in bounds]) // min_rows, 2, folds))
    blocks = np.zeros(len(series), dtype=np.int8)
    for s, e in bounds:
        blocks[s:e] = np.arange(e - s) * k // (e - s)
    return blocks
