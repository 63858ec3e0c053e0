"""How the NSL-KDD VAE's hyperparameters were chosen — without KDDTest+.

Model selection uses the training file only: each candidate is trained on its normal rows (as the
default config does) and ranked by ROC-AUC on a labelled validation set made of the normal rows it
never trained on (the validation and calibration tails) and the training file's attack rows.
KDDTest+ is used once, by `anomalyd-train evaluate`, for the chosen config.

    .venv/bin/python scripts/select_nslkdd_vae.py     (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from anomalyd_trainer.config import load_config
from anomalyd_trainer.data import LABEL, SERIES, load_table, split_parts
from anomalyd_trainer.evaluate import PCABaseline
from anomalyd_trainer.model import scorer_for
from anomalyd_trainer.train import prepare, score_windows, train

CONFIG = Path(__file__).resolve().parent.parent / "trainer/configs/nslkdd-vae.toml"
GRID = {"model.vae_score": ['"kl"', '"nll"'], "model.beta": [0.25, 0.5, 1.0], "model.latent_dim": [8, 16],
        "model.hidden": ["[64, 32]", "[128, 64]"]}


def validation_set(cfg):
    """Held-out normal rows (tails of the normal-only training table) + every attack row of the file."""
    normal = load_table(cfg)
    part = split_parts(normal.frame[SERIES].to_numpy(), cfg.train.val_fraction, cfg.train.calib_fraction)
    held_out_lines = set(normal.frame["_line"].to_numpy()[part > 0])
    everything = load_table(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, filter_column="")),
                            with_labels=True)
    f = everything.frame
    keep = (f[LABEL].to_numpy() == 1) | f["_line"].isin(held_out_lines).to_numpy()
    everything.frame = f[keep].reset_index(drop=True)
    return everything


def main() -> None:
    base = load_config(CONFIG)
    val = validation_set(base)
    rows = []
    for values in itertools.product(*GRID.values()):
        overrides = [f"{k}={v}" for k, v in zip(GRID, values)]
        cfg = load_config(CONFIG, overrides)
        result = train(cfg, progress=False)
        prepared = prepare(val, result.preprocessor, cfg)
        labels = val.frame[LABEL].to_numpy()[prepared.windows.end_row]
        scores, _ = score_windows(scorer_for(cfg.model, result.model), prepared.windows.x)
        rows.append((roc_auc_score(labels, scores), " ".join(overrides), result.seconds))
        print(f"{rows[-1][0]:.4f}  {rows[-1][1]}  ({result.seconds:.0f} s)", flush=True)

    result = train(base, progress=False)
    normal = load_table(base)
    part = split_parts(normal.frame[SERIES].to_numpy(), base.train.val_fraction, base.train.calib_fraction)
    fit = prepare(normal, result.preprocessor, base, part)
    pca = PCABaseline(fit.windows.x[part[fit.windows.end_row] == 0])
    prepared = prepare(val, result.preprocessor, base)
    labels = val.frame[LABEL].to_numpy()[prepared.windows.end_row]
    print(f"{roc_auc_score(labels, pca.score(prepared.windows.x)):.4f}  PCA baseline (k={pca.k})")
    best = max(rows)
    print(f"best: {best[0]:.4f}  {best[1]}; validation set: {len(labels)} rows, {np.mean(labels):.1%} attacks")


if __name__ == "__main__":
    main()
