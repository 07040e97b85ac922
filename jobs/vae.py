"""Stage 2's hierarchical VAE bottleneck over the transformer's hidden frames.

Placement: between `LatentTransformer.encode` and `.decode` (after the encoder layers,
before the output projection). Level i average-pools the hidden frames [B, T, d_model]
in time by `downsample[i]`, maps each pooled frame to (mu, logvar) with `latent_channels`
each, samples z by reparameterisation (training, or `sample=True`: generation from noise,
as stage 3 trained it) or takes mu (eval, so validation is deterministic given the input), maps z back to d_model and repeats it up to
T frames. The decoded levels are summed: this sum REPLACES the hidden frames, so all
information reaching the output projection passes through the latents (a true bottleneck,
coarse levels carry slow structure, the finest level detail).

Decoder (model.vae.decoder): "linear" repeats each level's frames up (nearest) and sums
them: every level is a step function, so within-chunk movement has rank at most
levels x latent_channels and most frame-to-frame steps are exactly zero. "conv"
interpolates each level linearly, runs dilated residual convs (GELU) over the summed hidden
frames, and `refine` adds a residual conv stack on the 128-channel output itself, so the
movement is neither blockwise constant nor held to d_model dimensions. Each residual
block's last conv starts at zero: a fresh conv decoder is the linear one, interpolated.
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


DECODERS = ("linear", "conv")
# The conv decoder's kernel over time (frames).
DECODER_KERNEL = 3


class ResidualConvs(nn.Module):
    """x + conv(gelu(conv(x))) per block over [B, C, T], dilation 1, 2, 4, ...; each
    block's second conv starts at zero, so a fresh stack is the identity."""

    def __init__(self, channels: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(blocks):
            dilation = 2 ** i
            first = nn.Conv1d(channels, hidden, DECODER_KERNEL, dilation=dilation,
                              padding=dilation * (DECODER_KERNEL // 2))
            second = nn.Conv1d(hidden, channels, DECODER_KERNEL, padding=DECODER_KERNEL // 2)
            nn.init.zeros_(second.weight)
            nn.init.zeros_(second.bias)
            self.blocks.append(nn.Sequential(first, nn.GELU(), second))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class VaeLevel(nn.Module):
    """One time resolution: pool by `factor`, encode to (mu, logvar), decode z to d_model
    (repeated up to T frames, or linearly interpolated: `upsample`)."""

    def __init__(self, d_model: int, latent_channels: int, factor: int,
                 upsample: str = "nearest"):
        super().__init__()
        self.factor = factor
        self.upsample = upsample
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
        decoded = self.from_z(z).transpose(1, 2)
        if self.upsample == "nearest":
            up = F.interpolate(decoded, size=frames, mode="nearest")
        else:
            up = F.interpolate(decoded, size=frames, mode="linear", align_corners=False)
        return up.transpose(1, 2), mu, logvar


class HierarchicalVae(nn.Module):
    """`levels` VaeLevels at the time factors `downsample`; returns the decoded sum and KL
    (`refine` then finishes the output latents of `out_channels`)."""

    def __init__(self, cfg: VaeModelConfig, d_model: int, out_channels: int = 128):
        super().__init__()
        if len(cfg.downsample) != cfg.levels:
            raise ValueError(f"model.vae.downsample has {len(cfg.downsample)} factors but "
                             f"model.vae.levels = {cfg.levels}")
        if any(int(f) < 1 for f in cfg.downsample):
            raise ValueError(f"model.vae.downsample factors must be >= 1, got {cfg.downsample}")
        if cfg.decoder not in DECODERS:
            raise ValueError(f"model.vae.decoder must be one of {DECODERS}, got {cfg.decoder!r}")
        if cfg.decoder == "conv" and cfg.decoder_layers < 1:
            raise ValueError(f"model.vae.decoder_layers must be >= 1, got {cfg.decoder_layers}")
        upsample = "nearest" if cfg.decoder == "linear" else "linear"
        self.levels = nn.ModuleList(VaeLevel(d_model, cfg.latent_channels, int(f), upsample)
                                    for f in cfg.downsample)
        self.mix = self.post = None
        if cfg.decoder == "conv":
            self.mix = ResidualConvs(d_model, d_model, cfg.decoder_layers)
            self.post = ResidualConvs(out_channels, d_model, cfg.decoder_layers)

    def refine(self, output: Tensor) -> Tensor:
        """The conv decoder's last step on the output latents; the linear decoder's identity."""
        return output if self.post is None else self.post(output)

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
        if self.mix is not None:
            hidden = self.mix(hidden.transpose(1, 2)).transpose(1, 2)
        return {"hidden": hidden, "kl": torch.stack(kls)}
