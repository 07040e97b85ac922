"""The whole DAG on the local executor (subprocesses on this machine), skip and resume."""
from __future__ import annotations

import json
import re

import pytest

from pipeline import state
from tests.fixtures.pipeline import pipeline_cli, rows_by_step, store_version, submit

pytestmark = pytest.mark.integration   # the whole DAG and its faults, as local subprocesses

ALL = ["chunk", "pairs", "encode", "stage1", "stage2", "stage3", "audit"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("local") / "runs"
    res = submit("all", root, "full", cluster="local")
    return {"root": root, "run_dir": root / "full", "res": res}


def test_local_dag_completes_with_the_same_outputs_and_state(local_run):
    res, run_dir = local_run["res"], local_run["run_dir"]
    assert res.returncode == 0, res.stderr[-3000:]
    rows = rows_by_step(run_dir)
    assert {s: rows[s]["state"] for s in ALL} == {s: "COMPLETED" for s in ALL}
    data = state.load(run_dir)
    assert data["cluster"] == "local" and data["target_steps"] == ALL
    assert all(data["steps"][s]["job_id"].startswith("local-") for s in ALL)
    assert (run_dir / "logs" / "chunk" / "chunk-1-of-2.log").exists()
    assert (run_dir / "logs" / "stage2" / "stage2.log").exists()
    assert (run_dir / "stage3" / "last.pt").exists() and (run_dir / "audit" / "audit.csv").exists()
    assert json.loads((run_dir / "mlflow_parent.json").read_text())["run_id"]
    # executor overhead per step: the subprocess's wall time minus the time inside the step
    walls = {m[0]: float(m[1]) for m in re.findall(r"\] (\w+): ran as job \S+.*\(([\d.]+) s\)", res.stderr)}
    for step in ALL:
        marks = state.markers(run_dir, step, 2 if step == "chunk" else None)
        inside = sum(m["finished"] - m["started"] for m in marks)
        assert 0 < inside < walls[step]
        print(f"{step}: {walls[step]:.1f} s in the executor, {inside:.1f} s inside the step")


def test_second_prepare_skips_every_step(local_run):
    run_dir = local_run["run_dir"]
    before = state.load(run_dir)["steps"]
    res = submit("prepare", local_run["root"], "full", cluster="local")
    assert res.returncode == 0, res.stderr
    for step in ("chunk", "pairs", "encode"):
        assert f"{step}: complete with signature" in res.stderr
    assert " ran as job " not in res.stderr
    after = state.load(run_dir)["steps"]
    assert all(after[s]["history"] == before[s]["history"] for s in ("chunk", "pairs", "encode"))


def test_force_reruns_the_step_and_its_dependents(local_run):
    res = submit("prepare", local_run["root"], "full", "--force", "encode", cluster="local")
    assert res.returncode == 0, res.stderr
    assert "chunk: complete with signature" in res.stderr
    assert "pairs: complete with signature" in res.stderr
    assert "encode: ran as job" in res.stderr


def test_failed_step_stops_the_chain_and_resume_finishes_it(local_run):
    root = local_run["root"]
    version = store_version(root, "broken", "pairs", "pairs.stride=2")
    (version / "train.jsonl").mkdir(parents=True)   # a folder where pairs writes a file
    res = submit("prepare", root, "broken", "pairs.stride=2", cluster="local")
    assert res.returncode == 1
    assert "chunk: complete with signature" in res.stderr   # shared with run "full"
    assert "pairs: FAILED" in res.stderr and "encode" not in res.stderr.split("pairs: FAILED")[1]
    rows = rows_by_step(root / "broken")
    assert rows["pairs"]["state"] == "FAILED" and "encode" not in rows

    (version / "train.jsonl").rmdir()
    res = pipeline_cli("resume", "--job", "pairs", "--run", str(root / "broken"))
    assert res.returncode == 0, res.stderr
    rows = rows_by_step(root / "broken")
    assert rows["pairs"]["state"] == rows["encode"]["state"] == "COMPLETED"
    again = pipeline_cli("resume", "--job", "pairs", "--run", str(root / "broken"))
    assert again.returncode == 0 and "pairs: complete; nothing to resume" in again.stderr


def test_a_file_where_a_step_link_goes_is_an_error_and_is_kept(local_run):
    root = local_run["root"]
    (root / "stray").mkdir()
    (root / "stray" / "pairs").write_text("a user's notes")
    res = submit("prepare", root, "stray", cluster="local")
    assert res.returncode == 2 and "stray/pairs is in the way" in res.stderr, res.stderr[-2000:]
    assert (root / "stray" / "pairs").read_text() == "a user's notes"


def test_failed_gate_under_torchrun_reports_its_reason_and_stops_the_chain(local_run):
    root = local_run["root"]
    res = submit("stage2", root, "gated", "--gpus", "2", "stage1.gate.min_improvement=0.99",
                 "stage1.epochs=1", cluster="local")
    assert res.returncode == 1
    # torchrun turns the worker's exit 3 into 1; the launcher reads the trainer's own record
    assert "stage1: FAILED (exit code 1: validation gate failed: " in res.stderr, res.stderr[-3000:]
    assert "needed 99.0%" in res.stderr
    assert json.loads((root / "gated" / "stage1" / "gate.json").read_text())["passed"] is False
    assert json.loads((root / "gated" / "stage1" / "exit.json").read_text())["exit_code"] == 3
    rows = rows_by_step(root / "gated")
    assert rows["stage1"]["state"] == "FAILED" and "stage2" not in rows


def test_cancel_stops_the_driver_and_its_running_step(local_run):
    """pipeline.cancel on a local run: the driver forwards SIGTERM to the step it forked,
    the step is recorded CANCELLED, the chain stops, and no training process is left."""
    import subprocess
    import sys
    import time

    import psutil

    from tests.fixtures.pipeline import REPO, TINY
    root = local_run["root"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "stage2", "--experiment", "demo", "--cluster",
         "local", "--run", "cancelled", f"run.root={root}", *TINY, "stage1.epochs=500"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = root / "cancelled"
    deadline = time.monotonic() + 120
    while not (run_dir / "stage1" / "last.pt").exists():   # training is under way
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.5)
    res = pipeline_cli("cancel", "--run", str(run_dir))
    assert res.returncode == 0, res.stderr
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 1, err[-2000:]
    assert "stage1: CANCELLED" in err and "stage2: ran" not in err
    rows = rows_by_step(run_dir)
    assert rows["stage1"]["state"] in ("CANCELLED", "INTERRUPTED") and "stage2" not in rows
    left = [p for p in psutil.process_iter(["cmdline"])
            if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]


def test_sigterm_to_a_local_stage3_then_resume_continues_from_last_pt(local_run):
    """SIGTERM to the driver while stage 3 trains: the trainer saves last.pt and stops;
    pipeline.resume continues from it to the last epoch, and no epoch is trained twice."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    from tests.fixtures.pipeline import REPO, TINY
    root = local_run["root"]
    run_dir = root / "termed"
    total = 12   # enough that the signal lands mid-stage: it is sent once epoch 1 is saved
    epochs = [f"stage3.epochs={total}", "stage3.checkpoint_every=6", "stage3.sample_every=0"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "stage3", "--experiment", "demo", "--cluster",
         "local", "--run", "termed", f"run.root={root}", *TINY, *epochs],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300   # stages 1-2 first; a loaded machine is slow
    while not (run_dir / "stage3" / "last.pt").exists():   # training is under way
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 1, err[-2000:]
    stopped = torch.load(run_dir / "stage3" / "last.pt", weights_only=True)["epoch"]
    assert 1 <= stopped < total
    res = pipeline_cli("resume", "--job", "stage3", "--run", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert rows_by_step(run_dir)["stage3"]["state"] == "COMPLETED"
    assert torch.load(run_dir / "stage3" / "last.pt", weights_only=True)["epoch"] == total
    lines = [json.loads(x) for x in (run_dir / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, total + 1))
