"""Channel statistics of a stage's clean training latents (the shape of the curriculum's
data noise and of generation's noise; saved in the generator's buffers)."""
from __future__ import annotations

import torch

from jobs import distributed
from jobs.pair_data import PairDataset


@torch.no_grad()
def latent_stats(train_set: PairDataset, info: distributed.DistInfo,
                 dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel statistics of the clean training targets over every rank's share, on the
    rank's device: the mean [dim], and square roots [dim, dim] of two covariances: of the
    chunks' time-means across chunks (how songs differ) and of the frames around their
    chunk's mean (how a song moves). Full matrices keep which bins move together."""
    sums = torch.zeros(2 * dim * dim + 2 * dim, dtype=torch.float64)
    chunks, frames = 0.0, 0.0
    clean = PairDataset(train_set.store, train_set.pairs)   # never augmented
    for i in range(info.rank, len(clean), info.world_size):
        _, tgt = clean[i]
        if not torch.isfinite(tgt).all():   # left out here; the loss stops training on it
            continue
        x = tgt.double()
        mean = x.mean(dim=1)
        centred = x - mean[:, None]
        sums += torch.cat([mean, torch.zeros(dim, dtype=torch.float64),
                           torch.outer(mean, mean).flatten(), (centred @ centred.T).flatten()])
        chunks, frames = chunks + 1, frames + x.shape[1]
    total = torch.tensor(distributed.all_reduce_sum(sums.tolist() + [chunks, frames], info),
                         dtype=torch.float64)
    n, m = max(float(total[-2]), 1.0), max(float(total[-1]), 1.0)
    mean = total[:dim] / n
    song_cov = total[2 * dim:2 * dim + dim * dim].view(dim, dim) / n - torch.outer(mean, mean)
    frame_cov = total[2 * dim + dim * dim:-2].view(dim, dim) / m
    return tuple(t.float().to(info.device) for t in (mean, psd_sqrt(song_cov), psd_sqrt(frame_cov)))


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a covariance matrix (negative round-off eigenvalues as 0)."""
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T
