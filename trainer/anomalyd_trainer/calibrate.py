"""Thresholds fitted on held-out normal scores only (docs/model-contract.md §4).

`Thresholds` is a trainable object: it refuses to normalise before it has been fitted, so an
untrained threshold can never silently become 1.0.

A threshold is only as good as the number of scores it rests on. With `n` calibration scores:
- an empirical q-quantile is estimated when at least `MIN_TAIL` scores lie above it
  (n·(1 − q) ≥ 10, libspot's guidance); otherwise the highest estimable quantile is used and the
  false-alarm rate it stands for is recorded;
- Peaks-Over-Threshold needs `min_excesses` scores above its initial quantile; with few scores
  that quantile is lowered, but not below `MIN_POT_LEVEL`, where the "tail" would be the bulk;
- fewer than `MIN_SCORES` scores are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .config import CalibrationConfig

MIN_TAIL = 10
MIN_POT_LEVEL = 0.9
MIN_SCORES = 30
# Excesses shipped in the bundle as the tail summary a streaming threshold starts from.
MAX_SHIPPED_PEAKS = 1000


class CalibrationError(ValueError):
    """The calibration scores cannot support a threshold."""


def pot_threshold(scores: np.ndarray, initial_quantile: float, false_alarm_rate: float, min_excesses: int) -> dict:
    """Peaks-Over-Threshold: GPD fitted to the excesses over the initial quantile (Siffer et al., 2017)."""
    n = len(scores)
    t = float(np.quantile(scores, initial_quantile))
    excess = scores[scores > t] - t
    out = {"initial_quantile": initial_quantile, "initial_threshold": t, "false_alarm_rate": false_alarm_rate,
           "excesses": int(len(excess)), "xi": None, "sigma": None, "value": None}
    if len(excess) < min_excesses:
        return out
    xi, _, sigma = stats.genpareto.fit(excess, floc=0.0)
    r = false_alarm_rate * n / len(excess)
    value = t - sigma * math.log(r) if abs(xi) < 1e-6 else t + sigma / xi * (r ** (-xi) - 1.0)
    out.update(xi=float(xi), sigma=float(sigma), value=float(value))
    return out


@dataclass
class Thresholds:
    cfg: CalibrationConfig
    fitted: dict | None = None

    def fit(self, normal_scores: np.ndarray, source: dict | None = None, floor: float = 0.0) -> Thresholds:
        """`source` says where the scores come from (holdout or cross-fit, and how many folds); no
        threshold is set below `floor`, a score that means a real departure (model.score_floor)."""
        scores = np.asarray(normal_scores, dtype=np.float64)
        n = len(scores)
        if not np.all(np.isfinite(scores)):
            raise CalibrationError("calibration scores are not all finite")
        if n < MIN_SCORES:
            raise CalibrationError(f"{n} calibration windows are too few to set a threshold (at least {MIN_SCORES})")
        c = self.cfg
        q = min(c.quantile, 1.0 - MIN_TAIL / n)
        quantile = {"q": c.quantile, "q_used": q, "value": float(np.quantile(scores, q))}
        level = max(MIN_POT_LEVEL, min(c.pot_initial_quantile, 1.0 - c.min_excesses / n))
        pot = pot_threshold(scores, level, c.false_alarm_rate, c.min_excesses)
        method = "pot" if c.method == "pot" and pot["value"] is not None else "quantile"
        value = max(pot["value"] if method == "pot" else quantile["value"], floor)
        if not value > 0:
            raise CalibrationError(f"calibrated threshold {value!r} is not positive; scores cannot be normalised")
        t = pot["initial_threshold"]
        peaks = np.sort(scores[scores > t] - t)[::-1][:MAX_SHIPPED_PEAKS]
        self.fitted = {
            "method": method, "value": value,
            # What the threshold stands for: POT's target, or the tail share above the quantile used.
            "false_alarm_rate": c.false_alarm_rate if method == "pot" else 1.0 - q,
            "calibration_windows": n, "source": source or {"kind": "holdout"}, "floor": floor,
            "quantile": quantile, "pot": pot,
            "tail": {"n": n, "level": pot["initial_quantile"], "threshold": t, "peaks": peaks.tolist()},
        }
        return self

    @property
    def value(self) -> float:
        if self.fitted is None:
            raise RuntimeError("Thresholds used before fit(): calibrate on held-out normal data first")
        return self.fitted["value"]

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores → anomaly_score, where 1.0 is the threshold."""
        return np.asarray(scores, dtype=np.float64) / self.value

    def describe(self) -> str:
        """One line for people: method, what it stands for, and how many windows it rests on."""
        f = self.fitted
        src = f["source"]
        where = f"{src['folds']}-fold cross-fit" if src["kind"] == "cross_fit" else "holdout"
        return (f"threshold {f['value']:.6g} ({f['method']}, false-alarm rate {f['false_alarm_rate']:.3%}) from "
                f"{f['calibration_windows']} {where} windows")
