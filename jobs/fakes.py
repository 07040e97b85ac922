"""A generator's fakes, made the way its checkpoint's stage trained it, and the seeded picks
of real pairs and their latents they start from.

`make_fakes` is what generation, evaluation, the audit and the trainer's per-epoch samples
all use:
- continuation: noise at the pure-GAN curriculum's end point (the stage-3 generator learns
  to map `randn * std_per_sample(x)` to music), so sample i is `temperature * randn * std_i`
  with std_i the std of a seeded pick of real training inputs; or (`from_real`, the audit)
  real validation inputs seen through the curriculum's noise at the epoch's alpha;
- creative (PowerMuse): the cascade on (input, target) pairs of real latents, seeded picks
  of validation pairs or pairs chosen by the caller, both seen through the curriculum's
  noise at the checkpoint's alpha, as in training.
The same seed gives the same fakes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from jobs.load_generator import trained_as
from pipeline import run_folder as rf
from pipeline.schema import Config

SIDES = {"input": ("song", "input"), "target": ("target_song", "target")}


# --- real pairs and their latents -------------------------------------------------------

def split_pairs(run_dir: Path, split: str) -> list[dict]:
    """The pairs of pairs/<split>.jsonl; an empty file is refused (nothing to pick from)."""
    path = rf.pairs_file(run_dir, split)
    pairs = rf.read_pairs(path)
    if not pairs:
        raise ValueError(f"{path} is empty: no real pairs to pick from")
    return pairs


def pick_pairs(pairs: list[dict], n: int, seed: int, distinct: bool = False) -> list[dict]:
    """n seeded picks: a seeded permutation of `pairs`, repeated up to n, or (distinct)
    cut at n."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in (order[:n] if distinct else np.resize(order, n))]


def pair_latents(run_dir: Path, pairs: list[dict],
                 sides: tuple[str, ...] = ("input", "target")) -> list[torch.Tensor]:
    """Clean latents [n, C, T] float32 of the pairs' inputs and/or targets (`sides`)."""
    from data_prep.latent_store import LatentStore

    store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))

    def stack(song_key: str, chunk_key: str) -> torch.Tensor:
        try:
            return torch.stack([torch.from_numpy(np.asarray(
                store.get(p[song_key], int(p[chunk_key])), np.float32)) for p in pairs])
        except (KeyError, IndexError) as exc:
            raise ValueError(f"{exc.args[0] if exc.args else exc}") from None
    return [stack(*SIDES[side]) for side in sides]


def pair_name(pair: dict) -> str:
    """The pair as 'song#input x target_song#target'."""
    return f"{pair['song']}#{pair['input']} x {pair['target_song']}#{pair['target']}"


# --- noise ------------------------------------------------------------------------------

def reference_stds(run_dir: Path, n: int, seed: int) -> torch.Tensor:
    """Per-sample std of n seeded picks of real training inputs: the curriculum's noise scale."""
    picks = pick_pairs(split_pairs(run_dir, "train"), n, seed)
    inputs, = pair_latents(run_dir, picks, ("input",))
    return inputs.flatten(1).std(dim=1, correction=0)


def make_noise(stds: torch.Tensor, latent_dim: int, frames: int, temperature: float,
               seed: int) -> torch.Tensor:
    """[n, latent_dim, frames] = temperature * randn * std_i, from a private seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(stds), latent_dim, frames, generator=gen)
    return noise * stds.view(-1, 1, 1) * temperature


def data_noise(stats: tuple[torch.Tensor, ...], n: int, frames: int, temperature: float,
               seed: int) -> torch.Tensor:
    """[n, C, frames]: the curriculum's "data" noise at alpha 1 (jobs.curriculum.mix_noise)
    with both spreads scaled by the temperature, from a private seeded generator."""
    from jobs.curriculum import mix_noise

    mean, song_sqrt, frame_sqrt = (s.detach().float().cpu() for s in stats)
    gen = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(n, len(mean), frames)
    return mix_noise(zeros, 1.0, gen, (mean, temperature * song_sqrt, temperature * frame_sqrt))



# --- fakes ------------------------------------------------------------------------------

@dataclass
class Fakes:
    """A generator's fakes and how they were made (see make_fakes)."""
    latents: torch.Tensor                       # [n, C, T] float32, CPU
    titles: list[str]
    mode: str                                   # "continuation" or "creative"
    alpha: float                                # curriculum noise share of the views (0 = clean)
    source: str                                 # "noise" or "pairs"
    pairs: list[dict] = field(default_factory=list)   # the real pairs used (source "pairs")
    targets: Optional[torch.Tensor] = None      # their clean targets [n, C, T]
    masks: Optional[tuple[torch.Tensor, torch.Tensor]] = None   # creative (m_in, m_tgt)


@torch.no_grad()
def make_fakes(generator: torch.nn.Module, cfg: Config, run_dir: Path, stage: str, epoch: int,
               n: int, seed: int, temperature: float = 1.0, pairs: Optional[list[dict]] = None,
               alpha: Optional[float] = None, from_real: bool = False) -> Fakes:
    """n fakes made the way `stage` of `cfg` trained the generator at `epoch`.

    creative: the cascade on real (input, target) pairs (`pairs`, else n seeded picks of
    validation pairs), both seen through the curriculum's noise at that epoch's alpha.
    continuation: temperature-scaled noise (generation), or with `from_real` the pairs'
    inputs through the curriculum's noise. `alpha` overrides the schedule's. Eval mode,
    the caller's RNG and training flag untouched; `seed` fixes the picks and the noise.
    """
    from jobs.curriculum import mix_noise

    mode, scheduled = trained_as(cfg, stage, epoch)
    alpha = scheduled if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    model = getattr(generator, "module", generator)
    device = next(model.parameters()).device
    use_pairs = mode == "creative" or from_real or pairs is not None
    if mode == "continuation" and pairs is not None and not from_real:
        raise ValueError(f"{stage} trained the generator in continuation mode: it has no "
                         "cascade to run on (input, target) pairs (a creative stage has)")
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            stats = model.noise_stats(getattr(cfg, stage).curriculum.noise)
            if not use_pairs:
                manifest = rf.read_encode_manifest(run_dir)
                if stats is None:
                    noise = make_noise(reference_stds(run_dir, n, seed), manifest["latent_dim"],
                                       manifest["frames"], temperature, seed)
                else:
                    noise = data_noise(stats, n, manifest["frames"], temperature, seed)
                latents = model.generate(noise.to(device)).float().cpu()
                titles = [f"sample {i} (seed {seed}, T={temperature:g}, {stage} epoch {epoch})"
                          for i in range(n)]
                return Fakes(latents, titles, mode, 1.0, "noise")
            pairs = (list(pairs) if pairs is not None
                     else pick_pairs(split_pairs(run_dir, "val"), n, seed))
            inputs, targets = pair_latents(run_dir, pairs)
            gen = torch.Generator().manual_seed(seed)
            in_view = mix_noise(inputs, alpha, gen, stats)
            tgt_view = mix_noise(targets, alpha, gen, stats)
            # in the noise regime (alpha > 0) draw the VAE latents, as training did
            out = model(in_view.to(device), tgt_view.to(device), mode, sample=alpha > 0)
    finally:
        model.train(was_training)
    latents = out["output"].float().cpu()
    if mode == "creative":
        masks = (out["mask_in"].float().cpu(), out["mask_tgt"].float().cpu())
        titles = [f"{pair_name(p)} (creative, alpha {alpha:g}, {stage} epoch {epoch})"
                  for p in pairs]
        return Fakes(latents, titles, mode, alpha, "pairs", pairs, targets, masks)
    titles = [f"continuation of {p['song']}#{p['input']} (alpha {alpha:g}, {stage} epoch "
              f"{epoch})" for p in pairs]
    return Fakes(latents, titles, mode, alpha, "pairs", pairs, targets)
