"""Keep freed heap memory for reuse (glibc), so tensors allocated anew each batch stop
page-faulting.

glibc serves allocations above 32 MB with fresh mmaps and returns them on free, so every
batch of a CPU encoder touches hundreds of MB of new pages: on the 2-core test machine the
mel encoder spent about 30% of its time in page faults. With mmap off and a high trim
threshold the heap keeps those pages. A no-op where glibc's mallopt is absent.

The setting is process-wide and cannot be undone, so it is opt-in per process: only a
step's entry point (pipeline.launch, a step's `main`, a benchmark) calls
reuse_freed_memory, never import time or a library function that tests call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, Optional

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_applied = False


def _mallopt() -> Optional[Callable[[int, int], int]]:
    """glibc's mallopt, or None where there is none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return None


def reuse_freed_memory(trim_threshold: int = 2**31 - 1) -> bool:
    """Ask glibc to serve big allocations from the heap and keep freed pages; True if done.
    Call it only from a process's entry point (see the module's note)."""
    global _applied
    if _applied:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    return _applied


def applied() -> bool:
    """True once this process asked glibc to keep freed memory."""
    return _applied
