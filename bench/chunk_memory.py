"""Benchmark 2: peak resident memory while chunking one long mp3, and its growth with length.

The chunk step and the librosa loop each chunk a 10-minute and a 40-minute stereo
44.1 kHz mp3 in a fresh process. Peak RSS is the larger of the kernel's ru_maxrss for the
process tree and the polled sum of RSS over the tree (pool workers included). The
interpreter with the step's imports and nothing else gives the floor both stand on.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from bench.child import ChildResult, run_child
from bench.inputs import long_mp3
from bench.report import Row

GROWTH_LIMIT = 1.10   # "no growth": the 40-minute peak within 10 % of the 10-minute one
PEAK_LIMIT_MB = 300.0


def imports_only() -> dict:
    """The chunk step's process before it does any work."""
    import data_prep.chunk  # noqa: F401
    import mlflow  # noqa: F401
    return {}


def peak_mb(res: ChildResult) -> float:
    return max(res.peak_tree_mb, res.peak_process_mb)


def run(sizes: dict, work: Path) -> list[Row]:
    """Rows 2a and 2b."""
    s, rate = sizes["chunk"], sizes["sample_rate"]
    root, logs = work / "runs" / "memory", work / "logs"
    shutil.rmtree(root, ignore_errors=True)
    short_min, long_min = s["memory_minutes"]
    files = {m: long_mp3(work / "inputs", m, sizes["seed"]) for m in (short_min, long_min)}
    run_child("bench.chunk_throughput:init_tracking",
              {"run_root": str(root), "source": str(files[short_min].parent),
               "sample_rate": rate, "chunk_seconds": s["chunk_seconds"]}, logs / "memory-init.log")
    floor = peak_mb(run_child("bench.chunk_memory:imports_only", {}, logs / "memory-floor.log"))
    peaks: dict[tuple[str, float], float] = {}
    for minutes, path in files.items():
        pipe = run_child("bench.chunk_throughput:measure_pipeline",
                         {"source": str(path.parent), "run_root": str(root),
                          "run_name": f"pipeline-{minutes:g}", "sample_rate": rate,
                          "chunk_seconds": s["chunk_seconds"], "workers": s["workers"],
                          "warm": False},
                         logs / f"memory-pipeline-{minutes:g}.log")
        base = run_child("bench.chunk_throughput:measure_baseline",
                         {"source": str(path.parent), "out_dir": str(root / f"baseline-{minutes:g}"),
                          "sample_rate": rate, "chunk_seconds": s["chunk_seconds"]},
                         logs / f"memory-baseline-{minutes:g}.log")
        peaks[("pipeline", minutes)], peaks[("baseline", minutes)] = peak_mb(pipe), peak_mb(base)
        shutil.rmtree(root / f"pipeline-{minutes:g}", ignore_errors=True)
        shutil.rmtree(root / f"baseline-{minutes:g}", ignore_errors=True)
    p_long, b_long = peaks[("pipeline", long_min)], peaks[("baseline", long_min)]
    p_growth = p_long / peaks[("pipeline", short_min)]
    b_growth = b_long / peaks[("baseline", short_min)]
    return [
        Row("2a", f"peak RSS chunking one {long_min:g}-min stereo mp3, chunk step / librosa loop",
            f"{p_long:.0f} MB", f"librosa loop: {b_long:.0f} MB", p_long / b_long,
            f"<= {PEAK_LIMIT_MB:.0f} MB", p_long <= PEAK_LIMIT_MB,
            f"the chunk step's interpreter with its imports (numpy, soundfile, soxr, torch-free "
            f"data_prep, mlflow) already holds {floor:.0f} MB before any audio; "
            f"{p_long - floor:.0f} MB on top of that is the decoding itself. Peak of the "
            "whole process tree, each run in a fresh process."),
        Row("2b", f"peak RSS growth from {short_min:g} to {long_min:g} min, chunk step "
                  f"(peak {long_min:g} min / peak {short_min:g} min)",
            f"{p_growth:.3f}x ({peaks[('pipeline', short_min)]:.0f} -> {p_long:.0f} MB)",
            f"librosa loop: {b_growth:.2f}x ({peaks[('baseline', short_min)]:.0f} -> "
            f"{b_long:.0f} MB)", p_growth, f"no growth (<= {GROWTH_LIMIT:.2f}x)",
            p_growth <= GROWTH_LIMIT),
    ]
