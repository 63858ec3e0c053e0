"""`anomalyd-train benchmark`: pooling, subsets and the docs section it writes, on a few real files."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from anomalyd_trainer import cli
from conftest import DATASETS

SKAB = DATASETS / "skab" / "data"
NSLKDD = DATASETS / "nsl-kdd"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.skipif(not SKAB.exists(), reason="../shared/datasets/skab is absent")
def test_skab_pools_the_files_of_each_subset_and_rewrites_only_its_section(tmp_path):
    data = tmp_path / "skab"
    picked = {"valve1": ["0.csv", "1.csv"], "valve2": ["0.csv"]}
    for folder, names in picked.items():
        (data / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(SKAB / folder / name, data / folder / name)
    doc = tmp_path / "quality.md"
    doc.write_text("# Quality\n\n<!-- benchmark skab -->\nold figures\n<!-- /benchmark skab -->\n\n## After\n")
    out = tmp_path / "skab.json"
    assert cli.main(["benchmark", "skab", "--data", str(data), "--folders", "valve1", "valve2",
                     "--set", "train.epochs=2", "--write", str(doc), "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    assert list(result["subsets"]) == ["valve1 (selection)"]  # the other subsets need folders not run
    pooled = result["subsets"]["valve1 (selection)"]
    # Every test window of both files: rows after the first 400, each the end of a W = 32 window.
    rows = sum(len(pd.read_csv(SKAB / "valve1" / n, sep=";")) - 400 for n in picked["valve1"])
    assert pooled["files"] == 2 and pooled["windows"] == rows
    always = pooled["detectors"]["always anomalous"]
    assert always["false_alarm_rate"] == 1.0 and always["recall"] == 1.0
    assert set(pooled["detectors"]) == {"conv-AE (anomalyd)", "PCA reconstruction", "random", "always anomalous"}
    assert result["thresholds"]["kind"] == "cross_fit" and result["cost"]["multiply_adds"] > 0

    text = doc.read_text()
    assert text.startswith("# Quality\n\n<!-- benchmark skab -->\nWritten by `anomalyd-train benchmark skab`")
    assert text.endswith("<!-- /benchmark skab -->\n\n## After\n") and "old figures" not in text
    assert "| conv-AE (anomalyd) |" in text and "Conv-AE (SKAB leaderboard) | 0.78 | 13.55%" in text


@pytest.mark.skipif(not SKAB.exists(), reason="../shared/datasets/skab is absent")
def test_the_daemons_own_alerts_are_reported_next_to_the_bundles_scores(tmp_path):
    """`--daemon CONFIG`: `anomalyd score` on the same test windows; in static mode its
    anomaly_score is the bundle's, and its alarms are the windows its alert policy kept firing."""
    from anomalyd_trainer import benchmark

    data = tmp_path / "skab"
    (data / "valve1").mkdir(parents=True)
    shutil.copy(SKAB / "valve1" / "0.csv", data / "valve1" / "0.csv")
    static = tmp_path / "static.toml"
    static.write_text('[thresholds]\nmode = "static"\n[alert_policy]\nfire_hits = 1\nfire_windows = 1\n')
    spot = tmp_path / "spot.toml"
    spot.write_text('[thresholds]\nmode = "spot"\nwarmup_windows = 0\n')
    result = benchmark.skab(benchmark.REPO / "trainer/configs/skab-convae.toml", data, ["train.epochs=2"],
                            ("valve1",), log=lambda _: None, daemon_configs=(static, spot),
                            bundles=tmp_path / "bundles")
    detectors = result["subsets"]["valve1 (selection)"]["detectors"]
    model, daemon = detectors["conv-AE (anomalyd)"], detectors["anomalyd score --config static.toml"]
    assert daemon["roc_auc"] == pytest.approx(model["roc_auc"], abs=1e-6)
    # resolve_after = 3 keeps an alert up for the clean windows before it resolves: never fewer alarms.
    assert daemon["recall"] >= model["recall"]
    assert "anomalyd score --config spot.toml" in detectors
    # The bundles were kept, and a second run reuses them.
    assert (tmp_path / "bundles" / "skab-valve1-0" / "train-config.json").is_file()
    lines = []
    benchmark.skab(benchmark.REPO / "trainer/configs/skab-convae.toml", data, ["train.epochs=2"], ("valve1",),
                   log=lines.append, bundles=tmp_path / "bundles")
    assert "reused" in lines[0]


@pytest.mark.skipif(not NSLKDD.exists(), reason="../shared/datasets/nsl-kdd is absent")
def test_nslkdd_reports_the_selection_set_and_kddtest(tmp_path):
    out = tmp_path / "nsl.json"
    assert cli.main(["benchmark", "nslkdd", "--set", "train.epochs=2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    selection, test = result["subsets"].values()
    train = pd.read_csv(NSLKDD / "KDDTrain+_20Percent.txt", header=None)
    attacks, normal = int((train[41] != "normal").sum()), int((train[41] == "normal").sum())
    # The training file's attacks and the normal rows no model trained on: its two 15% tails.
    assert selection["windows"] == attacks + 2 * round(normal * 0.15)
    assert test["windows"] == 22_544
    assert result["score_kind"] == "latent_density+reconstruction"
