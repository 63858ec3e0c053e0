"""The two model kinds and the scorer wrappers that are exported to ONNX.

Windows enter as (B, W, F): batch, time, feature — the daemon's natural row-major layout. Conv
layers want (B, C, T), so the models transpose inside the graph.

- `ConvAE`: a fully convolutional autoencoder (strided Conv1d down, ConvTranspose1d up). W is
  padded on the right (edge values) to a multiple of 2**depth and the output cropped back, so any
  W > 1 works. For W = 1 an MLP autoencoder takes its place.
- `VAE`: the same conv stack (or an MLP for W = 1) with a dense Gaussian latent of size Z.
- `AEScorer` / `VAEScorer`: what ships. Their outputs are the contract in docs/model-contract.md §3.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig


def _mlp(sizes: list[int], dropout: float, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class ConvStack(nn.Module):
    """(B, F, T) → (B, C_last, T / 2**depth) and back. T must be a multiple of 2**depth."""

    def __init__(self, n_features: int, cfg: ModelConfig):
        super().__init__()
        k, pad = cfg.kernel_size, cfg.kernel_size // 2
        chans = [n_features, *cfg.channels]
        enc: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv1d(a, b, k, stride=2, padding=pad), nn.ReLU(), nn.Dropout(cfg.dropout)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = []
        rev = cfg.channels[::-1]
        for a, b in zip(rev, rev[1:] + rev[-1:]):
            dec += [nn.ConvTranspose1d(a, b, k, stride=2, padding=pad, output_padding=1), nn.ReLU()]
        dec.append(nn.Conv1d(cfg.channels[0], n_features, k, padding=pad))
        self.decoder = nn.Sequential(*dec)


def _pad_time(x: torch.Tensor, window: int, multiple: int) -> torch.Tensor:
    """(B, W, F) → (B, F, W + pad) with the last row repeated."""
    h = x.transpose(1, 2)  # (B, F, W)
    pad = (-window) % multiple
    return F.pad(h, (0, pad), mode="replicate") if pad else h


class ConvAE(nn.Module):
    def __init__(self, n_features: int, window: int, cfg: ModelConfig):
        super().__init__()
        self.window = window
        self.conv = window > 1
        if self.conv:
            self.stack = ConvStack(n_features, cfg)
            self.multiple = 2 ** len(cfg.channels)
        else:
            self.enc = _mlp([n_features, *cfg.hidden, cfg.latent_dim], cfg.dropout, last_activation=True)
            self.dec = _mlp([cfg.latent_dim, *cfg.hidden[::-1], n_features], cfg.dropout, last_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) → reconstruction (B, W, F)."""
        if not self.conv:
            return self.dec(self.enc(x[:, 0, :])).unsqueeze(1)  # (B, F) → (B, 1, F)
        h = _pad_time(x, self.window, self.multiple)  # (B, F, W')
        out = self.stack.decoder(self.stack.encoder(h))  # (B, F, W')
        return out[:, :, : self.window].transpose(1, 2)  # (B, W, F)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(x), x)


class VAE(nn.Module):
    def __init__(self, n_features: int, window: int, cfg: ModelConfig):
        super().__init__()
        self.window = window
        self.latent_dim = cfg.latent_dim
        self.beta = cfg.beta
        self.conv = window > 1
        if self.conv:
            self.stack = ConvStack(n_features, cfg)
            self.multiple = 2 ** len(cfg.channels)
            self.reduced = (window + (-window) % self.multiple) // self.multiple
            flat = cfg.channels[-1] * self.reduced
            self.to_latent = nn.Linear(flat, 2 * cfg.latent_dim)
            self.from_latent = nn.Linear(cfg.latent_dim, flat)
        else:
            self.enc = _mlp([n_features, *cfg.hidden], cfg.dropout, last_activation=True)
            self.to_latent = nn.Linear(cfg.hidden[-1], 2 * cfg.latent_dim)
            self.dec = _mlp([cfg.latent_dim, *cfg.hidden[::-1], n_features], cfg.dropout, last_activation=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, F) → mu (B, Z), logvar (B, Z)."""
        if self.conv:
            h = self.stack.encoder(_pad_time(x, self.window, self.multiple))  # (B, C, W'')
            h = h.flatten(1)  # (B, C * W'')
        else:
            h = self.enc(x[:, 0, :])  # (B, hidden)
        mu, logvar = self.to_latent(h).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) → (B, W, F)."""
        if not self.conv:
            return self.dec(z).unsqueeze(1)
        h = self.from_latent(z).view(z.shape[0], -1, self.reduced)  # (B, C, W'')
        out = self.stack.decoder(h)  # (B, F, W')
        return out[:, :, : self.window].transpose(1, 2)

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
    """window (B, W, F) f32 → score (B,), feature_scores (B, F) = mean_t x², mu (B, Z), logvar (B, Z).

    score is `latent_kl` = KL(q(z|x) ‖ N(0, I)) = ½·Σ(mu² + e^logvar − logvar − 1), or `latent_nll` =
    −log N(mu; 0, I) = ½·Σ mu² + (Z/2)·ln 2π.
    """

    def __init__(self, model: VAE, score_kind: str):
        super().__init__()
        self.model = model
        self.kl = score_kind == "latent_kl"
        self.log_norm = 0.5 * model.latent_dim * math.log(2 * math.pi)

    def forward(self, window: torch.Tensor):
        mu, logvar = self.model.encode(window)  # (B, Z) each
        if self.kl:
            score = 0.5 * (mu**2 + logvar.exp() - logvar - 1.0).sum(dim=1)  # (B,)
        else:
            score = 0.5 * (mu**2).sum(dim=1) + self.log_norm  # (B,)
        feature_scores = (window**2).mean(dim=1)  # (B, F)
        return score, feature_scores, mu, logvar


OUTPUTS = {"conv_ae": ["score", "feature_scores"], "vae": ["score", "feature_scores", "mu", "logvar"]}


def score_kind(cfg: ModelConfig) -> str:
    return "reconstruction_mse" if cfg.kind == "conv_ae" else f"latent_{cfg.vae_score}"


def scorer_for(cfg: ModelConfig, model: nn.Module) -> nn.Module:
    scorer = AEScorer(model) if cfg.kind == "conv_ae" else VAEScorer(model, score_kind(cfg))
    return scorer.eval()
