"""Parameter-free continuations of a latent chunk that know about musical structure: the
input's own best period tiled on, its last bar repeated, its last frame held. Pure
functions on [B, C, T].

The first two continue the input by tiling a stretch of its end: pred[t] = x[T - P + (t mod
P)] for a period P per sample. `period_continuation` picks P by the input's
autocorrelation, `last_bar_continuation` uses a fixed bar length. `copy_last_continuation`
holds the input's last frame.

For the next-frame objective's teacher-forced loss, `lagged_frames` is the one-step-ahead
yardstick: each target frame predicted by the TRUE frame `lag` frames before it in the
input followed by the target (lag 1: copy the last frame; a bar: the frame one bar ago).
Free-running, "the frame one bar ago" continues the input with its own predictions, which is
`last_bar_continuation` exactly (pred[t] = pred[t - bar] = x[T - bar + (t mod bar)]).
"""
from __future__ import annotations

import torch
from torch import Tensor

# Guards the normalisation of an autocorrelation when a stretch is all zeros.
EPS = 1e-12


def period_range(frames: int, frame_rate: float, min_period_s: float) -> tuple[int, int]:
    """Periods searched, in frames: from `min_period_s` to half the input (at least 1..1)."""
    hi = max(1, frames // 2)
    lo = min(hi, max(1, int(min_period_s * frame_rate)))
    return lo, hi


def autocorrelation(x: Tensor, lo: int, hi: int) -> Tensor:
    """[B, hi - lo + 1]: for each lag P in lo..hi, the normalised correlation between the
    input and itself shifted by P, over channels and the overlapping frames, after each
    channel's time mean is removed (1 for an input that repeats exactly every P frames)."""
    frames = x.shape[-1]
    if not 1 <= lo <= hi < frames:
        raise ValueError(f"lags {lo}..{hi} do not fit an input of {frames} frames")
    x = x.double()
    x = x - x.mean(dim=-1, keepdim=True)
    # every lag's sum of products at once: the power spectrum's inverse (zero-padded, so
    # nothing wraps around), summed over channels
    spectrum = torch.fft.rfft(x, n=2 * frames, dim=-1)
    products = torch.fft.irfft(spectrum.abs().pow(2), n=2 * frames, dim=-1).sum(dim=1)
    energy = torch.cumsum(x.pow(2).sum(dim=1), dim=-1)              # [B, T]: up to frame t
    lags = torch.arange(lo, hi + 1, device=x.device)
    head = energy[:, frames - 1 - lags]                              # frames 0 .. T-lag-1
    tail = energy[:, -1:] - energy[:, lags - 1]                      # frames lag .. T-1
    num = products[:, lags]
    return num / ((head * tail).clamp(min=0).sqrt() + EPS)


def best_period(x: Tensor, lo: int, hi: int) -> Tensor:
    """[B] int64: the lag in lo..hi with the highest autocorrelation (the shortest on a tie)."""
    return autocorrelation(x, lo, hi).argmax(dim=1) + lo


def tile_end(x: Tensor, period: Tensor | int, frames: int) -> Tensor:
    """[B, C, frames]: the input's last `period` frames (per sample) tiled on:
    pred[t] = x[T - P + (t mod P)]."""
    batch, channels, length = x.shape
    period = torch.as_tensor(period, dtype=torch.int64, device=x.device).expand(batch)
    if bool((period < 1).any()) or bool((period > length).any()):
        raise ValueError(f"periods must be in 1..{length}, got {period.tolist()}")
    t = torch.arange(frames, device=x.device).unsqueeze(0)           # [1, frames]
    index = length - period.unsqueeze(1) + t % period.unsqueeze(1)   # [B, frames]
    return x.gather(2, index.unsqueeze(1).expand(batch, channels, frames))


def period_continuation(x: Tensor, lo: int, hi: int, frames: int) -> Tensor:
    """The input continued with its own best period (autocorrelation over lags lo..hi)."""
    return tile_end(x, best_period(x, lo, hi), frames)


def last_bar_continuation(x: Tensor, bar: int, frames: int) -> Tensor:
    """The input's last `bar` frames repeated (the bar before, again and again)."""
    return tile_end(x, bar, frames)


def copy_last_continuation(x: Tensor, frames: int) -> Tensor:
    """The input's last frame held for `frames` frames: pred[t] = x[T - 1]."""
    return x[..., -1:].expand(*x.shape[:-1], frames)


def lagged_frames(x: Tensor, y: Tensor, lag: Tensor | int) -> Tensor:
    """[B, C, T_y]: each target frame's true predecessor `lag` frames back (per sample) in
    the input x followed by the target y: pred[t] = concat(x, y)[T_x + t - lag]."""
    batch, channels, length = x.shape
    lag = torch.as_tensor(lag, dtype=torch.int64, device=x.device).expand(batch)
    if bool((lag < 1).any()) or bool((lag > length).any()):
        raise ValueError(f"lags must be in 1..{length}, got {lag.tolist()}")
    seq = torch.cat([x, y], dim=-1)
    index = length + torch.arange(y.shape[-1], device=x.device).unsqueeze(0) - lag.unsqueeze(1)
    return seq.gather(2, index.unsqueeze(1).expand(batch, channels, -1))
