"""`anomalyd-train benchmark skab|nslkdd`: detection quality on the public benchmarks, through the bundles.

Every figure comes from a bundle exported to ONNX and scored by onnxruntime, as the daemon scores
it, at the bundle's own threshold (a window is anomalous when its score / threshold > 1), next to
baselines trained and calibrated by the same procedure (evaluate.py). Nothing here looks at the
labels it reports on to choose anything: see docs/quality.md for where each choice was made.

- SKAB (the leaderboard's outlier protocol): one bundle per experiment file, trained on its first
  400 rows (`trainer/configs/skab-convae.toml`, `--set` applies), tested on the rest of the file.
  Confusion counts are pooled over files as SKAB's `core/metrics.py` does (FAR = FP/(FP+TN),
  F1 = TP/(TP+(FN+FP)/2)); reported on valve1 (where methods were chosen), valve2 + other (never
  used to choose) and all 34 files.
- NSL-KDD: one bundle trained on the normal rows of KDDTrain+_20Percent
  (`trainer/configs/nslkdd-vae.toml`), reported on the selection set (the training file's attacks
  and its held-out normal rows, where choices were made) and on KDDTest+.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import __version__
from .bundle import Bundle, export_onnx, write_bundle
from .config import Config, ModelConfig, load_config
from .data import LABEL, SERIES, load_table, split_parts
from .evaluate import Scored, format_table, metrics, report, score_detectors
from .model import build_model, multiply_adds, scorer_for
from .train import train

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO.parent / "shared" / "datasets"
SKAB_TRAIN_ROWS = 400
SKAB_SUBSETS = {"valve1 (selection)": ("valve1",), "valve2 + other (held out)": ("valve2", "other"),
                "all 34 files": ("valve1", "valve2", "other")}
# Quoted, not measured here: SKAB's README leaderboard (outlier detection, waico/SKAB) and the
# dataset README in ../shared/datasets. Their protocol differs (see docs/quality.md).
# (name, F1, false-alarm rate, missed-alarm rate)
SKAB_PUBLISHED = [("Conv-AE (SKAB leaderboard)", 0.78, 0.1355, 0.2802),
                  ("MSET (SKAB leaderboard)", 0.78, 0.3973, 0.1413),
                  ("T²+Q, PCA (SKAB leaderboard)", 0.76, 0.2662, 0.2492),
                  ("T² (SKAB leaderboard)", 0.66, 0.192, None),
                  ("LSTM-AE (SKAB leaderboard)", 0.74, 0.2996, 0.2592)]
NSLKDD_PUBLISHED = ("Published on KDDTest+ (../shared/datasets/README.md): semi-supervised autoencoders 88.3% (AE) "
                    "to 90.2% (AutoIDS) accuracy; PCA reconstruction ROC-AUC about 0.96; β-VAE on normal traffic, "
                    "reconstruction ROC-AUC 0.962–0.968, k-NN distance in latent space 0.975 (as quoted in issue "
                    "11).")
CELLS = ["roc_auc", "average_precision", "precision", "recall", "f1", "false_alarm_rate", "missed_alarm_rate",
         "accuracy"]
HEAD = ["detector", "ROC-AUC", "AUC-PR", "precision", "recall", "F1", "false-alarm", "missed", "accuracy"]


# === Inference cost ===


def windows_per_second(onnx_path: Path, window: int, n_features: int, batch: int = 64, seconds: float = 1.5) -> float:
    """Windows/s of one onnxruntime session with one intra-op thread (the daemon's setting)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, window, n_features)).astype(np.float32)
    sess.run(None, {"window": x})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        sess.run(None, {"window": x})
        runs += 1
    return runs * batch / (time.perf_counter() - started)


def inference_cost(model_cfg: ModelConfig, window: int, n_features: int) -> dict:
    """Multiply-adds per window and onnxruntime windows/s per core of this architecture (untrained weights)."""
    scorer = scorer_for(model_cfg, build_model(model_cfg.kind, n_features, window, model_cfg))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(scorer, model_cfg.kind, window, n_features, path, 17)
        rate = windows_per_second(path, window, n_features)
    return {"window": window, "features": n_features, "multiply_adds": multiply_adds(scorer, window, n_features),
            "windows_per_s": rate}


# === SKAB ===


def _skab_files(data: Path) -> list[Path]:
    return [p for folder in ("valve1", "valve2", "other") for p in sorted((data / folder).glob("*.csv"))]


def _bundle_for(cfg: Config, bundles: Path) -> tuple[Bundle, str]:
    """The file's bundle: trained now, or reused from `bundles` when trained there by the same config."""
    out = bundles / cfg.export.name
    stamp = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if (out / "train-config.json").is_file() and (out / "train-config.json").read_text() == stamp:
        bundle = Bundle(out)
        return bundle, f"reused {out}"
    result = train(cfg, progress=False)
    write_bundle(result, out)
    (out / "train-config.json").write_text(stamp)
    return Bundle(out), f"{result.thresholds.describe()}; {result.seconds:.1f} s"


def anomalyd_binary() -> Path:
    """The daemon's binary for `anomalyd score`: $ANOMALYD_BIN, else the repository's release build."""
    path = Path(os.environ.get("ANOMALYD_BIN", REPO / "target/release/anomalyd"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no anomalyd binary (cargo build --release, or set ANOMALYD_BIN)")
    return path


def daemon_alarms(bundle: Bundle, path: Path, daemon_config: Path, skip_rows: int, work: Path) -> dict:
    """`anomalyd score --config daemon_config --alerts` on the file from the first test window's
    first row: per test window the daemon's threshold, anomaly_score, and whether the series' alert
    was firing (from its firing event's window up to the window that resolved it)."""
    w = bundle.meta["window"]["length"]
    lines = path.read_text().splitlines()
    sliced = work / path.name
    sliced.write_text("\n".join([lines[0]] + lines[1 + skip_rows - (w - 1):]) + "\n")
    scores, alerts = work / f"{path.stem}.scores.ndjson", work / f"{path.stem}.alerts.jsonl"
    command = [str(anomalyd_binary()), "score", "--quiet", "--model", str(bundle.path), "--input", str(sliced),
               "--config", str(daemon_config), "--output", str(scores), "--output-format", "ndjson",
               "--alerts", str(alerts)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"anomalyd score on {path}: {run.stderr.strip()}")
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    end = np.array([r["end_ts"] for r in rows])
    firing = np.zeros(len(rows), dtype=bool)
    started = None
    for event in (json.loads(line) for line in alerts.read_text().splitlines()):
        if event["event"] == "firing":
            started = event["window_end_ts"]
        else:
            firing |= (end >= started) & (end < event["window_end_ts"])
            started = None
    if started is not None:
        firing |= end >= started
    return {"anomaly_score": np.array([r["anomaly_score"] for r in rows]), "firing": firing,
            "threshold": np.array([r["threshold"] for r in rows]), "score": np.array([r["score"] for r in rows])}


def skab(config: Path, data: Path, overrides: list[str], folders: tuple[str, ...] = ("valve1", "valve2", "other"),
         log=print, daemon_configs: tuple[Path, ...] = (), bundles: Path | None = None) -> dict:
    """`daemon_configs`: also the daemon's own alerts (`anomalyd score` with each config's thresholds and
    alert policy); `bundles`: keep the trained bundles there and reuse them when the config is unchanged."""
    files = [p for p in _skab_files(data) if p.parent.name in folders]
    started = time.perf_counter()
    per_file: list[tuple[str, Scored]] = []
    cfg = None
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            cfg = load_config(config, overrides)
            cfg.data = dataclasses.replace(cfg.data, paths=[str(path)], head_rows=SKAB_TRAIN_ROWS)
            cfg.export.name = f"skab-{path.parent.name}-{path.stem}"
            bundle, how = _bundle_for(cfg, bundles or Path(tmp))
            scored = score_detectors(bundle, [str(path)], skip_rows=SKAB_TRAIN_ROWS)
            for daemon_config in daemon_configs:
                d = daemon_alarms(bundle, path, daemon_config, SKAB_TRAIN_ROWS, Path(tmp))
                if len(d["firing"]) != len(scored.labels):
                    raise RuntimeError(f"{path}: anomalyd scored {len(d['firing'])} test windows, the trainer "
                                       f"{len(scored.labels)}")
                key = f"anomalyd score --config {daemon_config.name}"
                scored.scores[key] = d["anomaly_score"]
                scored.alarms[key] = d["firing"]
            per_file.append((f"{path.parent.name}/{path.name}", scored))
            s = scored.scores["model"]
            log(f"{path.parent.name}/{path.name}: {len(s)} test windows, {scored.labels.mean():.0%} anomalous, "
                f"alarms {np.mean(s > 1):.0%}; {how}")
        cost = windows_per_second(bundle.path / "model.onnx", cfg.window.length, len(bundle.preprocessor.columns))
    subsets = {}
    for name, wanted in SKAB_SUBSETS.items():
        if set(wanted) <= set(folders):
            subsets[name] = _pooled([s for f, s in per_file if f.split("/")[0] in wanted])
    return {"benchmark": "skab", "files": len(files), "seconds": round(time.perf_counter() - started, 1),
            "config": str(config), "overrides": overrides, "subsets": subsets,
            "cost": {"window": cfg.window.length, "features": len(bundle.preprocessor.columns),
                     "multiply_adds": bundle.meta["validation"]["multiply_adds"], "windows_per_s": cost},
            "bench_cost": inference_cost(cfg.model, 64, 4),
            "thresholds": bundle.meta["thresholds"]["source"]}


def _pooled(scored: list[Scored]) -> dict:
    """Every detector's metrics over the windows of all these files (1.0 is each file's own threshold)."""
    y = np.concatenate([s.labels for s in scored])
    detectors = {}
    for key, name in (("model", "conv-AE (anomalyd)"), ("pca", "PCA reconstruction"), ("random", "random")):
        s = np.concatenate([x.scores[key] for x in scored])
        detectors[name] = metrics(y, s, s > 1)
    for key in scored[0].alarms:
        s = np.concatenate([x.scores[key] for x in scored])
        detectors[key] = metrics(y, s, np.concatenate([x.alarms[key] for x in scored]))
    detectors["always anomalous"] = metrics(y, np.ones(len(y)), np.ones(len(y), dtype=bool))
    return {"windows": int(len(y)), "anomalous_share": float(y.mean()), "files": len(scored),
            "unknown_categories": 0, "dropped": {}, "detectors": detectors}


# === NSL-KDD ===


def nslkdd_selection_set(cfg: Config):
    """Held-out normal rows of the normal-only training table (its validation and calibration tails)
    and every attack row of the training file: labelled data that is not KDDTest+."""
    normal = load_table(cfg)
    part = split_parts(normal.frame[SERIES].to_numpy(), cfg.train.val_fraction, cfg.train.calib_fraction)
    held_out_lines = set(normal.frame["_line"].to_numpy()[part > 0])
    everything = load_table(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, filter_column="")),
                            with_labels=True)
    f = everything.frame
    keep = (f[LABEL].to_numpy() == 1) | f["_line"].isin(held_out_lines).to_numpy()
    return f[keep]


def nslkdd(config: Path, data: Path, overrides: list[str], log=print) -> dict:
    started = time.perf_counter()
    cfg = load_config(config, overrides)
    train_file = data / "KDDTrain+_20Percent.txt"
    cfg.data = dataclasses.replace(cfg.data, paths=[str(train_file)])
    result = train(cfg, progress=False)
    log(f"trained {cfg.export.name} in {result.seconds:.1f} s; {result.thresholds.describe()}")
    subsets = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(result, Path(tmp) / cfg.export.name)
        bundle = Bundle(Path(tmp) / cfg.export.name)
        selection = Path(tmp) / "selection.csv"
        frame = nslkdd_selection_set(cfg)
        _write_selection(train_file, frame["_line"].to_numpy(), selection)
        for name, path in (("selection set (KDDTrain+_20Percent attacks + held-out normal)", selection),
                           ("KDDTest+", data / "KDDTest+.txt")):
            scored = score_detectors(bundle, [str(path)], train_paths=[str(train_file)])
            subsets[name] = report(scored, "VAE (anomalyd)")
            log(format_table(subsets[name]))
        cost = windows_per_second(Path(tmp) / cfg.export.name / "model.onnx", 1, len(bundle.preprocessor.columns))
    return {"benchmark": "nslkdd", "seconds": round(time.perf_counter() - started, 1), "config": str(config),
            "overrides": overrides, "subsets": subsets, "thresholds": bundle.meta["thresholds"]["source"],
            "cost": {"window": 1, "features": len(bundle.preprocessor.columns),
                     "multiply_adds": bundle.meta["validation"]["multiply_adds"], "windows_per_s": cost},
            "score_kind": bundle.meta["score_kind"]}


def _write_selection(train_file: Path, lines: np.ndarray, out: Path) -> None:
    """The selection set as a file in KDDTrain+'s own format (the bundle reads it like any input)."""
    text = train_file.read_text().splitlines()
    out.write_text("".join(text[n - 1] + "\n" for n in sorted(lines)))


# === Output ===


def markdown(result: dict) -> str:
    """The section of docs/quality.md this run writes."""
    lines = [f"Written by `anomalyd-train benchmark {result['benchmark']}` on {date.today().isoformat()} "
             f"(trainer {__version__}, {result['seconds']:.0f} s on this machine); config "
             f"`{Path(result['config']).resolve().relative_to(REPO)}`"
             + (f" with `{' '.join('--set ' + o for o in result['overrides'])}`" if result["overrides"] else "")
             + f"; thresholds from {_source(result['thresholds'])}.", ""]
    for name, rep in result["subsets"].items():
        lines += [f"**{name}**: {rep['windows']:,} windows, {rep['anomalous_share']:.1%} anomalous"
                  + (f", {rep['files']} files" if "files" in rep else ""), "",
                  "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        for det, m in rep["detectors"].items():
            cells = ["–" if m[c] is None else (f"{m[c]:.1%}" if c in ("false_alarm_rate", "missed_alarm_rate",
                                                                       "accuracy") else f"{m[c]:.3f}") for c in CELLS]
            lines.append(f"| {det} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["benchmark"] == "skab":
        lines += ["Published, on SKAB's own protocol (quoted from the SKAB leaderboard):", "",
                  "| detector | F1 | false-alarm | missed |", "|---|---|---|---|"]
        lines += [f"| {n} | {f1:.2f} | {far:.2%} | {'–' if mar is None else f'{mar:.2%}'} |"
                  for n, f1, far, mar in SKAB_PUBLISHED]
        lines.append("")
    else:
        lines += [NSLKDD_PUBLISHED, ""]
    costs = [result["cost"]] + ([result["bench_cost"]] if "bench_cost" in result else [])
    lines += ["Inference (one onnxruntime session, one intra-op thread, batches of 64): "
              + "; ".join(f"W = {c['window']}, F = {c['features']}: {c['multiply_adds']:,} multiply-adds per window, "
                          f"{c['windows_per_s']:,.0f} windows/s" for c in costs) + "."]
    return "\n".join(lines) + "\n"


def _source(src: dict) -> str:
    if src["kind"] == "cross_fit":
        return f"{src['folds']}-fold cross-fitting over time blocks"
    return f"the holdout tail ({src['calib_fraction']:.0%} of each series)"


def write_section(doc: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- benchmark NAME -->` and `<!-- /benchmark NAME -->` in doc."""
    begin, end = f"<!-- benchmark {name} -->", f"<!-- /benchmark {name} -->"
    old = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{text}{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old + ("\n" if old else "") + block + "\n"
    doc.write_text(new)


def printable(result: dict) -> str:
    out = []
    for name, rep in result["subsets"].items():
        out += [f"== {name} ==", format_table(rep)]
    c = result["cost"]
    out.append(f"inference: {c['multiply_adds']:,} multiply-adds per window, "
               f"{c['windows_per_s']:,.0f} windows/s per core")
    return "\n".join(out)

