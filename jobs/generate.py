"""Generation: noise (or a real start chunk) -> generator -> latents -> audio, as WAV + PNG.

Noise follows the pure-GAN curriculum's end point: the stage-3 generator learns to map
`randn * std_per_sample(x)` to music, so sample i is `temperature * randn * std_i`, where
std_i is the per-sample std of a seeded pick of real training inputs. The same seed gives
the same files. Latents go back to audio through the codec the data was encoded with
(EnCodec's decoder, or Griffin-Lim for the mel codec); a checkpoint made for another codec
or latent shape is refused with the reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from jobs import checkpoint as ckpt_io
from pipeline import config as config_mod
from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.schema import Config

log = logging.getLogger(__name__)

# Codec facts a checkpoint and the run's encode manifest must agree on.
CODEC_KEYS = ("codec", "sample_rate", "frame_rate", "latent_dim", "frames", "kind",
              "weights_sha256")


class MismatchError(ValueError):
    """A checkpoint that does not fit this run's encoded data."""


# --- checkpoints and codec ------------------------------------------------------------

def default_checkpoint(run_dir: Path, configured: str = "") -> Path:
    """The configured checkpoint path, else the run's final stage-3 generator (last.pt).

    Not best.pt: under the pure-GAN curriculum the validation loss (clean inputs) rises as
    alpha grows, so best.pt is usually a pre-curriculum continuation model, while the
    generator that maps noise to music is the last one."""
    return Path(configured) if configured else Path(run_dir) / "stage3" / "last.pt"


def read_manifest(run_dir: Path) -> dict:
    """The encode step's manifest (codec, sample rate, latent_dim, frames, ...)."""
    path = Path(run_dir) / "encode" / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"encode manifest not found: {path} (run the encode step first)")
    return json.loads(path.read_text())


def check_compatible(state: dict, manifest: dict, path: Path) -> None:
    """Refuse a checkpoint whose codec or latent shape differs from the run's encoded data."""
    codec = state.get("codec")
    if not isinstance(codec, dict):
        raise MismatchError(f"{path}: checkpoint records no codec description, so it cannot "
                            "be matched to this run's encoded data")
    problems = [f"{key}: checkpoint {codec[key]!r} vs run {manifest[key]!r}"
                for key in CODEC_KEYS
                if key in codec and key in manifest and codec[key] != manifest[key]]
    if problems:
        raise MismatchError(f"refusing {path}: it was trained on other latents than this run's "
                            f"encode/manifest.json ({'; '.join(problems)})")


def model_config(state: dict, path: Path) -> Config:
    """The resolved config stored in a checkpoint (the architecture the weights belong to)."""
    try:
        return config_mod.from_dict(state["config"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: stored config is unusable ({exc})") from exc


def load_generator(path: Path, manifest: dict):
    """Read checkpoint `path`, check it against the manifest, rebuild its generator (eval mode)."""
    from jobs.generator import build_generator

    state = ckpt_io.load(path)
    check_compatible(state, manifest, path)
    cfg = model_config(state, path)
    if cfg.model.transformer.latent_dim != manifest.get("latent_dim"):
        raise MismatchError(f"refusing {path}: generator latent_dim "
                            f"{cfg.model.transformer.latent_dim} vs run "
                            f"{manifest.get('latent_dim')}")
    generator = build_generator(cfg, state["parts"])
    try:
        generator.load_state_dict(state["generator"])
    except RuntimeError as exc:
        raise MismatchError(f"refusing {path}: generator weights do not fit the stored "
                            f"config ({str(exc).splitlines()[0]})") from exc
    return generator.eval(), state


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


# --- noise and latents ----------------------------------------------------------------

def reference_stds(run_dir: Path, n: int, seed: int) -> torch.Tensor:
    """Per-sample std of n seeded picks of real training inputs: the curriculum's noise scale."""
    from data_prep.latent_store import LatentStore
    from jobs.pair_data import read_pairs

    pairs = read_pairs(Path(run_dir) / "pairs" / "train.jsonl")
    if not pairs:
        raise ValueError(f"{run_dir}/pairs/train.jsonl is empty: no real latents to scale noise by")
    store = LatentStore(Path(run_dir) / "encode")
    picks = np.random.default_rng(seed).integers(0, len(pairs), n)
    chunks = [np.asarray(store.get(pairs[i]["song"], pairs[i]["input"]), np.float32) for i in picks]
    return torch.tensor([c.std() for c in chunks])


def make_noise(stds: torch.Tensor, latent_dim: int, frames: int, temperature: float,
               seed: int) -> torch.Tensor:
    """[n, latent_dim, frames] = temperature * randn * std_i, from a private seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(stds), latent_dim, frames, generator=gen)
    return noise * stds.view(-1, 1, 1) * temperature


def start_chunks(run_dir: Path, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n seeded picks of validation input chunks (for continuation) and their names."""
    from data_prep.latent_store import LatentStore
    from jobs.pair_data import read_pairs

    pairs = read_pairs(Path(run_dir) / "pairs" / "val.jsonl")
    if not pairs:
        raise ValueError(f"{run_dir}/pairs/val.jsonl is empty: no start chunks to continue")
    store = LatentStore(Path(run_dir) / "encode")
    picks = np.random.default_rng(seed).integers(0, len(pairs), n)
    chunks = [torch.from_numpy(np.asarray(store.get(pairs[i]["song"], pairs[i]["input"]),
                                          np.float32)) for i in picks]
    names = [f"{pairs[i]['song']}#{pairs[i]['input']}" for i in picks]
    return torch.stack(chunks), names


@torch.no_grad()
def synthesize(generator: torch.nn.Module, noise: torch.Tensor) -> torch.Tensor:
    """Noise -> latents with the generator in eval mode; its training flag is restored."""
    model = getattr(generator, "module", generator)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            return model.generate(noise).float()
    finally:
        model.train(was_training)


@torch.no_grad()
def continue_from(generator: torch.nn.Module, starts: torch.Tensor) -> torch.Tensor:
    """Start chunks -> predicted continuation chunks (continuation mode, eval)."""
    model = getattr(generator, "module", generator)
    was_training = model.training
    model.eval()
    try:
        return model(starts, None, "continuation")["output"].float()
    finally:
        model.train(was_training)


# --- files ------------------------------------------------------------------------------

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


def write_samples(out_dir: Path, latents: torch.Tensor, waves: torch.Tensor, sample_rate: int,
                  frame_rate: int, codec_name: str, titles: list[str]) -> list[dict]:
    """sample_<i>.wav and sample_<i>.png for every item; returns one record per sample."""
    records = []
    for i, title in enumerate(titles):
        wav, png = out_dir / f"sample_{i}.wav", out_dir / f"sample_{i}.png"
        gain = write_wav(wav, waves[i].cpu().numpy(), sample_rate)
        write_spectrogram(png, latents[i].cpu().numpy(), frame_rate, title, codec_name)
        records.append({"wav": str(wav), "png": str(png), "samples": int(waves[i].shape[-1]),
                        "gain": gain, "title": title})
    return records


# --- entry points -----------------------------------------------------------------------

def run(cfg: Config, run_dir: Path, checkpoint: Optional[Path] = None, n: Optional[int] = None,
        temperature: Optional[float] = None, seed: Optional[int] = None,
        out_dir: Optional[Path] = None, start_chunk: bool = False) -> dict:
    """Generate n samples from a checkpoint into out_dir (default run_dir/generate)."""
    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else default_checkpoint(run_dir, cfg.generate.checkpoint)
    n = cfg.generate.n if n is None else n
    temperature = cfg.generate.temperature if temperature is None else temperature
    seed = cfg.generate.seed if seed is None else seed
    if n < 1 or temperature <= 0:
        raise ValueError(f"generate: n must be >= 1 and temperature > 0, got n={n}, "
                         f"temperature={temperature}")
    out_dir = Path(out_dir) if out_dir else run_dir / "generate"
    manifest = read_manifest(run_dir)
    generator, state = load_generator(path, manifest)
    codec = run_codec(cfg, manifest)
    if start_chunk:
        starts, names = start_chunks(run_dir, n, seed)
        latents = continue_from(generator, starts)
        titles = [f"continuation of {name}" for name in names]
    else:
        noise = make_noise(reference_stds(run_dir, n, seed), manifest["latent_dim"],
                           manifest["frames"], temperature, seed)
        latents = synthesize(generator, noise)
        titles = [f"sample {i} (seed {seed}, T={temperature:g}, epoch {state.get('epoch')})"
                  for i in range(n)]
    waves = codec.decode(latents).float()
    records = write_samples(out_dir, latents, waves, codec.sample_rate, manifest["frame_rate"],
                            manifest["codec"], titles)
    result = {"checkpoint": str(path), "epoch": state.get("epoch"), "n": n, "seed": seed,
              "temperature": temperature, "start_chunk": start_chunk,
              "sample_rate": codec.sample_rate, "codec": manifest["codec"],
              "out_dir": str(out_dir), "samples": records}
    atomic_write_json(out_dir / "generate.json", result)
    return result


def log_samples(cfg: Config, run_dir: Path, generator: torch.nn.Module, epoch: int,
                tracker: Any) -> None:
    """Log generate.n samples (audio + spectrogram) under samples/epoch_<n>/ in MLflow.

    The noise uses generate.seed every time, so epochs are compared on the same inputs;
    the trainer's RNG state is left untouched. The files are written to a temporary folder
    (any stage may call this) and kept in the MLflow artifact store."""
    import tempfile

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    codec = run_codec(cfg, manifest)
    seed = cfg.generate.seed
    noise = make_noise(reference_stds(run_dir, cfg.generate.n, seed), manifest["latent_dim"],
                       manifest["frames"], cfg.generate.temperature, seed)
    latents = synthesize(generator, noise.to(next(generator.parameters()).device))
    waves = codec.decode(latents).float()
    titles = [f"epoch {epoch} sample {i}" for i in range(len(noise))]
    with tempfile.TemporaryDirectory(prefix="samples-") as tmp:
        for record in write_samples(Path(tmp), latents.cpu(), waves.cpu(), codec.sample_rate,
                                    manifest["frame_rate"], manifest["codec"], titles):
            tracker.log_artifact(record["wav"], f"samples/epoch_{epoch}")
            tracker.log_artifact(record["png"], f"samples/epoch_{epoch}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder (default runs/<run.name> of defaults)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--start-chunk", action="store_true",
                        help="continue seeded validation chunks instead of starting from noise")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <run>/generate)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg, run_dir = load_run(args.run)
    try:
        result = run(cfg, run_dir, args.checkpoint, args.n, args.temperature, args.seed,
                     args.out, args.start_chunk)
    except (MismatchError, FileNotFoundError, ValueError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(result['samples'])} samples ({result['sample_rate']} Hz) to {result['out_dir']}")
    return 0


def load_run(run: Optional[str]) -> tuple[Config, Path]:
    """Config and folder of a run: run_dir/config.resolved.yaml (default run: runs/<run.name>)."""
    if run is None:
        base = config_mod.load()
        run = str(Path(base.run.root) / base.run.name)
    run_dir = Path(run)
    path = run_dir / "config.resolved.yaml"
    if not path.exists():
        runs = sorted(str(p.parent) for p in run_dir.parent.glob("*/config.resolved.yaml"))
        raise SystemExit(f"no resolved config at {path}: pass --run <run folder>"
                         + (f" (run folders here: {', '.join(runs)})" if runs else ""))
    return config_mod.load_resolved(run_dir), run_dir


if __name__ == "__main__":
    sys.exit(main())
