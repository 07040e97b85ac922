"""`python -m pipeline.status [--run runs/<name>]`: one line per step of a run.

Columns: step, job id, state, elapsed, the latest key metric, and a note (why a job
waits, or why a step failed, e.g. a validation gate's reason). States come from the
scheduler while it knows the job (squeue, then `scontrol show job`; sacct is not needed)
and from the step's own markers afterwards.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from pipeline import dag, parent_run, state
from pipeline import run_folder as rf
from pipeline.backends import make_executor
from pipeline.executor import LIVE_STATES


def find_run(run: Optional[str], root: str = "runs") -> Path:
    """The given run folder, or the most recently updated one under `root`."""
    if run:
        path = Path(run)
        if not (path / state.STATE_FILE).exists() and (Path(root) / run / state.STATE_FILE).exists():
            path = Path(root) / run
        if not (path / state.STATE_FILE).exists():
            raise FileNotFoundError(f"no {state.STATE_FILE} in {path}: not a pipeline run folder")
        return path.resolve()
    found = sorted(Path(root).glob(f"*/{state.STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if p.parent.name not in rf.RESERVED]
    if not found:
        raise FileNotFoundError(f"no run folders with {state.STATE_FILE} under {root}/")
    return found[-1].parent.resolve()


# evaluate's figures shown by status: those that the trivial twins fail (docs/learning.md)
EVALUATE_KEYS = ("two_sample_accuracy", "periodicity", "rms_db_diff")


def _elapsed(seconds: float) -> str:
    """Like squeue's TIME column: M:SS, or H:MM:SS from an hour on."""
    seconds = int(max(0, seconds))
    hours, minutes, secs = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def latest_metric(run_dir: Path, step: str) -> str:
    """A short 'key=value' for the step from its metrics or summary files."""
    folder = rf.step_dir(run_dir, step)
    try:
        if step in dag.TRAIN_STEPS and (folder / rf.METRICS).exists():
            lines = (folder / rf.METRICS).read_text().strip().splitlines()
            last = json.loads(lines[-1])
            keys = [k for k in ("val_loss", "best_val_loss", "val_diversity_ratio") if k in last]
            return f"epoch {last.get('epoch', len(lines))} " + \
                " ".join(f"{k}={last[k]:.4g}" for k in keys)
        if step == "chunk":
            from pipeline.chunk_manifest import summarize
            summary = summarize(run_dir)
            return " ".join(f"{k}={summary[k]}" for k in ("ok", "skipped", "failed", "chunks")
                            if k in summary)
        if step == "pairs" and rf.pairs_summary(run_dir).exists():
            s = json.loads(rf.pairs_summary(run_dir).read_text())
            return " ".join(f"{k}={v}" for k, v in s.items() if "pairs" in k and not isinstance(v, dict))
        if step == "encode" and rf.encode_manifest(run_dir).exists():
            m = rf.read_encode_manifest(run_dir)
            return f"rows={sum(s['rows'] for s in m.get('shards', []))} codec={m.get('codec')}"
        if step == "evaluate" and rf.evaluate_metrics(run_dir).exists():
            m = json.loads(rf.evaluate_metrics(run_dir).read_text()).get("metrics", {})
            return " ".join(f"{k}={m[k]:.3g}" for k in EVALUATE_KEYS if k in m)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""
    return ""


def gate_note(run_dir: Path, step: str) -> str:
    """"validation gate failed: <reason>" (or "gate missed (warned): <reason>" when its
    on_fail only warned) from a training step's gate.json, else ""."""
    gate = rf.read_gate(run_dir, step) if step in dag.TRAIN_STEPS else None
    if gate is None or gate.get("passed", True):
        return ""
    what = "gate missed (warned)" if gate.get("warned") else "validation gate failed"
    return f"{what}: {gate.get('reason', '')}"


def step_rows(run_dir: Path) -> list[dict]:
    """The status of every step recorded in the run."""
    data = state.load(run_dir)
    cluster = data.get("cluster", "local")
    from pipeline.launch import load_run_config
    cfg = load_run_config(run_dir)
    executor = make_executor(cluster, cfg, run_dir)
    ids = [e.get("job_id") for e in data["steps"].values() if e.get("job_id")]
    live = executor.states(ids)
    rows = []
    for name in dag.STEPS:
        entry = data["steps"].get(name)
        if entry is None:
            continue
        sig = entry.get("signature", "")
        shards = dag.step(name).num_shards(cfg)
        marks = [m for m in state.markers(run_dir, name, shards) if m]
        job = entry.get("job_id", "")
        st, elapsed, note = "", "", ""
        if job in live:
            st, elapsed, note = live[job]
        complete = state.is_complete(run_dir, name, sig, shards)
        if complete and st not in LIVE_STATES:
            st = "COMPLETED"
        elif st in ("", "COMPLETED") and marks:
            worst = [m for m in marks if m["state"] != "COMPLETED"]
            st = worst[0]["state"] if worst else "COMPLETED"
        elif not st:
            st = entry.get("state") or "NOT RUN"
        if not elapsed and marks:
            begin = min(m["started"] for m in marks)
            end = max(m.get("finished") or m["updated"] for m in marks)
            elapsed = _elapsed((time.time() if st == "RUNNING" else end) - begin)
        reasons = [m.get("reason", "") for m in marks if m.get("reason")]
        if st not in LIVE_STATES and reasons:
            note = reasons[0]
        if st in ("FAILED", "LOST", "COMPLETED") and not note:   # FAILED/LOST: e.g. a launcher
            note = gate_note(run_dir, name)   # that died before its marker; COMPLETED: a warned gate
        if st == "RUNNING" and job not in live:   # the marker says running; does it?
            why = executor.lost(run_dir, name, entry, job, live)
            if why:
                st, note = "LOST", note or gate_note(run_dir, name) or why
        if "DependencyNeverSatisfied" in note:
            note = "an upstream step failed: this job never starts (pipeline.resume re-submits it)"
        requeued = parent_run.requeue_note(marks)
        if requeued and requeued not in note:
            note = f"{note}; {requeued}" if note else requeued
        rows.append({"step": name, "job": job, "state": st, "elapsed": elapsed,
                     "metric": latest_metric(run_dir, name), "note": note})
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["step", "job", "state", "elapsed", "metric", "note"]
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols[:-1]}
    lines = ["  ".join(c.upper().ljust(widths.get(c, 0)) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in cols))
    return "\n".join(line.rstrip() for line in lines)


def headline(run_dir: Path) -> dict[str, str]:
    """A run's headline results: stage 3's best validation loss, evaluate's ratios and
    the audit's verdict ("" where a step has not made them)."""
    out = {"stage3_best_val": "", "diversity": "", "frechet": "", "verdict": ""}
    try:
        lines = rf.stage_file(run_dir, "stage3", rf.METRICS).read_text().strip().splitlines()
        best = [json.loads(line).get("best_val_loss") for line in lines]
        best = [b for b in best if b is not None]
        out["stage3_best_val"] = f"{best[-1]:.4g}" if best else ""
    except (OSError, ValueError):
        pass
    try:
        m = json.loads(rf.evaluate_metrics(run_dir).read_text()).get("metrics", {})
        out["diversity"] = f"{m['diversity_ratio']:.3g}" if "diversity_ratio" in m else ""
        out["frechet"] = f"{m['frechet_ratio']:.3g}" if "frechet_ratio" in m else ""
    except (OSError, ValueError):
        pass
    try:
        for line in rf.audit_reading(run_dir).read_text().splitlines():
            if line.startswith("verdict:"):
                out["verdict"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return out


SHORT_STATE = {"COMPLETED": "done", "RUNNING": "run", "PENDING": "wait", "FAILED": "FAIL",
               "CANCELLED": "cancel", "NOT RUN": "-", "LOST": "LOST", "PREEMPTED": "preempt",
               "INTERRUPTED": "intr"}


def sweep_rows(root: Path, name: str) -> list[dict]:
    """One row per point of sweep `name`: its run, each step's state, headline results."""
    from pipeline.sweep import record_path
    path = record_path(root, name)
    if not path.exists():
        raise FileNotFoundError(f"no sweep '{name}' under {root} ({path} is missing)")
    rows = []
    for point in json.loads(path.read_text())["points"]:
        run_dir = Path(root) / point["run"]
        row = {"point": point["point"], "run": point["run"]}
        if (run_dir / state.STATE_FILE).exists():
            for r in step_rows(run_dir):
                row[r["step"]] = SHORT_STATE.get(r["state"], r["state"])
            row.update(headline(run_dir))
        rows.append(row)
    return rows


def format_sweep(rows: list[dict]) -> str:
    steps = [s for s in dag.STEPS if any(s in r for r in rows)]
    cols = ["point", *steps, "stage3_best_val", "diversity", "frechet", "verdict"]
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in cols))
    return "\n".join(line.rstrip() for line in lines)


def default_root() -> str:
    """run.root of the configs (so status, resume and cancel look where runs go)."""
    from pipeline import config as config_mod
    return config_mod.load(None, "local").run.root


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run folder or name (default: the latest under the root)")
    parser.add_argument("--root", default=None, help="run root (default: run.root of configs/)")
    parser.add_argument("--sweep", help="one table for the points of this sweep")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    root = args.root or default_root()
    try:
        if args.sweep:
            rows = sweep_rows(Path(root), args.sweep)
            print(json.dumps(rows, indent=1) if args.json else
                  f"sweep {args.sweep} ({len(rows)} points)\n{format_sweep(rows)}")
            return 0
        run_dir = find_run(args.run, root)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = step_rows(run_dir)
    overall = f"run {run_dir.name}: {parent_run.overall_state(run_dir, rows)}"
    print(json.dumps(rows, indent=1) if args.json else
          f"{overall}\nfolder {run_dir}\n{format_table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
