"""MLflow under load: many jobs log metrics to one tracking server at once, and every
point they sent is there afterwards.

`burst` runs inside each job (a SLURM array task): one MLflow run, `steps` steps of
`metrics` metrics, one request per step, and its start/end times. `count` reads every
run's metric histories back.
"""
from __future__ import annotations

import os
import time


def burst(url: str, experiment: str, steps: int, metrics: int) -> dict:
    """Log steps x metrics points into a new run named after this array task."""
    import mlflow
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    mlflow.set_tracking_uri(url)
    exp = mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient()
    began = time.time()
    run = client.create_run(exp.experiment_id, run_name=f"task-{task}")
    from mlflow.entities import Metric
    for step in range(steps):
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[
            Metric(f"load/m{m}", float(step * metrics + m), now, step) for m in range(metrics)])
    client.set_terminated(run.info.run_id)
    return {"task": task, "run_id": run.info.run_id, "sent": steps * metrics,
            "began": began, "ended": time.time(), "host": os.uname().nodename}


def count(url: str, experiment: str) -> dict[str, int]:
    """run name -> number of metric points stored, over all its metrics."""
    import mlflow
    mlflow.set_tracking_uri(url)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        out[run.info.run_name] = sum(len(client.get_metric_history(run.info.run_id, key))
                                     for key in run.data.metrics)
    return out


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) spans that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    live = best = 0
    for _, change in events:
        live += change
        best = max(best, live)
    return best
