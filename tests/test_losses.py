"""Generator losses and adversarial losses on inputs with known answers."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from jobs.gan_losses import bce_vs_real, d_loss, d_probability, feature_matching, g_adv_loss
from jobs.losses import (band_weights, creative_content, creative_style, generator_losses,
                         mask_balance, mask_complementarity, mask_coverage, mask_overlap,
                         mask_temporal_diversity, output_range_penalty, paired_total,
                         spectral_loss)
from pipeline import config

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def cfg():
    return config.load("demo", "local", [])


def stage(cfg, name="stage2", **kw):
    return dataclasses.replace(getattr(cfg, name), **kw)


def loss_cfg(cfg, name="stage2", **kw):
    return dataclasses.replace(getattr(cfg, name).loss, **kw)


# --- creative-agent mask terms -------------------------------------------------------
def test_mask_terms_on_known_masks():
    ones, zeros = torch.ones(2, 4, 10), torch.zeros(2, 4, 10)
    half = torch.full((2, 4, 10), 0.5)
    # disjoint, full coverage: input everywhere, target nowhere
    assert mask_balance(ones, zeros).item() == pytest.approx(0.5)
    assert mask_complementarity(ones, zeros).item() == pytest.approx(1.0)
    assert mask_coverage(ones, zeros).item() == pytest.approx(0.0)
    # both one half everywhere
    assert mask_balance(half, half).item() == pytest.approx(0.0)
    assert mask_complementarity(half, half).item() == pytest.approx(0.75)
    assert mask_overlap(half, half).item() == pytest.approx(0.25)
    assert mask_coverage(half, half).item() == pytest.approx(0.0)
    # both fully on: double coverage
    assert mask_coverage(ones, ones).item() == pytest.approx(1.0)
    assert mask_complementarity(ones, ones).item() == pytest.approx(0.0)
    # checkerboard in time: balanced, complementary, full coverage
    alt = torch.zeros(2, 4, 10)
    alt[..., ::2] = 1.0
    assert mask_balance(alt, 1 - alt).item() == pytest.approx(0.0)
    assert mask_complementarity(alt, 1 - alt).item() == pytest.approx(1.0)
    assert mask_overlap(alt, 1 - alt).item() == pytest.approx(0.0)


def test_temporal_diversity_hinge():
    const = torch.full((2, 4, 10), 0.5)
    assert mask_temporal_diversity(const, const, 0.1).item() == pytest.approx(0.1)
    alt = torch.zeros(2, 4, 10)
    alt[..., ::2] = 1.0          # std over time about 0.53 > 0.1
    assert mask_temporal_diversity(alt, 1 - alt, 0.1).item() == 0.0
    # half the masks constant, half varying: hinge on the constant half only
    assert mask_temporal_diversity(const, alt, 0.2).item() == pytest.approx(0.1)


# --- reconstruction terms ----------------------------------------------------------
def test_band_weights():
    w = band_weights(128)
    assert w[0] == 1.5 and w[24] == 1.5          # 0-20 %
    assert w[25] == 1.0 and w[37] == 1.0         # 20-30 %
    assert w[38] == 2.0 and w[88] == 2.0         # 30-70 %
    assert w[89] == 1.0 and w[101] == 1.0        # 70-80 %
    assert w[102] == 0.8 and w[127] == 0.8       # 80-100 %


def test_freq_weighted_applies_band_weights(cfg):
    target = torch.zeros(1, 128, 20)
    output = torch.zeros(1, 128, 20)
    output[:, 50] = 1.0                          # error only in a 2.0-weighted bin
    plain = generator_losses({"output": output}, target, target,
                             stage(cfg, "stage1"), "mel", 1.0)
    weighted = generator_losses({"output": output}, target, target,
                                stage(cfg, "stage1", loss=loss_cfg(cfg, "stage1",
                                                                   freq_weighted=True)),
                                "mel", 1.0)
    assert weighted["latent_l1"].item() == pytest.approx(2.0 * plain["latent_l1"].item())
    with pytest.raises(ValueError, match="freq_weighted"):
        generator_losses({"output": output}, target, target,
                         stage(cfg, "stage1", loss=loss_cfg(cfg, "stage1", freq_weighted=True)),
                         "encodec", 1.0)


def test_spectral_loss_ignores_circular_shift():
    x = torch.randn(2, 3, 64)
    assert spectral_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert spectral_loss(torch.roll(x, 5, dims=-1), x).item() == pytest.approx(0.0, abs=1e-5)
    assert spectral_loss(2 * x, x).item() > 0.1


def test_output_range_penalty():
    ref = torch.zeros(1, 2, 5)
    ref[0, 0, 0] = 1.0                           # range [0, 1] -> allowed [-0.5, 1.5]
    out = ref.clone()
    assert output_range_penalty(out, ref).item() == 0.0
    out[0, 1, 3] = 2.5                           # 1.0 beyond the upper bound
    out[0, 1, 4] = -1.0                          # 0.5 beyond the lower bound
    assert output_range_penalty(out, ref).item() == pytest.approx((1.0 + 0.25) / 10)


def test_continuation_total_is_weighted_sum(cfg):
    torch.manual_seed(0)
    x, y = torch.randn(2, 128, 30), torch.randn(2, 128, 30)
    out = {"output": y + 0.1 * torch.randn_like(y)}
    st = stage(cfg, "stage1", loss=loss_cfg(cfg, "stage1", latent_mse=0.5))
    terms = generator_losses(out, x, y, st, "mel", 1.0)
    lc = st.loss
    expected = (lc.latent_l1 * terms["latent_l1"] + lc.latent_mse * terms["latent_mse"]
                + lc.spectral * terms["spectral"] + lc.output_range * terms["output_range"])
    assert terms["total"].item() == pytest.approx(expected.item())
    assert "balance" not in terms and "kl" not in terms
    perfect = generator_losses({"output": y.clone()}, x, y, st, "mel", 1.0)
    assert perfect["total"].item() == pytest.approx(0.0, abs=1e-6)


def creative_batch(seed: int = 0, b: int = 2, t: int = 30):
    """Input and target with different per-channel levels and independent time patterns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 128, 1, generator=g) + torch.randn(b, 128, t, generator=g).cumsum(-1) * 0.3
    y = torch.randn(b, 128, 1, generator=g) + torch.randn(b, 128, t, generator=g).cumsum(-1) * 0.3
    return x, y


def test_content_is_the_input_pattern_and_style_the_target_statistics():
    x, y = creative_batch()
    offset = torch.randn(2, 128, 1)
    assert creative_content(2.5 * x + offset, x).item() == pytest.approx(0.0, abs=1e-5)
    scale = torch.rand(2, 128, 1) + 0.5           # per channel: only the std floor differs
    assert creative_content(scale * x + offset, x).item() < 0.02
    assert creative_content(y, x).item() > 0.5
    # the target's per-channel level and spread in the input's time pattern: style 0
    xz = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    adain = xz * y.std(-1, unbiased=False, keepdim=True) + y.mean(-1, keepdim=True)
    assert creative_style(adain, y).item() == pytest.approx(0.0, abs=1e-5)
    assert creative_content(adain, x).item() < 0.02
    assert creative_style(x, y).item() > 0.3
    # a constant channel in the input asks for nothing impossible (finite, no blow-up)
    flat = x.clone()
    flat[:, 0] = 1.0
    assert torch.isfinite(creative_content(x, flat))


def test_creative_objective_copies_lose(cfg):
    """Copying the input, the target, the masked views (the old blend reference) or a splice
    of the two by complementary masks cannot score 0: each keeps at most one of input
    pattern / target statistics."""
    x, y = creative_batch()
    m_in = (torch.rand_like(x) > 0.5).float()
    m_tgt = 1 - m_in
    st = stage(cfg, "stage1", mode="creative")
    xz = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    adain = xz * y.std(-1, unbiased=False, keepdim=True) + y.mean(-1, keepdim=True)

    def objective(output):
        terms = generator_losses({"output": output, "mask_in": m_in, "mask_tgt": m_tgt},
                                 x, y, st, "mel", 1.0)
        return (st.loss.content * terms["content"] + st.loss.style * terms["style"]).item()
    best = objective(adain)
    soft = torch.full_like(x, 0.5)
    for copy in (x, y, m_in * x + m_tgt * y, soft * x + soft * y):
        assert objective(copy) > best + 0.3, (objective(copy), best)


def test_creative_terms_and_total(cfg):
    x, y = creative_batch()
    m_in = torch.zeros_like(x)
    m_in[..., :15] = 1.0                         # input in the first half, target after
    st = stage(cfg, "stage1", mode="creative")
    out = {"output": x.clone(), "mask_in": m_in, "mask_tgt": 1 - m_in}
    terms = generator_losses(out, x, y, st, "mel", 1.0)
    assert terms["balance"].item() == pytest.approx(0.0)
    assert terms["coverage"].item() == pytest.approx(0.0)
    assert terms["overlap"].item() == pytest.approx(0.0)
    assert terms["complementarity"].item() == pytest.approx(1.0)
    assert "latent_l1" not in terms              # no per-element reference in creative mode
    lc = st.loss
    expected = (lc.content * terms["content"] + lc.style * terms["style"]
                + lc.output_range * terms["output_range"] + lc.balance * terms["balance"]
                + lc.coverage * terms["coverage"] + lc.overlap * terms["overlap"]
                + lc.temporal_diversity * terms["temporal_diversity"])
    assert terms["total"].item() == pytest.approx(expected.item())
    assert paired_total(terms, st).item() == pytest.approx(
        (lc.content * terms["content"] + lc.style * terms["style"]
         + lc.output_range * terms["output_range"]).item())
    with pytest.raises(ValueError, match="masks"):
        generator_losses({"output": y}, x, y, st, "mel", 1.0)


def test_powermuse_mask_weights_in_creative_mode_only(cfg):
    for name in ("stage1", "stage2", "stage3"):
        lc = getattr(cfg, name).loss
        assert (lc.overlap, lc.coverage, lc.temporal_diversity, lc.balance) == (10.0, 0.5, 5.0, 5.0)
    x, y = creative_batch()
    st = stage(cfg, "stage1")                    # continuation: the mask weights play no part
    terms = generator_losses({"output": y + 0.1}, x, y, st, "mel", 1.0)
    assert not {"overlap", "balance", "content", "style"} & set(terms)
    lc = st.loss
    assert terms["total"].item() == pytest.approx(
        (lc.latent_l1 * terms["latent_l1"] + lc.latent_mse * terms["latent_mse"]
         + lc.spectral * terms["spectral"] + lc.output_range * terms["output_range"]).item())


def mask_logits(jitter: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (jitter * torch.randn(2, 2, 8, 40, generator=g)).requires_grad_()


def mask_step_losses(cfg, overlap: float, logits: torch.Tensor) -> dict:
    x, y = creative_batch(t=40, b=2)
    x, y = x[:, :8], y[:, :8]
    st = stage(cfg, "stage1", mode="creative", loss=loss_cfg(cfg, "stage1", overlap=overlap))
    m = torch.sigmoid(logits)
    return generator_losses({"output": x, "mask_in": m[0], "mask_tgt": m[1]}, x, y, st,
                            "mel", 1.0)


@pytest.mark.parametrize("overlap", [10.0, 0.0])
def test_overlap_term_pushes_masks_apart(cfg, overlap):
    """Masks of 0.5 everywhere satisfy balance and coverage; only the overlap term moves them
    (one step: overlap falls); with symmetry broken a little, it drives them apart."""
    logits = mask_logits(0.0)
    before = mask_step_losses(cfg, overlap, logits)
    before["total"].backward()
    with torch.no_grad():
        logits -= 1.0 * logits.grad
    after = mask_step_losses(cfg, overlap, logits)
    if overlap:
        assert after["overlap"].item() < before["overlap"].item() - 1e-4
    else:
        assert after["overlap"].item() == pytest.approx(before["overlap"].item(), abs=1e-7)
    logits = mask_logits(0.01)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        mask_step_losses(cfg, overlap, logits)["total"].backward()
        opt.step()
    m = torch.sigmoid(logits).detach()
    apart = (m[0] - m[1]).abs().mean().item()
    final = mask_step_losses(cfg, overlap, logits)
    if overlap:
        assert apart > 0.6 and final["complementarity"].item() > 0.9
        assert abs(final["mask_in_mean"].item() - 0.5) < 0.1   # balance still holds
    else:
        assert apart < 0.3 and final["complementarity"].item() < 0.8


def test_bf16_outputs_give_float32_losses(cfg):
    torch.manual_seed(0)
    x, y = torch.randn(2, 128, 30), torch.randn(2, 128, 30)
    masks = torch.rand(2, 2, 128, 30)
    out = {"output": y.bfloat16(), "mask_in": masks[0].bfloat16(),
           "mask_tgt": masks[1].bfloat16(), "kl": torch.tensor([0.2, 0.3, 0.4]).bfloat16()}
    terms = generator_losses(out, x, y, stage(cfg, "stage2", mode="creative"), "mel", 1.0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_free_bits_floor_each_level(cfg):
    y = torch.zeros(1, 128, 10)
    kl = torch.tensor([0.01, 0.5, 0.05], requires_grad=True)
    st = stage(cfg, "stage2")                    # free_bits 0.1, beta 0.05
    terms = generator_losses({"output": y, "kl": kl}, y, y, st, "mel", kl_weight=0.5)
    assert terms["kl"].item() == pytest.approx(0.1 + 0.5 + 0.1)
    assert terms["kl_raw"].item() == pytest.approx(0.56)
    assert terms["kl_level_0"].item() == pytest.approx(0.01)
    assert terms["total"].item() == pytest.approx(0.5 * st.kl.beta * 0.7)
    terms["total"].backward()
    # floored levels get no gradient; the free level gets kl_weight * beta
    assert kl.grad.tolist() == pytest.approx([0.0, 0.5 * st.kl.beta, 0.0])


# --- adversarial terms ---------------------------------------------------------------
def test_bce_at_confusion_point_is_ln2(cfg):
    gan = cfg.stage3.gan                         # bce with label smoothing 0.1
    zeros = [torch.zeros(4), torch.zeros(4), torch.zeros(4)]
    loss, stats = d_loss(zeros, zeros, gan)
    assert loss.item() == pytest.approx(LN2)
    assert stats["d_loss_real"] == pytest.approx(LN2)
    assert stats["d_loss_fake"] == pytest.approx(LN2)
    assert stats["d_real_ln2_gap"] == pytest.approx(0.0, abs=1e-6)
    assert stats["d_real_mean"] == pytest.approx(0.5) and stats["d_fake_mean"] == pytest.approx(0.5)
    assert g_adv_loss(zeros, gan).item() == pytest.approx(LN2)
    assert bce_vs_real(zeros).tolist() == pytest.approx([LN2] * 4)
    assert d_probability(zeros).tolist() == pytest.approx([0.5] * 4)


def test_bce_label_smoothing_and_stats(cfg):
    gan = cfg.stage3.gan
    real, fake = [torch.tensor([3.0, -1.0])], [torch.tensor([-2.0, 1.0])]
    loss, stats = d_loss(real, fake, gan)
    smooth = 1 - gan.label_smoothing

    def bce(logit, label):
        p = 1 / (1 + math.exp(-logit))
        return -(label * math.log(p) + (1 - label) * math.log(1 - p))
    expect_real = (bce(3.0, smooth) + bce(-1.0, smooth)) / 2
    expect_fake = (bce(-2.0, 0.0) + bce(1.0, 0.0)) / 2
    assert stats["d_loss_real"] == pytest.approx(expect_real)
    assert stats["d_loss_fake"] == pytest.approx(expect_fake)
    assert loss.item() == pytest.approx(0.5 * (expect_real + expect_fake))
    assert stats["d_acc_real"] == 0.5 and stats["d_acc_fake"] == 0.5
    assert stats["d_fake_ln2_gap"] == pytest.approx(abs(expect_fake - LN2), abs=1e-6)
    assert bce_vs_real(real).tolist() == pytest.approx([bce(3.0, 1.0), bce(-1.0, 1.0)])


def test_hinge_and_lsgan_on_known_logits(cfg):
    real = [torch.tensor([2.0, 0.5])]
    fake = [torch.tensor([-2.0, 0.0])]
    hinge = dataclasses.replace(cfg.stage3.gan, loss="hinge")
    loss, stats = d_loss(real, fake, hinge)
    assert stats["d_loss_real"] == pytest.approx(0.25)     # mean(relu(1 - [2, .5]))
    assert stats["d_loss_fake"] == pytest.approx(0.5)      # mean(relu(1 + [-2, 0]))
    assert loss.item() == pytest.approx(0.375)
    assert "d_real_ln2_gap" not in stats
    assert g_adv_loss(fake, hinge).item() == pytest.approx(1.0)
    lsgan = dataclasses.replace(cfg.stage3.gan, loss="lsgan")
    loss, stats = d_loss([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 2.0])], lsgan)
    assert stats["d_loss_real"] == pytest.approx(0.5)
    assert stats["d_loss_fake"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(1.25)
    assert g_adv_loss([torch.tensor([0.0, 2.0])], lsgan).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gan.loss"):
        d_loss(real, fake, dataclasses.replace(hinge, loss="wasserstein"))


def test_scales_are_averaged(cfg):
    gan = dataclasses.replace(cfg.stage3.gan, loss="hinge")
    one = g_adv_loss([torch.tensor([1.0])], gan)
    two = g_adv_loss([torch.tensor([1.0]), torch.tensor([3.0])], gan)
    assert one.item() == -1.0 and two.item() == -2.0
    assert d_probability([torch.tensor([0.0]), torch.tensor([100.0])]).item() == pytest.approx(0.75)


def test_feature_matching_detaches_real():
    real = [[torch.ones(2, 3, 4, requires_grad=True)], [torch.zeros(2, 3, 2, requires_grad=True)]]
    fake = [[torch.zeros(2, 3, 4, requires_grad=True)], [torch.zeros(2, 3, 2, requires_grad=True)]]
    fm = feature_matching(real, fake)
    assert fm.item() == pytest.approx(0.5)                 # (1 + 0) / 2 feature maps
    fm.backward()
    assert real[0][0].grad is None and fake[0][0].grad is not None
    assert feature_matching(real, real).item() == 0.0
