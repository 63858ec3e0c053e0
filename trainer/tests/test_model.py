"""Model shapes, score definitions and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalyd_trainer.calibrate import Thresholds, pot_threshold
from anomalyd_trainer.config import CalibrationConfig, ModelConfig
from anomalyd_trainer.model import build_model, scorer_for


@pytest.mark.parametrize("kind", ["conv_ae", "vae"])
@pytest.mark.parametrize("window", [1, 5, 32, 33])
def test_models_reconstruct_any_window_shape(kind, window):
    cfg = ModelConfig(kind=kind, channels=[8, 4], hidden=[16, 8], latent_dim=3)
    model = build_model(kind, 6, window, cfg).eval()
    x = torch.randn(7, window, 6)  # (B, W, F)
    assert model(x).shape == (7, window, 6)
    assert model.loss(x).ndim == 0
    outputs = scorer_for(cfg, model)(x)
    assert outputs[0].shape == (7,) and outputs[1].shape == (7, 6)


def test_ae_score_is_the_mean_squared_error_of_the_window():
    cfg = ModelConfig(kind="conv_ae", channels=[8], kernel_size=3)
    model = build_model("conv_ae", 4, 12, cfg).eval()
    x = torch.randn(5, 12, 4)
    score, feature_scores = scorer_for(cfg, model)(x)
    err = ((model(x) - x) ** 2).detach().numpy()
    np.testing.assert_allclose(score.detach().numpy(), err.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(feature_scores.detach().numpy(), err.mean(axis=1), rtol=1e-5)


@pytest.mark.parametrize("vae_score", ["kl", "nll"])
def test_vae_scores_are_latent_likelihoods(vae_score):
    cfg = ModelConfig(kind="vae", hidden=[16], latent_dim=4, vae_score=vae_score)
    model = build_model("vae", 5, 1, cfg).eval()
    x = torch.randn(9, 1, 5)
    score, feature_scores, mu, logvar = (t.detach().numpy() for t in scorer_for(cfg, model)(x))
    if vae_score == "nll":
        expected = 0.5 * (mu**2).sum(1) + 2 * math.log(2 * math.pi)
    else:
        expected = 0.5 * (mu**2 + np.exp(logvar) - logvar - 1).sum(1)
    np.testing.assert_allclose(score, expected, rtol=1e-5)
    np.testing.assert_allclose(feature_scores, (x.numpy() ** 2).mean(1), rtol=1e-6)


def test_pot_recovers_an_exponential_tail():
    """Exp(1) has P(X > t) = e^-t: the threshold at false-alarm rate q is -ln q."""
    scores = np.random.default_rng(0).exponential(size=200_000)
    for q in (1e-3, 1e-4):
        pot = pot_threshold(scores, 0.98, q, 20)
        assert abs(pot["xi"]) < 0.05
        assert pot["value"] == pytest.approx(-math.log(q), rel=0.05)


def test_thresholds_refuse_to_normalise_before_fit_and_fall_back_to_quantile():
    t = Thresholds(CalibrationConfig())
    with pytest.raises(RuntimeError, match="before fit"):
        t.normalise(np.ones(3))
    t.fit(np.linspace(0.1, 1.0, 100))  # 2 points above the 98% quantile: too few for POT
    assert t.fitted["method"] == "quantile" and t.fitted["pot"]["value"] is None
    assert t.normalise(np.array([t.value]))[0] == pytest.approx(1.0)


@pytest.mark.parametrize("kind,window", [("conv_ae", 13), ("vae", 13), ("conv_ae", 1)])
def test_padded_and_mlp_graphs_export_with_parity(kind, window, tmp_path):
    """W not a multiple of 2**depth exercises the edge padding (ONNX Pad) and the crop."""
    from anomalyd_trainer.bundle import export_onnx, parity_check

    cfg = ModelConfig(kind=kind, channels=[8, 4], hidden=[16], latent_dim=3)
    scorer = scorer_for(cfg, build_model(kind, 5, window, cfg))
    export_onnx(scorer, kind, window, 5, tmp_path / "m.onnx", 17)
    real = np.random.default_rng(1).standard_normal((50, window, 5)).astype(np.float32)
    assert parity_check(scorer, tmp_path / "m.onnx", real, trials=4, seed=0) < 1e-4
