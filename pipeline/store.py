"""Shared step outputs: one folder per step and signature, that runs link to.

A step's outputs live in `<store>/<step>/<signature[:16]>` (a forced rerun of the same
signature gets `<signature[:16]>.r2`, `.r3`, ... beside it). A run's `<run>/<step>` is a
symbolic link to the version it uses, so jobs read and write `<run>/<step>` as before, and
a second run whose settings match finds the version complete and does no work. Nothing in
the store is deleted by the pipeline: a changed setting links the run to a new version
beside the old one, and `python -m pipeline.gc` lists (and, when told, deletes) the
versions no run links to.

While a version is being built, `claim.json` in it names the job building it, so a second
run waits on that job instead of building it twice. `inputs.json` names the upstream
versions it reads: a forced rerun upstream (`.r2`, same signature, maybe other content)
gets downstream versions of its own instead of ones built from the old revision.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from pipeline import run_folder
from pipeline.atomic import atomic_write_json
from pipeline.config import ConfigError
from pipeline.schema import Config

CLAIM_FILE = run_folder.CLAIM
INPUTS_FILE = run_folder.INPUTS
LOCK_FILE = ".build.lock"
SHORT = 16
RESERVED = run_folder.RESERVED


def store_root(cfg: Config) -> Path:
    """run.store, or `<run.root>/store`."""
    return Path(cfg.run.store or Path(cfg.run.root) / run_folder.STORE).resolve()


def version_name(signature: str, revision: int = 1) -> str:
    return signature[:SHORT] if revision <= 1 else f"{signature[:SHORT]}.r{revision}"


def versions(store: Path, step: str, signature: str) -> list[Path]:
    """The step's folders made under `signature`, oldest revision first."""
    pattern = re.compile(re.escape(signature[:SHORT]) + r"(\.r(\d+))?$")
    found = []
    folder = store / step
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(2) or 1), path))
    return [path for _, path in sorted(found)]


def next_version(store: Path, step: str, signature: str) -> Path:
    """A new revision folder for `signature` (a forced rerun), beside the old ones."""
    have = versions(store, step, signature)
    return store / step / version_name(signature, len(have) + 1 if have else 1)


def linked(run_dir: Path, step: str) -> Optional[Path]:
    """The store version the run's step links to (None: no link)."""
    path = run_folder.step_dir(run_dir, step)
    return path.resolve() if path.is_symlink() else None


def link(run_dir: Path, step: str, version: Path) -> None:
    """Point `<run>/<step>` at `version` (atomically; a relative link, so the run root and
    its store can move together)."""
    version.mkdir(parents=True, exist_ok=True)
    path = run_folder.step_dir(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() and path.resolve() == version.resolve():
        return
    if path.exists() and not path.is_symlink():
        raise ConfigError(f"{path} is in the way: the run's {step} link to the store goes "
                          "there; move it away (nothing was deleted or submitted)")
    tmp = path.with_name(f".{step}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(version, path.parent), tmp)
    os.replace(tmp, path)


def adopt(run_dir: Path, step: str, store: Path, signature_of: Optional[str]) -> Optional[Path]:
    """Move a run's own step folder (made before the store existed) into the store under
    the signature its markers name, and link it; nothing is deleted."""
    path = run_folder.step_dir(run_dir, step)
    if path.is_symlink() or not path.is_dir():
        return None
    name = version_name(signature_of) if signature_of else f"unsigned-{int(time.time())}"
    target = store / step / name
    while target.exists():
        target = target.with_name(target.name + "+")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))
    link(run_dir, step, target)
    return target


def read_claim(version: Path) -> Optional[dict]:
    return run_folder.read_json(version / CLAIM_FILE)


def write_claim(version: Path, job_id: str, cluster: str, run_dir: Path) -> None:
    atomic_write_json(version / CLAIM_FILE, {"job_id": job_id, "cluster": cluster,
                                             "run_dir": str(run_dir), "at": round(time.time())})


def refs(root: Path) -> dict[Path, list[str]]:
    """store version -> the runs (folders under `root`) whose step links point at it."""
    out: dict[Path, list[str]] = {}
    for run in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        if not run.is_dir() or run.name in RESERVED:
            continue
        for entry in run.iterdir():
            if entry.is_symlink():
                out.setdefault(entry.resolve(), []).append(f"{run.name}/{entry.name}")
    return out


def sharing_runs(run_dir: Path, step: str) -> list[Path]:
    """The other runs under the same root whose `step` links to the same version as this
    run's (a step built once for several runs)."""
    mine = linked(run_dir, step)
    if mine is None:
        return []
    root = Path(run_dir).resolve().parent
    return [other for other in sorted(root.iterdir()) if other.name not in RESERVED
            and other != Path(run_dir).resolve() and linked(other, step) == mine]


def all_versions(store: Path) -> list[Path]:
    """Every version folder in the store, step by step."""
    if not store.is_dir():
        return []
    return sorted(v for step in store.iterdir() if step.is_dir() for v in step.iterdir()
                  if v.is_dir())


def size_bytes(folder: Path) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def read_inputs(version: Path) -> Optional[dict]:
    """The upstream versions a version reads (None: not recorded, a version made before
    they were)."""
    return run_folder.read_json(version / INPUTS_FILE)


def record_inputs(version: Path, inputs: dict[str, str]) -> None:
    """Write `inputs.json` into a version that has none yet."""
    if read_inputs(version) is None:
        atomic_write_json(version / INPUTS_FILE, inputs)


def choose(store: Path, step: str, signature: str, num_shards: Optional[int],
           forced: bool, inputs: Optional[dict[str, str]] = None) -> Path:
    """The version a run uses for `signature`: a new revision when forced; else, among the
    versions that read the same upstream versions (`inputs`; None: any), the newest
    complete one, else the newest one begun (to resume it); else a new one."""
    from pipeline.state import folder_complete
    every = versions(store, step, signature)
    if forced:
        return next_version(store, step, signature)
    have = [v for v in every if inputs is None or read_inputs(v) in (None, inputs)]
    done = [v for v in have if folder_complete(v, signature, num_shards)]
    if done:
        return done[-1]
    if have:
        return have[-1]
    return next_version(store, step, signature)
