"""DDP on CPU (gloo): two ranks train the same model as one process with the same global
batch, keep identical replicas, two torchrun agents can act as two nodes, and a job of four
ranks that lost a worker resumes to the uninterrupted job's weights, bit for bit."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import psutil
import pytest
import torch

from tests.fixtures.train_run import (load_ckpt, make_run, run, run_stage, torchrun_cmd, env,
                                      REPO)
from jobs import train

pytestmark = pytest.mark.integration   # torchrun and training stages


def metrics_lines(run_dir, stage):
    import json
    return [json.loads(l) for l in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_rank(tmp_path, store):
    one = make_run(tmp_path / "one", f"mlflow.tracking_uri={store}")
    two = make_run(tmp_path / "two", f"mlflow.tracking_uri={store}")
    assert train.main(["--run-dir", str(one), "--stage", "stage1"]) == 0
    proc = run(torchrun_cmd(two, "stage1", 2, ("--standalone",)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_ckpt(one / "stage1" / "last.pt"), load_ckpt(two / "stage1" / "last.pt")
    assert b["world_size"] == 2 and len(b["rng"]) == 2 and a["world_size"] == 1
    assert a["step"] == b["step"] == 2 * 4       # 16 train pairs / global batch 4, 2 epochs
    for name, tensor in a["generator"].items():
        torch.testing.assert_close(b["generator"][name], tensor, rtol=1e-3, atol=1e-4,
                                   msg=f"parameter {name} differs between 1 and 2 ranks")
    # training moved the weights, so the equality above is not just the shared init
    init = make_init_generator(one)
    moved = max((a["generator"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3
    # the replicas on both ranks stayed identical (measured on every rank each epoch)
    for line in metrics_lines(two, "stage1"):
        assert line["rank_param_max_diff"] == 0.0
    # validation covered both ranks' shards: same mean val loss as one process
    for x, y in zip(a["val_history"], b["val_history"]):
        assert abs(x - y) < 1e-4 * abs(x)


def make_init_generator(run_dir):
    from jobs.generator import build_generator
    cfg = train.load_config(run_dir)
    torch.manual_seed(cfg.run.seed)
    return build_generator(cfg, cfg.stage1.enabled_parts).state_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_as_two_nodes(tmp_path, store):
    # a high learning rate makes the val loss bounce, so early stopping (patience 2) ends
    # the stage after epoch 5 of 6: both nodes must leave the loop together and exit 0
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=6",
                       "stage1.lr=0.3", "stage1.grad_clip=0.0", "stage1.early_stop_patience=2")
    port = free_port()
    procs = []
    for node in (0, 1):
        extra = ("--nnodes", "2", "--node_rank", str(node), "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "twonodes")
        procs.append(subprocess.Popen(torchrun_cmd(run_dir, "stage1", 1, extra), cwd=REPO,
                                      env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    state = load_ckpt(run_dir / "stage1" / "last.pt")
    assert state["world_size"] == 2
    history = state["val_history"]
    best = history.index(min(history))
    assert state["epoch"] == best + 1 + 2 < 6, history       # stopped 2 epochs after the best
    exit_info = json.loads((run_dir / "stage1" / "exit.json").read_text())
    assert exit_info["exit_code"] == 0 and state["epoch"] == exit_info["epoch"]
    assert all(m["rank_param_max_diff"] == 0.0 for m in metrics_lines(run_dir, "stage1"))


def test_four_ranks_resume_after_a_killed_worker_is_exact(tmp_path, store):
    # stage 3 (G and D under DDP) on 4 ranks, 4 epochs of 4 steps: more than two ranks, so
    # the all-reduce's summation order matters (deterministic=true: fixed DDP buckets)
    base = make_run(tmp_path / "base", f"mlflow.tracking_uri={store}", "stage3.epochs=4",
                    "stage3.batch_size=4", "stage3.checkpoint_every=4")
    assert run_stage(base, "stage1") == 0 and run_stage(base, "stage2") == 0
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for folder in (ref, cut):
        shutil.copytree(base, folder)
    proc = run(torchrun_cmd(ref, "stage3", 4, ("--standalone",)))
    assert proc.returncode == 0, proc.stderr[-3000:]

    job = subprocess.Popen(torchrun_cmd(cut, "stage3", 4, ("--standalone",)), cwd=REPO,
                           env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    last = cut / "stage3" / "last.pt"
    deadline = time.monotonic() + 180
    while not last.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [p for p in psutil.Process(job.pid).children(recursive=True)
               if "jobs.train" in " ".join(p.cmdline())]
    assert len(workers) == 4, f"not 4 training workers: {workers}"
    os.kill(workers[-1].pid, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0, err[-3000:]
    killed = load_ckpt(last)
    assert 1 <= killed["epoch"] < 4, killed["epoch"]

    proc = run(torchrun_cmd(cut, "stage3", 4, ("--standalone",)))   # resumes from last.pt
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_ckpt(ref / "stage3" / "last.pt"), load_ckpt(last)
    assert a["epoch"] == b["epoch"] == 4 and a["world_size"] == b["world_size"] == 4
    assert any(not torch.equal(t, killed["generator"][k]) for k, t in b["generator"].items())
    for model in ("generator", "discriminator"):
        for name, tensor in a[model].items():
            assert torch.equal(b[model][name], tensor), f"{model}.{name} differs after the resume"
