"""Learning check: the demo recipe on generated corpora of several seeds, against targets.

`python -m pipeline.learn [--seeds 1234 777] [--experiment demo] [--overrides k=v ...]`
runs `pipeline.run demo --cluster local` once per seed as run `learn_seed<k>` with
`run.seed=<k>` (the seed picks the generated corpus in data_prep.corpus.ensure_corpus, and
the training seeds), then writes docs/learning.md. The report is a measurement, not a
test: the exit code is 0 whenever it was written, and the misses are printed.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from jobs import learning_targets as lt
from pipeline import dag
from pipeline import run_folder as rf
from pipeline.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEEDS = (1234, 777)
STAGES = rf.STAGES
STAGE3_ROWS = (("two_sample_accuracy", "two-sample accuracy"),
               ("periodicity", "bar-scale periodicity"), ("rms_db_diff", "loudness vs real (dB)"),
               ("precision", "window precision"), ("recall", "window recall"),
               ("density", "window density"), ("coverage", "window coverage"),
               ("frechet_ratio", "Fréchet ratio (frames)"),
               ("diversity_ratio", "diversity ratio"), ("flatness_ratio", "flatness ratio"),
               ("step_ratio", "lag-1 step ratio"))
SETS = ("generated", "prior", "white", "shuffled", "real")


@dataclass(frozen=True)
class Target:
    """One learning target of the summary: a key, its label and rule (jobs.learning_targets)."""
    key: str
    label: str
    rule: str


TARGETS: tuple[Target, ...] = (
    Target("stage1_margin", "stage-1 margin over the best trivial baseline",
           f">= {lt.STAGE1_MARGIN:.0%}"),
    Target("stage1_order_gain", "stage-1 loss increase with input order permuted",
           f">= {lt.ORDER_GAIN:.0%}"),
    *(Target(t.key, t.label, t.rule) for t in lt.STAGE3),
    Target("audit_verdict", "audit verdict", 'not "trouble"'),
)


@dataclass
class CorpusRun:
    """One corpus's run folder and how its run went. `since` (epoch seconds) is when this
    check started it: older files are left-overs of earlier runs and are not reported."""
    name: str
    run_dir: Path
    since: Optional[float] = None
    wall_s: Optional[float] = None
    exit_code: Optional[int] = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Figures:
    """What one run folder shows: each target's (value, met), the stage-1 and stage-3
    tables, the gates and what failed."""
    values: dict[str, tuple[float | str | None, bool]]
    best_val: Optional[float] = None
    baselines: dict[str, float] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    table: dict = field(default_factory=dict)
    twins_missed: dict[str, list[str]] = field(default_factory=dict)
    picks: int = 0
    gates: dict[str, Optional[tuple[str, str]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def misses(self) -> list[Target]:
        """The targets this run did not meet (a missing figure is a miss)."""
        return [t for t in TARGETS if not self.values.get(t.key, (None, False))[1]]


# --- reading a run folder --------------------------------------------------------------

def _steps(run_dir: Path) -> dict:
    path = run_dir / rf.PIPELINE_STATE
    try:
        return json.loads(path.read_text()).get("steps", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _fresh(run: CorpusRun, step: str, path: Path, steps: dict) -> bool:
    """True when `path` exists and belongs to this run: written since `run.since`, or its
    step was skipped since then as complete under the current config and code."""
    if not path.exists():
        return False
    if run.since is None or path.stat().st_mtime >= run.since:
        return True
    return (steps.get(step, {}).get("skipped_at") or 0) >= run.since


def _json(run: CorpusRun, step: str, name: str, steps: dict) -> Optional[dict]:
    path = rf.step_dir(run.run_dir, step) / name
    if not _fresh(run, step, path, steps):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _num(value: object) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def best_val_loss(run: CorpusRun, steps: dict) -> Optional[float]:
    """Stage 1's lowest finite val_loss in metrics.jsonl, else gate.json's "best"."""
    path = rf.stage_file(run.run_dir, "stage1", rf.METRICS)
    losses = []
    if _fresh(run, "stage1", path, steps):
        for line in path.read_text().splitlines():
            try:
                value = _num(json.loads(line).get("val_loss")) if line.strip() else None
            except json.JSONDecodeError:
                value = None
            if value is not None and math.isfinite(value):
                losses.append(value)
    if losses:
        return min(losses)
    gate = _json(run, "stage1", rf.GATE, steps) or {}
    best = _num(gate.get("best"))
    return best if best is not None and math.isfinite(best) else None


def audit_verdict(run: CorpusRun, steps: dict) -> Optional[str]:
    """The audit's verdict word: a json in audit/ with a "verdict", else reading.txt."""
    folder = rf.step_dir(run.run_dir, rf.AUDIT)
    for path in sorted(folder.glob("*.json")):
        data = _json(run, rf.AUDIT, path.name, steps)
        if data and isinstance(data.get("verdict"), str):
            return data["verdict"]
    reading = folder / rf.AUDIT_READING
    if _fresh(run, rf.AUDIT, reading, steps):
        found = re.search(r"^verdict:\s*(\S+)", reading.read_text(), re.MULTILINE)
        if found:
            return found.group(1)
    return None


def step_problems(run: CorpusRun, steps: dict) -> list[str]:
    """One line per step of the demo target that failed, or did not run, in this run."""
    if not steps:
        return ["no pipeline.json: the pipeline did not start"]
    out, missing = [], []
    for name in dag.plan("demo"):
        entry = steps.get(name, {})
        submitted, skipped = entry.get("submitted_at") or 0, entry.get("skipped_at") or 0
        if not entry or (run.since is not None and max(submitted, skipped) < run.since):
            missing.append(name)
        elif submitted >= skipped and entry.get("state") != "COMPLETED":
            why = entry.get("reason") or "no reason recorded"
            out.append(f"{name} {entry.get('state')}: {why}")
    if missing:
        out.append(f"not run: {', '.join(missing)}")
    return out


def gate_reading(gate: Optional[dict]) -> Optional[tuple[str, str]]:
    """(passed | warned | FAILED, reason) of a gate.json, None when there is none."""
    if gate is None or "passed" not in gate:
        return None
    word = "passed" if gate["passed"] else ("warned" if gate.get("warned") else "FAILED")
    return word, str(gate.get("reason", ""))


def measure(run: CorpusRun) -> Figures:
    """Every figure of the report for one run folder (missing or stale files give None)."""
    steps = _steps(run.run_dir)
    fig = Figures(values={})
    fig.best_val = best_val_loss(run, steps)
    fig.baselines = {k[len("val_baseline_"):]: v for k, v in
                     (_json(run, "stage1", rf.BASELINES, steps) or {}).items()
                     if k.startswith("val_baseline_") and _num(v) is not None and math.isfinite(v)}
    fig.probe = _json(run, "stage1", rf.ORDER_PROBE, steps) or {}
    for row in lt.judge_stage1(fig.best_val, fig.baselines, _num(fig.probe.get("order_gain"))):
        fig.values[row["key"]] = (row["value"], row["met"])
    evaluated = _json(run, rf.EVALUATE, rf.EVALUATE_METRICS, steps) or {}
    fig.table = evaluated.get("table") or {}
    fig.picks = len(evaluated.get("picks") or [])
    for row in lt.judge_stage3(fig.table):
        fig.values[row["key"]] = (row["value"], row["met"])
    for name in SETS[1:4]:
        for row in lt.judge_stage3(fig.table, name):
            if not row["met"]:
                fig.twins_missed.setdefault(row["key"], []).append(name)
    verdict = audit_verdict(run, steps)
    fig.values["audit_verdict"] = (verdict, verdict is not None and verdict != "trouble")
    for stage in STAGES:
        fig.gates[stage] = gate_reading(_json(run, stage, rf.GATE, steps))
    fig.problems = step_problems(run, steps)
    return fig


# --- the markdown ----------------------------------------------------------------------

def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _fmt(value: float | str | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.1%}" if percent else f"{value:.3g}"


def _shown(path: Path) -> str:
    """A run folder as the report shows it: relative to the working directory when inside."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _percent(key: str) -> bool:
    return key.startswith("stage1_")


def miss_lines(run: CorpusRun, fig: Figures) -> list[str]:
    """One line per target the run missed, with its figure and the target."""
    return [f"{run.name}: {t.label} = {_fmt(fig.values.get(t.key, (None,))[0], _percent(t.key))} "
            f"(target {t.rule})" for t in fig.misses()]


def _stat(stat: Optional[dict]) -> str:
    if not stat:
        return "n/a"
    spread = f" ±{stat['std']:.2g}" if stat.get("picks", 1) > 1 else ""
    return f"{stat['mean']:.3g}{spread}"


def stage3_table(fig: Figures) -> list[str]:
    """The generator beside its three trivial twins and real music, one row per figure;
    a target row marks each set PASS or MISS."""
    judged = {name: {r["key"]: r["met"] for r in lt.judge_stage3(fig.table, name)}
              for name in SETS[:4]}
    lines = ["| figure | " + " | ".join(SETS) + " |", "|---" * (len(SETS) + 1) + "|"]
    for key, label in STAGE3_ROWS:
        cells = []
        for name in SETS:
            cell = _stat(fig.table.get(name, {}).get(key))
            if key in judged.get(name, {}) and name != "real":
                cell += " PASS" if judged[name][key] else " **MISS**"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def stage1_table(fig: Figures) -> list[str]:
    """Stage 1's val loss beside every trivial baseline, with the order probe."""
    best = min(fig.baselines.values()) if fig.baselines else None
    lines = ["| predictor | val loss | vs the best baseline |", "|---|---|---|"]

    def margin(v: Optional[float]) -> str:
        return "n/a" if v is None or not best else f"{1 - v / best:+.1%}"
    lines.append(f"| stage 1 (best.pt) | {_fmt(fig.best_val)} | {margin(fig.best_val)} |")
    for name, value in sorted(fig.baselines.items(), key=lambda kv: kv[1]):
        lines.append(f"| baseline `{name}` | {value:.4g} | {margin(value)} |")
    p = fig.probe
    if p:
        lines.append(f"| stage 1, input frames permuted | {_fmt(_num(p.get('val_loss_permuted')))}"
                     f" | order gain {_fmt(_num(p.get('order_gain')), True)} |")
        lines += ["", f"Within-song retrieval of the true continuation: "
                  f"{_fmt(_num(p.get('retrieval_accuracy')))} top-1 (chance "
                  f"{_fmt(_num(p.get('retrieval_chance')))}, {p.get('pairs', 'n/a')} pairs)."]
    return lines


def build_report(runs: Sequence[CorpusRun], command: str, date: str, commit: str) -> str:
    """The learning report (markdown): a summary of the targets, a column per corpus; then
    per corpus the generator beside its trivial twins and stage 1 beside its baselines."""
    figs = [measure(r) for r in runs]
    lines = ["# Learning check", "",
             f"Produced by `{command}` on {date} at commit {commit}. Each corpus is one run of "
             "`pipeline.run demo` (local executor) with the command's experiment, on a corpus "
             "generated by `data_prep/corpus.py` with that run's seed. Stage-3 figures "
             "(`runs/<run>/evaluate/metrics.json`) are the noise generator's, each beside the "
             "same figure for its three trivial twins (its own input noise decoded as generation "
             "decodes, white noise at the data's level, real held-out clips with their frames "
             "shuffled in time) and for real held-out music; each is the mean over the picks, "
             "± its spread. A target is met only where the generator reaches it; a twin that "
             "reaches a target would show the target proves nothing. A figure that is missing, "
             "or left from an earlier run, is n/a and misses its target.", "",
             "| target | rule | " + " | ".join(f"{_cell(r.name)} | met" for r in runs) + " |",
             "|" + "---|" * (2 + 2 * len(runs))]
    for t in TARGETS:
        cells = []
        for f in figs:
            value, met = f.values.get(t.key, (None, False))
            cells.append(f"{_fmt(value, _percent(t.key))} | {'PASS' if met else '**MISS**'}")
        lines.append(f"| {_cell(t.label)} | {_cell(t.rule)} | " + " | ".join(cells) + " |")
    met = sum(f.values.get(t.key, (None, False))[1] for f in figs for t in TARGETS)
    lines += ["", f"Targets met: {met} of {len(TARGETS) * len(runs)}."]
    misses = [line for r, f in zip(runs, figs) for line in miss_lines(r, f)]
    lines += (["", "Missed:", ""] + [f"- {_cell(m)}" for m in misses]) if misses else []
    for run, fig in zip(runs, figs):
        lines += ["", f"## {run.name}", "", f"Run folder `{_shown(run.run_dir)}`; wall time "
                  f"{f'{run.wall_s:.0f} s' if run.wall_s is not None else 'n/a'}; "
                  f"{fig.picks or 'n/a'} pick(s).", "", "### Stage 3 beside its trivial twins", ""]
        lines += stage3_table(fig) if fig.table else ["n/a: no evaluation from this run."]
        twins = [f"{key}: missed by {', '.join(names)}" for key, names in fig.twins_missed.items()]
        lines += ["", "Twins that miss each stage-3 target: " + ("; ".join(twins) or "none")]
        lines += ["", "### Stage 1 beside its trivial baselines", ""] + stage1_table(fig)
        lines += ["", "### Gates and audit", ""]
        for stage in STAGES:
            gate = fig.gates.get(stage)
            lines.append(f"- {stage} gate: " + ("n/a" if gate is None else
                                                f"{gate[0]}: {_cell(gate[1])}"))
        lines.append(f"- audit verdict: {_fmt(fig.values['audit_verdict'][0])}")
        lines.append(f"- what failed: {'; '.join(run.notes + fig.problems) or 'nothing'}")
    lines.append("")
    return "\n".join(lines)


# --- running the corpora ---------------------------------------------------------------

def git_commit() -> str:
    """Short HEAD commit, with '+ uncommitted changes' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"`{head}`" + (" + uncommitted changes" if dirty.strip() else "")


def _run_logged(cmd: list[str], log: Path) -> int:
    """Run `cmd` (same working directory, so run.root means the same), appending its
    output to `log`; returns its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode


def run_corpus(name: str, run_dir: Path, seed: int, experiment: str,
               overrides: Sequence[str]) -> CorpusRun:
    """Run the demo target for one seed, then, when stage 3 trained but its gate stopped
    the chain, the audit and evaluation directly on stage3/last.pt (labelled as such)."""
    log = run_dir / "learn.log"
    began = time.time()
    cmd = [sys.executable, "-m", "pipeline.run", "demo", "--experiment", experiment,
           "--cluster", "local", "--run", name, f"run.seed={seed}", *overrides]
    run = CorpusRun(name, run_dir, since=began)
    run.exit_code = _run_logged(cmd, log)
    if run.exit_code != 0:
        run.notes.append(f"pipeline exit code {run.exit_code} (log: {log})")
        gate = _json(run, "stage3", rf.GATE, _steps(run_dir))
        trained = rf.stage_file(run_dir, "stage3", rf.LAST).exists()
        if gate is not None and gate.get("passed") is False and trained:
            for step in (rf.AUDIT, rf.EVALUATE):
                out = rf.audit_reading(run_dir) if step == rf.AUDIT else rf.evaluate_metrics(run_dir)
                if not _fresh(run, step, out, {}):
                    code = _run_logged([sys.executable, "-m", f"jobs.{step}", "--run",
                                        str(run_dir)], log)
                    run.notes.append(f"{step} run directly on stage3/last.pt after the "
                                     f"stage-3 gate failed (exit code {code})")
    run.wall_s = time.time() - began
    return run


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.learn",
                                description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                   help="one corpus (and run learn_seed<k>) per seed")
    p.add_argument("--experiment", default="demo", help="configs/experiments/<name>.yaml or a path")
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every corpus run")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "learning.md")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline import config as config_mod
    from pipeline.config import ConfigError
    from pipeline.run import run_dir_of

    args = parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        print(f"error: --seeds must differ, got {args.seeds}", file=sys.stderr)
        return 2
    prefix = "learn" if args.experiment == "demo" else f"learn_{Path(args.experiment).stem}"
    plans = []
    for seed in args.seeds:   # check every config before minutes of training
        name = f"{prefix}_seed{seed}"
        try:
            cfg = config_mod.load(args.experiment, "local",
                                  [f"run.name={name}", f"run.seed={seed}", *args.overrides])
        except (ConfigError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if cfg.data.source:
            print(f"error: data.source is set ({cfg.data.source}); the learning check runs on "
                  "generated corpora, so leave it empty", file=sys.stderr)
            return 2
        plans.append((seed, name, run_dir_of(cfg)))
    runs = []
    for i, (seed, name, run_dir) in enumerate(plans, start=1):
        print(f"[learn] corpus {i}/{len(plans)} (seed {seed}): {args.experiment} recipe -> "
              f"{run_dir}", flush=True)
        run = run_corpus(name, run_dir, seed, args.experiment, args.overrides)
        status = "ok" if run.exit_code == 0 else f"FAILED (exit {run.exit_code})"
        print(f"[learn] corpus {i}/{len(plans)} (seed {seed}): {status} in {run.wall_s:.0f} s",
              flush=True)
        runs.append(run)
    command = "python -m pipeline.learn " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--experiment {args.experiment}"]
        + ([f"--overrides {' '.join(args.overrides)}"] if args.overrides else []))
    text = build_report(runs, command, datetime.now().isoformat(timespec="seconds"), git_commit())
    atomic_write_text(args.out, text)
    for run in runs:
        fig = measure(run)
        for line in miss_lines(run, fig):
            print(f"[learn] MISS {line}")
        for problem in run.notes + fig.problems:
            print(f"[learn] {run.name}: {problem}")
    print(f"[learn] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
