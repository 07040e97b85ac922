"""Training checkpoints: atomic save, weights-only load, and the RNG states that make resume exact.

A checkpoint is a plain dict of tensors, numbers, strings and containers, so that
`torch.load(..., weights_only=True)` reads it (no pickled classes, no numpy arrays).
Keys every reader may rely on: "generator", "discriminator" (or None), "config", "codec",
"parts", "epoch" (last completed epoch), "step" (optimizer steps so far), "batch_in_epoch"
(batches of epoch+1 already done; non-zero only for a mid-epoch preemption checkpoint).
"""
from __future__ import annotations

import random
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_torch_save


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA if present, numpy, python) as plain containers."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(path: Path | str, state: dict) -> None:
    """Write a checkpoint atomically (temp file + rename): a kill never leaves half a file."""
    atomic_torch_save(path, state)


def verify(path: Path) -> None:
    """Check every member of the checkpoint's zip against its stored CRC-32 (torch.load does
    not): a damaged file is refused by name instead of loading weights like 4.5e33."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"checkpoint {path} is damaged: {exc}") from exc
    if bad is not None:
        raise ValueError(f"checkpoint {path} is damaged: member {bad} fails its CRC check")


def load(path: Path | str) -> dict:
    """Read a checkpoint onto the CPU with weights_only=True, after verify(); a clear error
    if it is damaged or unreadable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """State dict of a model, unwrapped from DDP, copied to the CPU."""
    inner = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
