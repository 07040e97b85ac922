"""Per-epoch schedules: the pure-GAN noise curriculum, the adversarial-weight ramp and
KL annealing. Pure functions of the epoch (counted from 1) and the config, so a resumed
run recomputes exactly the same values from the epoch stored in its checkpoint.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.schema import CurriculumConfig, GanConfig, KlConfig


def gan_alpha(epoch: int, cur: CurriculumConfig) -> float:
    """Noise share of the pure-GAN curriculum (seed 000):
    0 before cur.start_epoch, else min(cap, rate * (epoch - start_epoch + 1)); rate 0 = off."""
    if cur.rate <= 0 or epoch < cur.start_epoch:
        return 0.0
    return min(cur.cap, cur.rate * (epoch - cur.start_epoch + 1))


NOISE = ("sample_std", "data")


def mix_noise(x: Tensor, alpha: float, generator: torch.Generator | None = None,
              stats: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """(1 - alpha) * x + alpha * noise. alpha = 0 returns x itself; losses still compare
    against clean x.

    Without `stats` the noise is the seed's: Gaussian, zero mean, each sample's own std over
    dims 1, 2. With `stats` = (mean [C], song_sqrt [C, C], frame_sqrt [C, C]) of the
    training latents it is shaped like the data at both time scales:
    mean + song_sqrt @ g + frame_sqrt @ e, with g drawn once per sample and e per frame, so
    it has the data's level, how songs differ and how a song moves, bins moving together
    as they do in music. Zero-mean noise throws away the data's level (log-mel latents sit
    around -5, which Adam needs thousands of steps to relearn), and frame-wise noise alone
    averages out over a chunk, so every sample would share one song-level spectrum.
    """
    if alpha == 0:
        return x
    frames = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if stats is None:
        noise = frames * x.std(dim=(1, 2), keepdim=True)
    else:
        mean, song_sqrt, frame_sqrt = (s.to(x.device, x.dtype) for s in stats)
        song = torch.randn(x.shape[:2] + (1,), generator=generator, dtype=x.dtype,
                           device=x.device)
        noise = mean.view(1, -1, 1) + song_sqrt @ song + frame_sqrt @ frames
    return (1.0 - alpha) * x + alpha * noise


def adv_weight(epoch: int, gan: GanConfig) -> float:
    """Adversarial weight for epoch: 0 during D pre-training (epochs 1..d_pretrain_epochs),
    then a linear ramp reaching gan.adv_weight after adv_ramp_epochs more epochs
    (epoch d_pretrain_epochs + n gets n / adv_ramp_epochs of it; ramp 0 = full at once)."""
    after = epoch - gan.d_pretrain_epochs
    if after <= 0:
        return 0.0
    if gan.adv_ramp_epochs <= 0:
        return gan.adv_weight
    return gan.adv_weight * min(1.0, after / gan.adv_ramp_epochs)


def kl_weight(epoch: int, kl: KlConfig) -> float:
    """KL annealing factor: linear, epoch / anneal_epochs, reaching 1 at epoch anneal_epochs
    and staying there; anneal_epochs 0 = 1 from the start. (beta is applied in losses.py.)"""
    if kl.anneal_epochs <= 0:
        return 1.0
    return min(1.0, max(0, epoch) / kl.anneal_epochs)
