"""Stage-3 options against the generator's prior: the skip, the conv VAE decoder, the
discriminator's dilated convs and the level term, on the real modules at tiny sizes.

The EnCodec checks use the real EnCodec latent shape (128 channels at 75 frames/s) with
random weights and random latents: no EnCodec weights exist here.
"""
from __future__ import annotations

import math

import pytest
import torch

from jobs.discriminator import build_discriminator, receptive_field
from jobs.generator import build_generator
from jobs.losses import PAIRED_TERMS, generator_losses, level_gap
from pipeline import config

TINY = ["model.transformer.d_model=16", "model.transformer.layers=1",
        "model.transformer.heads=2", "model.transformer.ff_mult=2",
        "model.transformer.max_frames=320", "model.vae.latent_channels=4",
        "model.discriminator.channels=8", "model.discriminator.layers=3",
        "model.discriminator.minibatch_features=0", "model.discriminator.spectral_norm=false"]
PARTS = ["transformer", "vae", "gan"]
T = 150   # two seconds of EnCodec (or mel) frames at 75 frames/s


def tiny_cfg(*overrides: str):
    return config.load("demo", "local", [*TINY, *overrides])


def latents(seed: int = 0, b: int = 2, frames: int = T) -> torch.Tensor:
    """[b, 128, frames] random latents around the mel level (-5)."""
    return torch.randn(b, 128, frames, generator=torch.Generator().manual_seed(seed)) - 5.0


def built(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_generator(tiny_cfg(*overrides), PARTS).eval()
    mean = torch.linspace(-6.0, -4.0, 128)
    model.set_latent_stats(mean, torch.eye(128), torch.eye(128))
    return model


def randomise_residual_outputs(model: torch.nn.Module) -> None:
    """Give the conv decoder's zero-initialised convs weights, as training would."""
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if ".blocks." in name and name.endswith("2.weight"):
            with torch.no_grad():
                p.copy_(0.2 * torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))


# --- the skip ---------------------------------------------------------------------------

def test_mean_skip_is_the_old_network_exactly():
    model = built("model.generator.skip=mean")
    x = latents()
    out = model.network(x)["output"]
    h = model.vae(model.core.encode(x))["hidden"]
    assert torch.equal(out, model.core.decode(h) + x.mean(dim=-1, keepdim=True))
    assert not any("skip" in n or "vae.mix" in n or "vae.post" in n
                   for n, _ in model.named_parameters())


def test_learned_skip_starts_as_the_mean_skip_and_learns():
    old, new = built("model.generator.skip=mean"), built("model.generator.skip=learned")
    report = new.load_state_dict(old.state_dict(), strict=False)
    assert report.missing_keys == ["skip_gate"] and not report.unexpected_keys
    x = latents()
    torch.testing.assert_close(new.network(x)["output"], old.network(x)["output"],
                               rtol=0, atol=1e-5)
    new.network(x)["output"].pow(2).mean().backward()
    assert new.skip_gate.grad is not None and new.skip_gate.grad.abs().sum() > 0


def test_no_skip_passes_nothing_of_the_inputs_mean():
    model = built("model.generator.skip=none")
    x = latents()
    shifted = x + torch.randn(2, 128, 1)
    assert torch.equal(model.level(x), model.level(shifted))
    assert torch.equal(model.level(x).flatten(), model.latent_mean)


def test_unknown_skip_is_refused():
    with pytest.raises(ValueError, match="skip"):
        built("model.generator.skip=residual")


# --- the conv decoder -------------------------------------------------------------------

def movement(model, x: torch.Tensor) -> torch.Tensor:
    """Frame-to-frame steps [frames - 1, 128] of the network's output for one sample."""
    out = model.network(x, sample=True)["output"][0]
    return out.diff(dim=-1).T


def test_linear_decoder_moves_in_blocks_and_conv_decoder_does_not():
    x = latents(b=1, frames=160)   # a multiple of every level's factor
    torch.manual_seed(1)
    linear = movement(built("model.vae.decoder=linear"), x)
    conv_model = built("model.vae.decoder=conv")
    randomise_residual_outputs(conv_model)
    torch.manual_seed(1)
    conv = movement(conv_model, x)
    zero = lambda m: (m.abs().amax(dim=1) == 0).float().mean().item()
    # nearest upsampling by 2, 4, 8: every other step changes no level at all
    assert zero(linear) >= 0.45 and zero(conv) == 0.0
    # the linear decoder's movement lives in levels x latent_channels dimensions (12 here);
    # the conv decoder's goes past d_model (16), towards all 128 channels
    rank = lambda m: torch.linalg.matrix_rank(m.double(), rtol=1e-6).item()
    assert rank(linear) <= 12 and rank(conv) > 64
    # steps are not blockwise constant: second differences are non-zero almost everywhere
    second = conv.diff(dim=0).abs().amax(dim=1)
    assert (second > 0).float().mean().item() > 0.99


def test_fresh_conv_decoder_is_the_linear_one_interpolated():
    linear, conv = built("model.vae.decoder=linear"), built("model.vae.decoder=conv")
    report = conv.load_state_dict(linear.state_dict(), strict=False)
    assert report.missing_keys and all(k.startswith(("vae.mix.", "vae.post."))
                                       for k in report.missing_keys)
    x = latents()
    out_linear, out_conv = linear.network(x)["output"], conv.network(x)["output"]
    assert out_conv.shape == out_linear.shape == x.shape
    # the same time means (interpolation moves the levels' frames, not their average much)
    assert (out_conv.mean(-1) - out_linear.mean(-1)).abs().max() < 0.2


def test_conv_decoder_gradients_reach_every_parameter():
    model = built("model.vae.decoder=conv").train()
    randomise_residual_outputs(model)
    out = model(latents(), None, "continuation")
    (out["output"].pow(2).mean() + out["kl"].sum()).backward()
    used = [(n, p) for n, p in model.named_parameters() if n.startswith(("core.", "vae."))]
    assert any(n.startswith("vae.post.") for n, _ in used)
    assert not [n for n, p in used if p.grad is None or p.grad.abs().sum() == 0]


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="decoder"):
        built("model.vae.decoder=attention")


# --- the discriminator ------------------------------------------------------------------

def measured_field(sub: torch.nn.Module, frames: int) -> int:
    """Input frames with a non-zero gradient on the middle position of the last feature map."""
    x = torch.randn(1, 128, frames, requires_grad=True)
    _, feats = sub(x)
    last = feats[-1]
    last[..., last.shape[-1] // 2].sum().backward()
    touched = (x.grad.abs().sum(dim=1)[0] > 0).nonzero().flatten()
    return int(touched.max() - touched.min() + 1)


def test_old_discriminator_sees_under_a_second():
    cfg = tiny_cfg()
    assert cfg.model.discriminator.dilated_layers == 0
    d = build_discriminator(cfg)
    assert not any("dilated" in n for n, _ in d.named_parameters())
    assert receptive_field(cfg.model.discriminator, 4) == 68   # demo: kernel 5, 3 layers
    assert measured_field(d.subs[2], 600) == 68


def test_dilated_discriminator_sees_several_bars():
    cfg = tiny_cfg("model.discriminator.dilated_layers=2")
    d = build_discriminator(cfg)
    field = receptive_field(cfg.model.discriminator, 4)
    assert field >= 300                         # the whole 4 s chunk at 75 frames/s
    assert measured_field(d.subs[2], 1200) == field
    x = latents()
    logits, feats = d(x)
    assert [l.shape for l in logits] == [(2,)] * 3
    assert len(feats[0]) == 3 + 2
    logits[2].sum().backward()
    assert all(p.grad is not None for n, p in d.subs[2].named_parameters() if "dilated" in n)


# --- the level term ---------------------------------------------------------------------

def test_level_gap_reads_decoded_power():
    x = latents()
    assert level_gap(x, x, "mel").item() == 0.0
    # twice the mel power everywhere is log 2 nats (3 dB) louder
    assert abs(level_gap(x + math.log(2.0), x, "mel").item() - math.log(2.0)) < 1e-5
    # EnCodec: the latents' RMS doubled is log 2 too
    assert abs(level_gap(2 * x, x, "encodec").item() - math.log(2.0)) < 1e-4


def test_level_term_is_in_the_total_and_not_faded():
    cfg = tiny_cfg("stage3.loss.level=2.0")
    x = latents()
    out = {"output": (x + 1.0).requires_grad_()}
    terms = generator_losses(out, x, x, cfg.stage3, "mel", 1.0)
    assert "level" not in PAIRED_TERMS
    assert abs(terms["level"].item() - 1.0) < 1e-5
    without = generator_losses(out, x, x, tiny_cfg().stage3, "mel", 1.0)
    assert "level" not in without
    assert abs((terms["total"] - without["total"]).item() - 2.0) < 1e-4
    terms["total"].backward()
    assert out["output"].grad.abs().sum() > 0


# --- the EnCodec latent shape -----------------------------------------------------------

def test_every_new_option_on_encodec_latents():
    """128-channel latents at 75 frames/s, as EnCodec 24 kHz gives (random weights)."""
    cfg = tiny_cfg("encode.codec=encodec", "model.generator.skip=learned",
                   "model.vae.decoder=conv", "model.discriminator.dilated_layers=2",
                   "stage3.loss.level=1.0")
    model = build_generator(cfg, PARTS).train()
    d = build_discriminator(cfg)
    x = torch.randn(2, 128, 300)
    out = model(x, None, "continuation")
    assert out["output"].shape == (2, 128, 300)
    terms = generator_losses(out, x, x, cfg.stage3, "encodec", 1.0)
    logits, _ = d(out["output"])
    (terms["total"] + torch.stack(logits).mean()).backward()
    assert model.skip_gate.grad is not None
