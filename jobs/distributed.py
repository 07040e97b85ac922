"""The process group for one training job: who am I (rank), how many are we, which device.

Under torchrun the environment holds RANK / WORLD_SIZE / LOCAL_RANK; without them the job
is one process. NCCL on CUDA, gloo on CPU. All collective helpers also work (as no-ops)
in a single process, so the training loop reads the same either way.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(timeout_s: int = 600) -> DistInfo:
    """Join the process group if torchrun started us; pick the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, device)


def node_list() -> list[str]:
    """The job's nodes, as pipeline.launch passes them (PIPELINE_NODES); else this host."""
    import socket
    names = os.environ.get("PIPELINE_NODES", "")
    return names.split(",") if names else [socket.gethostname()]


def teardown(together: bool = False) -> None:
    """Leave the process group; `together`: first wait (at most a minute) for every rank,
    so none tears its connections down while another still uses them."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    if together:
        try:
            if tdist.get_backend() == "gloo":
                tdist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                tdist.barrier()
        except RuntimeError as exc:
            print(f"[distributed] ranks did not meet before leaving: {exc}", file=sys.stderr)
    tdist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a short list of numbers over all ranks (float64 for exact counts)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if the flag is set on any rank (e.g. a preemption signal)."""
    return all_reduce_sum([1.0 if flag else 0.0], info)[0] > 0


def from_main(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision, broadcast so that every rank leaves a loop at the same step."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=info.device)
    tdist.broadcast(t, src=0)
    return bool(t.item())


def gather(obj: Any, info: DistInfo) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        tdist.barrier()


class StopSignal:
    """Remembers that SIGUSR2 or SIGTERM arrived; the loop checks it at step boundaries.

    SLURM sends USR2 ahead of the time limit (and TERM on preemption); saving in the
    handler itself could interrupt a half-done optimizer step, so the handler only sets a flag.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str = ""
        self._previous: dict = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name

    @property
    def set(self) -> bool:
        return bool(self.received)
