"""`python -m pipeline.resume --job <slurm job id | step> [--run runs/<name>]`.

Finds the step, resumes it (training from its last.pt, chunk from the shards that did
not finish; the step's folder is kept whatever its signature) and re-submits every step
of the run's target downstream of it, with new afterok dependencies. The downstream jobs
of the failed attempt (left pending forever by SLURM) are cancelled first. A step that
is queued, running or complete is left alone, and the command says so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from pipeline import dag, state
from pipeline.driver_lock import RunBusy, driver_lock
from pipeline.backends import make_executor
from pipeline.launch import load_run_config
from pipeline.run import live_jobs, log, submit_steps


class ResumeError(ValueError):
    """Unknown job or step, or a run folder that is not a pipeline run."""


def find_step(job: str, run: Optional[str], root: str = "runs") -> tuple[Path, str]:
    """(run folder, step) for a step name or a job id (searched in every run under root)."""
    if job in dag.STEPS:
        from pipeline.status import find_run
        try:
            return find_run(run, root), job
        except FileNotFoundError as exc:
            raise ResumeError(str(exc)) from None
    candidates = [Path(run), Path(root) / run] if run else sorted(Path(root).glob("*"))
    for folder in candidates:
        if (folder / state.STATE_FILE).exists():
            step = state.find_job(state.load(folder), job)
            if step:
                return folder.resolve(), step
    where = run or f"any run under {root}/"
    raise ResumeError(f"job '{job}' is not a step name ({', '.join(dag.STEPS)}) nor a job "
                      f"id recorded in {where}")


def resume(run_dir: Path, step: str) -> dict[str, str]:
    """Resume `step` of the run and re-submit its dependents; returns step -> job id."""
    cfg = load_run_config(run_dir)
    data = state.load(run_dir)
    entry = data["steps"].get(step)
    if entry is None:
        raise ResumeError(f"step '{step}' was never submitted in {run_dir}")
    executor = make_executor(data.get("cluster", "local"), cfg, run_dir)
    live = live_jobs(executor, data)
    if step in live:
        log(f"{step}: job {live[step]} is queued or running; nothing to resume")
        return {}
    shards = dag.step(step).num_shards(cfg)
    if state.is_complete(run_dir, step, entry.get("signature", ""), shards):
        log(f"{step}: complete; nothing to resume")
        return {}
    target_steps = data.get("target_steps") or dag.plan("all")
    later = [s for s in dag.downstream(step, target_steps) if s != step]
    stale = [live[s] for s in later if s in live]
    if stale:
        log(f"cancelling the dependents of the failed attempt: {', '.join(stale)}")
        executor.cancel(stale)
    log(f"{step}: resuming (from its last checkpoint or finished shards)")
    jobs = submit_steps(cfg, run_dir, target_steps, executor, keep=step)

    def change(d: dict) -> None:
        d.setdefault("resumes", []).append({"step": step, "at": state.now(), "jobs": jobs})
    state.update(run_dir, change)
    return jobs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="a SLURM job id of the run, or a step name")
    parser.add_argument("--run", help="run folder or name (default: search the run root)")
    parser.add_argument("--root", default=None, help="run root (default: run.root of configs/)")
    args = parser.parse_args(argv)
    from pipeline.status import default_root
    try:
        run_dir, step = find_step(args.job, args.run, args.root or default_root())
        with driver_lock(run_dir):
            jobs = resume(run_dir, step)
    except (ResumeError, RunBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [s for s in jobs if state.load(run_dir)["steps"][s].get("state") == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
