"""The end of a run's chain, as its jobs see it, and the MLflow parent run closed with it.

On SLURM no driver waits for the chain: each job, when it ends, calls `close_if_ended`.
The chain has ended when every target step (pipeline.json target_steps) has a COMPLETED
marker (FINISHED), or when one has a FAILED marker: its dependents never start (FAILED).
The job that sees it first ends the parent run, under a file lock; `parent_end.json`
records what was done, so later jobs do nothing (a resumed chain may end it again).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from pipeline import dag, run_folder, state, store
from pipeline.atomic import atomic_write_json
from pipeline.file_lock import file_lock
from pipeline.schema import Config

END_FILE = run_folder.PARENT_END
RUNNING, FINISHED, FAILED = "RUNNING", "FINISHED", "FAILED"


def step_states(run_dir: Path, cfg: Config, steps: list[str]) -> dict[str, str]:
    """step -> the worst state of its markers ("" when it has none yet)."""
    out = {}
    for name in steps:
        marks = state.markers(run_dir, name, dag.step(name).num_shards(cfg))
        found = [m["state"] if m else "" for m in marks]
        bad = sorted((s for s in found if s != state.COMPLETED), key=lambda s: s != state.FAILED)
        out[name] = bad[0] if bad else state.COMPLETED
    return out


def chain_state(run_dir: Path, cfg: Config) -> tuple[str, str]:
    """(RUNNING | FINISHED | FAILED, detail) of the run's target steps, from their markers."""
    steps = state.load(run_dir).get("target_steps") or []
    if not steps:
        return RUNNING, "no target recorded"
    states = step_states(run_dir, cfg, steps)
    failed = [s for s in steps if states[s] == state.FAILED]
    if failed:
        return FAILED, f"{failed[0]} failed"
    if all(states[s] == state.COMPLETED for s in steps):
        return FINISHED, ""
    return RUNNING, ""


def recorded_end(run_dir: Path) -> Optional[dict]:
    """What parent_end.json says was done, if anything."""
    try:
        return json.loads((Path(run_dir) / END_FILE).read_text())
    except (OSError, ValueError):
        return None


def close_if_ended(cfg: Config, run_dir: Path) -> Optional[str]:
    """End the MLflow parent run if the chain has ended; returns the status set (or None)."""
    run_dir = Path(run_dir)
    with file_lock(run_dir / f".{END_FILE}.lock"):
        status, detail = chain_state(run_dir, cfg)
        if status == RUNNING:
            return None
        done = recorded_end(run_dir)
        if done and done.get("status") == status:
            return None
        parent = state.load(run_dir).get("mlflow_parent")
        if parent:
            from pipeline import tracking
            tracking.end_parent_run(cfg, parent, status == FINISHED)
        atomic_write_json(run_dir / END_FILE, {"status": status, "detail": detail,
                                               "parent": parent, "at": state.now()})
        return status


def close_quietly(cfg: Config, run_dir: Path, step: str = "") -> None:
    """close_if_ended for a job's last act, for its run and for every other run whose
    `step` links to the same store version (they waited on this job); a problem is
    reported, never raised."""
    runs = [(cfg, Path(run_dir))]
    if step:
        from pipeline.config import load_resolved
        for other in store.sharing_runs(run_dir, step):
            try:
                runs.append((load_resolved(other), other))
            except Exception:   # not a pipeline run folder (any more)
                continue
    for run_cfg, folder in runs:
        try:
            status = close_if_ended(run_cfg, folder)
            if status:
                print(f"[pipeline] the chain of {folder.name} has ended: MLflow parent run "
                      f"{status}", file=sys.stderr, flush=True)
        except Exception as exc:   # the step's own result matters more than the parent run
            print(f"[pipeline] could not close the parent run of {folder.name}: {exc}",
                  file=sys.stderr, flush=True)


ENDED_BAD = ("FAILED", "LOST", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def overall_state(run_dir: Path, rows: list[dict]) -> str:
    """The run's state from status rows: RUNNING, FINISHED, FAILED (<step> failed) or
    CANCELLED (<step> cancelled), over its target steps."""
    from pipeline.executor import LIVE_STATES
    steps = state.load(run_dir).get("target_steps") or [r["step"] for r in rows]
    mine = [r for r in rows if r["step"] in steps]
    bad = [r["step"] for r in mine if r["state"] in ENDED_BAD]
    if bad:
        return f"{FAILED} ({bad[0]} failed)"
    if mine and len(mine) == len(steps) and all(r["state"] == "COMPLETED" for r in mine):
        return FINISHED
    stopped = [r["step"] for r in mine if r["state"] in ("CANCELLED", state.INTERRUPTED)]
    if stopped and not any(r["state"] in LIVE_STATES for r in mine):
        return f"CANCELLED ({stopped[0]} cancelled)"
    return RUNNING


def requeue_note(marks: list[dict]) -> str:
    """"requeued: preemption P, time limit T" from a step's markers ("" if never)."""
    pre = sum(int(m.get("requeues", {}).get("preemption", 0)) for m in marks)
    timed = sum(int(m.get("requeues", {}).get("time_limit", 0)) for m in marks)
    return f"requeued: preemption {pre}, time limit {timed}" if pre or timed else ""
