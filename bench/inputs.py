"""Benchmark inputs: generated mp3 corpora and long mp3s, cached under bench/out/.

Generating audio is slow (about 20x real time), so each input is made once and reused
while its parameters are unchanged (a marker file records them). The throughput corpus
hard-links each distinct song under several names: the bytes on disk are the same, but
every name is a separate file to decode, which gives hours of audio from minutes of
synthesis.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.corpus import generate_corpus, song
from pipeline.atomic import atomic_path, atomic_write_json

MARKER = ".bench-input.json"


def _cached(folder: Path, params: dict) -> bool:
    marker = folder / MARKER
    return marker.exists() and json.loads(marker.read_text()) == params


def throughput_corpus(work: Path, songs: int, seconds: float, copies: int, seed: int) -> Path:
    """A folder of songs x copies mp3 files (mixed mono/stereo, 44.1/48 kHz, subfolders)."""
    params = {"songs": songs, "seconds": seconds, "copies": copies, "seed": seed}
    folder = Path(work) / f"corpus-{songs}x{seconds:g}s-x{copies}"
    if _cached(folder, params):
        return folder / "all"
    if folder.exists():
        shutil.rmtree(folder)
    base = folder / "base"
    paths = generate_corpus(base, songs, seconds, seed)
    for copy in range(copies):
        for path in paths:
            rel = path.relative_to(base)
            dest = folder / "all" / rel.parent / f"copy{copy} - {rel.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dest)
    atomic_write_json(folder / MARKER, params)
    return folder / "all"


def long_mp3(work: Path, minutes: float, seed: int, sample_rate: int = 44100) -> Path:
    """One stereo mp3 of `minutes`, a generated 60 s song tiled with a slowly changing gain.

    Written block by block, so making it needs little memory either."""
    params = {"minutes": minutes, "seed": seed, "sample_rate": sample_rate}
    folder = Path(work) / f"long-{minutes:g}min"
    if _cached(folder, params):
        return next(folder.glob("*.mp3"))
    if folder.exists():
        shutil.rmtree(folder)
    piece = song(seed, 0, 60.0, sample_rate).T.astype(np.float32)  # [n, 2]
    total = int(minutes * 60 * sample_rate)
    path = folder / f"long {minutes:g} min.mp3"
    with atomic_path(path) as tmp:
        with sf.SoundFile(str(tmp), "w", sample_rate, 2, format="MP3",
                          subtype="MPEG_LAYER_III") as fh:
            written, k = 0, 0
            while written < total:
                n = min(len(piece), total - written)
                fh.write(piece[:n] * np.float32(0.7 + 0.3 * np.cos(k)))
                written, k = written + n, k + 1
    atomic_write_json(folder / MARKER, params)
    return path


def subset_folder(source: Path, count: int, dest: Path) -> Path:
    """A folder holding hard links to the first `count` audio files of `source` (0 = all)."""
    from data_prep.chunk import list_sources

    files = list_sources(Path(source))
    files = files[:count] if count else files
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    for path in files:
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    return dest
