"""How the NSL-KDD VAE's hyperparameters were chosen — without KDDTest+.

Model selection uses the training file only: each candidate is trained on its normal rows (as the
default config does) and ranked by ROC-AUC on a labelled selection set made of the normal rows it
never trained on (the validation and calibration tails) and the training file's attack rows
(`anomalyd_trainer.benchmark.nslkdd_selection_set`). KDDTest+ is used once, by
`anomalyd-train benchmark nslkdd`, for the chosen config.

    .venv/bin/python scripts/select_nslkdd_vae.py [--set model.hidden=[64,32] ...]   (about 8 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from anomalyd_trainer.benchmark import nslkdd_selection_set
from anomalyd_trainer.config import load_config
from anomalyd_trainer.data import LABEL, Table, apply_nan_policy, load_table
from anomalyd_trainer.evaluate import pca_fit_fn
from anomalyd_trainer.model import scorer_for
from anomalyd_trainer.train import calibrate, prepare, score_windows, train

CONFIG = Path(__file__).resolve().parent.parent / "trainer/configs/nslkdd-vae.toml"
GRID = {"model.vae_score": ['"density"', '"nll"', '"kl"'], "model.vae_reconstruction": ["true", "false"],
        "model.beta": [0.25, 1.0], "model.latent_dim": [8, 16]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], help="fixed overrides for every candidate")
    args = p.parse_args()
    base = load_config(CONFIG, args.set)
    frame = nslkdd_selection_set(base)
    val = Table(frame.reset_index(drop=True), base.data.feature_columns, base.data.categorical_columns)
    labels = frame[LABEL].to_numpy()
    rows = []
    for values in itertools.product(*GRID.values()):
        overrides = [*args.set, *(f"{k}={v}" for k, v in zip(GRID, values, strict=True))]
        cfg = load_config(CONFIG, overrides)
        result = train(cfg, progress=False)
        x = prepare(val, result.preprocessor, cfg).windows.x
        scores, _ = score_windows(scorer_for(cfg.model, result.model), x)
        rows.append((roc_auc_score(labels, scores), " ".join(overrides), result.seconds))
        print(f"{rows[-1][0]:.4f}  {rows[-1][1]}  ({result.seconds:.0f} s)", flush=True)

    table = apply_nan_policy(load_table(base), base.window.nan_policy)
    pca = calibrate(base, table, pca_fit_fn(base, table)).final
    print(f"{roc_auc_score(labels, pca.score(prepare(val, pca.preprocessor, base).windows.x)):.4f}  "
          f"PCA baseline (k={pca.model.k})")
    best = max(rows)
    print(f"best: {best[0]:.4f}  {best[1]}; selection set: {len(labels)} rows, {np.mean(labels):.1%} attacks")


if __name__ == "__main__":
    main()
