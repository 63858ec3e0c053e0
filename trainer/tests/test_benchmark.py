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
