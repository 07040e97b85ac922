"""Submit steps to SLURM through submitit, chained with afterok dependencies.

The sbatch options come from slurm_templates/step_header.sbatch filled from the cluster
profile; the chunk step becomes a job array (one task per shard). Everything is queued at
once and the submitter exits; SLURM starts each job when its upstream jobs succeeded.
Job states come from squeue and `scontrol show job` (sacct may not be available).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import submitit

from pipeline.executor import Executor, Submission, Submitted
from pipeline.launch import StepJob
from pipeline.schema import Config

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm_templates" / "step_header.sbatch"
# sbatch options that submitit's SlurmExecutor takes by name (the rest go as additional).
NATIVE = {"job_name", "time", "nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task",
          "mem", "partition", "account", "qos"}


def render_header(cfg: Config, step: str, run_name: str) -> list[str]:
    """The template's #SBATCH lines for one step, empty fields dropped."""
    res = cfg.cluster.steps[step]
    fields = {"job_name": f"{run_name}-{step}", "time_min": res.time_min, "nodes": res.nodes,
              "gpus_per_node": res.gpus_per_node or "", "cpus_per_task": res.cpus_per_task,
              "mem_gb": res.mem_gb, "partition": cfg.cluster.partition,
              "account": cfg.cluster.account, "qos": cfg.cluster.qos,
              "signal_delay_s": cfg.cluster.signal_delay_s}
    lines = []
    for line in TEMPLATE.read_text().splitlines():
        if not line.startswith("#SBATCH"):
            continue
        names = re.findall(r"\{(\w+)\}", line)
        if any(str(fields[n]) == "" for n in names):
            continue
        lines.append(line.format(**fields))
    return lines


def header_parameters(lines: list[str]) -> dict[str, Any]:
    """#SBATCH lines -> submitit SlurmExecutor parameters."""
    params: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for line in lines:
        option = line[len("#SBATCH"):].strip().lstrip("-")
        key, _, value = option.partition("=")
        key = key.replace("-", "_")
        if key == "signal":
            params["signal_delay_s"] = int(value.split("@")[1])
        elif key in NATIVE:
            params[key] = int(value) if value.isdigit() else value
        else:
            extra[key] = value if value else True
    params["additional_parameters"] = extra
    return params


def extra_options(cfg: Config) -> dict[str, Any]:
    """cluster.sbatch_extra as submitit's additional parameters ({constraint: a100} ->
    #SBATCH --constraint=a100; a value of true is a bare flag)."""
    out: dict[str, Any] = {}
    for key, value in cfg.cluster.sbatch_extra.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in NATIVE or name in ("dependency", "array", "output", "error", "signal"):
            raise ValueError(f"cluster.sbatch_extra.{key}: set by the pipeline itself; use "
                             "the cluster profile's own key (partition, account, qos, steps.*)")
        out[name] = True if value is True else str(value)
    return out


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, cfg: Config, run_dir: Path, dry_run: bool = False) -> None:
        self.cfg, self.run_dir, self.dry_run = cfg, Path(run_dir).resolve(), dry_run

    def _executor(self, sub: Submission) -> submitit.SlurmExecutor:
        ex = submitit.SlurmExecutor(folder=self.run_dir / "logs" / sub.step / "%j")
        params = header_parameters(render_header(self.cfg, sub.step, self.run_dir.name))
        params["additional_parameters"].update(extra_options(self.cfg))
        if sub.after:
            params["dependency"] = "afterok:" + ":".join(sub.after)
        if self.cfg.cluster.setup:
            params["setup"] = list(self.cfg.cluster.setup)
        ex.update_parameters(**params)
        return ex

    def _jobs(self, sub: Submission) -> list[StepJob]:
        run_dir = str(self.run_dir)
        if sub.shards is None:
            return [StepJob(run_dir, sub.step, sub.signature)]
        return [StepJob(run_dir, sub.step, sub.signature, i, sub.num_shards) for i in sub.shards]

    def script(self, sub: Submission) -> str:
        ex = self._executor(sub)
        if sub.shards is not None and len(sub.shards) > 1:
            ex.parameters["map_count"] = len(sub.shards)
        return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")

    def submit(self, sub: Submission) -> Submitted:
        jobs = self._executor(sub).submit_array(self._jobs(sub))
        if len(jobs) == 1 and sub.shards is None:
            return Submitted(jobs[0].job_id, "PENDING")
        base = jobs[0].job_id.split("_")[0]
        return Submitted(base, "PENDING", array_tasks=[j.job_id for j in jobs])

    def states(self, job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
        """State of each job (array: its tasks folded into one, worst first)."""
        wanted = {str(j).split("_")[0] for j in job_ids if j}
        if not wanted:
            return {}
        out: dict[str, list[tuple[str, str, str]]] = {}
        squeue = subprocess.run(["squeue", "--me", "-h", "-o", "%i|%F|%T|%M|%r|%P"],
                                capture_output=True, text=True)
        for line in squeue.stdout.splitlines():
            parts = line.split("|")
            if len(parts) != 6:
                continue
            job, array_id, st, elapsed, reason, partition = parts
            base = array_id if array_id not in ("", "N/A") else job.split("_")[0]
            if base in wanted:
                reason = reason if reason != "None" else ""
                if st == "PENDING" and waits_for_nodes(reason):
                    reason = "; ".join(x for x in (reason, unavailable_nodes(partition)) if x)
                out.setdefault(base, []).append((st, elapsed, reason))
        for base in wanted - set(out):
            known = _scontrol_state(base)
            if known:
                out[base] = known
        return {job: _fold(items) for job, items in out.items()}

    def cancel(self, job_ids: list[str]) -> None:
        ids = sorted({str(j) for j in job_ids if j})
        if ids:
            subprocess.run(["scancel", *ids], check=False)


# squeue reasons of a job that waits for nodes (busy, down, drained or too few)
NODE_REASONS = ("Resources", "ReqNodeNotAvail", "Nodes_required", "Nodes required",
                "PartitionNodeLimit", "NodeDown", "BadConstraints")


def waits_for_nodes(reason: str) -> bool:
    """True when squeue's reason says the job waits for nodes."""
    return any(word in reason for word in NODE_REASONS)


def unavailable_nodes(partition: str) -> str:
    """The partition's down, drained or failing nodes with their reasons (sinfo -R)."""
    cmd = ["sinfo", "-R", "-h", "-N", "-o", "%N|%T|%E"]
    if partition:
        cmd += ["-p", partition]
    res = subprocess.run(cmd, capture_output=True, text=True)
    seen = []
    for line in res.stdout.splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[0] and f"node {parts[0]}" not in " ".join(seen):
            seen.append(f"node {parts[0]} {parts[1]}: {parts[2]}")
    return "; ".join(seen)


def _scontrol_state(job_id: str) -> list[tuple[str, str, str]]:
    """States of a job (all array tasks) that squeue no longer lists, while SLURM recalls it."""
    res = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    found = []
    for line in res.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobState" in fields:
            found.append((fields["JobState"], _short_time(fields.get("RunTime", "")),
                          fields.get("Reason", "") if fields.get("Reason") != "None" else ""))
    return found


def _short_time(text: str) -> str:
    """scontrol's 00:01:05 as squeue shows it: 1:05."""
    parts = text.split(":")
    while len(parts) > 2 and parts[0] in ("00", "0"):
        parts.pop(0)
    return ":".join([parts[0].lstrip("0") or "0", *parts[1:]]) if parts and parts[0] else text


_ORDER = ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "PREEMPTED",
          "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "PENDING", "COMPLETED"]


def _fold(items: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    """One state for a job or array: the first that applies in _ORDER."""
    def rank(item: tuple[str, str, str]) -> int:
        return _ORDER.index(item[0]) if item[0] in _ORDER else 0
    return sorted(items, key=rank)[0]
