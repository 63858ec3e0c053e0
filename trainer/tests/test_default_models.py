"""The committed default bundles: contract, size, golden vectors, and quality on the public data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomalyd_trainer.bundle import Bundle, write_golden
from anomalyd_trainer.evaluate import evaluate
from conftest import DATASETS, REPO

BUNDLES = ["skab-convae", "nslkdd-vae", "flows-vae"]


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_is_small_and_complete(name):
    folder = REPO / "models" / name
    assert {p.name for p in folder.iterdir()} == {"model.onnx", "model.json", "report.png"}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2 * 1024 * 1024
    meta = Bundle(folder).meta  # loads, checks schema version and sha256
    assert meta["name"] == name and meta["validation"]["onnx_max_abs_error"] < 1e-4
    assert len(meta["features"]) == meta["onnx"]["inputs"][0]["shape"][2]


@pytest.mark.parametrize("name", BUNDLES)
def test_golden_vectors_match_the_committed_bundle(name, tmp_path):
    """Recompute windows and onnxruntime scores from the committed records: the daemon's parity test."""
    folder = REPO / "contracts" / name
    golden = json.loads((folder / "golden.json").read_text())
    bundle = Bundle(REPO / "models" / name)
    assert golden["model_sha256"] == bundle.meta["onnx"]["sha256"]
    again = write_golden(bundle, folder / golden["records"], tmp_path, {})
    assert again["windows_total"] == golden["windows_total"]
    for a, b in zip(golden["windows"], again["windows"], strict=True):
        assert (a["series"], a["end_ts"], a["end_line"]) == (b["series"], b["end_ts"], b["end_line"])
        np.testing.assert_allclose(b["x"], a["x"], atol=1e-5)
        np.testing.assert_allclose(b["score"], a["score"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b["feature_scores"], a["feature_scores"], rtol=1e-5, atol=1e-5)


def test_skab_golden_level_shift_is_scored_anomalous():
    """The synthetic records shift Current and Pressure for 30 rows: those windows cross 1.0, quiet ones don't."""
    golden = json.loads((REPO / "contracts/skab-convae/golden.json").read_text())
    features = json.loads((REPO / "models/skab-convae/model.json").read_text())["features"]
    shifted = [w for w in golden["windows"] if np.ptp(np.array(w["x"])[:, features.index("Current")]) > 3]
    quiet = [w for w in golden["windows"] if w not in shifted]
    assert shifted and max(w["anomaly_score"] for w in shifted) > 1
    top = {features[int(np.argmax(w["feature_scores"]))] for w in shifted if w["anomaly_score"] > 1}
    assert top <= {"Current", "Pressure"}
    assert np.mean([w["anomaly_score"] > 1 for w in quiet]) < 0.1


@pytest.mark.skipif(not (DATASETS / "nsl-kdd").exists(), reason="../shared/datasets/nsl-kdd is absent")
def test_nslkdd_vae_ranks_attacks_above_normal_traffic():
    report = evaluate(Bundle(REPO / "models/nslkdd-vae"), [str(DATASETS / "nsl-kdd/KDDTest+.txt")],
                      train_paths=[str(DATASETS / "nsl-kdd/KDDTrain+_20Percent.txt")])
    ours = report["detectors"]["nslkdd-vae"]
    assert report["windows"] == 22544
    assert ours["roc_auc"] > 0.9 and ours["false_alarm_rate"] < 0.02
