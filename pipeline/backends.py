"""Which executor runs a pipeline: pick the backend and build it.

The interface (pipeline/executor.py) knows nothing of its backends; this module is the
one place that names them.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Optional

from pipeline.executor import Executor
from pipeline.schema import Config

BACKENDS = {"local": "pipeline.local_executor:LocalExecutor",
            "slurm": "pipeline.slurm_executor:SlurmExecutor"}


def resolve_cluster(choice: Optional[str], cfg_executor: str = "auto") -> str:
    """local or slurm: the explicit choice, else the config's, else slurm if sbatch exists."""
    pick = choice or cfg_executor
    if pick in (None, "", "auto"):
        return "slurm" if shutil.which("sbatch") else "local"
    if pick not in BACKENDS:
        raise ValueError(f"cluster must be {', '.join(BACKENDS)} or auto, got '{pick}'")
    return pick


def backend(name: str) -> type[Executor]:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def prestart(name: str) -> None:
    """Start early what the backend needs before its first step."""
    backend(name).prestart()


def make_executor(name: str, cfg: Config, run_dir: Path, dry_run: bool = False) -> Executor:
    return backend(name)(cfg, run_dir, dry_run=dry_run)
