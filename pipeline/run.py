"""Submit a target of the DAG: `python -m pipeline.run <target> [options] [key.sub=value ...]`.

Loads and checks the config first (a wrong key stops everything, exit 2), writes the run's
resolved config, creates the MLflow parent run, then walks the target's steps in order:
a step whose markers say COMPLETED with its current signature is skipped (and the log
says so); a step already queued or running with that signature is waited on; every other
step is submitted behind its upstream jobs. `--force STEP` reruns STEP and, because their
inputs are rewritten, every step of the target downstream of it. A step whose outputs were
made under another signature (config or code changed) starts from an empty folder; one
with the same signature resumes from what it left (training: last.pt; chunk: the
shards that finished).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from pipeline import config as config_mod
from pipeline import dag, state, tracking
from pipeline import run_folder as rf
from pipeline import store as store_mod
from pipeline.config import ConfigError
from pipeline.preflight import preflight
from pipeline.mlflow_server import export_credentials
from pipeline.driver_lock import RunBusy, driver_identity, driver_lock
from pipeline.backends import make_executor, prestart, resolve_cluster
from pipeline.executor import LIVE_STATES, Executor, Submission, Submitted
from pipeline.file_lock import file_lock
from pipeline.schema import Config


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def build_overrides(args: argparse.Namespace) -> list[str]:
    """Command-line options as config overrides (so they are checked like any other)."""
    out = []
    if args.run:
        out.append(f"run.name={args.run}")
    if args.data:
        out.append(f"data.source={Path(args.data).resolve()}")
    for stage in dag.TRAIN_STEPS:
        if args.gpus is not None:
            out.append(f"cluster.steps.{stage}.gpus_per_node={args.gpus}")
        if args.nodes is not None:
            out.append(f"cluster.steps.{stage}.nodes={args.nodes}")
    return out + list(args.overrides)


def run_dir_of(cfg: Config) -> Path:
    return (Path(cfg.run.root) / cfg.run.name).resolve()


def _absolute_root(cfg: Config) -> Config:
    """Jobs may start elsewhere: pin the run root (and so the sqlite store) to a full path."""
    cfg.run.root = str(Path(cfg.run.root).resolve())
    return cfg


def live_jobs(executor: Executor, data: dict, steps: Optional[list[str]] = None) -> dict[str, str]:
    """step -> job id for the run's steps whose latest job is still queued or running."""
    ids = {name: e.get("job_id") for name, e in data.get("steps", {}).items()
           if e.get("job_id") and (steps is None or name in steps)}
    found = executor.states(list(ids.values()))
    return {name: job for name, job in ids.items()
            if job in found and found[job][0] in LIVE_STATES}


def _write_config(cfg: Config, run_dir: Path, live: dict[str, str]) -> None:
    path = run_dir / "config.resolved.yaml"
    new = yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False)
    if live and path.exists() and path.read_text() != new:
        raise ConfigError(
            f"run {run_dir} has queued or running jobs ({', '.join(f'{s}={j}' for s, j in live.items())}) "
            "that read its config; wait for them, cancel them (python -m pipeline.cancel) "
            "or pick another --run")
    config_mod.write_resolved(cfg, run_dir)


def place(cfg: Config, run_dir: Path, step: str, signature: str, num_shards: Optional[int],
          forced: bool, keep: bool) -> Path:
    """Link `<run>/<step>` to the store version it uses now, and return that version.

    A folder the run made before the store existed moves into the store first; a resumed
    step (`keep`) stays on the version it links to, whatever its signature."""
    store = store_mod.store_root(cfg)
    old = state.read_marker(state.marker_path(run_dir, step)) if num_shards is None else next(
        (m for m in state.markers(run_dir, step, num_shards) if m), None)
    moved = store_mod.adopt(run_dir, step, store, old["signature"] if old else None)
    if moved:
        log(f"{step}: moved the run's own outputs into the shared store: {moved}")
    current = store_mod.linked(run_dir, step)
    if keep and current is not None:
        return current
    inputs = {u: v.name for u in dag.step(step).upstream
              if (v := store_mod.linked(run_dir, u)) is not None}
    version = store_mod.choose(store, step, signature, num_shards, forced, inputs)
    if current is not None and current != version.resolve():
        log(f"{step}: the run now uses version {version} ({'forced; ' if forced else ''}"
            f"the version it used, {current.name}, is kept)")
    store_mod.link(run_dir, step, version)
    store_mod.record_inputs(version, inputs)
    return version


def shared_job(executor: Executor, version: Path, run_dir: Path) -> Optional[str]:
    """The live job of another run that is building this version, if any."""
    claim = store_mod.read_claim(version)
    if not claim or claim.get("cluster") != executor.name or executor.synchronous:
        return None
    found = executor.states([claim["job_id"]])
    live = claim["job_id"] in found and found[claim["job_id"]][0] in LIVE_STATES
    return claim["job_id"] if live else None


def submit_steps(cfg: Config, run_dir: Path, steps: list[str], executor: Executor,
                 force: tuple[str, ...] = (), keep: Optional[str] = None,
                 dry_run: bool = False, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Submit (or skip) `steps` in order; returns step -> job id of what now runs.

    `keep` is a step resumed whatever its signature (pipeline.resume)."""
    sigs = dag.signatures(cfg, steps)
    data = state.load(run_dir)
    live = {} if dry_run else live_jobs(executor, data, steps)
    rerun: set[str] = set()
    for name in force:
        rerun.update(dag.downstream(name, steps))
    job_of: dict[str, str] = {}
    for name in steps:
        sig = sigs[name]
        shards = dag.step(name).num_shards(cfg)
        after = [job_of[u] for u in dag.step(name).upstream if u in job_of]
        forced = name in rerun
        if name in live and (forced or data["steps"].get(name, {}).get("signature") != sig):
            raise ConfigError(f"{name} is queued or running as job {live[name]} under "
                              "another signature (or forced); cancel it first")
        if name in live:
            job_of[name] = live[name]
            log(f"{name}: already queued/running as job {live[name]}; waiting on it")
            continue
        if dry_run:
            version = store_mod.choose(store_mod.store_root(cfg), name, sig, shards, forced)
        else:
            version = place(cfg, run_dir, name, sig, shards, forced, keep == name)
        with build_lock(version, dry_run):
            if not forced and state.folder_complete(version, sig, shards):
                log(f"{name}: complete with signature {sig[:12]} ({version}), skipped")
                if not dry_run:
                    state.record_step(run_dir, name, signature=sig, skipped_at=state.now(),
                                      version=str(version))
                    executor.call(tracking.log_step_results, cfg, run_dir, name)
                continue
            other = None if dry_run else shared_job(executor, version, run_dir)
            if other:
                job_of[name] = other
                state.record_step(run_dir, name, signature=sig, job_id=other, state="PENDING",
                                  cluster=executor.name, version=str(version), shared=True)
                log(f"{name}: being built by job {other} of another run; waiting on it")
                continue
            done = submit_one(cfg, run_dir, name, sig, version, executor, after, shards,
                              dry_run, echo)
        if done is None:
            job_of[name] = f"<{name}>"
            continue
        job_of[name] = done.job_id
        if done.state in ("FAILED", "CANCELLED"):
            log(f"{name}: {done.state} ({done.reason}); its dependents will not run. Fix the "
                f"cause, then: python -m pipeline.resume --job {name} --run {run_dir}")
            break
    return job_of


def build_lock(version: Path, dry_run: bool):
    """One driver at a time decides about (and, locally, builds) a store version."""
    if dry_run:
        return contextlib.nullcontext()
    return file_lock(version.parent / f".{version.name}.lock")


def submit_one(cfg: Config, run_dir: Path, name: str, sig: str, version: Path,
               executor: Executor, after: list[str], shards: Optional[int], dry_run: bool,
               echo: Callable[[str], None]) -> Optional[Submitted]:
    """Submit (SLURM) or run (local) one step into `version`; None for a dry run."""
    todo = None if shards is None else [
        i for i, m in enumerate(state.folder_markers(version, shards))
        if not (m and m["state"] == state.COMPLETED and m["signature"] == sig)]
    if name not in cfg.cluster.steps:
        raise ConfigError(f"cluster.steps.{name} is missing from the cluster profile")
    sub = Submission(name, run_dir, sig, cfg.cluster.steps[name], after=after, shards=todo,
                     num_shards=shards)
    if dry_run:
        echo(f"# ---- {name} (signature {sig[:12]}, version {version}, after "
             f"{after or 'nothing'}) ----")
        echo(executor.script(sub))
        return None
    began = time.monotonic()
    if executor.synchronous:   # recorded before it runs: a killed driver shows
        state.record_step(run_dir, name, signature=sig, state="RUNNING", after=after,
                          cluster=executor.name, submitted_at=state.now(), shards=todo,
                          driver=driver_identity(), version=str(version))
    done = executor.submit(sub)
    store_mod.write_claim(version, done.job_id, executor.name, run_dir)
    state.record_step(run_dir, name, signature=sig, job_id=done.job_id, state=done.state,
                      array_tasks=done.array_tasks, after=after, cluster=executor.name,
                      submitted_at=state.now(), shards=todo, reason=done.reason,
                      version=str(version))
    log(f"{name}: {'ran' if executor.synchronous else 'submitted'} as job {done.job_id}"
        f"{' after ' + ','.join(after) if after else ''} -> {done.state}"
        f" ({time.monotonic() - began:.1f} s)")
    return done


def prepare_run(cfg: Config, run_dir: Path, executor: Executor, steps: list[str],
                target: str, params: dict) -> None:
    """Write the resolved config, record the submission, and open the MLflow parent run."""
    data = state.load(run_dir)
    _write_config(cfg, run_dir, live_jobs(executor, data))
    tags = {f"submit.{key}": value for key, value in params.items()}
    parent = executor.call(tracking.tag_parent_run, cfg, run_dir, tags)

    def change(d: dict) -> None:
        d.update(run=cfg.run.name, cluster=executor.name, target=target, target_steps=steps,
                 mlflow_parent=parent, driver_pid=os.getpid(), submit_params=params)
    state.update(run_dir, change)


def finish_parent(cfg: Config, run_dir: Path, executor: Executor, ok: bool) -> None:
    """Close the MLflow parent run once a local run has ended (on SLURM: pipeline.parent_run)."""
    parent = state.load(run_dir).get("mlflow_parent")
    if parent:
        executor.call(tracking.end_parent_run, cfg, parent, ok)


def demo_report(cfg: Config, run_dir: Path) -> None:
    """Where the demo's results are, and how to look at them."""
    uri = tracking.tracking_uri(cfg)
    print(f"audio samples : {rf.step_dir(run_dir, rf.GENERATE)}/*.wav")
    print(f"audit plot    : {rf.step_dir(run_dir, rf.AUDIT) / rf.AUDIT_PNG}")
    print(f"evaluation    : {rf.evaluate_metrics(run_dir)}")
    print(f"MLflow store  : {uri}")
    print(f"runs table    : {tracking.runs_page(cfg)}")
    print(f"look at it    : .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000")
    learning_report(run_dir)


def learning_report(run_dir: Path) -> None:
    """What the run learned: the evaluation's table against real music and the trivial
    twins, stage 1 against its baselines, every gate missed with a warning, the audit."""
    verdict = rf.evaluate_verdict(run_dir)
    if verdict.exists():
        print(f"\nwhat the run learned, against real music and its trivial twins ({verdict}):")
        print(verdict.read_text(), end="")
    for stage in rf.STAGES:
        gate = rf.read_json(rf.stage_file(run_dir, stage, rf.GATE)) or {}
        if gate.get("warned"):
            print(f"{stage} gate MISSED (warned, the chain went on): {gate.get('reason', '')}")
    reading = rf.audit_reading(run_dir)
    if reading.exists():
        found = [l for l in reading.read_text().splitlines() if l.startswith("verdict:")]
        if found:
            print(f"audit {found[-1]} ({reading})")


def data_report(run_dir: Path) -> None:
    """What the data steps made: files ok/skipped/failed (with reasons), hours, chunks,
    pairs, latents, and where each output is."""
    import json
    from pipeline.chunk_manifest import format_summary, summarize
    if rf.step_dir(run_dir, rf.CHUNK).is_dir():
        print(f"chunk   : {rf.step_dir(run_dir, rf.CHUNK)}")
        print("  " + format_summary(summarize(run_dir)).replace("\n", "\n  "))
    pairs = rf.pairs_summary(run_dir)
    if pairs.exists():
        p = json.loads(pairs.read_text())
        print(f"pairs   : {pairs.parent}  songs train/val {p.get('songs_train')}/{p.get('songs_val')}"
              f"  pairs train/val {p.get('pairs_train')}/{p.get('pairs_val')}")
    manifest = rf.encode_manifest(run_dir)
    if manifest.exists():
        m = json.loads(manifest.read_text())
        print(f"encode  : {manifest.parent}  codec {m.get('codec')}  {m.get('rows')} latents "
              f"[{m.get('latent_dim')}, {m.get('frames')}] {m.get('dtype')}"
              f"  augmented variants {sum(r['rows'] for r in m.get('aug_shards', []))}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.splitlines()[0])
    p.add_argument("target", choices=list(dag.TARGETS))
    p.add_argument("--experiment", default=None, help="configs/experiments/<name>.yaml or a path")
    p.add_argument("--cluster", choices=["local", "slurm"],
                   default=os.environ.get("CLUSTER") or None,
                   help="executor and cluster profile (default: slurm if sbatch is found)")
    p.add_argument("--run", help="run name (folder under run.root)")
    p.add_argument("--data", help="folder of music files (data.source)")
    p.add_argument("--gpus", type=int, help="GPUs per node for the training steps")
    p.add_argument("--nodes", type=int, help="nodes for the training steps")
    p.add_argument("--force", action="append", default=[], metavar="STEP",
                   help="rerun STEP (and its dependents) even if complete")
    p.add_argument("--continue", dest="continue_step", choices=list(dag.TRAIN_STEPS),
                   metavar="STAGE", help="continue STAGE from its last.pt with the new "
                   "schedule given as overrides (more epochs, another lr)")
    p.add_argument("--dry-run", action="store_true",
                   default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                   help="print what would be submitted; submit nothing")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return p.parse_intermixed_args(argv)


def continue_stage(cfg: Config, run_dir: Path, stage: str) -> None:
    """Set `<stage>.continue_from` to the last.pt of the version the run uses now, so the
    stage goes on from it under the new settings (a new version beside the old one).
    Repeating the same command keeps the continued version instead of continuing it again."""
    current = store_mod.linked(run_dir, stage) or (run_dir / stage)
    last = current / rf.LAST
    if not last.is_file():
        raise ConfigError(f"--continue {stage}: {last} does not exist; the stage has no "
                          "checkpoint to continue from (run it first)")
    section = getattr(cfg, stage)
    made = rf.config_file(current)
    if made.exists():
        before = yaml.safe_load(made.read_text()).get(stage, {})
        now = config_mod.to_dict(section)
        if before.get("continue_from") and {k: v for k, v in before.items() if k != "continue_from"} \
                == {k: v for k, v in now.items() if k != "continue_from"}:
            section.continue_from = before["continue_from"]   # already this continuation
            return
    section.continue_from = str(last.resolve())


def tracking_checks(cfg: Config, cluster: str) -> None:
    """A tracking server's credentials go to the jobs through the environment; on SLURM a
    sqlite store on a shared file system gets a warning (a server serialises the writes)."""
    export_credentials(cfg.mlflow.tracking_uri)
    if cluster == "slurm" and not cfg.mlflow.tracking_uri:
        log("warning: MLflow logs to a sqlite file in run.root; many jobs on many nodes writing "
            "one sqlite file on a network file system lose updates to its locking. Start "
            "`make mlflow-server` and set mlflow.tracking_uri=http://<host>:5000")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        for name in args.force:
            dag.step(name)
        cluster = resolve_cluster(args.cluster)
        if not args.dry_run:
            prestart(cluster)
        cfg = _absolute_root(config_mod.load(args.experiment, cluster, build_overrides(args)))
        if args.continue_step:
            continue_stage(cfg, run_dir_of(cfg), args.continue_step)
        steps = dag.plan(args.target)
        for name in args.force:
            if name not in steps:
                raise ConfigError(f"--force {name}: not a step of target {args.target} ({steps})")
        sigs = dag.signatures(cfg, steps)   # every step's code must exist before anything is queued
        preflight(cfg, run_dir_of(cfg), steps, sigs, args.force, cluster)
        tracking_checks(cfg, cluster)
    except (ConfigError, dag.DagError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = run_dir_of(cfg)
    executor = make_executor(cluster, cfg, run_dir, dry_run=args.dry_run)
    if args.dry_run:
        log(f"dry run: {args.target} on {cluster}; nothing is submitted or written")
        submit_steps(cfg, run_dir, steps, executor, tuple(args.force), dry_run=True)
        return 0
    params = {"target": args.target, "experiment": args.experiment or "", "cluster": cluster,
              "continue": args.continue_step or "",
              "gpus": args.gpus, "nodes": args.nodes, "force": ",".join(args.force),
              "overrides": " ".join(args.overrides)}
    try:
        with driver_lock(run_dir):
            return drive(cfg, run_dir, executor, steps, args, params)
    except RunBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def drive(cfg: Config, run_dir: Path, executor: Executor, steps: list[str],
          args: argparse.Namespace, params: dict) -> int:
    """Prepare the run, submit (or run) its steps and report; the caller holds the lock."""
    began = time.monotonic()
    try:
        prepare_run(cfg, run_dir, executor, steps, args.target, params)
        jobs = submit_steps(cfg, run_dir, steps, executor, tuple(args.force))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"{args.target}: {len(jobs)} step(s) {'run' if executor.synchronous else 'queued'} in "
        f"{time.monotonic() - began:.1f} s; run folder {run_dir}")
    ended = state.load(run_dir)["steps"]
    failed = [s for s in jobs if ended[s].get("state") in ("FAILED", "CANCELLED")]
    if executor.synchronous or not jobs:   # every step has ended (or was complete already):
        # the driver closes the parent run; on SLURM the job that ends the chain does (parent_run)
        finish_parent(cfg, run_dir, executor, not failed)
    if failed:
        return 1
    if not executor.synchronous:
        print(f"watch: python -m pipeline.status --run {run_dir}")
    elif "encode" in steps:
        data_report(run_dir)
    if args.target == "demo":
        demo_report(cfg, run_dir)
    elif executor.synchronous and "evaluate" in steps:
        learning_report(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
