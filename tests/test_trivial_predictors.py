"""The structure-aware trivial continuations on synthetic latents whose right answer is
known: an exactly periodic input is continued exactly, a random one is not."""
from __future__ import annotations

import pytest
import torch

from jobs.trivial_predictors import (autocorrelation, best_period, copy_last_continuation,
                                     lagged_frames, last_bar_continuation, period_continuation,
                                     period_range, tile_end)

C, T = 8, 300


def periodic(period: int, frames: int, seed: int, offset: int = 0) -> torch.Tensor:
    """[C, frames]: one random cycle of `period` frames repeated, starting `offset` frames in."""
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randn(C, period, generator=g) + 3.0 * torch.randn(C, 1, generator=g)
    index = (torch.arange(frames) + offset) % period
    return cycle[:, index]


def test_period_range_from_chunk_length_and_frame_rate():
    assert period_range(300, 75, 0.5) == (37, 150)     # the demo: 4 s chunks at 75 frames/s
    assert period_range(750, 75, 0.5) == (37, 375)
    assert period_range(20, 75, 0.5) == (10, 10)       # a short chunk: the range shrinks to fit
    assert period_range(1, 75, 0.5) == (1, 1)


def test_best_period_finds_each_samples_own_period_under_noise():
    g = torch.Generator().manual_seed(0)
    periods = (48, 75, 101)
    x = torch.stack([periodic(p, T, seed=p) for p in periods])
    assert best_period(x, 37, 150).tolist() == [48, 75, 101]     # exactly periodic: its period
    noisy = x + 0.3 * torch.randn(x.shape, generator=g)
    found = best_period(noisy, 37, 150).tolist()                # noisy: the period or a multiple
    assert all(f % p == 0 for f, p in zip(found, periods)), found
    assert best_period(noisy, 37, 60).tolist()[0] == 48
    r = autocorrelation(x, 37, 150)
    assert r.shape == (3, 114)
    assert r[0, 48 - 37].item() == pytest.approx(1.0, abs=1e-9)
    assert r[0, 60 - 37].item() < 0.5          # a lag that is no multiple of 48


def test_period_continuation_of_an_exactly_periodic_input_is_exact():
    full = torch.stack([periodic(p, 2 * T, seed=p) for p in (40, 64, 99)])   # input + next chunk
    inp, tgt = full[..., :T], full[..., T:]
    pred = period_continuation(inp, 37, 150, T)
    assert pred.shape == tgt.shape
    assert (pred - tgt).abs().max().item() < 1e-6
    # the start chunk's own mean or a repeat of it do not get there
    assert (inp - tgt).abs().mean() > 0.5


def test_period_continuation_of_a_random_input_misses_its_continuation():
    g = torch.Generator().manual_seed(1)
    inp, tgt = torch.randn(4, C, T, generator=g), torch.randn(4, C, T, generator=g)
    pred = period_continuation(inp, 37, 150, T)
    # unrelated frames: about sqrt(2) * E|N(0,1)| = 1.13 apart
    assert (pred - tgt).abs().mean().item() == pytest.approx(1.13, abs=0.05)


def test_last_bar_repeats_the_last_frames_and_continues_a_song_in_that_bar():
    x = torch.arange(10.0).view(1, 1, 10)
    assert tile_end(x, 3, 7).flatten().tolist() == [7, 8, 9, 7, 8, 9, 7]
    assert last_bar_continuation(x, 10, 12).flatten().tolist() == list(range(10)) + [0, 1]
    full = periodic(150, 2 * T, seed=3, offset=17).unsqueeze(0)   # a 2 s bar at 75 frames/s
    pred = last_bar_continuation(full[..., :T], 150, T)
    assert (pred - full[..., T:]).abs().max().item() < 1e-6
    wrong = last_bar_continuation(full[..., :T], 130, T)           # another bar length misses
    assert (wrong - full[..., T:]).abs().mean().item() > 0.5


def test_periods_are_per_sample_and_checked():
    x = torch.arange(20.0).view(2, 1, 10)
    out = tile_end(x, torch.tensor([2, 5]), 4)
    assert out[0].flatten().tolist() == [8, 9, 8, 9]
    assert out[1].flatten().tolist() == [15, 16, 17, 18]
    with pytest.raises(ValueError):
        tile_end(x, 11, 4)
    with pytest.raises(ValueError):
        autocorrelation(x, 5, 10)


def test_autocorrelation_equals_the_sum_over_each_lag():
    """The FFT form gives each lag's normalised sum of products over the overlap."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, C, 90, generator=g) + torch.linspace(0, 2, 90)
    r = autocorrelation(x, 5, 45)
    c = (x - x.mean(dim=-1, keepdim=True)).double()
    for lag in (5, 17, 45):
        a, b = c[..., :90 - lag], c[..., lag:]
        want = (a * b).sum(dim=(1, 2)) / (a.pow(2).sum(dim=(1, 2)) * b.pow(2).sum(dim=(1, 2))).sqrt()
        assert torch.allclose(r[:, lag - 5], want, atol=1e-9)


def test_copy_last_holds_the_inputs_last_frame():
    x = torch.stack([periodic(p, T, seed=p) for p in (40, 64)])
    pred = copy_last_continuation(x, 120)
    assert pred.shape == (2, C, 120)
    assert torch.equal(pred, x[..., -1:].expand(2, C, 120))
    # the right answer for an input that ends on a held note
    held = torch.cat([x[..., :-30], x[..., -30:-29].expand(2, C, 30)], dim=-1)
    assert torch.equal(copy_last_continuation(held, T), held[..., -1:].expand(2, C, T))


def test_lagged_frames_read_the_true_frames_lag_back():
    """Teacher-forced yardsticks: frame t of the target from the truth `lag` frames back in
    input + target; lag 1 copies the previous frame, a bar the frame one bar ago."""
    full = torch.stack([periodic(p, 2 * T, seed=p) for p in (50, 75)])
    inp, tgt = full[..., :T], full[..., T:]
    assert torch.equal(lagged_frames(inp, tgt, 1)[..., 1:], tgt[..., :-1])
    assert torch.equal(lagged_frames(inp, tgt, 1)[..., 0], inp[..., -1])
    # one bar = the period: exact; per-sample lags
    assert torch.equal(lagged_frames(inp, tgt, torch.tensor([50, 75])), tgt)
    assert not torch.equal(lagged_frames(inp, tgt, 60), tgt)
    # free-running, "one bar ago" continues the input with its own predictions: last_bar
    bar = 60
    free = torch.cat([inp, torch.zeros_like(tgt)], dim=-1)
    for t in range(T):
        free[..., T + t] = free[..., T + t - bar]
    assert torch.equal(free[..., T:], last_bar_continuation(inp, bar, T))
    with pytest.raises(ValueError):
        lagged_frames(inp, tgt, 0)
