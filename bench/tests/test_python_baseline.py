"""The benchmark's Python baseline does the daemon's work: same windows, same scores.

`WindowScorer` is fed the golden records of contracts/skab-convae/ line by line, as the daemon's
golden test feeds its windower (tests/golden.rs), and must reproduce the trainer's scaled windows,
scores, feature scores and anomaly scores within 1e-5. Those records include a gap longer than
`max_gap_secs` (a new segment) and a repeated timestamp (dropped), so the count of windows checks
the order and gap rules of docs/model-contract.md §2 too. No Kafka here: the consumer loop around
the scorer is exercised by bench/run.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import make_model  # noqa: E402
from python_baseline import WindowScorer  # noqa: E402

BUNDLE = REPO / "models" / "skab-convae"
CONTRACT = REPO / "contracts" / "skab-convae"
TOLERANCE = 1e-5


def close(a, b) -> np.ndarray:
    """As tests/golden.rs: absolute below 1, relative above."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) <= TOLERANCE * np.maximum(1.0, np.abs(a))


class Collected:
    """A sink that keeps every scored window."""

    def __init__(self):
        self.series, self.end_ts, self.x, self.score, self.feature_scores, self.anomaly = [], [], [], [], [], []

    def __call__(self, series, end_ts, x, score, feature_scores, anomaly):
        self.series += series
        self.end_ts += end_ts
        self.x.append(x)
        self.score.append(score)
        self.feature_scores.append(feature_scores)
        self.anomaly.append(anomaly)

    def arrays(self):
        return (np.concatenate(self.x), np.concatenate(self.score), np.concatenate(self.feature_scores),
                np.concatenate(self.anomaly))


def feed_golden_records(model_dir: Path = BUNDLE, stride: int = 1, batch: int = 64,
                        extra: list[str] = ()) -> tuple[WindowScorer, Collected]:
    header, *lines = (CONTRACT / "records.csv").read_text().splitlines()
    got = Collected()
    scorer = WindowScorer(model_dir, stride=stride, batch=batch, columns=header.split(";"), sink=got)
    for line in [*lines, *extra]:
        if line.strip():
            scorer.push(b"records.csv", line.encode())
    scorer.flush()
    return scorer, got


def one_second_after(text: str) -> str:
    fmt = "%Y-%m-%d %H:%M:%S"
    return (datetime.strptime(text, fmt) + timedelta(seconds=1)).strftime(fmt)


@pytest.fixture(scope="module")
def golden() -> dict:
    g = json.loads((CONTRACT / "golden.json").read_text())
    assert g["model_sha256"] == json.loads((BUNDLE / "model.json").read_text())["onnx"]["sha256"], \
        "golden vectors are of another model"
    return g


def test_windows_and_scores_match_the_trainers_golden_vectors(golden):
    # A batch of 64 does not divide the 138 windows: the last run scores a partial batch.
    scorer, got = feed_golden_records(batch=64)
    x, score, feature_scores, anomaly = got.arrays()
    assert scorer.windows == len(got.series) == golden["windows_total"]
    assert dict(scorer.dropped) == {"out_of_order": 1}
    for g in golden["windows"]:
        i = g["index"]
        assert got.series[i] == g["series"], f"window {i}: series"
        assert got.end_ts[i] == g["end_ts"], f"window {i}: end time"
        assert close(x[i], g["x"]).all(), f"window {i}: scaled values"
        assert close(score[i], g["score"]), f"window {i}: score {score[i]} vs {g['score']}"
        assert close(feature_scores[i], g["feature_scores"]).all(), f"window {i}: feature scores"
        assert close(anomaly[i], g["anomaly_score"]), f"window {i}: anomaly_score {anomaly[i]} vs {g['anomaly_score']}"


def test_stride_scores_every_sth_window_of_each_segment():
    _, every = feed_golden_records(stride=1)
    scorer, sparse = feed_golden_records(stride=8, batch=5)
    # W = 32: the 70-row segment before the gap ends windows at rows 32, 40, ..., 64 (5), the
    # 130-row segment after it at rows 32, 40, ..., 128 (13).
    assert scorer.windows == 18
    by_end = dict(zip(every.end_ts, every.arrays()[1], strict=True))
    _, score, _, _ = sparse.arrays()
    assert close(score, [by_end[t] for t in sparse.end_ts]).all()
    assert sparse.end_ts[0] == every.end_ts[0] and sparse.end_ts[5] == every.end_ts[39]


def test_a_record_dropped_for_nan_still_counts_for_the_order_check():
    # Two records after the last golden line: one with a missing value (nan_policy "error": dropped),
    # then a valid one with the same timestamp (a duplicate, dropped too).
    last = (CONTRACT / "records.csv").read_text().splitlines()[-1].split(";")
    later = one_second_after(last[0])
    with_nan = ";".join([later, "", *last[2:]])
    scorer, got = feed_golden_records(extra=[with_nan, ";".join([later, *last[1:]])])
    assert dict(scorer.dropped) == {"out_of_order": 2, "nan": 1}
    assert scorer.windows == 138


def test_ffill_takes_the_last_valid_value_of_the_series(tmp_path, golden):
    bundle = tmp_path / "skab-convae"
    shutil.copytree(BUNDLE, bundle)
    meta = json.loads((bundle / "model.json").read_text())
    meta["window"]["nan_policy"] = "ffill"
    (bundle / "model.json").write_text(json.dumps(meta))
    last = (CONTRACT / "records.csv").read_text().splitlines()[-1].split(";")
    filled = ";".join([one_second_after(last[0]), "nan", *last[2:]])
    scorer, got = feed_golden_records(bundle, extra=[filled])
    x, *_ = got.arrays()
    assert scorer.windows == golden["windows_total"] + 1 and not scorer.dropped.get("nan")
    # The new window's last row is the previous row with its first feature carried forward (the
    # centered columns also move with their window's mean).
    kept = [j for j, c in enumerate(meta["preprocess"]["columns"]) if c.get("window", "none") == "none"]
    np.testing.assert_array_equal(x[-1, -1, kept], x[-2, -1, kept])


def test_bench_generator_matches_hand_computed_values():
    # i = 0, j = 0, k = 0: sin(0) + 0 + 0.05 * (0/101 - 0.5)
    assert make_model.value(0, 0, 0) == pytest.approx(-0.025, abs=1e-12)
    # i = 1, j = 2, k = 3: sin(2π·15/60 + 3) = cos(3); 0.5·3; (31 + 34 + 39) % 101 = 3
    assert make_model.value(1, 2, 3) == pytest.approx(-0.9899924966 + 1.5 + 0.05 * (3 / 101 - 0.5), abs=1e-9)
    assert f"{make_model.value(1, 2, 3):.4f}" == "0.4865"
    # i = 0, j = 0, k = 1: sin(1) + 0.5 + 0.05 * (13/101 - 0.5) = 1.32291; the Kafka payload layout
    assert make_model.payload(0, 0, 2) == "1700000000;-0.0250;1.3229"
