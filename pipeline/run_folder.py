"""The run folder's layout: the one place that names its files and builds their paths.

`runs/<name>/<step>` is a link into the store (docs/formats.md); every path here goes
through it, so code never needs to know. Also the readers of the small shared files
(pairs index, gate.json, exit.json, the encode manifest). Standard library only: data_prep,
jobs and the rest of pipeline import this, never the other way round.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

# --- the input: a music folder ---------------------------------------------------------

SNDFILE_EXTS = {".mp3", ".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff"}   # libsndfile reads
FFMPEG_EXTS = {".m4a", ".aac", ".mp4"}                                    # ffmpeg reads
AUDIO_EXTS = SNDFILE_EXTS | FFMPEG_EXTS   # files with these extensions are the input


# --- the run root: runs, the shared store, sweeps ----------------------------------------

STORE = "store"                     # <run.root>/store/<step>/<version>: shared step outputs
SWEEPS = "sweeps"                   # <run.root>/sweeps/<name>.json: a sweep's record
RESERVED = (STORE, SWEEPS)          # names under run.root that are not runs
CLAIM = "claim.json"                # in a store version: the job that builds it
INPUTS = "inputs.json"              # in a store version: the upstream versions it reads


def sweep_record(root: Path, name: str) -> Path:
    """<run.root>/sweeps/<name>.json."""
    return Path(root) / SWEEPS / f"{name}.json"


# --- steps and run-level files ---------------------------------------------------------

CHUNK, PAIRS, ENCODE = "chunk", "pairs", "encode"
STAGES = ("stage1", "stage2", "stage3")
AUDIT, GENERATE, EVALUATE = "audit", "generate", "evaluate"

PIPELINE_STATE = "pipeline.json"            # run state, written by the driver
PARENT_END = "parent_end.json"              # how the run's chain ended (SLURM: by its last job)
MLFLOW_PARENT = "mlflow_parent.json"        # the run's MLflow parent run id
MLFLOW_CHILD = "mlflow_run.json"            # a step's MLflow child run id
TRACKING_ERRORS = "tracking_errors.jsonl"   # calls a busy store lost, in the step's folder
CONFIG_FILE = "config.resolved.yaml"        # the resolved config (run and stage folders)
MARKER = "step_state.json"                  # a step's own state (chunk: one per shard)
MARKER_GLOB = "step_state*.json"


def step_dir(run_dir: Path, step: str) -> Path:
    """A step's folder in the run (a link to its store version)."""
    return Path(run_dir) / step


def marker_name(shard: Optional[int] = None, num_shards: Optional[int] = None) -> str:
    """step_state.json, or step_state-<shard>-of-<n>.json for a shard of an array step."""
    return MARKER if shard is None else f"step_state-{shard}-of-{num_shards}.json"


def config_file(folder: Path) -> Path:
    """config.resolved.yaml in a run (or stage) folder."""
    return Path(folder) / CONFIG_FILE


# --- chunk -------------------------------------------------------------------------------

SONGS = "songs"
CHUNK_MANIFEST_GLOB = "manifest-*-of-*.jsonl"
CHUNK_RECORD_GLOBS = ("manifest-*.jsonl", "manifest-*.jsonl.partial")   # with journals
CHUNK_MANIFEST_RE = re.compile(r"manifest-(\d+)-of-(\d+)\.jsonl$")
CHUNK_SUMMARY_GLOB = "summary-*.json"


def shard_tag(shard: int, num_shards: int) -> str:
    """'<shard>-of-<n>', the tag of a chunk shard's files."""
    return f"{shard}-of-{num_shards}"


def chunk_manifest(chunk_folder: Path, tag: str) -> Path:
    """manifest-<tag>.jsonl: one line per source file of that shard."""
    return Path(chunk_folder) / f"manifest-{tag}.jsonl"


def chunk_journal(chunk_folder: Path, tag: str) -> Path:
    """manifest-<tag>.jsonl.partial: the progress log of a running shard."""
    return Path(chunk_folder) / f"manifest-{tag}.jsonl.partial"


def chunk_summary(chunk_folder: Path, tag: str) -> Path:
    """summary-<tag>.json: the counts of that shard."""
    return Path(chunk_folder) / f"summary-{tag}.json"


def summary_for_manifest(manifest: Path) -> str:
    """The summary file name that goes with a shard's manifest file."""
    return manifest.name.replace("manifest-", "summary-").replace(".jsonl", ".json")


def song_array(songs_folder: Path, song_id: str) -> Path:
    """songs/<song_id>.npy; the manifest's "array" is its path relative to chunk/."""
    return Path(songs_folder) / f"{song_id}.npy"


def songs_dir(run_dir: Path) -> Path:
    """chunk/songs/: one [chunks, channels, samples] array per song."""
    return step_dir(run_dir, CHUNK) / SONGS


# --- pairs -------------------------------------------------------------------------------

PAIR_KEYS = ("song", "input", "target_song", "target")
SPLITS = ("train", "val")


def pairs_file(run_dir: Path, split: str) -> Path:
    """pairs/<split>.jsonl (train or val)."""
    return step_dir(run_dir, PAIRS) / f"{split}.jsonl"


def pairs_summary(run_dir: Path) -> Path:
    """pairs/summary.json."""
    return step_dir(run_dir, PAIRS) / "summary.json"


def read_pairs(path: Path) -> list[dict]:
    """Read a pairs index (one JSON object per line); a bad line names the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs index not found: {path} (run the pairs step first)")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
        missing = [k for k in PAIR_KEYS if k not in item]
        if missing:
            raise ValueError(f"{path}:{number}: pair is missing keys {missing}")
        pairs.append(item)
    return pairs


# --- encode ------------------------------------------------------------------------------

ENCODE_MANIFEST = "manifest.json"
ENCODE_PLAN = "plan.json"
SHARDS = "shards"
CLEAN_SHARD = "latents-{:05d}.npy"
AUG_SHARD = "aug-{:05d}.npy"
SHARD_PREFIXES = {"clean": "latents-", "aug": "aug-"}


def shard_listing(shard: Path) -> Path:
    """aug-<k>.json beside augmented shard aug-<k>.npy: the variants it holds."""
    return Path(shard).with_suffix(".json")


def encode_manifest(run_dir: Path) -> Path:
    """encode/manifest.json."""
    return step_dir(run_dir, ENCODE) / ENCODE_MANIFEST


def encode_plan(run_dir: Path) -> Path:
    """encode/plan.json: what the clean and the augmented shards were made from."""
    return step_dir(run_dir, ENCODE) / ENCODE_PLAN


def encode_shards(run_dir: Path) -> Path:
    """encode/shards/."""
    return step_dir(run_dir, ENCODE) / SHARDS


def read_encode_manifest(run_dir: Path) -> dict:
    """The encode step's manifest (codec, sample rate, latent_dim, frames, ...)."""
    path = encode_manifest(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"encode manifest not found: {path} (run the encode step first)")
    return json.loads(path.read_text())


# --- training stages ---------------------------------------------------------------------

LAST = "last.pt"
BEST = "best.pt"
ERROR_CHECKPOINT = "error.pt"
METRICS = "metrics.jsonl"
GATE = "gate.json"
EXIT = "exit.json"
CONTINUED = "continued.json"
TRANSFER_REPORT = "transfer_report.json"
BASELINES = "baselines.json"
ORDER_PROBE = "order_probe.json"          # stage 1: does the model use its input's frame order
MODEL_SIZE = "model_size.json"             # parameter counts of the stage's models
EPOCH_GLOB = "epoch_*.pt"
EPOCH_FILE = re.compile(r"^epoch_(\d+)(_d)?\.pt$")   # _d: discriminator only (keep_last)


def stage_file(run_dir: Path, stage: str, name: str) -> Path:
    """A file (LAST, GATE, METRICS, ...) in a stage's folder."""
    return step_dir(run_dir, stage) / name


def epoch_checkpoint(stage_folder: Path, epoch: int, discriminator_only: bool = False) -> Path:
    """epoch_<n>.pt, or epoch_<n>_d.pt (stage 3's discriminator of an older epoch)."""
    return Path(stage_folder) / f"epoch_{epoch}{'_d' if discriminator_only else ''}.pt"


def default_checkpoint(run_dir: Path, configured: str = "") -> Path:
    """The configured checkpoint path, else the run's final stage-3 generator (last.pt).

    Not best.pt: under the pure-GAN curriculum the validation loss (clean inputs) rises as
    alpha grows, so best.pt is usually a pre-curriculum continuation model, while the
    generator that maps noise to music is the last one."""
    return Path(configured) if configured else stage_file(run_dir, STAGES[-1], LAST)


def read_json(path: Path) -> Optional[dict]:
    """A small JSON record of the run folder or store; None when it is missing, unreadable
    or half written."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def node_record(run_dir: Path, stage: str, node_rank: int) -> Path:
    """node-<rank>.json: how one node's training processes ended (multi-node jobs)."""
    return stage_file(run_dir, stage, f"node-{node_rank}.json")


def read_gate(run_dir: Path, stage: str) -> Optional[dict]:
    """A stage's gate.json, or None when missing or unreadable."""
    return read_json(stage_file(run_dir, stage, GATE))


def read_exit(run_dir: Path, stage: str) -> Optional[dict]:
    """A stage's exit.json, or None when missing or unreadable."""
    return read_json(stage_file(run_dir, stage, EXIT))


# --- audit, generate, evaluate -----------------------------------------------------------

def sample_files(out_dir: Path, i: int) -> dict[str, Path]:
    """A generated sample's files: wav, png (spectrogram) and masks (creative only)."""
    return {"wav": Path(out_dir) / f"sample_{i}.wav", "png": Path(out_dir) / f"sample_{i}.png",
            "masks": Path(out_dir) / f"masks_{i}.png"}


AUDIT_CSV = "audit.csv"
AUDIT_PNG = "audit.png"
AUDIT_READING = "reading.txt"
GENERATE_RECORD = "generate.json"
EVALUATE_METRICS = "metrics.json"


def audit_reading(run_dir: Path) -> Path:
    """audit/reading.txt: the audit's verdict in words."""
    return step_dir(run_dir, AUDIT) / AUDIT_READING


def evaluate_metrics(run_dir: Path) -> Path:
    """evaluate/metrics.json."""
    return step_dir(run_dir, EVALUATE) / EVALUATE_METRICS


EVALUATE_VERDICT = "verdict.txt"   # the headline table against the twins, and the verdict


def evaluate_verdict(run_dir: Path) -> Path:
    """evaluate/verdict.txt."""
    return step_dir(run_dir, EVALUATE) / EVALUATE_VERDICT
