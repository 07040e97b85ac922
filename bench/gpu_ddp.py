"""The GPU check's multi-process part: an all-reduce over every GPU present (NCCL; gloo on
the CPU) and the trainer under torchrun, whose replicas must stay equal.

    python -m torch.distributed.run --standalone --nproc_per_node 4 -m bench.gpu_ddp --out r.json

Each worker joins the group through the pipeline's own jobs.distributed.setup (which
leaves one process alone; the check then starts a group of one itself, so NCCL is
initialised even on a single GPU), checks an all-reduce of known values, and times a
large one. Rank 0 writes the result.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bus_bandwidth(nbytes: int, seconds: float, world: int) -> float:
    """GB/s a ring all-reduce moved per rank: 2 (n - 1) / n of the buffer in `seconds`."""
    if seconds <= 0:
        return 0.0
    factor = 2 * (world - 1) / world if world > 1 else 1.0
    return nbytes * factor / seconds / 1e9


def worker(out: Path, megabytes: int, repeats: int) -> int:
    """Join the group, check an all-reduce of known values, time a large one; rank 0 writes."""
    import torch
    import torch.distributed as tdist

    from jobs import distributed

    info = distributed.setup()
    if not tdist.is_initialized():   # one process: setup() runs without a group
        tdist.init_process_group("nccl" if info.device.type == "cuda" else "gloo",
                                 rank=info.rank, world_size=info.world_size,
                                 timeout=datetime.timedelta(seconds=120))
    backend = tdist.get_backend()
    world = tdist.get_world_size()
    values = torch.full((1024,), float(info.rank + 1), device=info.device)
    tdist.all_reduce(values)
    expected = world * (world + 1) / 2
    correct = bool(torch.all(values == expected).item())
    big = torch.ones(megabytes * 2**20 // 4, device=info.device)
    tdist.all_reduce(big)   # warm-up (NCCL builds its rings on the first call)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        tdist.all_reduce(big)
    sync()
    seconds = (time.perf_counter() - start) / repeats
    correct &= bool(torch.all(big == world ** (repeats + 1)).item())
    if info.rank == 0:
        out.write_text(json.dumps({
            "backend": backend, "world_size": world, "device": str(info.device),
            "correct": correct, "expected": expected, "megabytes": megabytes,
            "ms": seconds * 1e3, "bus_gb_s": bus_bandwidth(big.numel() * 4, seconds, world),
            "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if info.device.type == "cuda" else []}))
    tdist.barrier()
    tdist.destroy_process_group()
    return 0 if correct else 1


def env(threads: int | None) -> dict:
    """A child's environment: the repo importable, no stale torchrun variables."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    if threads:
        out["OMP_NUM_THREADS"] = str(threads)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def torchrun(nproc: int, module_args: list[str], log: Path, timeout_s: float,
             threads: int | None = None) -> tuple[int, float]:
    """`torchrun --standalone --nproc_per_node nproc -m <module_args>`; (exit code, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), "-m", *module_args]
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env(threads), stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def log_tail(log: Path, chars: int = 600) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return " ".join(text[-chars:].split())


def check_allreduce(nproc: int, work: Path, megabytes: int, timeout_s: float,
                    threads: int | None = None) -> dict:
    """The all-reduce worker on nproc processes; its result, or why there is none."""
    out, log = work / "allreduce.json", work / "allreduce.log"
    out.unlink(missing_ok=True)
    code, seconds = torchrun(nproc, ["bench.gpu_ddp", "--out", str(out), "--megabytes",
                                     str(megabytes)], log, timeout_s, threads)
    if code != 0 or not out.exists():
        return {"status": "FAILED", "wall_s": seconds,
                "reason": f"torchrun exit {code}: {log_tail(log)}"}
    result = json.loads(out.read_text())
    result["status"] = "ok" if result["correct"] else "FAILED"
    result["wall_s"] = seconds
    if not result["correct"]:
        result["reason"] = "all-reduce gave wrong sums"
    return result


def check_trainer(run_dir: Path, stage: str, nproc: int, timeout_s: float,
                  threads: int | None = None) -> dict:
    """`jobs.train` on nproc ranks under torchrun: its exit, and whether every epoch logged
    equal replicas (rank_param_max_diff, the trainer's own gather of every rank's weights)."""
    log = run_dir / f"torchrun-{stage}.log"
    code, seconds = torchrun(nproc, ["jobs.train", "--run-dir", str(run_dir), "--stage", stage],
                             log, timeout_s, threads)
    metrics = run_dir / stage / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()
              if line.strip()] if metrics.exists() else []
    exit_file = run_dir / stage / "exit.json"
    reason = json.loads(exit_file.read_text())["reason"] if exit_file.exists() else log_tail(log)
    spread = max((e.get("rank_param_max_diff", 0.0) for e in epochs), default=None)
    ok = code == 0 and bool(epochs) and spread == 0.0
    return {"status": "ok" if ok else "FAILED", "exit_code": code, "wall_s": seconds,
            "epochs": len(epochs), "rank_param_max_diff": spread,
            "samples_per_s": epochs[-1].get("samples_per_s") if epochs else None,
            "reason": "" if ok else (reason if code else
                                     f"replicas apart by {spread} (must be 0)")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    return worker(args.out, args.megabytes, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
