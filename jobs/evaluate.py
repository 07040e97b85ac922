"""Evaluation: how close generated latents and audio are to held-out real music.

Numbers (all written to run_dir/evaluate/metrics.json and logged to MLflow):
- Fréchet distance between per-frame latent statistics (every frame's 128-vector is one
  sample; a Gaussian is fitted to each set), with the distance between the training and
  the held-out real latents as the reference scale;
- diversity: mean pairwise distance of generated samples over that of real ones (a ratio
  near 0 is mode collapse);
- precision, recall, density and coverage of generated frames against held-out real ones
  (k-nearest-neighbour balls, Kynkaanniemi et al. 2019, Naeem et al. 2020), with training
  music against held-out music as the reference: recall and coverage fall to ~0 for a
  collapsed generator, which the Frechet distance alone can reward;
- spectral flatness and RMS of the decoded audio, generated against real (the real
  latents go through the same codec, so codec artefacts are on both sides).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import run_folder as rf
from pipeline.schema import Config

TINY = 1e-12   # keeps logs finite on digital silence
AUDIO_CLIPS = 16     # clips per set decoded for loudness and flatness (decoding dominates the cost)
NEIGHBOURS = 5       # k of the k-NN balls (Naeem et al. 2020 recommend 5)
MAX_FRAMES = 2000    # frames per set for the k-NN figures (a seeded subsample; cdist is N^2)


# --- pure metrics -------------------------------------------------------------------

def frames_of(latents: np.ndarray | torch.Tensor) -> np.ndarray:
    """[B, D, T] latents -> [B*T, D] float64: every frame is one sample of the distribution."""
    x = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
    if x.ndim != 3:
        raise ValueError(f"frames_of: expected latents [B, D, T], got shape {x.shape}")
    return x.astype(np.float64).transpose(0, 2, 1).reshape(-1, x.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to samples a [N, D] and b [M, D].

    d = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).
    The cross term uses symmetric eigen-decompositions (no scipy.linalg.sqrtm), which
    stays real and stable for the rank-deficient covariances of short runs.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: need [N, D] and [M, D], got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance: need at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    d = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross
    return float(max(d, 0.0))


def diversity(x: np.ndarray | torch.Tensor) -> float:
    """Mean pairwise RMS distance between the samples of x [N, ...] (0 = all identical)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    t = t.to(torch.float64).reshape(t.shape[0], -1)
    if t.shape[0] < 2:
        raise ValueError(f"diversity: need at least 2 samples, got {t.shape[0]}")
    dist = torch.cdist(t, t) / t.shape[1] ** 0.5
    i, j = torch.triu_indices(t.shape[0], t.shape[0], offset=1)
    return float(dist[i, j].mean())


def diversity_ratio(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor) -> float:
    """diversity(generated) / diversity(real): ~1 = as varied as the data, ~0 = mode collapse."""
    ref = diversity(real)
    if ref == 0:
        raise ValueError("diversity_ratio: the real samples are all identical")
    return diversity(generated) / ref


def spread_sums(x: np.ndarray | torch.Tensor) -> tuple[float, torch.Tensor, float]:
    """(count, per-element sum, sum of squares) of samples x [N, ...] in float64: sums that
    add over batches and ranks, from which `rms_pairwise_distance` gets the set's spread."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach())
    t = t.to(torch.float64).reshape(t.shape[0], -1)
    return float(t.shape[0]), t.sum(0), float(t.pow(2).sum())


def rms_pairwise_distance(count: float, total: torch.Tensor, total_sq: float) -> float:
    """Root mean square over all pairs of the per-element RMS distance, from `spread_sums`:
    sum_{i != j} |x_i - x_j|^2 = 2 n S2 - 2 |S1|^2 over n (n - 1) pairs and F elements."""
    if count < 2:
        raise ValueError(f"rms_pairwise_distance: need at least 2 samples, got {count:g}")
    total = torch.as_tensor(total, dtype=torch.float64)
    mean_sq = (2 * count * total_sq - 2 * float(total.pow(2).sum())) / (count * (count - 1))
    return max(mean_sq / total.numel(), 0.0) ** 0.5


def knn_radii(x: np.ndarray | torch.Tensor, k: int,
              groups: np.ndarray | None = None) -> torch.Tensor:
    """Distance of each sample of x [N, D] to its k-th nearest neighbour; with `groups` [N],
    neighbours of the sample's own group (frames of one chunk) are left out."""
    t = torch.as_tensor(np.asarray(x, np.float64))
    dist = torch.cdist(t, t)
    if groups is None:
        dist.fill_diagonal_(float("inf"))
        others = len(t) - 1
    else:
        g = torch.as_tensor(np.asarray(groups))
        same = g[:, None] == g[None, :]
        dist[same] = float("inf")
        others = int((~same).sum(1).min()) if len(t) else 0
    if not 1 <= k <= others:
        raise ValueError(f"knn_radii: k = {k} neighbours, but a sample has only {others} "
                         "others (outside its own group) to choose from")
    return dist.kthvalue(k, dim=1).values


def manifold_metrics(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOURS,
                     real_groups: np.ndarray | None = None,
                     fake_groups: np.ndarray | None = None) -> dict[str, float]:
    """Precision, recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020)
    of fakes [M, D] against reals [N, D] from k-NN balls (see the README's evaluation)."""
    # precision: fakes inside some real ball; recall: reals inside some fake ball (0 when
    # the fakes collapse, their balls shrink to points); density: real balls per fake / k;
    # coverage: reals whose own ball holds a fake
    real_r = knn_radii(real, k, real_groups)
    fake_r = knn_radii(fake, k, fake_groups)
    dist = torch.cdist(torch.as_tensor(np.asarray(real, np.float64)),
                       torch.as_tensor(np.asarray(fake, np.float64)))     # [N, M]
    inside = dist <= real_r[:, None]                                      # fake j in real ball i
    return {"precision": float(inside.any(0).double().mean()),
            "recall": float((dist <= fake_r[None, :]).any(1).double().mean()),
            "density": float(inside.sum(0).double().mean()) / k,
            "coverage": float((dist.min(1).values <= real_r).double().mean())}


def sample_frames(latents: np.ndarray | torch.Tensor, max_frames: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to max_frames seeded frames of latents [B, D, T] as ([n, D], their chunk ids)."""
    frames = frames_of(latents)
    groups = np.repeat(np.arange(latents.shape[0]), latents.shape[2])
    if len(frames) > max_frames:
        keep = np.sort(np.random.default_rng(seed).choice(len(frames), max_frames, replace=False))
        frames, groups = frames[keep], groups[keep]
    return frames, groups


def chunk_manifold_metrics(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor,
                           k: int = NEIGHBOURS, max_frames: int = MAX_FRAMES,
                           seed: int = 0) -> dict[str, float]:
    """`manifold_metrics` of the frames of generated chunks [B, D, T] against real ones; a
    frame's ball ignores its own chunk (neighbours in time are near-copies of it)."""
    fake, fake_groups = sample_frames(generated, max_frames, seed)
    ref, ref_groups = sample_frames(real, max_frames, seed + 1)
    return manifold_metrics(ref, fake, k, ref_groups, fake_groups)


def spectral_flatness(wave: np.ndarray | torch.Tensor, fft_size: int) -> float:
    """Mean over STFT frames of geometric / arithmetic mean power (0 = tonal, 1 = white noise).

    `wave` is [S], [C, S] or [B, C, S]; channels and items are averaged frame-wise.
    """
    t = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave.detach().cpu())
    t = t.to(torch.float64).reshape(-1, t.shape[-1])
    if t.shape[-1] < fft_size:
        raise ValueError(f"spectral_flatness: {t.shape[-1]} samples is shorter than fft_size {fft_size}")
    spec = torch.stft(t, fft_size, hop_length=fft_size // 4, window=torch.hann_window(fft_size, dtype=t.dtype),
                      center=False, return_complex=True)
    power = spec.abs() ** 2 + TINY                          # [N, F, frames]
    flat = torch.exp(torch.log(power).mean(1)) / power.mean(1)
    return float(flat.mean())


def rms(wave: np.ndarray | torch.Tensor) -> float:
    """Root mean square level of `wave` (any shape), linear full scale."""
    t = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave.detach().cpu())
    return float(torch.sqrt((t.to(torch.float64) ** 2).mean()))


def rms_db(wave: np.ndarray | torch.Tensor) -> float:
    """RMS in dB relative to full scale."""
    return 20 * float(np.log10(rms(wave) + TINY))


# --- the step ---------------------------------------------------------------------------

def real_latents(run_dir: Path, split: str, n: int, seed: int) -> torch.Tensor:
    """Up to n seeded picks of the distinct chunks of a split's songs (every chunk a pair
    of the split reads, input or target): [n, 128, T] float32."""
    from data_prep.latent_store import LatentStore

    pairs = rf.read_pairs(rf.pairs_file(run_dir, split))
    chunks = sorted({(p["song"], int(p["input"])) for p in pairs}
                    | {(p["target_song"], int(p["target"])) for p in pairs})
    if len(chunks) < 2:
        raise ValueError(f"{rf.pairs_file(run_dir, split)} names {len(chunks)} chunks; need at "
                         "least 2")
    order = np.random.default_rng(seed).permutation(len(chunks))[:n]
    store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))
    return torch.stack([torch.from_numpy(np.asarray(store.get(*chunks[i]), np.float32))
                        for i in sorted(order)])


def frame_step(x: np.ndarray | torch.Tensor) -> float:
    """RMS change between consecutive frames of latents [B, D, T]: how much (and how
    smoothly) the music moves, which the per-frame figures cannot see (they ignore order)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    return float(t.to(torch.float64).diff(dim=-1).pow(2).mean().sqrt())


def prior_twin(generator: torch.nn.Module, model_cfg: Config, run_dir: Path, stage: str,
               fakes, n: int, frames: int, temperature: float, seed: int) -> torch.Tensor:
    """What the generator was fed for `fakes` (jobs.fakes.make_fakes with the same seed):
    its input noise, or for fakes made from real pairs (creative) the pairs' inputs."""
    from jobs.fakes import data_noise, make_noise, pair_latents, reference_stds

    if fakes.source == "pairs":
        inputs, = pair_latents(run_dir, fakes.pairs, ("input",))
        return inputs
    stats = getattr(generator, "module", generator).noise_stats(
        getattr(model_cfg, stage).curriculum.noise)
    if stats is None:
        return make_noise(reference_stds(run_dir, n, seed), fakes.latents.shape[1], frames,
                          temperature, seed)
    return data_noise(stats, n, frames, temperature, seed)


def flat_metrics(table: dict) -> dict[str, float]:
    """The table as flat MLflow metrics: the generator's figures by their own names, a
    twin's or real music's as <figure>_<set>, each pick spread as <name>_std."""
    out = {}
    for name, figures in table.items():
        suffix = "" if name == "generated" else f"_{name}"
        for key, stat in figures.items():
            out[f"{key}{suffix}"] = stat["mean"]
            if stat["picks"] > 1:
                out[f"{key}{suffix}_std"] = stat["std"]
    return out


def run(cfg: Config, run_dir: Path) -> dict:
    """Evaluate the configured checkpoint and its trivial twins against held-out real clips
    over evaluate.picks seeded picks; write metrics.json (table, flat metrics, targets).
    Fakes are made as the checkpoint's stage trained the generator (jobs.fakes.make_fakes)."""
    from jobs.fakes import make_fakes
    from jobs.figures import Reals, figure_table
    from jobs.learning_targets import judge_stage3, verdict
    from jobs.load_generator import checkpoint_origin, load_generator, model_config
    from jobs.samples import run_codec
    from jobs.twins import TWINS, shuffled_twin, white_twin
    from pipeline.atomic import atomic_write_json, atomic_write_text
    from pipeline.tracking import step_run

    run_dir = Path(run_dir)
    ev = cfg.evaluate
    path = rf.default_checkpoint(run_dir, ev.checkpoint)
    manifest = rf.read_encode_manifest(run_dir)
    generator, state = load_generator(path, manifest, ev.use_ema)
    model_cfg = model_config(state, path)
    stage, epoch = checkpoint_origin(state, path)
    codec = run_codec(cfg, manifest)
    real = real_latents(run_dir, "val", ev.n, ev.seed)
    reals = Reals(real, codec.decode(real[:AUDIO_CLIPS]), real_latents(run_dir, "train", ev.n, ev.seed),
                  float(manifest["frame_rate"]), ev.fft_size)
    temperature, frames = cfg.generate.temperature, int(manifest["frames"])
    made = {}

    def make_sets(seed: int) -> dict:
        fakes = make_fakes(generator, model_cfg, run_dir, stage, epoch, ev.n, seed, temperature)
        made.update(mode=fakes.mode, alpha=fakes.alpha, source=fakes.source)
        sets = {"generated": fakes.latents,
                "prior": prior_twin(generator, model_cfg, run_dir, stage, fakes, ev.n, frames,
                                    temperature, seed),
                "white": white_twin(reals.reference, ev.n, frames, seed),
                "shuffled": shuffled_twin(real, seed)}
        return {name: (clips, codec.decode(clips[:AUDIO_CLIPS])) for name, clips in sets.items()}

    seeds = [ev.seed + k for k in range(max(ev.picks, 1))]
    table = figure_table(make_sets, reals, seeds)
    metrics = flat_metrics(table)
    targets = {name: judge_stage3(table, name) for name in ("generated", *TWINS)}
    result = {"checkpoint": str(path), "weights": state["weights"], "epoch": state.get("epoch"),
              "codec": manifest["codec"], "pretrained": manifest.get("pretrained"),
              "n_generated": ev.n, "n_real": len(real), "n_train_reference": len(reals.reference),
              "picks": seeds, "mode": made["mode"], "alpha": made["alpha"],
              "metrics": metrics, "table": table, "targets": targets, "verdict": verdict(table)}
    out = rf.evaluate_metrics(run_dir)
    atomic_write_json(out, result)
    atomic_write_text(rf.evaluate_verdict(run_dir), verdict_text(run_dir, result))
    with step_run(cfg, run_dir, "evaluate") as tracker:
        tracker.log_params({"checkpoint": str(path), "weights": state["weights"],
                            "epoch": state.get("epoch"), "n_generated": ev.n,
                            "n_real": len(real), "seed": ev.seed, "picks": len(seeds),
                            "mode": made["mode"], "alpha": made["alpha"]})
        tracker.log_metrics(metrics)
        tracker.set_tags({"evaluate.verdict": result["verdict"]})
        tracker.log_artifact(out, "evaluate")
        tracker.log_artifact(rf.evaluate_verdict(run_dir), "evaluate")
    return result


def verdict_text(run_dir: Path, result: dict) -> str:
    """verdict.txt: the generator against its twins (jobs.verdict_table), and stage 1
    against its baselines where the run has them."""
    from jobs.gate import read_history
    from jobs.verdict_table import render, stage1_lines

    history = read_history(rf.stage_file(run_dir, "stage1", rf.METRICS))
    losses = [h["val_loss"] for h in history if isinstance(h.get("val_loss"), (int, float))]
    baselines = {k[len("val_baseline_"):]: v for k, v in
                 (rf.read_json(rf.stage_file(run_dir, "stage1", rf.BASELINES)) or {}).items()
                 if k.startswith("val_baseline_") and isinstance(v, (int, float))}
    probe = rf.read_json(rf.stage_file(run_dir, "stage1", rf.ORDER_PROBE)) or {}
    lines = [render(result), *stage1_lines(min(losses) if losses else None, baselines, probe)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.codec_facts import MismatchError
    from pipeline.config import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder, e.g. runs/demo")
    args = parser.parse_args(argv)
    cfg, run_dir = load_run(args.run)
    try:
        result = run(cfg, run_dir)
    except (MismatchError, FileNotFoundError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    print(rf.evaluate_verdict(run_dir).read_text(), end="")
    print(f"wrote {rf.evaluate_metrics(run_dir)} (every figure, its spread over the picks, "
          "and the targets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
