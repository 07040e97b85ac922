"""Test helper: write chunk-step outputs (docs/formats.md) directly with numpy.

Songs are synthetic: a tone per song (its own frequency) plus a little seeded noise, so
that tests of later steps need no audio decoding.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_chunks(run_dir: Path, songs: dict[str, int], sample_rate: int, seconds: float,
                 channels: int = 1, dtype: str = "float32", shards: int = 1,
                 extra_lines: tuple = ()) -> dict[str, np.ndarray]:
    """Write songs/<id>.npy [chunks, channels, samples] and manifest-*-of-*.jsonl lines."""
    chunk_dir = Path(run_dir) / "chunk"
    (chunk_dir / "songs").mkdir(parents=True, exist_ok=True)
    samples = int(round(seconds * sample_rate))
    rng = np.random.default_rng(0)
    lines: list[list[str]] = [[] for _ in range(shards)]
    arrays = {}
    for n, (song, chunks) in enumerate(sorted(songs.items())):
        t = np.arange(chunks * samples) / sample_rate
        freq = 220.0 * (1 + n)
        wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
        arr = np.repeat(wave.reshape(chunks, 1, samples), channels, axis=1).astype(np.float32)
        if dtype == "int16":
            arr = (arr * 32767).astype(np.int16)
        np.save(chunk_dir / "songs" / f"{song}.npy", arr)
        arrays[song] = arr
        lines[n % shards].append(json.dumps({
            "source": f"/data/{song}.mp3", "song_id": song, "sha256": "0" * 64,
            "duration_s": chunks * seconds, "sample_rate": 44100, "channels": channels,
            "chunks": chunks, "array": f"songs/{song}.npy", "status": "ok", "reason": "",
            "config_hash": "x"}))
    lines[0].extend(json.dumps(line) for line in extra_lines)
    for i, shard_lines in enumerate(lines):
        (chunk_dir / f"manifest-{i}-of-{shards}.jsonl").write_text(
            "".join(line + "\n" for line in shard_lines))
    return arrays
