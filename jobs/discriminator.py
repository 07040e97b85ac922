"""Stage 3's multi-scale discriminator over latent sequences [B, 128, T].

One 1-D conv sub-discriminator per time scale (Aurl.ai's multi-scale D, MusiGAN's conv D):
the sequence is average-pooled in time by the scale, run through `layers` convs (the first
with stride 1, the rest with `stride`) with LeakyReLU, pooled over time, optionally joined
by minibatch-discrimination features (Salimans et al. 2016), and mapped to one logit per
sample. Spectral norm wraps every conv and linear layer when configured.

With `dilated_layers` > 0 residual convs with dilation 2, 4, 8, ... follow the strided
stack, so each position sees several bars before the time mean (`receptive_field` counts
the frames at the input's rate); without them the coarsest scale sees under one second.

Minibatch discrimination makes each sample's logit depend on the other samples of the
batch (their content, not their number: the features are a mean over the other samples), so
score real and fake batches in separate calls. The audit also scores with the per-rank
training batch size, as the mean over fewer samples is noisier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.schema import Config, DiscriminatorConfig


def _maybe_sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(layer) if enabled else layer


class MinibatchDiscrimination(nn.Module):
    """Per sample and kernel: mean over the OTHER samples of exp(-L1) between kernel projections,
    in (0, 1] at any batch size; a batch of one has no others and gets 0. [B, in] -> [B, features]."""

    def __init__(self, in_features: int, features: int, kernel_dim: int, sn: bool):
        super().__init__()
        self.features, self.kernel_dim = features, kernel_dim
        self.project = _maybe_sn(nn.Linear(in_features, features * kernel_dim, bias=False), sn)

    def forward(self, x: Tensor) -> Tensor:
        m = self.project(x).view(-1, self.features, self.kernel_dim)
        b = m.shape[0]
        dist = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(dim=-1)   # [B, B, features]
        others = 1.0 - torch.eye(b, dtype=m.dtype, device=m.device).unsqueeze(-1)
        # A mean, not a sum, so a sample's features do not grow with the batch size.
        return (torch.exp(-dist) * others).sum(dim=1) / max(b - 1, 1)


class SubDiscriminator(nn.Module):
    """Conv stack at one time scale -> (logit [B], features [conv outputs])."""

    def __init__(self, cfg: DiscriminatorConfig, in_channels: int, scale: int):
        super().__init__()
        if cfg.kernel_size % 2 == 0 or cfg.kernel_size < 1:
            raise ValueError(f"model.discriminator.kernel_size must be odd, got {cfg.kernel_size}")
        self.scale = scale
        self.slope = cfg.leaky_slope
        sn = cfg.spectral_norm
        convs = []
        for i in range(cfg.layers):
            convs.append(_maybe_sn(nn.Conv1d(
                in_channels if i == 0 else cfg.channels, cfg.channels, cfg.kernel_size,
                stride=1 if i == 0 else cfg.stride, padding=cfg.kernel_size // 2), sn))
        self.convs = nn.ModuleList(convs)
        self.dilated = nn.ModuleList(_maybe_sn(nn.Conv1d(
            cfg.channels, cfg.channels, cfg.kernel_size, dilation=2 ** (i + 1),
            padding=2 ** (i + 1) * (cfg.kernel_size // 2)), sn)
            for i in range(cfg.dilated_layers))
        self.minibatch = (MinibatchDiscrimination(cfg.channels, cfg.minibatch_features,
                                                  cfg.minibatch_kernel_dim, sn)
                          if cfg.minibatch_features > 0 else None)
        self.head = _maybe_sn(nn.Linear(cfg.channels + cfg.minibatch_features, 1), sn)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.scale > 1:
            x = F.avg_pool1d(x, self.scale, self.scale, ceil_mode=True)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), self.slope)
            feats.append(x)
        for conv in self.dilated:
            x = x + F.leaky_relu(conv(x), self.slope)
            feats.append(x)
        pooled = x.mean(dim=-1)
        if self.minibatch is not None:
            pooled = torch.cat([pooled, self.minibatch(pooled)], dim=1)
        return self.head(pooled).squeeze(-1), feats


def receptive_field(cfg: DiscriminatorConfig, scale: int) -> int:
    """Input frames that one position of a sub-discriminator's last feature map sees."""
    span, jump = scale, scale               # the average pool by `scale`
    for i in range(cfg.layers):
        span += (cfg.kernel_size - 1) * jump
        jump *= 1 if i == 0 else cfg.stride
    for i in range(cfg.dilated_layers):
        span += (cfg.kernel_size - 1) * 2 ** (i + 1) * jump
    return span


class MultiScaleDiscriminator(nn.Module):
    """Sub-discriminators `subs.<i>` at `scales`; forward -> (logits per scale, features per scale)."""

    def __init__(self, cfg: DiscriminatorConfig, in_channels: int):
        super().__init__()
        if not cfg.scales or any(int(s) < 1 for s in cfg.scales):
            raise ValueError(f"model.discriminator.scales must be integers >= 1, got {cfg.scales}")
        if cfg.layers < 1 or cfg.channels < 1 or cfg.stride < 1:
            raise ValueError("model.discriminator.layers, .channels and .stride must be >= 1, "
                             f"got {cfg.layers}, {cfg.channels}, {cfg.stride}")
        if cfg.dilated_layers < 0:
            raise ValueError(f"model.discriminator.dilated_layers must be >= 0, got "
                             f"{cfg.dilated_layers}")
        if cfg.minibatch_features < 0 or (cfg.minibatch_features and cfg.minibatch_kernel_dim < 1):
            raise ValueError("model.discriminator.minibatch_features must be >= 0 and "
                             "minibatch_kernel_dim >= 1 when it is on, got "
                             f"{cfg.minibatch_features}, {cfg.minibatch_kernel_dim}")
        self.subs = nn.ModuleList(SubDiscriminator(cfg, in_channels, int(s)) for s in cfg.scales)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        """x [B, 128, T] -> ([logit [B] per scale], [[feature maps] per scale])."""
        logits, feats = [], []
        for sub in self.subs:
            logit, f = sub(x)
            logits.append(logit)
            feats.append(f)
        return logits, feats


def build_discriminator(cfg: Config) -> MultiScaleDiscriminator:
    """The stage-3 discriminator from model.discriminator, over latent_dim channels."""
    return MultiScaleDiscriminator(cfg.model.discriminator, cfg.model.transformer.latent_dim)
