"""Helpers for the pipeline tests: tiny overrides, submitting through the CLI, waiting."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pipeline import status

REPO = Path(__file__).resolve().parent.parent

# The demo experiment made tiny: 4 songs of 12 s, a 16-wide one-layer model, 1-3 epochs.
TINY = [
    "data.demo_songs=4", "data.demo_seconds=12", "data.workers=1", "mlflow.system_metrics=false",
    "model.transformer.d_model=16", "model.transformer.layers=1", "model.transformer.heads=2",
    "model.transformer.ff_mult=2",
    "model.vae.latent_channels=4", "model.discriminator.channels=8",
    "model.discriminator.layers=2", "model.discriminator.minibatch_features=2",
    "stage1.epochs=3", "stage2.epochs=1", "stage3.epochs=2", "stage3.gan.d_pretrain_epochs=1",
    "stage3.gan.adv_ramp_epochs=1", "stage3.curriculum.start_epoch=2", "stage3.sample_every=0",
    "audit.batch_size=4", "generate.n=2", "generate.griffin_lim_iters=4",
]
for _s in ("stage1", "stage2", "stage3"):
    TINY += [f"{_s}.batch_size=2", f"{_s}.warmup_steps=0", f"{_s}.deterministic=true",
             f"{_s}.gate.min_improvement=-100.0", f"{_s}.checkpoint_every=1",
             f"{_s}.gate.beat_baselines=false"]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "LOST"}


def pipeline_cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline.<module> args` from the repo; output captured."""
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def submit(target: str, root: Path, name: str, *extra: str, cluster: str = "slurm",
           timeout: float = 600) -> subprocess.CompletedProcess:
    return pipeline_cli("run", target, "--experiment", "demo", "--cluster", cluster,
                        "--run", name, f"run.root={root}", *TINY, *extra, timeout=timeout)


def rows_by_step(run_dir: Path) -> dict[str, dict]:
    return {r["step"]: r for r in status.step_rows(run_dir)}


def wait_for(run_dir: Path, steps: list[str], timeout: float = 300, poll: float = 2.0) -> dict:
    """Poll the run's status until every step in `steps` ended (or never will start)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = rows_by_step(run_dir)
        done = [s for s in steps if s in rows and (rows[s]["state"] in TERMINAL or
                                                   "never starts" in rows[s]["note"])]
        if len(done) == len(steps):
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"steps not finished after {timeout} s: "
                               f"{ {s: rows.get(s) for s in steps} }")
        time.sleep(poll)


def store_version(root: Path, name: str, step: str, *extra: str, cluster: str = "local",
                  target: str = "all") -> Path:
    """The store folder that `submit(target, root, name, *extra)` will use for `step`."""
    from pipeline import config, dag, store
    cfg = config.load("demo", cluster, [*TINY, f"run.root={root}", f"run.name={name}", *extra])
    sig = dag.signatures(cfg, dag.plan(target))[step]
    return store.store_root(cfg) / step / store.version_name(sig)


