"""Validation of a stage: the mean loss terms over every rank's share of the val pairs,
stage 3's diversity from pure noise, and stage 1's trivial baselines on the same pairs.

Under stage 1's next_frame objective "val_loss" is the free-running continuation's (the
whole target from the input alone, comparable with the baselines) and "val_tf_loss" the
teacher-forced one (each frame from the true frames before it)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

from jobs import distributed
from jobs.curriculum import mix_noise
from jobs.evaluate import rms_pairwise_distance, spread_sums
from jobs.losses import generator_losses
from jobs.next_frame import TEACHER_FORCED, eval_mode, is_next_frame
from jobs.pair_data import PairDataset
from jobs.running_mean import Running
from jobs.train_context import Context
from jobs.train_step import floats
from jobs.trivial_predictors import (best_period, copy_last_continuation, lagged_frames,
                                     last_bar_continuation, period_continuation, period_range)


@torch.no_grad()
def noise_fakes(ctx: Context, inp: torch.Tensor, tgt: torch.Tensor, noise: torch.Generator,
                stats: Optional[tuple]) -> torch.Tensor:
    """G's outputs from the curriculum's view at alpha 1 with drawn VAE latents, as
    generation makes them; the VAE's draws come from `noise` too (training RNG untouched)."""
    devices = [ctx.info.device] if ctx.info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=noise, device=noise.device)))
        return ctx.g(mix_noise(inp, 1.0, noise, stats), mix_noise(tgt, 1.0, noise, stats),
                     ctx.scfg.mode, sample=True)["output"]


@torch.no_grad()
def validate(ctx: Context, loader: DataLoader, epoch: int) -> dict[str, float]:
    """Mean val terms over ALL ranks' shards; "val_loss" has the KL fully annealed. Stage 3
    adds val_diversity_ratio: the spread of G's outputs from pure noise (the curriculum's
    view at alpha 1) over that of the real targets, over the whole val set (all ranks)."""
    ctx.g.eval()
    running = Running()
    s = ctx.schedules(epoch)
    spread, noise, stats = None, None, None
    if ctx.d is not None:   # [count, per-element sum, sum of squares] of fakes and reals
        size = loader.dataset[0][1].numel()
        spread = {k: [0.0, torch.zeros(size, dtype=torch.float64, device=ctx.info.device), 0.0]
                  for k in ("fake", "real")}
        noise = torch.Generator(device=ctx.info.device)   # own stream: training RNG untouched
        noise.manual_seed(hash((ctx.cfg.run.seed, epoch, ctx.info.rank)))   # same in every process
        stats = ctx.g.noise_stats(ctx.scfg.curriculum.noise)   # the curriculum's kind of noise
    for inp, tgt in loader:
        inp = inp.to(ctx.info.device, non_blocking=True)
        tgt = tgt.to(ctx.info.device, non_blocking=True)
        with ctx.autocast():
            out = ctx.g(inp, tgt, eval_mode(ctx.scfg))
            terms = generator_losses(out, inp, tgt, ctx.scfg, ctx.codec["codec"], 1.0)
            if is_next_frame(ctx.scfg):
                forced = ctx.g(inp, tgt, TEACHER_FORCED)
                terms["tf_loss"] = generator_losses(forced, inp, tgt, ctx.scfg,
                                                    ctx.codec["codec"], 1.0)["total"]
        values = floats(terms)
        values["loss"] = values.pop("total")
        if "kl" in values:   # the loss as trained this epoch (KL weight still annealing)
            values["loss_annealed"] = (values["loss"] - (1.0 - s["kl_weight"])
                                       * ctx.scfg.kl.beta * values["kl"])
        running.add(values, weight=len(inp))
        if spread is not None:
            with ctx.autocast():
                fake = noise_fakes(ctx, inp, tgt, noise, stats)
            for key, x in (("fake", fake), ("real", tgt)):
                spread[key] = [a + b for a, b in zip(spread[key], spread_sums(x))]
    ctx.g.train()
    metrics = {f"val_{k}": v for k, v in running.means(ctx.info).items()}
    if spread is not None:
        sums = distributed.all_reduce_sum(
            [spread[k][i] for k in spread for i in (0, 2)]
            + spread["fake"][1].tolist() + spread["real"][1].tolist(), ctx.info)
        (n_fake, sq_fake, n_real, sq_real), vectors = sums[:4], torch.tensor(sums[4:])
        total_fake, total_real = vectors.chunk(2)
        if n_real >= 2:
            real = rms_pairwise_distance(n_real, total_real, sq_real)
            if real > 0:
                metrics["val_diversity_ratio"] = (
                    rms_pairwise_distance(n_fake, total_fake, sq_fake) / real)
    return metrics


@torch.no_grad()
def baselines(ctx: Context, train_set: PairDataset, val_loader: DataLoader) -> dict[str, float]:
    """Stage-1 yardsticks on the same val pairs and loss: output = the start chunk; the mean
    training latent (per channel, over time and pairs); start_mean = the start chunk's
    time-averaged spectrum (per channel) repeated over the target's frames; and, with the
    stage's `baselines` settings, period = the start chunk continued with its own best
    autocorrelation period (min_period_s .. half the chunk), last_bar = its last bar_s
    seconds repeated, copy_last = its last frame held (jobs/trivial_predictors.py).

    Under the next_frame objective, the teacher-forced loss's yardsticks too, named
    val_tf_baseline_* (never the gate's: it judges the free-running val loss): each target
    frame predicted by the true frame 1 frame (copy_last), a bar (bar_ago) or the input's
    best period (period) before it."""
    info = ctx.info
    mean = ctx.g.latent_mean   # set from the training targets by latent_stats
    settings, rate = ctx.scfg.baselines, float(ctx.codec["frame_rate"])
    running = Running()
    for inp, tgt in val_loader:
        inp, tgt = inp.to(info.device), tgt.to(info.device)
        frames = tgt.shape[-1]
        outputs = {"repeat": inp, "mean": mean.view(1, -1, 1).expand_as(tgt),
                   "start_mean": inp.mean(dim=2, keepdim=True).expand_as(tgt),
                   "copy_last": copy_last_continuation(inp, frames)}
        forced = {}
        if settings is not None:
            lo, hi = period_range(inp.shape[-1], rate, settings.min_period_s)
            bar = min(inp.shape[-1], max(1, round(settings.bar_s * rate)))
            outputs["period"] = period_continuation(inp, lo, hi, frames)
            outputs["last_bar"] = last_bar_continuation(inp, bar, frames)
            if is_next_frame(ctx.scfg):
                forced = {"copy_last": lagged_frames(inp, tgt, 1),
                          "bar_ago": lagged_frames(inp, tgt, bar),
                          "period": lagged_frames(inp, tgt, best_period(inp, lo, hi))}
        for prefix, group in (("val_baseline", outputs), ("val_tf_baseline", forced)):
            for name, output in group.items():
                terms = generator_losses({"output": output}, inp, tgt, ctx.scfg,
                                         ctx.codec["codec"], 1.0)
                running.add({f"{prefix}_{name}": float(terms["total"])}, weight=len(inp))
    return running.means(info)
