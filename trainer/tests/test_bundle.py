"""Train → bundle → onnxruntime, end to end on synthetic series, through the CLI where users go."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from anomalyd_trainer.bundle import Bundle, parity_check, write_golden
from anomalyd_trainer.config import load_config
from anomalyd_trainer.errors import InputError
from anomalyd_trainer.evaluate import evaluate
from anomalyd_trainer.model import scorer_for
from anomalyd_trainer.train import train
from conftest import write_config, write_series_csv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "anomalyd_trainer", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module", params=["conv_ae", "vae"])
def trained(request, tmp_path_factory):
    """One CLI training run per model kind; the bundle, run folder and golden vectors it wrote."""
    d = tmp_path_factory.mktemp(request.param)
    data = write_series_csv(d / "train.csv", rows=700, series=3, seed=1)
    cfg = write_config(d / "c.toml", data, model={"kind": request.param, "channels": [16, 8], "latent_dim": 4})
    records = write_series_csv(d / "records.csv", rows=60, series=2, seed=7, anomaly_at=30)
    out = cli("train", "--config", str(cfg), "--quiet", "--runs-dir", str(d / "runs"), "--out-dir", str(d / "models"),
              "--golden", str(records), "--golden-dir", str(d / "contracts"))
    return {"dir": d, "config": cfg, "bundle": d / "models" / "tiny", "run": d / "runs" / "tiny",
            "golden": d / "contracts" / "tiny", "stdout": out.stdout, "kind": request.param}


def test_bundle_holds_the_contract(trained):
    b = trained["bundle"]
    assert sorted(p.name for p in b.iterdir()) == ["model.json", "model.onnx", "report.png"]
    meta = json.loads((b / "model.json").read_text())
    assert meta["schema_version"] == 1 and meta["model_kind"] == trained["kind"]
    assert meta["features"] == ["cpu", "mem", "lat"] and meta["window"]["length"] == 16
    assert meta["onnx"]["inputs"] == [{"name": "window", "shape": ["batch", 16, 3], "dtype": "float32"}]
    assert meta["thresholds"]["value"] > 0 and meta["validation"]["onnx_max_abs_error"] < 1e-4
    assert meta["training_data"]["series"] == 3 and meta["training_data"]["time_start"].startswith("2023-11-14")
    for key in ("created_at", "trainer_version", "training_config", "preprocess"):
        assert meta[key]
    model = onnx.load(str(b / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["anomalyd.features"]) == meta["features"]
    assert float(props["anomalyd.threshold"]) == meta["thresholds"]["value"]
    assert model.opset_import[0].version == 17
    assert (trained["run"] / "config.json").exists() and (trained["run"] / "args.txt").exists()
    assert "of the scores' scale" in trained["stdout"] and "cross-fit windows" in trained["stdout"]


def test_onnxruntime_matches_pytorch_at_random_batch_sizes(trained):
    from anomalyd_trainer.run import load_run

    result = load_run(trained["run"])
    scorer = scorer_for(result.cfg.model, result.model)
    err = parity_check(scorer, trained["bundle"] / "model.onnx", result.splits["val"].x, trials=8, seed=3)
    assert err["max_error"] < 1e-4 and err["max_abs_error"] < 1e-3


def test_windows_are_scored_independently_of_their_batch(trained):
    sess = ort.InferenceSession(str(trained["bundle"] / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((9, 16, 3)).astype(np.float32)
    together = sess.run(["score"], {"window": x})[0]
    alone = np.concatenate([sess.run(["score"], {"window": x[i: i + 1]})[0] for i in range(9)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_golden_vectors_reproduce_from_the_records(trained):
    """The check the daemon makes: same records + bundle → same windows and scores."""
    golden = json.loads((trained["golden"] / "golden.json").read_text())
    bundle = Bundle(trained["bundle"])
    again = write_golden(bundle, trained["golden"] / golden["records"], trained["dir"] / "again", {})
    assert again["windows_total"] == golden["windows_total"] == 2 * (60 - 16 + 1)
    for a, b in zip(golden["windows"], again["windows"], strict=True):
        assert a["series"] == b["series"] and a["end_ts"] == b["end_ts"]
        np.testing.assert_allclose(a["x"], b["x"], atol=1e-6)
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5)


def test_tampered_onnx_is_refused(trained, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(trained["bundle"], copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(InputError, match="does not match the sha256"):
        Bundle(copy)


def test_export_rewrites_the_same_bundle_from_the_run(trained, tmp_path):
    cli("export", "--run", str(trained["run"]), "--out-dir", str(tmp_path))
    a = json.loads((trained["bundle"] / "model.json").read_text())
    b = json.loads((tmp_path / "tiny" / "model.json").read_text())
    assert a["thresholds"] == b["thresholds"] and a["preprocess"] == b["preprocess"]


def test_evaluate_finds_injected_anomalies_and_prints_baselines(trained, tmp_path):
    test = write_series_csv(tmp_path / "test.csv", rows=400, series=3, seed=11, anomaly_at=250)
    report = evaluate(Bundle(trained["bundle"]), [str(test)])
    ours = report["detectors"]["tiny"]
    assert set(report["detectors"]) >= {"random", "always anomalous"} and any(
        k.startswith("pca") for k in report["detectors"])
    assert report["detectors"]["random"]["roc_auc"] == pytest.approx(0.5, abs=0.1)
    if trained["kind"] == "conv_ae":
        # Windows ending up to W-1 rows after the anomaly still hold it but are labelled normal (their
        # last row is): ~15 of ~370 windows per series, so a few percent of false alarms are expected.
        assert ours["roc_auc"] > 0.9 and ours["recall"] > 0.5 and ours["false_alarm_rate"] < 0.1
    out = cli("evaluate", "--model", str(trained["bundle"]), "--data", str(test), "--json", str(tmp_path / "m.json"))
    assert "ROC-AUC" in out.stdout and json.loads((tmp_path / "m.json").read_text())["windows"] == report["windows"]


def test_evaluate_plots_a_vaes_latent_space_and_refuses_for_an_autoencoder(trained, tmp_path):
    test = write_series_csv(tmp_path / "test.csv", rows=200, series=2, seed=12, anomaly_at=100)
    args = ["evaluate", "--model", str(trained["bundle"]), "--data", str(test), "--plot", str(tmp_path / "z.png")]
    proc = subprocess.run([sys.executable, "-m", "anomalyd_trainer", *args], capture_output=True, text=True)
    if trained["kind"] == "vae":
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "z.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert proc.returncode == 2 and "--plot needs a VAE bundle" in proc.stderr
        assert not (tmp_path / "z.png").exists()


def test_training_is_deterministic_on_cpu(tmp_path):
    data = write_series_csv(tmp_path / "d.csv", rows=300, series=1)
    cfg = load_config(write_config(tmp_path / "c.toml", data, train={"epochs": 3}))
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert a.thresholds.fitted == b.thresholds.fitted
