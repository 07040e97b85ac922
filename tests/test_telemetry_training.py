"""End to end: a tiny real stage-1 training logs the telemetry and MLflow system metrics."""
from __future__ import annotations

import json
import subprocess

import pytest
from mlflow import MlflowClient

from jobs.train import load_config
from pipeline.tracking import tracking_uri
from tests.fixtures import train_run as tf


@pytest.mark.integration
@pytest.mark.slow  # a training subprocess plus a fresh MLflow store: about 40 s here
def test_telemetry_and_system_metrics_in_the_run_of_a_tiny_training(tmp_path):
    # 12 epochs: long enough (a few seconds) for the system-metrics monitor to publish;
    # a one-second stage ended before its first publish on an idle machine
    run_dir = tf.make_run(tmp_path, "mlflow.system_metrics=true", "stage1.epochs=12")
    env = tf.env()
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.1"
    env["MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"] = "1"
    done = subprocess.run(tf.train_cmd(run_dir, "stage1"), cwd=tf.REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    run_id = json.loads((run_dir / "stage1" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri(load_config(run_dir)))
    epochs = load_config(run_dir).stage1.epochs
    for name in ("system/samples_per_s", "system/data_wait_share", "system/peak_mem_mb",
                 "train/grad_norm_g_before", "train/grad_norm_g_after"):
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), name
    for m in client.get_metric_history(run_id, "system/samples_per_s"):
        assert m.value > 0
    for m in client.get_metric_history(run_id, "system/data_wait_share"):
        assert 0.0 <= m.value <= 1.0
    for m in client.get_metric_history(run_id, "system/peak_mem_mb"):
        assert m.value > 50  # a python process with torch loaded holds far more than 50 MiB
    lines = [json.loads(x) for x in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [x["samples_per_s"] > 0 for x in lines] == [True] * epochs

    params = client.get_run(run_id).data.params   # the trainer counts its models' parameters
    sizes = json.loads((run_dir / "stage1" / "model_size.json").read_text())
    assert int(params["model.generator_params"]) == sizes["generator_params"] > 1000

    system = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    assert "system/system_memory_usage_megabytes" in system
