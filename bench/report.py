"""Benchmark results: one Row per figure, the machine they were taken on, the markdown table."""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil


@dataclass
class Row:
    key: str                 # stable id, e.g. "1a"
    what: str                # the measurement, and what the ratio compares
    result: str              # the pipeline's figure
    reference: str           # the baseline / limit measured in the same run
    ratio: Optional[float]   # None = not measured
    target: str              # as the issue states it
    met: Optional[bool]      # None = not measured
    note: str = ""           # where the time goes, caveats, why not measured
    raw: dict = field(default_factory=dict)  # figures other sections reuse (not rendered)

    def cells(self) -> list[str]:
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.3g}"
        met = "not measured" if self.met is None else ("yes" if self.met else "**NO**")
        return [self.key, self.what, self.result, self.reference, ratio, self.target, met]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_kernel() -> str:
    """OpenBLAS's kernel (architecture) and threads, as threadpoolctl reports them."""
    try:
        from threadpoolctl import threadpool_info
        infos = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
        return ", ".join(f"{i.get('architecture')} ({i.get('num_threads')} threads)"
                         for i in infos) or "no OpenBLAS loaded"
    except ImportError:
        return "threadpoolctl not installed"


def machine_info() -> dict:
    """What the figures depend on: CPU, cores, memory, versions, BLAS setting, load."""
    import numpy
    import torch
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "unset"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "unset"),
        "openblas_kernel": blas_kernel(),
        "load_avg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def render(rows: list[Row], machine: dict, command: str, seconds: float, sections: list[str],
           load_end: str) -> str:
    """The whole docs/benchmarks.md text."""
    head = ["#", "measurement (ratio = what / what)", "result", "reference, same run",
            "ratio", "target", "met"]
    lines = ["# Benchmarks", "",
             f"Produced by `{command}` (bench/run_all.py) in {seconds:.0f} s on "
             f"{machine['date']}. Ratios are measured side by side in the same run; "
             "absolute figures are for context only.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |" for row in rows]
    notes = [f"- **{row.key}**: {row.note}" for row in rows if row.note]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += [f"- load_avg at the end: {load_end}",
              "- The machine was shared with other work while measuring unless the load "
              "average above is near 0; ratios of measurements taken side by side are "
              "less affected than absolute times."]
    for section in sections:
        lines += ["", section.rstrip()]
    return "\n".join(lines) + "\n"
