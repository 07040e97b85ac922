"""Benchmark 4: stage-1 epoch time on pre-encoded latents vs EnCodec run in `__getitem__`.

One fresh process prepares a run folder (chunk, pairs, EnCodec encode with random
weights; not timed), keeps the first `max_pairs` training pairs, then:
- runs the real stage 1 (`jobs.train.run_stage`) for `epochs` epochs (sizes.yaml train.epochs,
  default EPOCHS) and reads its telemetry
  (epoch training time and data-wait share) from stage1/metrics.jsonl; epoch 1 warms up;
- trains the same model (same config, seed, optimizer and `generator_step`) for one
  epoch over the same pairs and batches, fed by `EncodecInGetitem`, timed with the same
  `Telemetry`.
Both use the stage's num_workers. The model is the demo experiment's CPU-sized one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.child import run_child
from bench.inputs import subset_folder, throughput_corpus
from bench.report import Row
from pipeline import run_folder as rf

SPEEDUP_TARGET = 10.0
WAIT_LIMIT = 0.05
EPOCHS = 16   # epoch 1 warms up; the data-wait share is pooled over the rest


def train_config(run_root: Path, source: Path, sample_rate: int, chunk_seconds: float,
                 batch_size: int, epochs: int = EPOCHS):
    from pipeline import config
    return config.load("demo", "local", [
        f"run.root={run_root}", "run.name=train", f"data.source={source}",
        f"data.sample_rate={sample_rate}", f"data.chunk_seconds={chunk_seconds}",
        "data.num_shards=1", "encode.codec=encodec", "encode.pretrained=false",
        "encode.device=cpu", f"stage1.epochs={epochs}", f"stage1.batch_size={batch_size}",
        "stage1.sample_every=0", "stage1.early_stop_patience=0"])


def prepare(cfg, run_dir: Path, max_pairs: int) -> int:
    """chunk -> pairs -> encode into run_dir; keep the first max_pairs training pairs."""
    from data_prep import encode, pairs
    from data_prep.chunk import run_shard
    from pipeline.atomic import atomic_write_text
    from pipeline.config import write_resolved

    write_resolved(cfg, run_dir)
    run_shard(cfg, run_dir, 0, 1)
    pairs.run(cfg, run_dir)
    train = rf.pairs_file(run_dir, "train")
    lines = [line for line in train.read_text().splitlines() if line.strip()][:max_pairs]
    atomic_write_text(train, "\n".join(lines) + "\n")
    encode.run(cfg, run_dir)
    return len(lines)


def baseline_epoch(cfg, run_dir: Path) -> dict:
    """One stage-1 epoch of the same model fed by EnCodec-in-__getitem__; telemetry of it."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from bench.baselines import EncodecInGetitem
    from data_prep.codecs import load_codec
    from data_prep.encode import open_songs
    from data_prep.latent_store import LatentStore
    from jobs import distributed, train
    from jobs.pair_data import GlobalBatchSampler, read_pairs
    from jobs.telemetry import Telemetry
    from jobs.train_step import generator_step

    info = distributed.setup()
    scfg = cfg.stage1
    store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))
    ctx = train.build_context(cfg, run_dir, "stage1", info, train.codec_description(store, cfg))
    arrays, _ = open_songs(run_dir)
    codec = load_codec(cfg.encode, cfg.data.sample_rate, "cpu", seed=cfg.run.seed)
    pairs = read_pairs(rf.pairs_file(run_dir, "train"))
    dataset = EncodecInGetitem(pairs, {k: np.asarray(v) for k, v in arrays.items()}, codec)
    sampler = GlobalBatchSampler(len(dataset), scfg.batch_size, 0, 1, cfg.run.seed)
    sampler.set_epoch(1)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=scfg.num_workers)
    telemetry = Telemetry(info.device)
    ctx.g.train()
    it = iter(loader)
    for batch in range(len(sampler)):
        with telemetry.waiting():
            inp, tgt = next(it)
        generator_step(ctx, [(inp, tgt)], 1, batch)
        telemetry.step(len(inp))
    metrics = telemetry.epoch_metrics()
    samples = len(sampler) * scfg.batch_size
    return {"epoch_s": samples / metrics["samples_per_s"], "wait": metrics["data_wait_share"],
            "samples": samples}


def measure(source: str, run_root: str, sample_rate: int, chunk_seconds: float,
            batch_size: int, max_pairs: int, epochs: int = EPOCHS) -> dict:
    """Pipeline stage-1 epochs, then the baseline epoch, in this one process."""
    from jobs import distributed, train

    cfg = train_config(Path(run_root), Path(source), sample_rate, chunk_seconds, batch_size,
                       epochs)
    run_dir = Path(run_root) / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    kept = prepare(cfg, run_dir, max_pairs)
    stop = distributed.StopSignal()
    code = train.run_stage(cfg, run_dir, "stage1", distributed.setup(), stop)
    if code not in (train.EXIT_OK, train.EXIT_GATE):
        raise RuntimeError(f"stage 1 exited with {code}: {(run_dir / 'stage1' / 'exit.json').read_text()}")
    epochs = [json.loads(line) for line in
              rf.stage_file(run_dir, "stage1", rf.METRICS).read_text().splitlines() if line.strip()]
    samples = (kept // batch_size) * batch_size
    warm = epochs[1:] or epochs
    times = [samples / e["samples_per_s"] for e in warm]
    pipe_epoch = min(times)
    # pooled: total wait / total time, so one hiccup in a 0.1 s epoch does not decide it
    pipe_wait = sum(t * e["data_wait_share"] for t, e in zip(times, warm)) / sum(times)
    base = baseline_epoch(cfg, run_dir)
    return {"pipe_epoch_s": pipe_epoch, "pipe_wait": pipe_wait, "base_epoch_s": base["epoch_s"],
            "base_wait": base["wait"], "samples": samples, "pairs": kept,
            "frames": rf.read_encode_manifest(run_dir)["frames"],
            "num_workers": cfg.stage1.num_workers, "epochs_measured": len(warm)}


def run(sizes: dict, work: Path) -> list[Row]:
    """Rows 4a and 4b."""
    s, c, rate = sizes["train"], sizes["chunk"], sizes["sample_rate"]
    corpus = throughput_corpus(work / "inputs", c["songs"], c["song_seconds"], c["copies"],
                               sizes["seed"])
    root = work / "runs" / "train"
    shutil.rmtree(root, ignore_errors=True)
    folder = subset_folder(corpus, s["songs"], root / "source")
    res = run_child("bench.train_datapath:measure",
                    {"source": str(folder), "run_root": str(root), "sample_rate": rate,
                     "chunk_seconds": s["chunk_seconds"], "batch_size": s["batch_size"],
                     "max_pairs": s["max_pairs"], "epochs": s.get("epochs", EPOCHS)},
                    work / "logs" / "train.log").result
    speedup = res["base_epoch_s"] / res["pipe_epoch_s"]
    setup = (f"{res['samples']} training pairs of {s['chunk_seconds']:g} s chunks "
             f"({res['frames']} latent frames), batch {s['batch_size']}, demo-size transformer "
             f"on CPU, num_workers {res['num_workers']}; EnCodec with RANDOM weights")
    shutil.rmtree(root, ignore_errors=True)
    return [
        Row("4a", "stage-1 epoch time, EnCodec-in-__getitem__ dataset / pre-encoded latents",
            f"{res['pipe_epoch_s']:.2f} s per epoch",
            f"EnCodec in __getitem__: {res['base_epoch_s']:.1f} s per epoch", speedup,
            f">= {SPEEDUP_TARGET:g}x faster", speedup >= SPEEDUP_TARGET,
            f"{setup}. Pipeline: best of {res['epochs_measured']} epochs after a warm-up epoch "
            "(training loop only, as jobs/telemetry.py clocks it); baseline: one epoch."),
        Row("4b", "share of each training step spent waiting for data (stage 1 on latents); "
                  "ratio = share / 5 % limit",
            f"{res['pipe_wait']:.2%}", f"EnCodec in __getitem__: {res['base_wait']:.1%}",
            max(res["pipe_wait"], 1e-6) / WAIT_LIMIT, f"< {WAIT_LIMIT:.0%}",
            res["pipe_wait"] < WAIT_LIMIT,
            f"jobs/telemetry.py data_wait_share pooled over the {res['epochs_measured']} epochs "
            "after the warm-up (total wait / total training time).",
            raw={"wait": res["pipe_wait"],
                 "load_us": res["pipe_wait"] * res["pipe_epoch_s"] / res["samples"] * 1e6}),
    ]
