"""The tracking server behind MLflow's basic-auth app (pipeline.mlflow_server): a request
without credentials is refused, jobs log with the credentials the submitter passes them in
the environment, and the credentials never appear in a job script."""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from pipeline.mlflow_server import CredentialsError, make_credentials, read_credentials
from tests.fixtures.pipeline import REPO, submit
from tests.fixtures.network import free_port
from tests.fixtures.slurm import needs_slurm


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    port, creds = free_port(), tmp / "private" / "mlflow-credentials"
    env = dict(os.environ, MUSICGEN_MLFLOW_CREDENTIALS=str(creds))
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.mlflow_server", "--root", str(tmp),
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except urllib.error.HTTPError:
            break                                  # up (and asking for credentials)
        except OSError:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
    yield {"url": url, "creds": creds, "tmp": tmp, "env": env}
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def api(url: str, path: str, auth: tuple[str, str] | None = None, body: dict | None = None):
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read() or b"{}")


@pytest.mark.integration
def test_the_server_made_private_credentials_and_refuses_requests_without_them(auth_server):
    creds = auth_server["creds"]
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    user, password = read_credentials(creds)
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(auth_server["url"], "experiments/search", body={"max_results": 5})
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        api(auth_server["url"], "experiments/search", (user, "not-the-password"),
            {"max_results": 5})
    assert wrong.value.code == 401
    status, _ = api(auth_server["url"], "experiments/search", (user, password), {"max_results": 5})
    assert status == 200


@pytest.mark.integration
def test_jobs_log_with_the_credentials_from_the_file_and_no_script_holds_them(auth_server):
    url, tmp, env = auth_server["url"], auth_server["tmp"], auth_server["env"]
    root = tmp / "runs"
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)          # the credentials file is known; the MLFLOW_* vars are not
    try:
        res = submit("prepare", root, "authed", f"mlflow.tracking_uri={url}",
                     "mlflow.experiment=private", cluster="local")
        dry = submit("all", root, "script", f"mlflow.tracking_uri={url}", "--dry-run",
                     cluster="local")
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert res.returncode == 0, res.stderr[-3000:]
    user, password = read_credentials(auth_server["creds"])
    _, found = api(url, "runs/search", (user, password),
                   {"experiment_ids": [api(url, "experiments/get-by-name?experiment_name=private",
                                           (user, password))[1]["experiment"]["experiment_id"]]})
    names = {r["info"]["run_name"] for r in found["runs"]}
    assert {"authed", "pairs", "encode"} <= names
    assert password not in dry.stdout and password not in dry.stderr
    assert not [p for p in root.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]


def test_a_credentials_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "creds"
    make_credentials(path)
    assert read_credentials(path)[0] == "admin"
    path.chmod(0o640)
    with pytest.raises(CredentialsError, match="chmod 600"):
        read_credentials(path)


@needs_slurm
def test_sixteen_jobs_of_an_array_log_to_the_server_and_nothing_is_lost(auth_server):
    import submitit

    from bench.mlflow_load import burst, count, most_at_once
    url, creds = auth_server["url"], auth_server["creds"]
    user, password = read_credentials(creds)
    tasks, steps, metrics = 16, 60, 5
    old = dict(os.environ)
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    try:   # sbatch exports the submitter's environment: the jobs get the credentials
        ex = submitit.SlurmExecutor(folder=auth_server["tmp"] / "load-logs" / "%j")
        ex.update_parameters(cpus_per_task=1, mem="300M", time=15, array_parallelism=tasks)
        jobs = ex.map_array(burst, [url] * tasks, ["load"] * tasks, [steps] * tasks,
                            [metrics] * tasks)
        results = [job.result() for job in jobs]
        stored = count(url, "load")
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert sorted(int(r["task"]) for r in results) == list(range(tasks))
    assert stored == {f"task-{i}": steps * metrics for i in range(tasks)}
    overlap = most_at_once([(r["began"], r["ended"]) for r in results])
    print(f"{tasks} jobs on {sorted({r['host'] for r in results})}, at most {overlap} logging "
          f"at once; {tasks * steps * metrics} points sent, {sum(stored.values())} stored")
    assert overlap >= 2
