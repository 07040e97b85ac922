"""A fresh-classifier two-sample test (Lopez-Paz and Oquab 2017) on whole latent clips.

A small conv net, trained from scratch, learns to tell real clips from generated ones;
its accuracy on clips it did not train on (k-fold, balanced classes) says how far apart
the two sets are: 0.5 = indistinguishable, 1.0 = told apart every time. Unlike per-frame
figures it sees order in time: a local conv sees frame-to-frame steps, strided convs
after 4x pooling see about 3.3 s (beats and bars at 75 frames/s), and the pooled mean
and spread over time see the clip's level and movement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

WIDTH = 16
POOL = 4
STRIDED = 4          # conv layers of kernel 5, stride 2 after the pooling: ~61 pooled frames seen


@dataclass(frozen=True)
class TwoSampleConfig:
    """How the classifier is trained and tested: folds, optimizer steps, batch, lr."""
    folds: int = 4
    steps: int = 100
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-3


class ClipClassifier(nn.Module):
    """`models` independent classifiers run side by side as grouped convs (one per fold, so a
    k-fold test costs one training loop): clips [B, models * C, T], block j for model j ->
    logits [B, models]. Each: 1x1 projection, a local conv, 4x pooling, strided convs
    (kernel 5, stride 2); the mean and std over time of the local features (full frame
    rate) and of the deep ones go into a linear head."""

    def __init__(self, channels: int, models: int = 1, width: int = WIDTH):
        super().__init__()
        g, w = models, width * models
        self.models, self.width = models, width
        self.proj = nn.Conv1d(channels * g, w, 1, groups=g)
        self.local = nn.Conv1d(w, w, 3, padding=1, groups=g)
        self.stack = nn.ModuleList(nn.Conv1d(w, w, 5, stride=2, padding=2, groups=g)
                                   for _ in range(STRIDED))
        self.head = nn.Conv1d(4 * w, g, 1, groups=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.local(F.gelu(self.proj(x))))
        local = h
        h = F.avg_pool1d(h, POOL, ceil_mode=True)
        for conv in self.stack:
            h = F.gelu(conv(h))
        b, g, w = len(h), self.models, self.width
        pooled = torch.cat([f(x).view(b, g, w) for x in (local, h)
                            for f in (lambda t: t.mean(-1), lambda t: t.std(-1))], dim=2)
        return self.head(pooled.reshape(b, 4 * g * w, 1)).squeeze(-1)


def fold_ids(n: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded fold number in 0..folds-1 for each of n items, as even as it goes."""
    return rng.permutation(np.arange(n) % folds)


def fold_views(x: torch.Tensor, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Clips [N, C, T] -> [N, k * C, T]: block j normalised by fold j's training statistics."""
    return torch.cat([(x - mean) / std for mean, std in stats], dim=1)


def two_sample_test(real: np.ndarray | torch.Tensor, other: np.ndarray | torch.Tensor,
                    seed: int = 0, cfg: TwoSampleConfig = TwoSampleConfig()) -> dict[str, float]:
    """Held-out accuracy of fresh classifiers telling `real` [N, C, T] from `other`
    [M, C, T]: k-fold over min(N, M) clips a side; accuracy (all held-out clips), its
    spread over the folds (std) and the clips per side."""
    a = torch.as_tensor(np.asarray(real, np.float32))
    b = torch.as_tensor(np.asarray(other, np.float32))
    if a.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"two_sample_test: need clips [N, C, T] of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    rng = np.random.default_rng(seed)
    n, k = min(len(a), len(b)), cfg.folds
    if n < 2 * k:
        raise ValueError(f"two_sample_test: {n} clips a side is too few for {k} folds "
                         f"(need {2 * k})")
    a, b = a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]
    x, y = torch.cat([a, b]), torch.cat([torch.ones(n), torch.zeros(n)])
    folds = torch.as_tensor(np.concatenate([fold_ids(n, k, rng), fold_ids(n, k, rng)]))
    train = [torch.nonzero(folds != j).squeeze(1) for j in range(k)]
    stats = [(x[t].mean(dim=(0, 2), keepdim=True), x[t].std(dim=(0, 2), keepdim=True)
              .clamp_min(1e-6)) for t in train]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClipClassifier(x.shape[1], models=k)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        batch = min(cfg.batch, min(len(t) for t in train))
        for _ in range(cfg.steps):   # fold j's model sees a batch of fold j's training clips
            idx = [t[torch.randperm(len(t), generator=gen)[:batch]] for t in train]
            views = torch.cat([(x[i] - m) / s for i, (m, s) in zip(idx, stats)], dim=1)
            labels = torch.stack([y[i] for i in idx], dim=1)
            loss = F.binary_cross_entropy_with_logits(model(views), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            guess = model.eval()(fold_views(x, stats)) > 0          # [2n, k]
    mine = guess[torch.arange(2 * n), folds].float()                # each clip by its own fold
    hits = (mine == y).float()
    per_fold = [float(hits[folds == j].mean()) for j in range(k)]
    return {"accuracy": float(hits.mean()), "accuracy_std": float(np.std(per_fold)),
            "clips_per_side": float(n)}
