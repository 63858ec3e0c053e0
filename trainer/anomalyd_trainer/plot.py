"""A backtest you can look at: `anomalyd score`'s output drawn over the records it scored.

One panel pair per series (the most anomalous first, up to a limit): above, the features that
the windows above 1.0 blamed most (each standardised over the series, so they share an axis);
below, the anomaly score with the 1.0 line. Alert intervals (`anomalyd score --alerts`) are
shaded in both.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .bundle import Bundle  # noqa: E402
from .data import SERIES, TS, load_table  # noqa: E402
from .errors import InputError  # noqa: E402


@dataclass
class SeriesScores:
    end_ts: list[float] = field(default_factory=list)
    anomaly: list[float] = field(default_factory=list)
    blamed: Counter = field(default_factory=Counter)


def read_scores(path: Path) -> dict[str, SeriesScores]:
    """`anomalyd score` output, CSV or NDJSON, by series."""
    out: dict[str, SeriesScores] = {}
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"cannot read: {e}", file=path) from None
    if text.lstrip().startswith("{"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = [{**r, "top_features": "|".join(r["top_features"])} for r in rows]
    else:
        rows = list(csv.DictReader(text.splitlines()))
    for i, r in enumerate(rows, start=2):
        try:
            s = out.setdefault(r["series"], SeriesScores())
            s.end_ts.append(float(r["end_ts"]))
            s.anomaly.append(float(r["anomaly_score"]))
        except (KeyError, ValueError) as e:
            raise InputError(f"not a row of anomalyd score's output: {e}", file=path, location=f"line {i}") from None
        if s.anomaly[-1] > 1.0:
            s.blamed.update(f for f in r.get("top_features", "").split("|") if f)
    return out


def read_alerts(path: Path | None) -> dict[str, list[tuple[float, float | None]]]:
    """Alert intervals by series: (started, resolved or None while still firing)."""
    intervals: dict[str, list[tuple[float, float | None]]] = {}
    if path is None:
        return intervals
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            spans = intervals.setdefault(e["series"], [])
            if e["event"] == "firing":
                spans.append((float(e["started_ts"]), None))
            elif e["event"] == "resolved" and spans and spans[-1][1] is None:
                spans[-1] = (spans[-1][0], float(e["window_end_ts"]))
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"not an alert event: {e}", file=path, location=f"line {i}") from None
    return intervals


def _times(unix_secs) -> np.ndarray:
    return np.asarray(unix_secs, dtype="float64").astype("datetime64[s]")


def _rows_of(frame, series: str):
    """The input rows of a series as `anomalyd score` named it (a file without series columns is
    named by its file name there, by its path here)."""
    rows = frame[frame[SERIES] == series]
    if rows.empty:
        rows = frame[frame[SERIES].map(lambda s: Path(str(s)).name) == series]
    return rows


def write_plot(model: str, records: str, scores: Path, alerts: Path | None, out: Path,
               max_series: int = 6, features: int = 3) -> int:
    """Draws the plot; returns the number of series drawn."""
    bundle = Bundle(model)
    frame = load_table(bundle.data_config(paths=[records], head_rows=0, filter_column="")).frame
    by_series = read_scores(scores)
    if not by_series:
        raise InputError("no scored windows", file=scores)
    spans = read_alerts(alerts)
    names = sorted(by_series, key=lambda s: -max(by_series[s].anomaly))[:max_series]
    fig, axes = plt.subplots(2 * len(names), 1, figsize=(11, 3.6 * len(names)), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] * len(names)})
    for k, name in enumerate(names):
        s, top, bottom = by_series[name], axes[2 * k][0], axes[2 * k + 1][0]
        rows = _rows_of(frame, name)
        numeric = [c for c in bundle.meta["features"] if c in frame.columns]
        blamed = [f for f, _ in s.blamed.most_common() if f in numeric] or numeric
        for f in blamed[:features]:
            x = rows[f].to_numpy(dtype=float)
            sd = np.nanstd(x)
            top.plot(_times(rows[TS].to_numpy()), (x - np.nanmean(x)) / (sd if sd > 0 else 1.0), lw=1, label=f)
        top.set_title(f"{name}: {len(s.end_ts)} windows, peak anomaly score {max(s.anomaly):.2f}")
        top.set_ylabel("standardised")
        top.legend(loc="upper left", fontsize=8)
        bottom.sharex(top)
        bottom.plot(_times(s.end_ts), s.anomaly, color="black", lw=1, label="anomaly score (window end)")
        bottom.axhline(1.0, color="red", ls="--", lw=1, label="1.0: the threshold in force")
        bottom.set_ylabel("anomaly score")
        bottom.set_xlabel("event time (UTC)")
        bottom.legend(loc="upper left", fontsize=8)
        end = max(s.end_ts)
        for start, stop in spans.get(name, []):
            for ax in (top, bottom):
                span = _times([start, end if stop is None else stop])
                ax.axvspan(span[0], span[1], color="orange", alpha=0.25, lw=0, label="alert" if ax is bottom else None)
        if spans.get(name):
            bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return len(names)
