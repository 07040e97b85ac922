"""Generation: a generator's fakes -> latents -> audio, as WAV + PNG.

`make_fakes` makes a generator's fakes the way its checkpoint's stage trained it, and is
what generation, evaluation, the audit and the trainer's per-epoch samples all use:
- continuation: noise at the pure-GAN curriculum's end point (the stage-3 generator learns
  to map `randn * std_per_sample(x)` to music), so sample i is `temperature * randn * std_i`
  with std_i the std of a seeded pick of real training inputs; or (--start-chunk, the
  audit) real validation inputs seen through the curriculum's noise at the epoch's alpha;
- creative (PowerMuse): the cascade on (input, target) pairs of real latents, seeded picks
  of validation pairs or pairs chosen on the command line, both seen through the
  curriculum's noise at the checkpoint's alpha, as in training; the masks are written too.
The same seed gives the same files. Latents go back to audio through the codec the data was
encoded with (EnCodec's decoder, or Griffin-Lim for the mel codec); a checkpoint made for
another codec or latent shape is refused with the reason.

    python -m jobs.generate --run runs/demo                       # as the checkpoint was trained
    python -m jobs.generate --run runs/pm --list-pairs            # validation pairs by index
    python -m jobs.generate --run runs/pm --pair 3 --pair 7 --alpha 0
    python -m jobs.generate --run runs/pm --input-song A --input-chunk 2 --target-song B
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from jobs import checkpoint as ckpt_io
from pipeline import codec_facts
from pipeline import config as config_mod
from pipeline import run_folder as rf
from pipeline.atomic import atomic_path, atomic_write_json
from pipeline.schema import Config

log = logging.getLogger(__name__)

STAGES = rf.STAGES


MismatchError = codec_facts.MismatchError


# --- checkpoints and codec ------------------------------------------------------------

default_checkpoint = rf.default_checkpoint
read_manifest = rf.read_encode_manifest


def model_config(state: dict, path: Path) -> Config:
    """The resolved config stored in a checkpoint (the architecture the weights belong to)."""
    try:
        return config_mod.from_dict(state["config"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: stored config is unusable ({exc})") from exc


def load_generator(path: Path, manifest: dict, use_ema: bool = True):
    """Read checkpoint `path`, check it against the manifest, rebuild its generator (eval mode)
    with the EMA weights when it has them and use_ema; state["weights"] says "ema" or "raw"."""
    from jobs.generator import build_generator

    state = ckpt_io.load(path)
    codec_facts.check(manifest, state.get("codec"), str(path))
    cfg = model_config(state, path)
    if cfg.model.transformer.latent_dim != manifest.get("latent_dim"):
        raise MismatchError(f"refusing {path}: generator latent_dim "
                            f"{cfg.model.transformer.latent_dim} vs run "
                            f"{manifest.get('latent_dim')}")
    generator = build_generator(cfg, state["parts"])
    state["weights"] = "ema" if use_ema and state.get("generator_ema") else "raw"
    print(f"{path}: generator weights {state['weights']}", file=sys.stderr)
    try:
        generator.load_state_dict(state["generator_ema" if state["weights"] == "ema"
                                        else "generator"])
    except RuntimeError as exc:
        raise MismatchError(f"refusing {path}: generator weights do not fit the stored "
                            f"config ({str(exc).splitlines()[0]})") from exc
    return generator.eval(), state


def checkpoint_origin(state: dict, path: Path) -> tuple[str, int]:
    """(stage, epoch) a checkpoint was saved at. The trainer records its stage; without
    one, the checkpoint's folder name, else stage3 (the default generator)."""
    stage = state.get("stage") or (Path(path).parent.name if Path(path).parent.name in STAGES
                                   else "stage3")
    if stage not in STAGES:
        raise ValueError(f"{path}: checkpoint stage {stage!r} is not one of {STAGES}")
    return stage, int(state.get("epoch") or 0)


def trained_as(cfg: Config, stage: str, epoch: int) -> tuple[str, float]:
    """(mode, curriculum alpha) with which `stage` of `cfg` trained its generator at `epoch`."""
    from jobs.curriculum import gan_alpha

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    scfg = getattr(cfg, stage)
    return scfg.mode, gan_alpha(epoch, scfg.curriculum)


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

    pairs = read_pairs(rf.pairs_file(run_dir, "train"))
    if not pairs:
        raise ValueError(f"{rf.pairs_file(run_dir, 'train')} is empty: no real latents to scale noise by")
    store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))
    picks = np.random.default_rng(seed).integers(0, len(pairs), n)
    chunks = [np.asarray(store.get(pairs[i]["song"], pairs[i]["input"]), np.float32) for i in picks]
    return torch.tensor([c.std() for c in chunks])


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


def pick_pairs(run_dir: Path, n: int, seed: int, split: str = "val") -> list[dict]:
    """n seeded picks of a split's pairs: a seeded permutation, repeated if n exceeds it."""
    from jobs.pair_data import read_pairs

    path = rf.pairs_file(run_dir, split)
    pairs = read_pairs(path)
    if not pairs:
        raise ValueError(f"{path} is empty: no real pairs to make fakes from")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in np.resize(order, n)]


def pairs_by_index(run_dir: Path, indices: list[int], split: str = "val") -> list[dict]:
    """The pairs at `indices` (line numbers from 0) of pairs/<split>.jsonl."""
    from jobs.pair_data import read_pairs

    path = rf.pairs_file(run_dir, split)
    pairs = read_pairs(path)
    bad = [i for i in indices if not 0 <= i < len(pairs)]
    if bad:
        raise ValueError(f"pair index {bad[0]} is out of range: {path} has {len(pairs)} "
                         "pairs (list them with --list-pairs)")
    return [pairs[i] for i in indices]


def load_pairs(run_dir: Path, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean (inputs, targets) latents [n, C, T] float32 of pair records."""
    from data_prep.latent_store import LatentStore

    store = LatentStore(rf.step_dir(run_dir, rf.ENCODE))

    def stack(song_key: str, chunk_key: str) -> torch.Tensor:
        try:
            return torch.stack([torch.from_numpy(np.asarray(
                store.get(p[song_key], int(p[chunk_key])), np.float32)) for p in pairs])
        except (KeyError, IndexError) as exc:
            raise ValueError(f"{exc.args[0] if exc.args else exc}") from None
    return stack("song", "input"), stack("target_song", "target")


def pair_name(pair: dict) -> str:
    """The pair as 'song#input x target_song#target'."""
    return f"{pair['song']}#{pair['input']} x {pair['target_song']}#{pair['target']}"


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
                manifest = read_manifest(run_dir)
                if stats is None:
                    noise = make_noise(reference_stds(run_dir, n, seed), manifest["latent_dim"],
                                       manifest["frames"], temperature, seed)
                else:
                    noise = data_noise(stats, n, manifest["frames"], temperature, seed)
                latents = model.generate(noise.to(device)).float().cpu()
                titles = [f"sample {i} (seed {seed}, T={temperature:g}, {stage} epoch {epoch})"
                          for i in range(n)]
                return Fakes(latents, titles, mode, 1.0, "noise")
            pairs = list(pairs) if pairs is not None else pick_pairs(run_dir, n, seed)
            inputs, targets = load_pairs(run_dir, pairs)
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
        wav, png = out_dir / f"sample_{i}.wav", out_dir / f"sample_{i}.png"
        gain = write_wav(wav, waves[i].cpu().numpy(), sample_rate)
        write_spectrogram(png, fakes.latents[i].numpy(), frame_rate, title, codec_name)
        record = {"wav": str(wav), "png": str(png), "samples": int(waves[i].shape[-1]),
                  "gain": gain, "title": title}
        if fakes.pairs:
            record["pair"] = dict(fakes.pairs[i])
        if fakes.masks is not None:
            m_in, m_tgt = (m[i].numpy() for m in fakes.masks)
            record["masks"] = str(out_dir / f"masks_{i}.png")
            write_masks(Path(record["masks"]), m_in, m_tgt, frame_rate, title)
            record |= {"mask_in_mean": float(m_in.mean()), "mask_tgt_mean": float(m_tgt.mean()),
                       "complementarity": 1.0 - float((m_in * m_tgt).mean())}
        records.append(record)
    return records


# --- entry points -----------------------------------------------------------------------

def run(cfg: Config, run_dir: Path, checkpoint: Optional[Path] = None, n: Optional[int] = None,
        temperature: Optional[float] = None, seed: Optional[int] = None,
        out_dir: Optional[Path] = None, start_chunk: bool = False,
        pairs: Optional[list[dict]] = None, alpha: Optional[float] = None) -> dict:
    """Generate from a checkpoint into out_dir (default run_dir/generate), as it was trained
    (make_fakes); `pairs` runs a creative checkpoint's cascade on those (input, target)
    pairs, `start_chunk` a continuation checkpoint on clean validation chunks."""
    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else default_checkpoint(run_dir, cfg.generate.checkpoint)
    n = len(pairs) if pairs else (cfg.generate.n if n is None else n)
    temperature = cfg.generate.temperature if temperature is None else temperature
    seed = cfg.generate.seed if seed is None else seed
    if n < 1 or temperature <= 0:
        raise ValueError(f"generate: n must be >= 1 and temperature > 0, got n={n}, "
                         f"temperature={temperature}")
    out_dir = Path(out_dir) if out_dir else rf.step_dir(run_dir, rf.GENERATE)
    manifest = read_manifest(run_dir)
    generator, state = load_generator(path, manifest, cfg.generate.use_ema)
    stage, epoch = checkpoint_origin(state, path)
    model_cfg = model_config(state, path)
    mode, _ = trained_as(model_cfg, stage, epoch)
    if pairs and mode != "creative":
        raise ValueError(f"{path} was trained in continuation mode ({stage}), so it has no "
                         "cascade to run on a pair of songs; use --start-chunk to continue "
                         "real chunks")
    if start_chunk and mode == "creative":
        raise ValueError(f"{path} was trained in creative mode ({stage}): it makes music from "
                         "(input, target) pairs (--pair, --input-song/--target-song), not "
                         "from a start chunk alone")
    codec = run_codec(cfg, manifest)
    fakes = make_fakes(generator, model_cfg, run_dir, stage, epoch, n, seed, temperature,
                       pairs=pairs, alpha=0.0 if start_chunk else alpha, from_real=start_chunk)
    waves = codec.decode(fakes.latents).float()
    records = write_samples(out_dir, fakes, waves, codec.sample_rate, manifest["frame_rate"],
                            manifest["codec"])
    result = {"checkpoint": str(path), "weights": state["weights"], "stage": stage,
              "epoch": state.get("epoch"), "n": n,
              "seed": seed, "temperature": temperature, "start_chunk": start_chunk,
              "mode": fakes.mode, "source": fakes.source, "alpha": fakes.alpha,
              "sample_rate": codec.sample_rate, "codec": manifest["codec"],
              "out_dir": str(out_dir), "samples": records}
    atomic_write_json(out_dir / rf.GENERATE_RECORD, result)
    log_run(cfg, run_dir, result)
    return result


def log_run(cfg: Config, run_dir: Path, result: dict) -> None:
    """The generate step's MLflow child run: its settings as params, its WAVs and
    spectrograms (and creative masks) under samples/, generate.json."""
    from pipeline.tracking import step_run

    with step_run(cfg, run_dir, "generate") as tracker:
        tracker.log_params({k: result[k] for k in ("checkpoint", "weights", "stage", "epoch",
                                                   "n", "seed", "temperature", "start_chunk",
                                                   "mode", "alpha") if k in result})
        for record in result["samples"]:
            for key in ("wav", "png", "masks"):
                if key in record:
                    tracker.log_artifact(record[key], "samples")
        tracker.log_artifact(Path(result["out_dir"]) / rf.GENERATE_RECORD)


def log_samples(cfg: Config, run_dir: Path, generator: torch.nn.Module, epoch: int,
                tracker: Any, stage: str = "stage3") -> None:
    """Log generate.n samples (audio, spectrogram, creative masks) under samples/epoch_<n>/.

    Made by make_fakes as `stage` trains at `epoch`, with generate.seed every time, so
    epochs are compared on the same noise and pairs; the trainer's RNG state is left
    untouched. Files go to a temporary folder and are kept in the MLflow artifact store."""
    import tempfile

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
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


def chosen_pairs(run_dir: Path, args: argparse.Namespace) -> Optional[list[dict]]:
    """The pairs asked for on the command line (--pair, --input-song/--target-song), or None."""
    songs = (args.input_song, args.target_song)
    if any(songs) and not all(songs):
        raise ValueError("--input-song and --target-song go together")
    chosen = pairs_by_index(run_dir, args.pair) if args.pair else []
    if all(songs):
        chosen.append({"song": args.input_song, "input": args.input_chunk,
                       "target_song": args.target_song, "target": args.target_chunk})
    return chosen or None


def list_pairs(run_dir: Path) -> str:
    """The validation pairs, one per line with its --pair index."""
    from jobs.pair_data import read_pairs

    pairs = read_pairs(rf.pairs_file(run_dir, "val"))
    return "\n".join(f"{i}\t{pair_name(p)}" for i, p in enumerate(pairs))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder (default runs/<run.name> of defaults)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--start-chunk", action="store_true",
                        help="continuation checkpoint: continue seeded clean validation chunks "
                             "instead of starting from noise")
    parser.add_argument("--pair", type=int, action="append", default=[],
                        help="creative checkpoint: run the cascade on validation pair INDEX "
                             "(repeatable; see --list-pairs)")
    parser.add_argument("--input-song", default=None, help="creative: input song id")
    parser.add_argument("--input-chunk", type=int, default=0)
    parser.add_argument("--target-song", default=None, help="creative: target song id")
    parser.add_argument("--target-chunk", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=None,
                        help="curriculum noise share of the pair views (default: the "
                             "checkpoint's; 0 = the clean songs)")
    parser.add_argument("--list-pairs", action="store_true",
                        help="print the validation pairs with their --pair index and exit")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <run>/generate)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg, run_dir = load_run(args.run)
    try:
        if args.list_pairs:
            print(list_pairs(run_dir))
            return 0
        result = run(cfg, run_dir, args.checkpoint, args.n, args.temperature, args.seed,
                     args.out, args.start_chunk, chosen_pairs(run_dir, args), args.alpha)
    except (MismatchError, FileNotFoundError, ValueError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    masks = sum("masks" in r for r in result["samples"])
    print(f"wrote {len(result['samples'])} samples ({result['sample_rate']} Hz, {result['mode']}"
          f"{f', {masks} mask plots' if masks else ''}) to {result['out_dir']}")
    return 0


def load_run(run: Optional[str]) -> tuple[Config, Path]:
    """Config and folder of a run: run_dir/config.resolved.yaml (default run: runs/<run.name>)."""
    if run is None:
        base = config_mod.load()
        run = str(Path(base.run.root) / base.run.name)
    run_dir = Path(run)
    path = rf.config_file(run_dir)
    if not path.exists():
        runs = sorted(str(p.parent) for p in run_dir.parent.glob(f"*/{rf.CONFIG_FILE}"))
        raise SystemExit(f"no resolved config at {path}: pass --run <run folder>"
                         + (f" (run folders here: {', '.join(runs)})" if runs else ""))
    return config_mod.load_resolved(run_dir), run_dir


if __name__ == "__main__":
    sys.exit(main())
