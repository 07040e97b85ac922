"""Generator, VAE, creative cascade and discriminator: shapes, names, behaviour, learning."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from jobs.discriminator import build_discriminator
from jobs.generator import RMS_SCALE_MAX, RMS_SCALE_MIN, build_generator, restore_rms, rms
from jobs.gan_losses import d_loss
from jobs.losses import generator_losses
from pipeline import config

TINY = ["model.transformer.d_model=32", "model.transformer.layers=1", "model.transformer.heads=2",
        "model.transformer.ff_mult=2", "model.transformer.max_frames=160",
        "model.transformer.cascade_stages=2", "model.vae.latent_channels=8",
        "model.discriminator.channels=16", "model.discriminator.layers=2",
        "model.discriminator.minibatch_features=4", "model.discriminator.minibatch_kernel_dim=4"]
ALL_PARTS = [["transformer"], ["transformer", "vae"], ["transformer", "vae", "gan"]]
T = 96


def tiny_cfg(*overrides: str):
    return config.load("demo", "local", [*TINY, *overrides])


def creative_cfg(*overrides: str):
    return tiny_cfg("stage1.mode=creative", "stage2.mode=creative", "stage3.mode=creative",
                    *overrides)


def batch(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 128, T, generator=g), torch.randn(b, 128, T, generator=g)


@pytest.mark.parametrize("parts", ALL_PARTS)
@pytest.mark.parametrize("mode", ["continuation", "creative"])
def test_generator_shapes(parts, mode):
    torch.manual_seed(0)
    cfg = creative_cfg()
    x, y = batch()
    out = build_generator(cfg, parts)(x, y, mode)
    assert out["output"].shape == x.shape
    if mode == "creative":
        assert out["mask_in"].shape == x.shape and out["mask_tgt"].shape == x.shape
        assert 0 < out["mask_in"].min() and out["mask_in"].max() < 1
    else:
        assert "mask_in" not in out
    if "vae" in parts:
        assert out["kl"].shape == (cfg.model.vae.levels,)
        assert (out["kl"] >= 0).all()
    else:
        assert "kl" not in out


def test_continuation_does_not_see_targets():
    torch.manual_seed(0)
    model = build_generator(tiny_cfg(), ["transformer", "vae"]).eval()
    x, y = batch()
    with torch.no_grad():
        a = model(x, y, "continuation")["output"]
        b = model(x, torch.randn_like(y), "continuation")["output"]
        c = model(x, None, "continuation")["output"]
    assert torch.equal(a, b) and torch.equal(a, c)


def test_output_is_deviation_from_input_time_mean():
    model = build_generator(tiny_cfg(), ["transformer"]).eval()
    with torch.no_grad():
        model.core.out_proj.weight.zero_()
        model.core.out_proj.bias.zero_()
    x = torch.randn(2, 128, T) - 5.0
    out = model(x, None, "continuation")["output"]
    assert torch.allclose(out, x.mean(dim=-1, keepdim=True).expand_as(x))


def test_parameter_names_chain_across_stages():
    cfg = creative_cfg()
    shapes = [{k: v.shape for k, v in build_generator(cfg, parts).state_dict().items()}
              for parts in ALL_PARTS]
    s1, s2, s3 = shapes
    assert set(s1) < set(s2)
    assert all(s1[k] == s2[k] for k in s1)
    assert s2 == s3        # "gan" adds nothing to G
    assert any(k.startswith("core.") for k in s1) and any(k.startswith("vae.") for k in s2)
    assert not any(k.startswith("vae.") for k in s1)
    # stage 2 loads stage 1's weights by name: only the VAE is new
    g1, g2 = build_generator(cfg, ALL_PARTS[0]), build_generator(cfg, ALL_PARTS[1])
    result = g2.load_state_dict(g1.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("vae.") for k in result.missing_keys) and result.missing_keys
    assert torch.equal(g2.core.out_proj.weight, g1.core.out_proj.weight)


def test_creative_modules_only_when_a_stage_is_creative():
    plain = build_generator(tiny_cfg(), ["transformer"])
    assert not any(k.startswith(("agent.", "fuse.")) for k in plain.state_dict())
    assert not plain.idle_parameters("continuation")
    x, y = batch()
    with pytest.raises(ValueError, match="creative"):
        plain(x, y, "creative")
    mixed = build_generator(tiny_cfg("stage3.mode=creative"), ["transformer"])
    assert mixed.idle_parameters("continuation") and not mixed.idle_parameters("creative")
    assert len(mixed.fuse) == mixed.cascade_stages == 2
    with pytest.raises(ValueError, match="mode must be one of"):
        plain(x, y, "remix")


def test_every_parameter_used_in_creative_mode():
    torch.manual_seed(0)
    model = build_generator(creative_cfg(), ["transformer", "vae"])
    x, y = batch()
    model(x, y, "creative", anti_cheat_noise=0.1)["output"].pow(2).mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_rms_restoration_clamped():
    ref = torch.ones(3, 4, 10)                     # rms 1 per sample
    out = torch.stack([torch.full((4, 10), 10.0),  # far too loud: scale clamps to 0.7
                       torch.full((4, 10), 0.01),  # far too quiet: scale clamps to 1.5
                       torch.full((4, 10), 0.8)])  # within range: restored to 1.0
    restored = rms(restore_rms(out, ref)).flatten()
    assert torch.allclose(restored, torch.tensor([10.0 * RMS_SCALE_MIN, 0.01 * RMS_SCALE_MAX, 1.0]))


def test_creative_output_rms_follows_input():
    torch.manual_seed(0)
    model = build_generator(creative_cfg(), ["transformer"]).eval()
    x, y = batch()
    out = model(x, y, "creative")["output"]
    # each cascade stage rescales toward x's RMS with a factor of at most 1.5
    ratio = (rms(out) / rms(x)).flatten()
    assert (ratio <= RMS_SCALE_MAX * 1.0001).all() and (ratio > 0).all()


def test_vae_sampling_train_vs_eval():
    torch.manual_seed(0)
    model = build_generator(tiny_cfg(), ["transformer", "vae"])
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, None, "continuation")["output"],
                           model(x, None, "continuation")["output"])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x, None, "continuation")["output"],
                               model(x, None, "continuation")["output"])


def test_vae_config_errors():
    with pytest.raises(ValueError, match="model.vae.downsample"):
        build_generator(tiny_cfg("model.vae.downsample=[2,4]"), ["transformer", "vae"])
    model = build_generator(tiny_cfg(), ["transformer"])
    with pytest.raises(ValueError, match="max_frames"):
        model(torch.randn(1, 128, 161), None, "continuation")


def test_generate_maps_noise_to_latents():
    torch.manual_seed(0)
    model = build_generator(tiny_cfg(), ["transformer", "vae", "gan"]).eval()
    noise = torch.randn(2, 128, T)
    torch.manual_seed(1)
    a = model.generate(noise)
    torch.manual_seed(1)
    b = model.generate(noise)              # the VAE latents are drawn: the seed fixes them
    assert a.shape == noise.shape and torch.equal(a, b) and torch.isfinite(a).all()
    assert not a.requires_grad


def test_discriminator_shapes_and_spectral_norm():
    cfg = tiny_cfg()
    d = build_discriminator(cfg)
    x, _ = batch()
    logits, feats = d(x)
    scales = cfg.model.discriminator.scales
    assert len(logits) == len(feats) == len(scales)
    assert all(l.shape == (3,) for l in logits)
    assert all(len(f) == cfg.model.discriminator.layers for f in feats)
    # scale s pools time by s before the first (stride 1) conv
    assert [f[0].shape[-1] for f in feats] == [-(-T // s) for s in scales]
    convs = [m for m in d.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    plain = build_discriminator(tiny_cfg("model.discriminator.spectral_norm=false"))
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


def test_discriminator_config_errors():
    with pytest.raises(ValueError, match="minibatch_features"):
        build_discriminator(tiny_cfg("model.discriminator.minibatch_features=-1"))
    with pytest.raises(ValueError, match="kernel_size"):
        build_discriminator(tiny_cfg("model.discriminator.kernel_size=4"))
    with pytest.raises(ValueError, match="scales"):
        build_discriminator(tiny_cfg("model.discriminator.scales=[]"))


def test_minibatch_discrimination_depends_on_batch():
    torch.manual_seed(0)
    x, y = batch()
    other = torch.cat([x[:1], y[1:]])               # same first sample, different others
    with_mb = build_discriminator(tiny_cfg()).eval()
    without = build_discriminator(tiny_cfg("model.discriminator.minibatch_features=0")).eval()
    with torch.no_grad():
        a, b = with_mb(x)[0][0][0], with_mb(other)[0][0][0]
        c, d = without(x)[0][0][0], without(other)[0][0][0]
    assert not torch.isclose(a, b)
    assert torch.isclose(c, d)


def test_minibatch_discrimination_logit_does_not_depend_on_batch_size():
    """One sample among i.i.d. others from one distribution: its logit barely moves from B=8 to
    B=32 (the old sum over the batch grew its minibatch features, and logits, about 4x)."""
    torch.manual_seed(0)
    d = build_discriminator(tiny_cfg()).eval()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 128, T, generator=g).cumsum(-1) * 0.1
    others = torch.randn(31, 128, T, generator=g).cumsum(-1) * 0.1
    with torch.no_grad():
        by_size = {b: [l[0].item() for l in d(torch.cat([sample, others[:b - 1]]))[0]]
                   for b in (8, 16, 32)}
    for per_scale in zip(*by_size.values()):
        assert max(per_scale) - min(per_scale) < 0.1, by_size


def test_minibatch_features_are_a_mean_over_the_other_samples():
    """Copies of one sample: similarity 1 to each other sample, whatever the batch size; a
    batch of one has no other sample and gets 0 (no neighbour), not a division by zero."""
    torch.manual_seed(0)
    mb = build_discriminator(tiny_cfg()).subs[0].minibatch.eval()
    x = torch.randn(1, mb.project.in_features)
    with torch.no_grad():
        for b in (2, 5, 16):
            assert torch.allclose(mb(x.expand(b, -1)), torch.ones(b, mb.features))
        single = mb(x)
    assert torch.equal(single, torch.zeros(1, mb.features))
    y = torch.cat([x, torch.randn(3, x.shape[1])])
    with torch.no_grad():
        out = mb(y)
    assert ((out > 0) & (out <= 1)).all()


def test_generator_learns_on_tiny_batch():
    torch.manual_seed(0)
    cfg = creative_cfg()
    model = build_generator(cfg, ["transformer", "vae"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = batch(b=2)
    losses = []
    for _ in range(12):
        out = model(x, y, "creative")
        total = generator_losses(out, x, y, cfg.stage2, "mel", kl_weight=1.0)["total"]
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.9 * losses[0]


def test_discriminator_learns_on_tiny_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    d = build_discriminator(cfg)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    real = torch.randn(4, 128, T).cumsum(-1) * 0.1      # smooth "music"
    fake = torch.randn(4, 128, T)                       # white noise
    losses = []
    for _ in range(10):
        loss, _ = d_loss(d(real)[0], d(fake)[0], cfg.stage3.gan)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
