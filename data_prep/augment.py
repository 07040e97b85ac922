"""Audio-domain augmentation of training chunks, applied before encoding.

Five types, one plain function each: gain, pitch shift, time stretch, white noise at an SNR
and mixing in a quiet second song. `make_variants` draws K variants of one chunk from a
seeded generator, keeps the chunk length, and drops (and counts) silent or clipped results.
Waves are float arrays shaped [channels, samples].
"""
from __future__ import annotations

import math

import numpy as np
import soxr
import torch

from pipeline.schema import AugmentConfig

TYPES = ("gain", "pitch", "stretch", "noise", "mix")
_RANGE_KEYS = {"gain": "gain_db", "pitch": "pitch_semitones", "stretch": "stretch",
               "noise": "noise_snr_db", "mix": "mix_db"}
_PARAM_NAMES = {"gain": "db", "pitch": "semitones", "stretch": "factor",
                "noise": "snr_db", "mix": "db"}


def rms(wave: np.ndarray) -> float:
    """Root mean square over all channels and samples."""
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))


def rms_db(wave: np.ndarray) -> float:
    """RMS level in dBFS (-inf for digital silence)."""
    level = rms(wave)
    return 20.0 * math.log10(level) if level > 0 else -math.inf


def fit_length(wave: np.ndarray, samples: int) -> np.ndarray:
    """Trim or zero-pad the last axis to `samples`, so a variant keeps the chunk length."""
    have = wave.shape[-1]
    if have >= samples:
        return wave[..., :samples]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, samples - have)]
    return np.pad(wave, pad)


def gain(wave: np.ndarray, db: float) -> np.ndarray:
    """Scale the amplitude by `db` decibels."""
    return (wave * 10.0 ** (db / 20.0)).astype(np.float32)


def time_stretch(wave: np.ndarray, factor: float, n_fft: int, hop: int) -> np.ndarray:
    """Make the signal `factor` times longer (round(samples * factor)) at the same pitch.

    A phase vocoder over torch.stft: frames are read at fractional positions 1/factor
    apart, magnitudes interpolated, and phases advanced by each peak's measured frequency
    with identity phase locking (bins follow their nearest peak), so tones stay coherent.
    """
    if factor <= 0:
        raise ValueError(f"time_stretch: factor must be positive, got {factor}")
    samples = wave.shape[-1]
    if samples <= n_fft:
        raise ValueError(f"time_stretch: {samples} samples is too short for n_fft={n_fft}")
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    window = torch.hann_window(n_fft)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)  # [C, F, T]
    out_len = int(round(samples * factor))
    pos = torch.arange(out_len // hop + 1, dtype=torch.float64) / factor
    mag, first, second = _frames_at(spec, pos)
    expected = 2.0 * math.pi * hop * torch.arange(spec.shape[-2]) / n_fft  # per-hop advance
    delta = second.angle() - first.angle() - expected[:, None]
    advance = delta - 2.0 * math.pi * torch.round(delta / (2.0 * math.pi)) + expected[:, None]
    phase = _locked_phases(mag, first.angle(), advance)
    y = torch.istft(torch.polar(mag, phase), n_fft, hop, window=window, length=out_len)
    return y.numpy().astype(np.float32)


def _frames_at(spec: torch.Tensor, pos: torch.Tensor):
    """Magnitudes interpolated at fractional frame positions, and the two frames around each."""
    frames = spec.shape[-1]
    i0 = pos.floor().long().clamp(max=frames - 1)
    i1 = (i0 + 1).clamp(max=frames - 1)
    frac = (pos - i0.double()).clamp(0.0, 1.0).float()
    first, second = spec[..., i0], spec[..., i1]
    return (1.0 - frac) * first.abs() + frac * second.abs(), first, second


def _nearest_peak(mag: torch.Tensor) -> torch.Tensor:
    """For every bin (last axis), the index of the nearest local magnitude maximum."""
    bins = mag.shape[-1]
    idx = torch.arange(bins).expand_as(mag)
    edge = torch.full_like(mag[..., :1], -math.inf)
    left = torch.cat([edge, mag[..., :-1]], dim=-1)
    right = torch.cat([mag[..., 1:], edge], dim=-1)
    peak = (mag > left) & (mag >= right)
    prev = torch.where(peak, idx, -1).cummax(-1).values
    nxt = torch.where(peak, idx, bins).flip(-1).cummin(-1).values.flip(-1)
    take_prev = (prev >= 0) & ((nxt >= bins) | (idx - prev <= nxt - idx))
    nearest = torch.where(take_prev, prev, nxt)
    return torch.where((prev < 0) & (nxt >= bins), idx, nearest)


def _locked_phases(mag: torch.Tensor, analysis: torch.Tensor,
                   advance: torch.Tensor) -> torch.Tensor:
    """Output phases [C, F, T]: peaks accumulate their advance, other bins keep their
    analysis-frame phase offset to their peak (identity phase locking)."""
    near = _nearest_peak(mag.transpose(-1, -2))                    # [C, T, F]
    ana = analysis.transpose(-1, -2)
    offset = ana - ana.gather(-1, near)
    adv = advance.transpose(-1, -2)
    out = [ana[:, 0]]
    for t in range(1, ana.shape[1]):
        acc = out[-1] + adv[:, t - 1]
        out.append(acc.gather(-1, near[:, t]) + offset[:, t])
    return torch.stack(out, dim=-1)


def resample_to_length(wave: np.ndarray, samples: int) -> np.ndarray:
    """Resample (soxr) so the signal spans `samples` samples; frequencies scale accordingly."""
    have = wave.shape[-1]
    out = soxr.resample(np.ascontiguousarray(wave.T, dtype=np.float32), float(have),
                        float(samples))
    return fit_length(np.ascontiguousarray(out.T), samples).astype(np.float32)


def pitch_shift(wave: np.ndarray, semitones: float, n_fft: int, hop: int) -> np.ndarray:
    """Shift pitch by `semitones` keeping the length: stretch by the ratio, then resample back."""
    ratio = 2.0 ** (semitones / 12.0)
    stretched = time_stretch(wave, ratio, n_fft, hop)
    return resample_to_length(stretched, wave.shape[-1])


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise whose power is the signal's power minus `snr_db` dB."""
    power = rms(wave) ** 2
    if power == 0:
        raise ValueError("add_noise: the signal is silent, so an SNR has no meaning")
    noise_std = math.sqrt(power / 10.0 ** (snr_db / 10.0))
    return (wave + noise_std * rng.standard_normal(wave.shape)).astype(np.float32)


def mix(wave: np.ndarray, other: np.ndarray, db: float) -> np.ndarray:
    """Add `other` scaled so its RMS sits `db` dB relative to the RMS of `wave`."""
    if other.shape[0] != wave.shape[0]:
        raise ValueError(f"mix: other has {other.shape[0]} channels, wave has {wave.shape[0]}")
    other = fit_length(other, wave.shape[-1])
    level, other_level = rms(wave), rms(other)
    if other_level == 0:
        raise ValueError("mix: the second song's chunk is silent")
    scale = level * 10.0 ** (db / 20.0) / other_level
    return (wave + scale * other).astype(np.float32)


def check_config(cfg: AugmentConfig) -> None:
    """Clear errors for a malformed encode.augment section."""
    unknown = [t for t in cfg.types if t not in TYPES]
    if unknown:
        raise ValueError(f"encode.augment.types: unknown {unknown}; choose from {list(TYPES)}")
    for t in cfg.types:
        key = _RANGE_KEYS[t]
        bounds = getattr(cfg, key)
        if len(bounds) != 2 or float(bounds[0]) > float(bounds[1]):
            raise ValueError(f"encode.augment.{key}: expected [low, high], got {bounds}")
    if cfg.stretch[0] <= 0 and "stretch" in cfg.types:
        raise ValueError(f"encode.augment.stretch: factors must be positive, got {cfg.stretch}")
    if cfg.vocoder_hop <= 0 or cfg.vocoder_hop > cfg.vocoder_n_fft // 2:
        raise ValueError(f"encode.augment.vocoder_hop: must be in 1..n_fft/2, "
                         f"got {cfg.vocoder_hop} for n_fft {cfg.vocoder_n_fft}")


def apply(kind: str, value: float, wave: np.ndarray, cfg: AugmentConfig,
          rng: np.random.Generator, other: np.ndarray | None) -> np.ndarray:
    """Apply one augmentation type with parameter `value`; the result keeps the input length."""
    n_fft, hop = cfg.vocoder_n_fft, cfg.vocoder_hop
    if kind == "gain":
        return gain(wave, value)
    if kind == "pitch":
        return pitch_shift(wave, value, n_fft, hop)
    if kind == "stretch":
        return fit_length(time_stretch(wave, value, n_fft, hop), wave.shape[-1])
    if kind == "noise":
        return add_noise(wave, value, rng)
    if kind == "mix":
        if other is None:
            raise ValueError("mix: needs a second song's chunk")
        return mix(wave, other, value)
    raise ValueError(f"unknown augmentation type {kind!r}")


def make_variants(wave: np.ndarray, sr: int, cfg: AugmentConfig, rng: np.random.Generator,
                  other: np.ndarray | None) -> tuple[list[tuple[np.ndarray, dict]], dict]:
    """Up to cfg.variants augmented copies of one chunk, each with its params dict.

    Each variant draws one type from cfg.types ("mix" only when `other` is given and not
    silent) and a parameter uniformly from its range. Silent or clipped results are dropped;
    the returned counts say how many. All randomness comes from `rng`. `sr` is only
    checked: every parameter is rate-free (dB, semitones, factors).
    """
    if wave.ndim != 2:
        raise ValueError(f"make_variants: expected [channels, samples], got shape {wave.shape}")
    if sr <= 0:
        raise ValueError(f"make_variants: sample rate must be positive, got {sr}")
    check_config(cfg)
    counts = {"silent": 0, "clipped": 0}
    if cfg.variants <= 0:
        return [], counts
    types = [t for t in cfg.types
             if t != "mix" or (other is not None and rms(fit_length(other, wave.shape[-1])) > 0)]
    if not types:
        return [], counts
    if rms_db(wave) < cfg.silent_db:
        counts["silent"] = cfg.variants
        return [], counts
    variants: list[tuple[np.ndarray, dict]] = []
    for _ in range(cfg.variants):
        kind = types[int(rng.integers(len(types)))]
        low, high = (float(v) for v in getattr(cfg, _RANGE_KEYS[kind]))
        value = float(rng.uniform(low, high))
        out = apply(kind, value, wave, cfg, rng, other)
        if rms_db(out) < cfg.silent_db:
            counts["silent"] += 1
        elif not np.all(np.isfinite(out)) or float(np.max(np.abs(out))) > cfg.clip_peak:
            counts["clipped"] += 1
        else:
            variants.append((out.astype(np.float32), {"type": kind, _PARAM_NAMES[kind]: value}))
    return variants, counts
