"""What runs inside a job: one step (or one chunk shard) of a run.

The same entry serves both executors: SLURM jobs call `StepJob` (pickled by submitit),
the local executor runs `python -m pipeline.launch ...` as a subprocess. Data steps run
in this process; training runs as a child (torchrun when the step has more than one
process), so that this process can forward signals and decide about requeueing:

- USR2 (SLURM's warning before the time limit, or `scancel --signal=USR2`): forwarded to
  the training processes, which save `last.pt` and exit 75; the job then requeues itself
  with `scontrol requeue` while SLURM_RESTART_COUNT < cluster.max_requeues. A data step
  simply requeues (its outputs are written atomically; a rerun redoes the step).
- TERM (scancel, `scontrol requeue`, preemption): forwarded to every descendant, so no
  worker is left behind; SLURM decides what happens to the job.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


from pipeline import config as config_mod
from pipeline import dag, state
from pipeline.exit_codes import EXIT_GATE, EXIT_PREEMPTED
from pipeline.schema import Config

RDZV_PORT_BASE = 29400


class StepFailed(RuntimeError):
    """The step ran and failed; the message says why (and the job's exit code)."""


class Interrupted(StepFailed):
    """The job was signalled (cancelled, requeued by SLURM or requeued by itself)."""


def load_run_config(run_dir: Path) -> Config:
    """The config the submitter wrote for this run."""
    try:
        return config_mod.load_resolved(run_dir)
    except config_mod.ConfigError as exc:
        raise StepFailed(str(exc)) from None


def on_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def node_rank() -> int:
    """This node's index in the allocation (submitit runs one task per node)."""
    return int(os.environ.get("SLURM_PROCID", os.environ.get("SLURM_NODEID", "0")) or 0)


def first_node() -> str:
    """Hostname of the allocation's first node: the c10d rendezvous host."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return socket.gethostname()
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0]


def train_command(cfg: Config, run_dir: Path, stage: str) -> list[str]:
    """`jobs.train` for one process, or torchrun for several (GPUs per node x nodes).

    On CPU-only nodes the process count still follows gpus_per_node (gloo backend)."""
    res = cfg.cluster.steps[stage]
    nproc, nodes = max(1, res.gpus_per_node), max(1, res.nodes)
    entry = ["-m", "jobs.train", "--run-dir", str(run_dir), "--stage", stage]
    if nproc * nodes == 1:
        return [sys.executable, *entry]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if on_slurm():
        job = os.environ["SLURM_JOB_ID"]
        port = RDZV_PORT_BASE + int(job) % 1000
        launcher += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_id={job}",
                     f"--rdzv_endpoint={first_node()}:{port}", f"--node_rank={node_rank()}"]
    else:
        launcher += ["--standalone", "--nnodes=1"]
    return launcher + entry


def _ignore_usr2() -> None:
    # torchrun dies on USR2 by default; ignored, it survives while its workers (which
    # install their own handler) checkpoint. The disposition is inherited by the workers
    # until they replace it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class Child:
    """A child process tree whose descendants receive the signals this process gets."""

    def __init__(self, cmd: list[str], log_prefix: str = "") -> None:
        self.cmd = cmd
        self.signals: list[str] = []
        self.proc: Optional[subprocess.Popen] = None

    def _forward(self, signum: int, _frame) -> None:
        self.signals.append(signal.Signals(signum).name)
        if self.proc is None or self.proc.poll() is not None:
            return
        import psutil
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        targets = family if signum == signal.SIGUSR2 else [psutil.Process(self.proc.pid), *family]
        if signum == signal.SIGUSR2 and not family:
            targets = [psutil.Process(self.proc.pid)]   # a lone jobs.train has its handler
        for proc in targets:
            try:
                proc.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward)
                    for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
        try:
            self.proc = subprocess.Popen(self.cmd, start_new_session=True, preexec_fn=_ignore_usr2)
            while True:
                try:
                    return self.proc.wait()
                except InterruptedError:
                    continue
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._reap()

    def _reap(self, grace_s: float = 20.0) -> None:
        """Leave no orphans: terminate, then kill, whatever of the tree is still alive."""
        if self.proc is None:
            return
        import psutil
        try:
            alive = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            alive = []
        for proc in alive:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, still = psutil.wait_procs(alive, timeout=grace_s)
        for proc in still:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def requeue_self(cfg: Config) -> bool:
    """Ask SLURM to requeue this job if it may still be; True when it was requeued."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if not on_slurm() or restarts >= cfg.cluster.max_requeues:
        return False
    job = os.environ["SLURM_JOB_ID"]
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    return True


def _gate_reason(run_dir: Path, stage: str) -> str:
    path = Path(run_dir) / stage / "gate.json"
    try:
        gate = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return "validation gate failed (no gate.json)"
    return "validation gate failed: " + str(gate.get("reason", gate))


def _trainer_exit(run_dir: Path, stage: str, since: float) -> tuple[Optional[int], str]:
    """The trainer's own exit code and reason from exit.json (torchrun reports any worker
    failure as 1); (None, "") when this run wrote none."""
    path = Path(run_dir) / stage / "exit.json"
    try:
        if path.stat().st_mtime < since:
            return None, ""
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None, ""
    return record.get("exit_code"), str(record.get("reason", ""))


def _run_training(cfg: Config, run_dir: Path, stage: str, signature: str) -> None:
    started = time.time()
    child = Child(train_command(cfg, run_dir, stage))
    code = child.run()
    if code == 0:
        return
    recorded, reason = _trainer_exit(run_dir, stage, started)
    if recorded is not None and recorded != 0:
        code = recorded
    preempted = code == EXIT_PREEMPTED or "SIGUSR2" in child.signals
    if preempted and "SIGTERM" not in child.signals and node_rank() == 0:
        state.write_marker(run_dir, stage, state.PREEMPTED, signature, exit_code=code,
                           signals=child.signals)
        if requeue_self(cfg):
            raise Interrupted(f"{stage}: checkpointed after {child.signals}; job requeued")
        raise StepFailed(f"{stage} was preempted (exit {code}) and may not requeue "
                         f"(restarts {os.environ.get('SLURM_RESTART_COUNT', '0')} of "
                         f"max {cfg.cluster.max_requeues}); resume it with pipeline.resume")
    if child.signals:
        raise Interrupted(f"{stage} stopped by {child.signals} (exit {code})")
    if code == EXIT_GATE:
        raise StepFailed(_gate_reason(run_dir, stage))
    detail = f": {reason}" if reason else " (see the job log)"
    raise StepFailed(f"{stage} failed with exit code {code}{detail}")


def _run_in_process(cfg: Config, run_dir: Path, name: str, shard: Optional[int],
                    num_shards: Optional[int]) -> None:
    module = importlib.import_module(dag.step(name).module)
    if name == "chunk":
        module.run_shard(cfg, run_dir, shard, num_shards)
    else:
        module.run(cfg, run_dir)


def _data_step_usr2(cfg: Config):
    def handler(signum: int, _frame) -> None:
        print("[launch] USR2 during a data step: requeueing it", file=sys.stderr, flush=True)
        if requeue_self(cfg):
            raise Interrupted("USR2 during a data step: job requeued")
        raise StepFailed("USR2 (time limit) and no requeue left")
    return handler


def run_step(run_dir: Path | str, name: str, signature: str, shard: Optional[int] = None,
             num_shards: Optional[int] = None) -> str:
    """Run one step (or shard) of the run in `run_dir`, recording its marker."""
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    kind = dag.step(name).kind
    lead = node_rank() == 0
    if lead:
        state.write_marker(run_dir, name, state.RUNNING, signature, shard, num_shards)
    try:
        if kind == "train":
            _run_training(cfg, run_dir, name, signature)
        else:
            signal.signal(signal.SIGUSR2, _data_step_usr2(cfg))
            _run_in_process(cfg, run_dir, name, shard, num_shards)
    except BaseException as exc:
        if lead:
            reason = str(exc) or type(exc).__name__
            kind_of_end = state.INTERRUPTED if isinstance(exc, Interrupted) else state.FAILED
            if not (isinstance(exc, Interrupted) and "requeued" in reason):
                state.write_marker(run_dir, name, kind_of_end, signature, shard, num_shards,
                                   reason=reason[:2000])
        raise
    if lead:
        state.write_marker(run_dir, name, state.COMPLETED, signature, shard, num_shards,
                           finished=state.now())
    return state.COMPLETED


class StepJob:
    """The picklable callable submitit runs in a SLURM job (one task per node)."""

    def __init__(self, run_dir: str, name: str, signature: str, shard: Optional[int] = None,
                 num_shards: Optional[int] = None) -> None:
        self.run_dir, self.name, self.signature = run_dir, name, signature
        self.shard, self.num_shards = shard, num_shards

    def __call__(self) -> str:
        _setup_logging()
        return run_step(self.run_dir, self.name, self.signature, self.shard, self.num_shards)


def _setup_logging() -> None:
    """INFO lines of the steps (throughput, summaries) go to the job log."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main(argv: Optional[list[str]] = None) -> int:
    _setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--step", required=True, choices=list(dag.STEPS))
    parser.add_argument("--signature", required=True)
    parser.add_argument("--shard", type=int)
    parser.add_argument("--num-shards", type=int)
    args = parser.parse_args(argv)
    try:
        run_step(args.run_dir, args.step, args.signature, args.shard, args.num_shards)
    except StepFailed as exc:
        print(f"[launch] {args.step}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
