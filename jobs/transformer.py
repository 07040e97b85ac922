"""The stage-1 network: a transformer encoder over latent time frames.

Latents [B, 128, T] are projected per frame to d_model, given sinusoidal positions, run
through pre-norm encoder layers, and projected back to 128 channels. `encode` and `decode`
are separate so that the stage-2 VAE can sit between them without renaming any parameter.

The same layers run causally for stage 1's next-frame objective: `encode(..., causal=True)`
for teacher forcing, and `extend` frame by frame with a key/value cache for free-running
generation (the same weights, computed again by hand; tests/test_next_frame.py checks they
agree).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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

    def embed(self, x: Tensor, start: int = 0, extra: Tensor | None = None) -> Tensor:
        """Latents [B, latent_dim, T] -> layer inputs [B, T, d_model] at positions start..;
        `extra` [B, T, d_model] is added (the next-frame objective's guide features)."""
        if x.dim() != 3 or x.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"expected latents [B, {self.cfg.latent_dim}, T], got {tuple(x.shape)}")
        end = start + x.shape[-1]
        if end > self.cfg.max_frames:
            raise ValueError(f"{end} frames exceed model.transformer.max_frames = "
                             f"{self.cfg.max_frames}")
        h = self.in_proj(x.transpose(1, 2)) + self.positions[start:end]
        return h if extra is None else h + extra

    def encode(self, x: Tensor, causal: bool = False, extra: Tensor | None = None) -> Tensor:
        """Latents [B, latent_dim, T] -> hidden frames [B, T, d_model]; `causal`: frame t
        attends to frames <= t only."""
        h = self.embed(x, 0, extra)
        if not causal:
            return self.norm(self.layers(h))
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device,
                                                              dtype=h.dtype)
        return self.norm(self.layers(h, mask=mask, is_causal=True))

    def cache(self, batch: int, frames: int, like: Tensor) -> "KeyValueCache":
        """An empty key/value cache for `frames` frames of `batch` sequences."""
        return KeyValueCache(len(self.layers.layers), batch, self.cfg.heads,
                             self.cfg.d_model // self.cfg.heads, frames, like)

    def extend(self, h: Tensor, cache: "KeyValueCache") -> Tensor:
        """Causal layers (eval: no dropout) over new layer inputs [B, n, d_model] that follow
        the frames `cache` holds; the cache takes their keys and values. -> [B, n, d_model]."""
        for i, layer in enumerate(self.layers.layers):
            h = causal_layer(layer, h, cache, i)
        cache.length += h.shape[1]
        return self.norm(h)

    def decode(self, h: Tensor) -> Tensor:
        """Hidden frames [B, T, d_model] -> latents [B, latent_dim, T]."""
        return self.out_proj(h).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Latents in, latents out, same shape."""
        return self.decode(self.encode(x))



class KeyValueCache:
    """Preallocated keys and values [layers, B, heads, frames, d_head] of the frames seen."""

    def __init__(self, layers: int, batch: int, heads: int, d_head: int, frames: int,
                 like: Tensor):
        self.keys = like.new_zeros(layers, batch, heads, frames, d_head)
        self.values = like.new_zeros(layers, batch, heads, frames, d_head)
        self.length = 0


def causal_layer(layer: nn.TransformerEncoderLayer, h: Tensor, cache: KeyValueCache,
                 index: int) -> Tensor:
    """One pre-norm encoder layer over new frames h [B, n, d] that attend causally to
    themselves and to the cached frames; their keys and values go into the cache."""
    attn = layer.self_attn
    batch, new, d = h.shape
    heads = attn.num_heads
    q, k, v = F.linear(layer.norm1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, new, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    seen = cache.length
    cache.keys[index, :, :, seen:seen + new] = k
    cache.values[index, :, :, seen:seen + new] = v
    k, v = cache.keys[index, :, :, :seen + new], cache.values[index, :, :, :seen + new]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if new > 1:   # new frame j (absolute seen + j) sees frames 0 .. seen + j
        hidden = (torch.arange(seen + new, device=h.device).unsqueeze(0)
                  > seen + torch.arange(new, device=h.device).unsqueeze(1))
        scores = scores.masked_fill(hidden, float("-inf"))
    a = scores.softmax(dim=-1) @ v
    h = h + attn.out_proj(a.transpose(1, 2).reshape(batch, new, d))
    return h + layer.linear2(F.gelu(layer.linear1(layer.norm2(h))))
