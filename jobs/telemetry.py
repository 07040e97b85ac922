"""Per-epoch training telemetry: throughput, share of step time spent waiting for data, peak memory.

Usage in a training loop:
    with tel.waiting():
        batch = next(it)
    ...forward, backward, optimizer step...
    tel.step(batch_size)
and at the end of the epoch `tracker.log_metrics(tel.epoch_metrics(), step=epoch)`
(MLflow shows them under system/, beside its own CPU, memory and GPU system metrics).
The clock runs from the first `waiting()` (or `step()`) of the epoch to the last `step()`,
so validation and checkpointing between epochs are not counted.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last reset, on Linux)."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes vs KiB


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS mark (Linux: write 5 to clear_refs); else a no-op."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


class Telemetry:
    """Counts samples, data-wait time and step time over one epoch on `device`."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._reset()

    def _reset(self) -> None:
        self._started: float | None = None
        self._last_step: float | None = None
        self._wait = 0.0
        self._samples = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def _start_clock(self, now: float) -> None:
        if self._started is None:
            self._started = now

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Time the block as waiting for data (wrap the `next(iterator)` call)."""
        begin = time.perf_counter()
        self._start_clock(begin)
        try:
            yield
        finally:
            self._wait += time.perf_counter() - begin

    def step(self, batch_size: int) -> None:
        """Record one finished optimizer step over `batch_size` samples."""
        now = time.perf_counter()
        self._start_clock(now)
        self._last_step = now
        self._samples += int(batch_size)

    def epoch_metrics(self) -> dict:
        """samples_per_s, data_wait_share (0..1) and peak_mem_mb of the epoch; then reset.
        On CPU peak_mem_mb is peak RSS, which includes the freed heap memory that training
        keeps for reuse (pipeline.malloc): it shows growth, it does not fall back."""
        elapsed = 0.0
        if self._started is not None and self._last_step is not None:
            elapsed = self._last_step - self._started
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = peak_rss_mb()
        metrics = {
            "samples_per_s": self._samples / elapsed if elapsed > 0 else 0.0,
            "data_wait_share": min(1.0, self._wait / elapsed) if elapsed > 0 else 0.0,
            "peak_mem_mb": peak,
        }
        if self.device.type == "cuda":
            metrics |= cuda_memory(self.device)
        self._reset()
        return metrics


def cuda_memory(device: torch.device) -> dict:
    """The epoch's CUDA allocator figures: peak reserved MiB (allocated plus the cache),
    the device's total MiB, and the allocator's retries and out-of-memory errors so far."""
    stats = torch.cuda.memory_stats(device)
    return {"cuda_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
            "cuda_total_mb": torch.cuda.get_device_properties(device).total_memory / 2**20,
            "cuda_alloc_retries": float(stats.get("num_alloc_retries", 0)),
            "cuda_ooms": float(stats.get("num_ooms", 0))}
