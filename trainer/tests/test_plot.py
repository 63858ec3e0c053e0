"""`anomalyd-train plot`: a backtest drawn to a PNG that opens."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from anomalyd_trainer.cli import run
from anomalyd_trainer.errors import InputError
from anomalyd_trainer.plot import read_alerts, write_plot

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "contracts/skab-convae/records.csv"


def _backtest(tmp_path: Path) -> tuple[Path, Path]:
    """Scores and alerts as `anomalyd score` writes them, over the sample stream's times."""
    scores = tmp_path / "scores.csv"
    rows = ["series,end_ts,score,threshold,anomaly_score,top_features"]
    start = 1767607232
    for i in range(120):
        anomaly = 1.4 if 60 <= i < 70 else 0.2
        rows.append(f"records.csv,{start + i},{anomaly * 2},2.0,{anomaly},Pressure|Current|Voltage")
    scores.write_text("\n".join(rows) + "\n")
    alerts = tmp_path / "alerts.jsonl"
    events = [{"event": "firing", "series": "records.csv", "started_ts": start + 60.0, "window_end_ts": start + 60.0},
              {"event": "resolved", "series": "records.csv", "started_ts": start + 60.0, "window_end_ts": start + 70.0}]
    alerts.write_text("".join(json.dumps(e) + "\n" for e in events))
    return scores, alerts


def test_plot_writes_a_png_with_a_panel_pair_per_series(tmp_path):
    scores, alerts = _backtest(tmp_path)
    out = tmp_path / "backtest.png"
    assert run(["plot", "--model", str(REPO / "models/skab-convae"), "--records", str(RECORDS),
                "--scores", str(scores), "--alerts", str(alerts), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = plt.imread(out).shape
    assert width > 800 and height > 250
    assert read_alerts(alerts) == {"records.csv": [(1767607292.0, 1767607302.0)]}


def test_a_file_that_is_not_score_output_is_named(tmp_path):
    bad = tmp_path / "scores.csv"
    bad.write_text("series,end_ts\nrecords.csv,not-a-time\n")
    with pytest.raises(InputError, match="scores.csv, line 2: not a row of anomalyd score's output"):
        write_plot(str(REPO / "models/skab-convae"), str(RECORDS), bad, None, tmp_path / "x.png")
