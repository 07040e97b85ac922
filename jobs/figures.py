"""Every learning figure of a clip set against real held-out clips, for the generator and
its trivial twins (jobs.twins), over several seeded picks.

Figures that see whole clips decide: the fresh-classifier two-sample accuracy
(jobs.two_sample), the bar-scale periodicity (jobs.periodicity), the decoded loudness
against real, and precision/recall/density/coverage on short windows of frames (a window
of 8 frames, ~0.1 s, every other frame: frames shuffled in time fall off the real
windows' manifold, where single frames would not). Per-frame figures (Fréchet, diversity,
flatness, the lag-1 step ratio) are kept beside them for reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from jobs import evaluate as ev
from jobs.periodicity import periodicity
from jobs.two_sample import two_sample_test

WINDOW = 8
BLOCKS = 4
# per set and pick; the table holds each one's mean and std over the picks
FIGURES = ("two_sample_accuracy", "two_sample_fold_std", "periodicity", "rms_db", "rms_db_diff",
           "precision", "recall", "density", "coverage", "frechet_ratio", "diversity_ratio",
           "flatness_ratio", "step_ratio")


def windows_of(latents: np.ndarray | torch.Tensor, width: int = WINDOW,
               blocks: int = BLOCKS) -> tuple[np.ndarray, np.ndarray]:
    """[B, C, T] -> ([B * (T // width), blocks * C] windows, their clip ids): every
    (width / blocks)-th frame of each window of `width` frames, side by side, so a sample
    carries short-time order (frames, not averages: a shuffled clip's windows are made of
    real frames too, but not of frames that follow one another)."""
    x = torch.as_tensor(np.asarray(latents, np.float64) if not isinstance(latents, torch.Tensor)
                        else latents.detach().cpu().to(torch.float64))
    b, c, t = x.shape
    per = t // width
    if per < 1 or width % blocks:
        raise ValueError(f"windows_of: {t} frames, window {width}, blocks {blocks}")
    w = x[:, :, :per * width].reshape(b, c, per, blocks, width // blocks)[..., 0]
    samples = w.permute(0, 2, 3, 1).reshape(b * per, blocks * c)
    return samples.numpy(), np.repeat(np.arange(b), per)


def window_manifold(fake: torch.Tensor, real: torch.Tensor, seed: int) -> dict[str, float]:
    """Precision, recall, density and coverage of the windows of fake clips against those of
    real clips; a window's k-NN ball ignores its own clip (NaN with too few clips)."""
    (f, fg), (r, rg) = windows_of(fake), windows_of(real)
    rng = np.random.default_rng(seed)
    f_keep = np.sort(rng.permutation(len(f))[:ev.MAX_FRAMES])
    r_keep = np.sort(rng.permutation(len(r))[:ev.MAX_FRAMES])
    try:
        return ev.manifold_metrics(r[r_keep], f[f_keep], ev.NEIGHBOURS, rg[r_keep], fg[f_keep])
    except ValueError:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), float("nan"))


@dataclass
class Reals:
    """The real side of every comparison: held-out clips, their audio, training clips."""
    latents: torch.Tensor          # held-out (validation songs) [N, C, T]
    audio: torch.Tensor            # held-out, decoded as generated clips are
    reference: torch.Tensor        # training clips [M, C, T]: the scale "real vs real" reaches
    frame_rate: float
    fft_size: int


def _or_nan(compute: Callable[[], dict | float]) -> dict | float:
    """A figure that the clips are too few or too short for is NaN, not an error
    (a tiny test run has clips of one second and a handful of held-out ones)."""
    try:
        return compute()
    except ValueError:
        return float("nan")


def set_figures(clips: torch.Tensor, audio: torch.Tensor, reals: Reals, seed: int) -> dict:
    """Every figure of one clip set [n, C, T] (and its decoded audio) against the reals."""
    real = reals.latents
    c2st = _or_nan(lambda: two_sample_test(real, clips, seed=seed))
    if not isinstance(c2st, dict):
        c2st = {"accuracy": c2st, "accuracy_std": c2st}
    fd_ref = ev.frechet_distance(ev.frames_of(reals.reference), ev.frames_of(real))
    fd = ev.frechet_distance(ev.frames_of(clips), ev.frames_of(real))
    flat_real = ev.spectral_flatness(reals.audio, reals.fft_size)
    rms_db = ev.rms_db(audio)
    out = {"two_sample_accuracy": c2st["accuracy"], "two_sample_fold_std": c2st["accuracy_std"],
           "periodicity": _or_nan(lambda: periodicity(clips, reals.frame_rate)),
           "rms_db": rms_db, "rms_db_diff": rms_db - ev.rms_db(reals.audio),
           "frechet_ratio": fd / fd_ref if fd_ref > 0 else float("inf"),
           "diversity_ratio": ev.diversity_ratio(clips, real),
           "flatness_ratio": ev.spectral_flatness(audio, reals.fft_size) / max(flat_real, ev.TINY),
           "step_ratio": ev.frame_step(clips) / max(ev.frame_step(real), ev.TINY)}
    return out | window_manifold(clips, real, seed)


def real_figures(reals: Reals, seed: int) -> dict:
    """What real music itself reaches: training clips against the held-out ones (the
    classifier's accuracy is then ~0.5 and the periodicity is the corpus's own)."""
    c2st = _or_nan(lambda: two_sample_test(reals.latents, reals.reference, seed=seed))
    return {"periodicity": _or_nan(lambda: periodicity(reals.latents, reals.frame_rate)),
            "rms_db": ev.rms_db(reals.audio), "rms_db_diff": 0.0,
            "two_sample_accuracy": c2st["accuracy"] if isinstance(c2st, dict) else c2st,
            **window_manifold(reals.reference, reals.latents, seed)}


def figure_table(make_sets: Callable[[int], dict[str, tuple[torch.Tensor, torch.Tensor]]],
                 reals: Reals, seeds: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {figure: {"mean", "std", "picks"}}} over the seeds: make_sets(seed) gives
    {set name: (clips, decoded audio)} for one pick; "real" is real music's own figures."""
    per_set: dict[str, list[dict]] = {}
    for seed in seeds:
        for name, (clips, audio) in make_sets(seed).items():
            per_set.setdefault(name, []).append(set_figures(clips, audio, reals, seed))
        per_set.setdefault("real", []).append(real_figures(reals, seed))
    table = {}
    for name, picks in per_set.items():
        table[name] = {}
        for key in picks[0]:
            values = np.array([p[key] for p in picks if key in p], np.float64)
            table[name][key] = {"mean": float(values.mean()), "std": float(values.std()),
                                "picks": len(values)}
    return table
