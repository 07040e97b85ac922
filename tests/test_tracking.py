"""MLflow tracking: parent and child runs, reopening on resume, a new run on a new config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import tracking
from tests.fixtures.config import make_cfg


@pytest.mark.usefixtures("empty_store")
def test_child_runs_nest_under_parent_and_reopen_on_resume(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "runs" / "t"
    with tracking.step_run(cfg, run_dir, "pairs") as tr:
        tr.log_params({"pairs": {"gap": 0}})
        tr.log_metrics({"pairs_train": 5}, step=0)
        first = tr.run_id
    with tracking.step_run(cfg, run_dir, "pairs") as tr:   # resumed: same config
        tr.log_params({"pairs": {"gap": 0}})
        tr.log_metrics({"pairs_train": 6}, step=1)
        assert tr.run_id == first
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    parent = json.loads((run_dir / tracking.PARENT_FILE).read_text())["run_id"]
    child = client.get_run(first)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.params["pairs.gap"] == "0"
    assert [m.value for m in client.get_metric_history(first, "data/pairs_train")] == [5.0, 6.0]
    # a sqlite store keeps its artifacts beside it, not in the working directory
    assert child.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())


@pytest.mark.usefixtures("empty_store")
def test_changed_config_gets_a_new_child_run(tmp_path):
    run_dir = tmp_path / "runs" / "t"
    with tracking.step_run(make_cfg(tmp_path), run_dir, "pairs") as tr:
        tr.log_params({"gap": 0})
        first = tr.run_id
    with tracking.step_run(make_cfg(tmp_path, "pairs.gap=1"), run_dir, "pairs") as tr:
        tr.log_params({"gap": 1})   # would raise on the old run: params are write-once
        assert tr.run_id != first


def test_other_ranks_log_nothing(tmp_path):
    cfg = make_cfg(tmp_path)
    with tracking.step_run(cfg, tmp_path / "runs" / "t", "stage1", rank=1) as tr:
        assert not tr.enabled
        tr.log_metrics({"loss": 1.0})
    assert not (tmp_path / "runs" / "t" / "stage1").exists()


@pytest.mark.usefixtures("empty_store")
def test_reopened_run_with_other_params_continues_in_a_new_child(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "runs" / "t"
    with tracking.step_run(cfg, run_dir, "evaluate") as tr:
        tr.log_params({"checkpoint": "best.pt"})
        first = tr.run_id
    with tracking.step_run(cfg, run_dir, "evaluate") as tr:   # same config, other checkpoint
        assert tr.run_id == first
        tr.log_params({"checkpoint": "last.pt"})
        tr.log_metrics({"fd": 1.0})
        second = tr.run_id
    assert second != first
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    assert client.get_run(second).data.params["checkpoint"] == "last.pt"
    assert client.get_run(second).data.tags["mlflow.parentRunId"] == \
        client.get_run(first).data.tags["mlflow.parentRunId"]
    assert json.loads((run_dir / "evaluate" / tracking.CHILD_FILE).read_text())["run_id"] == second


def hold_write_lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another process holding a write transaction on the sqlite store for `seconds`."""
    code = ("import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2])); c.execute('COMMIT')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow  # holds the store's write lock for 24 s
def test_a_busy_store_is_waited_on_and_nothing_is_lost(tmp_path):
    cfg = make_cfg(tmp_path, "mlflow.busy_patience_s=60")
    run_dir = tmp_path / "runs" / "t"
    with tracking.step_run(cfg, run_dir, "pairs") as tr:
        tr.log_metrics({"pairs_train": 1}, step=0)
        # longer than the 20 s MLflow's own sqlite busy_timeout waits: the retry is needed
        holder = hold_write_lock(tmp_path / "runs" / "mlflow.db", 24.0)
        tr.log_metrics({"pairs_train": 2}, step=1)
        holder.wait(30)
        run_id = tr.run_id
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    assert [m.value for m in client.get_metric_history(run_id, "data/pairs_train")] == [1.0, 2.0]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (run_dir / "pairs" / tracking.ERRORS_FILE).exists()


@pytest.mark.slow  # holds the store's write lock for 24 s
def test_a_store_busy_beyond_patience_records_the_loss_and_the_step_goes_on(tmp_path, capsys):
    cfg = make_cfg(tmp_path, "mlflow.busy_patience_s=1")
    run_dir = tmp_path / "runs" / "t"
    work_done = False
    with tracking.step_run(cfg, run_dir, "pairs") as tr:
        holder = hold_write_lock(tmp_path / "runs" / "mlflow.db", 24.0)
        tr.log_metrics({"pairs_train": 2}, step=1)    # gives up after MLflow's 20 s + 1 s
        work_done = True
        holder.wait(30)
        run_id = tr.run_id
    assert work_done
    lines = [json.loads(x) for x in
             (run_dir / "pairs" / tracking.ERRORS_FILE).read_text().splitlines()]
    assert lines[0]["what"] == "metrics at step 1" and "database is locked" in lines[0]["error"]
    assert "not logged" in capsys.readouterr().err
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.integration
def test_drivers_starting_together_on_a_fresh_store_all_get_it(tmp_path):
    """Four processes set up one new sqlite store at the same moment: none dies on the
    table creation race, and there is one experiment."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from tests.fixtures.config import make_cfg\nfrom pipeline import tracking\n"
            "from pathlib import Path\n"
            "cfg = make_cfg(Path(sys.argv[2]))\n"
            "print(tracking.setup(cfg)[1])\n")
    repo = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, repo, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1     # one experiment id for all


@pytest.mark.slow  # holds the store's write lock for 24 s
def test_the_driver_reports_a_store_busy_beyond_patience_and_goes_on(tmp_path, capsys):
    cfg = make_cfg(tmp_path, "mlflow.busy_patience_s=1")
    run_dir = tmp_path / "runs" / "t"
    parent = tracking.tag_parent_run(cfg, run_dir, {"submit.target": "demo"})
    holder = hold_write_lock(tmp_path / "runs" / "mlflow.db", 24.0)
    tracking.end_parent_run(cfg, parent, ok=True)          # no raw traceback: reported
    assert "the parent run's end not logged: the MLflow store stayed busy" in capsys.readouterr().err
    holder.wait(30)
    tracking.end_parent_run(cfg, parent, ok=True)          # free again: it is written
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    assert client.get_run(parent).info.status == "FINISHED"
