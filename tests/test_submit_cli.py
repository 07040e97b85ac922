"""The submitter's command line: bad input stops it before anything is written or queued."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration   # the submitter's command line in a subprocess

REPO = Path(__file__).resolve().parent.parent


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_config_error_stops_before_anything_is_written(tmp_path):
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local",
                   f"run.root={tmp_path}/runs", "stage1.lrr=0.1", cwd=REPO)
    assert res.returncode == 2
    assert "unknown key 'stage1.lrr'" in res.stderr and "stage1.lr" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_local_dry_run_prints_commands_and_writes_nothing(tmp_path):
    res = _run_cli("stage1", "--experiment", "demo", "--cluster", "local", "--dry-run",
                   "--gpus", "2", f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("pipeline.launch") == 2 + 1 + 1 + 1   # 2 chunk shards, 3 steps
    assert "--step stage1" in res.stdout
    assert not (tmp_path / "runs").exists()


def test_unknown_force_step_is_a_clear_error(tmp_path):
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local", "--force", "stage9",
                   f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 2 and "unknown step 'stage9'" in res.stderr
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local", "--force", "stage1",
                   f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 2 and "not a step of target prepare" in res.stderr


def test_what_a_job_would_find_out_in_the_queue_is_checked_at_submission(tmp_path):
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local", "--data",
                   str(tmp_path / "nonexistent"), f"run.root={tmp_path}/runs", cwd=REPO)
    assert res.returncode == 2
    assert f"data.source = {tmp_path / 'nonexistent'}: no such folder" in res.stderr
    assert not (tmp_path / "runs").exists()
    res = _run_cli("prepare", "--experiment", "demo", "--cluster", "local",
                   "encode.codec=encodec", "encode.pretrained=true",
                   f"encode.weights_dir={tmp_path / 'weights'}", f"run.root={tmp_path}/runs",
                   cwd=REPO)
    assert res.returncode == 2
    assert f"EnCodec weights {tmp_path / 'weights' / 'encodec_24khz-d7cc33bc.th'}" in res.stderr
    assert "make fetch-weights" in res.stderr and not (tmp_path / "runs").exists()
