"""Benchmark 7's bare loop (bench/train_overhead.py) does exactly the trainer's step: from
the same weights and batch, one bare step and one trainer step leave equal weights, so the
benchmark's ratio measures the trainer's overhead and nothing else."""
from __future__ import annotations

import pytest
import torch

from bench import train_overhead
from jobs import distributed, train
from jobs.train_step import gan_step, generator_step
from pipeline.config import load_resolved
from tests.fixtures.train_run import make_run


def contexts(run_dir, stage):
    """Two contexts built as the trainer builds them (same seed: same initial weights)."""
    cfg = load_resolved(run_dir)
    info = distributed.setup()
    store, train_set, *_ = train.open_data(cfg, run_dir, getattr(cfg, stage), info)
    codec = train.codec_description(store, cfg)
    a, b = (train.build_context(cfg, run_dir, stage, info, codec) for _ in range(2))
    for ctx in (a, b):
        ctx.g.train()
        if ctx.d is not None:
            ctx.d.train()
    pairs = [train_set[i] for i in range(cfg.stage1.batch_size)]
    return a, b, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    moved = 0.0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-6), name
        moved += float(pa.detach().abs().sum())
    assert moved > 0


@pytest.mark.parametrize("stage, epoch, objective", [("stage1", 1, "chunk"),
                                                     ("stage1", 1, "next_frame"),
                                                     ("stage3", 2, "chunk")])
def test_one_bare_step_equals_one_trainer_step(tmp_path, stage, epoch, objective):
    # stage 1 with either objective (the demo's is next_frame: teacher-forced in training);
    # stage 3 at epoch 2: past D pre-training, so the step is D's, then G's with D frozen;
    # the curriculum off, as in the benchmark
    run_dir = make_run(tmp_path, "stage3.curriculum.rate=0.0", f"stage1.objective={objective}",
                       "model.transformer.max_frames=256")   # next_frame: input + target
    trainer, bare, inp, tgt = contexts(run_dir, stage)
    before = [p.detach().clone() for p in trainer.g.parameters()]
    torch.manual_seed(5)   # the generator's anti-cheat noise draws from the global RNG
    (gan_step if stage == "stage3" else generator_step)(trainer, [(inp, tgt)], epoch, 0)
    torch.manual_seed(5)
    rate = train_overhead.bare_epoch(bare, inp, tgt, len(inp), epoch)
    assert rate > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.g.parameters()))
    assert_same(trainer.g, bare.g)
    if stage == "stage3":
        assert_same(trainer.d, bare.d)
        assert all(p.requires_grad for p in bare.d.parameters())    # D unfrozen after


def test_breakdown_splits_the_time_per_sample():
    text = train_overhead.breakdown({"pipe": 100.0, "bare": 125.0, "wait": 0.1})
    # 10 ms per sample against 8 ms bare: 1 ms of it waiting for data, 1 ms more in the step
    assert "per sample 10.00 ms vs bare 8.00 ms: data wait 1.00 ms" in text
    assert "step +1.00 ms" in text
