"""A tiny synthetic run folder for the trainer's tests: resolved config, latent shards,
manifest and pairs index in the documented formats (docs/formats.md), no audio.

The latents have structure the model can learn: each song has a per-channel level m
(like a spectrum) and a low-rank zero-mean motion v = W z (W fixed, z smooth per song);
chunk c is m + (-1)^c v, so every continuation is its start chunk's level minus its
motion. Repeating the start chunk is then the worst answer and the mean latent a mediocre
one; a model that learns to flip the motion beats both.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline import config
from pipeline.atomic import atomic_save_npy, atomic_write_json

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# Tiny model and stage settings shared by the training tests (all CPU, a few seconds).
TINY = [
    "model.transformer.d_model=16", "model.transformer.layers=1", "model.transformer.heads=2",
    "model.transformer.ff_mult=2", "model.transformer.dropout=0.0",
    "model.transformer.max_frames=128",
    "model.vae.latent_channels=4", "model.discriminator.channels=8",
    "model.discriminator.layers=2", "model.discriminator.minibatch_features=2",
]
for _s in ("stage1", "stage2", "stage3"):
    TINY += [f"{_s}.epochs=2", f"{_s}.batch_size=4", f"{_s}.num_workers=0",
             f"{_s}.warmup_steps=0", f"{_s}.checkpoint_every=1", f"{_s}.sample_every=0",
             f"{_s}.early_stop_patience=0", f"{_s}.deterministic=true", f"{_s}.lr=0.003",
             f"{_s}.augment_prob=0.0", f"{_s}.gate.min_improvement=0.0",
             f"{_s}.gate.beat_baselines=false"]
TINY += ["stage3.gan.d_pretrain_epochs=1", "stage3.gan.adv_ramp_epochs=1",
         "stage3.curriculum.start_epoch=2", "stage3.curriculum.rate=0.5"]


def make_run(tmp: Path, *overrides: str, songs: int = 6, chunks: int = 5, frames: int = 75,
             variants: int = 0, val_songs: int = 2, seed: int = 0, tiny: bool = True) -> Path:
    """Write a run folder under tmp; returns its path (config at run_dir/config.resolved.yaml).
    tiny=False keeps the demo experiment's model and stage settings."""
    cfg = config.load("demo", "local", [f"run.root={tmp}/runs", "run.name=t",
                                        "mlflow.system_metrics=false",
                                        *(TINY if tiny else []), *overrides])
    run_dir = Path(cfg.run.root) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_resolved(cfg, run_dir)
    rng = np.random.default_rng(seed)
    dim, rank = cfg.model.transformer.latent_dim, 6
    w = rng.standard_normal((dim, rank)) / np.sqrt(rank)
    ids = [f"song{i:02d}" for i in range(songs)]
    rows, index = [], {}
    for s in ids:
        z = np.cumsum(rng.standard_normal((rank, frames)), axis=1) / np.sqrt(frames) * 2
        motion = w @ (z - z.mean(axis=1, keepdims=True))
        level = rng.standard_normal((dim, 1))
        index[s] = []
        for c in range(chunks):
            index[s].append([0, len(rows)])
            rows.append(level + ((-1) ** c) * motion)
    enc = run_dir / "encode"
    atomic_save_npy(enc / "shards" / "latents-00000.npy", np.stack(rows).astype(np.float16))
    augmented, aug_rows = {}, []
    train_ids = ids[val_songs:]
    if variants:
        for s in train_ids:
            augmented[s] = []
            for c in range(chunks):
                base = rows[index[s][c][1]]
                per = []
                for v in range(variants):
                    per.append([0, len(aug_rows), {"type": "gain", "gain_db": 1.0 + v}])
                    aug_rows.append(base * (1.2 + 0.1 * v))
                augmented[s].append(per)
        atomic_save_npy(enc / "shards" / "aug-00000.npy", np.stack(aug_rows).astype(np.float16))
    manifest = {"codec": "mel", "sample_rate": 24000, "frame_rate": 75, "latent_dim": dim,
                "frames": frames, "dtype": "float16", "kind": "latents", "pretrained": False,
                "songs": songs, "rows": len(rows),
                "shards": [{"file": "shards/latents-00000.npy", "rows": len(rows)}],
                "index": index, "augmented": augmented,
                "aug_shards": [{"file": "shards/aug-00000.npy", "rows": len(aug_rows)}]
                if variants else []}
    atomic_write_json(enc / "manifest.json", manifest)
    pairs = run_dir / "pairs"
    pairs.mkdir(parents=True, exist_ok=True)
    for split, members in (("train", train_ids), ("val", ids[:val_songs])):
        lines = [json.dumps({"song": s, "input": c, "target_song": s, "target": c + 1})
                 for s in members for c in range(chunks - 1)]
        (pairs / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def env() -> dict:
    """Environment for a training subprocess: repo on the path, one thread, no MLflow sysmetrics."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO)
    out["OMP_NUM_THREADS"] = "1"
    out["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def train_cmd(run_dir: Path, stage: str) -> list[str]:
    return [PY, "-m", "jobs.train", "--run-dir", str(run_dir), "--stage", stage]


def torchrun_cmd(run_dir: Path, stage: str, nproc: int = 2, extra: tuple = ()) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra,
            "-m", "jobs.train", "--run-dir", str(run_dir), "--stage", stage]


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def load_ckpt(path: Path) -> dict:
    from jobs import checkpoint
    return checkpoint.load(path)


def mlflow_store(tmp: Path) -> str:
    """Create (once) a sqlite MLflow store under tmp and return its URI for
    `mlflow.tracking_uri=...`; building the tables costs seconds, so tests share one."""
    path = Path(tmp) / "mlflow.db"
    uri = f"sqlite:///{path}"
    if not path.exists():
        import mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("musicgen")
    return uri
