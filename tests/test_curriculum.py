"""The pure-GAN curriculum, adversarial ramp and KL annealing schedules."""
from __future__ import annotations

import pytest
import torch

from jobs.curriculum import adv_weight, gan_alpha, kl_weight, mix_noise
from pipeline.schema import CurriculumConfig, GanConfig, KlConfig


def gan_cfg(**kw) -> GanConfig:
    base = dict(loss="bce", label_smoothing=0.1, feature_matching=1.0, adv_weight=0.1,
                adv_ramp_epochs=10, d_pretrain_epochs=1, lr_d=1e-4, d_steps=1,
                recon_fade=False, feature_matching_mode="paired", moment_matching=0.0,
                r1_gamma=0.0)
    return GanConfig(**{**base, **kw})


def test_pure_gan_alpha_schedule_from_the_issue():
    cur = CurriculumConfig(rate=0.01, start_epoch=51, cap=1.0, noise="sample_std")
    assert all(gan_alpha(e, cur) == 0.0 for e in range(1, 51))
    assert gan_alpha(51, cur) == pytest.approx(0.01)
    assert gan_alpha(75, cur) == pytest.approx(0.25)
    assert gan_alpha(100, cur) == pytest.approx(0.50)
    assert gan_alpha(125, cur) == pytest.approx(0.75)
    assert gan_alpha(150, cur) == pytest.approx(1.00)
    assert all(gan_alpha(e, cur) == 1.0 for e in range(151, 260))
    alphas = [gan_alpha(e, cur) for e in range(1, 200)]
    assert alphas == sorted(alphas)


def test_alpha_off_and_cap():
    assert all(gan_alpha(e, CurriculumConfig(rate=0.0, start_epoch=1, cap=1.0, noise="sample_std")) == 0.0
               for e in range(1, 100))
    capped = CurriculumConfig(rate=0.1, start_epoch=1, cap=0.95, noise="sample_std")
    assert gan_alpha(5, capped) == pytest.approx(0.5)
    assert gan_alpha(30, capped) == 0.95


def test_mix_noise_endpoints():
    x = torch.randn(3, 8, 50)
    assert mix_noise(x, 0.0) is x
    same_std = x / x.std(dim=(1, 2), keepdim=True) * 2.0
    other = torch.randn(3, 8, 50)
    other = other / other.std(dim=(1, 2), keepdim=True) * 2.0
    a = mix_noise(same_std, 1.0, torch.Generator().manual_seed(7))
    b = mix_noise(other, 1.0, torch.Generator().manual_seed(7))
    assert torch.allclose(a, b)      # alpha 1: nothing of x left but its per-sample std
    half = mix_noise(x, 0.5, torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(half, 0.5 * x + 0.5 * noise * x.std(dim=(1, 2), keepdim=True))


def test_mix_noise_scaled_per_sample():
    torch.manual_seed(0)
    loud = torch.randn(1, 128, 400) * 8.0
    quiet = torch.randn(1, 128, 400) * 3.0
    x = torch.cat([loud, quiet])
    noisy = mix_noise(x, 1.0, torch.Generator().manual_seed(1))
    stds = noisy.std(dim=(1, 2))
    assert stds[0] == pytest.approx(x[0].std().item(), rel=0.03)
    assert stds[1] == pytest.approx(x[1].std().item(), rel=0.03)
    assert stds[0] / stds[1] == pytest.approx(8.0 / 3.0, rel=0.05)


def test_mix_noise_reproducible_with_generator():
    x = torch.randn(2, 4, 30)
    a = mix_noise(x, 0.3, torch.Generator().manual_seed(3))
    b = mix_noise(x, 0.3, torch.Generator().manual_seed(3))
    c = mix_noise(x, 0.3, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_adv_weight_ramps_after_d_pretraining():
    gan = gan_cfg(adv_weight=0.1, adv_ramp_epochs=10, d_pretrain_epochs=1)
    assert adv_weight(1, gan) == 0.0
    assert adv_weight(2, gan) == pytest.approx(0.01)
    assert adv_weight(6, gan) == pytest.approx(0.05)
    assert adv_weight(11, gan) == pytest.approx(0.1)
    assert adv_weight(50, gan) == pytest.approx(0.1)
    assert adv_weight(1, gan_cfg(adv_ramp_epochs=0, d_pretrain_epochs=0)) == pytest.approx(0.1)


def test_kl_weight_anneals_linearly():
    kl = KlConfig(beta=0.05, anneal_epochs=10, free_bits=0.1)
    assert [kl_weight(e, kl) for e in (1, 5, 10, 20)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert kl_weight(1, KlConfig(beta=0.05, anneal_epochs=0, free_bits=0.1)) == 1.0
