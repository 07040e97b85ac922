"""The trivial twins of a generator: clip sets that a generator must beat to show learning.

- `prior`: the generator's own input noise (what a generator that passed its noise
  through unchanged would make; data-shaped noise matches the data's mean and covariance);
- `white`: independent Gaussian frames at the data's level (each channel's mean and std
  of real training clips), no structure in time or across channels;
- `shuffled`: real held-out clips with their frames shuffled in time (every frame real,
  the order gone).
Every learning figure is computed the same way for the generator and for each twin.
"""
from __future__ import annotations

import numpy as np
import torch

TWINS = ("prior", "white", "shuffled")


def white_twin(reference: torch.Tensor, n: int, frames: int, seed: int) -> torch.Tensor:
    """[n, C, frames] i.i.d. Gaussian frames with the per-channel mean and std of
    `reference` clips [B, C, T] (real training clips)."""
    ref = torch.as_tensor(np.asarray(reference, np.float32))
    mean = ref.mean(dim=(0, 2)).view(1, -1, 1)
    std = ref.std(dim=(0, 2)).view(1, -1, 1)
    gen = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, ref.shape[1], frames, generator=gen)


def shuffled_twin(real: torch.Tensor, seed: int) -> torch.Tensor:
    """Each clip of `real` [B, C, T] with its frames in a seeded random order of its own."""
    x = torch.as_tensor(np.asarray(real, np.float32))
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(x.shape[2], generator=gen) for _ in range(len(x))])
    return torch.gather(x, 2, order[:, None, :].expand_as(x))
