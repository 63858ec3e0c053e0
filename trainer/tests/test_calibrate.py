"""Thresholds from few and from many calibration scores (docs/model-contract.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomalyd_trainer.calibrate import CalibrationError, Thresholds, pot_threshold
from anomalyd_trainer.config import CalibrationConfig


def test_pot_recovers_an_exponential_tail():
    """Exp(1) has P(X > t) = e^-t: the threshold at false-alarm rate q is -ln q."""
    scores = np.random.default_rng(0).exponential(size=200_000)
    for q in (1e-3, 1e-4):
        pot = pot_threshold(scores, 0.98, q, 20)
        assert abs(pot["xi"]) < 0.05
        assert pot["value"] == pytest.approx(-math.log(q), rel=0.05)


@pytest.mark.parametrize("name", ["exponential", "gpd heavy", "gpd bounded", "lognormal"])
def test_pot_agrees_with_the_libspot_reference(name):
    """libspot (Siffer et al.'s SPOT, PyPI) initialised on the same scores: the same threshold."""
    import libspot
    from scipy import stats

    rng = np.random.default_rng(5)
    x = {"exponential": lambda: rng.exponential(size=20_000),
         "gpd heavy": lambda: stats.genpareto.rvs(0.3, size=20_000, random_state=rng),
         "gpd bounded": lambda: stats.genpareto.rvs(-0.2, size=20_000, random_state=rng),
         "lognormal": lambda: rng.lognormal(0, 1, 20_000)}[name]()
    spot = libspot.Spot(q=1e-3, level=0.98)
    spot.fit(x)
    assert pot_threshold(x, 0.98, 1e-3, 20)["value"] == pytest.approx(spot.anomaly_threshold, rel=0.01)


def test_thresholds_refuse_to_normalise_before_fit():
    t = Thresholds(CalibrationConfig())
    with pytest.raises(RuntimeError, match="before fit"):
        t.normalise(np.ones(3))


def test_many_scores_keep_the_configured_levels():
    scores = np.random.default_rng(1).exponential(size=20_000)
    f = Thresholds(CalibrationConfig()).fit(scores).fitted
    assert f["method"] == "pot" and f["pot"]["initial_quantile"] == 0.98 and f["quantile"]["q_used"] == 0.999
    assert f["value"] == pytest.approx(-math.log(1e-3), rel=0.1) and f["false_alarm_rate"] == 1e-3
    assert f["calibration_windows"] == 20_000 and f["source"] == {"kind": "holdout"}


def test_few_scores_lower_the_pot_level_but_keep_its_target():
    """300 scores: 2% of them is 6 excesses, so POT starts from the 1 - 20/300 quantile instead."""
    scores = np.random.default_rng(2).exponential(size=300)
    f = Thresholds(CalibrationConfig()).fit(scores, {"kind": "cross_fit", "folds": 3}).fitted
    assert f["pot"]["initial_quantile"] == pytest.approx(1 - 20 / 300) and f["pot"]["excesses"] == 20
    assert f["method"] == "pot" and f["false_alarm_rate"] == 1e-3
    # The 99.9% quantile of 300 scores is not estimable: the highest with 10 scores above it is used.
    assert f["quantile"]["q_used"] == pytest.approx(1 - 10 / 300)
    assert f["value"] > scores.max() * 0.8  # an extrapolation past the sample, not its 93rd percentile


def test_too_few_scores_for_pot_fall_back_to_a_stated_quantile():
    scores = np.linspace(0.1, 1.0, 150)  # the 0.9 level leaves 15 excesses, fewer than 20
    f = Thresholds(CalibrationConfig()).fit(scores).fitted
    assert f["method"] == "quantile" and f["pot"]["value"] is None
    assert f["false_alarm_rate"] == pytest.approx(10 / 150)
    assert "false-alarm rate 6.667%" in Thresholds(CalibrationConfig(), f).describe()


def test_fewer_than_thirty_scores_are_refused():
    with pytest.raises(CalibrationError, match="29 calibration windows are too few"):
        Thresholds(CalibrationConfig()).fit(np.ones(29))


def test_a_flat_line_gets_the_floor_not_its_float_noise():
    """Every calibration score of a flat line is ~0; the threshold stays at a real departure."""
    scores = np.abs(np.random.default_rng(3).normal(0, 1e-9, 500))
    t = Thresholds(CalibrationConfig()).fit(scores, floor=0.01)
    assert t.value == 0.01
    assert np.all(t.normalise(scores) < 1e-5)


def test_the_tail_summary_is_what_spot_starts_from():
    scores = np.random.default_rng(4).exponential(size=5_000)
    f = Thresholds(CalibrationConfig()).fit(scores).fitted
    tail = f["tail"]
    assert tail["n"] == 5_000 and tail["level"] == 0.98
    assert tail["threshold"] == pytest.approx(np.quantile(scores, 0.98))
    expected = np.sort(scores[scores > tail["threshold"]] - tail["threshold"])[::-1]
    np.testing.assert_allclose(tail["peaks"], expected)
    assert len(tail["peaks"]) == f["pot"]["excesses"] == 100
