"""Step generate: a generator's fakes -> latents -> audio, as WAV + PNG in run_dir/generate.

The fakes are made as the checkpoint's stage trained it (jobs.fakes.make_fakes): noise for
a continuation generator, the cascade on seeded validation pairs (or pairs chosen on the
command line) for a creative one, whose masks are written too. The same seed gives the
same files. Latents go back to audio through the codec the data was encoded with
(jobs.samples); a checkpoint made for another codec or latent shape is refused with the
reason (pipeline.codec_facts).

    python -m jobs.generate --run runs/demo                       # as the checkpoint was trained
    python -m jobs.generate --run runs/pm --list-pairs            # validation pairs by index
    python -m jobs.generate --run runs/pm --pair 3 --pair 7 --alpha 0
    python -m jobs.generate --run runs/pm --input-song A --input-chunk 2 --target-song B
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from jobs.fakes import make_fakes, pair_name
from jobs.load_generator import checkpoint_origin, load_generator, model_config, trained_as
from jobs.samples import run_codec, write_samples
from pipeline import run_folder as rf
from pipeline.atomic import atomic_write_json
from pipeline.codec_facts import MismatchError
from pipeline.config import load_run
from pipeline.schema import Config

log = logging.getLogger(__name__)


def pairs_by_index(run_dir: Path, indices: list[int], split: str = "val") -> list[dict]:
    """The pairs at `indices` (line numbers from 0) of pairs/<split>.jsonl."""
    path = rf.pairs_file(run_dir, split)
    pairs = rf.read_pairs(path)
    bad = [i for i in indices if not 0 <= i < len(pairs)]
    if bad:
        raise ValueError(f"pair index {bad[0]} is out of range: {path} has {len(pairs)} "
                         "pairs (list them with --list-pairs)")
    return [pairs[i] for i in indices]


def run(cfg: Config, run_dir: Path, checkpoint: Optional[Path] = None, n: Optional[int] = None,
        temperature: Optional[float] = None, seed: Optional[int] = None,
        out_dir: Optional[Path] = None, start_chunk: bool = False,
        pairs: Optional[list[dict]] = None, alpha: Optional[float] = None) -> dict:
    """Generate from a checkpoint into out_dir (default run_dir/generate), as it was trained
    (make_fakes); `pairs` runs a creative checkpoint's cascade on those (input, target)
    pairs, `start_chunk` a continuation checkpoint on clean validation chunks."""
    run_dir = Path(run_dir)
    path = (Path(checkpoint) if checkpoint
            else rf.default_checkpoint(run_dir, cfg.generate.checkpoint))
    n = len(pairs) if pairs else (cfg.generate.n if n is None else n)
    temperature = cfg.generate.temperature if temperature is None else temperature
    seed = cfg.generate.seed if seed is None else seed
    if n < 1 or temperature <= 0:
        raise ValueError(f"generate: n must be >= 1 and temperature > 0, got n={n}, "
                         f"temperature={temperature}")
    out_dir = Path(out_dir) if out_dir else rf.step_dir(run_dir, rf.GENERATE)
    manifest = rf.read_encode_manifest(run_dir)
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
    pairs = rf.read_pairs(rf.pairs_file(run_dir, "val"))
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


if __name__ == "__main__":
    sys.exit(main())
