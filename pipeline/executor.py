"""The small interface both executors implement: submit one step, ask job states, cancel.

A `Submission` is one step (for chunk: some of its shards) with its resources and the
job ids it must wait for. The local executor runs it before returning; the SLURM
executor queues it behind its dependencies and returns at once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from pipeline.schema import Resources

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
    # True: submit() runs the step to its end before returning (nothing is ever queued,
    # so no job of another run can be waited on, and the driver closes the MLflow run)
    synchronous: bool = False

    @classmethod
    def prestart(cls) -> None:
        """Start early what the backend needs before its first step (default: nothing)."""

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

    def cancel_run(self, data: dict) -> list[str]:
        """Cancel what a run has queued or running (`data` = its pipeline.json); what was
        cancelled. Default: the steps' live jobs."""
        ids = [e["job_id"] for e in data.get("steps", {}).values() if e.get("job_id")]
        found = self.states(ids)
        live = [j for j in ids if j in found and found[j][0] in LIVE_STATES]
        self.cancel(live)
        return live

    def lost(self, run_dir: Path, step: str, entry: dict, job: str, live: dict) -> str:
        """Why a step whose marker says RUNNING runs no more ("" = it may still run)."""
        return "" if job in live else "the job is gone without a word: killed hard, or a node died"
