"""What one stage trains with: models (DDP-wrapped when distributed), optimizers, the warmup
schedule, the weights' moving average, mixed precision and its loss scalers."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jobs import distributed
from jobs.curriculum import adv_weight, gan_alpha, kl_weight
from jobs.discriminator import build_discriminator
from jobs.ema import Ema
from jobs.generator import build_generator
from jobs.train_errors import BadInput
from pipeline.schema import Config, StageConfig

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class RealFake(nn.Module):
    """D on a real and a fake batch in one forward (separate calls inside, for minibatch
    discrimination), so DDP sees one forward per backward."""

    def __init__(self, d: nn.Module):
        super().__init__()
        self.d = d

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        """(logits, features) of D on the reals and on the fakes."""
        return self.d(real), self.d(fake)


@dataclass
class Context:
    """Everything one stage's training loop and steps work with."""
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
    scaler_g: torch.amp.GradScaler  # enabled only for precision fp16
    d: Optional[nn.Module] = None
    d_train: Optional[nn.Module] = None
    opt_d: Optional[torch.optim.Optimizer] = None
    scaler_d: Optional[torch.amp.GradScaler] = None
    ema: Optional[Ema] = None       # set once the starting weights are in place (ema_decay > 0)

    def autocast(self):
        """bf16/fp16 autocast on CUDA; on the CPU (and for fp32) plain fp32."""
        dtype = PRECISIONS[self.scfg.precision]
        cuda = self.info.device.type == "cuda"
        return torch.autocast(self.info.device.type, dtype=dtype or torch.bfloat16,
                              enabled=cuda and dtype is not None)

    def schedules(self, epoch: int) -> dict[str, float]:
        """Curriculum alpha, KL weight and adversarial weight of an epoch."""
        s = self.scfg
        return {"alpha": gan_alpha(epoch, s.curriculum),
                "kl_weight": kl_weight(epoch, s.kl) if s.kl is not None else 0.0,
                "adv_weight": adv_weight(epoch, s.gan) if s.gan is not None else 0.0}


def check_precision(scfg: StageConfig, device: torch.device) -> None:
    """Refuse a precision this device cannot run (fp16 needs CUDA for its loss scaling)."""
    if scfg.precision not in PRECISIONS:
        raise BadInput(f"precision {scfg.precision!r} is not one of {sorted(PRECISIONS)}")
    if scfg.precision == "fp16" and device.type != "cuda":
        raise BadInput("precision fp16 needs CUDA (autocast fp16 with a GradScaler); this "
                       "process runs on the CPU: use precision bf16 or fp32")


def no_sync(model: Optional[nn.Module], skip: bool):
    """DDP's no_sync() while `skip` (gradient accumulation's non-final micro-steps)."""
    if skip and isinstance(model, DDP):
        return model.no_sync()
    return contextlib.nullcontext()


def wrap_ddp(model: nn.Module, info: distributed.DistInfo, fixed_buckets: bool,
             idle: bool = False) -> DDP:
    """DDP around `model`; `fixed_buckets` (stageN.deterministic) keeps one gradient-bucket
    layout for the whole job, so that a resumed job reduces exactly as an uninterrupted one."""
    # DDP buckets the gradients in parameter order for its first synced step, then rebuilds
    # the buckets once in the order the gradients became ready. A gradient's place in its
    # bucket decides in which order the all-reduce adds the ranks' values (gloo's ring, and
    # NCCL's rings alike), and with more than two ranks a float sum depends on that order. A
    # resumed job's new DDP spends its first step on the first layout, which the uninterrupted
    # job left behind long ago: 4 ranks ended 1.8e-4 apart after 4 stage-3 epochs (2 ranks:
    # equal; static_graph=True rebuilds as well: still apart). find_unused_parameters=True is
    # DDP's public way to never rebuild (it keeps its first layout: buckets in reverse parameter
    # order, 1 MB then 25 MB): both jobs then agree bit for bit. It costs a walk of the
    # autograd graph per forward, a small all-reduce of "used" flags per step (0.6-0.9 ms per
    # step on the 17M-parameter generator, CPU) and a one-time warning that no parameter was
    # unused; hence only under `deterministic`, which already trades speed for exactness (GPU
    # runs without it are not bit-exact anyway).
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=fixed_buckets or idle)


def build_context(cfg: Config, run_dir: Path, stage: str, info: distributed.DistInfo,
                  codec: dict) -> Context:
    """Models (same init on every rank), DDP wrappers, optimizers and the warmup schedule."""
    scfg: StageConfig = getattr(cfg, stage)
    check_precision(scfg, info.device)
    parts = list(scfg.enabled_parts)
    torch.manual_seed(cfg.run.seed)
    g = build_generator(cfg, parts).to(info.device)
    d = build_discriminator(cfg).to(info.device) if "gan" in parts else None
    g_train: nn.Module = g
    d_train = RealFake(d) if d is not None else None
    if info.distributed:
        g_train = wrap_ddp(g, info, scfg.deterministic, idle=g.idle_parameters(scfg.mode))
        if d is not None:
            d_train = wrap_ddp(d_train, info, scfg.deterministic)
    opt_g = torch.optim.AdamW(g.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
    warmup = scfg.warmup_steps
    sched_g = torch.optim.lr_scheduler.LambdaLR(
        opt_g, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
    opt_d = (torch.optim.AdamW(d.parameters(), lr=scfg.gan.lr_d, weight_decay=scfg.weight_decay)
             if d is not None else None)
    fp16 = scfg.precision == "fp16"
    scaler_g = torch.amp.GradScaler(info.device.type, enabled=fp16)
    scaler_d = torch.amp.GradScaler(info.device.type, enabled=fp16) if d is not None else None
    return Context(cfg, run_dir, stage, scfg, info, parts, codec, g, g_train, opt_g, sched_g,
                   scaler_g, d, d_train, opt_d, scaler_d)


def rank_param_spread(ctx: Context) -> float:
    """Largest difference of any parameter tensor's sum between rank 0 and another rank:
    0.0 when DDP kept the replicas identical, as it must (logged every epoch)."""
    models = [ctx.g] + ([ctx.d] if ctx.d is not None else [])
    sums = [float(p.detach().double().sum()) for m in models for p in m.parameters()]
    every = distributed.gather(sums, ctx.info)
    return max((abs(a - b) for other in every[1:] for a, b in zip(every[0], other)),
               default=0.0)
