"""The pipeline's steps, their dependencies, and the signatures that decide what reruns.

A step's signature is a sha256 over three things:
  1. the resolved config sections the step reads (SECTIONS below),
  2. its code version: the source of its entry module and of every module of the
     `data_prep` and `jobs` packages it imports, directly or not, and of the two
     `pipeline` modules that decide what a step reads and accepts (CODE_MODULES: the run
     folder's layout, the codec rule); editing any of them reruns the step; the
     orchestration code under `pipeline/` is not part of it,
  3. the signatures of the steps it depends on (so a change anywhere upstream reruns
     everything downstream).
Resources (GPUs, nodes, time, chunk's shard and worker counts) and the run name are not in
it: they change where and how fast a step runs, not what it computes.

The signature is the one key for reuse as well. A step's outputs live in one folder per
signature (pipeline/store.py); inside it, work a killed job left is kept when it was made
under the same signature (chunk's per-file records, encode's shards). A part of a step
that reads less than the whole step (PARTS: encode's clean latents do not depend on the
augmentation or the pairs) has a signature of its own, computed by the same rule, and is
taken from another version of the step that made it under that part signature.
"""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from pipeline import config as config_mod
from pipeline.schema import Config

ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("data_prep", "jobs")
CODE_MODULES = ("pipeline.run_folder", "pipeline.codec_facts")
TRAIN_STEPS = ("stage1", "stage2", "stage3")


@dataclass(frozen=True)
class Step:
    name: str
    upstream: tuple[str, ...]
    sections: tuple[str, ...]   # dotted config paths hashed into the signature
    module: str                 # entry module (its import closure is the code version)
    kind: str                   # "array" (chunk shards), "data", "train" or "job"
    reuses_memory: bool = False  # big arrays freed and allocated batch after batch: the job's
                                 # process tunes malloc to reuse them (pipeline/malloc.py)
    leaves_out: tuple[str, ...] = ()  # keys inside `sections` that do not change the output

    def num_shards(self, cfg: Config) -> Optional[int]:
        """How many shards (array tasks) the step runs as; None for a single job."""
        return cfg.data.num_shards if self.kind == "array" else None


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("chunk", (), ("data", "run.seed"), "data_prep.chunk", "array",
         leaves_out=("data.num_shards", "data.workers", "data.max_failed_share")),
    Step("pairs", ("chunk",), ("pairs", "run.seed"), "data_prep.pairs", "data"),
    Step("encode", ("pairs",), ("encode", "run.seed"), "data_prep.encode", "data",
         reuses_memory=True),
    Step("stage1", ("encode",), ("model", "stage1", "run.seed"), "jobs.train", "train"),
    Step("stage2", ("stage1",), ("model", "stage2", "run.seed"), "jobs.train", "train"),
    Step("stage3", ("stage2",), ("model", "stage3", "run.seed"), "jobs.train", "train"),
    Step("audit", ("stage3",), ("audit",), "jobs.audit", "job"),
    Step("generate", ("stage3",), ("generate",), "jobs.generate", "job"),
    Step("evaluate", ("generate",), ("evaluate", "generate"), "jobs.evaluate", "job"),
)}


@dataclass(frozen=True)
class Part:
    """A part of a step's output that reads less than the whole step."""
    leaves_out: tuple[str, ...]   # config keys of the step the part does not read
    upstream: tuple[str, ...]     # the upstream steps it reads


PARTS: dict[tuple[str, str], Part] = {
    # the clean latents: every chunk encoded once; no augmentation, no train/val split
    ("encode", "clean"): Part(("encode.augment",), ("chunk",)),
}

# What each CLI target asks for; every step it needs that is not complete comes along.
TARGETS: dict[str, tuple[str, ...]] = {
    "prepare": ("encode",),
    "stage1": ("stage1",),
    "stage2": ("stage2",),
    "stage3": ("stage3",),
    "all": ("audit",),
    "demo": ("audit", "evaluate"),
}


class DagError(ValueError):
    """An unknown step or target, or a step whose code is missing."""


def step(name: str) -> Step:
    if name not in STEPS:
        raise DagError(f"unknown step '{name}'; steps are: {', '.join(STEPS)}")
    return STEPS[name]


def needs(name: str) -> list[str]:
    """`name` and every step it depends on, directly or not, in run order."""
    wanted, todo = set(), [step(name).name]
    while todo:
        n = todo.pop()
        if n not in wanted:
            wanted.add(n)
            todo.extend(step(n).upstream)
    return [n for n in STEPS if n in wanted]


def plan(target: str) -> list[str]:
    """The steps of a target and everything they need, in run (topological) order."""
    if target not in TARGETS:
        raise DagError(f"unknown target '{target}'; targets are: {', '.join(TARGETS)}")
    wanted = {n for name in TARGETS[target] for n in needs(name)}
    return [name for name in STEPS if name in wanted]


def downstream(name: str, among: list[str]) -> list[str]:
    """`name` and every step of `among` that depends on it (directly or not), in order."""
    hit = {step(name).name}
    for other in among:
        if set(STEPS[other].upstream) & hit:
            hit.add(other)
    return [s for s in among if s in hit]


def _section(cfg: Config, dotted: str, leaves_out: tuple[str, ...] = ()) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if not hasattr(obj, "__dataclass_fields__"):
        return obj
    return {k: v for k, v in config_mod.to_dict(obj).items() if f"{dotted}.{k}" not in leaves_out}


def module_file(module: str) -> Path:
    """Source file of a project module (`pkg.mod` -> pkg/mod.py or pkg/mod/__init__.py)."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    raise DagError(f"module '{module}' not found under {ROOT}")


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in CODE_PACKAGES or name in CODE_MODULES:
                try:
                    module_file(name)
                    found.add(name)
                except DagError:
                    pass  # `from pkg import function`: the name is not a module
    return found


@lru_cache(maxsize=None)
def code_files(module: str) -> tuple[Path, ...]:
    """The entry module's file and every project file it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = module_file(name)
        todo.extend(_project_imports(seen[name]))
    return tuple(sorted(set(seen.values())))


def code_version(module: str) -> str:
    """sha256 over the relative paths and contents of the step's code files."""
    digest = hashlib.sha256()
    for path in code_files(module):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def signature(cfg: Config, name: str, upstream_sigs: dict[str, str],
              part: Optional[str] = None) -> str:
    """The signature of one step (or of one of its PARTS) given its upstream steps'
    signatures."""
    s = step(name)
    leaves_out, upstream = s.leaves_out, s.upstream
    if part is not None:
        if (name, part) not in PARTS:
            raise DagError(f"step '{name}' has no part '{part}'")
        p = PARTS[(name, part)]
        leaves_out, upstream = leaves_out + p.leaves_out, p.upstream
    payload = {
        "step": name + (f"/{part}" if part else ""),
        "config": {dotted: _section(cfg, dotted, leaves_out) for dotted in s.sections},
        "code": code_version(s.module),
        "upstream": {u: upstream_sigs[u] for u in upstream},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def signature_of(cfg: Config, name: str, part: Optional[str] = None) -> str:
    """The signature a job of step `name` (or of its `part`) runs under: from the run's
    config and the code on disk, as the submitter computed it."""
    upstream = signatures(cfg, needs(name))
    return signature(cfg, name, upstream, part) if part else upstream[name]


def signatures(cfg: Config, names: list[str]) -> dict[str, str]:
    """Signatures of `names` (which must include their upstream steps), in order."""
    out: dict[str, str] = {}
    for name in STEPS:
        if name in names:
            out[name] = signature(cfg, name, out)
    return out
