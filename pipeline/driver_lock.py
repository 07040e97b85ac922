"""One driver per run: an exclusive lock on <run>/.driver.lock while a driver works on it.

Two `make prepare` at once (or a `resume` in a second terminal) would otherwise both see no
live local jobs, and one would clear the other's just-started step folder under it. The lock
is an flock, so it dies with its process: a killed driver never leaves a stale lock. The
file says who holds it (pid, host, since), for the refusal message.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".driver.lock"


class RunBusy(RuntimeError):
    """Another driver holds the run's lock."""


def driver_identity() -> str:
    """'pid <n> on <host>' of this process, as the lock file and pipeline.json name it."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def driver_alive(run_dir: Path) -> bool:
    """Does a driver hold the run's lock now? (Taking it for an instant tells.)"""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def driver_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's driver lock for the block; RunBusy naming the holder if it is taken."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fh = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "a driver that has not written its name yet"
            raise RunBusy(f"another driver is working on {run_dir} ({holder}); wait for it to "
                          "finish, or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{driver_identity()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()
