"""Run the DAG's steps one after another on this machine, each in its own process.

On Linux each step is a child forked from a fork server (multiprocessing's forkserver)
that has imported torch, MLflow and the step modules once (pipeline.preload), so a step
starts in milliseconds instead of paying 4-5 s of imports. Elsewhere (macOS frameworks
are not fork-safe once loaded) each step is a fresh `python -m pipeline.launch`. A
crashing step cannot take the driver down with it; logs go to logs/<step>/. Training with
more than one process per step uses torchrun --standalone (gloo on CPU), decided inside
pipeline.launch exactly as on SLURM.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import state
from pipeline.driver_lock import driver_alive
from pipeline.executor import Executor, Submission, Submitted, T
from pipeline.schema import Config

WARM = sys.platform.startswith("linux")   # fork a warm server's children (else: subprocesses)


def start_fork_server() -> Optional[multiprocessing.context.BaseContext]:
    """Start the fork server and its imports in the background, if not yet running, and
    return its context (None off Linux); call it early so that the imports overlap with the
    driver's own start."""
    if not WARM:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.preload"])
    multiprocessing.forkserver.ensure_running()
    return ctx


class LocalExecutor(Executor):
    name = "local"
    synchronous = True

    @classmethod
    def prestart(cls) -> None:
        start_fork_server()

    def __init__(self, cfg: Config, run_dir: Path, dry_run: bool = False) -> None:
        self.cfg, self.run_dir, self.dry_run = cfg, Path(run_dir), dry_run
        self._count = 0
        self._current: multiprocessing.process.BaseProcess | subprocess.Popen | None = None
        self.cancelled = False
        self._ctx = None if dry_run else start_fork_server()

    def command(self, sub: Submission, shard: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "pipeline.launch", "--run-dir", str(sub.run_dir),
               "--step", sub.step, "--signature", sub.signature]
        if shard is not None:
            cmd += ["--shard", str(shard), "--num-shards", str(sub.num_shards)]
        return cmd

    def script(self, sub: Submission) -> str:
        shards = sub.shards if sub.shards is not None else [None]
        return "\n".join(shlex.join(self.command(sub, s)) for s in shards)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """In a child forked from the warm server, so the driver never imports MLflow."""
        if self._ctx is None:
            return fn(*args)
        with ProcessPoolExecutor(max_workers=1, mp_context=self._ctx) as pool:
            return pool.submit(_with_env, dict(os.environ), fn, *args).result()

    def run_command(self, cmd: list[str], log: Path) -> int:
        """Run `python -m pipeline.launch <args>` (forked from the warm server on Linux);
        its exit code."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            fh.flush()
            previous = signal.signal(signal.SIGTERM, self._forward_term)
            try:
                if self._ctx is None:
                    self._current = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
                    return self._current.wait()
                argv = cmd[cmd.index("pipeline.launch") + 1:]
                self._current = self._ctx.Process(target=_launch_logged, name=log.stem,
                                                  args=(argv, str(log), dict(os.environ)))
                self._current.start()
                self._current.join()
                return self._current.exitcode
            finally:
                signal.signal(signal.SIGTERM, previous)
                self._current = None

    def _forward_term(self, signum: int, _frame) -> None:
        self.cancelled = True
        pid = getattr(self._current, "pid", None)
        if pid is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass   # the step ended as the signal came

    def submit(self, sub: Submission) -> Submitted:
        self._count += 1
        job_id = f"local-{os.getpid()}-{self._count}"
        logs = self.run_dir / "logs" / sub.step
        shards = sub.shards if sub.shards is not None else [None]
        for shard in shards:
            name = sub.step if shard is None else f"{sub.step}-{shard}-of-{sub.num_shards}"
            code = self.run_command(self.command(sub, shard), logs / f"{name}.log")
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

    def cancel_run(self, data: dict) -> list[str]:
        """A local run is cancelled through its driver: SIGTERM, which it forwards to the
        step it runs."""
        pid = data.get("driver_pid")
        if pid:
            try:
                os.kill(int(pid), signal.SIGTERM)
                return [f"pid {pid}"]
            except ProcessLookupError:
                pass
        return []

    def lost(self, run_dir: Path, step: str, entry: dict, job: str, live: dict) -> str:
        if driver_alive(run_dir):
            return ""
        return (f"driver gone ({entry.get('driver', 'its driver')} no longer runs this run):"
                f" python -m pipeline.resume --job {step} --run {run_dir}")


def _with_env(env: dict[str, str], fn: Callable[..., T], *args: Any) -> T:
    """In the forked child: the driver's environment as it is now (the server's is from its
    start, before e.g. the tracking credentials were set), then fn(*args)."""
    os.environ.clear()
    os.environ.update(env)
    return fn(*args)


def _launch_logged(argv: list[str], log: str, env: dict[str, str]) -> None:
    """In the forked child: take the driver's environment as it is now (the server's is
    from its start), send stdout and stderr to the step's log, then run the step."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from pipeline import launch
    sys.exit(launch.main(argv))
