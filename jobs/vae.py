"""Stage 2's hierarchical VAE bottleneck over the transformer's hidden frames.

Placement: between `LatentTransformer.encode` and `.decode` (after the encoder layers,
before the output projection). Level i average-pools the hidden frames [B, T, d_model]
in time by `downsample[i]`, maps each pooled frame to (mu, logvar) with `latent_channels`
each, samples z by reparameterisation (training, or `sample=True`: generation from noise,
as stage 3 trained it) or takes mu (eval, so validation is deterministic given the input), maps z back to d_model and repeats it up to
T frames. The decoded levels are summed: this sum REPLACES the hidden frames, so all
information reaching the output projection passes through the latents (a true bottleneck,
coarse levels carry slow structure, the finest level detail).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.schema import VaeModelConfig


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)) in nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class VaeLevel(nn.Module):
    """One time resolution: pool by `factor`, encode to (mu, logvar), decode z to d_model."""

    def __init__(self, d_model: int, latent_channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.to_stats = nn.Linear(d_model, 2 * latent_channels)
        self.from_z = nn.Linear(latent_channels, d_model)

    def forward(self, h: Tensor, sample: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, T, d_model] -> (decoded [B, T, d_model], mu, logvar [B, T', C])."""
        frames = h.shape[1]
        coarse = math.ceil(frames / self.factor)
        pooled = F.adaptive_avg_pool1d(h.transpose(1, 2), coarse).transpose(1, 2)
        mu, logvar = self.to_stats(pooled).chunk(2, dim=-1)
        if self.training or sample:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        up = F.interpolate(self.from_z(z).transpose(1, 2), size=frames, mode="nearest")
        return up.transpose(1, 2), mu, logvar


class HierarchicalVae(nn.Module):
    """`levels` VaeLevels at the time factors `downsample`; returns the decoded sum and KL."""

    def __init__(self, cfg: VaeModelConfig, d_model: int):
        super().__init__()
        if len(cfg.downsample) != cfg.levels:
            raise ValueError(f"model.vae.downsample has {len(cfg.downsample)} factors but "
                             f"model.vae.levels = {cfg.levels}")
        if any(int(f) < 1 for f in cfg.downsample):
            raise ValueError(f"model.vae.downsample factors must be >= 1, got {cfg.downsample}")
        self.levels = nn.ModuleList(VaeLevel(d_model, cfg.latent_channels, int(f))
                                    for f in cfg.downsample)

    def forward(self, h: Tensor, sample: bool = False) -> dict[str, Tensor]:
        """h [B, T, d_model] -> {"hidden": [B, T, d_model], "kl": [levels]}.

        kl[i] is level i's KL averaged over batch, latent frames and latent channels,
        i.e. nats per latent channel, BEFORE free bits (losses.py applies them).
        """
        hidden = torch.zeros_like(h)
        kls = []
        for level in self.levels:
            decoded, mu, logvar = level(h, sample)
            hidden = hidden + decoded
            kls.append(gaussian_kl(mu, logvar).mean())
        return {"hidden": hidden, "kl": torch.stack(kls)}
