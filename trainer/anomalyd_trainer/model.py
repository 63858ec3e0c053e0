"""The two model kinds and the scorer wrappers that are exported to ONNX.

Windows enter as (B, W, F): batch, time, feature — the daemon's natural row-major layout. Both
kinds share a coder that maps a window to a flat hidden vector and back, and differ in the code
between: a dense bottleneck of `latent_dim` numbers (`ConvAE`) or a Gaussian latent (`VAE`).

- `ConvCoder` (W > 1): strided Conv1d down; back up by nearest-neighbour upsampling followed by a
  Conv1d at each level, which costs less than a transposed convolution of the same width and has
  no checkerboard artefacts. W is padded on the right (edge values) to a multiple of 2**depth and
  the output cropped back, so any W > 1 works.
- `MLPCoder` (W = 1): per-record scoring.
- `AEScorer` / `VAEScorer`: what ships. Their outputs are the contract in docs/model-contract.md §3.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig

# Gaussian-mixture sizes tried for the density of normal latents; BIC on the training latents picks.
MIXTURE_SIZES = (1, 2, 4, 8)


def _mlp(sizes: list[int], dropout: float, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class ConvCoder(nn.Module):
    """(B, W, F) → (B, C_last · W'') and back, with W'' = ceil(W / 2**depth)."""

    def __init__(self, n_features: int, window: int, cfg: ModelConfig):
        super().__init__()
        k, pad = cfg.kernel_size, cfg.kernel_size // 2
        self.window = window
        self.multiple = 2 ** len(cfg.channels)
        self.reduced = (window + (-window) % self.multiple) // self.multiple
        self.channels = cfg.channels[-1]
        self.width = self.channels * self.reduced
        chans = [n_features, *cfg.channels]
        enc: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            enc += [nn.Conv1d(a, b, k, stride=2, padding=pad), nn.ReLU(), nn.Dropout(cfg.dropout)]
        self.down = nn.Sequential(*enc)
        dec: list[nn.Module] = []
        rev = chans[::-1]  # C_last, ..., C_1, F
        for i, (a, b) in enumerate(zip(rev[:-1], rev[1:], strict=True)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(a, b, k, padding=pad)]
            if i < len(rev) - 2:
                dec.append(nn.ReLU())
        self.up = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # (B, F, W)
        pad = (-self.window) % self.multiple
        h = F.pad(h, (0, pad), mode="replicate") if pad else h  # (B, F, W'), the last row repeated
        return self.down(h).flatten(1)  # (B, C · W'')

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        h = h.view(h.shape[0], self.channels, self.reduced)  # (B, C, W'')
        out = self.up(h)  # (B, F, W')
        return out[:, :, : self.window].transpose(1, 2)  # (B, W, F)


class MLPCoder(nn.Module):
    """(B, 1, F) → (B, hidden[-1]) and back."""

    def __init__(self, n_features: int, cfg: ModelConfig):
        super().__init__()
        self.width = cfg.hidden[-1]
        self.enc = _mlp([n_features, *cfg.hidden], cfg.dropout, last_activation=True)
        self.dec = _mlp([*cfg.hidden[::-1], n_features], cfg.dropout, last_activation=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x[:, 0, :])  # (B, hidden[-1])

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.dec(h).unsqueeze(1)  # (B, F) → (B, 1, F)


def _coder(n_features: int, window: int, cfg: ModelConfig) -> nn.Module:
    return ConvCoder(n_features, window, cfg) if window > 1 else MLPCoder(n_features, cfg)


class ConvAE(nn.Module):
    """Autoencoder with a dense bottleneck: the window must pass through `latent_dim` numbers."""

    def __init__(self, n_features: int, window: int, cfg: ModelConfig):
        super().__init__()
        self.coder = _coder(n_features, window, cfg)
        self.to_code = nn.Linear(self.coder.width, cfg.latent_dim)
        self.from_code = nn.Sequential(nn.Linear(cfg.latent_dim, self.coder.width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) → reconstruction (B, W, F)."""
        code = self.to_code(self.coder.encode(x))  # (B, latent_dim)
        return self.coder.decode(self.from_code(code))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(x), x)

    def fit_normal(self, x: torch.Tensor) -> None:
        """Nothing to fit after training: the reconstruction error is the score."""


class VAE(nn.Module):
    def __init__(self, n_features: int, window: int, cfg: ModelConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        self.beta = cfg.beta
        self.fit_density = cfg.vae_score == "density"
        self.coder = _coder(n_features, window, cfg)
        self.to_latent = nn.Linear(self.coder.width, 2 * cfg.latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(cfg.latent_dim, self.coder.width), nn.ReLU())
        # The density of normal latent means (fit_normal), as a K-component mixture: log π_k + log of
        # N's normalising constant, and the projection z ↦ P_kᵀ(z − m_k) of every component at once.
        # One standard-normal component until fitted.
        z = cfg.latent_dim
        self.register_buffer("mix_log_norm", torch.full((1,), -0.5 * z * math.log(2 * math.pi)))
        self.register_buffer("mix_proj", torch.eye(z))  # (Z, K·Z)
        self.register_buffer("mix_offset", torch.zeros(z))  # (K·Z,)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, F) → mu (B, Z), logvar (B, Z)."""
        mu, logvar = self.to_latent(self.coder.encode(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) → (B, W, F)."""
        return self.coder.decode(self.from_latent(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.decode(mu)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per window: ½·SSE (unit-variance Gaussian decoder) + β·KL(q(z|x) ‖ N(0, I))."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        recon = 0.5 * ((self.decode(z) - x) ** 2).flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return (recon + self.beta * kl).mean()

    def latent_nll(self, mu: torch.Tensor) -> torch.Tensor:
        """−log p(mu) under the fitted mixture, −logsumexp_k [log π_k + log N(mu; m_k, Σ_k)], plus a constant."""
        k = self.mix_log_norm.shape[0]
        d = (mu @ self.mix_proj - self.mix_offset).view(-1, k, self.latent_dim)  # (B, K, Z): P_kᵀ(mu − m_k)
        log_p = torch.logsumexp(self.mix_log_norm - 0.5 * (d**2).sum(dim=2), dim=1)  # (B,)
        # log p never exceeds logsumexp_k log_norm_k (every component at its mean), so the score is >= 0.
        return torch.logsumexp(self.mix_log_norm, dim=0) - log_p

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The mixture's size is only known once fitted: take the buffers' shapes from the state.
        for name in ("mix_log_norm", "mix_proj", "mix_offset"):
            if name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[name], device=getattr(self, name).device))
        return super().load_state_dict(state_dict, strict, assign)

    @torch.no_grad()
    def fit_normal(self, x: torch.Tensor) -> None:
        """Fit the Gaussian mixture of normal latent means, its size chosen by BIC (no labels)."""
        if not self.fit_density:
            return
        from sklearn.mixture import GaussianMixture

        self.eval()
        mu = torch.cat([self.encode(x[i: i + 4096])[0] for i in range(0, len(x), 4096)]).double().cpu().numpy()
        best = None
        for n in MIXTURE_SIZES:
            if len(mu) < 10 * n * mu.shape[1]:
                break
            gm = GaussianMixture(n, covariance_type="full", reg_covar=1e-4, random_state=0).fit(mu)
            bic = gm.bic(mu)
            if best is None or bic < best[0]:
                best = (bic, gm)
        gm = best[1]
        k, z = gm.means_.shape
        prec_chol = gm.precisions_cholesky_  # (K, Z, Z): Σ_k⁻¹ = P_k P_kᵀ
        log_det = np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
        proj = prec_chol.transpose(1, 0, 2).reshape(z, k * z)  # column block k is P_k
        offset = np.einsum("kz,kzy->ky", gm.means_, prec_chol).reshape(k * z)
        def as_buffer(a: np.ndarray) -> torch.Tensor:
            return torch.tensor(a, dtype=torch.float32, device=self.mix_proj.device)

        self.mix_log_norm = as_buffer(np.log(gm.weights_) + log_det - 0.5 * z * math.log(2 * math.pi))
        self.mix_proj, self.mix_offset = as_buffer(proj), as_buffer(offset)


def build_model(kind: str, n_features: int, window: int, cfg: ModelConfig) -> nn.Module:
    return {"conv_ae": ConvAE, "vae": VAE}[kind](n_features, window, cfg)


# === Scorers (the exported graphs) ===


class AEScorer(nn.Module):
    """window (B, W, F) f32 → score (B,), feature_scores (B, F): squared reconstruction error."""

    def __init__(self, model: ConvAE):
        super().__init__()
        self.model = model

    def forward(self, window: torch.Tensor):
        err = (window - self.model(window)) ** 2  # (B, W, F)
        feature_scores = err.mean(dim=1)  # (B, F)
        return feature_scores.mean(dim=1), feature_scores


class VAEScorer(nn.Module):
    """window (B, W, F) f32 → score (B,), feature_scores (B, F), mu (B, Z), logvar (B, Z).

    score = a latent term + (with `reconstruction`) ½·Σ (x − decode(mu))², the decoder's negative
    log-likelihood of the window at its latent mean. The latent term is `latent_density` = −log p(mu)
    under the mixture fitted to normal latents, `latent_nll` = −log N(mu; 0, I) = ½·Σ mu² + (Z/2)·ln 2π,
    or `latent_kl` = KL(q(z|x) ‖ N(0, I)) = ½·Σ(mu² + e^logvar − logvar − 1).
    feature_scores is the reconstruction's squared error per feature (mean over time), or without
    reconstruction mean_t x², the input's squared deviation from the training mean.
    """

    def __init__(self, model: VAE, latent: str, reconstruction: bool):
        super().__init__()
        self.model = model
        self.latent = latent
        self.reconstruction = reconstruction
        self.log_norm = 0.5 * model.latent_dim * math.log(2 * math.pi)

    def forward(self, window: torch.Tensor):
        mu, logvar = self.model.encode(window)  # (B, Z) each
        if self.latent == "density":
            score = self.model.latent_nll(mu)
        elif self.latent == "kl":
            score = 0.5 * (mu**2 + logvar.exp() - logvar - 1.0).sum(dim=1)  # (B,)
        else:
            score = 0.5 * (mu**2).sum(dim=1) + self.log_norm  # (B,)
        if self.reconstruction:
            err = (window - self.model.decode(mu)) ** 2  # (B, W, F)
            score = score + 0.5 * err.sum(dim=(1, 2))
            feature_scores = err.mean(dim=1)  # (B, F)
        else:
            feature_scores = (window**2).mean(dim=1)  # (B, F)
        return score, feature_scores, mu, logvar


OUTPUTS = {"conv_ae": ["score", "feature_scores"], "vae": ["score", "feature_scores", "mu", "logvar"]}


def score_kind(cfg: ModelConfig) -> str:
    if cfg.kind == "conv_ae":
        return "reconstruction_mse"
    return f"latent_{cfg.vae_score}" + ("+reconstruction" if cfg.vae_reconstruction else "")


# The least deviation a threshold stands for, in training standard deviations per value.
MIN_DEVIATION = 0.01


def score_floor(cfg: ModelConfig, window: int, n_features: int) -> float:
    """The raw score of a window that misses its reconstruction by MIN_DEVIATION in every value.

    No threshold goes below it: on a flat line every calibration score is ~0, and a threshold at
    their quantile would flag windows that differ from it by float noise.
    """
    if cfg.kind == "conv_ae":
        return MIN_DEVIATION**2
    return 0.5 * MIN_DEVIATION**2 * window * n_features


def scorer_for(cfg: ModelConfig, model: nn.Module) -> nn.Module:
    if cfg.kind == "conv_ae":
        return AEScorer(model).eval()
    return VAEScorer(model, cfg.vae_score, cfg.vae_reconstruction).eval()


def multiply_adds(scorer: nn.Module, window: int, n_features: int) -> int:
    """Multiply-adds of one window through the scorer's Conv1d and Linear layers (the bulk of its cost)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv1d):
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0]
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in scorer.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    try:
        with torch.no_grad():
            scorer(torch.zeros(1, window, n_features))
    finally:
        for h in hooks:
            h.remove()
    return total
