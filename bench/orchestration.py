"""Benchmark 5: orchestration cost.

5a: wall time of `python -m pipeline.run demo --cluster slurm ...` (every step of the DAG
queued on the single-node test cluster, dependencies included), from the command's start
to its exit; the queued jobs are cancelled right after.
5b: the local executor's overhead per step: wall time of `python -m pipeline.run prepare
--cluster local ...` (chunk shards, pairs, encode, each a subprocess) minus the time the
same step functions take when called directly in one warm process, over the 3 steps.
5c: a second run with the same data settings: how much of chunk, pairs and encode it runs
(none: it links to the store's versions).
All use one MLflow store created beforehand, as runs/ has after the first run.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.child import REPO, run_child
from bench.inputs import throughput_corpus
from bench.report import Row

SUBMIT_LIMIT_S = 10.0
OVERHEAD_LIMIT_S = 3.0
PREPARE_STEPS = ("chunk", "pairs", "encode")


def overrides(run_root: Path, chunk_seconds: float) -> list[str]:
    return [f"run.root={run_root}", f"data.chunk_seconds={chunk_seconds}"]


def pipeline_cmd(target: str, cluster: str, run_root: Path, run_name: str, source: Path,
                 chunk_seconds: float) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", target, "--experiment", "demo",
            "--cluster", cluster, "--run", run_name, "--data", str(source),
            *overrides(run_root, chunk_seconds)]


def timed(cmd: list[str], log: Path) -> float:
    """Wall time of a command; its output goes to `log`; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({code}):\n{log.read_text()[-3000:]}")
    return seconds


def slurm_ready(logs: Path) -> tuple[bool, str]:
    """Whether the test cluster answers; if not, try to start it with the project's script."""
    def answers() -> bool:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True,
                                 timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.returncode == 0 and "up" in out.stdout
    if answers():
        return True, ""
    script = REPO / "slurm_templates" / "start_test_cluster.sh"
    if not script.exists():
        return False, f"no test cluster is running and {script.name} is missing"
    with open(logs / "slurm-start.log", "w") as fh:
        subprocess.run(["bash", str(script)], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    for _ in range(30):
        if answers():
            return True, ""
        time.sleep(1)
    return False, f"the test cluster did not come up (see {logs / 'slurm-start.log'})"


# --- run in a child process -----------------------------------------------------------

def direct_prepare(run_root: str, run_name: str, source: str, chunk_seconds: float) -> dict:
    """The prepare steps' own work: their functions called in order in this process."""
    from data_prep import encode, pairs
    from data_prep.chunk import run_shard
    from pipeline import config
    from pipeline.tracking import ensure_parent_run

    cfg = config.load("demo", "local", [*overrides(Path(run_root), chunk_seconds),
                                        f"run.name={run_name}", f"data.source={source}"])
    run_dir = Path(run_root) / run_name
    config.write_resolved(cfg, run_dir)
    ensure_parent_run(cfg, run_dir)
    times = {}
    start = time.perf_counter()
    for shard in range(cfg.data.num_shards):
        run_shard(cfg, run_dir, shard, cfg.data.num_shards)
    times["chunk"] = time.perf_counter() - start
    start = time.perf_counter()
    pairs.run(cfg, run_dir)
    times["pairs"] = time.perf_counter() - start
    start = time.perf_counter()
    encode.run(cfg, run_dir)
    times["encode"] = time.perf_counter() - start
    return {"times": times, "shards": cfg.data.num_shards}


def init_store(run_root: str, source: str, chunk_seconds: float) -> dict:
    """Create the run root's MLflow store (a one-time cost of the first run)."""
    from pipeline import config
    from pipeline.tracking import ensure_parent_run
    cfg = config.load("demo", "local", [*overrides(Path(run_root), chunk_seconds),
                                        "run.name=warmup", f"data.source={source}"])
    ensure_parent_run(cfg, Path(run_root) / "warmup")
    return {}


# --- the benchmark ----------------------------------------------------------------------

def submit_row(root: Path, source: Path, chunk_seconds: float, logs: Path) -> Row:
    what = "submit the whole DAG to the test SLURM cluster (wall time of `pipeline.run demo " \
           "--cluster slurm`, 9 steps); ratio = time / 10 s limit"
    ok, reason = slurm_ready(logs)
    if not ok:
        return Row("5a", what, "not measured", "", None, f"<= {SUBMIT_LIMIT_S:g} s", None, reason)
    run_dir = root / "slurm"
    try:
        seconds = timed(pipeline_cmd("demo", "slurm", root, "slurm", source, chunk_seconds),
                        logs / "orchestration-slurm.log")
    finally:
        subprocess.run([sys.executable, "-m", "pipeline.cancel", "--run", str(run_dir)], cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    inner = [line for line in (logs / "orchestration-slurm.log").read_text().splitlines()
             if "queued in" in line]
    return Row("5a", what, f"{seconds:.1f} s", "-", seconds / SUBMIT_LIMIT_S,
               f"<= {SUBMIT_LIMIT_S:g} s", seconds <= SUBMIT_LIMIT_S,
               "from the command's start (interpreter and imports included) to its exit; the "
               f"driver's own count: \"{inner[-1].split('] ')[-1] if inner else '?'}\". The jobs "
               "were cancelled right after.")


def local_row(root: Path, source: Path, chunk_seconds: float, logs: Path) -> Row:
    wall = timed(pipeline_cmd("prepare", "local", root, "local", source, chunk_seconds),
                 logs / "orchestration-local.log")
    direct = run_child("bench.orchestration:direct_prepare",
                       {"run_root": str(root), "run_name": "direct", "source": str(source),
                        "chunk_seconds": chunk_seconds}, logs / "orchestration-direct.log").result
    work = sum(direct["times"].values())
    per_step = (wall - work) / len(PREPARE_STEPS)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in direct["times"].items())
    return Row("5b", "local executor overhead per step beyond the step's own work "
                     "(prepare: chunk, pairs, encode); ratio = overhead / 3 s limit",
               f"{per_step:.1f} s per step",
               f"`pipeline.run prepare --cluster local`: {wall:.1f} s; the steps' own work: "
               f"{work:.1f} s", max(per_step, 1e-3) / OVERHEAD_LIMIT_S,
               f"<= {OVERHEAD_LIMIT_S:g} s", per_step <= OVERHEAD_LIMIT_S,
               f"own work = the step functions called directly in one warm process ({parts}). "
               f"Each of the {direct['shards'] + 2} launches ({direct['shards']} chunk shards + "
               "pairs + encode) is a child forked from the local executor's fork server, "
               "which imports torch, MLflow and the step modules once (pipeline.preload) while "
               "the driver starts; the overhead is the driver's own start (interpreter, "
               "config, signatures), the wait for those imports, and per launch a fork and the "
               "step's MLflow child run.", raw={"wall": wall})


def second_run_row(root: Path, source: Path, chunk_seconds: float, logs: Path,
                   first_wall: float) -> Row:
    """5c: a second run with the same data settings: its data steps come from the store."""
    log = logs / "orchestration-second.log"
    wall = timed(pipeline_cmd("prepare", "local", root, "second", source, chunk_seconds), log)
    text = log.read_text()
    ran = [s for s in PREPARE_STEPS if f"{s}: ran as job" in text]
    skipped = [s for s in PREPARE_STEPS if f"{s}: complete with signature" in text]
    data_s = sum(float(m) for m in re.findall(r"\] (?:chunk|pairs|encode): ran as job \S+.*\(([\d.]+) s\)",
                                               text))
    return Row("5c", "a second run with the same data settings (`pipeline.run prepare --run "
                     "second`): seconds spent in chunk, pairs and encode; ratio = wall time / "
                     "the first run's", f"{data_s:.1f} s of data steps ({len(ran)} ran, "
                     f"{len(skipped)} from the store); {wall:.1f} s wall",
               f"first run: {first_wall:.1f} s wall", wall / first_wall, "0 data steps run",
               not ran, "the second run links to the store versions the first one built; what "
               "is left is the driver's start, config and signatures, and the MLflow parent run")


def run(sizes: dict, work: Path) -> list[Row]:
    """Rows 5a and 5b."""
    s = sizes["orchestration"]
    source = throughput_corpus(work / "inputs", s["songs"], s["song_seconds"], 1, sizes["seed"])
    root, logs = (work / "runs" / "orchestration").resolve(), work / "logs"
    shutil.rmtree(root, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    run_child("bench.orchestration:init_store",
              {"run_root": str(root), "source": str(source), "chunk_seconds": s["chunk_seconds"]},
              logs / "orchestration-init.log")
    rows = [submit_row(root, source, s["chunk_seconds"], logs),
            local_row(root, source, s["chunk_seconds"], logs)]
    rows.append(second_run_row(root, source, s["chunk_seconds"], logs, rows[1].raw["wall"]))
    return rows
