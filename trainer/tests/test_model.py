"""Model shapes, score definitions and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalyd_trainer.config import ModelConfig
from anomalyd_trainer.model import build_model, multiply_adds, scorer_for


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


def test_conv_ae_passes_every_window_through_latent_dim_numbers():
    cfg = ModelConfig(kind="conv_ae", channels=[8, 4], kernel_size=3, latent_dim=5)
    model = build_model("conv_ae", 6, 32, cfg).eval()
    code = model.to_code(model.coder.encode(torch.randn(7, 32, 6)))
    assert code.shape == (7, 5)


def test_multiply_adds_count_the_conv_and_linear_layers():
    """F = 2, W = 8, channels [4], k = 3: conv down 4·4·2·3, code 16·3 and back 3·16, up 8·2·4·3."""
    cfg = ModelConfig(kind="conv_ae", channels=[4], kernel_size=3, latent_dim=3)
    model = build_model("conv_ae", 2, 8, cfg)
    assert multiply_adds(scorer_for(cfg, model), 8, 2) == 96 + 48 + 48 + 192


@pytest.mark.parametrize("vae_score", ["kl", "nll", "density"])
@pytest.mark.parametrize("reconstruction", [False, True])
def test_vae_scores_are_latent_likelihoods(vae_score, reconstruction):
    cfg = ModelConfig(kind="vae", hidden=[16], latent_dim=4, vae_score=vae_score, vae_reconstruction=reconstruction)
    model = build_model("vae", 5, 1, cfg).eval()
    model.fit_normal(torch.randn(400, 1, 5))
    x = torch.randn(9, 1, 5)
    score, feature_scores, mu, logvar = (t.detach().numpy() for t in scorer_for(cfg, model)(x))
    if vae_score == "nll":
        expected = 0.5 * (mu**2).sum(1) + 2 * math.log(2 * math.pi)
    elif vae_score == "kl":
        expected = 0.5 * (mu**2 + np.exp(logvar) - logvar - 1).sum(1)
    else:
        expected = model.latent_nll(torch.from_numpy(mu)).numpy()
    if reconstruction:
        err = ((model.decode(torch.from_numpy(mu)) - x) ** 2).detach().numpy()
        expected = expected + 0.5 * err.sum(axis=(1, 2))
        np.testing.assert_allclose(feature_scores, err.mean(1), rtol=1e-5)
    else:
        np.testing.assert_allclose(feature_scores, (x.numpy() ** 2).mean(1), rtol=1e-6)
    np.testing.assert_allclose(score, expected, rtol=1e-5)


def test_latent_density_is_the_mixtures_negative_log_likelihood_up_to_a_constant():
    """Two clusters of normal codes: the fitted mixture is the one sklearn finds, shifted to be >= 0."""
    from sklearn.mixture import GaussianMixture

    cfg = ModelConfig(kind="vae", hidden=[8], latent_dim=2, vae_score="density")
    model = build_model("vae", 3, 1, cfg).eval()
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.3, (600, 1, 3)), rng.normal(3, 0.3, (600, 1, 3))]).astype(np.float32)
    model.fit_normal(torch.from_numpy(x))
    mu = model.encode(torch.from_numpy(x))[0].detach()
    ours = model.latent_nll(mu).detach().numpy()
    k = model.mix_log_norm.shape[0]
    reference = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=0).fit(mu.double().numpy())
    shift = ours + reference.score_samples(mu.double().numpy())
    assert k >= 2 and ours.min() >= 0
    np.testing.assert_allclose(shift, shift[0], atol=1e-3)


def test_out_of_range_inputs_score_far_above_normal_ones():
    """The exfiltration case: one feature 7 std above the training range. An encoder can map it to
    an ordinary code; the reconstruction term cannot miss it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (3000, 2))
    x = np.column_stack([base, base @ [[0.6], [0.4]] + rng.normal(0, 0.2, (3000, 1)), rng.normal(0, 1, 3000)])
    cfg = ModelConfig(kind="vae", hidden=[16], latent_dim=2, vae_score="density", dropout=0.0)
    model = build_model("vae", 4, 1, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt = torch.from_numpy(x.astype(np.float32)).unsqueeze(1)
    for _ in range(300):
        opt.zero_grad()
        model.loss(xt).backward()
        opt.step()
    model.eval()
    model.fit_normal(xt)
    far = xt[:200].clone()
    far[:, 0, 2] = float(x[:, 2].max()) + 7.0
    scorer = scorer_for(cfg, model)
    with torch.no_grad():
        threshold = np.quantile(scorer(xt)[0].numpy(), 0.999)
        scores, feature_scores = (t.numpy() for t in scorer(far)[:2])
    assert np.all(scores > 3 * threshold)
    assert np.all(np.argmax(feature_scores, axis=1) == 2)  # the feature that left the range is blamed


@pytest.mark.parametrize("kind,window", [("conv_ae", 13), ("vae", 13), ("conv_ae", 1)])
def test_padded_and_mlp_graphs_export_with_parity(kind, window, tmp_path):
    """W not a multiple of 2**depth exercises the edge padding (ONNX Pad) and the crop."""
    from anomalyd_trainer.bundle import export_onnx, parity_check

    cfg = ModelConfig(kind=kind, channels=[8, 4], hidden=[16], latent_dim=3)
    scorer = scorer_for(cfg, build_model(kind, 5, window, cfg))
    export_onnx(scorer, kind, window, 5, tmp_path / "m.onnx", 17)
    real = np.random.default_rng(1).standard_normal((50, window, 5)).astype(np.float32)
    assert parity_check(scorer, tmp_path / "m.onnx", real, trials=4, seed=0)["max_error"] < 1e-4
