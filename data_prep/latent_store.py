"""Read access to the encode step's latents: memory-mapped shards looked up by (song, chunk).

The trainer reads everything through this and never re-encodes audio. Shards are opened
lazily and dropped on pickling, so a store can be handed to DataLoader worker processes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.run_folder import ENCODE_MANIFEST


class LatentStore:
    """Latents [128, T] float16 of every encoded chunk, and its augmented variants."""

    def __init__(self, encode_dir: Path | str):
        self.encode_dir = Path(encode_dir)
        path = self.encode_dir / ENCODE_MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the encode step first")
        self.manifest: dict = json.loads(path.read_text())
        self.frames: int = int(self.manifest["frames"])
        self.latent_dim: int = int(self.manifest["latent_dim"])
        self._clean: dict[int, np.ndarray] = {}
        self._aug: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_clean"], state["_aug"] = {}, {}
        return state

    @property
    def songs(self) -> list[str]:
        return sorted(self.manifest["index"])

    def chunks(self, song_id: str) -> int:
        """Number of encoded chunks of a song."""
        return len(self._rows(song_id))

    def _rows(self, song_id: str) -> list:
        try:
            return self.manifest["index"][song_id]
        except KeyError:
            raise KeyError(f"song {song_id!r} is not in {self.encode_dir / 'manifest.json'}") \
                from None

    def _open(self, cache: dict, shards: list, shard: int) -> np.ndarray:
        if shard not in cache:
            if not 0 <= shard < len(shards):
                raise IndexError(f"shard {shard} out of range (0..{len(shards) - 1}) in "
                                 f"{self.encode_dir / 'manifest.json'}")
            cache[shard] = np.load(self.encode_dir / shards[shard]["file"], mmap_mode="r")
        return cache[shard]

    def get(self, song_id: str, chunk: int) -> np.ndarray:
        """Clean latents [latent_dim, frames] float16 of one chunk (a read-only memmap view)."""
        rows = self._rows(song_id)
        if not 0 <= chunk < len(rows):
            raise IndexError(f"song {song_id!r} has {len(rows)} chunks, asked for {chunk}")
        shard, row = rows[chunk]
        return self._open(self._clean, self.manifest["shards"], shard)[row]

    def variants(self, song_id: str, chunk: int) -> list[tuple[int, int, dict]]:
        """(shard, row, params) of the augmented variants of one chunk; [] for val songs."""
        per_chunk = self.manifest.get("augmented", {}).get(song_id)
        if not per_chunk:
            return []
        return [(int(s), int(r), p) for s, r, p in per_chunk[chunk]]

    def get_variant(self, shard: int, row: int) -> np.ndarray:
        """Latents [latent_dim, frames] float16 of one augmented variant."""
        return self._open(self._aug, self.manifest.get("aug_shards", []), shard)[row]
