"""The GPU check's data: a seeded folder of WAV songs, chunked, paired and encoded by the
pipeline's own steps (data_prep.chunk, pairs, encode) into one run folder per model size.

The songs are tones with a moving level and a little noise, written as 16-bit WAV: a
minute of audio takes milliseconds to make (the demo corpus's mp3 songs take seconds),
and what the check measures is training, not music.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class Size:
    """One model size of the check: the experiment it starts from and what it changes."""
    name: str
    experiment: str | None       # configs/experiments/<name>.yaml; None = configs/defaults.yaml
    batch_size: int              # the stages' batch on one device
    epochs: int                  # per stage; the resume check restarts from epoch 1
    chunk_seconds: float
    sample_rate: int
    songs: int
    song_seconds: float
    overrides: tuple[str, ...] = ()
    note: str = ""


# demo: the demo experiment's models and batch. default: configs/defaults.yaml's models on
# 16 s chunks, with the per-GPU share of the default global batch on a 4-GPU node (32 / 4).
GPU_SIZES = (
    Size("demo", "demo", 16, 2, 4.0, 24000, 16, 96.0,
         note="demo experiment's models, batch 16"),
    Size("default", None, 8, 3, 16.0, 24000, 16, 96.0,
         note="configs/defaults.yaml's models on 16 s chunks, batch 8 (= the default global "
              "batch 32 over a 4-GPU node)"),
)
TINY_MODEL = ("model.transformer.d_model=16", "model.transformer.layers=1",
              "model.transformer.heads=2", "model.transformer.ff_mult=2",
              "model.vae.latent_channels=4",
              "model.discriminator.channels=8", "model.discriminator.layers=2",
              "model.discriminator.minibatch_features=2", "generate.n=2",
              "generate.griffin_lim_iters=4", "audit.batch_size=4")
CPU_SIZES = (
    Size("tiny", "demo", 4, 2, 1.0, 12000, 5, 6.0, TINY_MODEL,
         note="demo experiment with a 16-wide one-layer model (CPU mode)"),
)


def write_songs(folder: Path, songs: int, seconds: float, sample_rate: int,
                seed: int = 0) -> list[Path]:
    """`songs` mono 16-bit WAV files of `seconds` each: two tones per song, a level that
    moves every second and -40 dB of noise; song i depends only on (seed, i)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    for i in range(songs):
        rng = np.random.default_rng([seed, i])
        f1, f2 = rng.uniform(110, 880, 2)
        level = np.repeat(rng.uniform(0.2, 0.6, int(np.ceil(seconds)) + 1), sample_rate)[:n]
        wave = level * (0.6 * np.sin(2 * np.pi * f1 * t) + 0.4 * np.sin(2 * np.pi * f2 * t))
        wave += 0.01 * rng.standard_normal(n)
        path = folder / f"song{i:03d}.wav"
        sf.write(str(path), wave.astype(np.float32), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def data_overrides(size: Size, source: Path, device: str) -> list[str]:
    """The data and encode settings of a size: this folder, one shard, the mel codec on
    `device`, no augmented copies (augmentation is CPU work the check is not about)."""
    return [f"data.source={source}", f"data.sample_rate={size.sample_rate}",
            f"data.chunk_seconds={size.chunk_seconds}", "data.num_shards=1", "data.workers=1",
            "encode.codec=mel", f"encode.device={device}", "encode.augment.variants=0",
            "pairs.val_fraction=0.2"]


def prepare(cfg, run_dir: Path) -> dict:
    """chunk -> pairs -> encode into run_dir with the pipeline's steps; seconds per step."""
    from data_prep import chunk, encode, pairs
    from pipeline.config import write_resolved

    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, run_dir)
    took = {}
    for name, step in (("chunk", lambda: chunk.run_shard(cfg, run_dir, 0, 1)),
                       ("pairs", lambda: pairs.run(cfg, run_dir)),
                       ("encode", lambda: encode.run(cfg, run_dir))):
        start = time.perf_counter()
        step()
        took[name] = time.perf_counter() - start
    return took


def link_data(data_dir: Path, run_dir: Path) -> None:
    """Give run_dir the prepared chunk, pairs and encode folders (links, as the store does)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for step in ("chunk", "pairs", "encode"):
        link = run_dir / step
        if not link.exists():
            link.symlink_to((data_dir / step).resolve(), target_is_directory=True)
