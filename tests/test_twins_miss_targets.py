"""Every learning target is one that the trivial generators and predictors fail: stage 1's
trivial baselines on real encoded music, scored as stage 1 is (jobs.learning_targets)."""
from __future__ import annotations

import torch

from data_prep.codec_mel import MelCodec
from data_prep.corpus import song
from jobs.learning_targets import judge_stage1
from jobs.losses import generator_losses
from jobs.trivial_predictors import (copy_last_continuation, last_bar_continuation,
                                     period_continuation, period_range)
from tests.fixtures.config import make_cfg

SR, CHUNK_S = 12000, 4.0


def pairs(tmp_path, songs: int = 6):
    """(inputs, targets) [songs, 128, T]: the first two 4 s chunks of demo-corpus songs."""
    cfg = make_cfg(tmp_path)
    codec = MelCodec(cfg.encode.mel, SR, torch.device("cpu"))
    n = int(CHUNK_S * SR)
    audio = torch.stack([torch.from_numpy(song(11, i, 2 * CHUNK_S, SR).mean(0, keepdims=True))
                         for i in range(songs)]).float()
    return cfg, codec.encode(audio[..., :n]), codec.encode(audio[..., n:2 * n]), codec.frame_rate


def baseline_outputs(inp: torch.Tensor, frames: int, rate: float) -> dict[str, torch.Tensor]:
    lo, hi = period_range(inp.shape[-1], rate, 0.5)
    return {"repeat": inp, "mean": inp.mean(dim=(0, 2), keepdim=True).expand(len(inp), -1, frames),
            "start_mean": inp.mean(dim=2, keepdim=True).expand(-1, -1, frames),
            "copy_last": copy_last_continuation(inp, frames),
            "period": period_continuation(inp, lo, hi, frames),
            "last_bar": last_bar_continuation(inp, round(2.0 * rate), frames)}


def test_no_trivial_baseline_meets_the_stage1_targets(tmp_path):
    cfg, inp, tgt, rate = pairs(tmp_path)
    perm = torch.stack([x[:, torch.randperm(x.shape[-1], generator=torch.Generator()
                                           .manual_seed(i))] for i, x in enumerate(inp)])

    def loss(output):
        return float(generator_losses({"output": output}, inp, tgt, cfg.stage1, "mel",
                                      1.0)["total"])
    ordered = {k: loss(v) for k, v in baseline_outputs(inp, tgt.shape[-1], rate).items()}
    permuted = {k: loss(v) for k, v in baseline_outputs(perm, tgt.shape[-1], rate).items()}
    for name in ordered:
        margin, order = judge_stage1(ordered[name], ordered, permuted[name] / ordered[name] - 1)
        assert not margin["met"], (name, margin)          # none is 5% below the best of them
        assert not (margin["met"] and order["met"])
    for name in ("mean", "start_mean"):                    # blind to order: no gain at all
        assert abs(permuted[name] / ordered[name] - 1) < 1e-6
        assert not judge_stage1(ordered[name], ordered, permuted[name] / ordered[name] - 1)[1]["met"]
