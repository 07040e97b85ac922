"""Training pairs over pre-encoded latents, and the sampler that splits each global batch over ranks.

The dataset reads [128, T] float16 latents from the encode step's memory-mapped shards
(never re-encoding audio) and returns float32 (input, target) tensors. A training sample is
drawn from an augmented variant with probability `augment_prob`, decided by a generator
seeded from (seed, epoch, index), so an epoch reads the same data however it is split or
resumed. Validation is never augmented.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data_prep.latent_store import LatentStore
from pipeline.run_folder import PAIR_KEYS, read_pairs  # noqa: F401  (train.py imports them here)


class PairDataset(Dataset):
    """(input, target) latent pairs; optional augmented variants for training samples."""

    def __init__(self, store: LatentStore, pairs: list[dict], augment_prob: float = 0.0,
                 seed: int = 0):
        self.store = store
        self.pairs = pairs
        self.augment_prob = augment_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _chunk(self, song: str, chunk: int, variant: int) -> np.ndarray:
        if variant >= 0:
            shard, row, _params = self.store.variants(song, chunk)[variant]
            return self.store.get_variant(shard, row)
        return self.store.get(song, chunk)

    def _variants(self, index: int, pair: dict) -> tuple[int, int]:
        """Variant numbers for (input, target), -1 = clean, seeded by (seed, epoch, index).

        The target's variant is the one with the same augmentation settings as the input's
        (the encode step draws settings per song, but a dropped variant shifts numbering);
        a pair whose target has no such variant stays clean on both sides.
        """
        if self.augment_prob <= 0:
            return -1, -1
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if rng.random() >= self.augment_prob:
            return -1, -1
        inputs = self.store.variants(pair["song"], pair["input"])
        if not inputs:
            return -1, -1
        k = int(rng.integers(len(inputs)))
        wanted = inputs[k][2]
        targets = self.store.variants(pair["target_song"], pair["target"])
        match = [j for j, (_s, _r, params) in enumerate(targets) if params == wanted]
        return (k, match[0]) if match else (-1, -1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        v_in, v_tgt = self._variants(index, pair)
        inp = self._chunk(pair["song"], int(pair["input"]), v_in)
        tgt = self._chunk(pair["target_song"], int(pair["target"]), v_tgt)
        # torch widens float16 with vector instructions, numpy one value at a time (7x slower)
        return (torch.tensor(np.asarray(inp), dtype=torch.float32),
                torch.tensor(np.asarray(tgt), dtype=torch.float32))


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's part of each global batch, from one seeded permutation per epoch.

    Every rank draws the same permutation (seed + epoch), cuts it into global batches of
    `global_batch` (dropping the incomplete last one when training), and takes the
    rank-th contiguous slice of each. So N ranks see exactly the samples one process would
    see in each step, which makes N-rank and 1-rank training agree. `start_batch` skips
    batches already done (resume after preemption mid-epoch).
    Validation (shuffle=False, drop_last=False) covers every sample exactly once.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, drop_last: bool = True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the "
                             f"{world_size} ranks")
        if drop_last and size < global_batch:
            raise ValueError(f"only {size} training pairs for a global batch of "
                             f"{global_batch}: lower batch_size or add data")
        self.size, self.global_batch = size, global_batch
        self.rank, self.world = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return (self.size // self.global_batch if self.drop_last
                else math.ceil(self.size / self.global_batch))

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        local = self.global_batch // self.world
        for b in range(self.start_batch, self.batches_per_epoch()):
            batch = order[b * self.global_batch:(b + 1) * self.global_batch]
            if self.drop_last:
                yield batch[self.rank * local:(self.rank + 1) * local]
            else:  # validation: round-robin, so every sample is seen once over all ranks
                part = batch[self.rank::self.world]
                if part:
                    yield part

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)
