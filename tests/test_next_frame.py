"""Stage 1's causal next-frame objective (jobs/next_frame.py): the causal mask, teacher
forcing against free running, the key/value cache against the full causal pass, the order
probe on it, and the real EnCodec architecture's latents (random weights)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jobs import distributed, train
from jobs.generator import build_generator
from jobs.next_frame import FREE_RUNNING, TEACHER_FORCED, eval_mode, lag_frames, train_mode
from jobs.order_probe import probe_pairs
from jobs.pair_data import PairDataset, read_pairs
from data_prep.latent_store import LatentStore
from pipeline import config
from pipeline.atomic import atomic_save_npy
from tests.fixtures.train_run import make_run, read_json, run_stage

SMALL = ["model.transformer.d_model=32", "model.transformer.layers=2",
         "model.transformer.heads=2", "model.transformer.dropout=0.0",
         "model.transformer.max_frames=256", "stage1.objective=next_frame"]


def model(*overrides: str, lags: int = 2) -> torch.nn.Module:
    """A small next-frame generator in eval mode, seeded."""
    cfg = config.load("demo", "local", [*SMALL, f"stage1.next_frame.guide_lags={lags}",
                                        "stage1.next_frame.min_lag=5", *overrides])
    torch.manual_seed(0)
    return build_generator(cfg, ["transformer"]).eval()


def latents(batch: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 128, frames, generator=g) - 5.0


@pytest.mark.parametrize("lags", [0, 2])
def test_a_future_frame_never_changes_earlier_predictions(lags):
    g = model(lags=lags)
    inp, tgt = latents(2, 40, 1), latents(2, 30, 2)
    with torch.no_grad():
        before = g(inp, tgt, TEACHER_FORCED)["output"]
        changed = tgt.clone()
        changed[..., 12] += 3.0                       # target frame 12 changes
        after = g(inp, changed, TEACHER_FORCED)["output"]
    assert before.shape == tgt.shape
    # predictions of frames 0..12 see only frames before them: unchanged, bit for bit
    assert torch.equal(before[..., :13], after[..., :13])
    assert (before[..., 13:] - after[..., 13:]).abs().amax() > 1e-3   # later ones see it


def test_free_running_is_teacher_forcing_on_its_own_output():
    g = model()
    inp = latents(3, 40, 3)
    with torch.no_grad():
        free = g(inp, None, FREE_RUNNING)["output"]           # the input's length by default
        longer = g(inp, latents(3, 55, 4), FREE_RUNNING)["output"]   # the targets' length
        forced = g(inp, free, TEACHER_FORCED)["output"]
    assert free.shape == (3, 128, 40) and longer.shape == (3, 128, 55)
    # the targets' values are never read when free running: only their length
    assert torch.allclose(longer[..., :40], free, atol=1e-5)
    # fed its own continuation as the truth, the causal pass predicts that continuation: the
    # key/value cache computes what the masked full pass computes
    assert torch.allclose(forced, free, atol=1e-4)
    with pytest.raises(ValueError, match="targets"):
        g(inp, None, TEACHER_FORCED)


def test_key_value_cache_matches_the_causal_pass_frame_by_frame():
    core = model().core
    x = latents(2, 30, 5)
    with torch.no_grad():
        full = core.encode(x, causal=True)
        cache = core.cache(2, 30, x)
        parts = [core.extend(core.embed(x[..., :17]), cache)]
        parts += [core.extend(core.embed(x[..., t:t + 1], t), cache) for t in range(17, 30)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_guide_frames_are_the_inputs_frames_whole_periods_back():
    seq = torch.arange(30.0).view(1, 1, 30).expand(2, 3, 30)     # an input of 20, then 10 more
    periods = torch.tensor([4, 7])
    positions = torch.arange(10, 13)                  # predicting frames 11, 12, 13
    assert lag_frames(seq, positions, periods, 1, 20)[:, 0].tolist() == [[7, 8, 9], [4, 5, 6]]
    assert lag_frames(seq, positions, periods, 2, 20)[:, 0].tolist() == [[3, 4, 5], [0, 0, 0]]
    # past the input (frames 20..29): the input's last cycles at the same phase, as the
    # period baseline tiles them, never frames after the input
    later = torch.arange(19, 29)                      # predicting frames 20..29
    assert lag_frames(seq, later, periods, 1, 20)[0, 0].tolist() == [16, 17, 18, 19] * 2 + [16, 17]
    assert lag_frames(seq, later, periods, 2, 20)[0, 0].tolist() == [12, 13, 14, 15] * 2 + [12, 13]
    assert lag_frames(seq, later, periods, 1, 20)[1, 0].tolist() == [13, 14, 15, 16, 17, 18, 19, 13, 14, 15]


def test_untrained_guided_model_starts_from_the_period_continuation():
    """With the network's output zeroed, free running tiles the input's best period on."""
    g = model()
    torch.nn.init.zeros_(g.core.out_proj.weight)
    torch.nn.init.zeros_(g.core.out_proj.bias)
    cycle = latents(1, 9, 6)
    inp = cycle[..., torch.arange(45) % 9]            # period 9, five times
    with torch.no_grad():
        free = g(inp, None, FREE_RUNNING)["output"]
    assert torch.allclose(free, cycle[..., torch.arange(45, 90) % 9])


def test_modes_follow_the_stage_objective():
    cfg = config.load("demo", "local", SMALL)
    assert (train_mode(cfg.stage1), eval_mode(cfg.stage1)) == (TEACHER_FORCED, FREE_RUNNING)
    assert (train_mode(cfg.stage2), eval_mode(cfg.stage2)) == ("continuation", "continuation")
    with pytest.raises(ValueError, match="objective"):
        model("stage1.objective=frames")
    with pytest.raises(ValueError, match="enabled_parts"):
        model("stage2.objective=next_frame")        # stage 2 has the VAE
    creative = config.load("demo", "local", [*SMALL, "stage1.mode=creative"])
    assert train_mode(creative.stage1) == eval_mode(creative.stage1) == "creative"
    assert build_generator(creative, ["transformer"]).next_frame is None   # the cascade's own


def test_encodec_latents_random_weights():
    """The real EnCodec 24 kHz encoder with RANDOM weights (no download): its [B, 128, T]
    latents through both modes of the next-frame model."""
    pytest.importorskip("encodec")
    from data_prep.codec_encodec import EncodecCodec
    cfg = config.load("demo", "local", ["encode.codec=encodec", "encode.pretrained=false"])
    codec = EncodecCodec(cfg.encode, 24000, torch.device("cpu"), seed=0)
    t = torch.arange(24000) / 24000
    wave = torch.sin(2 * math.pi * 220 * t).view(1, 1, -1) * torch.ones(2, 1, 1)
    lat = codec.encode(wave)
    assert lat.shape == (2, 128, 75)                 # 1 s at 75 frames/s, 128 channels
    g = model()
    inp, tgt = lat[..., :40].clone(), lat[..., 40:].clone()
    with torch.no_grad():
        forced = g(inp, tgt, TEACHER_FORCED)["output"]
        free = g(inp, tgt, FREE_RUNNING)["output"]
    assert forced.shape == free.shape == tgt.shape == (2, 128, 35)
    assert torch.isfinite(forced).all() and torch.isfinite(free).all()


def test_order_probe_free_runs_from_the_permuted_input(tmp_path):
    """A next-frame run's probe: its ordered loss is the free-running val loss, and a model
    that copies the input's period scores worse from a permuted input."""
    run_dir = make_run(tmp_path, *SMALL[:-1], "stage1.objective=next_frame",
                       "stage1.next_frame.min_lag=5", songs=5, chunks=6, val_songs=3)
    shard = run_dir / "encode" / "shards" / "latents-00000.npy"
    rows = np.load(shard).shape[0]                      # 5 songs x 6 chunks of 75 frames
    cycles = latents(5, 9, 7).numpy()                   # each song repeats its own 9 frames
    frames = (np.arange(6)[:, None] * 75 + np.arange(75)) % 9
    atomic_save_npy(shard, np.concatenate([c[:, frames].transpose(1, 0, 2) for c in cycles])
                    .astype(np.float16)[:rows])
    cfg = train.load_config(run_dir)
    info = distributed.setup()
    ctx = train.build_context(cfg, run_dir, "stage1", info, {"codec": "mel"})
    torch.nn.init.zeros_(ctx.g.core.out_proj.weight)     # the period continuation exactly
    torch.nn.init.zeros_(ctx.g.core.out_proj.bias)
    ctx.g.eval()
    val = PairDataset(LatentStore(run_dir / "encode"), read_pairs(run_dir / "pairs" / "val.jsonl"))
    sums = probe_pairs(ctx, ctx.g, val, list(range(len(val))))
    n, ordered, permuted = int(sums[0]), sums[1], sums[2]
    assert n == 15
    inp = torch.stack([val[i][0] for i in range(len(val))])
    tgt = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        free = ctx.g(inp, tgt, FREE_RUNNING)["output"]
    # the probe's ordered loss is the free-running one (per pair, then averaged)
    from jobs.losses import generator_losses
    direct = [float(generator_losses({"output": free[i:i + 1]}, inp[i:i + 1], tgt[i:i + 1],
                                     ctx.scfg, "mel", 1.0)["total"]) for i in range(n)]
    assert ordered / n == pytest.approx(sum(direct) / n, rel=1e-5)
    assert ordered / n < 0.05                          # in order: the continuation, nearly
    assert permuted > 10 * ordered                     # a scrambled input loses its period


@pytest.mark.integration
def test_tiny_next_frame_stage1_logs_both_losses_and_feeds_stage2(tmp_path):
    run_dir = make_run(tmp_path, *SMALL[:-1], "stage1.objective=next_frame",
                       "stage1.next_frame.min_lag=5", "stage2.epochs=1")
    assert run_stage(run_dir, "stage1") == train.EXIT_OK
    rows = [__import__("json").loads(line) for line in
            (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["val_tf_loss"]) for r in rows)
    base = read_json(run_dir / "stage1" / "baselines.json")
    assert {"val_baseline_copy_last", "val_tf_baseline_copy_last",
            "val_tf_baseline_bar_ago"} <= set(base)
    assert math.isfinite(read_json(run_dir / "stage1" / "order_probe.json")["order_gain"])
    assert run_stage(run_dir, "stage2") == train.EXIT_OK   # weights carried by name and shape
    report = read_json(run_dir / "stage2" / "transfer_report.json")["generator"]
    assert "core.out_proj.weight" in report["loaded"]
    # stage 2's generator has no next-frame pieces: stage 1's guide and mix go unused
    assert {"next_frame.guide.weight", "next_frame.mix"} <= set(report["unused"])
    assert not any(n.startswith("next_frame.") for n in report["loaded"] + report["new"])


def test_learned_mix_starts_at_the_period_frame_and_gets_gradients():
    g = model("stage1.next_frame.mix=true", "stage1.next_frame.mix_gain=10.0")
    nf = g.next_frame
    assert torch.allclose(nf.mix * nf.mix_gain, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
                          .expand(3, 128, 1))
    g.train()
    inp, tgt = latents(2, 40, 8), latents(2, 30, 9)
    (g(inp, tgt, TEACHER_FORCED)["output"] - tgt).abs().mean().backward()
    assert nf.mix.grad is not None and nf.mix.grad.abs().sum() > 0
    assert g.next_frame.guide.weight.grad.abs().sum() > 0


def test_scheduled_sampling_feeds_the_models_own_predictions():
    """sampled 1: the pass the loss reads sees the first pass's predictions as its history."""
    g = model("stage1.next_frame.sampled=1.0")
    inp, tgt = latents(2, 40, 10), latents(2, 30, 11)
    with torch.no_grad():
        guess = g.next_frame.one_pass(g.core, inp, tgt)
        want = g.next_frame.one_pass(g.core, inp, guess)
        assert torch.allclose(g(inp, tgt, TEACHER_FORCED)["output"], guess)   # eval: forced
        g.train()
        assert torch.allclose(g(inp, tgt, TEACHER_FORCED)["output"], want, atol=1e-6)


def test_next_frame_stage1_stopped_mid_epoch_resumes_bit_for_bit(tmp_path, store):
    """Teacher forcing with scheduled sampling (global RNG) stopped after 5 of 8 steps of
    epoch 1 and resumed from last.pt ends with the uninterrupted run's weights exactly."""
    from tests.test_resume_exact import StopAfter, assert_same_weights, run_in_process
    from tests.fixtures.train_run import load_ckpt
    runs = []
    for name in ("ref", "cut"):
        runs.append(make_run(tmp_path / name, f"mlflow.tracking_uri={store}", *SMALL[:-1],
                             "stage1.objective=next_frame", "stage1.next_frame.min_lag=5",
                             "stage1.next_frame.sampled=0.5", "stage1.batch_size=2",
                             "stage1.epochs=2", "model.transformer.layers=1"))
    ref, cut = runs
    assert run_in_process(ref, "stage1") == 0
    assert run_in_process(cut, "stage1", StopAfter(5)) == train.EXIT_PREEMPTED
    assert run_in_process(cut, "stage1") == 0
    a, b = load_ckpt(ref / "stage1" / "last.pt"), load_ckpt(cut / "stage1" / "last.pt")
    assert_same_weights(a, b)
    assert a["val_history"] == b["val_history"]
