"""The record → window contract (docs/model-contract.md §1–2) and its bad-input errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from anomalyd_trainer.config import load_config
from anomalyd_trainer.data import (
    Preprocessor,
    apply_nan_policy,
    gather_windows,
    load_table,
    segment_ids,
    split_parts,
    time_blocks,
    window_ends,
)
from anomalyd_trainer.errors import InputError
from anomalyd_trainer.train import train
from conftest import write_config, write_series_csv


def brute_force_ends(segments: list[int], length: int, stride: int) -> list[int]:
    """The contract read literally: after row i of a segment, emit when i+1 >= W and (i+1-W) % S == 0."""
    ends, pos, prev = [], 0, None
    for row, seg in enumerate(segments):
        pos = pos + 1 if seg == prev else 1
        prev = seg
        if pos >= length and (pos - length) % stride == 0:
            ends.append(row)
    return ends


@pytest.mark.parametrize("length,stride", [(1, 1), (3, 1), (4, 2), (5, 3), (8, 8)])
def test_window_ends_follow_the_contract(length, stride):
    rng = np.random.default_rng(length * 10 + stride)
    segments = np.repeat(np.arange(6), rng.integers(1, 20, 6))
    assert window_ends(segments, length, stride).tolist() == brute_force_ends(segments.tolist(), length, stride)


def test_gaps_and_series_changes_start_new_segments():
    series = np.array(["a", "a", "a", "b", "b", "b"])
    ts = np.array([0.0, 1.0, 9.0, 10.0, 11.0, 12.0])
    assert segment_ids(series, ts, max_gap_secs=5).tolist() == [0, 0, 1, 2, 2, 2]
    assert segment_ids(series, ts, max_gap_secs=0).tolist() == [0, 0, 0, 1, 1, 1]


def test_splits_are_time_ordered_tails_of_each_series():
    part = split_parts(np.array(["a"] * 20 + ["b"] * 10), 0.2, 0.1)
    assert part[:20].tolist() == [0] * 14 + [1] * 4 + [2] * 2
    assert part[20:].tolist() == [0] * 7 + [1] * 2 + [2] * 1


def test_short_series_keep_a_few_validation_windows():
    """186 rows, W = 32: 15% is 28 rows, not one window; min_rows gives the tail W + 7 rows."""
    part = split_parts(np.array(["a"] * 186), 0.15, 0.0, min_rows=39)
    assert part.tolist() == [0] * 147 + [1] * 39
    assert split_parts(np.array(["a"] * 60), 0.15, 0.0, min_rows=39).tolist() == [0] * 51 + [1] * 9


def test_time_blocks_cut_each_series_in_order():
    series = np.array(["a"] * 400 + ["b"] * 400)
    blocks = time_blocks(series, folds=5, min_rows=128)  # 400 // 128 = 3 blocks of >= 128 rows
    assert blocks[:400].tolist() == [0] * 134 + [1] * 133 + [2] * 133
    assert blocks[400:].tolist() == blocks[:400].tolist()
    assert time_blocks(np.array(["a"] * 100), folds=5, min_rows=128).max() == 1  # never fewer than 2
    assert time_blocks(np.array(["a"] * 10_000), folds=5, min_rows=128).max() == 4


def test_centered_columns_lose_their_level_and_keep_their_shape():
    frame = pd.DataFrame({"temp": np.linspace(20, 80, 200), "x": np.sin(np.arange(200.0))})
    pre = Preprocessor.fit(frame, ["temp", "x"], [], center=["temp"])
    assert [c["window"] for c in pre.columns] == ["center", "none"]
    rows, _ = pre.transform(frame)
    x = pre.center(gather_windows(rows, np.arange(9, 200), 10).x)
    np.testing.assert_allclose(x[:, :, 0].mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(x[0, :, 0], x[-1, :, 0], atol=1e-5)  # same slope at 20° and at 80°
    np.testing.assert_array_equal(x[:, :, 1], gather_windows(rows, np.arange(9, 200), 10).x[:, :, 1])


def test_rows_are_sorted_by_time_and_duplicate_timestamps_dropped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("ts,host,cpu,mem,lat\n3,a,3,0,0\n1,a,1,0,0\n2,a,2,0,0\n2,a,99,0,0\n1,b,5,0,0\n")
    cfg = load_config(write_config(tmp_path / "c.toml", path))
    table = load_table(cfg)
    assert table.frame["cpu"].tolist() == [1, 2, 3, 5]
    assert table.dropped["duplicate_timestamp"] == 1


def test_nan_policies(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("ts,host,cpu,mem,lat\n1,a,,1,1\n2,a,2,1,1\n3,a,nan,1,1\n4,a,inf,1,1\n5,a,5,1,1\n")
    cfg = load_config(write_config(tmp_path / "c.toml", path))
    with pytest.raises(InputError) as e:
        apply_nan_policy(load_table(cfg), "error")
    assert "line 2" in str(e.value) and "'cpu'" in str(e.value) and str(path) in str(e.value)
    dropped = apply_nan_policy(load_table(cfg), "drop")
    assert dropped.frame["cpu"].tolist() == [2, 5] and dropped.dropped["nan"] == 3
    filled = apply_nan_policy(load_table(cfg), "ffill")
    assert filled.frame["cpu"].tolist() == [2, 2, 2, 5] and filled.dropped["nan"] == 1


@pytest.mark.parametrize("body,needle", [
    ("ts,host,cpu,mem,lat\n1,a,1,1,1\n2,a,abc,1,1\n", "line 3, column 'cpu': not a number: 'abc'"),
    ("ts,host,cpu,mem\n1,a,1,1\n", "column 'lat': missing column(s) ['lat']"),
    ("ts,host,cpu,mem,lat\n1,a,1,1,1\nyesterday,a,1,1,1\n", "line 3, column 'ts': not a timestamp"),
])
def test_bad_values_name_file_line_and_column(tmp_path, body, needle):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    cfg = load_config(write_config(tmp_path / "c.toml", path))
    with pytest.raises(InputError) as e:
        load_table(cfg)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_ndjson_lines_are_named(tmp_path):
    path = tmp_path / "d.ndjson"
    path.write_text('{"ts": 1, "host": "a", "cpu": 1, "mem": 1, "lat": 1}\n\n{"ts": 2, "host": "a", "cpu": "x"\n')
    cfg = load_config(write_config(tmp_path / "c.toml", path))
    with pytest.raises(InputError, match="line 3: not valid JSON"):
        load_table(cfg)


def test_parquet_reads_like_csv(tmp_path, series_csv):
    pq = tmp_path / "d.parquet"
    pd.read_csv(series_csv).to_parquet(pq)
    a = load_table(load_config(write_config(tmp_path / "a.toml", series_csv))).frame
    b = load_table(load_config(write_config(tmp_path / "b.toml", pq))).frame
    np.testing.assert_allclose(a[["cpu", "mem", "lat", "_ts"]].to_numpy(), b[["cpu", "mem", "lat", "_ts"]].to_numpy())


def test_constant_feature_is_an_error_unless_kept(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("ts,host,cpu,mem,lat\n" + "".join(f"{i},a,{i},7,{i % 3}\n" for i in range(50)))
    frame = load_table(load_config(write_config(tmp_path / "c.toml", path))).frame
    with pytest.raises(InputError, match="column 'mem': constant in the training data"):
        Preprocessor.fit(frame, ["cpu", "mem", "lat"], [], constant_features="error", source=str(path))
    kept = Preprocessor.fit(frame, ["cpu", "mem", "lat"], [], constant_features="keep", source=str(path))
    assert kept.columns[1]["std"] == pytest.approx(0.07) and kept.columns[1]["mean"] == 7.0


def test_scaling_log1p_and_one_hot_with_unknown_categories():
    frame = pd.DataFrame({"bytes": [0.0, 9.0, 99.0], "proto": ["tcp", "udp", "tcp"]})
    pre = Preprocessor.fit(frame, ["bytes"], ["proto"], log1p=["bytes"])
    assert pre.names == ["bytes", "proto=tcp", "proto=udp"]
    t = np.log1p([0.0, 9.0, 99.0])
    rows, unknown = pre.transform(pd.DataFrame({"bytes": [9.0, -5.0], "proto": ["udp", "icmp"]}))
    np.testing.assert_allclose(rows[:, 0], (np.log1p([9.0, 0.0]) - t.mean()) / t.std(), rtol=1e-6)
    assert rows[:, 1:].tolist() == [[0, 1], [0, 0]] and unknown == 1


def test_too_few_rows_for_one_window(tmp_path):
    path = write_series_csv(tmp_path / "short.csv", rows=10, series=1)
    cfg = load_config(write_config(tmp_path / "c.toml", path))
    with pytest.raises(InputError, match="too few rows for one window"):
        train(cfg, progress=False)


@pytest.mark.parametrize("setup,needle", [
    (lambda d: d / "missing.csv", "missing.csv: cannot read file"),
    (lambda d: (d / "bin.csv").write_bytes(b"\xff\xfe\x00bad") and d / "bin.csv", "bin.csv"),
])
def test_cli_prints_one_line_and_exit_code_2(tmp_path, setup, needle):
    path = setup(tmp_path)
    cfg = write_config(tmp_path / "c.toml", path)
    proc = subprocess.run([sys.executable, "-m", "anomalyd_trainer", "train", "--config", str(cfg), "--quiet",
                           "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "models")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("anomalyd-train: error: ") and needle in proc.stderr


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path, series_csv):
    with pytest.raises(InputError, match=r"\[window\].lenght: unknown key"):
        load_config(write_config(tmp_path / "a.toml", series_csv, window={"lenght": 3}))
    with pytest.raises(InputError, match=r"\[window\].length: expected int"):
        load_config(write_config(tmp_path / "b.toml", series_csv), ["window.length='x'"])
    with pytest.raises(InputError, match=r"\[model\].kind: 'lstm' is not one of"):
        load_config(write_config(tmp_path / "c.toml", series_csv), ["model.kind=lstm"])
    assert load_config(write_config(tmp_path / "d.toml", series_csv), ["window.length=4"]).window.length == 4
