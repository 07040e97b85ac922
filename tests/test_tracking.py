"""MLflow tracking: parent and child runs, reopening on resume, a new run on a new config."""
from __future__ import annotations

import json

import mlflow

from pipeline import tracking
from tests.conftest import make_cfg


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
    assert [m.value for m in client.get_metric_history(first, "pairs_train")] == [5.0, 6.0]
    # a sqlite store keeps its artifacts beside it, not in the working directory
    assert child.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())


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
