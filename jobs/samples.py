"""Fakes as files: decoded through the codec the run was encoded with (EnCodec's decoder, or
Griffin-Lim for the mel codec) into WAVs, with spectrogram (and creative mask) PNGs; and
the trainer's per-epoch samples, logged to MLflow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.fakes import Fakes, make_fakes
from pipeline import run_folder as rf
from pipeline.atomic import atomic_path
from pipeline.codec_facts import MismatchError
from pipeline.schema import Config


def run_codec(cfg: Config, manifest: dict):
    """The codec the run's data was encoded with, checked against the manifest."""
    from data_prep.codecs import load_codec

    codec = load_codec(cfg.encode, manifest["sample_rate"], cfg.encode.device,
                       seed=cfg.run.seed, griffin_lim_iters=cfg.generate.griffin_lim_iters)
    described = codec.describe()
    for key in ("codec", "weights_sha256"):
        if manifest.get(key) is not None and described.get(key) != manifest.get(key):
            raise MismatchError(f"the codec built from the config ({key} {described.get(key)!r}) "
                                f"is not the one that encoded this run ({manifest.get(key)!r})")
    return codec


def write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> float:
    """Write mono 16-bit WAV atomically; louder-than-full-scale audio is scaled down.

    Returns the gain applied (1.0 when the audio already fit)."""
    import soundfile as sf

    wave = np.asarray(wave, np.float32).reshape(-1)
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"{path}: decoded audio has non-finite values")
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    gain = 1.0 / peak if peak > 1.0 else 1.0
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wave * gain, sample_rate, format="WAV", subtype="PCM_16")
    return gain


def write_spectrogram(path: Path, latents: np.ndarray, frame_rate: int, title: str,
                      codec_name: str) -> None:
    """PNG of a [128, T] latent chunk (log-mel bins for the mel codec) against time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    frames = latents.shape[-1]
    im = ax.imshow(latents, origin="lower", aspect="auto", cmap="magma",
                   extent=(0, frames / frame_rate, 0, latents.shape[0]))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("log-mel bin" if codec_name == "mel" else f"{codec_name} latent channel")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def write_masks(path: Path, m_in: np.ndarray, m_tgt: np.ndarray, frame_rate: int,
                title: str) -> None:
    """PNG of a creative sample's input and target masks [C, T] (0..1) against time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
    frames = m_in.shape[-1]
    for ax, mask, name in ((axes[0], m_in, "input mask m_in"),
                           (axes[1], m_tgt, "target mask m_tgt")):
        im = ax.imshow(mask, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       extent=(0, frames / frame_rate, 0, mask.shape[0]))
        ax.set(xlabel="time (s)", title=f"{name} (mean {mask.mean():.2f})")
    axes[0].set_ylabel("latent channel")
    fig.colorbar(im, ax=axes.tolist())
    fig.suptitle(f"{title}; complementarity {1.0 - float((m_in * m_tgt).mean()):.2f}",
                 fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def write_samples(out_dir: Path, fakes: Fakes, waves: torch.Tensor, sample_rate: int,
                  frame_rate: int, codec_name: str, prefix: str = "") -> list[dict]:
    """sample_<i>.wav, sample_<i>.png (and creative masks_<i>.png) per fake; one record each."""
    records = []
    for i, title in enumerate(fakes.titles):
        title = prefix + title
        files = rf.sample_files(out_dir, i)
        wav, png = files["wav"], files["png"]
        gain = write_wav(wav, waves[i].cpu().numpy(), sample_rate)
        write_spectrogram(png, fakes.latents[i].numpy(), frame_rate, title, codec_name)
        record = {"wav": str(wav), "png": str(png), "samples": int(waves[i].shape[-1]),
                  "gain": gain, "title": title}
        if fakes.pairs:
            record["pair"] = dict(fakes.pairs[i])
        if fakes.masks is not None:
            m_in, m_tgt = (m[i].numpy() for m in fakes.masks)
            record["masks"] = str(files["masks"])
            write_masks(Path(record["masks"]), m_in, m_tgt, frame_rate, title)
            record |= {"mask_in_mean": float(m_in.mean()), "mask_tgt_mean": float(m_tgt.mean()),
                       "complementarity": 1.0 - float((m_in * m_tgt).mean())}
        records.append(record)
    return records


def log_samples(cfg: Config, run_dir: Path, generator: torch.nn.Module, epoch: int,
                tracker: Any, stage: str = "stage3") -> None:
    """Log generate.n samples (audio, spectrogram, creative masks) under samples/epoch_<n>/.

    Made by make_fakes as `stage` trains at `epoch`, with generate.seed every time, so
    epochs are compared on the same noise and pairs; the trainer's RNG state is left
    untouched. Files go to a temporary folder and are kept in the MLflow artifact store."""
    import tempfile

    run_dir = Path(run_dir)
    manifest = rf.read_encode_manifest(run_dir)
    codec = run_codec(cfg, manifest)
    fakes = make_fakes(generator, cfg, run_dir, stage, epoch, cfg.generate.n, cfg.generate.seed,
                       cfg.generate.temperature)
    waves = codec.decode(fakes.latents).float()
    with tempfile.TemporaryDirectory(prefix="samples-") as tmp:
        for record in write_samples(Path(tmp), fakes, waves.cpu(), codec.sample_rate,
                                    manifest["frame_rate"], manifest["codec"],
                                    prefix=f"epoch {epoch}: "):
            for key in ("wav", "png", "masks"):
                if key in record:
                    tracker.log_artifact(record[key], f"samples/epoch_{epoch}")
