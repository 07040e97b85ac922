"""Sharing, sweeps and continuing on the real SLURM test cluster: a sweep's points are
queued at once and the steps they share are built by one job the others wait on."""
from __future__ import annotations

import json
import time

import pytest

from pipeline import store
from tests.fixtures.slurm import SLURM
from tests.fixtures.pipeline import TINY, pipeline_cli, submit, wait_for

pytestmark = SLURM
DATA_STEPS = ["chunk", "pairs", "encode"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm-sweep") / "runs"
    grid = root.parent / "grid.yaml"
    grid.write_text("name: s\nexperiment: demo\ntarget: stage1\noverrides: [stage1.epochs=1]\n"
                    "product:\n  stage1.lr: [1.0e-3, 2.0e-3]\n")
    res = pipeline_cli("sweep", "--grid", str(grid), "--cluster", "slurm", *TINY,
                       f"run.root={root}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [root / "s-lr=0.001", root / "s-lr=0.002"]
    for run in runs:
        wait_for(run, [*DATA_STEPS, "stage1"], timeout=600)
    return {"root": root, "runs": runs, "res": res}


def test_sweep_points_are_queued_at_once_and_share_their_data_jobs(sweep):
    err = sweep["res"].stderr
    assert err.count("chunk: submitted as job") == 1          # the first point builds it ...
    for step in DATA_STEPS:                                   # ... the second waits on its jobs
        assert f"{step}: being built by job" in err
    assert err.count("stage1: submitted as job") == 2
    first, second = sweep["runs"]
    for step in DATA_STEPS:
        assert store.linked(first, step) == store.linked(second, step)
    assert store.linked(first, "stage1") != store.linked(second, "stage1")
    table = pipeline_cli("status", "--root", str(sweep["root"]), "--sweep", "s")
    assert table.returncode == 0, table.stderr
    rows = table.stdout.strip().splitlines()[2:]
    assert len(rows) == 2 and all(row.split().count("done") == 4 for row in rows), table.stdout


def test_continue_a_stage_on_slurm(sweep):
    run = sweep["runs"][0]
    old = store.linked(run, "stage1")
    res = submit("stage1", sweep["root"], run.name, "--continue", "stage1", "stage1.epochs=5",
                 "stage1.lr=5e-4")          # the points trained TINY's 3 epochs
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage1: submitted as job" in res.stderr
    for step in DATA_STEPS:
        assert f"{step}: complete with signature" in res.stderr
    rows = wait_for(run, ["stage1"], timeout=300)
    assert rows["stage1"]["state"] == "COMPLETED", rows
    new = store.linked(run, "stage1")
    assert new != old and (old / "last.pt").exists()
    epochs = [json.loads(line)["epoch"] for line in
              (new / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert epochs[-1] == 5 and epochs.count(4) == 1     # went on from epoch 3
    assert json.loads((new / "continued.json").read_text())


def test_a_run_that_only_waits_on_another_runs_job_has_its_parent_run_closed(sweep):
    root = sweep["root"]
    same = ["stage1.epochs=1", "stage1.lr=3e-3"]
    first = submit("stage1", root, "c1", *same)
    second = submit("stage1", root, "c2", *same)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "stage1: being built by job" in second.stderr       # c2 queued nothing of its own
    for run in ("c1", "c2"):
        wait_for(root / run, ["stage1"], timeout=300)
    deadline = time.monotonic() + 60
    while not (root / "c2" / "parent_end.json").exists():
        assert time.monotonic() < deadline, "c2's parent run was never closed"
        time.sleep(1)
    assert json.loads((root / "c2" / "parent_end.json").read_text())["status"] == "FINISHED"
