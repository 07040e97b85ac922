"""Evaluation: how close generated latents and audio are to held-out real music.

Numbers (all written to run_dir/evaluate/metrics.json and logged to MLflow):
- Fréchet distance between per-frame latent statistics (every frame's 128-vector is one
  sample; a Gaussian is fitted to each set), with the distance between the training and
  the held-out real latents as the reference scale;
- diversity: mean pairwise distance of generated samples over that of real ones (a ratio
  near 0 is mode collapse);
- spectral flatness and RMS of the decoded audio, generated against real (the real
  latents go through the same codec, so codec artefacts are on both sides).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.schema import Config

TINY = 1e-12   # keeps logs finite on digital silence


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
    """Up to n distinct seeded picks of target chunks of a split: [n, 128, T] float32."""
    from data_prep.latent_store import LatentStore
    from jobs.pair_data import read_pairs

    pairs = read_pairs(Path(run_dir) / "pairs" / f"{split}.jsonl")
    if len(pairs) < 2:
        raise ValueError(f"{run_dir}/pairs/{split}.jsonl has {len(pairs)} pairs; need at least 2")
    store = LatentStore(Path(run_dir) / "encode")
    picks = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return torch.stack([torch.from_numpy(np.asarray(
        store.get(pairs[i]["target_song"], pairs[i]["target"]), np.float32)) for i in picks])


def compare(generated: torch.Tensor, real: torch.Tensor, reference: torch.Tensor,
            gen_audio: torch.Tensor, real_audio: torch.Tensor, fft_size: int) -> dict:
    """All evaluation numbers for generated latents/audio against real held-out ones.

    `reference` is a second real set (training chunks): its distance to the held-out set is
    the scale a good generator's Fréchet distance should approach."""
    fd = frechet_distance(frames_of(generated), frames_of(real))
    fd_ref = frechet_distance(frames_of(reference), frames_of(real))
    return {
        "frechet_generated_vs_real": fd,
        "frechet_train_vs_real": fd_ref,
        "frechet_ratio": fd / fd_ref if fd_ref > 0 else float("inf"),
        "diversity_generated": diversity(generated),
        "diversity_real": diversity(real),
        "diversity_ratio": diversity_ratio(generated, real),
        "flatness_generated": spectral_flatness(gen_audio, fft_size),
        "flatness_real": spectral_flatness(real_audio, fft_size),
        "rms_db_generated": rms_db(gen_audio),
        "rms_db_real": rms_db(real_audio),
    }


def run(cfg: Config, run_dir: Path) -> dict:
    """Evaluate the configured checkpoint against held-out real data; write metrics.json."""
    from jobs.generate import (default_checkpoint, load_generator, make_noise, read_manifest,
                               reference_stds, run_codec, synthesize)
    from pipeline.atomic import atomic_write_json
    from pipeline.tracking import step_run

    run_dir = Path(run_dir)
    ev = cfg.evaluate
    path = default_checkpoint(run_dir, ev.checkpoint)
    manifest = read_manifest(run_dir)
    generator, state = load_generator(path, manifest)
    real = real_latents(run_dir, "val", ev.n, ev.seed)
    reference = real_latents(run_dir, "train", ev.n, ev.seed)
    noise = make_noise(reference_stds(run_dir, ev.n, ev.seed), manifest["latent_dim"],
                       manifest["frames"], cfg.generate.temperature, ev.seed)
    generated = synthesize(generator, noise)
    codec = run_codec(cfg, manifest)
    metrics = compare(generated, real, reference, codec.decode(generated), codec.decode(real),
                      ev.fft_size)
    result = {"checkpoint": str(path), "epoch": state.get("epoch"), "codec": manifest["codec"],
              "pretrained": manifest.get("pretrained"), "n_generated": len(generated),
              "n_real": len(real), "seed": ev.seed, "metrics": metrics}
    out = run_dir / "evaluate" / "metrics.json"
    atomic_write_json(out, result)
    with step_run(cfg, run_dir, "evaluate") as tracker:
        tracker.log_params({"checkpoint": str(path), "epoch": state.get("epoch"),
                            "n_generated": len(generated), "n_real": len(real), "seed": ev.seed})
        tracker.log_metrics(metrics)
        tracker.log_artifact(out, "evaluate")
    return result


def main(argv: list[str] | None = None) -> int:
    from jobs.generate import MismatchError, load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder, e.g. runs/demo")
    args = parser.parse_args(argv)
    cfg, run_dir = load_run(args.run)
    try:
        result = run(cfg, run_dir)
    except (MismatchError, FileNotFoundError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result["metrics"], indent=2))
    print(f"wrote {run_dir / 'evaluate' / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
