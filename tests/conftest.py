"""Shared fixtures: a tiny resolved config whose run folder and MLflow store live in tmp."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline import config

torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


def make_cfg(root: Path, *overrides: str, experiment: str = "demo"):
    """The demo config with its run root (and so its sqlite MLflow store) under `root`."""
    return config.load(experiment, "local", [f"run.root={root}/runs", "run.name=t",
                                             "mlflow.system_metrics=false", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return make_cfg(tmp_path)


@pytest.fixture
def run_dir(tiny_cfg):
    path = Path(tiny_cfg.run.root) / tiny_cfg.run.name
    path.mkdir(parents=True, exist_ok=True)
    return path
