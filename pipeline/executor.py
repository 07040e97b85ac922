"""The small interface both executors implement: submit one step, ask job states, cancel.

A `Submission` is one step (for chunk: some of its shards) with its resources and the
job ids it must wait for. The local executor runs it before returning; the SLURM
executor queues it behind its dependencies and returns at once.
"""
from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from pipeline.schema import Config, Resources

T = TypeVar("T")

# Live states (the job still exists in the queue or is running).
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


@dataclass
class Submission:
    step: str
    run_dir: Path
    signature: str
    resources: Resources
    after: list[str] = field(default_factory=list)    # upstream job ids (afterok)
    shards: Optional[list[int]] = None                 # chunk: the shards to run
    num_shards: Optional[int] = None


@dataclass
class Submitted:
    job_id: str                                        # array: the array's job id
    state: str                                         # e.g. PENDING, COMPLETED, FAILED
    array_tasks: list[str] = field(default_factory=list)
    reason: str = ""


class Executor(ABC):
    name: str = ""

    @abstractmethod
    def submit(self, sub: Submission) -> Submitted:
        """Queue (SLURM) or run (local) one step."""

    @abstractmethod
    def states(self, job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
        """job id -> (state, elapsed, reason) for the jobs the scheduler still knows."""

    @abstractmethod
    def cancel(self, job_ids: list[str]) -> None:
        """Cancel these jobs (queued or running)."""

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one of the driver's bookkeeping functions (the MLflow parent run); here,
        in this process."""
        return fn(*args)

    def script(self, sub: Submission) -> str:
        """What would be submitted (for dry runs)."""
        return f"# {self.name}: {sub.step} would run here"


def resolve_cluster(choice: Optional[str], cfg_executor: str = "auto") -> str:
    """local or slurm: the explicit choice, else the config's, else slurm if sbatch exists."""
    pick = choice or cfg_executor
    if pick in (None, "", "auto"):
        return "slurm" if shutil.which("sbatch") else "local"
    if pick not in ("local", "slurm"):
        raise ValueError(f"cluster must be local, slurm or auto, got '{pick}'")
    return pick


def prestart(name: str) -> None:
    """Start early what a backend needs before its first step (local: the warm fork server)."""
    if name == "local":
        from pipeline.local_executor import start_fork_server
        start_fork_server()


def make_executor(name: str, cfg: Config, run_dir: Path, dry_run: bool = False) -> Executor:
    if name == "slurm":
        from pipeline.slurm_executor import SlurmExecutor
        return SlurmExecutor(cfg, run_dir, dry_run=dry_run)
    from pipeline.local_executor import LocalExecutor
    return LocalExecutor(cfg, run_dir, dry_run=dry_run)
