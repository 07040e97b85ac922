"""Generator losses of stages 1-2 (and the non-adversarial part of stage 3).

Every term is returned unweighted under its own name, plus "total" = the weighted sum
with weights from StageConfig.loss (and kl_weight * beta for the KL). Losses compare the
output against CLEAN inputs/targets: under the pure-GAN curriculum the generator sees noisy
views, but the trainer passes the clean tensors here.

What the output is compared with:
- continuation: the target chunk (latent L1 / MSE, spectral, output range).
- creative (PowerMuse): no per-element reference. The seed trains it with target
  reconstruction weight 0 ("no copying") and asks to hear the input's rhythm, the target's
  harmony and new patterns, not a copy. Any reference that picks elements of the two
  sources can be copied: the old blend (m_in x + m_tgt y) / (m_in + m_tgt) equals
  m_in x + m_tgt y, the sum of the views cascade stage 0 is given, whenever the masks sum
  to 1. Scoring the input where m_in selects and the target where m_tgt selects is won the
  same way, by splicing the two. So each source is asked for a different property, over
  every element:
  * content: each channel's time pattern (standardised over time, without its level and
    scale) follows the input's: the input's rhythm and contour;
  * style: each channel's level and spread over time (time mean and std, over the
    target's std) are the target's: its spectrum, its harmony.
  A copy of the input pays the whole style difference, a copy of the target the whole
  content difference, a blend, the masked views or a splice part of both. Both are 0 only
  for the input's pattern at the target's per-channel statistics, which neither source
  is. The masks do not weight these terms (weighting them lets a splice win again); they
  gate what the cascade sees, so the agent learns from the output path and from the mask
  terms: balance, coverage, overlap and temporal diversity, at PowerMuse's weights
  5, 0.5, 10 and 5 (stage files). With complementary masks the cascade sees only part of
  each source and has to fill in the rest. Input and target with the same statistics
  (same-song continuation pairs) leave little to the style term: train creative mode
  with pairs.shuffle_targets, as PowerMuse does. The output range is checked against
  input and target together.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.schema import StageConfig

CODECS = ("encodec", "mel")
# MusicVAE's frequency bands (seed 004) as (start fraction, end fraction, weight) over the
# mel bins; bins outside every band keep weight 1.
BAND_WEIGHTS = ((0.0, 0.2, 1.5), (0.3, 0.7, 2.0), (0.8, 1.0, 0.8))
# MusicVAE's output-range penalty allows half the reference's range beyond each end.
RANGE_MARGIN = 0.5
# Guards divisions by a mask's mass or a std that can be ~0.
EPS = 1e-6
# A channel's time std is floored at this share of the sample's mean channel std before
# standardising, so a near-constant channel is not blown up to unit scale.
STD_FLOOR = 0.1
# The terms of `total` that compare each output with its own sources (see paired_total).
PAIRED_TERMS = ("latent_l1", "latent_mse", "spectral", "output_range", "content", "style")


def band_weights(bins: int) -> Tensor:
    """[bins] MusicVAE weights: 1.5 on bins [0, 20%), 2.0 on [30%, 70%), 0.8 on [80%, 100%]."""
    w = torch.ones(bins)
    for lo, hi, weight in BAND_WEIGHTS:
        w[int(lo * bins): int(hi * bins)] = weight
    return w


def mask_balance(m_in: Tensor, m_tgt: Tensor) -> Tensor:
    """(mean(m_in) - 0.5)^2 + (mean(m_tgt) - 0.5)^2: both sources used about half."""
    return (m_in.mean() - 0.5).pow(2) + (m_tgt.mean() - 0.5).pow(2)


def mask_overlap(m_in: Tensor, m_tgt: Tensor) -> Tensor:
    """mean(m_in * m_tgt): what both masks select. Masks of 0.5 everywhere satisfy balance
    and coverage; this term (PowerMuse weight 10) is what pushes them apart."""
    return (m_in * m_tgt).mean()


def mask_complementarity(m_in: Tensor, m_tgt: Tensor) -> Tensor:
    """1 - mean(m_in * m_tgt): high when the masks pick different elements (logged)."""
    return 1.0 - mask_overlap(m_in, m_tgt)


def mask_coverage(m_in: Tensor, m_tgt: Tensor) -> Tensor:
    """mean((m_in + m_tgt - 1)^2): every element drawn from somewhere, not twice."""
    return (m_in + m_tgt - 1.0).pow(2).mean()


def mask_temporal_diversity(m_in: Tensor, m_tgt: Tensor, min_std: float) -> Tensor:
    """Hinge mean(relu(min_std - std over time)) over both masks: masks must vary in time."""
    masks = torch.stack([m_in, m_tgt])          # [2, B, C, T]
    return F.relu(min_std - masks.std(dim=-1)).mean()


def spectral_loss(output: Tensor, reference: Tensor) -> Tensor:
    """L1 between FFT magnitudes over time (orthonormal scaling), per channel."""
    out_mag = torch.fft.rfft(output, dim=-1, norm="ortho").abs()
    ref_mag = torch.fft.rfft(reference, dim=-1, norm="ortho").abs()
    return (out_mag - ref_mag).abs().mean()


def output_range_penalty(output: Tensor, reference: Tensor) -> Tensor:
    """Squared excess of the output beyond [min - 0.5 range, max + 0.5 range] of the
    reference, per sample (MusicVAE)."""
    lo = reference.amin(dim=(1, 2), keepdim=True)
    hi = reference.amax(dim=(1, 2), keepdim=True)
    margin = RANGE_MARGIN * (hi - lo)
    return (F.relu(output - (hi + margin)).pow(2) + F.relu((lo - margin) - output).pow(2)).mean()


def level_of(x: Tensor, codec: str) -> Tensor:
    """Each sample's level [B]: mel, the log of its mean mel power (natural-log latents,
    so what the decoded loudness follows); EnCodec, the log of its latents' RMS."""
    if codec == "mel":
        return torch.logsumexp(x.flatten(1), dim=1) - math.log(x[0].numel())
    return 0.5 * torch.log(x.flatten(1).pow(2).mean(dim=1) + EPS)


def level_gap(output: Tensor, reference: Tensor, codec: str) -> Tensor:
    """|batch-mean level of the output - that of the reference| (a batch statistic, so at
    curriculum alpha 1 it asks for the data's loudness, not each target's)."""
    return (level_of(output, codec).mean() - level_of(reference, codec).mean()).abs()


def standardise(x: Tensor) -> Tensor:
    """Each channel of [B, C, T] minus its time mean, over its time std (floored at
    STD_FLOOR x the sample's mean channel std): the time pattern without level or scale."""
    centred = x - x.mean(dim=-1, keepdim=True)
    var = centred.pow(2).mean(dim=-1, keepdim=True)
    floor = STD_FLOOR * var.sqrt().mean(dim=1, keepdim=True)
    return centred / (var + floor.pow(2) + EPS).sqrt()


def creative_content(output: Tensor, inputs: Tensor, weights: Tensor | float = 1.0) -> Tensor:
    """Mean |standardise(output) - standardise(input)|: the input's time pattern in every
    channel (its rhythm and contour), whatever the output's level and scale."""
    diff = (standardise(output) - standardise(inputs)).abs()
    return (weights * diff).mean() / torch.as_tensor(weights).mean()


def creative_style(output: Tensor, targets: Tensor, weights: Tensor | float = 1.0) -> Tensor:
    """Per channel |time-mean difference| + |time-std difference|, over the target's std:
    the target's level and spread in every channel (its spectrum, its harmony)."""
    scale = targets.std(dim=(1, 2), keepdim=True) + EPS
    diff = ((output.mean(dim=-1, keepdim=True) - targets.mean(dim=-1, keepdim=True)).abs()
            + (output.std(dim=-1, unbiased=False, keepdim=True)
               - targets.std(dim=-1, unbiased=False, keepdim=True)).abs()) / scale
    return (weights * diff).mean() / torch.as_tensor(weights).mean()


def generator_losses(out: dict[str, Tensor], inputs: Tensor, targets: Tensor,
                     stage: StageConfig, codec: str, kl_weight: float) -> dict[str, Tensor]:
    """All generator terms by name and "total". See the module docstring for the objective.

    Continuation keys: latent_l1, latent_mse, spectral, output_range. Creative keys:
    content, style, output_range, balance, coverage, overlap, temporal_diversity, and
    complementarity, mask_in_mean, mask_tgt_mean (logged, not in the total). With the VAE:
    kl (free-bits floored sum, in the total as kl_weight * beta * kl), kl_raw and
    kl_level_<i> (raw, per level). With codec "mel" and loss.freq_weighted, the
    reconstruction terms use MusicVAE's band weights. With loss.level > 0: level, the gap
    between the batch's level and the targets' (decoded loudness for mel), never faded.
    """
    if codec not in CODECS:
        raise ValueError(f"encode.codec must be one of {CODECS}, got {codec!r}")
    lc = stage.loss
    # float32 throughout: under bf16 autocast the model's outputs are bf16, which the FFT
    # does not accept and which is too coarse for small loss differences
    output, inputs, targets = out["output"].float(), inputs.float(), targets.float()
    creative = stage.mode == "creative"
    if creative and "mask_in" not in out:
        raise ValueError("stage mode is creative but the generator output has no masks "
                         "(was it run with mode='creative'?)")
    sources = {"input": inputs, "target": targets} if creative else {"target": targets}
    for name, ref in sources.items():
        if output.shape != ref.shape:
            raise ValueError(f"output {tuple(output.shape)} and {name} {tuple(ref.shape)} "
                             "differ in shape")

    if lc.freq_weighted:
        if codec != "mel":
            raise ValueError("stage loss.freq_weighted needs encode.codec = mel (EnCodec "
                             "latent channels are not frequency bins)")
        weights = band_weights(output.shape[1]).to(output).view(1, -1, 1)
    else:
        weights = torch.ones((), dtype=output.dtype, device=output.device)

    if creative:
        m_in, m_tgt = out["mask_in"].float(), out["mask_tgt"].float()
        terms: dict[str, Tensor] = {
            "content": creative_content(output, inputs, weights),
            "style": creative_style(output, targets, weights),
            "output_range": output_range_penalty(output, torch.cat([inputs, targets], -1)),
            "balance": mask_balance(m_in, m_tgt),
            "coverage": mask_coverage(m_in, m_tgt),
            "overlap": mask_overlap(m_in, m_tgt),
            "temporal_diversity": mask_temporal_diversity(m_in, m_tgt, lc.min_mask_std),
        }
        total = paired_total(terms, stage) + (
            lc.balance * terms["balance"] + lc.coverage * terms["coverage"]
            + lc.overlap * terms["overlap"] + lc.temporal_diversity * terms["temporal_diversity"])
        with torch.no_grad():
            terms["complementarity"] = mask_complementarity(m_in, m_tgt)
            terms["mask_in_mean"] = m_in.mean()
            terms["mask_tgt_mean"] = m_tgt.mean()
    else:
        diff = output - targets
        terms = {
            "latent_l1": (weights * diff.abs()).mean(),
            "latent_mse": (weights * diff.pow(2)).mean(),
            "spectral": spectral_loss(output, targets),
            "output_range": output_range_penalty(output, targets),
        }
        total = paired_total(terms, stage)

    if lc.level > 0:   # not a paired term: stage 3's curriculum does not fade it
        terms["level"] = level_gap(output, targets, codec)
        total = total + lc.level * terms["level"]

    if "kl" in out:
        if stage.kl is None:
            raise ValueError("the generator has a VAE but the stage has no kl section")
        kl_levels = out["kl"].float()
        floored = torch.clamp(kl_levels, min=stage.kl.free_bits)
        for i, value in enumerate(kl_levels):
            terms[f"kl_level_{i}"] = value.detach()
        terms["kl_raw"] = kl_levels.sum().detach()
        terms["kl"] = floored.sum()
        total = total + kl_weight * stage.kl.beta * terms["kl"]

    terms["total"] = total
    return terms


def paired_total(terms: dict[str, Tensor], stage: StageConfig) -> Tensor:
    """The weighted sum of the paired terms of `total` (continuation: l1, mse, spectral,
    range; creative: content, style, range): the part that compares each output with its
    own sources, which stage 3 can fade."""
    lc = stage.loss
    present = [getattr(lc, k) * terms[k] for k in PAIRED_TERMS if k in terms]
    if not present:
        raise ValueError(f"no paired loss term among {sorted(terms)}")
    return torch.stack(present).sum()
