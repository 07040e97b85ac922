"""One driver per run: a second driver on the same run is refused, naming the first."""
from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from pipeline.driver_lock import LOCK_FILE, RunBusy, driver_lock
from tests.fixtures.config import make_cfg

pytestmark = pytest.mark.integration   # drivers in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hold(run_dir, ready, release) -> None:
    with driver_lock(run_dir):
        ready.set()
        release.wait(60)


def test_a_second_driver_on_the_same_run_is_refused_with_the_first_ones_pid(tmp_path):
    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "runs" / cfg.run.name
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    first = ctx.Process(target=hold, args=(run_dir, ready, release))
    first.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunBusy, match=rf"pid {first.pid} on {socket.gethostname()}"):
            with driver_lock(run_dir):
                pass
        done = subprocess.run([sys.executable, "-m", "pipeline.run", "prepare", "--cluster",
                               "local", "--experiment", "demo", f"run.root={tmp_path}/runs",
                               f"run.name={cfg.run.name}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert f"another driver is working on {run_dir} (pid {first.pid}" in done.stderr
        assert not (run_dir / "chunk").exists()       # it touched nothing of the run
    finally:
        release.set()
        first.join(30)
    with driver_lock(run_dir):                         # released when its holder ends
        assert (run_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_a_killed_driver_leaves_no_stale_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    first = ctx.Process(target=hold, args=(tmp_path, ready, release))
    first.start()
    assert ready.wait(60)
    first.kill()
    first.join(30)
    with driver_lock(tmp_path):
        pass


def test_a_killed_local_driver_shows_its_running_step_as_driver_gone(tmp_path):
    import json
    import signal
    import time

    from pipeline import status

    cfg = make_cfg(tmp_path)
    run_dir = tmp_path / "runs" / cfg.run.name
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "stage1", "--cluster", "local", "--experiment",
         "demo", f"run.root={tmp_path}/runs", f"run.name={cfg.run.name}", "data.demo_songs=4",
         "data.demo_seconds=12", "stage1.epochs=500", "mlflow.system_metrics=false"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = {}
            if (run_dir / "pipeline.json").exists():
                steps = json.loads((run_dir / "pipeline.json").read_text()).get("steps", {})
            if steps.get("stage1", {}).get("state") == "RUNNING":
                break
            time.sleep(0.2)
        else:
            pytest.fail("stage1 never started")
        time.sleep(1.0)
        driver.kill()                                  # the driver only; its step runs on
        driver.wait(30)
        rows = {r["step"]: r for r in status.step_rows(run_dir)}
        assert rows["stage1"]["state"] == "LOST"
        assert rows["stage1"]["note"].startswith(f"driver gone (pid {driver.pid} on ")
        assert rows["chunk"]["state"] == "COMPLETED"
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
