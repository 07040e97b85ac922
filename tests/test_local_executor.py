"""The local executor's two ways to run a step: forked from the warm server, or a subprocess."""
from __future__ import annotations

import sys

import pytest

from pipeline import local_executor
from tests.fixtures.config import make_cfg

pytestmark = pytest.mark.integration   # the fork server and subprocess steps


@pytest.mark.skipif(not local_executor.WARM, reason="the fork server is used on Linux only")
def test_forked_step_logs_to_its_file_and_returns_its_exit_code(tmp_path):
    ex = local_executor.LocalExecutor(make_cfg(tmp_path), tmp_path)
    log = tmp_path / "logs" / "x.log"
    cmd = [sys.executable, "-m", "pipeline.launch", "--run-dir", str(tmp_path), "--step",
           "no-such-step", "--signature", "s"]
    assert ex.run_command(cmd, log) == 2            # argparse refuses the step name
    text = log.read_text()
    assert "pipeline.launch" in text.splitlines()[1]   # the command line heads the log
    assert "invalid choice: 'no-such-step'" in text     # the child's stderr went to the log


def test_subprocess_fallback_logs_and_returns_its_exit_code(tmp_path, monkeypatch):
    monkeypatch.setattr(local_executor, "WARM", False)
    ex = local_executor.LocalExecutor(make_cfg(tmp_path), tmp_path)
    log = tmp_path / "logs" / "y.log"
    cmd = [sys.executable, "-c", "print('from the step', flush=True); raise SystemExit(3)"]
    assert ex.run_command(cmd, log) == 3
    assert "from the step" in log.read_text()
    assert ex.call(sum, [1, 2]) == 3             # bookkeeping runs in this process
