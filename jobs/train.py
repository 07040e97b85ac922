"""Train one stage (stage1 transformer, stage2 + VAE, stage3 + VAE-GAN) on pre-encoded latents.

    python -m jobs.train --run-dir runs/demo --stage stage1
    torchrun --nproc_per_node 4 -m jobs.train --run-dir runs/demo --stage stage2

Reads run_dir/config.resolved.yaml, the encode step's latents and the pairs index; writes
run_dir/<stage>/: last.pt (every epoch), epoch_<n>.pt (every checkpoint_every; the newest
keep_last kept, older stage-3 ones cut to the discriminator, epoch_<n>_d.pt), best.pt,
transfer_report.json or continued.json, metrics.jsonl, gate.json, exit.json. A stage
without last.pt starts from `continue_from` when set (another checkpoint's full state, the
new epochs and lr), else from the previous stage's best.pt (weights matched by name and
shape); with last.pt it resumes exactly where that checkpoint left off, mid-epoch included.

The global batch (stageN.batch_size) is split over the ranks and into grad_accum_steps
micro-batches; the validation loss is the stage's total generator loss with the KL fully
annealed (weight 1), so epochs compare on one objective; it is summed over all ranks'
shards before anyone looks at it.

Stage 1's objective (stage1.objective) is "chunk" (the target chunk in one pass) or
"next_frame" (causal, teacher-forced in training, free-running in validation, so val_loss
compares with the baselines; val_tf_loss is the teacher-forced loss; jobs/next_frame.py).

Stage 1 in continuation mode also writes baselines.json (trivial yardsticks) and, after
training, order_probe.json (jobs/order_probe.py: the best weights with the input's frames
permuted, and within-song retrieval), which its gate reads.

Exit codes (pipeline/exit_codes.py; also written to exit.json by rank 0):
    0   done (the validation gate passed, or failed with gate.on_fail "warn": gate.json
        has warned true and a "GATE MISSED (warn): <reason>" line is printed)
    2   bad input (missing config, latents, pairs or previous stage's checkpoint; GPUs
        asked for and no CUDA without cluster.allow_cpu_fallback; fp16 without CUDA)
    3   validation gate failed with gate.on_fail "stop" (gate.json says why)
    4   non-finite loss (error.pt holds the state before the bad step)
    75  preempted (SIGUSR2/SIGTERM): last.pt saved mid-epoch; requeue to resume
Under torchrun the agent reports any non-zero worker code as its own failure (exit 1), so
callers read exit.json for the reason.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_prep.latent_store import LatentStore
from jobs import distributed
from jobs.gate import evaluate_gate, read_history
from jobs.order_probe import order_probe
from jobs.pair_data import GlobalBatchSampler, PairDataset, read_pairs
from jobs.running_mean import Running
from jobs.telemetry import Telemetry
from jobs.train_context import Context, build_context, rank_param_spread
from jobs.train_errors import BadInput, NonFiniteLoss, Preempted
from jobs.train_state import (STAGES, Progress, append_metrics, prune_epochs, save_all, start,
                              write_exit)
from jobs.train_step import gan_step, generator_step
from jobs.validation import baselines, validate
from pipeline import codec_facts
from pipeline import config as config_mod
from pipeline import run_folder as rf
from pipeline.atomic import atomic_write_json
from pipeline.malloc import reuse_freed_memory
from pipeline.exit_codes import EXIT_BAD_INPUT, EXIT_GATE, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED
from pipeline.schema import Config, StageConfig
from pipeline.tracking import StepTracker, step_run



# ---------------------------------------------------------------------------------------
# setup: config, devices, determinism, data
# ---------------------------------------------------------------------------------------

def load_config(run_dir: Path) -> Config:
    """The run's resolved config (written by the orchestrator)."""
    try:
        return config_mod.load_resolved(run_dir)
    except config_mod.ConfigError as exc:
        raise BadInput(str(exc)) from None


def check_gpus(cfg: Config, stage: str, info: distributed.DistInfo) -> None:
    """A stage that asked for GPUs (cluster.steps.<stage>.gpus_per_node) and finds no CUDA
    stops with exit 2, unless cluster.allow_cpu_fallback lets it train on the CPU (gloo)."""
    res = cfg.cluster.steps.get(stage)
    asked = res.gpus_per_node if res is not None else 0
    if asked <= 0 or info.device.type == "cuda":
        return
    if not cfg.cluster.allow_cpu_fallback:
        raise BadInput(f"{stage} asked for {asked} GPU(s) per node (cluster.steps.{stage}."
                       f"gpus_per_node) but this node has no CUDA device; set "
                       "cluster.allow_cpu_fallback=true to train on the CPU instead")
    if info.is_main:
        print(f"[{stage}] asked for {asked} GPU(s) per node, found no CUDA: training on the "
              "CPU (cluster.allow_cpu_fallback)", file=sys.stderr)


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
        store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))
        train_pairs = read_pairs(rf.pairs_file(run_dir, "train"))
        val_pairs = read_pairs(rf.pairs_file(run_dir, "val"))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise BadInput(str(exc)) from None
    if not train_pairs or not val_pairs:
        raise BadInput(f"{run_dir / 'pairs'}: need training and validation pairs, have "
                       f"{len(train_pairs)} and {len(val_pairs)}")
    train_set = PairDataset(store, train_pairs, scfg.augment_prob, cfg.run.seed)
    val_set = PairDataset(store, val_pairs, 0.0, cfg.run.seed)
    accum = scfg.grad_accum_steps
    if accum < 1 or scfg.batch_size % (accum * info.world_size):
        raise BadInput(f"batch_size {scfg.batch_size} does not split into grad_accum_steps "
                       f"{accum} micro-batches over {info.world_size} ranks")
    if len(train_set) < scfg.batch_size:
        raise BadInput(f"only {len(train_set)} training pairs for a global batch of "
                       f"{scfg.batch_size}: lower batch_size or add data")
    try:   # the sampler yields micro-batches; accum consecutive ones make one global batch
        train_sampler = GlobalBatchSampler(len(train_set), scfg.batch_size // accum, info.rank,
                                           info.world_size, cfg.run.seed)
        val_sampler = GlobalBatchSampler(len(val_set), scfg.batch_size, info.rank,
                                         info.world_size, cfg.run.seed, shuffle=False,
                                         drop_last=False)
    except ValueError as exc:
        raise BadInput(f"{exc} (stage batch_size over {info.world_size} ranks)") from None
    return store, train_set, val_set, train_sampler, val_sampler


def make_loader(dataset: PairDataset, sampler: GlobalBatchSampler, scfg: StageConfig,
                info: distributed.DistInfo) -> DataLoader:
    """A loader over the sampler's batches with its own seeded generator."""
    # Own generator: creating an iterator must not draw from the global RNG, or a resumed
    # run (which creates one more iterator) would drift from an uninterrupted one.
    g = torch.Generator()
    g.manual_seed(sampler.seed + info.rank)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=scfg.num_workers,
                      pin_memory=info.device.type == "cuda", generator=g)


def codec_description(store: LatentStore, cfg: Config) -> dict:
    """The encode manifest's codec facts, saved in every checkpoint."""
    return codec_facts.describe(store.manifest, cfg.encode.codec)



# ---------------------------------------------------------------------------------------
# samples while training
# ---------------------------------------------------------------------------------------

def sample_hook(cfg: Config, run_dir: Path, stage: str, epoch: int, generator: nn.Module,
                tracker: StepTracker) -> None:
    """Log a few samples made as this stage trains (jobs.samples.log_samples: noise, or the
    creative cascade on validation pairs); never fatal, the training RNG left as it was."""
    try:
        from jobs.samples import log_samples
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


# ---------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------

def run_stage(cfg: Config, run_dir: Path, stage: str, info: distributed.DistInfo,
              stop: distributed.StopSignal) -> int:
    """Train `stage` to the end (or a stop); returns the exit code."""
    scfg: StageConfig = getattr(cfg, stage)
    out_dir = run_dir / stage
    check_gpus(cfg, stage, info)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_mod.write_resolved(cfg, out_dir)

    # -- data ---------------------------------------------------------------------------
    store, train_set, val_set, train_sampler, val_sampler = open_data(cfg, run_dir, scfg, info)
    train_loader = make_loader(train_set, train_sampler, scfg, info)
    val_loader = make_loader(val_set, val_sampler, scfg, info)

    # -- models, optimizers; resume, continue another checkpoint, or transfer -----------
    set_determinism(scfg, cfg.run.seed)
    ctx = build_context(cfg, run_dir, stage, info, codec_description(store, cfg))
    progress, report, continued = start(ctx, train_set)

    with step_run(cfg, run_dir, stage, info.rank) as tracker:
        if info.is_main:
            log_start(ctx, tracker, report, continued)
        base = {}
        if stage == "stage1" and scfg.mode == "continuation":
            base = baselines(ctx, train_set, val_loader)
            if info.is_main:
                atomic_write_json(out_dir / rf.BASELINES, base)
        elif stage == "stage1" and info.is_main:   # creative: the reference depends on masks
            print("[stage1] trivial baselines skipped: in creative mode the loss compares "
                  "against the masks' blend, which a baseline has no masks for", file=sys.stderr)
        try:
            code, reason = train_epochs(ctx, progress, train_set, train_loader, train_sampler,
                                        val_loader, tracker, base, stop)
        except NonFiniteLoss as exc:
            save_all(ctx, progress, [out_dir / rf.ERROR_CHECKPOINT])
            code, reason = EXIT_NONFINITE, str(exc)
        except Preempted as exc:
            code, reason = EXIT_PREEMPTED, str(exc)
        probe = None
        if code == EXIT_OK and stage == "stage1" and scfg.mode == "continuation":
            probe = probe_order(ctx, val_set, val_sampler, tracker, progress.epoch)
        if code == EXIT_OK:
            result = distributed.gather(evaluate_gate(   # rank 0's reading decides for all
                scfg.gate, read_history(out_dir / rf.METRICS), free_running(base),
                free_bits=scfg.kl.free_bits if scfg.kl is not None else None,
                d_pretrain_epochs=scfg.gan.d_pretrain_epochs if scfg.gan is not None else 0,
                order_probe=probe), info)[0]
            if info.is_main:
                atomic_write_json(out_dir / rf.GATE, result)
                tracker.log_metrics({"gate_passed": float(result["passed"])},
                                    step=progress.epoch)
                tracker.log_artifact(out_dir / rf.GATE)
            if result["passed"]:
                reason = f"{stage} done ({reason}); gate passed: {result['reason']}"
            elif result["warned"]:   # gate.on_fail "warn": say so plainly, and go on
                if info.is_main:
                    print(f"[{stage}] GATE MISSED (warn): {result['reason']}", file=sys.stderr)
                reason = f"{stage} done ({reason}); GATE MISSED (warn): {result['reason']}"
            else:
                code, reason = EXIT_GATE, f"{stage} validation gate failed: {result['reason']}"
        if info.is_main:
            write_exit(out_dir, code, reason, progress)
            tracker.set_tags({"exit_code": code, "exit_reason": reason})
            print(f"[{stage}] {reason}", file=sys.stderr if code else sys.stdout)
    distributed.barrier(info)
    return code


def free_running(base: dict[str, float]) -> dict[str, float]:
    """The baselines the gate compares the val loss with: every val_baseline_* (the
    teacher-forced val_tf_baseline_* yardsticks are for val_tf_loss only)."""
    return {k: v for k, v in base.items() if k.startswith("val_baseline_")}


def probe_order(ctx: Context, val_set: PairDataset, val_sampler: GlobalBatchSampler,
                tracker: StepTracker, epoch: int) -> dict:
    """Stage 1's order probe on its best weights (every rank); rank 0 writes
    order_probe.json and logs its figures as order/<name>."""
    probe = order_probe(ctx, val_set, val_sampler)
    if ctx.info.is_main:
        path = ctx.run_dir / ctx.stage / rf.ORDER_PROBE
        atomic_write_json(path, probe)
        tracker.log_metrics({f"order/{k}": float(probe[k]) for k in (
            "val_loss", "val_loss_permuted", "order_gain", "retrieval_accuracy",
            "retrieval_chance", "retrieval_mean_rank")}, step=epoch)
        tracker.log_artifact(path)
        print(f"[{ctx.stage}] order probe (best.pt, epoch {probe['epoch']}): val loss "
              f"{probe['val_loss']:.4f}, input frames permuted {probe['val_loss_permuted']:.4f} "
              f"(order gain {probe['order_gain']:+.1%}); within-song retrieval "
              f"{probe['retrieval_correct']}/{probe['pairs']} = "
              f"{probe['retrieval_accuracy']:.1%} (chance {probe['retrieval_chance']:.1%})",
              file=sys.stderr)
    return probe


def log_start(ctx: Context, tracker: StepTracker, report: Optional[dict],
              continued: Optional[dict]) -> None:
    """Params of the stage, and how it started: transfer report or continuation record."""
    out_dir, stage = ctx.run_dir / ctx.stage, ctx.stage
    nodes = distributed.node_list()
    sizes = {f"{name}_params": sum(p.numel() for p in model.parameters())
             for name, model in (("generator", ctx.g), ("discriminator", ctx.d)) if model is not None}
    atomic_write_json(out_dir / rf.MODEL_SIZE, sizes)
    tracker.log_params({"stage": stage, "world_size": ctx.info.world_size,
                        "num_nodes": len(nodes), "nodes": ",".join(nodes),
                        "device": str(ctx.info.device), stage: config_mod.to_dict(ctx.scfg),
                        **{f"model.{k}": v for k, v in sizes.items()}})
    if report is not None:
        atomic_write_json(out_dir / rf.TRANSFER_REPORT, report)
        tracker.log_artifact(out_dir / rf.TRANSFER_REPORT)
        for model in ("generator", "discriminator"):
            if model in report:
                tracker.log_metrics({f"transfer_{model}_{k}": v for k, v in
                                     report[model]["counts"].items()}, step=0)
    if continued is not None:
        atomic_write_json(out_dir / rf.CONTINUED, continued)
        tracker.log_artifact(out_dir / rf.CONTINUED)
        tracker.log_params({"continued_from": continued["from"],
                            "continued_at_epoch": continued["at_epoch"]})
        change = (f"from epoch {continued['at_epoch']}: lr {continued['lr'][0]} -> "
                  f"{continued['lr'][1]}, epochs {continued['epochs'][0]} -> "
                  f"{continued['epochs'][1]}")
        tracker.set_tags({"continued_from": continued["from"], "continued": change})
        print(f"[{stage}] continuing {continued['from']} {change}", file=sys.stderr)


def log_step(ctx: Context, tracker: StepTracker, metrics: dict[str, float], step: int) -> None:
    """Every log_every_steps optimizer steps: the step's losses (mean over ranks) and lr."""
    every = ctx.scfg.log_every_steps
    if every <= 0 or step % every:
        return
    names = {"loss": next(k for k in ("train_g_loss", "train_total", "train_d_loss")
                          if k in metrics)}
    if "train_d_loss" in metrics:
        names["d_loss"] = "train_d_loss"
    sums = distributed.all_reduce_sum([metrics[k] for k in names.values()], ctx.info)
    if ctx.info.is_main:
        logged = {f"train/{n}_step": s / ctx.info.world_size for n, s in zip(names, sums)}
        tracker.log_metrics(logged | {"train/lr_step": ctx.opt_g.param_groups[0]["lr"]},
                            step=step)


def train_epochs(ctx: Context, progress: Progress, train_set: PairDataset,
                 train_loader: DataLoader, sampler: GlobalBatchSampler, val_loader: DataLoader,
                 tracker: StepTracker, base: dict, stop: distributed.StopSignal) -> tuple[int, str]:
    """The epoch loop; returns (EXIT_OK, reason) or raises Preempted / NonFiniteLoss."""
    scfg, info, out_dir = ctx.scfg, ctx.info, ctx.run_dir / ctx.stage
    step_fn = gan_step if ctx.d is not None else generator_step
    accum = scfg.grad_accum_steps
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
        steps = sampler.batches_per_epoch() // accum      # the sampler counts micro-batches
        bar = tqdm(total=steps, initial=progress.batch_in_epoch // accum, file=sys.stderr,
                   desc=f"{ctx.stage} epoch {epoch}/{scfg.epochs}", disable=not info.is_main,
                   leave=False)
        it = iter(train_loader)
        for batch in range(progress.batch_in_epoch // accum, steps):
            with telemetry.waiting():
                micros = [next(it) for _ in range(accum)]
            if distributed.any_rank(stop.set, info):   # a step boundary: all ranks agree
                progress.partial = running.state()
                save_all(ctx, progress, [out_dir / rf.LAST])
                raise Preempted(f"{ctx.stage} preempted ({stop.received or 'signal on another rank'})"
                                f" at epoch {epoch}, batch {batch + 1}/{steps}: last.pt saved")
            micros = [(inp.to(info.device, non_blocking=True),
                       tgt.to(info.device, non_blocking=True)) for inp, tgt in micros]
            metrics = step_fn(ctx, micros, epoch, batch)
            running.add(metrics)
            progress.step += 1
            progress.batch_in_epoch = (batch + 1) * accum
            telemetry.step(sum(len(inp) for inp, _ in micros) * info.world_size)
            log_step(ctx, tracker, metrics, progress.step)
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
            append_metrics(out_dir / rf.METRICS, epoch, metrics)
            train = (f"train {metrics['train_total']:.4f}" if "train_total" in metrics else
                     f"D pre-training, d_loss {metrics.get('train_d_loss', math.nan):.4f}")
            print(f"[{ctx.stage}] epoch {epoch}: {train} val {val:.4f} best "
                  f"{progress.best_val:.4f} (epoch {progress.best_epoch})", file=sys.stderr)
            if scfg.sample_every and epoch % scfg.sample_every == 0:
                sample_hook(ctx.cfg, ctx.run_dir, ctx.stage, epoch, ctx.g, tracker)
        paths = [out_dir / rf.LAST]
        if epoch % scfg.checkpoint_every == 0:
            paths.append(rf.epoch_checkpoint(out_dir, epoch))
        if improved:
            paths.append(out_dir / rf.BEST)
        save_all(ctx, progress, paths)
        if info.is_main:
            prune_epochs(out_dir, scfg.keep_last, keep_discriminator=ctx.d is not None)
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
    """Command line: train one stage; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the run folder")
    parser.add_argument("--stage", required=True, choices=STAGES)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    reuse_freed_memory()   # this process only: batches and activations are allocated anew per step
    stop = distributed.StopSignal().install()
    info = distributed.setup()
    ended = False
    try:
        cfg = load_config(run_dir)
        code = run_stage(cfg, run_dir, args.stage, info, stop)
        ended = True
        return code
    except BadInput as exc:
        print(f"[{args.stage}] bad input: {exc}", file=sys.stderr)
        if info.is_main and run_dir.exists():
            write_exit(run_dir / args.stage, EXIT_BAD_INPUT, str(exc), None)
        return EXIT_BAD_INPUT
    finally:
        distributed.teardown(together=ended)
        stop.uninstall()


if __name__ == "__main__":
    sys.exit(main())
