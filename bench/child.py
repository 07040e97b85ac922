"""Run one measurement in a fresh Python process and watch its memory.

A fresh process keeps one measurement's imports, caches and heap out of the next, and
lets the parent see the whole process tree's resident memory (pool workers included).
The child calls `module:function(**kwargs)` and writes the returned dict as JSON.

The kernel's ru_maxrss of a fork+exec'd child starts at the forking parent's RSS (Linux
carries the old memory's high-water mark across exec), so the parent's figure for its
child would include the parent itself. The child therefore reads its own peak (VmHWM,
reset by exec) and its own children's ru_maxrss, and the parent polls the tree's RSS.
"""
from __future__ import annotations

import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from pipeline.atomic import atomic_write_json

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ChildResult:
    result: dict            # what the function returned
    peak_tree_mb: float     # highest sum of RSS over the child and its descendants (polled)
    peak_process_mb: float  # highest RSS of any one process in the tree (kernel's count)
    wall_s: float           # whole child lifetime, interpreter start and imports included


class ChildError(RuntimeError):
    """The measurement process failed; the message holds the tail of its log."""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_child(target: str, kwargs: dict, log_path: Path, env: dict | None = None,
              poll_s: float = 0.02, timeout_s: float = 1800.0) -> ChildResult:
    """Run `module:function` with JSON-able kwargs in a new interpreter; stderr goes to log_path."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.child", target, json.dumps(kwargs), str(out)]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            watched = psutil.Process(proc.pid)
            peak = 0
            while proc.poll() is None:
                try:
                    peak = max(peak, _tree_rss(watched))
                except psutil.NoSuchProcess:
                    pass
                if time.perf_counter() - start > timeout_s:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(poll_s)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            tail = log_path.read_text(errors="replace")[-3000:]
            raise ChildError(f"{target} failed (exit {proc.returncode}, log {log_path}):\n{tail}")
        result = json.loads(out.read_text())
    own = max(result["self_peak_mb"], result["children_peak_mb"])
    return ChildResult(result, peak / 2**20, own, wall)


def own_peak_mb() -> float:
    """This process's peak RSS since its exec (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    target, kwargs, out = argv[0], json.loads(argv[1]), Path(argv[2])
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(**kwargs)
    result["self_peak_mb"] = own_peak_mb()
    # KiB on Linux: the largest of the waited-for descendants (pool workers)
    result["children_peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    atomic_write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
