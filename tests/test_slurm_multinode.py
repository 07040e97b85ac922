"""Two SLURM nodes (n1, n2: two fake GPUs each, on this host) and the faults of a chain:
a killed node, a drained node, bounded requeues, a cancelled chain, the parent run's end.

One run prepares the data and stages 1-2; the others share them through the store and
differ from each other only in settings that do not change the computation
(checkpoint_every), so each gets its own stage 3.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline import parent_run, state
from tests.fixtures.pipeline import pipeline_cli, rows_by_step, submit, wait_for, wait_running_epochs
from tests.fixtures.slurm import SLURM

pytestmark = SLURM

STAGE3 = ["stage3.epochs=4", "stage3.batch_size=4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode") / "runs"


@pytest.fixture(scope="module")
def base(root) -> Path:
    """chunk .. stage2, which every test below takes from the store."""
    res = submit("stage2", root, "base")
    assert res.returncode == 0, res.stderr
    rows = wait_for(root / "base", ["stage2"], timeout=900)
    assert rows["stage2"]["state"] == "COMPLETED", rows
    return root / "base"


def submit_stage3(root: Path, name: str, *extra: str, nodes: int = 2, gpus: int = 2):
    """Stage 3 on `nodes` x `gpus` (stages 1-2 as in the base run: one process)."""
    res = submit("stage3", root, name, f"cluster.steps.stage3.nodes={nodes}",
                 f"cluster.steps.stage3.gpus_per_node={gpus}", *STAGE3, *extra)
    assert res.returncode == 0, res.stderr
    return root / name


def generator(run_dir: Path, stage: str = "stage3") -> dict:
    return torch.load(run_dir / stage / "last.pt", weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def child_params(run_dir: Path, stage: str) -> dict:
    """The MLflow params of a step's child run."""
    import mlflow
    from pipeline import tracking
    from pipeline.launch import load_run_config
    cfg = load_run_config(run_dir)
    run_id = json.loads((run_dir / stage / tracking.CHILD_FILE).read_text())["run_id"]
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    return mlflow.MlflowClient().get_run(run_id).data.params


def parent_status(run_dir: Path) -> str:
    """The MLflow status of the run's parent run."""
    import mlflow
    from pipeline import tracking
    from pipeline.launch import load_run_config
    cfg = load_run_config(run_dir)
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    return mlflow.MlflowClient().get_run(state.load(run_dir)["mlflow_parent"]).info.status


def status_text(run_dir: Path) -> str:
    res = pipeline_cli("status", "--run", str(run_dir))
    assert res.returncode == 0, res.stderr
    return res.stdout


def wait_parent_end(run_dir: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = parent_run.recorded_end(run_dir)
        if done:
            return done
        time.sleep(1)
    raise TimeoutError(f"no {parent_run.END_FILE} in {run_dir}")


def test_nodes_and_gpus_options_shape_the_training_jobs(root):
    """`make train-stage3 NODES=2 GPUS=2` = pipeline.run stage3 --nodes 2 --gpus 2."""
    res = submit("stage3", root, "dry", "--nodes", "2", "--gpus", "2", "--dry-run")
    assert res.returncode == 0, res.stderr
    scripts = res.stdout.split("# ---- ")[1:]
    train = [s for s in scripts if s.startswith(("stage1", "stage2", "stage3"))]
    assert len(train) == 3
    for script in train:
        assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=2" in script
    assert all("#SBATCH --nodes=1" in s for s in scripts if s not in train)


@pytest.fixture(scope="module")
def two_nodes(base, root) -> dict:
    """Stage 3 on two nodes x two processes, and on one node x four processes."""
    two = submit_stage3(root, "two_nodes")
    one = submit_stage3(root, "one_node", "stage3.checkpoint_every=2", nodes=1, gpus=4)
    rows = {"two": wait_for(two, ["stage3"], timeout=900),
            "one": wait_for(one, ["stage3"], timeout=900)}
    for rows_of in rows.values():
        assert rows_of["stage3"]["state"] == "COMPLETED", rows_of
    return {"two": two, "one": one, "rows": rows}


def test_two_nodes_match_one_node(two_nodes):
    two, one = generator(two_nodes["two"]), generator(two_nodes["one"])
    assert two["world_size"] == one["world_size"] == 4
    assert len(two["nodes"]) == 2 and len(set(two["nodes"])) == 2, two["nodes"]
    assert len(one["nodes"]) == 1
    assert two["epoch"] == one["epoch"] == 4
    for name, tensor in one["generator"].items():
        torch.testing.assert_close(two["generator"][name], tensor, rtol=1e-3, atol=1e-4,
                                   msg=f"parameter {name} differs between 2 nodes and 1 node")
    print(f"max weight difference, 2 nodes x 2 vs 1 node x 4: "
          f"{max_difference(two['generator'], one['generator']):.3g}")
    params = child_params(two_nodes["two"], "stage3")
    assert params["world_size"] == "4" and params["num_nodes"] == "2"
    assert params["nodes"] == ",".join(two["nodes"])


def test_the_last_job_ends_the_parent_run(two_nodes):
    for run_dir in (two_nodes["two"], two_nodes["one"]):
        done = wait_parent_end(run_dir)
        assert done["status"] == "FINISHED", done
        assert parent_status(run_dir) == "FINISHED"
        assert status_text(run_dir).splitlines()[0] == f"run {run_dir.name}: FINISHED"


def worker_pids(job: str, node_rank: int) -> list[int]:
    """The training workers that the torchrun of SLURM job `job` on node `node_rank` started."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "jobs.train" not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(node_rank) \
                and "LOCAL_RANK" in env:
            found.append(proc.pid)
    return found




def test_killed_node_fails_clearly_and_resume_matches(two_nodes, root):
    run_dir = submit_stage3(root, "killed", "stage3.checkpoint_every=3")
    job = wait_running_epochs(run_dir, "stage3", 1)
    deadline = time.monotonic() + 120
    while not (run_dir / "stage3" / "last.pt").exists():   # epoch 1's checkpoint is saved
        assert time.monotonic() < deadline, "stage 3 never saved last.pt"
        time.sleep(0.2)
    victims = worker_pids(job, 1)
    assert victims, "no training worker of node rank 1 found"
    os.kill(victims[0], signal.SIGKILL)
    rows = wait_for(run_dir, ["stage3"], timeout=300)
    assert rows["stage3"]["state"] == "FAILED", rows
    note = rows["stage3"]["note"]
    assert "node rank 1" in note and "SIGKILL" in note, note
    print(f"status note after the kill: {note}")
    assert status_text(run_dir).splitlines()[0] == f"run killed: FAILED (stage3 failed)"
    assert wait_parent_end(run_dir)["status"] == "FAILED"
    killed_at = generator(run_dir)["epoch"]

    res = pipeline_cli("resume", "--job", job, "--run", str(run_dir))
    assert res.returncode == 0, res.stderr
    rows = wait_for(run_dir, ["stage3"], timeout=600)
    assert rows["stage3"]["state"] == "COMPLETED", rows
    mine, ref = generator(run_dir), generator(two_nodes["two"])
    assert mine["epoch"] == ref["epoch"] == 4 and killed_at < 4
    diff = max_difference(mine["generator"], ref["generator"])
    print(f"killed at epoch {killed_at}; max weight difference resumed vs uninterrupted: {diff:.3g}")
    # bit for bit: deterministic=true keeps DDP's gradient buckets fixed (jobs.train_context)
    for model in ("generator", "discriminator"):
        for key, tensor in ref[model].items():
            assert torch.equal(mine[model][key], tensor), f"{model}.{key} differs after the resume"
    assert wait_parent_end(run_dir)["status"] == "FINISHED"
    assert parent_status(run_dir) == "FINISHED"


def test_drained_node_status_says_why_jobs_wait(base, root):
    subprocess.run(["scontrol", "update", "nodename=n2", "state=drain",
                    "reason=test: n2 is drained"], check=True)
    try:
        run_dir = submit_stage3(root, "drained", "stage3.checkpoint_every=4",
                                "cluster.partition=multi")
        deadline = time.monotonic() + 60
        while True:
            row = rows_by_step(run_dir)["stage3"]
            if row["state"] == "PENDING" and "n2" in row["note"]:
                break
            assert time.monotonic() < deadline, row
            time.sleep(1)
        text = status_text(run_dir)
        print(text)
        assert text.splitlines()[0] == "run drained: RUNNING"
        assert "node n2 drained: test: n2 is drained" in text
        waits = ("ReqNodeNotAvail", "Resources", "Nodes required", "PartitionNodeLimit")
        assert any(word in row["note"] for word in waits), row
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], check=True)
    rows = wait_for(run_dir, ["stage3"], timeout=600)       # the node is back: it runs
    assert rows["stage3"]["state"] == "COMPLETED", rows


def wait_restarted(run_dir: Path, stage: str, restarts: int, timeout: float = 300) -> dict:
    """The step's marker once its job runs again after `restarts` requeues (or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mark = state.markers(run_dir, stage)[0] or {}
        if mark.get("restarts") == restarts and mark.get("state") in ("RUNNING", "FAILED"):
            return mark
        time.sleep(0.5)
    raise TimeoutError(f"{stage} was not restarted {restarts} times: {mark}")


def test_requeues_are_bounded_and_counted_by_cause(base, root):
    name = "requeues"
    res = submit("stage1", root, name, "stage1.epochs=200", "stage1.early_stop_patience=0",
                 "stage1.checkpoint_every=7", "cluster.max_requeues=2")
    assert res.returncode == 0, res.stderr
    run_dir = root / name
    job = wait_running_epochs(run_dir, "stage1", 1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)          # time limit
    mark = wait_restarted(run_dir, "stage1", 1)
    assert mark["requeues"] == {"preemption": 0, "time_limit": 1}, mark
    time.sleep(3)
    subprocess.run(["scontrol", "requeue", job], check=True)               # preemption
    mark = wait_restarted(run_dir, "stage1", 2)
    assert mark["requeues"] == {"preemption": 1, "time_limit": 1}, mark
    assert "requeued: preemption 1, time limit 1" in rows_by_step(run_dir)["stage1"]["note"]
    time.sleep(3)
    subprocess.run(["scontrol", "requeue", job], check=True)               # one too many
    rows = wait_for(run_dir, ["stage1"], timeout=300)
    assert rows["stage1"]["state"] == "FAILED", rows
    mark = state.markers(run_dir, "stage1")[0]
    assert mark["requeues"] == {"preemption": 2, "time_limit": 1}, mark
    note = rows["stage1"]["note"]
    assert "requeued 3 times (preemption 2, time limit 1)" in note, note
    assert "max_requeues=2" in note


def test_cancelled_chain_resumes_without_rerunning_finished_steps(base, root):
    name = "cancelled"
    res = submit("stage2", root, name, "stage1.checkpoint_every=2", "stage2.epochs=8",
                 "stage2.gate.kl_floor_tolerance=null")
    assert res.returncode == 0, res.stderr
    run_dir = root / name
    wait_running_epochs(run_dir, "stage2", 1)
    before = state.load(run_dir)["steps"]
    done_marks = {s: state.markers(run_dir, s)[0] for s in ("stage1",)}
    assert done_marks["stage1"]["state"] == "COMPLETED"
    res = pipeline_cli("cancel", "--run", str(run_dir))
    assert res.returncode == 0, res.stderr
    rows = wait_for(run_dir, ["stage2"], timeout=120)
    assert rows["stage2"]["state"] in ("CANCELLED", "INTERRUPTED"), rows
    assert "CANCELLED" in status_text(run_dir).splitlines()[0]

    res = pipeline_cli("resume", "--job", "stage2", "--run", str(run_dir))
    assert res.returncode == 0, res.stderr
    rows = wait_for(run_dir, ["stage2"], timeout=900)
    assert rows["stage2"]["state"] == "COMPLETED", rows
    after = state.load(run_dir)["steps"]
    for step in ("chunk", "pairs", "encode", "stage1"):      # finished before: not run again
        assert after[step].get("history") == before[step].get("history"), step
    assert state.markers(run_dir, "stage1")[0] == done_marks["stage1"]
    assert len(after["stage2"]["history"]) == 2
    assert wait_parent_end(run_dir)["status"] == "FINISHED"
    assert status_text(run_dir).splitlines()[0] == f"run {name}: FINISHED"
