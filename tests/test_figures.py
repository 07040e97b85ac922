"""The learning figures on inputs where the right answer is known: periodicity, the
fresh-classifier two-sample test, window precision/recall, the trivial twins, the targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs import learning_targets as lt
from jobs.figures import windows_of, window_manifold
from jobs.periodicity import clip_periodicity, lag_range, periodicity
from jobs.twins import shuffled_twin, white_twin
from jobs.two_sample import two_sample_test
from jobs.verdict_table import render

RATE = 75.0


def periodic(n: int, period: int = 100, frames: int = 300, channels: int = 16,
             seed: int = 0) -> torch.Tensor:
    """Clips that repeat a random pattern every `period` frames, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, channels, period, generator=gen)
    x = base.repeat(1, 1, frames // period + 1)[:, :, :frames]
    return x + 0.3 * torch.randn(n, channels, frames, generator=gen)


def smooth(n: int, frames: int = 120, channels: int = 8, seed: int = 0) -> torch.Tensor:
    """Slowly moving clips (a running mean of noise): neighbouring frames are alike."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, channels, frames + 15, generator=gen)
    return torch.nn.functional.avg_pool1d(noise, 16, stride=1)[:, :, :frames] * 4


def test_periodicity_is_high_for_repetition_and_low_without_order():
    clips = periodic(8)
    assert periodicity(clips, RATE) > 0.8
    assert periodicity(shuffled_twin(clips, seed=1), RATE) < 0.1
    assert periodicity(torch.randn(8, 16, 300), RATE) < 0.1
    # a constant spectrum plus fresh noise each frame (the data-shaped prior's shape)
    constant = torch.randn(8, 16, 1) * 3 + torch.randn(8, 16, 300)
    assert periodicity(constant, RATE) < 0.1
    assert clip_periodicity(clips, RATE).shape == (8,)


def test_periodicity_lags_and_short_clips():
    assert lag_range(300, 75) == (38, 150)         # 0.5 s .. half the clip (under 4 s)
    assert lag_range(1000, 75) == (38, 300)        # .. 4 s
    with pytest.raises(ValueError, match="too short"):
        periodicity(torch.randn(2, 4, 60), RATE)


def test_two_sample_accuracy_is_chance_for_one_distribution_and_high_for_two():
    a, b = smooth(32, seed=1), smooth(32, seed=2)
    same = two_sample_test(a, b, seed=0)
    assert 0.3 <= same["accuracy"] <= 0.7 and same["clips_per_side"] == 32
    # the same frames in a random order: only the order in time tells them apart
    shuffled = two_sample_test(a, shuffled_twin(b, seed=3), seed=0)
    assert shuffled["accuracy"] >= 0.9
    assert shuffled["accuracy_std"] >= 0
    # repeatable
    assert two_sample_test(a, b, seed=0) == same


def test_two_sample_refuses_too_few_clips_or_mismatched_shapes():
    with pytest.raises(ValueError, match="too few"):
        two_sample_test(smooth(5), smooth(5, seed=1))
    with pytest.raises(ValueError, match="one shape"):
        two_sample_test(smooth(10), smooth(10, channels=4))


def test_windows_carry_short_time_order_that_frames_do_not():
    real, train = smooth(16, seed=1), smooth(16, seed=2)
    samples, groups = windows_of(real)
    assert samples.shape == (16 * (120 // 8), 4 * 8) and groups.max() == 15
    like = window_manifold(train, real, seed=0)
    shuffled = window_manifold(shuffled_twin(train, seed=4), real, seed=0)
    assert like["precision"] > 0.5
    assert shuffled["precision"] < 0.5 * like["precision"]


def test_twins_have_the_data_level_and_the_real_frames():
    ref = smooth(16) + torch.linspace(-3, 3, 8).view(1, -1, 1)
    white = white_twin(ref, 64, 200, seed=0)
    assert white.shape == (64, 8, 200)
    assert torch.allclose(white.mean(dim=(0, 2)), ref.mean(dim=(0, 2)), atol=0.1)
    assert torch.allclose(white.std(dim=(0, 2)), ref.std(dim=(0, 2)), rtol=0.1)
    shuffled = shuffled_twin(ref, seed=0)
    assert torch.equal(shuffled.sort(dim=2).values, ref.sort(dim=2).values)
    assert not torch.equal(shuffled, ref)


def table(**sets):
    """A figure table with one pick per set."""
    return {name: {k: {"mean": v, "std": 0.0, "picks": 1} for k, v in figs.items()}
            for name, figs in sets.items()}


def test_targets_judge_the_generator_against_its_prior_and_real_music():
    prior = dict(two_sample_accuracy=1.0, periodicity=0.05, rms_db_diff=18.0, precision=0.3,
                 recall=0.6)
    good = dict(two_sample_accuracy=0.7, periodicity=0.3, rms_db_diff=-2.0, precision=0.4,
                recall=0.5)
    bad = dict(two_sample_accuracy=0.95, periodicity=0.1, rms_db_diff=5.0, precision=0.4,
               recall=0.3)
    t = table(generated=good, prior=prior, real=dict(periodicity=0.5), bad=bad)
    assert all(row["met"] for row in lt.judge_stage3(t))
    assert not any(row["met"] for row in lt.judge_stage3(t, "bad"))
    assert not any(row["met"] for row in lt.judge_stage3(t, "prior"))
    assert lt.verdict(t).startswith("the generator meets every")
    assert "misses 4 of 4" in lt.verdict(table(generated=bad, prior=prior, real=dict(periodicity=0.5)))
    # a missing figure misses
    assert not lt.judge_stage3(table(generated=good, real=dict(periodicity=0.5)))[0]["met"]


def test_stage1_targets():
    rows = lt.judge_stage1(2.8, {"start_mean": 3.1, "period": 3.0}, 0.05)
    assert rows[0]["value"] == pytest.approx(1 - 2.8 / 3.0) and rows[0]["met"]
    assert rows[1]["met"]
    rows = lt.judge_stage1(2.95, {"start_mean": 3.1, "period": 3.0}, -0.004)
    assert not rows[0]["met"] and not rows[1]["met"]


def test_verdict_table_shows_every_set_and_the_verdict():
    prior = dict(two_sample_accuracy=1.0, periodicity=0.05, rms_db_diff=18.0, precision=0.3,
                 recall=0.6)
    t = table(generated=prior, prior=prior, white=prior, shuffled=prior,
              real=dict(periodicity=0.5, rms_db_diff=0.0))
    record = {"table": t, "targets": {n: lt.judge_stage3(t, n) for n in t if n != "real"},
              "verdict": lt.verdict(t), "n_generated": 64, "n_real": 24, "picks": [0, 1, 2]}
    text = render(record)
    assert "two-sample accuracy" in text and "shuffled" in text and "real" in text
    assert "✗" in text and "verdict: the generator misses" in text
    assert np.isfinite(t["generated"]["periodicity"]["mean"])
