"""How a stage's training state is saved and how a stage starts: resume from its own
last.pt, continue another checkpoint with a new schedule (`continue_from`), or take the
previous stage's best weights; epoch-file retention, metrics.jsonl and exit.json."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from jobs import checkpoint, distributed
from jobs.ema import Ema
from jobs.latent_stats import latent_stats
from jobs.pair_data import PairDataset
from jobs.train_context import Context
from jobs.train_errors import BadInput
from jobs.transfer import transfer_weights
from pipeline import codec_facts
from pipeline import config as config_mod
from pipeline import run_folder as rf
from pipeline.atomic import atomic_write_json, atomic_write_text

STAGES = rf.STAGES


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues exactly."""
    epoch: int = 0                 # last completed epoch (epochs count from 1)
    batch_in_epoch: int = 0        # micro-batches of epoch + 1 already done (mid-epoch checkpoint)
    step: int = 0                  # optimizer steps of the generator (or D in pre-training)
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0            # epochs without improvement (early stopping)
    val_history: list = field(default_factory=list)
    partial: dict = field(default_factory=dict)   # running train sums of the epoch in progress

    @classmethod
    def from_dict(cls, state: dict) -> "Progress":
        """The progress stored in a checkpoint (its keys sit at the top level)."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def checkpoint_state(ctx: Context, progress: Progress) -> dict:
    """Everything needed to continue exactly (every rank's RNG; collective: all ranks call)."""
    rngs = distributed.gather(checkpoint.rng_state(), ctx.info)
    return {
        "generator": checkpoint.model_state(ctx.g),
        "generator_ema": ctx.ema.state_dict() if ctx.ema is not None else None,
        "discriminator": checkpoint.model_state(ctx.d) if ctx.d is not None else None,
        "opt_g": ctx.opt_g.state_dict(), "sched_g": ctx.sched_g.state_dict(),
        "opt_d": ctx.opt_d.state_dict() if ctx.opt_d is not None else None,
        "scaler": {"g": ctx.scaler_g.state_dict(),
                   "d": ctx.scaler_d.state_dict() if ctx.scaler_d is not None else None},
        **asdict(progress),
        "curriculum": ctx.schedules(progress.epoch + 1),
        "rng": rngs, "world_size": ctx.info.world_size, "nodes": distributed.node_list(),
        "config": config_mod.to_dict(ctx.cfg), "codec": ctx.codec, "parts": ctx.parts,
        "stage": ctx.stage, "mode": ctx.scfg.mode,
    }


def save_all(ctx: Context, progress: Progress, paths: list[Path]) -> None:
    """One checkpoint state, written by rank 0 to each path (all ranks join the gather)."""
    state = checkpoint_state(ctx, progress)
    if ctx.info.is_main:
        for path in paths:
            checkpoint.save(path, state)


def load_or_refuse(path: Path, hint: str = "") -> dict:
    """checkpoint.load, with a missing or damaged file turned into BadInput (exit 2)."""
    try:
        return checkpoint.load(path)
    except (ValueError, FileNotFoundError) as exc:
        raise BadInput(f"{exc}{hint}") from None


def start_ema(ctx: Context, state: Optional[dict]) -> None:
    """The weights' moving average (ema_decay > 0), from a checkpoint's or the current weights."""
    if ctx.scfg.ema_decay > 0:
        ctx.ema = Ema(ctx.g, ctx.scfg.ema_decay, state)


def resume(ctx: Context, state: dict) -> Progress:
    """Load a checkpoint: models, optimizers, scheduler, scalers, EMA, counters, this rank's RNG."""
    ctx.g.load_state_dict(state["generator"])
    if ctx.d is not None:
        ctx.d.load_state_dict(state["discriminator"])
        ctx.opt_d.load_state_dict(state["opt_d"])
    ctx.opt_g.load_state_dict(state["opt_g"])
    ctx.sched_g.load_state_dict(state["sched_g"])
    scalers = state.get("scaler") or {}
    if ctx.scaler_g.is_enabled() and scalers.get("g"):
        ctx.scaler_g.load_state_dict(scalers["g"])
    if ctx.scaler_d is not None and ctx.scaler_d.is_enabled() and scalers.get("d"):
        ctx.scaler_d.load_state_dict(scalers["d"])
    start_ema(ctx, state.get("generator_ema"))
    rngs = state["rng"]
    if len(rngs) != ctx.info.world_size:
        warnings.warn(f"checkpoint written by {len(rngs)} ranks, resuming on "
                      f"{ctx.info.world_size}: the continuation is not bit-identical")
    checkpoint.set_rng_state(rngs[ctx.info.rank % len(rngs)])
    return Progress.from_dict(state)


def transfer_from_previous(ctx: Context) -> dict:
    """Start from the previous stage's best.pt (stage1 starts fresh; a previous gate that
    failed stops this one unless it only warned, gate.on_fail "warn"); return the report."""
    index = STAGES.index(ctx.stage)
    if index == 0:
        return {"source": None, "note": "stage1 starts from freshly initialised weights"}
    source = rf.stage_file(ctx.run_dir, STAGES[index - 1], rf.BEST)
    gate = rf.read_gate(ctx.run_dir, STAGES[index - 1])
    if gate is not None and not gate.get("passed", False) and not gate.get("warned", False):
        raise BadInput(f"{STAGES[index - 1]} did not pass its validation gate "
                       f"({gate.get('reason')}); not starting {ctx.stage}")
    if not source.exists():
        raise BadInput(f"{ctx.stage} starts from {source}, which does not exist "
                       f"(run {STAGES[index - 1]} first)")
    state = load_or_refuse(source)
    fits(ctx, state, source)
    report = {"source": str(source), "source_epoch": state.get("epoch"),
              "generator": transfer_weights(ctx.g, state["generator"])}
    if ctx.d is not None:
        report["discriminator"] = transfer_weights(ctx.d, state.get("discriminator") or {})
    return report


def set_lr(opt: torch.optim.Optimizer, lr: float, sched=None) -> None:
    """Give every param group a new base lr; with the warmup schedule, the lr it gives at
    the step reached (so warmup and schedule stay consistent with the step count)."""
    factors = ([f(sched.last_epoch) for f in sched.lr_lambdas] if sched is not None
               else [1.0] * len(opt.param_groups))
    for group, factor in zip(opt.param_groups, factors):
        group["initial_lr"], group["lr"] = lr, lr * factor
    if sched is not None:
        sched.base_lrs = [lr] * len(opt.param_groups)
        sched._last_lr = [group["lr"] for group in opt.param_groups]


def fits(ctx: Context, state: dict, path: Path) -> None:
    """Refuse a checkpoint trained on other latents than this run's (the one codec rule)."""
    try:
        codec_facts.check(ctx.codec, state.get("codec"), str(path))
    except codec_facts.MismatchError as exc:
        raise BadInput(str(exc)) from None


def continue_stage(ctx: Context) -> tuple[Progress, dict]:
    """Start from `continue_from`'s full state with this config's epochs and lr; returns
    the progress and the record written to continued.json."""
    scfg, path = ctx.scfg, Path(ctx.scfg.continue_from)
    state = load_or_refuse(path, f" ({ctx.stage}.continue_from)")
    fits(ctx, state, path)
    if state.get("stage") != ctx.stage:
        raise BadInput(f"{ctx.stage}.continue_from {path} is a {state.get('stage')} checkpoint")
    try:
        progress = resume(ctx, state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise BadInput(f"{ctx.stage}.continue_from {path} does not fit this stage's models "
                       f"({str(exc).splitlines()[0]})") from None
    if progress.epoch >= scfg.epochs:
        raise BadInput(f"{ctx.stage}.continue_from {path} has done {progress.epoch} epochs; "
                       f"{ctx.stage}.epochs is {scfg.epochs}: raise it to continue")
    old = state["config"][ctx.stage]
    set_lr(ctx.opt_g, scfg.lr, ctx.sched_g)
    record = {"from": str(path.resolve()), "at_epoch": progress.epoch,
              "at_batch_in_epoch": progress.batch_in_epoch, "at_step": progress.step,
              "lr": [old["lr"], scfg.lr], "epochs": [old["epochs"], scfg.epochs],
              "warmup_steps": [old["warmup_steps"], scfg.warmup_steps],
              "bad_epochs_reset": progress.bad_epochs}
    if ctx.opt_d is not None:
        set_lr(ctx.opt_d, scfg.gan.lr_d)
        record["lr_d"] = [(old.get("gan") or {}).get("lr_d"), scfg.gan.lr_d]
    progress.bad_epochs = 0   # a new schedule: early stopping counts from here
    record["metrics_lines_copied"] = copy_history(path.parent / rf.METRICS,
                                                  rf.stage_file(ctx.run_dir, ctx.stage, rf.METRICS),
                                                  progress.epoch, ctx.info.is_main)
    return progress, record


def copy_history(source: Path, dest: Path, epochs: int, write: bool) -> int:
    """Copy the source's metrics.jsonl lines up to `epochs` (the gate reads the whole
    history); returns how many."""
    if not source.exists() or source.resolve() == dest.resolve():
        return 0
    lines = [line for line in source.read_text().splitlines()
             if line.strip() and json.loads(line).get("epoch", 0) <= epochs]
    if write and lines:
        atomic_write_text(dest, "\n".join(lines) + "\n")
    return len(lines)


def start(ctx: Context, train_set: PairDataset) -> tuple[Progress, Optional[dict], Optional[dict]]:
    """(progress, transfer report or None, continuation record or None): resume from the
    stage's last.pt, else continue `continue_from`, else transfer from the previous stage."""
    last = rf.stage_file(ctx.run_dir, ctx.stage, rf.LAST)
    if last.exists():
        return resume(ctx, load_or_refuse(last, "; delete it to restart the stage")), None, None
    if ctx.scfg.continue_from:
        progress, record = continue_stage(ctx)
        return progress, None, record
    report = transfer_from_previous(ctx)
    ctx.g.set_latent_stats(*latent_stats(train_set, ctx.info,
                                         ctx.cfg.model.transformer.latent_dim))
    start_ema(ctx, None)
    torch.manual_seed(ctx.cfg.run.seed + 1 + ctx.info.rank)  # per-rank noise (curriculum, dropout)
    return Progress(), report, None


def prune_epochs(out_dir: Path, keep_last: int, keep_discriminator: bool) -> list[Path]:
    """Keep the newest `keep_last` full epoch_<n>.pt (0 = all); older ones are deleted, or
    (stage 3) cut to epoch_<n>_d.pt with the discriminator the audit reads. Rank 0 only."""
    full = sorted((int(m.group(1)), p) for p in out_dir.glob(rf.EPOCH_GLOB)
                  if (m := rf.EPOCH_FILE.match(p.name)) and not m.group(2))
    old = full[:-keep_last] if keep_last > 0 else []
    for epoch, path in old:
        if keep_discriminator:
            state = checkpoint.load(path)
            checkpoint.save(rf.epoch_checkpoint(out_dir, epoch, discriminator_only=True), {
                k: state.get(k) for k in ("discriminator", "epoch", "world_size", "config",
                                          "codec", "parts", "stage", "mode")})
        path.unlink()
    return [p for _, p in old]


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


def write_exit(out_dir: Path, code: int, reason: str, progress: Optional[Progress]) -> None:
    """exit.json: the code, the reason and where training stood."""
    atomic_write_json(out_dir / rf.EXIT, {
        "exit_code": code, "reason": reason,
        "epoch": progress.epoch if progress else None,
        "batch_in_epoch": progress.batch_in_epoch if progress else None,
        "step": progress.step if progress else None})
