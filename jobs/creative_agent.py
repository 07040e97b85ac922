"""PowerMuse's creative agent: per-channel, per-frame masks deciding what of the input and
what of the target each output element draws on.

It looks at concat(input, target) over channels [B, 256, T] with one attention layer (so a
mask at frame t can depend on the whole chunk) and returns two sigmoid masks [B, 128, T].
Sizes come from the transformer section of the config (d_model, heads, ff_mult, dropout).
The mask losses (balance, coverage, overlap, temporal diversity) live in jobs/losses.py;
jobs.fakes.make_fakes runs the cascade, and so this agent, at inference.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from jobs.transformer import sinusoidal_table
from pipeline.schema import TransformerConfig


class CreativeAgent(nn.Module):
    """concat(input, target) -> (m_in, m_tgt), each [B, latent_dim, T] in (0, 1)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        self.in_proj = nn.Linear(2 * cfg.latent_dim, cfg.d_model)
        self.register_buffer("positions", sinusoidal_table(cfg.max_frames, cfg.d_model),
                             persistent=False)
        self.attend = nn.TransformerEncoderLayer(
            d_model=cfg.d_model, nhead=cfg.heads, dim_feedforward=cfg.ff_mult * cfg.d_model,
            dropout=cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.out_proj = nn.Linear(cfg.d_model, 2 * cfg.latent_dim)

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """inputs, targets [B, latent_dim, T] -> (m_in, m_tgt) [B, latent_dim, T]."""
        both = torch.cat([inputs, targets], dim=1).transpose(1, 2)
        h = self.in_proj(both) + self.positions[: both.shape[1]]
        logits = self.out_proj(self.attend(h)).transpose(1, 2)
        m_in, m_tgt = torch.sigmoid(logits).split(self.latent_dim, dim=1)
        return m_in, m_tgt
