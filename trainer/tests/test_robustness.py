"""Inputs that used to break training or make every window an alarm (issue 11, item 7), through the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anomalyd_trainer import cli
from anomalyd_trainer.bundle import Bundle
from anomalyd_trainer.config import load_config
from anomalyd_trainer.data import load_table
from anomalyd_trainer.train import prepare
from conftest import REPO, write_config, write_series_csv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anomalyd_trainer", "train", "--quiet", *args],
                          capture_output=True, text=True)


def write_rows(path: Path, columns: dict[str, np.ndarray]) -> Path:
    n = len(next(iter(columns.values())))
    lines = ["ts,host," + ",".join(columns)]
    lines += [f"{1_700_000_000 + i},h0," + ",".join(f"{v[i]:.6f}" for v in columns.values()) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def anomaly_scores(bundle: Path, records: Path) -> np.ndarray:
    b = Bundle(bundle)
    cfg = b.data_config(paths=[str(records)])
    return b.run(prepare(load_table(cfg), b.preprocessor, cfg).windows.x)["score"] / b.threshold


def test_186_rows_with_w32_train_by_cross_fitting(tmp_path):
    data = write_series_csv(tmp_path / "short.csv", rows=186, series=1)
    cfg = write_config(tmp_path / "c.toml", data, window={"length": 32, "stride": 1}, calibration={"min_excesses": 20})
    proc = train_cli("--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    t = json.loads((tmp_path / "tiny/model.json").read_text())["thresholds"]
    # 2 blocks of 93 rows, 62 windows each: every calibration score is out of fold.
    assert t["source"] == {"kind": "cross_fit", "folds": 2, "epochs": t["source"]["epochs"]}
    assert t["calibration_windows"] == 124 and t["method"] == "quantile"
    assert t["false_alarm_rate"] == pytest.approx(10 / 124)
    assert "cross-fit" in proc.stdout


def test_byte_valued_metrics_export_and_a_parity_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """Counters around 1e7 that keep growing: the validation tail lies far outside the training range,
    its scores are large, and float32 rounding alone exceeds any absolute tolerance."""
    rng = np.random.default_rng(0)
    t = np.arange(600)
    data = write_rows(tmp_path / "bytes.csv", {"rx_bytes": 1e7 + 4e4 * t + rng.normal(0, 2e4, 600),
                                               "tx_bytes": 2e7 + rng.normal(0, 1e5, 600)})
    cfg = write_config(tmp_path / "c.toml", data, data={"feature_columns": ["rx_bytes", "tx_bytes"]},
                       window={"length": 8, "stride": 1})
    proc = train_cli("--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "tiny/model.json").read_text())
    assert meta["validation"]["onnx_max_error"] < 1e-4

    import anomalyd_trainer.bundle as bundle

    monkeypatch.setattr(bundle, "parity_check", lambda *a, **k: {"max_error": 0.01, "max_abs_error": 5.0})
    assert cli.main(["export", "--run", str(tmp_path / "runs/tiny"), "--out-dir", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.onnx: onnxruntime differs from PyTorch by 0.01 of the scores' scale" in err


def test_a_flat_line_is_quiet_and_a_departure_from_it_is_not(tmp_path):
    flat = {"cpu": np.full(600, 50.0), "mem": np.full(600, 30.0), "lat": np.full(600, 10.0)}
    data = write_rows(tmp_path / "flat.csv", flat)
    cfg = write_config(tmp_path / "c.toml", data, window={"length": 16, "stride": 1, "constant_features": "keep"})
    proc = train_cli("--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert np.all(anomaly_scores(tmp_path / "tiny", data) < 0.5)
    stepped = dict(flat, cpu=np.r_[np.full(300, 50.0), np.full(300, 52.5)])  # 5% up
    assert np.mean(anomaly_scores(tmp_path / "tiny", write_rows(tmp_path / "step.csv", stepped)) > 1) > 0.02


def test_flow_features_constant_in_normal_traffic_are_kept_and_departures_score(tmp_path, monkeypatch):
    """A network without ICMP is normal: icmp_share is constant 0 in training, and ICMP later is news."""
    spec = importlib.util.spec_from_file_location("gen_flows", REPO / "scripts" / "gen_flows.py")
    gen = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gen_flows", gen)
    spec.loader.exec_module(gen)
    flows = tmp_path / "all.ndjson"
    gen.main(["--hosts", "6", "--hours", "6", "--seed", "3", "--out-flows", str(flows)])
    lines = flows.read_text().splitlines()
    quiet = [line for line in lines if '"proto":"ICMP' not in line]
    (tmp_path / "train.ndjson").write_text("\n".join(quiet) + "\n")
    cfg = tmp_path / "flows.toml"
    cfg.write_text((REPO / "trainer/configs/flows-vae.toml").read_text()
                   .replace("../../runs/data/flows-train.ndjson", str(tmp_path / "train.ndjson")))
    proc = train_cli("--config", str(cfg), "--set", "train.epochs=15", "--runs-dir", str(tmp_path / "runs"),
                     "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    icmp = json.loads((tmp_path / "flows-vae/model.json").read_text())["preprocess"]["columns"]
    icmp = next(c for c in icmp if c["name"] == "icmp_share")
    assert icmp["mean"] == 0.0 and icmp["std"] == 0.01

    # The last hour again, with ICMP echo flows added to one host's minutes.
    pings = [json.loads(line) for line in quiet[-4000:]]
    host = pings[-1]["src_addr"]
    extra = [dict(p, proto="ICMP", src_port=0, dst_port=0, tcp_flags=0, bytes=84, packets=1)
             for p in pings if p["src_addr"] == host][:300]
    test = tmp_path / "test.ndjson"
    test.write_text("\n".join(json.dumps(p) for p in sorted(pings + extra, key=lambda p: p["time_flow_end_ns"])) + "\n")
    bundle = Bundle(tmp_path / "flows-vae")
    cfg_test = bundle.data_config(paths=[str(test)])
    prepared = prepare(load_table(cfg_test), bundle.preprocessor, cfg_test)
    out = bundle.run(prepared.windows.x)
    hosts = prepared.table.frame["_series"].to_numpy()[prepared.windows.end_row]
    shares = prepared.table.frame["icmp_share"].to_numpy()[prepared.windows.end_row]
    pinged = (hosts == host) & (shares > 0.3)  # a third of its flows ICMP: 30 "standard deviations"
    assert pinged.sum() >= 3
    assert np.all(out["score"][pinged] / bundle.threshold > 1)
    features = bundle.meta["features"]
    assert {features[i] for i in np.argmax(out["feature_scores"][pinged], axis=1)} == {"icmp_share"}


def test_calibration_config_is_checked(tmp_path, series_csv):
    from anomalyd_trainer.errors import InputError

    with pytest.raises(InputError, match=r"\[calibration\].source: 'sometimes' is not one of"):
        load_config(write_config(tmp_path / "c.toml", series_csv, calibration={"source": "sometimes"}))
