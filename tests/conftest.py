"""Shared fixtures: a tiny resolved config whose run folder and MLflow store live in tmp."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.fixtures.config import make_cfg

torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture
def tiny_cfg(tmp_path):
    return make_cfg(tmp_path)


@pytest.fixture
def run_dir(tiny_cfg):
    path = Path(tiny_cfg.run.root) / tiny_cfg.run.name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """A tiny generated mp3 corpus, made once per session: 4 songs of 6 s (seed 7) covering
    stereo/mono, 44.1/48 kHz, tagged/untagged, a subfolder and non-ASCII names."""
    from data_prep.corpus import generate_corpus
    folder = tmp_path_factory.mktemp("demo_corpus")
    generate_corpus(folder, songs=4, seconds=6.0, seed=7)
    return folder


@pytest.fixture(scope="session")
def shared_mlflow_uri(tmp_path_factory):
    """One sqlite MLflow store for the session (a copy of the empty template); pass it as
    the override f"mlflow.tracking_uri={uri}"."""
    from tests.fixtures.mlflow_template import seed_store
    return seed_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture
def empty_store(tmp_path):
    """The store make_cfg(tmp_path) logs to (tmp_path/runs/mlflow.db), put there as a copy
    of the empty template, for tests that open a store but are not about building one."""
    from tests.fixtures.mlflow_template import seed_store
    return seed_store(tmp_path / "runs")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow store per test module (the trainer's tests share it)."""
    from tests.fixtures.train_run import mlflow_store
    return mlflow_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(autouse=True)
def _restore_determinism():
    """A trainer run turns deterministic algorithms on for the process; turn them off after."""
    yield
    torch.use_deterministic_algorithms(False)

