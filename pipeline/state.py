"""Run state: `pipeline.json` (written by the submitter, resume and status) and the
per-step markers that the jobs themselves write.

Jobs never touch pipeline.json: many of them (array tasks, several nodes) would race on
it. Each job writes only its own marker, `<run>/<step>/step_state.json` (chunk shards:
`<run>/chunk/step_state-<shard>-of-<n>.json`), atomically. A step is complete when its
markers say COMPLETED with the step's current signature.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline import run_folder
from pipeline.atomic import atomic_write_json

STATE_FILE = run_folder.PIPELINE_STATE
COMPLETED, FAILED, RUNNING, PREEMPTED, INTERRUPTED = (
    "COMPLETED", "FAILED", "RUNNING", "PREEMPTED", "INTERRUPTED")


def now() -> float:
    return round(time.time(), 3)


# --- pipeline.json -------------------------------------------------------------------

def load(run_dir: Path) -> dict:
    """The run state, or an empty skeleton for a new run."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return {"run_dir": str(Path(run_dir).resolve()), "created": now(), "steps": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / f".{STATE_FILE}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update(run_dir: Path, change: Callable[[dict], Any]) -> dict:
    """Read, change (in place) and atomically rewrite pipeline.json under a file lock."""
    with _locked(run_dir):
        data = load(run_dir)
        change(data)
        data["updated"] = now()
        atomic_write_json(Path(run_dir) / STATE_FILE, data)
        return data


def record_step(run_dir: Path, step: str, **fields: Any) -> dict:
    """Merge `fields` into one step's entry; a new job id is also appended to its history."""
    def change(data: dict) -> None:
        entry = data["steps"].setdefault(step, {"history": []})
        job_id = fields.get("job_id")
        if job_id and job_id != entry.get("job_id"):
            entry["history"].append({"job_id": job_id, "at": now(),
                                     "array_tasks": fields.get("array_tasks", [])})
        entry.update(fields)
    return update(run_dir, change)


def find_job(data: dict, job_id: str) -> Optional[str]:
    """The step that job `job_id` (or array task `<id>_<i>`) belongs to, if any."""
    base = str(job_id).split("_")[0]
    for step, entry in data.get("steps", {}).items():
        for item in entry.get("history", []):
            ids = {str(item["job_id"])} | {str(t) for t in item.get("array_tasks", [])}
            if str(job_id) in ids or base == str(item["job_id"]).split("_")[0]:
                return step
    return None


# --- per-step markers written by the jobs --------------------------------------------

def marker_path(run_dir: Path, step: str, shard: Optional[int] = None,
                num_shards: Optional[int] = None) -> Path:
    return run_folder.step_dir(run_dir, step) / run_folder.marker_name(shard, num_shards)


def write_marker(run_dir: Path, step: str, state: str, signature: str,
                 shard: Optional[int] = None, num_shards: Optional[int] = None,
                 **extra: Any) -> None:
    """Record this job's state for its step (or shard); keeps the first start time."""
    path = marker_path(run_dir, step, shard, num_shards)
    old = read_marker(path) or {}
    started = old.get("started") if old.get("signature") == signature else None
    atomic_write_json(path, {
        "step": step, "state": state, "signature": signature, "shard": shard,
        "num_shards": num_shards, "started": started or now(), "updated": now(),
        "job_id": os.environ.get("SLURM_JOB_ID", ""),
        "array_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "host": socket.gethostname(), **extra})


def read_marker(path: Path) -> Optional[dict]:
    """A step marker; None when missing (or a stray file where the folder goes)."""
    return run_folder.read_json(path)


def markers(run_dir: Path, step: str, num_shards: Optional[int] = None) -> list[Optional[dict]]:
    """The step's marker(s): one per shard for an array step, else one."""
    return folder_markers(Path(run_dir) / step, num_shards)


def folder_markers(folder: Path, num_shards: Optional[int] = None) -> list[Optional[dict]]:
    """The markers in one step folder (a run's `<step>` or a store version)."""
    if num_shards is None:
        return [read_marker(Path(folder) / run_folder.MARKER)]
    return [read_marker(Path(folder) / run_folder.marker_name(i, num_shards))
            for i in range(num_shards)]


def unfinished_shards(run_dir: Path, step: str, signature: str, num_shards: int) -> list[int]:
    """Shards of an array step without a COMPLETED marker for `signature`."""
    return [i for i, m in enumerate(markers(run_dir, step, num_shards))
            if not (m and m["state"] == COMPLETED and m["signature"] == signature)]


def is_complete(run_dir: Path, step: str, signature: str,
                num_shards: Optional[int] = None) -> bool:
    """True when every marker of the step says COMPLETED with this signature."""
    return folder_complete(Path(run_dir) / step, signature, num_shards)


def folder_complete(folder: Path, signature: str, num_shards: Optional[int] = None) -> bool:
    """True when every marker in the folder says COMPLETED with this signature."""
    return all(m is not None and m["state"] == COMPLETED and m["signature"] == signature
               for m in folder_markers(folder, num_shards))
