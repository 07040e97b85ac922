"""The GPU check's training runs: stages 1-3 through the pipeline's trainer
(jobs.train.run_stage) at one size and precision, what its telemetry measured, and a
resume from the mid-run checkpoint compared with the uninterrupted run.

Every figure comes from the trainer's own metrics.jsonl (jobs/telemetry.py): samples/s
and data-wait share of the training loop, peak memory (torch.cuda.max_memory_allocated on
a GPU, peak RSS on the CPU), the losses of every epoch.
"""
from __future__ import annotations

import gc
import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.gpu_data import Size, link_data

STAGES = ("stage1", "stage2", "stage3")
# Resumed and uninterrupted runs must end this close, as a share of how far the weights
# moved after the checkpoint. The CPU's kernels are deterministic: equal to rounding. CUDA's
# default kernels are not (atomics in backward), so a little drift is allowed there; a lost
# optimizer, scheduler or RNG state moves the weights by a large share of a whole epoch.
RESUME_TOLERANCE = {"cpu": 1e-6, "cuda": 0.05}


@dataclass
class StageResult:
    """One stage run at one size and precision, as the check reports it."""
    size: str
    stage: str
    precision: str
    status: str                       # ok | FAILED | refused | not run
    exit_code: int | None = None
    reason: str = ""
    epochs: int = 0
    steps: int = 0
    samples_per_s: float | None = None   # the last epoch's (warm) training loop
    data_wait_share: float | None = None  # pooled over the epochs after the first
    peak_mem_mb: float | None = None      # the largest epoch's
    peak_reserved_mb: float | None = None  # CUDA only: allocated plus the allocator's cache
    losses_finite: bool | None = None
    last_losses: dict = field(default_factory=dict)
    wall_s: float = 0.0
    resume: dict = field(default_factory=dict)


def stage_overrides(size: Size, precision: str, mlflow_uri: str,
                    deterministic: bool = False) -> list[str]:
    """Settings of the check's stage runs: the size's batch and epochs, every epoch saved
    and kept (the resume check starts from epoch_1.pt), gates that only warn and ask little
    (a few dozen steps prove nothing about learning), no samples while training."""
    out = [f"mlflow.tracking_uri={mlflow_uri}", "mlflow.system_metrics=false",
           "cluster.allow_cpu_fallback=true", "stage3.gan.d_pretrain_epochs=1"]
    for s in STAGES:
        out += [f"{s}.epochs={size.epochs}", f"{s}.batch_size={size.batch_size}",
                f"{s}.precision={precision}", f"{s}.checkpoint_every=1", f"{s}.keep_last=0",
                f"{s}.sample_every=0", f"{s}.early_stop_patience=0",
                f"{s}.deterministic={str(deterministic).lower()}",
                f"{s}.gate.on_fail=warn", f"{s}.gate.min_improvement=-100.0",
                f"{s}.gate.beat_baselines=false",
                f"{s}.gate.kl_floor_tolerance=null", f"{s}.gate.min_d_loss=null",
                f"{s}.gate.min_diversity_ratio=null"]
    return out


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(result: StageResult, epochs: list[dict]) -> None:
    """Fill the result's figures from the stage's metrics.jsonl lines."""
    if not epochs:
        return
    warm = epochs[1:] or epochs
    last = epochs[-1]
    result.epochs, result.steps = int(last["epoch"]), int(last.get("step", 0))
    result.samples_per_s = last.get("samples_per_s")
    times = [1.0 / e["samples_per_s"] for e in warm if e.get("samples_per_s")]
    waits = [e.get("data_wait_share", 0.0) for e in warm if e.get("samples_per_s")]
    if times:   # pooled: each epoch weighted by its time per sample
        result.data_wait_share = sum(t * w for t, w in zip(times, waits)) / sum(times)
    result.peak_mem_mb = max(e.get("peak_mem_mb", 0.0) for e in epochs)
    if any("cuda_peak_reserved_mb" in e for e in epochs):
        result.peak_reserved_mb = max(e.get("cuda_peak_reserved_mb", 0.0) for e in epochs)
    losses = {k: v for e in epochs for k, v in e.items()
              if k.startswith(("train_", "val_")) and isinstance(v, (int, float))}
    result.losses_finite = all(math.isfinite(v) for e in epochs for k, v in e.items()
                               if k.startswith(("train_", "val_"))
                               and isinstance(v, (int, float)))
    result.last_losses = {k: last[k] for k in ("train_total", "train_g_loss", "train_d_loss",
                                               "val_loss") if k in last}
    if not losses:
        result.losses_finite = None


CRASHED = -1   # the stage raised (a bug the check reports; the other checks go on)


def train_stage(cfg, run_dir: Path, stage: str) -> tuple[int, str, float]:
    """Run one stage in this process as `python -m jobs.train` would: (exit code, reason,
    seconds). Bad input (e.g. fp16 without CUDA) is exit 2 with its message; an exception
    is CRASHED with its type, message and the line that raised it."""
    import torch

    from jobs import distributed, train
    from jobs.train_errors import BadInput
    from pipeline.exit_codes import EXIT_BAD_INPUT

    start = time.perf_counter()
    try:
        code = train.run_stage(cfg, run_dir, stage, distributed.setup(), distributed.StopSignal())
        exit_file = run_dir / stage / "exit.json"
        reason = json.loads(exit_file.read_text()).get("reason", "") if exit_file.exists() else ""
    except BadInput as exc:
        code, reason = EXIT_BAD_INPUT, str(exc)
    except Exception as exc:   # e.g. a dtype or device error on the GPU path
        where = traceback.extract_tb(exc.__traceback__)[-1]
        code = CRASHED
        reason = (f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})")
    finally:
        torch.use_deterministic_algorithms(False)   # a deterministic stage sets it for the process
        if torch.cuda.is_available():   # the next run's peak memory starts from an empty cache
            gc.collect()
            torch.cuda.empty_cache()
    return code, reason, time.perf_counter() - start


def weight_distance(a: dict, b: dict) -> float:
    """L2 distance between the float tensors two checkpoints hold for G and D."""
    total = 0.0
    for model in ("generator", "discriminator"):
        sa, sb = a.get(model) or {}, b.get(model) or {}
        for key, ta in sa.items():
            if ta.is_floating_point():
                total += float((ta.double() - sb[key].double()).pow(2).sum())
    return math.sqrt(total)


def resume_check(cfg, run_dir: Path, stage: str, device: str) -> dict:
    """Restart `stage` from its epoch_1.pt in a twin run folder, train to the end, and
    compare the final weights with the uninterrupted run's last.pt."""
    from jobs import checkpoint
    from pipeline.config import write_resolved

    mid = run_dir / stage / "epoch_1.pt"
    if not mid.exists():
        return {"status": "not run", "reason": f"{mid.name} missing"}
    twin = run_dir.with_name(run_dir.name + "-resume")
    shutil.rmtree(twin, ignore_errors=True)
    link_data(run_dir, twin)
    write_resolved(cfg, twin)
    (twin / stage).mkdir(parents=True)
    shutil.copyfile(mid, twin / stage / "last.pt")
    lines = [json.dumps(e) for e in read_metrics(run_dir / stage) if e["epoch"] <= 1]
    (twin / stage / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    code, reason, seconds = train_stage(cfg, twin, stage)
    if code not in (0, 3):
        return {"status": "FAILED", "reason": f"exit {code}: {reason}", "wall_s": seconds}
    ref, res = checkpoint.load(run_dir / stage / "last.pt"), checkpoint.load(twin / stage / "last.pt")
    moved = weight_distance(ref, checkpoint.load(mid))
    apart = weight_distance(ref, res)
    share = apart / moved if moved > 0 else (0.0 if apart == 0 else math.inf)
    tolerance = RESUME_TOLERANCE[device]
    ok = ref["epoch"] == res["epoch"] and ref["step"] == res["step"] and share <= tolerance
    shutil.rmtree(twin, ignore_errors=True)
    return {"status": "ok" if ok else "FAILED", "apart": apart, "moved": moved,
            "share": share, "tolerance": tolerance, "epochs": [ref["epoch"], res["epoch"]],
            "wall_s": seconds,
            "reason": "" if ok else (f"resumed run ends {share:.3g} of the post-checkpoint "
                                     f"movement away (tolerance {tolerance:g})")}


def make_run(size: Size, precision: str, data_dir: Path, root: Path, mlflow_uri: str,
             name: str, deterministic: bool = False, batch_size: int | None = None):
    """A run folder linked to the size's prepared data, with the check's resolved config;
    returns (cfg, run_dir)."""
    from pipeline import config
    from pipeline.config import write_resolved

    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    link_data(data_dir, run_dir)
    batch = [f"{s}.batch_size={batch_size}" for s in STAGES] if batch_size else []
    cfg = config.load(size.experiment, "local", [
        *size.overrides, *data_overrides_for(data_dir),
        *stage_overrides(size, precision, mlflow_uri, deterministic), *batch,
        f"run.root={root}", f"run.name={name}"])
    write_resolved(cfg, run_dir)
    return cfg, run_dir


def run_chain(size: Size, precision: str, data_dir: Path, root: Path, mlflow_uri: str,
              device: str, resume: bool = True, stages: tuple = STAGES,
              deterministic: bool = False, name: str = "",
              time_left: Callable[[], float] = lambda: math.inf) -> tuple[list[StageResult], Path]:
    """Stages in order at one size and precision, each started from the previous one's
    best.pt as in the pipeline; a failed stage leaves the later ones not run, and so does
    a spent time budget (`time_left` <= 0 before a stage or a resume check starts)."""
    cfg, run_dir = make_run(size, precision, data_dir, root, mlflow_uri,
                            name or f"{size.name}-{precision}", deterministic)
    results: list[StageResult] = []
    failed = ""
    for stage in stages:
        result = StageResult(size.name, stage, precision, "not run")
        results.append(result)
        if failed:
            result.reason = f"{failed} did not finish"
            continue
        if time_left() <= 0:
            result.reason, failed = "time budget spent", "the time budget"
            continue
        code, reason, seconds = train_stage(cfg, run_dir, stage)
        result.exit_code, result.reason, result.wall_s = code, reason, seconds
        summarize(result, read_metrics(run_dir / stage))
        if code == 2 and precision == "fp16" and device == "cpu":
            result.status = "refused"        # as documented: fp16 needs CUDA
            failed = stage
            continue
        result.status = "ok" if code == 0 and result.losses_finite else "FAILED"
        if result.status != "ok":
            failed = stage
            continue
        if resume and time_left() <= 0:
            result.resume = {"status": "not run", "reason": "time budget spent"}
        elif resume:
            try:
                result.resume = resume_check(cfg, run_dir, stage, device)
            except Exception as exc:   # e.g. an unreadable checkpoint
                result.resume = {"status": "FAILED", "reason": f"{type(exc).__name__}: {exc}"}
            if result.resume["status"] == "FAILED":
                result.status = "FAILED"
                result.reason = f"resume: {result.resume['reason']}"
    return results, run_dir


def data_overrides_for(data_dir: Path) -> list[str]:
    """The prepared data folder's own data and encode settings (its resolved config), so the
    stages read the latents with the settings they were made with."""
    from pipeline import config

    data_cfg = config.load_resolved(data_dir)
    d, e = data_cfg.data, data_cfg.encode
    return [f"data.source={d.source}", f"data.sample_rate={d.sample_rate}",
            f"data.chunk_seconds={d.chunk_seconds}", "data.num_shards=1", "data.workers=1",
            f"encode.codec={e.codec}", f"encode.device={e.device}",
            "encode.augment.variants=0", f"pairs.val_fraction={data_cfg.pairs.val_fraction}"]
