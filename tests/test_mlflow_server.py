"""A real `mlflow server` on loopback: a small pipeline logs to it over HTTP, and the
parent run, the step (child) runs, their metrics and artifacts are read back."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.network import free_port
from tests.fixtures.pipeline import submit

pytestmark = pytest.mark.integration   # an MLflow server and a pipeline logging to it

MLFLOW = Path(sys.executable).parent / "mlflow"



@pytest.fixture
def server(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        assert time.monotonic() < deadline, "mlflow server did not come up"
        time.sleep(0.5)
    yield url, tmp_path
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_pipeline_logs_parent_and_child_runs_over_http(server):
    url, tmp = server
    root = tmp / "runs"
    res = submit("prepare", root, "viahttp", f"mlflow.tracking_uri={url}",
                 "mlflow.experiment=served", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (root / "mlflow.db").exists()           # nothing went to a local sqlite file

    import mlflow
    client = mlflow.MlflowClient(url)
    parent_id = json.loads((root / "viahttp" / "mlflow_parent.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["submit.target"] == "prepare"
    assert parent.data.tags["submit.cluster"] == "local"
    exp = client.get_experiment_by_name("served")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    names = {c.info.run_name: c for c in children}
    assert {"chunk/shard-0-of-2", "chunk/shard-1-of-2", "pairs", "encode"} <= set(names)
    shard = names["chunk/shard-0-of-2"]
    assert shard.data.metrics["data/ok"] == 2 and shard.data.params["shard"] == "0"
    history = client.get_metric_history(shard.info.run_id, "data/chunks")
    assert history and history[-1].value > 0
    arts = [a.path for a in client.list_artifacts(shard.info.run_id)]
    assert arts, "no artifacts logged"
    local = client.download_artifacts(shard.info.run_id, arts[0], str(tmp / "dl"))
    assert Path(local).stat().st_size > 0
    # artifacts were proxied by the server into its own destination folder
    assert any((tmp / "artifacts").rglob(Path(arts[0]).name))
