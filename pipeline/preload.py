"""What the local executor's fork server imports once, so that each step starts warm.

A fresh interpreter spends about 2 s importing torch, 1.6 s importing MLflow's sqlite
store and 0.5 s configuring its SQLAlchemy mappers before a step does any work; a process
forked from a server that has done all of this starts in milliseconds. Nothing here opens
a file, a database or a thread: a forked child must not share any of those.
"""
from __future__ import annotations

import importlib

import mlflow  # noqa: F401
import numpy  # noqa: F401
import sqlalchemy.orm
import torch  # noqa: F401
from mlflow.store.tracking import sqlalchemy_store  # noqa: F401

import pipeline.launch  # noqa: F401
from pipeline import dag

for _step in dag.STEPS.values():      # every step's code (training runs in its own process)
    if _step.kind != "train":
        importlib.import_module(_step.module)

sqlalchemy.orm.configure_mappers()   # class-level work, done once instead of per step
