"""The pipeline against the real single-node SLURM cluster (slurm_templates/start_test_cluster.sh).

One tiny run goes through the whole DAG; the other tests start from copies of its finished
steps, so each of them only runs the jobs it is about.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline import state
from tests.fixtures.slurm import SLURM
from tests.fixtures.pipeline import (pipeline_cli, store_version, submit, wait_for,
                                     wait_running_epochs)

pytestmark = SLURM
ALL = ["chunk", "pairs", "encode", "stage1", "stage2", "stage3", "audit"]


def queued_jobs() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm") / "runs"


@pytest.fixture(scope="module")
def full_run(root) -> dict:
    """The whole DAG, submitted at once; returns its run folder, submit output and rows."""
    began = time.monotonic()
    res = submit("all", root, "full")
    submit_s = time.monotonic() - began
    assert res.returncode == 0, res.stderr
    run_dir = root / "full"
    rows = wait_for(run_dir, ALL, timeout=900)
    return {"run_dir": run_dir, "res": res, "rows": rows, "submit_s": submit_s}


def test_dry_run_submits_nothing(root):
    before = queued_jobs()
    res = submit("all", root, "dry", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("#!/bin/bash") == len(ALL)
    assert "#SBATCH --array=0-1%2" in res.stdout                  # chunk: 2 shards
    assert "#SBATCH --dependency=afterok:<chunk>" in res.stdout.replace("'", "")
    assert "#SBATCH --requeue" in res.stdout
    assert queued_jobs() == before
    assert not (root / "dry").exists()


def test_full_dag_is_queued_at_once_and_completes(full_run):
    run_dir, rows = full_run["run_dir"], full_run["rows"]
    assert {s: rows[s]["state"] for s in ALL} == {s: "COMPLETED" for s in ALL}, rows
    data = state.load(run_dir)
    # every step went in with an afterok dependency on its upstream job, before any ran
    for up, down in zip(ALL, ALL[1:]):
        assert data["steps"][down]["after"] == [data["steps"][up]["job_id"]]
    submitted = [data["steps"][s]["submitted_at"] for s in ALL]
    first_start = min(m["started"] for m in state.markers(run_dir, "chunk", 2))
    assert max(submitted) < first_start + 5, "the chain was not queued at once"
    assert "watch: python -m pipeline.status" in full_run["res"].stdout
    assert (run_dir / "stage3" / "last.pt").exists() and (run_dir / "audit" / "audit.csv").exists()
    assert "val_loss" in rows["stage1"]["metric"]
    print(f"submitting the whole DAG took {full_run['submit_s']:.1f} s")


def test_array_job_splits_chunking(full_run):
    run_dir = full_run["run_dir"]
    entry = state.load(run_dir)["steps"]["chunk"]
    base = entry["job_id"]
    assert entry["array_tasks"] == [f"{base}_0", f"{base}_1"]
    marks = state.markers(run_dir, "chunk", 2)
    assert sorted(m["array_task"] for m in marks) == ["0", "1"]
    songs = []
    for shard in (0, 1):
        lines = (run_dir / "chunk" / f"manifest-{shard}-of-2.jsonl").read_text().splitlines()
        songs.append({json.loads(line)["song_id"] for line in lines})
    assert songs[0] and songs[1] and not songs[0] & songs[1]
    assert len(songs[0] | songs[1]) == 4


def test_second_submit_skips_complete_steps(full_run, root):
    res = submit("stage2", root, "full")
    assert res.returncode == 0, res.stderr
    for step in ("chunk", "pairs", "encode", "stage1", "stage2"):
        assert f"{step}: complete with signature" in res.stderr
    assert "submitted" not in res.stderr




def test_usr2_checkpoints_requeues_and_matches_an_uninterrupted_run(full_run, root):
    # Ten epochs, so the signal lands while training runs (three tiny epochs can end
    # between the poll and the signal); the reference is the same stage, uninterrupted.
    # The two runs differ only in how often they save epoch files, so the store gives each
    # its own stage 1 (a run with equal settings would wait on the other's job instead).
    longer = "stage1.epochs=10"
    for name, every in (("requeue", "1"), ("requeue_ref", "5")):
        res = submit("stage1", root, name, longer, f"stage1.checkpoint_every={every}")
        assert res.returncode == 0, res.stderr
    run_dir = root / "requeue"
    job = wait_running_epochs(run_dir, "stage1", 1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    rows = wait_for(run_dir, ["stage1"], timeout=300)
    assert rows["stage1"]["state"] == "COMPLETED", rows
    marker = state.markers(run_dir, "stage1")[0]
    assert marker["restarts"] == 1 and marker["job_id"] == job     # same job, requeued once
    exits = (run_dir / "logs" / "stage1" / job / f"{job}_0_log.err").read_text()
    assert "preempted (SIGUSR2)" in exits
    ref_rows = wait_for(root / "requeue_ref", ["stage1"], timeout=300)
    assert ref_rows["stage1"]["state"] == "COMPLETED", ref_rows
    mine = torch.load(run_dir / "stage1" / "last.pt", weights_only=True)
    ref = torch.load(root / "requeue_ref" / "stage1" / "last.pt", weights_only=True)
    assert mine["epoch"] == ref["epoch"] == 10
    assert mine["generator"].keys() == ref["generator"].keys()
    for key in ref["generator"]:
        assert torch.equal(mine["generator"][key], ref["generator"][key]), key


def test_failed_step_blocks_dependents_and_resume_completes(full_run, root):
    run_dir = root / "broken"
    other = "stage3.lr=2e-3"          # its own stage 3 (and audit); the rest comes from the store
    blocker = store_version(root, "broken", "stage3", other, cluster="slurm") / "last.pt"
    blocker.mkdir(parents=True)       # a folder where stage 3 keeps its checkpoint
    res = submit("all", root, "broken", other)
    assert res.returncode == 0, res.stderr
    assert "stage2: complete with signature" in res.stderr
    rows = wait_for(run_dir, ["stage3", "audit"], timeout=200)
    assert rows["stage3"]["state"] == "FAILED", rows
    assert rows["audit"]["state"] == "PENDING" and "never starts" in rows["audit"]["note"]
    failed_job = rows["stage3"]["job"]

    bad = pipeline_cli("resume", "--job", "999999", "--run", str(run_dir))
    assert bad.returncode == 2 and "job '999999'" in bad.stderr
    done = pipeline_cli("resume", "--job", "stage2", "--run", str(run_dir))
    assert done.returncode == 0 and "stage2: complete; nothing to resume" in done.stderr

    blocker.rmdir()                                                # the cause, fixed
    res = pipeline_cli("resume", "--job", failed_job, "--run", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert f"cancelling the dependents of the failed attempt: {rows['audit']['job']}" in res.stderr
    rows = wait_for(run_dir, ["stage3", "audit"], timeout=300)
    assert rows["stage3"]["state"] == rows["audit"]["state"] == "COMPLETED", rows
    entry = state.load(run_dir)["steps"]["audit"]
    assert len(entry["history"]) == 2 and entry["after"] == [rows["stage3"]["job"]]


def test_stage3_with_four_gpus_runs_four_processes(full_run, root):
    res = submit("stage3", root, "gpus4", "--gpus", "4", "stage3.batch_size=4")
    assert res.returncode == 0, res.stderr
    rows = wait_for(root / "gpus4", ["stage3"], timeout=240)
    assert rows["stage3"]["state"] == "COMPLETED", rows
    ckpt = torch.load(root / "gpus4" / "stage3" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 4
    job = rows["stage3"]["job"]
    script = next((root / "gpus4" / "logs" / "stage3").glob(f"{job}/*_submission.sh"), None)
    if script is None:    # submitit keeps the script in the folder named by %j
        script = next((root / "gpus4" / "logs" / "stage3").glob("**/*submission.sh"))
    assert "#SBATCH --gpus-per-node=4" in script.read_text()


def test_a_config_edited_after_submission_does_not_change_the_queued_jobs(full_run, root,
                                                                         tmp_path):
    """Jobs read the resolved config written at submission, never the YAML files: an
    experiment file edited while the chain waits in the queue changes nothing of it."""
    from tests.fixtures.pipeline import TINY
    exp = tmp_path / "exp.yaml"
    exp.write_text("extends: demo\nstage1: {epochs: 2}\n")
    res = pipeline_cli("run", "stage1", "--experiment", str(exp), "--cluster", "slurm",
                       "--run", "edited", f"run.root={root}", *[t for t in TINY
                                                                if not t.startswith("stage1.epochs")])
    assert res.returncode == 0, res.stderr
    exp.write_text("extends: demo\nstage1: {epochs: 5}\n")    # edited while it is queued
    rows = wait_for(root / "edited", ["stage1"], timeout=240)
    assert rows["stage1"]["state"] == "COMPLETED", rows
    lines = (root / "edited" / "stage1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
