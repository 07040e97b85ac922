"""Run the DAG's steps one after another on this machine, each in a subprocess.

A crashing step cannot take the driver down with it; logs go to logs/<step>/. Training
with more than one process per step uses torchrun --standalone (gloo on CPU), decided
inside pipeline.launch exactly as on SLURM.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import state
from pipeline.executor import Executor, Submission, Submitted
from pipeline.schema import Config


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, cfg: Config, run_dir: Path, dry_run: bool = False) -> None:
        self.cfg, self.run_dir, self.dry_run = cfg, Path(run_dir), dry_run
        self._count = 0
        self._current: subprocess.Popen | None = None
        self.cancelled = False

    def command(self, sub: Submission, shard: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "pipeline.launch", "--run-dir", str(sub.run_dir),
               "--step", sub.step, "--signature", sub.signature]
        if shard is not None:
            cmd += ["--shard", str(shard), "--num-shards", str(sub.num_shards)]
        return cmd

    def script(self, sub: Submission) -> str:
        shards = sub.shards if sub.shards is not None else [None]
        return "\n".join(shlex.join(self.command(sub, s)) for s in shards)

    def _run_one(self, cmd: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            fh.flush()
            self._current = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            previous = signal.signal(signal.SIGTERM, self._forward_term)
            try:
                return self._current.wait()
            finally:
                signal.signal(signal.SIGTERM, previous)
                self._current = None

    def _forward_term(self, signum: int, _frame) -> None:
        self.cancelled = True
        if self._current is not None and self._current.poll() is None:
            self._current.send_signal(signum)

    def submit(self, sub: Submission) -> Submitted:
        self._count += 1
        job_id = f"local-{os.getpid()}-{self._count}"
        logs = self.run_dir / "logs" / sub.step
        shards = sub.shards if sub.shards is not None else [None]
        for shard in shards:
            name = sub.step if shard is None else f"{sub.step}-{shard}-of-{sub.num_shards}"
            code = self._run_one(self.command(sub, shard), logs / f"{name}.log")
            if self.cancelled:
                return Submitted(job_id, "CANCELLED", reason="cancelled (SIGTERM)")
            if code != 0:
                why = self._reason(sub, shard)
                return Submitted(job_id, "FAILED",
                                 reason=f"exit code {code}{why}; log: {logs / name}.log")
        return Submitted(job_id, "COMPLETED")

    def _reason(self, sub: Submission, shard: int | None) -> str:
        """The failure reason the step recorded in its marker, as ': <reason>' (or '')."""
        num_shards = sub.num_shards if shard is not None else None
        marker = state.read_marker(state.marker_path(self.run_dir, sub.step, shard, num_shards))
        return f": {marker['reason']}" if marker and marker.get("reason") else ""

    def states(self, job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
        return {}   # local steps run in the foreground: nothing is ever queued

    def cancel(self, job_ids: list[str]) -> None:
        return None
