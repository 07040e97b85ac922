"""Benchmark 3: the encode step's throughput against the encoder's compute-only throughput.

For each codec, in one fresh process: chunk a folder (not timed), load every chunk into
one in-memory tensor, then time (a) the whole encode step (`data_prep.encode.run`: codec
construction, reading the memory-mapped chunk arrays, float16 conversion, shard writes,
manifest, MLflow) and (b) `codec.encode` alone over the same tensors in batches of the
same size. Kernels are warmed once before either clock starts, and a first pass of both is
not counted; the figure is the median over the passes of (compute-only time / step time).
"""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from bench.child import run_child
from bench.inputs import subset_folder, throughput_corpus
from bench.report import Row
from pipeline import run_folder as rf

TARGET = 0.9


def encode_config(run_root: Path, run_name: str, source: Path, sample_rate: int,
                  chunk_seconds: float, codec: str, batch_size: int):
    """Default settings, this codec on CPU with random EnCodec weights (none can be fetched)."""
    from pipeline import config
    return config.load(None, "local", [
        f"run.root={run_root}", f"run.name={run_name}", f"data.source={source}",
        f"data.sample_rate={sample_rate}", f"data.chunk_seconds={chunk_seconds}",
        "data.num_shards=1", f"encode.codec={codec}", "encode.pretrained=false",
        "encode.device=cpu", f"encode.batch_size={batch_size}"])


def measure_encode(source: str, run_root: str, codec: str, sample_rate: int,
                   chunk_seconds: float, batch_size: int, repeats: int) -> dict:
    """Best step time and best compute-only time over `repeats` alternating passes."""
    import mlflow  # noqa: F401  imports are not timed
    import numpy as np
    import torch

    from data_prep.chunk import run_shard
    from data_prep.codecs import load_codec
    from data_prep.encode import as_float, open_songs
    from data_prep.encode import run as encode_step
    from pipeline.malloc import reuse_freed_memory
    from pipeline.tracking import ensure_parent_run

    cfg = encode_config(Path(run_root), f"encode-{codec}", Path(source), sample_rate,
                        chunk_seconds, codec, batch_size)
    run_dir = Path(run_root) / f"encode-{codec}"
    shutil.rmtree(run_dir, ignore_errors=True)
    ensure_parent_run(cfg, run_dir)
    run_shard(cfg, run_dir, 0, 1)
    arrays, samples = open_songs(run_dir)
    waves = torch.from_numpy(np.stack([as_float(arrays[s][c]) for s in sorted(arrays)
                                       for c in range(arrays[s].shape[0])]))
    start = time.perf_counter()
    model = load_codec(cfg.encode, sample_rate, "cpu", seed=cfg.run.seed)
    build_s = time.perf_counter() - start
    reuse_freed_memory()   # as the encode step does; set here so both paths run with it
    model.encode(waves[:batch_size])  # warm the kernels for both paths
    step_s, compute_s = [], []
    for _ in range(repeats + 1):   # pass 1 warms up (the heap grows, kernels are built)
        shutil.rmtree(rf.step_dir(run_dir, rf.ENCODE), ignore_errors=True)
        start = time.perf_counter()
        manifest = encode_step(cfg, run_dir)
        step_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(waves), batch_size):
                model.encode(waves[i:i + batch_size])
        compute_s.append(time.perf_counter() - start)
    if manifest["rows"] != len(waves):
        raise RuntimeError(f"encode step wrote {manifest['rows']} rows for {len(waves)} chunks")
    shutil.rmtree(rf.step_dir(run_dir, rf.ENCODE), ignore_errors=True)
    parts = step_breakdown(lambda: encode_step(cfg, run_dir))
    # each pass pairs a step with the compute-only run right after it, so drifts in this
    # shared machine's speed hit both; the median pass ratio is the figure
    ratios = [c / s for s, c in zip(step_s[1:], compute_s[1:])]
    return {"ratio": statistics.median(ratios), "ratios": ratios,
            "step_s": statistics.median(step_s[1:]), "compute_s": statistics.median(compute_s[1:]),
            "build_s": build_s, "audio_s": len(waves) * samples / sample_rate,
            "rows": len(waves), "threads": torch.get_num_threads(), "parts": parts}


def step_breakdown(step) -> dict:
    """Where one more (uncounted) encode step's time goes, from cProfile of its main
    thread: the codec's encode calls, MLflow (the step's run, params, metrics, artifact),
    building the codec, and the rest (signatures, plan, the reader and writer threads'
    hand-overs, the float16 range check and cast, the manifest)."""
    import cProfile
    import pstats
    import time as clock

    profile = cProfile.Profile()
    start = clock.perf_counter()
    profile.runcall(step)
    total = clock.perf_counter() - start
    stats = pstats.Stats(profile).stats   # (file, line, name) -> (cc, nc, tt, ct, callers)

    def cumulative(file_end: str, names: tuple[str, ...]) -> float:
        return sum(v[3] for (f, _, n), v in stats.items() if f.endswith(file_end) and n in names)

    encode = (cumulative("codec_mel.py", ("encode",))
              + cumulative("codec_encodec.py", ("encode",)))
    mlflow = cumulative("pipeline/tracking.py", ("step_run", "log_params", "log_metrics",
                                                 "log_artifact"))
    build = cumulative("data_prep/codecs.py", ("load_codec",))
    # profiling slows the Python-level work, so the shares, not the seconds, are the figure
    return {"total": total, "encode": encode, "mlflow": mlflow, "build": build,
            "rest": max(0.0, total - encode - mlflow - build)}


def breakdown_text(parts: dict) -> str:
    """The profiled step's shares, in words."""
    share = {k: parts[k] / parts["total"] for k in ("encode", "mlflow", "build", "rest")}
    return (f"A profiled extra step (cProfile, main thread) spent {share['encode']:.0%} in the "
            f"codec's encode, {share['mlflow']:.0%} in MLflow (the step's run, params, metrics, "
            f"manifest artifact), {share['build']:.0%} building the codec and {share['rest']:.0%} "
            "in the rest (signatures and plan, waiting on the reader thread, the float16 range "
            "check and cast, handing batches to the writer thread, the manifest)")


def run(sizes: dict, work: Path) -> list[Row]:
    """Rows 3a (EnCodec) and 3b (mel)."""
    s, c, rate = sizes["encode"], sizes["chunk"], sizes["sample_rate"]
    corpus = throughput_corpus(work / "inputs", c["songs"], c["song_seconds"], c["copies"],
                               sizes["seed"])
    root, logs = work / "runs" / "encode", work / "logs"
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for key, codec in (("3a", "encodec"), ("3b", "mel")):
        folder = subset_folder(corpus, s[f"{codec}_files"], root / f"source-{codec}")
        res = run_child("bench.encode_throughput:measure_encode",
                        {"source": str(folder), "run_root": str(root), "codec": codec,
                         "sample_rate": rate, "chunk_seconds": s["chunk_seconds"],
                         "batch_size": s["batch_size"], "repeats": s[f"{codec}_repeats"]},
                        logs / f"encode-{codec}.log").result
        step_x, compute_x = res["audio_s"] / res["step_s"], res["audio_s"] / res["compute_s"]
        ratio = res["ratio"]
        label = "EnCodec 24 kHz encoder, RANDOM weights (real architecture)" \
            if codec == "encodec" else "mel (128 log-mel bins, 75 frames/s)"
        overhead = res["step_s"] - res["compute_s"]
        passes = ", ".join(f"{r:.2f}" for r in res["ratios"])
        rows.append(Row(
            key, f"encode step / compute-only, {label}",
            f"{step_x:.1f}x real time", f"compute-only: {compute_x:.1f}x real time",
            ratio, f">= {TARGET}", ratio >= TARGET,
            f"{res['rows']} chunks of {s['chunk_seconds']:g} s ({res['audio_s'] / 60:.1f} min "
            f"of audio), batch {s['batch_size']}, CPU, {res['threads']} torch threads. A warm-up "
            f"pass, then {s[f'{codec}_repeats']} passes of (step, compute-only); the ratio is the "
            f"median of the passes' ratios ({passes}), the times are medians. The step took "
            f"{overhead:+.2f} s beyond the pure encoder time ({res['step_s']:.2f} s vs "
            f"{res['compute_s']:.2f} s); building the codec alone takes {res['build_s']:.2f} s. "
            f"{breakdown_text(res['parts'])}.",
            raw={f"{codec}_step_x": step_x, f"{codec}_compute_x": compute_x}))
        shutil.rmtree(root / f"encode-{codec}", ignore_errors=True)
    return rows
