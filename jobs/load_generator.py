"""A trained generator back from its checkpoint, and how its stage trained it.

A checkpoint made for another codec or latent shape is refused with the reason
(pipeline.codec_facts)."""
from __future__ import annotations

import sys
from pathlib import Path

from jobs import checkpoint as ckpt_io
from pipeline import codec_facts
from pipeline import config as config_mod
from pipeline.run_folder import STAGES
from pipeline.schema import Config

MismatchError = codec_facts.MismatchError


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
