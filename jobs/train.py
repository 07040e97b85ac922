"""Train one stage (stage1 transformer, stage2 + VAE, stage3 + VAE-GAN) on pre-encoded latents.

    python -m jobs.train --run-dir runs/demo --stage stage1
    torchrun --nproc_per_node 4 -m jobs.train --run-dir runs/demo --stage stage2

Reads run_dir/config.resolved.yaml, the encode step's latents and the pairs index; writes
run_dir/<stage>/: last.pt (every epoch), epoch_<n>.pt (every checkpoint_every), best.pt,
transfer_report.json, metrics.jsonl, gate.json, exit.json. A stage without last.pt starts
from the previous stage's best.pt (weights matched by name and shape); with last.pt it
resumes exactly where that checkpoint left off, mid-epoch included.

The global batch (stageN.batch_size) is split over the ranks; the validation loss is the
stage's total generator loss with the KL fully annealed (weight 1), so epochs compare on
one objective; it is summed over all ranks' shards before anyone looks at it.

Exit codes (also written to exit.json by rank 0):
    0   done (the validation gate passed)
    2   bad input (missing config, latents, pairs or previous stage's checkpoint)
    3   validation gate failed (gate.json says why)
    4   non-finite loss (error.pt holds the state before the bad step)
    75  preempted (SIGUSR2/SIGTERM): last.pt saved mid-epoch; requeue to resume
Under torchrun the agent reports any non-zero worker code as its own failure (exit 1), so
callers read exit.json for the reason.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_prep.latent_store import LatentStore
from jobs import checkpoint, distributed
from jobs.curriculum import adv_weight, gan_alpha, kl_weight, mix_noise
from jobs.discriminator import build_discriminator
from jobs.evaluate import rms_pairwise_distance, spread_sums
from jobs.gan_losses import d_loss, feature_matching, g_adv_loss, moment_matching, r1_penalty
from jobs.gate import evaluate_gate, read_history
from jobs.generator import build_generator
from jobs.losses import generator_losses, paired_total
from jobs.pair_data import GlobalBatchSampler, PairDataset, read_pairs
from jobs.telemetry import Telemetry
from jobs.transfer import transfer_weights
from pipeline import config as config_mod
from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.malloc import reuse_freed_memory
from pipeline.schema import Config, StageConfig
from pipeline.tracking import StepTracker, step_run

EXIT_OK, EXIT_BAD_INPUT, EXIT_GATE, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3, 4, 75
STAGES = ("stage1", "stage2", "stage3")
CODEC_KEYS = ("codec", "sample_rate", "frame_rate", "latent_dim", "frames", "dtype", "kind",
              "pretrained", "weights_sha256", "bandwidth", "use_codes")


class BadInput(Exception):
    """A missing or malformed input; exit 2 with the message."""


class NonFiniteLoss(Exception):
    """A loss term became NaN/inf; exit 4 after saving error.pt."""


class Preempted(Exception):
    """A stop signal arrived; exit 75 after saving last.pt."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues exactly."""
    epoch: int = 0                 # last completed epoch (epochs count from 1)
    batch_in_epoch: int = 0        # batches of epoch + 1 already done (mid-epoch checkpoint)
    step: int = 0                  # optimizer steps of the generator (or D in pre-training)
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0            # epochs without improvement (early stopping)
    val_history: list = field(default_factory=list)
    partial: dict = field(default_factory=dict)   # running train sums of the epoch in progress


class Running:
    """Sums of per-step (or per-sample) numbers; averaged over every rank at the end."""

    def __init__(self, state: Optional[dict] = None):
        state = state or {}
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.counts: dict[str, float] = dict(state.get("counts", {}))

    def add(self, values: dict[str, float], weight: float = 1.0) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
            self.counts[key] = self.counts.get(key, 0.0) + weight

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def means(self, info: distributed.DistInfo) -> dict[str, float]:
        total_s: dict[str, float] = {}
        total_c: dict[str, float] = {}
        for part in distributed.gather(self.state(), info):
            for key, value in part["sums"].items():
                total_s[key] = total_s.get(key, 0.0) + value
                total_c[key] = total_c.get(key, 0.0) + part["counts"][key]
        return {k: total_s[k] / total_c[k] for k in sorted(total_s) if total_c[k] > 0}


class RealFake(nn.Module):
    """D on a real and a fake batch in one forward (separate calls inside, for minibatch
    discrimination), so DDP sees one forward per backward."""

    def __init__(self, d: nn.Module):
        super().__init__()
        self.d = d

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.d(real), self.d(fake)


# ---------------------------------------------------------------------------------------
# setup: config, determinism, data, models
# ---------------------------------------------------------------------------------------

def load_config(run_dir: Path) -> Config:
    """The run's resolved config (written by the orchestrator)."""
    try:
        return config_mod.load_resolved(run_dir)
    except config_mod.ConfigError as exc:
        raise BadInput(str(exc)) from None


def set_determinism(scfg: StageConfig, seed: int) -> None:
    """Seeds, the anomaly-detection switch and the deterministic-algorithms switch."""
    torch.manual_seed(seed)
    torch.autograd.set_detect_anomaly(scfg.detect_anomaly)
    if scfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def open_data(cfg: Config, run_dir: Path, scfg: StageConfig, info: distributed.DistInfo):
    """Latent store, train/val datasets, and their batch samplers for this rank."""
    try:
        store = LatentStore(run_dir / "encode")
        train_pairs = read_pairs(run_dir / "pairs" / "train.jsonl")
        val_pairs = read_pairs(run_dir / "pairs" / "val.jsonl")
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise BadInput(str(exc)) from None
    if not train_pairs or not val_pairs:
        raise BadInput(f"{run_dir / 'pairs'}: need training and validation pairs, have "
                       f"{len(train_pairs)} and {len(val_pairs)}")
    train_set = PairDataset(store, train_pairs, scfg.augment_prob, cfg.run.seed)
    val_set = PairDataset(store, val_pairs, 0.0, cfg.run.seed)
    try:
        train_sampler = GlobalBatchSampler(len(train_set), scfg.batch_size, info.rank,
                                           info.world_size, cfg.run.seed)
        val_sampler = GlobalBatchSampler(len(val_set), scfg.batch_size, info.rank,
                                         info.world_size, cfg.run.seed, shuffle=False,
                                         drop_last=False)
    except ValueError as exc:
        raise BadInput(f"{exc} (stage batch_size over {info.world_size} ranks)") from None
    return store, train_set, val_set, train_sampler, val_sampler


def make_loader(dataset: PairDataset, sampler: GlobalBatchSampler, scfg: StageConfig,
                info: distributed.DistInfo) -> DataLoader:
    # Own generator: creating an iterator must not draw from the global RNG, or a resumed
    # run (which creates one more iterator) would drift from an uninterrupted one.
    g = torch.Generator()
    g.manual_seed(sampler.seed + info.rank)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=scfg.num_workers,
                      pin_memory=info.device.type == "cuda", generator=g)


def codec_description(store: LatentStore, cfg: Config) -> dict:
    manifest = store.manifest
    desc = {k: manifest[k] for k in CODEC_KEYS if k in manifest}
    desc.setdefault("codec", cfg.encode.codec)
    return desc


# ---------------------------------------------------------------------------------------
# the context of one stage run (models, optimizers, schedules)
# ---------------------------------------------------------------------------------------

@dataclass
class Context:
    cfg: Config
    run_dir: Path
    stage: str
    scfg: StageConfig
    info: distributed.DistInfo
    parts: list
    codec: dict
    g: nn.Module                    # the generator (unwrapped)
    g_train: nn.Module              # what the training step calls (DDP-wrapped if distributed)
    opt_g: torch.optim.Optimizer
    sched_g: Any
    d: Optional[nn.Module] = None
    d_train: Optional[nn.Module] = None
    opt_d: Optional[torch.optim.Optimizer] = None

    def autocast(self):
        cuda = self.info.device.type == "cuda"
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=cuda)

    def schedules(self, epoch: int) -> dict[str, float]:
        s = self.scfg
        return {"alpha": gan_alpha(epoch, s.curriculum),
                "kl_weight": kl_weight(epoch, s.kl) if s.kl is not None else 0.0,
                "adv_weight": adv_weight(epoch, s.gan) if s.gan is not None else 0.0}


def build_context(cfg: Config, run_dir: Path, stage: str, info: distributed.DistInfo,
                  codec: dict) -> Context:
    """Models (same init on every rank), DDP wrappers, optimizers and the warmup schedule."""
    scfg: StageConfig = getattr(cfg, stage)
    parts = list(scfg.enabled_parts)
    torch.manual_seed(cfg.run.seed)
    g = build_generator(cfg, parts).to(info.device)
    d = build_discriminator(cfg).to(info.device) if "gan" in parts else None
    g_train: nn.Module = g
    d_train = RealFake(d) if d is not None else None
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        g_train = DDP(g, device_ids=ids, find_unused_parameters=g.idle_parameters(scfg.mode))
        if d is not None:
            d_train = DDP(d_train, device_ids=ids)
    opt_g = torch.optim.AdamW(g.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
    warmup = scfg.warmup_steps
    sched_g = torch.optim.lr_scheduler.LambdaLR(
        opt_g, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
    opt_d = (torch.optim.AdamW(d.parameters(), lr=scfg.gan.lr_d, weight_decay=scfg.weight_decay)
             if d is not None else None)
    return Context(cfg, run_dir, stage, scfg, info, parts, codec, g, g_train, opt_g, sched_g,
                   d, d_train, opt_d)


# ---------------------------------------------------------------------------------------
# checkpoints: what goes in, how a stage starts (resume or transfer)
# ---------------------------------------------------------------------------------------

def checkpoint_state(ctx: Context, progress: Progress) -> dict:
    """Everything needed to continue exactly (every rank's RNG; collective: all ranks call)."""
    rngs = distributed.gather(checkpoint.rng_state(), ctx.info)
    epoch_next = progress.epoch + 1
    return {
        "generator": checkpoint.model_state(ctx.g),
        "discriminator": checkpoint.model_state(ctx.d) if ctx.d is not None else None,
        "opt_g": ctx.opt_g.state_dict(), "sched_g": ctx.sched_g.state_dict(),
        "opt_d": ctx.opt_d.state_dict() if ctx.opt_d is not None else None,
        "scaler": None,  # bf16 autocast needs no loss scaling
        "epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch,
        "step": progress.step, "best_val": progress.best_val, "best_epoch": progress.best_epoch,
        "bad_epochs": progress.bad_epochs, "val_history": list(progress.val_history),
        "partial": progress.partial,
        "curriculum": ctx.schedules(epoch_next),
        "rng": rngs, "world_size": ctx.info.world_size,
        "config": config_mod.to_dict(ctx.cfg), "codec": ctx.codec, "parts": ctx.parts,
        "stage": ctx.stage, "mode": ctx.scfg.mode,
    }


def resume(ctx: Context, state: dict) -> Progress:
    """Load last.pt: models, optimizers, scheduler, counters and this rank's RNG state."""
    ctx.g.load_state_dict(state["generator"])
    if ctx.d is not None:
        ctx.d.load_state_dict(state["discriminator"])
        ctx.opt_d.load_state_dict(state["opt_d"])
    ctx.opt_g.load_state_dict(state["opt_g"])
    ctx.sched_g.load_state_dict(state["sched_g"])
    rngs = state["rng"]
    if len(rngs) != ctx.info.world_size:
        warnings.warn(f"checkpoint written by {len(rngs)} ranks, resuming on "
                      f"{ctx.info.world_size}: the continuation is not bit-identical")
    checkpoint.set_rng_state(rngs[ctx.info.rank % len(rngs)])
    return Progress(epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                    step=state["step"], best_val=state["best_val"],
                    best_epoch=state["best_epoch"], bad_epochs=state["bad_epochs"],
                    val_history=list(state["val_history"]), partial=state["partial"])


def transfer_from_previous(ctx: Context) -> dict:
    """Start from the previous stage's best.pt (stage1 starts fresh); return the report."""
    index = STAGES.index(ctx.stage)
    if index == 0:
        return {"source": None, "note": "stage1 starts from freshly initialised weights"}
    source = ctx.run_dir / STAGES[index - 1] / "best.pt"
    gate = source.parent / "gate.json"
    if gate.exists() and not json.loads(gate.read_text()).get("passed", False):
        raise BadInput(f"{STAGES[index - 1]} did not pass its validation gate "
                       f"({json.loads(gate.read_text()).get('reason')}); not starting {ctx.stage}")
    if not source.exists():
        raise BadInput(f"{ctx.stage} starts from {source}, which does not exist "
                       f"(run {STAGES[index - 1]} first)")
    try:
        state = checkpoint.load(source)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    report = {"source": str(source), "source_epoch": state.get("epoch"),
              "generator": transfer_weights(ctx.g, state["generator"])}
    if ctx.d is not None:
        report["discriminator"] = transfer_weights(ctx.d, state.get("discriminator") or {})
    return report


# ---------------------------------------------------------------------------------------
# one training step
# ---------------------------------------------------------------------------------------

def check_finite(terms: dict[str, float], what: str, ctx: Context, epoch: int,
                 batch: int) -> None:
    """Stop every rank together if any rank saw a non-finite term; name it."""
    bad = next((f"{what} term '{k}' = {v}" for k, v in terms.items() if not math.isfinite(v)),
               "")
    if distributed.any_rank(bool(bad), ctx.info):
        found = [f"rank {r}: {b}" for r, b in enumerate(distributed.gather(bad, ctx.info)) if b]
        raise NonFiniteLoss(f"non-finite loss in {ctx.stage} at epoch {epoch}, batch {batch + 1}"
                            f" (generator step {ctx.sched_g.last_epoch + 1}): " + "; ".join(found))


def clip(model: nn.Module, max_norm: float) -> tuple[float, float]:
    """Clip gradients (grad_clip 0 = off); the norms before and after. The caller stops on
    a non-finite norm: clipping would turn it into a zero (or NaN) update in silence."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0, 0.0
    before = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    after = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(before), float(after)


def floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar loss terms as Python floats, with one device sync for all of them."""
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()
    return dict(zip(terms, values))


def generator_step(ctx: Context, inp: torch.Tensor, tgt: torch.Tensor, epoch: int,
                   batch: int) -> dict[str, float]:
    """Stages 1-2 (and stage 3's non-adversarial part): noisy views in, clean data in the loss."""
    s = ctx.schedules(epoch)
    stats = ctx.g.noise_stats(ctx.scfg.curriculum.noise)
    in_view, tgt_view = mix_noise(inp, s["alpha"], stats=stats), mix_noise(tgt, s["alpha"], stats=stats)
    with ctx.autocast():
        out = ctx.g_train(in_view, tgt_view, ctx.scfg.mode, ctx.scfg.anti_cheat_noise)
        terms = generator_losses(out, inp, tgt, ctx.scfg, ctx.codec["codec"], s["kl_weight"])
    values = floats(terms)
    check_finite(values, "generator", ctx, epoch, batch)
    ctx.opt_g.zero_grad(set_to_none=True)
    terms["total"].backward()
    before, after = clip(ctx.g, ctx.scfg.grad_clip)
    check_finite({"grad_norm_g": before}, "generator gradient", ctx, epoch, batch)
    ctx.opt_g.step()
    ctx.sched_g.step()
    return {f"train_{k}": v for k, v in values.items()} | {
        "grad_norm_g_before": before, "grad_norm_g_after": after}


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def gan_step(ctx: Context, inp: torch.Tensor, tgt: torch.Tensor, epoch: int,
             batch: int) -> dict[str, float]:
    """Stage 3: D step(s) on detached fakes, then (after D pre-training) the G step with D
    frozen: reconstruction terms + adv_weight * adversarial + feature matching."""
    gan, s = ctx.scfg.gan, ctx.schedules(epoch)
    pretrain = epoch <= gan.d_pretrain_epochs
    stats = ctx.g.noise_stats(ctx.scfg.curriculum.noise)
    in_view, tgt_view = mix_noise(inp, s["alpha"], stats=stats), mix_noise(tgt, s["alpha"], stats=stats)
    with ctx.autocast():
        if pretrain:  # G is not trained yet: no graph, and G's optimizer is never touched
            with torch.no_grad():
                out = ctx.g(in_view, tgt_view, ctx.scfg.mode, ctx.scfg.anti_cheat_noise)
        else:
            out = ctx.g_train(in_view, tgt_view, ctx.scfg.mode, ctx.scfg.anti_cheat_noise)
    fake = out["output"]
    metrics: dict[str, float] = {}
    for _ in range(max(1, gan.d_steps)):
        real = tgt.detach().requires_grad_(gan.r1_gamma > 0)
        with ctx.autocast():
            (real_logits, _), (fake_logits, _) = ctx.d_train(real, fake.detach())
            loss_d, stats = d_loss(real_logits, fake_logits, gan)
            if gan.r1_gamma > 0:
                r1 = r1_penalty(real_logits, real)
                loss_d = loss_d + 0.5 * gan.r1_gamma * r1
                stats["r1"] = float(r1.detach())
        check_finite({"d_loss": float(loss_d.detach())}, "discriminator", ctx, epoch, batch)
        ctx.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        before, after = clip(ctx.d, ctx.scfg.grad_clip)
        check_finite({"grad_norm_d": before}, "discriminator gradient", ctx, epoch, batch)
        ctx.opt_d.step()
    metrics.update({"train_d_loss": float(loss_d.detach()), "grad_norm_d_before": before,
                    "grad_norm_d_after": after, **{f"train_{k}": v for k, v in stats.items()}})
    if pretrain:
        return metrics
    set_requires_grad(ctx.d, False)
    try:
        with ctx.autocast():
            terms = generator_losses(out, inp, tgt, ctx.scfg, ctx.codec["codec"], s["kl_weight"])
            fake_logits, fake_feats = ctx.d(fake)
            with torch.no_grad():
                _, real_feats = ctx.d(tgt)
            terms["adv"] = g_adv_loss(fake_logits, gan)
            terms["feature_matching"] = feature_matching(real_feats, fake_feats,
                                                         gan.feature_matching_mode)
            moments = moment_matching(fake, tgt)
            terms["moment_matching"] = moments.pop("total")
            terms |= {f"moment_{k}": v.detach() for k, v in moments.items()}
            # recon_fade: at alpha 1 the input says nothing about the target, and a paired
            # loss is won by one average output; its weight follows 1 - alpha instead
            fade = s["alpha"] if gan.recon_fade else 0.0
            terms["g_loss"] = (terms["total"] - fade * paired_total(terms, ctx.scfg)
                               + s["adv_weight"] * terms["adv"]
                               + gan.feature_matching * terms["feature_matching"]
                               + gan.moment_matching * terms["moment_matching"])
        values = floats(terms)
        check_finite(values, "generator", ctx, epoch, batch)
        ctx.opt_g.zero_grad(set_to_none=True)
        terms["g_loss"].backward()
        before, after = clip(ctx.g, ctx.scfg.grad_clip)
        check_finite({"grad_norm_g": before}, "generator gradient", ctx, epoch, batch)
        ctx.opt_g.step()
        ctx.sched_g.step()
    finally:
        set_requires_grad(ctx.d, True)
    return metrics | {f"train_{k}": v for k, v in values.items()} | {
        "grad_norm_g_before": before, "grad_norm_g_after": after}


# ---------------------------------------------------------------------------------------
# validation and the trivial baselines
# ---------------------------------------------------------------------------------------

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
            out = ctx.g(inp, tgt, ctx.scfg.mode)
            terms = generator_losses(out, inp, tgt, ctx.scfg, ctx.codec["codec"], 1.0)
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
def latent_stats(train_set: PairDataset, info: distributed.DistInfo,
                 dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel statistics of the clean training targets over every rank's share, on the
    rank's device: the mean [dim], and square roots [dim, dim] of two covariances: of the
    chunks' time-means across chunks (how songs differ) and of the frames around their
    chunk's mean (how a song moves). Full matrices keep which bins move together."""
    sums = torch.zeros(2 * dim * dim + 2 * dim, dtype=torch.float64)
    chunks, frames = 0.0, 0.0
    clean = PairDataset(train_set.store, train_set.pairs)   # never augmented
    for i in range(info.rank, len(clean), info.world_size):
        _, tgt = clean[i]
        if not torch.isfinite(tgt).all():   # left out here; the loss stops training on it
            continue
        x = tgt.double()
        mean = x.mean(dim=1)
        centred = x - mean[:, None]
        sums += torch.cat([mean, torch.zeros(dim, dtype=torch.float64),
                           torch.outer(mean, mean).flatten(), (centred @ centred.T).flatten()])
        chunks, frames = chunks + 1, frames + x.shape[1]
    total = torch.tensor(distributed.all_reduce_sum(sums.tolist() + [chunks, frames], info),
                         dtype=torch.float64)
    n, m = max(float(total[-2]), 1.0), max(float(total[-1]), 1.0)
    mean = total[:dim] / n
    song_cov = total[2 * dim:2 * dim + dim * dim].view(dim, dim) / n - torch.outer(mean, mean)
    frame_cov = total[2 * dim + dim * dim:-2].view(dim, dim) / m
    return tuple(t.float().to(info.device) for t in (mean, psd_sqrt(song_cov), psd_sqrt(frame_cov)))


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a covariance matrix (negative round-off eigenvalues as 0)."""
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


@torch.no_grad()
def baselines(ctx: Context, train_set: PairDataset, val_loader: DataLoader) -> dict[str, float]:
    """Stage-1 yardsticks on the same val pairs and loss: output = the start chunk; the mean
    training latent (per channel, over time and pairs); and start_mean = the start chunk's
    time-averaged spectrum (per channel) repeated over the target's frames."""
    info = ctx.info
    mean = ctx.g.latent_mean   # set from the training targets by latent_stats
    running = Running()
    for inp, tgt in val_loader:
        inp, tgt = inp.to(info.device), tgt.to(info.device)
        flat = mean.view(1, -1, 1).expand_as(tgt)
        start_mean = inp.mean(dim=2, keepdim=True).expand_as(tgt)
        for name, output in (("repeat", inp), ("mean", flat), ("start_mean", start_mean)):
            terms = generator_losses({"output": output}, inp, tgt, ctx.scfg, ctx.codec["codec"],
                                     1.0)
            running.add({f"val_baseline_{name}": float(terms["total"])}, weight=len(inp))
    return running.means(info)


# ---------------------------------------------------------------------------------------
# outputs: metrics.jsonl, samples, exit.json
# ---------------------------------------------------------------------------------------

def rank_param_spread(ctx: Context) -> float:
    """Largest difference of any parameter tensor's sum between rank 0 and another rank:
    0.0 when DDP kept the replicas identical, as it must (logged every epoch)."""
    models = [ctx.g] + ([ctx.d] if ctx.d is not None else [])
    sums = [float(p.detach().double().sum()) for m in models for p in m.parameters()]
    every = distributed.gather(sums, ctx.info)
    return max((abs(a - b) for other in every[1:] for a, b in zip(every[0], other)),
               default=0.0)


def append_metrics(path: Path, epoch: int, metrics: dict) -> None:
    """Rewrite metrics.jsonl atomically with this epoch's line (dropping any line for this
    epoch or later left by a run that was killed after writing it)."""
    lines = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and json.loads(line).get("epoch", 0) < epoch:
                lines.append(line)
    lines.append(json.dumps({"epoch": epoch, **metrics}, sort_keys=True))
    atomic_write_text(path, "\n".join(lines) + "\n")


def sample_hook(cfg: Config, run_dir: Path, stage: str, epoch: int, generator: nn.Module,
                tracker: StepTracker) -> None:
    """Log a few samples made as this stage trains (jobs.generate.log_samples: noise, or the
    creative cascade on validation pairs); never fatal, the training RNG left as it was."""
    try:
        from jobs.generate import log_samples
    except ImportError as exc:
        print(f"[{stage}] samples skipped: {exc}", file=sys.stderr)
        return
    was_training = generator.training
    generator.eval()
    try:
        device = next(generator.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            log_samples(cfg, run_dir, generator, epoch, tracker, stage=stage)
    except Exception as exc:  # a sample failing must not end a long training run
        print(f"[{stage}] samples at epoch {epoch} failed: {exc!r}", file=sys.stderr)
    finally:
        generator.train(was_training)


def write_exit(out_dir: Path, code: int, reason: str, progress: Optional[Progress]) -> None:
    atomic_write_json(out_dir / "exit.json", {
        "exit_code": code, "reason": reason,
        "epoch": progress.epoch if progress else None,
        "batch_in_epoch": progress.batch_in_epoch if progress else None,
        "step": progress.step if progress else None})


# ---------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------

def run_stage(cfg: Config, run_dir: Path, stage: str, info: distributed.DistInfo,
              stop: distributed.StopSignal) -> int:
    """Train `stage` to the end (or a stop); returns the exit code."""
    scfg: StageConfig = getattr(cfg, stage)
    out_dir = run_dir / stage
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_mod.write_resolved(cfg, out_dir)

    # -- data ---------------------------------------------------------------------------
    reuse_freed_memory()   # batches and activations are allocated anew at every step
    store, train_set, val_set, train_sampler, val_sampler = open_data(cfg, run_dir, scfg, info)
    train_loader = make_loader(train_set, train_sampler, scfg, info)
    val_loader = make_loader(val_set, val_sampler, scfg, info)
    codec = codec_description(store, cfg)

    # -- models, optimizers; resume from last.pt or start from the previous stage -------
    set_determinism(scfg, cfg.run.seed)
    ctx = build_context(cfg, run_dir, stage, info, codec)
    last = out_dir / "last.pt"
    report = None
    if last.exists():
        try:
            state = checkpoint.load(last)
        except ValueError as exc:
            raise BadInput(f"{exc}; delete it to restart the stage") from None
        progress = resume(ctx, state)
    else:
        report = transfer_from_previous(ctx)
        ctx.g.set_latent_stats(*latent_stats(train_set, info, cfg.model.transformer.latent_dim))
        progress = Progress()
        torch.manual_seed(cfg.run.seed + 1 + info.rank)  # per-rank noise (curriculum, dropout)

    with step_run(cfg, run_dir, stage, info.rank) as tracker:
        if info.is_main:
            tracker.log_params({"stage": stage, "world_size": info.world_size,
                                "device": str(info.device), stage: config_mod.to_dict(scfg)})
            if report is not None:
                atomic_write_json(out_dir / "transfer_report.json", report)
                tracker.log_artifact(out_dir / "transfer_report.json")
                for model in ("generator", "discriminator"):
                    if model in report:
                        tracker.log_metrics({f"transfer_{model}_{k}": v for k, v in
                                             report[model]["counts"].items()}, step=0)
        base = {}
        if stage == "stage1" and scfg.mode == "continuation":
            base = baselines(ctx, train_set, val_loader)
            if info.is_main:
                atomic_write_json(out_dir / "baselines.json", base)
        elif stage == "stage1" and info.is_main:   # creative: the reference depends on masks
            print("[stage1] trivial baselines skipped: in creative mode the loss compares "
                  "against the masks' blend, which a baseline has no masks for", file=sys.stderr)
        try:
            code, reason = train_epochs(ctx, progress, train_set, train_loader, train_sampler,
                                        val_loader, tracker, base, stop)
        except NonFiniteLoss as exc:
            save_all(ctx, progress, [out_dir / "error.pt"])
            code, reason = EXIT_NONFINITE, str(exc)
        except Preempted as exc:
            code, reason = EXIT_PREEMPTED, str(exc)
        if code == EXIT_OK:
            result = distributed.gather(evaluate_gate(   # rank 0's reading decides for all
                scfg.gate, read_history(out_dir / "metrics.jsonl"), base,
                free_bits=scfg.kl.free_bits if scfg.kl is not None else None,
                d_pretrain_epochs=scfg.gan.d_pretrain_epochs if scfg.gan is not None else 0),
                info)[0]
            if info.is_main:
                atomic_write_json(out_dir / "gate.json", result)
                tracker.log_metrics({"gate_passed": float(result["passed"])},
                                    step=progress.epoch)
                tracker.log_artifact(out_dir / "gate.json")
            if not result["passed"]:
                code, reason = EXIT_GATE, f"{stage} validation gate failed: {result['reason']}"
            else:
                reason = f"{stage} done ({reason}); gate passed: {result['reason']}"
        if info.is_main:
            write_exit(out_dir, code, reason, progress)
            tracker.set_tags({"exit_code": code, "exit_reason": reason})
            print(f"[{stage}] {reason}", file=sys.stderr if code else sys.stdout)
    distributed.barrier(info)
    return code


def save_all(ctx: Context, progress: Progress, paths: list[Path]) -> None:
    """One checkpoint state, written by rank 0 to each path (all ranks join the gather)."""
    state = checkpoint_state(ctx, progress)
    if ctx.info.is_main:
        for path in paths:
            checkpoint.save(path, state)


def train_epochs(ctx: Context, progress: Progress, train_set: PairDataset,
                 train_loader: DataLoader, sampler: GlobalBatchSampler, val_loader: DataLoader,
                 tracker: StepTracker, base: dict, stop: distributed.StopSignal) -> tuple[int, str]:
    """The epoch loop; returns (EXIT_OK, reason) or raises Preempted / NonFiniteLoss."""
    scfg, info, out_dir = ctx.scfg, ctx.info, ctx.run_dir / ctx.stage
    step_fn = gan_step if ctx.d is not None else generator_step
    telemetry = Telemetry(info.device)
    ctx.g.train()
    if ctx.d is not None:
        ctx.d.train()
    patience = scfg.early_stop_patience
    if patience > 0 and progress.bad_epochs >= patience:   # rerun of a stage that stopped early
        return EXIT_OK, f"early stop after {progress.epoch} epochs"
    while progress.epoch < scfg.epochs:
        epoch = progress.epoch + 1
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, start_batch=progress.batch_in_epoch)
        running = Running(progress.partial)
        batches = sampler.batches_per_epoch()
        bar = tqdm(total=batches, initial=progress.batch_in_epoch, file=sys.stderr,
                   desc=f"{ctx.stage} epoch {epoch}/{scfg.epochs}", disable=not info.is_main,
                   leave=False)
        it = iter(train_loader)
        for batch in range(progress.batch_in_epoch, batches):
            with telemetry.waiting():
                inp, tgt = next(it)
            if distributed.any_rank(stop.set, info):   # a step boundary: all ranks agree
                progress.partial = running.state()
                save_all(ctx, progress, [out_dir / "last.pt"])
                raise Preempted(f"{ctx.stage} preempted ({stop.received or 'signal on another rank'})"
                                f" at epoch {epoch}, batch {batch + 1}/{batches}: last.pt saved")
            inp = inp.to(info.device, non_blocking=True)
            tgt = tgt.to(info.device, non_blocking=True)
            running.add(step_fn(ctx, inp, tgt, epoch, batch))
            progress.step += 1
            progress.batch_in_epoch = batch + 1
            telemetry.step(len(inp) * info.world_size)
            bar.update(1)
        bar.close()
        del it

        # -- end of epoch: validate, log, checkpoint, decide early stop ------------------
        metrics = running.means(info) | validate(ctx, val_loader, epoch)
        metrics |= telemetry.epoch_metrics()
        metrics |= ctx.schedules(epoch) | {"lr_g": ctx.opt_g.param_groups[0]["lr"]}
        if ctx.opt_d is not None:
            metrics["lr_d"] = ctx.opt_d.param_groups[0]["lr"]
        metrics |= base
        metrics["rank_param_max_diff"] = rank_param_spread(ctx)
        val = metrics["val_loss"]
        progress.val_history.append(val)
        improved = val < progress.best_val
        if improved:
            progress.best_val, progress.best_epoch, progress.bad_epochs = val, epoch, 0
        else:
            progress.bad_epochs += 1
        progress.epoch, progress.batch_in_epoch, progress.partial = epoch, 0, {}
        metrics |= {"best_val_loss": progress.best_val, "step": progress.step}
        if info.is_main:
            tracker.log_metrics(metrics, step=epoch)
            append_metrics(out_dir / "metrics.jsonl", epoch, metrics)
            train = (f"train {metrics['train_total']:.4f}" if "train_total" in metrics else
                     f"D pre-training, d_loss {metrics.get('train_d_loss', math.nan):.4f}")
            print(f"[{ctx.stage}] epoch {epoch}: {train} val {val:.4f} best "
                  f"{progress.best_val:.4f} (epoch {progress.best_epoch})", file=sys.stderr)
            if scfg.sample_every and epoch % scfg.sample_every == 0:
                sample_hook(ctx.cfg, ctx.run_dir, ctx.stage, epoch, ctx.g, tracker)
        paths = [out_dir / "last.pt"]
        if epoch % scfg.checkpoint_every == 0:
            paths.append(out_dir / f"epoch_{epoch}.pt")
        if improved:
            paths.append(out_dir / "best.pt")
        save_all(ctx, progress, paths)
        if not math.isfinite(val):
            raise NonFiniteLoss(f"non-finite validation loss in {ctx.stage} at epoch {epoch}")
        if distributed.any_rank(stop.set, info):
            raise Preempted(f"{ctx.stage} preempted ({stop.received or 'signal on another rank'})"
                            f" after epoch {epoch}: last.pt saved")
        stop_now = patience > 0 and progress.bad_epochs >= patience
        if distributed.from_main(stop_now, info):   # every rank leaves the loop together
            return EXIT_OK, f"early stop after {epoch} epochs"
    return EXIT_OK, "all epochs done"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the run folder")
    parser.add_argument("--stage", required=True, choices=STAGES)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    stop = distributed.StopSignal().install()
    info = distributed.setup()
    try:
        cfg = load_config(run_dir)
        return run_stage(cfg, run_dir, args.stage, info, stop)
    except BadInput as exc:
        print(f"[{args.stage}] bad input: {exc}", file=sys.stderr)
        if info.is_main and run_dir.exists():
            write_exit(run_dir / args.stage, EXIT_BAD_INPUT, str(exc), None)
        return EXIT_BAD_INPUT
    finally:
        distributed.teardown()
        stop.uninstall()


if __name__ == "__main__":
    sys.exit(main())
