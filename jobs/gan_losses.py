"""Adversarial losses over the multi-scale discriminator's logits (lists, one per scale).

Convention: every term is a mean over scales and samples, and the D loss is the AVERAGE of
its real and fake terms, so for BCE the confusion point (D = 0.5 everywhere) is
ln 2 = 0.693 for each term and for the D loss itself, as the seed documents read it.
Fakes for `d_loss` must be detached by the caller (`G(x).detach()`); D must be frozen
(requires_grad False, or its step simply not taken) for the G step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.schema import GanConfig

LN2 = math.log(2.0)
LOSSES = ("bce", "hinge", "lsgan")


def _check(gan: GanConfig) -> None:
    if gan.loss not in LOSSES:
        raise ValueError(f"stage.gan.loss must be one of {LOSSES}, got {gan.loss!r}")


def _mean_over_scales(values: list[Tensor]) -> Tensor:
    return torch.stack([v.mean() for v in values]).mean()


def _terms(real_logits: list[Tensor], fake_logits: list[Tensor],
           gan: GanConfig) -> tuple[Tensor, Tensor]:
    if gan.loss == "bce":
        real_label = 1.0 - gan.label_smoothing
        real = _mean_over_scales([F.binary_cross_entropy_with_logits(
            r, torch.full_like(r, real_label)) for r in real_logits])
        fake = _mean_over_scales([F.binary_cross_entropy_with_logits(
            f, torch.zeros_like(f)) for f in fake_logits])
    elif gan.loss == "hinge":
        real = _mean_over_scales([F.relu(1.0 - r) for r in real_logits])
        fake = _mean_over_scales([F.relu(1.0 + f) for f in fake_logits])
    else:  # lsgan
        real = _mean_over_scales([(r - 1.0).pow(2) for r in real_logits])
        fake = _mean_over_scales([f.pow(2) for f in fake_logits])
    return real, fake


def d_loss(real_logits: list[Tensor], fake_logits: list[Tensor],
           gan: GanConfig) -> tuple[Tensor, dict[str, float]]:
    """Discriminator loss 0.5 * (real term + fake term) and its health statistics.

    BCE uses the smoothed real label 1 - gan.label_smoothing; hinge and lsgan use none.
    Stats: d_loss_real, d_loss_fake, d_acc_real (logit > 0), d_acc_fake (logit < 0),
    d_real_mean / d_fake_mean (mean sigmoid), and for BCE d_real_ln2_gap / d_fake_ln2_gap
    = |term - ln 2|.
    """
    _check(gan)
    real, fake = _terms(real_logits, fake_logits, gan)
    with torch.no_grad():
        stats = {
            "d_loss_real": real.item(),
            "d_loss_fake": fake.item(),
            "d_acc_real": _mean_over_scales([(r > 0).float() for r in real_logits]).item(),
            "d_acc_fake": _mean_over_scales([(f < 0).float() for f in fake_logits]).item(),
            "d_real_mean": d_probability(real_logits).mean().item(),
            "d_fake_mean": d_probability(fake_logits).mean().item(),
        }
        if gan.loss == "bce":
            stats["d_real_ln2_gap"] = abs(real.item() - LN2)
            stats["d_fake_ln2_gap"] = abs(fake.item() - LN2)
    return 0.5 * (real + fake), stats


def g_adv_loss(fake_logits: list[Tensor], gan: GanConfig) -> Tensor:
    """Generator's adversarial loss: bce vs label 1 (no smoothing), hinge -D, lsgan (D-1)^2."""
    _check(gan)
    if gan.loss == "bce":
        return _mean_over_scales([F.binary_cross_entropy_with_logits(
            f, torch.ones_like(f)) for f in fake_logits])
    if gan.loss == "hinge":
        return _mean_over_scales([-f for f in fake_logits])
    return _mean_over_scales([(f - 1.0).pow(2) for f in fake_logits])


FEATURE_MATCHING = ("paired", "batch")


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of a [B, C, T] map over batch and time: two [C] vectors."""
    flat = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.std(dim=1, correction=0)


def feature_matching(real_feats: list[list[Tensor]], fake_feats: list[list[Tensor]],
                     mode: str = "paired") -> Tensor:
    """Distance between detached real and fake D features over every scale and layer.

    paired (the seeds'): mean L1 between sample i's real and fake maps. When the generator's
    input carries nothing about sample i's target (curriculum alpha 1), its minimum is the
    average map, so it rewards collapse. batch (Salimans et al. 2016): L1 between the
    per-channel mean and std over batch and time, so only the distribution is compared.
    """
    if mode not in FEATURE_MATCHING:
        raise ValueError(f"stage.gan.feature_matching_mode must be one of {FEATURE_MATCHING}, "
                         f"got {mode!r}")
    terms = []
    for real_scale, fake_scale in zip(real_feats, fake_feats, strict=True):
        for real, fake in zip(real_scale, fake_scale, strict=True):
            if mode == "paired":
                terms.append(F.l1_loss(fake, real.detach()))
                continue
            (r_mean, r_std), (f_mean, f_std) = batch_stats(real.detach()), batch_stats(fake)
            terms.append((f_mean - r_mean).abs().mean() + (f_std - r_std).abs().mean())
    return torch.stack(terms).mean()


def spread(x: Tensor) -> Tensor:
    """Std over the batch (dim 0) without Bessel's correction: 0, not NaN, for a batch of
    one sample (a global batch split over many ranks)."""
    return x.std(dim=0, correction=0)


def frame_covariance(x: Tensor) -> Tensor:
    """Covariance [C, C] of the frames of x [B, C, T] (every frame a sample)."""
    frames = x.transpose(1, 2).reshape(-1, x.shape[1])
    centred = frames - frames.mean(dim=0, keepdim=True)
    return centred.T @ centred / max(len(frames) - 1, 1)


def moment_matching(fake: Tensor, real: Tensor) -> dict[str, Tensor]:
    """Distribution-level distances between fake and real latent batches [B, C, T].

    Mean absolute differences of per-channel statistics: frame `mean` and `std` (over
    batch and time), `between` (spread across the batch of each sample's time-mean: how
    much songs differ), `within` (each sample's std over time: how much a song moves),
    `delta` (std of frame-to-frame steps: how smoothly it moves), and `cov` (the frames'
    channel covariance: which bins rise together). One average output loses on between and
    within, white noise on delta and cov; "total" is their sum. Like any batch statistic
    it compares distributions, so unlike a paired loss it cannot be won by collapse. Each
    rank compares its own share of the batch: keep a few samples per rank.
    """
    fake, real = fake.float(), real.detach().float()
    (f_mean, f_std), (r_mean, r_std) = batch_stats(fake), batch_stats(real)
    step_f, step_r = fake.diff(dim=-1), real.diff(dim=-1)
    terms = {
        "mean": (f_mean - r_mean).abs().mean(),
        "std": (f_std - r_std).abs().mean(),
        "between": (spread(fake.mean(dim=-1)) - spread(real.mean(dim=-1))).abs().mean(),
        "within": (fake.std(dim=-1).mean(dim=0) - real.std(dim=-1).mean(dim=0)).abs().mean(),
        "delta": (batch_stats(step_f)[1] - batch_stats(step_r)[1]).abs().mean(),
        "cov": (frame_covariance(fake) - frame_covariance(real)).abs().mean(),
    }
    terms["total"] = torch.stack(list(terms.values())).sum()
    return terms


def r1_penalty(real_logits: list[Tensor], real: Tensor) -> Tensor:
    """Zero-centred gradient penalty on reals (Mescheder et al. 2018): mean over samples
    of |d sum(logits) / d real|^2. `real` must require grad and feed `real_logits`."""
    total = torch.stack([l.float().sum() for l in real_logits]).sum()
    (grad,) = torch.autograd.grad(total, real, create_graph=True)
    return grad.float().pow(2).reshape(len(real), -1).sum(dim=1).mean()


def d_probability(logits: list[Tensor]) -> Tensor:
    """Mean over scales of sigmoid(logit): the probability D gives "real", per sample [B]."""
    return torch.stack([torch.sigmoid(l) for l in logits]).mean(dim=0)


def bce_vs_real(logits: list[Tensor]) -> Tensor:
    """Per-sample BCE against the real label 1 (no smoothing), mean over scales: [B]."""
    return torch.stack([F.softplus(-l) for l in logits]).mean(dim=0)
