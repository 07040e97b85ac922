"""The stage-1 network: a transformer encoder over latent time frames.

Latents [B, 128, T] are projected per frame to d_model, given sinusoidal positions, run
through pre-norm encoder layers, and projected back to 128 channels. `encode` and `decode`
are separate so that the stage-2 VAE can sit between them without renaming any parameter.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.schema import TransformerConfig

# The base of the sinusoidal position table (Vaswani et al. 2017), a constant of the method.
POSITION_BASE = 10000.0


def sinusoidal_table(frames: int, d_model: int) -> Tensor:
    """Fixed [frames, d_model] position table: sin on even, cos on odd features."""
    pos = torch.arange(frames, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                     * (-math.log(POSITION_BASE) / d_model))
    table = torch.zeros(frames, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


class LatentTransformer(nn.Module):
    """Encoder over frames: in_proj -> positions -> layers -> norm | out_proj.

    Parameter names (in_proj.*, layers.*, norm.*, out_proj.*) never depend on the stage.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.latent_dim, cfg.d_model)
        # Derived from the config, so not saved: checkpoints hold only learned weights.
        self.register_buffer("positions", sinusoidal_table(cfg.max_frames, cfg.d_model),
                             persistent=False)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.d_model, nhead=cfg.heads, dim_feedforward=cfg.ff_mult * cfg.d_model,
            dropout=cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers=cfg.layers,
                                            enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.latent_dim)

    def encode(self, x: Tensor) -> Tensor:
        """Latents [B, latent_dim, T] -> hidden frames [B, T, d_model]."""
        if x.dim() != 3 or x.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"expected latents [B, {self.cfg.latent_dim}, T], got {tuple(x.shape)}")
        frames = x.shape[-1]
        if frames > self.cfg.max_frames:
            raise ValueError(f"{frames} frames exceed model.transformer.max_frames = "
                             f"{self.cfg.max_frames}")
        h = self.in_proj(x.transpose(1, 2)) + self.positions[:frames]
        return self.norm(self.layers(h))

    def decode(self, h: Tensor) -> Tensor:
        """Hidden frames [B, T, d_model] -> latents [B, latent_dim, T]."""
        return self.out_proj(h).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Latents in, latents out, same shape."""
        return self.decode(self.encode(x))
