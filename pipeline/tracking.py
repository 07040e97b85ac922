"""MLflow tracking: one parent run per pipeline run, one child run per step.

Steps run in separate jobs (often on other nodes), so the child is tied to its parent by
the `mlflow.parentRunId` tag, with the parent's id read from the run folder. Only rank 0
logs; on other ranks every call is a no-op. A step resumed with the same resolved config
keeps its child run; a step rerun with a changed config gets a new one (MLflow params are
write-once).

For reading in the UI: the experiment is tagged as a training one (not GenAI traces); the
parent run carries headline params, the resolved config and every step's headline results
(pipeline.run_summary); metric names are grouped (train/, val/, gan/, system/, data/, ...).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline import dag, run_folder, run_summary
from pipeline.atomic import atomic_write_json
from pipeline.file_lock import file_lock
from pipeline.schema import Config

PARENT_FILE = run_folder.MLFLOW_PARENT
CHILD_FILE = run_folder.MLFLOW_CHILD
# MLflow 3's UI opens an experiment on the view its `mlflow.experimentKind` tag names; an
# untagged one may open on GenAI traces and prompts instead of the runs table
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: Config) -> str:
    """The configured URI, or a sqlite file in the run root (absolute, so jobs agree)."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    root = Path(cfg.run.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def setup(cfg: Config):
    """(mlflow, the experiment's id) with the tracking URI set and the experiment made."""
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    import mlflow
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:"):
        return mlflow, _training_view(mlflow, mlflow.set_experiment(cfg.mlflow.experiment))
    # drivers and jobs starting together on a fresh sqlite store would race to create its
    # tables (one dies with a raw SQLAlchemy error): one process at a time sets it up
    with file_lock(Path(uri[len("sqlite:///"):]).with_suffix(".setup.lock")):
        return setup_sqlite_store(cfg, mlflow)


def setup_sqlite_store(cfg: Config, mlflow: Any):
    if mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None:
        # a sqlite store would put artifacts in ./mlruns of whatever folder a job starts
        # in; keep them beside the store instead
        location = (Path(cfg.run.root).resolve() / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            pass   # another job created it first
    return mlflow, _training_view(mlflow, mlflow.set_experiment(cfg.mlflow.experiment))


def _training_view(mlflow: Any, exp: Any) -> str:
    """Tag the experiment to open on its training runs (unless a kind is already chosen);
    its id."""
    if KIND_TAG not in (exp.tags or {}):
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def _flat_params(cfg_section: Any, prefix: str = "") -> dict:
    out: dict = {}
    if isinstance(cfg_section, dict):
        for key, value in cfg_section.items():
            out.update(_flat_params(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = str(cfg_section)[:500]
    return out


def ensure_parent_run(cfg: Config, run_dir: Path) -> str:
    """Create (once) the pipeline's parent run and record its id in the run folder (a busy
    store is waited on for mlflow.busy_patience_s)."""
    path = Path(run_dir) / PARENT_FILE
    if path.exists():
        return json.loads(path.read_text())["run_id"]
    return patiently(lambda: _create_parent(cfg, run_dir, path), cfg.mlflow.busy_patience_s)


def _create_parent(cfg: Config, run_dir: Path, path: Path) -> str:
    mlflow, exp_id = setup(cfg)
    client = mlflow.MlflowClient()
    tags = {"pipeline.run_dir": str(Path(run_dir).resolve()), **run_summary.sweep_tags(cfg)}
    run = client.create_run(exp_id, run_name=cfg.run.name, tags=tags)   # RUNNING, no end time
    atomic_write_json(path, {"run_id": run.info.run_id, "uri": tracking_uri(cfg)})
    _log_headline_params(client, run.info.run_id, cfg, run_dir)
    return run.info.run_id


def tag_parent_run(cfg: Config, run_dir: Path, tags: dict) -> Optional[str]:
    """Create the parent run if needed, tag it (e.g. with the submission's options) and log
    its headline params and resolved config (log_parent_params); its id. A store still busy
    after the patience is reported, not raised: the driver goes on, and the steps make the
    parent run when the store is free (None here)."""
    def tag() -> str:
        parent = ensure_parent_run(cfg, run_dir)
        mlflow, _ = setup(cfg)
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_tag(parent, key, str(value))
        _log_headline_params(client, parent, cfg, run_dir)
        return parent
    return _or_report(lambda: patiently(tag, cfg.mlflow.busy_patience_s), "the parent run")


def log_parent_params(cfg: Config, run_dir: Path) -> Optional[str]:
    """Headline params, sweep tags, git commit and config.resolved.yaml on the parent run
    (created if needed); its id, or None when the store stayed busy."""
    return tag_parent_run(cfg, run_dir, {})


def _log_headline_params(client: Any, run_id: str, cfg: Config, run_dir: Path) -> None:
    """Params are write-once: new ones are logged, and one that a later submission changed
    keeps its first value, with the new one in the tag `changed.<name>`."""
    from mlflow.entities import Param
    commit = run_summary.git_commit()
    wanted = {k: str(v)[:500] for k, v in
              (run_summary.headline_params(cfg) | {"git_commit": commit}).items()}
    logged = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in wanted.items() if k not in logged]
    if new:
        client.log_batch(run_id, params=new)
    tags = {f"changed.{k}": v for k, v in wanted.items() if k in logged and logged[k] != v}
    tags |= run_summary.sweep_tags(cfg)
    if "mlflow.note.content" not in client.get_run(run_id).data.tags:   # the description
        tags["mlflow.note.content"] = run_summary.description(cfg, run_dir)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    config = Path(run_dir) / "config.resolved.yaml"
    if config.exists():
        client.log_artifact(run_id, str(config))


def log_parent_results(cfg: Config, run_dir: Path, metrics: dict, tags: dict,
                       step: str = "") -> None:
    """Headline results of `step` (e.g. stage1/best_val_loss, tag audit.verdict) onto the
    parent run, and onto those of the runs sharing the step (sharing_parents), from the
    step's job: on SLURM the driver is gone when steps end."""
    from mlflow.entities import Metric
    if not metrics and not tags:
        return
    mlflow, _ = setup(cfg)
    now = int(time.time() * 1000)
    # 4 decimals: a headline, readable in the runs table; the step runs keep every digit
    batch = [Metric(k, round(float(v), 4), now, 0) for k, v in metrics.items() if v is not None]
    for client, parent in [(mlflow.MlflowClient(), ensure_parent_run(cfg, run_dir))] + [
            (mlflow.MlflowClient(uri), run_id) for uri, run_id in sharing_parents(run_dir, step)]:
        if batch:
            client.log_batch(parent, metrics=batch)
        for key, value in tags.items():
            client.set_tag(parent, key, str(value))


def sharing_parents(run_dir: Path, step: str) -> list[tuple[str, str]]:
    """(store URI, parent run id) of the other runs under the same root whose `step` links
    to the same store version as this run's: a step built once for several runs (a
    sweep's shared stages) gives its results to each of their parent runs."""
    top = step.split("/")[0]
    mine = Path(run_dir) / top
    if not mine.is_symlink():
        return []
    out = []
    for other in sorted(Path(run_dir).resolve().parent.iterdir()):
        link, record = other / top, other / PARENT_FILE
        if (other != Path(run_dir).resolve() and link.is_symlink() and record.exists()
                and link.resolve() == mine.resolve()):
            found = json.loads(record.read_text())
            out.append((found["uri"], found["run_id"]))
    return out


def runs_page(cfg: Config, ui: str = "http://127.0.0.1:5000") -> str:
    """The UI address of the experiment's runs table, in MLflow 3's "Model training" view
    (its default view is GenAI; the browser remembers the choice)."""
    mlflow, exp_id = setup(cfg)
    return f"{ui}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def end_parent_run(cfg: Config, run_id: str, ok: bool) -> None:
    """Mark the parent run FINISHED or FAILED (local runs, once every step has ended); a
    store still busy after the patience is reported, not raised."""
    def end() -> None:
        mlflow, _ = setup(cfg)
        mlflow.MlflowClient().set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    _or_report(lambda: patiently(end, cfg.mlflow.busy_patience_s), "the parent run's end")


def _or_report(call: Callable[[], Any], what: str) -> Any:
    """call(), or None with a one-line report when the store stayed busy."""
    try:
        return call()
    except Exception as exc:
        if not is_busy(exc):
            raise
        print(f"[tracking] {what} not logged: the MLflow store stayed busy "
              f"({str(exc).splitlines()[0][:200]})", file=sys.stderr)
        return None


ERRORS_FILE = run_folder.TRACKING_ERRORS
BUSY = ("database is locked", "database table is locked")


def is_busy(exc: BaseException) -> bool:
    """A busy store (another process holds a sqlite write lock), not a real error."""
    return any(text in str(exc) for text in BUSY)


def patiently(call: Callable[[], Any], patience_s: float) -> Any:
    """call(), retried with growing pauses while the store is busy, for up to patience_s."""
    deadline, pause = time.monotonic() + patience_s, 0.2
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_busy(exc) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def record_lost_call(errors: Path, what: str, exc: BaseException) -> None:
    """Append a call that could not be logged to `errors` (one JSON line) and say so."""
    line = json.dumps({"what": what, "error": f"{type(exc).__name__}: {exc}"[:2000],
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    with open(errors, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    print(f"[tracking] {what} not logged ({type(exc).__name__}: "
          f"{str(exc).splitlines()[0][:200]}); recorded in {errors}", file=sys.stderr)


def log_step_results(cfg: Config, run_dir: Path, step: str) -> None:
    """`step`'s headline results onto the parent run. step_run does this when a step
    finishes; the driver calls it for a step it skips as already complete (e.g. outputs
    reused from the store), so the parent run still shows them."""
    def log() -> None:
        log_parent_results(cfg, run_dir, *run_summary.step_results(cfg, run_dir, step))
    _or_report(lambda: patiently(log, cfg.mlflow.busy_patience_s), f"{step}'s headline results")


# --- metric names, grouped for the UI -------------------------------------------------

DATA_STEPS = ("chunk", "pairs", "encode")
STEP_GROUPS = {"audit": ("audit/", "audit_"), "evaluate": ("eval/", ""),
               "generate": ("generate/", "")}
SYSTEM = ("samples_per_s", "data_wait_share", "peak_mem_mb", "rank_param_max_diff", "cuda_")
GAN = ("train_d_", "train_adv", "train_g_loss", "train_feature_matching", "train_r1",
       "grad_norm_d_", "lr_d", "adv_weight")
# training steps, first match wins: (name prefixes, group, prefix dropped from the name)
TRAINING_RULES = (
    (SYSTEM, "system/", ""),
    (GAN, "gan/", "train_"),
    (("val_",), "val/", "val_"),
    (("best_val_", "gate_"), "val/", ""),
    (("",), "train/", "train_"),
)


def metric_name(name: str, step: str = "") -> str:
    """The MLflow name of a metric logged by `step`: grouped as data/, audit/, eval/ by
    step, else system/, gan/, val/, train/ by name; names holding a "/" are kept."""
    kind = step.split("/")[0]
    if "/" in name:
        return name
    if kind in DATA_STEPS:
        return "data/" + name
    if kind in STEP_GROUPS:
        group, drop = STEP_GROUPS[kind]
        return group + (name[len(drop):] if drop and name.startswith(drop) else name)
    for prefixes, group, drop in TRAINING_RULES:
        if name.startswith(prefixes):
            return group + (name[len(drop):] if drop and name.startswith(drop) else name)
    return name


class StepTracker:
    """Logs for one step; every method is a no-op when disabled (rank != 0).

    A busy store is waited on for `patience_s`; a call that still fails is written to
    `errors` (one JSON line: what, error) and reported, and the step goes on: its work is
    done, and a metric that could not be written must not turn it into a failure."""

    def __init__(self, mlflow_module: Any = None, new_run: Optional[Callable[[], str]] = None,
                 patience_s: float = 0.0, errors: Optional[Path] = None, step: str = ""):
        self._mlflow = mlflow_module
        self._new_run = new_run
        self._patience = patience_s
        self._errors = errors
        self.step = step
        self.run_id: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self._mlflow is not None

    def _call(self, what: str, call: Callable[[], Any]) -> None:
        try:
            patiently(call, self._patience)
        except Exception as exc:
            if self._errors is None:
                raise
            record_lost_call(self._errors, what, exc)

    def log_params(self, params: dict) -> None:
        """Log params; if a reopened run holds other values (params are write-once in
        MLflow, e.g. another checkpoint evaluated), continue in a new child run."""
        if self.enabled:
            self._call("params", lambda: self._log_params(_flat_params(params)))

    def _log_params(self, flat: dict) -> None:
        logged = self._mlflow.get_run(self.run_id).data.params
        if self._new_run and any(logged.get(k, v) != v for k, v in flat.items()):
            self.run_id = self._new_run()
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        """Log metrics under their grouped names (metric_name)."""
        if self.enabled:
            clean = {metric_name(k, self.step): float(v) for k, v in metrics.items()
                     if v is not None}
            self._call(f"metrics at step {step}",
                       lambda: self._mlflow.log_metrics(clean, step=step))

    def log_artifact(self, path: Path | str, artifact_path: Optional[str] = None) -> None:
        if self.enabled and Path(path).exists():
            self._call(f"artifact {path}", lambda: self._mlflow.log_artifact(
                str(path), artifact_path=artifact_path))

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._call("tags", lambda: self._mlflow.set_tags({k: str(v) for k, v in tags.items()}))


@contextlib.contextmanager
def step_run(cfg: Config, run_dir: Path, step: str, rank: int = 0,
             system_metrics: Optional[bool] = None) -> Iterator[StepTracker]:
    """Open (or reopen, on resume) the child run of `step`; yields a StepTracker.

    A busy store is waited on for mlflow.busy_patience_s at every call; if the run cannot
    be opened even then, the step runs untracked and says so (tracking_errors.jsonl)."""
    if rank != 0:
        yield StepTracker(None)
        return
    step_dir = Path(run_dir) / step
    step_dir.mkdir(parents=True, exist_ok=True)
    patience, errors = cfg.mlflow.busy_patience_s, step_dir / ERRORS_FILE
    try:
        mlflow, tracker = patiently(lambda: _open_step(cfg, run_dir, step, system_metrics,
                                                       patience, errors), patience)
    except Exception as exc:
        if not is_busy(exc):
            raise
        record_lost_call(errors, "the step's run", exc)
        yield StepTracker(None)
        return
    if step in run_summary.STAGES:
        tracker.log_params(run_summary.stage_params(cfg, step))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
        tracker._call("headline results on the parent run", lambda: log_parent_results(
            cfg, run_dir, *run_summary.step_results(cfg, run_dir, step), step=step))
    finally:
        tracker._call(f"end of the run ({status})", lambda: mlflow.end_run(status=status))


def _open_step(cfg: Config, run_dir: Path, step: str, system_metrics: Optional[bool],
               patience: float, errors: Path):
    """(mlflow, its StepTracker) with the step's child run started."""
    mlflow, exp_id = setup(cfg)
    parent = ensure_parent_run(cfg, run_dir)
    child_file = Path(run_dir) / step / CHILD_FILE
    signature = dag.signature_of(cfg, step.split("/")[0])
    previous = None
    if child_file.exists():   # reopened by the same run resuming the same version
        record = json.loads(child_file.read_text())
        if record.get("signature") == signature and record.get("parent") == parent:
            previous = record["run_id"]
    sysm = cfg.mlflow.system_metrics if system_metrics is None else system_metrics
    if sysm and step in run_summary.STAGES:
        warn_without_gpu_monitor()
    fresh = {"run_name": step, "experiment_id": exp_id,
             "tags": {"mlflow.parentRunId": parent, "pipeline.step": step,
                      "pipeline.run": cfg.run.name, **run_summary.sweep_tags(cfg)}}

    def start(reopen: Optional[str]) -> str:
        run = mlflow.start_run(log_system_metrics=sysm,
                               **({"run_id": reopen} if reopen else fresh))
        atomic_write_json(child_file, {"run_id": run.info.run_id, "parent": parent,
                                       "signature": signature})
        return run.info.run_id

    def new_run() -> str:
        mlflow.end_run(status="FINISHED")
        return start(None)

    tracker = StepTracker(mlflow, new_run, patience, errors, step)
    tracker.run_id = start(previous)
    return mlflow, tracker


def warn_without_gpu_monitor() -> bool:
    """MLflow's system metrics include GPU utilisation and memory when a CUDA GPU is there
    and pynvml (nvidia-ml-py) imports; say so when the GPU is there but pynvml is not.
    True when GPU system metrics will be logged."""
    import torch
    if not torch.cuda.is_available():
        return False
    try:
        import pynvml  # noqa: F401
    except ImportError:
        print("[tracking] no GPU system metrics: pynvml is missing "
              "(pip install nvidia-ml-py)", file=sys.stderr)
        return False
    return True
