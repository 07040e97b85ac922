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
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional


from pipeline import config as config_mod
from pipeline import dag, parent_run, state
from pipeline import run_folder as rf
from pipeline.atomic import atomic_write_json
from pipeline.exit_codes import EXIT_GATE, EXIT_PREEMPTED
from pipeline.malloc import reuse_freed_memory
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


def job_nodes() -> list[str]:
    """The allocation's node names in order (this host's name outside SLURM)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return [socket.gethostname()]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                         capture_output=True, text=True).stdout.split()
    return out or [socket.gethostname()]


def node_address(name: str) -> str:
    """A node's address (NodeAddr): nodes may share a host under other names."""
    res = subprocess.run(["scontrol", "-o", "show", "node", name], capture_output=True, text=True)
    found = re.search(r"\bNodeAddr=(\S+)", res.stdout)
    return found.group(1) if res.returncode == 0 and found else name


def first_node() -> str:
    """Address of the allocation's first node: the c10d rendezvous host."""
    if not os.environ.get("SLURM_JOB_NODELIST"):
        return socket.gethostname()
    return node_address(job_nodes()[0])


def rdzv_port(job: str) -> int:
    """The job's rendezvous port: distinct for jobs running at once (ids within 1000)."""
    return RDZV_PORT_BASE + int(job) % 1000


def train_command(cfg: Config, run_dir: Path, stage: str) -> list[str]:
    """`jobs.train` for one process, or torchrun for several (GPUs per node x nodes).

    On CPU-only nodes the process count still follows gpus_per_node (gloo backend). Across
    nodes, node rank 0 hosts the c10d rendezvous store on its address."""
    res = cfg.cluster.steps[stage]
    nproc, nodes = max(1, res.gpus_per_node), max(1, res.nodes)
    entry = ["-m", "jobs.train", "--run-dir", str(run_dir), "--stage", stage]
    if nproc * nodes == 1:
        return [sys.executable, *entry]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if on_slurm():
        job = os.environ["SLURM_JOB_ID"]
        rank = node_rank()
        launcher += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_id={job}",
                     f"--rdzv_endpoint={first_node()}:{rdzv_port(job)}",
                     f"--rdzv_conf=is_host={1 if rank == 0 else 0}", f"--node_rank={rank}"]
    else:
        launcher += ["--standalone", "--nnodes=1"]
    return launcher + entry


def _ignore_usr2() -> None:
    # torchrun dies on USR2 by default; ignored, it survives while its workers (which
    # install their own handler) checkpoint. The disposition is inherited by the workers
    # until they replace it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _worker_end(rank: str, exitcode: str) -> str:
    """"rank 3 killed by SIGKILL" or "rank 3 exit code 1" from torchrun's exitcode field."""
    try:
        code = int(exitcode.split()[0])
    except (IndexError, ValueError):
        return f"rank {rank} failed"
    if code < 0:
        try:
            return f"rank {rank} killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"rank {rank} killed by signal {-code}"
    return f"rank {rank} exit code {code}"


class Child:
    """A child process tree whose descendants receive the signals this process gets."""

    def __init__(self, cmd: list[str], log_prefix: str = "") -> None:
        self.cmd = cmd
        self.signals: list[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self.deaths: list[str] = []     # torchrun's root cause of a failure
        self._reader: Optional[threading.Thread] = None

    def _pass_stderr(self) -> None:
        """Copy the child's stderr to ours, keeping torchrun's root cause of a failure."""
        rank, root_cause = "?", False
        for raw in iter(self.proc.stderr.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            line = raw.decode(errors="replace").strip()
            if "Root Cause" in line:
                root_cause = True
            elif root_cause and line.startswith("rank") and ":" in line:
                rank = line.split(":", 1)[1].split()[0]
            elif root_cause and line.startswith("exitcode") and ":" in line:
                self.deaths.append(_worker_end(rank, line.split(":", 1)[1]))
                root_cause = False

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
            self.proc = subprocess.Popen(self.cmd, start_new_session=True, preexec_fn=_ignore_usr2,
                                         stderr=subprocess.PIPE)
            self._reader = threading.Thread(target=self._pass_stderr, daemon=True)
            self._reader.start()
            while True:
                try:
                    code = self.proc.wait()
                    self._reader.join(timeout=10)
                    return code
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
    if not on_slurm() or restarts() >= cfg.cluster.max_requeues:
        return False
    job = os.environ["SLURM_JOB_ID"]
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    return True


def restarts() -> int:
    """How often SLURM has started this job again (requeues of any kind)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


# This job's requeues so far: time_limit (USR2, requeued by the job itself) and
# preemption (TERM: scontrol requeue or a preempting job; every other restart).
REQUEUES = {"preemption": 0, "time_limit": 0}


def count_requeues(old: Optional[dict]) -> dict[str, int]:
    """The requeues of this job, from its previous marker and SLURM_RESTART_COUNT."""
    same_job = old is not None and old.get("job_id") == os.environ.get("SLURM_JOB_ID", "")
    timed = int((old or {}).get("requeues", {}).get("time_limit", 0)) if same_job else 0
    timed = min(timed, restarts())
    return {"preemption": restarts() - timed, "time_limit": timed}


def check_requeues(cfg: Config, name: str) -> None:
    """Fail a job that SLURM has requeued more often than cluster.max_requeues."""
    if restarts() > cfg.cluster.max_requeues:
        raise StepFailed(f"{name}: requeued {restarts()} times (preemption "
                         f"{REQUEUES['preemption']}, time limit {REQUEUES['time_limit']}), "
                         f"more than cluster.max_requeues={cfg.cluster.max_requeues}; "
                         "resume it with pipeline.resume")


def mark(run_dir: Path, name: str, st: str, signature: str, shard: Optional[int] = None,
         num_shards: Optional[int] = None, **extra) -> None:
    """write_marker with this job's requeue counts."""
    state.write_marker(run_dir, name, st, signature, shard, num_shards,
                       requeues=dict(REQUEUES), **extra)


def requeue_for_time_limit(cfg: Config, run_dir: Path, name: str, signature: str,
                           shard: Optional[int] = None, num_shards: Optional[int] = None,
                           **extra) -> bool:
    """Count and record a time-limit requeue, then ask SLURM for it; False if refused."""
    if not on_slurm() or restarts() >= cfg.cluster.max_requeues:
        return False
    REQUEUES["time_limit"] += 1
    mark(run_dir, name, state.PREEMPTED, signature, shard, num_shards, **extra)
    if requeue_self(cfg):
        return True
    REQUEUES["time_limit"] -= 1
    return False


def this_node() -> str:
    """This node's name in the allocation."""
    nodes, rank = job_nodes(), node_rank()
    return nodes[rank] if rank < len(nodes) else socket.gethostname()


def write_node_record(run_dir: Path, stage: str, child: "Child", code: int) -> None:
    """This node's end of a failed training run, for the lead's reason."""
    rank = node_rank()
    atomic_write_json(rf.node_record(run_dir, stage, rank), {
        "node": this_node(), "rank": rank,
        "exit_code": code, "deaths": child.deaths, "signals": child.signals,
        "job_id": os.environ.get("SLURM_JOB_ID", ""), "at": time.time()})


def other_nodes_report(run_dir: Path, stage: str, since: float, wait_s: float = 20.0) -> str:
    """What the job's other nodes said about their failure ("" for a one-node job)."""
    others = range(1, max(1, len(job_nodes())))
    deadline = time.time() + wait_s
    found: dict[int, dict] = {}
    while others and len(found) < len(others):
        for rank in others:
            record = state.read_marker(rf.node_record(run_dir, stage, rank))
            if record and record.get("at", 0) >= since and \
                    record.get("job_id") == os.environ.get("SLURM_JOB_ID", ""):
                found[rank] = record
        if len(found) < len(others):
            if time.time() >= deadline:
                break
            time.sleep(1)
    parts = []
    for rank, rec in sorted(found.items()):
        what = ", ".join(rec["deaths"]) or f"exit {rec['exit_code']}"
        parts.append(f"node {rec['node']} (node rank {rank}): {what}")
    return "; ".join(parts)


def _gate_reason(run_dir: Path, stage: str) -> str:
    gate = rf.read_gate(run_dir, stage)
    if gate is None:
        return f"validation gate failed (no {rf.GATE})"
    return "validation gate failed: " + str(gate.get("reason", gate))


def _trainer_exit(run_dir: Path, stage: str, since: float) -> tuple[Optional[int], str]:
    """The trainer's own exit code and reason from exit.json (torchrun reports any worker
    failure as 1); (None, "") when this run wrote none."""
    path = rf.stage_file(run_dir, stage, rf.EXIT)
    try:
        if path.stat().st_mtime < since:
            return None, ""
    except FileNotFoundError:
        return None, ""
    record = rf.read_exit(run_dir, stage)
    if record is None:
        return None, ""
    return record.get("exit_code"), str(record.get("reason", ""))


def _run_training(cfg: Config, run_dir: Path, stage: str, signature: str) -> None:
    started = time.time()
    os.environ["PIPELINE_NODES"] = ",".join(job_nodes())    # into the checkpoint and MLflow
    child = Child(train_command(cfg, run_dir, stage))
    code = child.run()
    if code == 0 and node_rank() == 0:
        others = other_nodes_report(run_dir, stage, started, wait_s=0)
        if others:     # this node ended well but another did not
            raise StepFailed(f"{stage} failed on another node: {others}")
    if code == 0:
        return
    if node_rank() > 0:
        write_node_record(run_dir, stage, child, code)
    recorded, reason = _trainer_exit(run_dir, stage, started)
    if recorded is not None and recorded != 0:
        code = recorded
    preempted = code == EXIT_PREEMPTED or "SIGUSR2" in child.signals
    if preempted and "SIGTERM" not in child.signals and node_rank() == 0:
        if requeue_for_time_limit(cfg, run_dir, stage, signature, exit_code=code,
                                  signals=child.signals):
            raise Interrupted(f"{stage}: checkpointed after {child.signals}; job requeued")
        raise StepFailed(f"{stage} was preempted (exit {code}) and may not requeue "
                         f"(restarts {restarts()} of max {cfg.cluster.max_requeues}); "
                         "resume it with pipeline.resume")
    if child.signals:
        raise Interrupted(f"{stage} stopped by {child.signals} (exit {code})")
    if code == EXIT_GATE:
        raise StepFailed(_gate_reason(run_dir, stage))
    deaths = [f"node {this_node()} (node rank {node_rank()}): {', '.join(child.deaths)}"] \
        if child.deaths else []
    others = other_nodes_report(run_dir, stage, started) if node_rank() == 0 else ""
    where = "; ".join(deaths + ([others] if others else []))
    detail = f": {reason}" if reason else " (see the job log)"
    raise StepFailed(f"{stage} failed with exit code {code}{detail}"
                     f"{'; ' + where if where else ''}")


def _run_in_process(cfg: Config, run_dir: Path, name: str, shard: Optional[int],
                    num_shards: Optional[int]) -> None:
    step = dag.step(name)
    if step.reuses_memory:
        reuse_freed_memory()   # this job's process only (tests calling the step never tune)
    module = importlib.import_module(step.module)
    if num_shards is not None:
        module.run_shard(cfg, run_dir, shard, num_shards)
    else:
        module.run(cfg, run_dir)


def _data_step_usr2(cfg: Config, *where):
    def handler(signum: int, _frame) -> None:
        print("[launch] USR2 during a data step: requeueing it", file=sys.stderr, flush=True)
        if requeue_for_time_limit(cfg, *where):
            raise Interrupted("USR2 during a data step: job requeued")
        raise StepFailed("USR2 (time limit) and no requeue left")
    return handler


def run_step(run_dir: Path | str, name: str, signature: str, shard: Optional[int] = None,
             num_shards: Optional[int] = None) -> str:
    """Run one step (or shard) of the run in `run_dir`, recording its marker; the job that
    ends the run's chain closes its MLflow parent run."""
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    kind = dag.step(name).kind
    lead = node_rank() == 0
    where = (run_dir, name, signature, shard, num_shards)
    REQUEUES.update(count_requeues(state.read_marker(state.marker_path(*where[:2], shard,
                                                                        num_shards))))
    if lead:
        mark(run_dir, name, state.RUNNING, signature, shard, num_shards)
    try:
        check_requeues(cfg, name)
        if kind == "train":
            _run_training(cfg, run_dir, name, signature)
        else:
            signal.signal(signal.SIGUSR2, _data_step_usr2(cfg, *where))
            _run_in_process(cfg, run_dir, name, shard, num_shards)
    except BaseException as exc:
        if lead:
            reason = str(exc) or type(exc).__name__
            kind_of_end = state.INTERRUPTED if isinstance(exc, Interrupted) else state.FAILED
            if not (isinstance(exc, Interrupted) and "requeued" in reason):
                mark(run_dir, name, kind_of_end, signature, shard, num_shards,
                     reason=reason[:2000])
            if kind_of_end == state.FAILED:
                parent_run.close_quietly(cfg, run_dir, name)
        raise
    if lead:
        mark(run_dir, name, state.COMPLETED, signature, shard, num_shards,
             finished=state.now())
        parent_run.close_quietly(cfg, run_dir, name)
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
