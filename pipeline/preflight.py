"""What a job would find out only after hours in the queue, checked before anything is
queued: the run name, the music folder and its audio files, the codec's weights, the
partition and what it offers, the extra sbatch options. Each failure names the key to
change; nothing is submitted."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline import run_folder, state
from pipeline import store as store_mod
from pipeline.codec_facts import WEIGHTS_FILE
from pipeline.config import ConfigError
from pipeline.run_folder import AUDIO_EXTS
from pipeline.schema import Config


def preflight(cfg: Config, run_dir: Path, steps: list[str], sigs: dict[str, str],
              force: list[str], cluster: str = "local") -> None:
    """Raise ConfigError for the first thing that would make a queued job fail."""
    if cfg.run.name in store_mod.RESERVED:
        raise ConfigError(f"run.name = {cfg.run.name}: that folder under run.root is the "
                          "pipeline's own; pick another --run")
    if run_folder.CHUNK in steps:
        check_music(cfg)
    if run_folder.ENCODE in steps and encode_will_run(cfg, run_dir, sigs[run_folder.ENCODE], force):
        check_weights(cfg)
    if cluster == "slurm":
        from pipeline.slurm_executor import extra_options
        extra_options(cfg)
        check_partition(cfg, steps)


def check_music(cfg: Config) -> None:
    """data.source is a folder that holds at least one audio file ("" = the demo corpus)."""
    if not cfg.data.source:
        return
    source = Path(cfg.data.source)
    if not source.is_dir():
        raise ConfigError(f"data.source = {cfg.data.source}: no such folder (DATA=...); "
                          "nothing was submitted")
    if not any(p.suffix.lower() in AUDIO_EXTS for p in source.rglob("*")):
        raise ConfigError(f"data.source = {cfg.data.source}: no audio files in it (looked for "
                          f"{', '.join(sorted(AUDIO_EXTS))}, at any depth); nothing was submitted")


def encode_will_run(cfg: Config, run_dir: Path, signature: str, force: list[str]) -> bool:
    if force:
        return True
    version = store_mod.choose(store_mod.store_root(cfg), run_folder.ENCODE, signature, None, False)
    return not (state.is_complete(run_dir, run_folder.ENCODE, signature, None)
                or state.folder_complete(version, signature))


def check_weights(cfg: Config) -> None:
    """EnCodec's weights are in place when encode will use them."""
    if cfg.encode.codec != "encodec" or not cfg.encode.pretrained:
        return
    weights = Path(cfg.encode.weights_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"encode needs the EnCodec weights {weights.resolve()}, which are "
                          "not there (`make fetch-weights` says how to place them; key "
                          "encode.weights_dir), or use OVERRIDES=encode.codec=mel; nothing "
                          "was submitted")


@dataclass
class Partition:
    name: str
    nodes: int
    gpus: int        # most GPUs on one node
    cpus: int        # most CPUs on one node
    mem_mb: int      # most memory on one node


def partitions() -> dict[str, Partition]:
    """What `sinfo` says each partition offers ("*" marks the default, kept in the name)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%G|%c|%m|%D"], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sinfo failed ({out.stderr.strip()[:200]}): is SLURM reachable "
                          "from here? (or use --cluster local)")
    found: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        name, gres, cpus, mem, nodes = line.split("|")
        gpus = max([int(n) for n in _gpu_counts(gres)] or [0])
        old = found.get(name)
        part = Partition(name, int(nodes), gpus, int(cpus.rstrip("+")), int(mem.rstrip("+")))
        if old:
            part = Partition(name, old.nodes + part.nodes, max(old.gpus, part.gpus),
                             max(old.cpus, part.cpus), max(old.mem_mb, part.mem_mb))
        found[name] = part
    return found


def _gpu_counts(gres: str) -> list[str]:
    """'gpu:4,gpu:a100:8(S:0-1)' -> ['4', '8']."""
    counts = []
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            counts.append(parts[-1])
    return counts


def check_partition(cfg: Config, steps: list[str], found: Optional[dict] = None) -> None:
    """The partition exists and its nodes offer the GPUs, CPUs, memory and node count each
    step asks for."""
    if shutil.which("sinfo") is None and found is None:
        return   # the submit will say sbatch is missing
    found = partitions() if found is None else found
    if cfg.cluster.partition:
        part = found.get(cfg.cluster.partition) or found.get(cfg.cluster.partition + "*")
        if part is None:
            names = ", ".join(p.rstrip("*") for p in found) or "none"
            raise ConfigError(f"cluster.partition = {cfg.cluster.partition}: no such partition "
                              f"(this cluster has: {names})")
    else:
        part = next((p for n, p in found.items() if n.endswith("*")), None)
        if part is None:
            return   # no default partition: sbatch will say so
    for step in steps:
        res = cfg.cluster.steps[step]
        asks = [("gpus_per_node", res.gpus_per_node, part.gpus, "GPUs"),
                ("cpus_per_task", res.cpus_per_task, part.cpus, "CPUs"),
                ("mem_gb", res.mem_gb * 1024, part.mem_mb, "MB of memory"),
                ("nodes", res.nodes, part.nodes, "nodes")]
        for key, want, have, what in asks:
            if want > have:
                shown = res.mem_gb if key == "mem_gb" else want
                raise ConfigError(f"cluster.steps.{step}.{key} = {shown}: partition "
                                  f"{part.name.rstrip('*')} offers at most {have} {what}"
                                  f"{' per node' if key != 'nodes' else ''}; nothing was submitted")
