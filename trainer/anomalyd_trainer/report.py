"""report.png: what a person checks before shipping a bundle; and evaluate's latent-space plot.

Top row: loss curves, and the calibration score histogram with both thresholds; for a VAE also the
latent space: a 2-D projection (principal components) of the latent means of held-out normal
windows, coloured by score. Bottom row: three validation windows (lowest, median and highest
score) against their reconstructions, on the feature that contributes most to each.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .model import scorer_for  # noqa: E402
from .train import TrainResult, score_windows  # noqa: E402


def write_report(result: TrainResult, path: Path) -> None:
    cfg = result.cfg
    model = result.model.cpu().eval()
    names = result.preprocessor.names
    fig = plt.figure(figsize=(13, 7.5), dpi=90)
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1])
    fig.suptitle(f"{cfg.export.name}: {cfg.model.kind}, W={cfg.window.length}, F={len(names)}, "
                 f"{result.summary['windows']['train']} training windows, {result.seconds:.0f} s", fontsize=12)

    ax = fig.add_subplot(grid[0, 0])
    epochs = [h["epoch"] for h in result.history]
    ax.plot(epochs, [h["train_loss"] for h in result.history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in result.history], label="validation")
    ax.axvline(result.best_epoch, color="grey", ls=":", label=f"kept: epoch {result.best_epoch}")
    ax.set(title="Loss", xlabel="epoch", yscale="log")
    ax.legend()

    vae = cfg.model.kind == "vae"
    ax = fig.add_subplot(grid[0, 1] if vae else grid[0, 1:])
    scores = result.calib_scores
    bins = np.geomspace(max(scores.min(), 1e-9), max(scores.max(), result.thresholds.value) * 1.05, 60)
    ax.hist(scores, bins=bins, color="tab:blue", alpha=0.8)
    t = result.thresholds.fitted
    ax.axvline(t["quantile"]["value"], color="tab:orange", ls="--", label=f"{t['quantile']['q']:.2%} quantile")
    if t["pot"]["value"] is not None:
        ax.axvline(t["pot"]["value"], color="tab:red", label=f"POT at {t['pot']['false_alarm_rate']:g} false alarms")
    ax.set(title=f"{len(scores)} out-of-sample normal scores; {t['method']} → 1.0",
           xlabel="raw calibration score", xscale="log", yscale="log", ylabel="windows")
    ax.legend()

    x = result.splits["val"].x
    val_scores, feats = score_windows(scorer_for(cfg.model, model), x)
    if vae:
        with torch.no_grad():
            mu = model.encode(torch.from_numpy(x))[0].numpy()
        ax = fig.add_subplot(grid[0, 2])
        basis = _projection(mu)
        p = (mu - basis[0]) @ basis[1]
        dots = ax.scatter(p[:, 0], p[:, 1], c=val_scores / result.thresholds.value, s=4, cmap="viridis",
                          norm=matplotlib.colors.LogNorm())
        fig.colorbar(dots, ax=ax, label="anomaly_score")
        ax.set(title=f"Latent means, {len(mu)} validation windows", xlabel="PC 1", ylabel="PC 2")
    picks = np.argsort(val_scores)[[0, len(val_scores) // 2, -1]]
    with torch.no_grad():
        recon = model(torch.from_numpy(x[picks])).numpy()
    for k, (i, label) in enumerate(zip(picks, ("lowest", "median", "highest"), strict=True)):
        ax = fig.add_subplot(grid[1, k])
        f = int(np.argmax(feats[i]))
        if cfg.window.length > 1:
            ax.plot(x[i, :, f], label="input", color="black")
            ax.plot(recon[k, :, f], label="reconstruction", color="tab:green")
            ax.set(xlabel="time step", ylabel=f"{names[f]} (scaled)")
        else:
            top = np.argsort(feats[i])[-8:]
            ax.barh(range(len(top)), x[i, 0, top], color="black", height=0.4, label="input")
            ax.barh(np.arange(len(top)) + 0.4, recon[k, 0, top], color="tab:green", height=0.4,
                    label="reconstruction")
            ax.set_yticks(np.arange(len(top)) + 0.2, [names[j][:24] for j in top], fontsize=7)
            ax.set(xlabel="scaled value")
        ax.set_title(f"{label} validation score: {val_scores[i] / result.thresholds.value:.2f}×threshold",
                     fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _projection(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the two leading principal directions (Z, 2) of latent means."""
    mean = mu.mean(axis=0)
    _, _, vt = np.linalg.svd(mu - mean, full_matrices=False)
    return mean, vt[:2].T


def write_latent_plot(mu: np.ndarray, labels: np.ndarray, path: Path, title: str, seed: int = 0) -> None:
    """evaluate --plot: latent means of normal and anomalous test windows on their two principal components."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(mu))[:20_000]
    mu, labels = mu[pick], labels[pick]
    basis = _projection(mu)
    p = (mu - basis[0]) @ basis[1]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=90)
    for value, name, color in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        ax.scatter(p[labels == value, 0], p[labels == value, 1], s=3, alpha=0.4, color=color,
                   label=f"{name} ({int(np.sum(labels == value))})")
    ax.set(title=title, xlabel="PC 1 of the latent means", ylabel="PC 2")
    ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
