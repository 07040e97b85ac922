"""Test helper: a tiny real run folder (demo corpus -> chunk -> pairs -> encode, mel codec)
and stage-3 checkpoints of the real generator and discriminator in the trainer's format.

The checkpoints hold freshly initialised (seeded) models, one seed per epoch, so every
discriminator epoch differs; they are what jobs/checkpoint.py documents, nothing more.
"""
from __future__ import annotations

from pathlib import Path

import torch

from jobs import checkpoint as ckpt_io
from pipeline import config
from tests.conftest import make_cfg

TINY = ("data.demo_songs=5", "data.demo_seconds=6.0", "data.chunk_seconds=1.0",
        "data.sample_rate=12000", "data.workers=1", "data.num_shards=1", "pairs.val_fraction=0.4",
        "model.transformer.d_model=16", "model.transformer.layers=1",
        "model.transformer.heads=2", "model.transformer.ff_mult=2",
        "model.transformer.max_frames=128", "model.vae.latent_channels=4",
        "model.discriminator.channels=8", "model.discriminator.layers=2",
        "model.discriminator.minibatch_features=2", "encode.mel.griffin_lim_iters=4",
        "generate.griffin_lim_iters=4", "generate.n=3", "audit.batch_size=4",
        "stage3.checkpoint_every=1", "evaluate.n=4", "evaluate.fft_size=256",
        "stage3.curriculum.rate=0.25", "stage3.curriculum.start_epoch=3", "encode.augment.variants=0")

def build_run(root: Path, *overrides: str):
    """A run folder with real chunks, pairs and mel latents; returns (cfg, run_dir)."""
    from data_prep import chunk, encode, pairs

    cfg = make_cfg(root, *TINY, *overrides)
    run_dir = Path(cfg.run.root) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_resolved(cfg, run_dir)
    chunk.run_shard(cfg, run_dir)
    pairs.run(cfg, run_dir)
    encode.run(cfg, run_dir)
    return cfg, run_dir


def codec_description(run_dir: Path) -> dict:
    """The codec facts of the run's encode manifest, as the trainer records them."""
    from pipeline import codec_facts
    from pipeline.run_folder import read_encode_manifest

    return codec_facts.describe(read_encode_manifest(run_dir))


def save_stage3(cfg, run_dir: Path, epochs, codec: dict | None = None,
                with_discriminator: bool = True) -> dict[int, Path]:
    """epoch_<n>.pt for each epoch (+ last.pt and best.pt = the last one); returns the paths."""
    from jobs.discriminator import build_discriminator
    from jobs.generator import build_generator

    codec = codec_description(run_dir) if codec is None else codec
    parts = list(cfg.stage3.enabled_parts)
    paths = {}
    for epoch in epochs:
        torch.manual_seed(epoch)
        gen, disc = build_generator(cfg, parts), build_discriminator(cfg)
        state = {"generator": ckpt_io.model_state(gen),
                 "discriminator": ckpt_io.model_state(disc) if with_discriminator else None,
                 "config": config.to_dict(cfg), "codec": dict(codec), "epoch": epoch,
                 "parts": parts, "step": epoch}
        path = Path(run_dir) / "stage3" / f"epoch_{epoch}.pt"
        ckpt_io.save(path, state)
        paths[epoch] = path
    last = paths[max(paths)]
    for name in ("last.pt", "best.pt"):
        (Path(run_dir) / "stage3" / name).write_bytes(last.read_bytes())
    return paths
