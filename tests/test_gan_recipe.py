"""Stage 3's anti-collapse levers: batch feature matching, latent moment matching, R1,
data-shaped curriculum noise, the training-latent statistics and the paired-loss fade."""
from __future__ import annotations

import torch

from jobs.curriculum import mix_noise
from jobs.gan_losses import feature_matching, moment_matching, r1_penalty
from jobs.generator import build_generator
from pipeline import config


def music_like(n: int, seed: int, channels: int = 16, frames: int = 64) -> torch.Tensor:
    """Batches with a song-level spectrum per sample, smooth movement in time and a level."""
    g = torch.Generator().manual_seed(seed)
    level = -5.0 + 2.0 * torch.randn(n, channels, 1, generator=g)
    walk = torch.randn(n, channels, frames, generator=g).cumsum(dim=-1) * 0.3
    return level + walk


def test_paired_feature_matching_prefers_the_average_batch_matching_does_not():
    real = [[music_like(16, 0)]]
    other = [[music_like(16, 1)]]                              # another draw of real music
    average = [[real[0][0].mean(dim=0, keepdim=True).expand_as(real[0][0])]]
    assert feature_matching(real, average, "paired") < feature_matching(real, other, "paired")
    assert feature_matching(real, other, "batch") < feature_matching(real, average, "batch")


def test_moment_matching_scores_collapse_and_white_noise_worse_than_real_music():
    real, other = music_like(16, 0), music_like(16, 1)
    average = real.mean(dim=0, keepdim=True).expand_as(real).contiguous()
    white = real.mean() + real.std() * torch.randn(real.shape, generator=torch.Generator().manual_seed(2))
    good = moment_matching(other, real)
    collapsed, noise = moment_matching(average, real), moment_matching(white, real)
    assert good["total"] < collapsed["total"] and good["total"] < noise["total"]
    assert collapsed["between"] > 5 * good["between"]     # songs all alike
    assert noise["delta"] > 5 * good["delta"]             # no smooth movement


def test_moment_matching_gives_the_generator_a_gradient_toward_variety():
    real = music_like(16, 0)
    fake = real.mean(dim=0, keepdim=True).expand_as(real).clone()
    fake += 0.01 * torch.randn(fake.shape, generator=torch.Generator().manual_seed(3))
    fake.requires_grad_(True)
    before = moment_matching(fake, real)["between"]
    moment_matching(fake, real)["total"].backward()
    with torch.no_grad():
        stepped = fake - 5.0 * fake.grad
    assert moment_matching(stepped, real)["between"] < before


def test_r1_penalty_is_the_squared_input_gradient():
    real = torch.randn(4, 3, 5, requires_grad=True)
    weight = torch.randn(3, 5, requires_grad=True)             # D's parameter
    logits = [(real * weight).sum(dim=(1, 2))]                 # d logit_i / d real_i = weight
    penalty = r1_penalty(logits, real)
    assert torch.allclose(penalty, weight.pow(2).sum())
    penalty.backward()                                         # D learns from it: 2 * weight
    assert torch.allclose(weight.grad, 2 * weight.detach())


def test_data_noise_keeps_the_level_and_varies_between_samples():
    n, c, t = 64, 8, 200
    mean, song, frame = torch.full((c,), -5.0), 2.0 * torch.eye(c), 0.5 * torch.eye(c)
    song[0, 1] = song[1, 0] = 1.0                              # bins 0 and 1 move together
    x = torch.zeros(n, c, t)
    noise = mix_noise(x, 1.0, torch.Generator().manual_seed(0), (mean, song, frame))
    assert abs(noise.mean().item() + 5.0) < 0.3                # the data's level
    assert abs(noise[:, 2:].mean(dim=-1).std(dim=0).mean().item() - 2.0) < 0.3   # songs differ
    assert abs(noise.std(dim=-1).mean().item() - 0.5) < 0.05   # and move within a chunk
    song_means = noise.mean(dim=-1)
    assert torch.corrcoef(song_means[:, :3].T)[0, 1] > 0.6     # with the data's correlations
    assert abs(torch.corrcoef(song_means[:, :3].T)[0, 2]) < 0.4
    seed = mix_noise(x + 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs(seed.mean().item()) < 0.05                      # the seed's noise has no level
    assert mix_noise(x, 0.0, stats=(mean, song, frame)) is x


def test_generator_saves_its_noise_statistics():
    cfg = config.load("demo")
    g = build_generator(cfg, ["transformer", "vae"])
    assert g.noise_stats("sample_std") is None
    stats = (torch.full((128,), -4.0), 1.5 * torch.eye(128), 0.7 * torch.eye(128))
    g.set_latent_stats(*stats)
    again = build_generator(cfg, ["transformer", "vae"])
    again.load_state_dict(g.state_dict())
    for got, want in zip(again.noise_stats("data"), stats):
        assert torch.equal(got, want)


def test_generation_draws_the_vae_latents_validation_does_not():
    cfg = config.load("demo")
    g = build_generator(cfg, ["transformer", "vae"]).eval()
    noise = torch.randn(2, 128, 40)
    with torch.no_grad():
        torch.manual_seed(0)
        a = g.generate(noise)
        torch.manual_seed(1)
        b = g.generate(noise)
        torch.manual_seed(0)
        again = g.generate(noise)
        means = [g(noise, None, "continuation")["output"] for _ in range(2)]
    assert not torch.equal(a, b) and torch.equal(a, again)   # drawn, and seeded
    assert torch.equal(means[0], means[1])                    # eval forward: the means


def test_latent_stats_are_the_two_covariances_of_the_training_chunks():
    from jobs.latent_stats import psd_sqrt
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    root = psd_sqrt(a)
    assert torch.allclose(root @ root, a, atol=1e-5) and torch.allclose(root, root.T)


def test_batch_statistics_stay_finite_for_one_sample_per_rank():
    real, fake = music_like(1, 0), music_like(1, 1).requires_grad_(True)
    terms = moment_matching(fake, real)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    assert torch.isfinite(fake.grad).all()
    assert torch.isfinite(feature_matching([[real]], [[fake]], "batch"))
