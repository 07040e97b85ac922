"""`python -m pipeline.cancel [--run runs/<name>]`: cancel the run's queued and running jobs.

On SLURM that is scancel of every step's latest job that squeue still lists (SLURM
signals every process of the job, so no training worker is left). On the local executor
the driver process gets SIGTERM, which it forwards to the running step.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from pipeline import state
from pipeline.backends import make_executor
from pipeline.launch import load_run_config
from pipeline.run import log
from pipeline.status import find_run


def cancel(run_dir) -> list[str]:
    """Cancel what runs; returns the cancelled job ids (or the local driver's pid)."""
    data = state.load(run_dir)
    executor = make_executor(data.get("cluster", "local"), load_run_config(run_dir), run_dir)
    done = executor.cancel_run(data)
    state.update(run_dir, lambda d: d.setdefault("cancelled", []).append(
        {"at": state.now(), "jobs": done}))
    return done


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run folder or name (default: the latest under the root)")
    parser.add_argument("--root", default=None, help="run root (default: run.root of configs/)")
    args = parser.parse_args(argv)
    from pipeline.status import default_root
    try:
        run_dir = find_run(args.run, args.root or default_root())
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = cancel(run_dir)
    log(f"cancelled: {', '.join(done) if done else 'nothing was queued or running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
