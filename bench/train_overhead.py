"""Benchmark 7: the trainer's throughput against a bare PyTorch loop on the same model,
batch and optimizer (stages 1 and 3, demo sizes, CPU).

One fresh process prepares a run folder (WAV songs -> chunk -> pairs -> mel encode; not
timed) and then, for each stage, alternates:
- one more epoch of the real trainer's loop (`jobs.train.train_epochs`: loader, step
  function, telemetry, validation, checkpoint), on models, optimizers and loaders set up
  as `jobs.train.run_stage` sets them up and kept between epochs; its throughput is what
  its own telemetry records (metrics.jsonl samples_per_s: from the first batch fetch to
  the last optimizer step, as every run measures it);
- one epoch of `bare_epoch`: the same model and optimizers (built by the trainer's
  build_context), the same loss functions, gradient clipping and batch size, over the same
  training pairs already stacked in memory: forward, loss, backward, clip, step, nothing else.
The first epoch of each warms up; the figure is the median of the passes' ratios (trainer
samples/s / bare samples/s). Stage 3 starts from a one-epoch stage 2 and its first epoch is
D pre-training, so its passes compare full GAN steps (D step, then G with D frozen).
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from bench.child import run_child
from bench.report import Row

TARGET = 0.9


def overhead_config(run_root: Path, source: Path, chunk_seconds: float, epochs: int):
    """The demo experiment on these songs: mel codec, no augmented copies, no samples,
    gates that only ask for finite losses, the curriculum's noise off (alpha 0)."""
    from pipeline import config
    over = [f"run.root={run_root}", "run.name=overhead", f"data.source={source}",
            f"data.chunk_seconds={chunk_seconds}", "data.num_shards=1", "data.workers=1",
            "encode.codec=mel", "encode.device=cpu", "encode.augment.variants=0",
            "mlflow.system_metrics=false", "stage3.curriculum.rate=0.0"]
    for s in ("stage1", "stage2", "stage3"):
        over += [f"{s}.epochs={epochs}", f"{s}.sample_every=0", f"{s}.early_stop_patience=0",
                 f"{s}.checkpoint_every=1000", f"{s}.gate.min_improvement=-100.0",
                 f"{s}.gate.beat_baselines=false", f"{s}.augment_prob=0.0"]
    return config.load("demo", "local", over)


def stacked_pairs(cfg, run_dir: Path):
    """Every training pair's (input, target) latents as two float32 tensors in memory."""
    import torch

    from data_prep.latent_store import LatentStore
    from jobs.pair_data import PairDataset, read_pairs
    from pipeline import run_folder as rf

    store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))
    data = PairDataset(store, read_pairs(rf.pairs_file(run_dir, "train")), 0.0, cfg.run.seed)
    inputs, targets = zip(*(data[i] for i in range(len(data))))
    return torch.stack(inputs), torch.stack(targets)


def bare_epoch(ctx, inputs, targets, batch: int, epoch: int) -> float:
    """One epoch of plain training steps over the stacked pairs; its samples/s.

    Stage 1: G's losses, backward, clip, AdamW. Stage 3 (ctx.d set): D on the real targets
    and the detached fakes, backward, clip, step; then G's stage-3 losses with D frozen,
    backward, clip, step; one G forward serves both, as in the trainer."""
    import torch

    from jobs.curriculum import adv_weight, kl_weight
    from jobs.gan_losses import d_loss
    from jobs.losses import generator_losses
    from jobs.next_frame import train_mode
    from jobs.train_step import generator_gan_losses

    scfg, g, d = ctx.scfg, ctx.g, ctx.d
    # the forward mode the trainer trains in (stage 1's next-frame objective: teacher-forced)
    mode, cheat, clip = train_mode(scfg), scfg.anti_cheat_noise, scfg.grad_clip
    weights = {"alpha": 0.0, "kl_weight": kl_weight(epoch, scfg.kl) if scfg.kl else 0.0,
               "adv_weight": adv_weight(epoch, scfg.gan) if scfg.gan else 0.0}
    loss_ctx = SimpleNamespace(scfg=scfg, codec=ctx.codec, d=d)
    steps = len(inputs) // batch
    start = time.perf_counter()
    for k in range(steps):
        inp, tgt = inputs[k * batch:(k + 1) * batch], targets[k * batch:(k + 1) * batch]
        out = g(inp, tgt, mode, cheat)
        if d is None:
            loss = generator_losses(out, inp, tgt, scfg, ctx.codec["codec"],
                                    weights["kl_weight"])["total"]
        else:
            ctx.opt_d.zero_grad(set_to_none=True)
            real_logits, _ = d(tgt)
            fake_logits, _ = d(out["output"].detach())
            d_loss(real_logits, fake_logits, scfg.gan)[0].backward()
            torch.nn.utils.clip_grad_norm_(d.parameters(), clip)
            ctx.opt_d.step()
            d.requires_grad_(False)
            loss = generator_gan_losses(loss_ctx, out, inp, tgt, weights)["g_loss"]
        ctx.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(g.parameters(), clip)
        ctx.opt_g.step()
        if d is not None:
            d.requires_grad_(True)
    return steps * batch / (time.perf_counter() - start)


class Trainer:
    """The real trainer's loop (jobs.train.train_epochs) on one stage, kept between calls
    so that every epoch runs on the same models, optimizers and loaders, as in a real run;
    set up as jobs.train.run_stage sets it up (MLflow left out: it logs outside the clock)."""

    def __init__(self, cfg, run_dir: Path, stage: str):
        from jobs import distributed, train
        from pipeline.tracking import StepTracker

        self.train, self.stop = train, distributed.StopSignal()
        info = distributed.setup()
        scfg = getattr(cfg, stage)
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        store, self.train_set, val_set, self.sampler, val_sampler = train.open_data(
            cfg, run_dir, scfg, info)
        self.loader = train.make_loader(self.train_set, self.sampler, scfg, info)
        self.val_loader = train.make_loader(val_set, val_sampler, scfg, info)
        train.set_determinism(scfg, cfg.run.seed)
        self.ctx = train.build_context(cfg, run_dir, stage, info,
                                       train.codec_description(store, cfg))
        self.progress, _, _ = train.start(self.ctx, self.train_set)
        self.tracker, self.dir = StepTracker(None), run_dir / stage

    def epoch(self) -> dict:
        """Train one more epoch; its metrics line (the trainer's own telemetry)."""
        self.ctx.scfg.epochs = self.progress.epoch + 1
        self.train.train_epochs(self.ctx, self.progress, self.train_set, self.loader,
                                self.sampler, self.val_loader, self.tracker, {}, self.stop)
        return json.loads((self.dir / "metrics.jsonl").read_text().splitlines()[-1])


def measure(source: str, run_root: str, chunk_seconds: float, passes: int) -> dict:
    """Both stages' passes in this one process; per stage the pass ratios and figures."""
    import torch

    from bench.gpu_data import prepare
    from data_prep.latent_store import LatentStore
    from jobs import distributed, train
    from pipeline import run_folder as rf

    cfg = overhead_config(Path(run_root), Path(source), chunk_seconds, passes + 2)
    run_dir = Path(run_root) / "overhead"
    shutil.rmtree(run_dir, ignore_errors=True)
    prepare(cfg, run_dir)
    inputs, targets = stacked_pairs(cfg, run_dir)
    store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))
    out = {"pairs": len(inputs), "frames": int(inputs.shape[-1]),
           "threads": torch.get_num_threads()}
    for stage in ("stage1", "stage3"):
        if stage == "stage3":   # stage 3 starts from stage 2's best.pt: one real epoch of it
            cfg.stage2.epochs = 1
            code = train.run_stage(cfg, run_dir, "stage2", distributed.setup(),
                                   distributed.StopSignal())
            if code not in (train.EXIT_OK, train.EXIT_GATE):
                raise RuntimeError(f"stage2 exited with {code}")
        scfg = getattr(cfg, stage)
        trainer = Trainer(cfg, run_dir, stage)
        bare = train.build_context(cfg, run_dir, stage, distributed.setup(),
                                   train.codec_description(store, cfg))
        bare.g.train()
        if bare.d is not None:
            bare.d.train()
        first = trainer.epoch()["epoch"]          # warm-up (stage 3: D pre-training)
        bare_epoch(bare, inputs, targets, scfg.batch_size, first + 1)
        pipe, plain, waits = [], [], []
        for _ in range(passes):
            line = trainer.epoch()
            pipe.append(line["samples_per_s"])
            waits.append(line["data_wait_share"])
            plain.append(bare_epoch(bare, inputs, targets, scfg.batch_size, line["epoch"]))
        ratios = [p / b for p, b in zip(pipe, plain)]
        out[stage] = {"ratio": statistics.median(ratios), "ratios": ratios,
                      "pipe": statistics.median(pipe), "bare": statistics.median(plain),
                      "wait": statistics.median(waits), "batch": scfg.batch_size,
                      "steps": len(inputs) // scfg.batch_size}
        torch.use_deterministic_algorithms(False)
    return out


def breakdown(res: dict) -> str:
    """Where the trainer's time per sample goes beyond the bare loop's, in ms."""
    pipe_ms, bare_ms = 1e3 / res["pipe"], 1e3 / res["bare"]
    wait_ms = res["wait"] * pipe_ms
    return (f"per sample {pipe_ms:.2f} ms vs bare {bare_ms:.2f} ms: data wait {wait_ms:.2f} ms "
            f"(the loader's memmap reads and float16 -> float32), the rest of the trainer's "
            f"step {pipe_ms - wait_ms - bare_ms:+.2f} ms")


def run(sizes: dict, work: Path) -> list[Row]:
    """Rows 7a (stage 1) and 7b (stage 3)."""
    from bench.gpu_data import write_songs

    s = sizes["overhead"]
    root = work / "runs" / "overhead"
    shutil.rmtree(root, ignore_errors=True)
    source = root / "songs"
    write_songs(source, s["songs"], s["song_seconds"], sizes["sample_rate"], sizes["seed"])
    res = run_child("bench.train_overhead:measure",
                    {"source": str(source), "run_root": str(root),
                     "chunk_seconds": s["chunk_seconds"], "passes": s["passes"]},
                    work / "logs" / "overhead.log").result
    rows = []
    for key, stage, what in (("7a", "stage1", "stage 1 (transformer)"),
                             ("7b", "stage3", "stage 3 (VAE-GAN: D step + G step)")):
        r = res[stage]
        passes = ", ".join(f"{x:.2f}" for x in r["ratios"])
        rows.append(Row(
            key, f"training throughput, trainer / bare PyTorch loop, {what}",
            f"{r['pipe']:.1f} samples/s", f"bare loop: {r['bare']:.1f} samples/s",
            r["ratio"], f">= {TARGET}", r["ratio"] >= TARGET,
            f"demo-size models on CPU ({res['threads']} torch threads), batch {r['batch']}, "
            f"{r['steps']} steps per epoch over {res['pairs']} training pairs of "
            f"{s['chunk_seconds']:g} s ({res['frames']} mel frames). {len(r['ratios'])} passes "
            f"of (one trainer epoch, one bare epoch) after a warm-up; the ratio is the median "
            f"of the passes' ratios ({passes}). {breakdown(r)}."))
    shutil.rmtree(root, ignore_errors=True)
    return rows
