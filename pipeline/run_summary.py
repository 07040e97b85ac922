"""What the MLflow parent run shows at a glance: headline params known at submission, and
each step's headline results, read from the step's own output files when it finishes.

Steps run as separate jobs and the driver may be gone when they end, so each step writes
its results onto the parent run itself (pipeline.tracking.step_run calls `step_results`).
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any, Callable

from pipeline import run_folder as rf
from pipeline.schema import Config

ROOT = Path(__file__).resolve().parent.parent
STAGES = rf.STAGES


def sweep_tags(cfg: Config) -> dict[str, str]:
    """Tags `sweep` and `sweep.point` from run.sweep / run.sweep_point, when set."""
    tags = {"sweep": getattr(cfg.run, "sweep", ""),
            "sweep.point": getattr(cfg.run, "sweep_point", "")}
    return {k: str(v) for k, v in tags.items() if v}


def git_commit() -> str:
    """HEAD of the code's checkout (with '-dirty' for uncommitted changes), or ''."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("-dirty" if dirty.strip() else "")


def description(cfg: Config, run_dir: Path) -> str:
    """The parent run's description in the MLflow UI."""
    sweep = sweep_tags(cfg)
    point = (f" Point `{sweep.get('sweep.point', '')}` of sweep `{sweep['sweep']}`."
             if "sweep" in sweep else "")
    return (f"Pipeline run `{cfg.run.name}`, folder `{Path(run_dir).resolve()}`.{point} "
            "Headline params and each finished step's results (`<stage>/best_val_loss`, "
            "`eval/*_ratio`, tag `audit.verdict`) are on this run; each step is a child run; "
            "the whole config is the artifact `config.resolved.yaml`.")


def headline_params(cfg: Config) -> dict[str, Any]:
    """The few params a researcher compares runs by (codec, model sizes, learning rates,
    batch sizes, epochs, seed); the whole config is the run's config.resolved.yaml."""
    t, d = cfg.model.transformer, cfg.model.discriminator
    params: dict[str, Any] = {
        "seed": cfg.run.seed, "codec": cfg.encode.codec,
        "chunk_seconds": cfg.data.chunk_seconds, "sample_rate": cfg.data.sample_rate,
        "model.d_model": t.d_model, "model.layers": t.layers, "model.heads": t.heads,
        "model.vae_latent_channels": cfg.model.vae.latent_channels,
        "model.d_channels": d.channels, "model.d_layers": d.layers,
    }
    for stage in STAGES:
        scfg = getattr(cfg, stage)
        params |= {f"{stage}.lr": scfg.lr, f"{stage}.batch_size": scfg.batch_size,
                   f"{stage}.epochs": scfg.epochs, f"{stage}.mode": scfg.mode}
        if getattr(scfg, "gan", None) is not None:
            params[f"{stage}.lr_d"] = scfg.gan.lr_d
    return params


def stage_params(cfg: Config, stage: str) -> dict[str, Any]:
    """Params a training stage's own run adds to its config section: seed, codec and model
    sizes (the trainer adds its models' parameter counts)."""
    params = {k: v for k, v in headline_params(cfg).items()
              if k in ("seed", "codec") or k.startswith("model.")}
    return params


# --- results, per step kind -----------------------------------------------------------

Results = tuple[dict[str, float], dict[str, str]]   # (metrics, tags) for the parent run


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def data_results(cfg: Config, run_dir: Path, step: str) -> Results:
    """Hours, songs and chunks over every chunk shard (after pairs, when all have run);
    pairs per split; encoded latents."""
    metrics: dict[str, float] = {}
    if step == "pairs":
        chunk = rf.step_dir(run_dir, "chunk")
        shards = [_json(p) for p in sorted(chunk.glob(rf.CHUNK_SUMMARY_GLOB))]
        if shards:
            metrics |= {f"data/{k}": sum(s.get(k, 0) for s in shards)
                        for k in ("audio_hours", "ok", "failed", "chunks")}
            metrics["data/songs"] = metrics.pop("data/ok")
        summary = _json(rf.pairs_summary(run_dir))
        metrics |= {f"data/{k}": summary[k] for k in ("pairs_train", "pairs_val") if k in summary}
    if step == "encode":
        manifest = _json(rf.encode_manifest(run_dir))
        if "rows" in manifest:
            metrics["data/latents"] = manifest["rows"]
    return metrics, {}


def stage_results(cfg: Config, run_dir: Path, stage: str) -> Results:
    """Best and last validation loss, epochs run, the gate, parameter counts."""
    path = rf.stage_file(run_dir, stage, rf.METRICS)
    lines = path.read_text().splitlines() if path.exists() else []
    history = [json.loads(line) for line in lines if line.strip()]
    losses = [h["val_loss"] for h in history if math.isfinite(h.get("val_loss", math.nan))]
    metrics: dict[str, float] = {}
    if losses:
        metrics |= {f"{stage}/best_val_loss": min(losses), f"{stage}/last_val_loss": losses[-1],
                    f"{stage}/epochs": history[-1].get("epoch", len(history))}
    gate = rf.read_gate(run_dir, stage) or {}
    if "passed" in gate:
        metrics[f"{stage}/gate_passed"] = float(gate["passed"])
    metrics |= parameter_counts(run_dir, stage)
    return metrics, {}


def parameter_counts(run_dir: Path, stage: str) -> dict[str, float]:
    """Generator (and discriminator) parameter counts the stage's trainer recorded."""
    counts = _json(rf.stage_file(run_dir, stage, rf.MODEL_SIZE))
    return {f"{stage}/{k}": float(v) for k, v in counts.items()}


def audit_results(cfg: Config, run_dir: Path, step: str) -> Results:
    """The audit's verdict (tag audit.verdict) from its reading."""
    reading = rf.audit_reading(run_dir)
    lines = reading.read_text().splitlines() if reading.exists() else []
    verdicts = [line.split(":", 1)[1].strip() for line in lines if line.startswith("verdict:")]
    return {}, ({"audit.verdict": verdicts[-1]} if verdicts else {})


EVALUATE_HEADLINE = ("two_sample_accuracy", "two_sample_accuracy_prior", "periodicity",
                     "periodicity_real", "rms_db_diff", "precision", "recall",
                     "frechet_ratio", "diversity_ratio", "flatness_ratio")


def evaluate_results(cfg: Config, run_dir: Path, step: str) -> Results:
    """The evaluation's headline figures (the generator's, with the prior's two-sample
    accuracy and real music's periodicity beside them) as eval/<name>, and its verdict."""
    record = _json(rf.evaluate_metrics(run_dir))
    figures = record.get("metrics", {})
    tags = {"evaluate.verdict": record["verdict"]} if record.get("verdict") else {}
    return {f"eval/{k}": figures[k] for k in EVALUATE_HEADLINE
            if isinstance(figures.get(k), (int, float))}, tags


def generate_results(cfg: Config, run_dir: Path, step: str) -> Results:
    """How many samples generate wrote and from which checkpoint."""
    made = _json(rf.step_dir(run_dir, "generate") / rf.GENERATE_RECORD)
    if not made:
        return {}, {}
    return ({"generate/samples": len(made.get("samples", []))},
            {"generate.checkpoint": str(made.get("checkpoint", ""))})


RESULTS: dict[str, Callable[[Config, Path, str], Results]] = {
    "pairs": data_results, "encode": data_results,
    **{stage: stage_results for stage in STAGES},
    "audit": audit_results, "evaluate": evaluate_results, "generate": generate_results,
}


def step_results(cfg: Config, run_dir: Path, step: str) -> Results:
    """Headline (metrics, tags) of a finished step for its parent run; ({}, {}) if none."""
    read = RESULTS.get(step.split("/")[0])
    return read(cfg, Path(run_dir), step) if read else ({}, {})
