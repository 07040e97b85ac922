"""Generator losses of stages 1-2 (and the non-adversarial part of stage 3).

Every term is returned unweighted under its own name, plus "total" = the weighted sum
with weights from StageConfig.loss (and kl_weight * beta for the KL). Losses compare the
output against CLEAN inputs/targets: under the pure-GAN curriculum the generator sees noisy
views, but the trainer passes the clean tensors here.

Reference the output is compared with:
- continuation: the target chunk.
- creative: the masks' per-element blend (m_in * input + m_tgt * target) / (m_in + m_tgt),
  with the masks detached. It is a convex combination of input and target wherever the
  masks put weight, so the output must be a blend, and detaching stops the agent from
  moving the reference toward whatever the output happens to be; the agent learns from
  the output path (its masks gate what the cascade sees) and from the mask terms.
"""
from __future__ import annotations

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
# Guards the division in the creative blend where both masks are ~0.
MASK_EPS = 1e-6


def band_weights(bins: int) -> Tensor:
    """[bins] MusicVAE weights: 1.5 on bins [0, 20%), 2.0 on [30%, 70%), 0.8 on [80%, 100%]."""
    w = torch.ones(bins)
    for lo, hi, weight in BAND_WEIGHTS:
        w[int(lo * bins): int(hi * bins)] = weight
    return w


def mask_balance(m_in: Tensor, m_tgt: Tensor) -> Tensor:
    """(mean(m_in) - 0.5)^2 + (mean(m_tgt) - 0.5)^2: both sources used about half."""
    return (m_in.mean() - 0.5).pow(2) + (m_tgt.mean() - 0.5).pow(2)


def mask_complementarity(m_in: Tensor, m_tgt: Tensor) -> Tensor:
    """1 - mean(m_in * m_tgt): high when the masks pick different elements (logged only)."""
    return 1.0 - (m_in * m_tgt).mean()


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


def creative_reference(inputs: Tensor, targets: Tensor, m_in: Tensor, m_tgt: Tensor) -> Tensor:
    """Per-element blend of input and target by the (detached) masks."""
    m_in, m_tgt = m_in.detach(), m_tgt.detach()
    return (m_in * inputs + m_tgt * targets) / (m_in + m_tgt + MASK_EPS)


def generator_losses(out: dict[str, Tensor], inputs: Tensor, targets: Tensor,
                     stage: StageConfig, codec: str, kl_weight: float) -> dict[str, Tensor]:
    """All generator terms by name and "total". See the module docstring for the reference.

    Keys: latent_l1, latent_mse, spectral, output_range; creative mode adds balance,
    coverage, temporal_diversity, mask_in_mean, mask_tgt_mean and complementarity (the
    last three logged, not in the total); with the VAE kl (free-bits floored sum, the
    term in the total as kl_weight * beta * kl), kl_raw and kl_level_<i> (raw, per level).
    With codec "mel" and loss.freq_weighted, l1 and mse use MusicVAE's band weights.
    """
    if codec not in CODECS:
        raise ValueError(f"encode.codec must be one of {CODECS}, got {codec!r}")
    lc = stage.loss
    # float32 throughout: under bf16 autocast the model's outputs are bf16, which the FFT
    # does not accept and which is too coarse for small loss differences
    output, inputs, targets = out["output"].float(), inputs.float(), targets.float()
    creative = stage.mode == "creative"
    if creative:
        if "mask_in" not in out:
            raise ValueError("stage mode is creative but the generator output has no masks "
                             "(was it run with mode='creative'?)")
        m_in, m_tgt = out["mask_in"].float(), out["mask_tgt"].float()
        reference = creative_reference(inputs, targets, m_in, m_tgt)
    else:
        reference = targets
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} and reference "
                         f"{tuple(reference.shape)} differ in shape")

    if lc.freq_weighted:
        if codec != "mel":
            raise ValueError("stage loss.freq_weighted needs encode.codec = mel (EnCodec "
                             "latent channels are not frequency bins)")
        weights = band_weights(output.shape[1]).to(output).view(1, -1, 1)
    else:
        weights = torch.ones((), dtype=output.dtype, device=output.device)
    diff = output - reference
    terms: dict[str, Tensor] = {
        "latent_l1": (weights * diff.abs()).mean(),
        "latent_mse": (weights * diff.pow(2)).mean(),
        "spectral": spectral_loss(output, reference),
        "output_range": output_range_penalty(output, reference),
    }
    total = (lc.latent_l1 * terms["latent_l1"] + lc.latent_mse * terms["latent_mse"]
             + lc.spectral * terms["spectral"] + lc.output_range * terms["output_range"])

    if creative:
        terms["balance"] = mask_balance(m_in, m_tgt)
        terms["coverage"] = mask_coverage(m_in, m_tgt)
        terms["temporal_diversity"] = mask_temporal_diversity(m_in, m_tgt, lc.min_mask_std)
        total = total + (lc.balance * terms["balance"] + lc.coverage * terms["coverage"]
                         + lc.temporal_diversity * terms["temporal_diversity"])
        with torch.no_grad():
            terms["complementarity"] = mask_complementarity(m_in, m_tgt)
            terms["mask_in_mean"] = m_in.mean()
            terms["mask_tgt_mean"] = m_tgt.mean()

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
