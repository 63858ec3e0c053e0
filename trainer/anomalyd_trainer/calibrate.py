"""Thresholds fitted on held-out normal scores only (docs/model-contract.md §4).

`Thresholds` is a trainable object: it refuses to normalise before it has been fitted, so an
untrained threshold can never silently become 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .config import CalibrationConfig


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

    def fit(self, normal_scores: np.ndarray) -> Thresholds:
        scores = np.asarray(normal_scores, dtype=np.float64)
        if len(scores) < 2 or not np.all(np.isfinite(scores)):
            raise ValueError(f"calibration needs >= 2 finite scores, got {len(scores)}")
        c = self.cfg
        quantile = {"q": c.quantile, "value": float(np.quantile(scores, c.quantile))}
        pot = pot_threshold(scores, c.pot_initial_quantile, c.false_alarm_rate, c.min_excesses)
        method = "pot" if c.method == "pot" and pot["value"] is not None else "quantile"
        value = pot["value"] if method == "pot" else quantile["value"]
        if not value > 0:
            raise ValueError(f"calibrated threshold {value!r} is not positive; scores cannot be normalised")
        self.fitted = {"method": method, "value": value, "quantile": quantile, "pot": pot,
                       "calibration_windows": int(len(scores))}
        return self

    @property
    def value(self) -> float:
        if self.fitted is None:
            raise RuntimeError("Thresholds used before fit(): calibrate on held-out normal data first")
        return self.fitted["value"]

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """Raw scores → anomaly_score, where 1.0 is the threshold."""
        return np.asarray(scores, dtype=np.float64) / self.value
