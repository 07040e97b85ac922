"""Does the GPU path work, and how fast is it: one command on a CUDA machine (`make gpu-check`).

    python -m bench.gpu_check                    # CUDA: every check, within 5 minutes
    python -m bench.gpu_check --device cpu       # the same code at tiny sizes on the CPU (tests)
    srun --gpus=1 make gpu-check                 # on a cluster node

Runs, with the pipeline's own code (codecs, data steps, trainer, torchrun, generate, audit):
1. EnCodec (pretrained weights if weights/ holds them, else random, said so) and mel
   encode throughput, through the encode step's path and compute-only;
2. stages 1, 2, 3 at the demo's and the default model sizes in fp32, bf16 and fp16 (with
   the GradScaler): samples/s, peak memory, data-wait share, finite losses, and a resume
   from the epoch-1 checkpoint that must end where the uninterrupted run ended;
3. torchrun over every GPU present: an NCCL all-reduce of known values, and stage 1 on all
   ranks with the replicas' weights equal after every epoch;
4. generate and the audit on the stage-3 run;
5. (CUDA only) stages 1-2 with stageN.deterministic=true, which bit-exact resumes need.
Prints a table and writes it as JSON (--out). Without CUDA, and no --device cpu, it says so
in one line and exits 0. Exit 1 when a check failed. Checks not started before the time
budget ran out are listed as "not run".
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.gpu_data import CPU_SIZES, GPU_SIZES, Size, data_overrides, prepare, write_songs

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16", "fp16")
# Nothing starts after CUDA_BUDGET_S; the longest single thing that can still be running
# then (one default-size stage run or its resume) ends well inside the 5 minutes. The CPU
# mode exists to run the code, not to time it: its budget only stops a runaway.
CUDA_BUDGET_S = 270.0
CPU_BUDGET_S = 1800.0


@dataclass
class Check:
    """One line of the table."""
    section: str     # codec | data | train | ddp | generate | audit | deterministic
    what: str
    status: str      # ok | FAILED | refused | not run
    result: str = ""
    details: dict = field(default_factory=dict)


class Budget:
    """Seconds left of the check's time budget."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def not_run(section: str, what: str, budget: Budget) -> Check:
    return Check(section, what, "not run", f"time budget of {budget.seconds:.0f} s spent")


# --- 1. codecs ---------------------------------------------------------------------------

def weights_present(weights_dir: str) -> bool:
    from pipeline.codec_facts import WEIGHTS_FILE
    return (Path(weights_dir) / WEIGHTS_FILE).is_file()


def codec_throughput(name: str, device: str, batch: int, chunk_s: float, batches: int) -> Check:
    """x real time of the encode step's path (data_prep.encode.encode_batches: host batch,
    pinned copy to the device, encode, float16 range check, back to the host) and of
    codec.encode alone on device-resident audio."""
    import numpy as np
    import torch

    from data_prep.codecs import load_codec
    from data_prep.encode import encode_batches
    from pipeline import config

    rate = 24000
    cfg = config.load(None, "local", [f"encode.codec={name}", f"encode.device={device}"])
    pretrained = name == "encodec" and weights_present(cfg.encode.weights_dir)
    cfg.encode.pretrained = pretrained
    start = time.perf_counter()
    codec = load_codec(cfg.encode, rate, device, seed=0)
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    host = (0.1 * rng.standard_normal((batch, 1, int(chunk_s * rate)))).astype(np.float32)
    on_device = torch.from_numpy(host).to(codec.device)
    sync = torch.cuda.synchronize if codec.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in encode_batches(codec, iter([host]), codec.device):   # warm-up
            pass
        sync()
        start = time.perf_counter()
        for _ in encode_batches(codec, iter([host] * batches), codec.device):
            pass
        sync()
        step_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            codec.encode(on_device)
        sync()
        compute_s = time.perf_counter() - start
    audio_s = batches * batch * chunk_s
    label = {"encodec": "EnCodec 24 kHz encoder, " + ("pretrained weights" if pretrained else
                                                      "RANDOM weights (no weights file)"),
             "mel": "mel codec (128 log-mel bins)"}[name]
    details = {"codec": name, "pretrained": pretrained, "device": str(codec.device),
               "batch": batch, "chunk_s": chunk_s, "batches": batches,
               "step_x_real_time": audio_s / step_s, "compute_x_real_time": audio_s / compute_s,
               "ratio": compute_s / step_s, "build_s": build_s}
    return Check("codec", f"encode throughput, {label}", "ok",
                 f"{audio_s / step_s:.0f}x real time through the encode step's path, "
                 f"{audio_s / compute_s:.0f}x compute-only (ratio {compute_s / step_s:.2f}); "
                 f"batch {batch} x {chunk_s:g} s on {codec.device}", details)


# --- 2. training ---------------------------------------------------------------------------

def prepare_size(size: Size, work: Path, device: str) -> tuple[Path, Check]:
    """Songs, then chunk -> pairs -> encode with the pipeline's steps, for one size."""
    from pipeline import config

    source = work / "songs" / f"{size.name}"
    write_songs(source, size.songs, size.song_seconds, size.sample_rate)
    data_dir = work / "data" / size.name
    shutil.rmtree(data_dir, ignore_errors=True)
    cfg = config.load(size.experiment, "local", [
        *size.overrides, *data_overrides(size, source, device),
        f"run.root={work / 'data'}", f"run.name={size.name}",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", "mlflow.system_metrics=false"])
    took = prepare(cfg, data_dir)
    manifest = json.loads((data_dir / "encode" / "manifest.json").read_text())
    pairs = {s: len((data_dir / "pairs" / f"{s}.jsonl").read_text().splitlines())
             for s in ("train", "val")}
    return data_dir, Check(
        "data", f"{size.name}: chunk, pairs, encode (mel on {device})", "ok",
        f"{size.songs} songs x {size.song_seconds:g} s -> {manifest['rows']} chunks of "
        f"{size.chunk_seconds:g} s, {pairs['train']} train / {pairs['val']} val pairs in "
        + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()),
        {"rows": manifest["rows"], "frames": manifest["frames"], "pairs": pairs,
         "seconds": took})


def train_text(r) -> str:
    """One stage run's figures in a line."""
    if r.status in ("not run", "refused"):
        return r.reason
    parts = []
    if r.samples_per_s:
        parts.append(f"{r.samples_per_s:.1f} samples/s")
    if r.peak_mem_mb is not None:
        parts.append(f"peak {r.peak_mem_mb:.0f} MB" + (f" (reserved {r.peak_reserved_mb:.0f})"
                                                       if r.peak_reserved_mb else ""))
    if r.data_wait_share is not None:
        parts.append(f"data wait {r.data_wait_share:.1%}")
    parts.append(f"{r.steps} steps, losses " + ("finite" if r.losses_finite else "NOT finite"))
    if r.resume:
        if "share" in r.resume:
            parts.append(f"resume from epoch 1: {r.resume['share']:.2g} of the movement apart "
                         f"(tolerance {r.resume['tolerance']:g}) {r.resume['status']}")
        else:
            parts.append(f"resume: {r.resume['status']} {r.resume.get('reason', '')}")
    if r.status == "FAILED" and r.reason:
        parts.append(" ".join(r.reason.split())[:400])
    return ", ".join(parts)


def train_checks(results) -> list[Check]:
    return [Check("train", f"{r.size} {r.stage} {r.precision}", r.status, train_text(r),
                  asdict(r)) for r in results]


# --- 3. torchrun -----------------------------------------------------------------------------

def ddp_checks(size: Size, data_dir: Path, work: Path, mlflow_uri: str, device: str,
               budget: Budget) -> tuple[list[Check], int]:
    """The all-reduce over every GPU (2 gloo processes on the CPU), then stage 1 on them."""
    import torch

    from bench import gpu_ddp
    from bench.gpu_train import make_run

    cuda = device == "cuda"
    nproc = torch.cuda.device_count() if cuda else 2
    threads = None if cuda else 1
    ddp_dir = work / "ddp"
    ddp_dir.mkdir(parents=True, exist_ok=True)
    checks = []
    reduce = gpu_ddp.check_allreduce(nproc, ddp_dir, 256 if cuda else 4,
                                     max(30.0, min(240.0, budget.left())), threads)
    text = (f"{reduce['backend']} over {reduce['world_size']} process(es) on "
            f"{reduce['device']}: sums correct, {reduce['megabytes']} MB all-reduce "
            f"{reduce['ms']:.2f} ms ({reduce['bus_gb_s']:.1f} GB/s bus bandwidth)"
            if reduce["status"] == "ok" else reduce.get("reason", ""))
    checks.append(Check("ddp", f"all-reduce, torchrun --nproc_per_node {nproc}",
                        reduce["status"], text, reduce))
    if budget.spent():
        checks.append(not_run("ddp", f"{size.name} stage1 under torchrun", budget))
        return checks, nproc
    precision = "bf16" if cuda else "fp32"
    _, run_dir = make_run(size, precision, data_dir, work / "runs", mlflow_uri,
                          f"{size.name}-torchrun", batch_size=size.batch_size * nproc)
    trained = gpu_ddp.check_trainer(run_dir, "stage1", nproc,
                                    max(60.0, min(300.0, budget.left())), threads)
    text = (f"{trained['epochs']} epochs on {nproc} rank(s), global batch "
            f"{size.batch_size * nproc}, {trained['samples_per_s'] or 0:.1f} samples/s; "
            f"replicas' largest weight difference {trained['rank_param_max_diff']}"
            + ("" if nproc > 1 else " (one rank: no DDP wrapper, nothing to compare)")
            if trained["status"] == "ok" else trained["reason"][:400])
    checks.append(Check("ddp", f"{size.name} stage1 {precision} under torchrun "
                               f"({nproc} rank(s))", trained["status"], text, trained))
    return checks, nproc


# --- 4. generate and audit ---------------------------------------------------------------------

def generate_and_audit(run_dir: Path) -> list[Check]:
    """jobs.generate and jobs.audit on a finished stage-3 run, each timed."""
    import torch

    from jobs import audit, generate
    from pipeline.config import load_resolved

    cfg = load_resolved(run_dir)
    checks = []
    start = time.perf_counter()
    try:
        made = generate.run(cfg, run_dir)
        seconds = time.perf_counter() - start
        wavs = [s["wav"] for s in made["samples"] if Path(s["wav"]).exists()]
        ok = len(wavs) == made["n"] == len(made["samples"])
        device = "cuda" if cfg.encode.device != "cpu" and torch.cuda.is_available() else "cpu"
        checks.append(Check("generate", "jobs.generate from stage 3's last.pt",
                            "ok" if ok else "FAILED",
                            f"{len(wavs)} of {made['n']} WAVs in {seconds:.1f} s; generator "
                            f"on the CPU (jobs.load_generator), {made['codec']} decode on "
                            f"{device}", {"samples": len(wavs), "n": made["n"],
                                          "wall_s": seconds}))
    except Exception as exc:   # report it, go on to the audit
        checks.append(Check("generate", "jobs.generate from stage 3's last.pt", "FAILED",
                            f"{type(exc).__name__}: {exc}"[:400]))
    start = time.perf_counter()
    try:
        read = audit.run(cfg, run_dir)
        seconds = time.perf_counter() - start
        ok = len(read["rows"]) >= 2 and bool(read["verdict"])
        checks.append(Check("audit", "jobs.audit over stage 3's discriminator checkpoints",
                            "ok" if ok else "FAILED",
                            f"{len(read['rows'])} discriminator epochs in {seconds:.1f} s, "
                            f"verdict '{read['verdict']}'",
                            {"rows": len(read["rows"]), "verdict": read["verdict"],
                             "wall_s": seconds}))
    except Exception as exc:
        checks.append(Check("audit", "jobs.audit over stage 3's discriminator checkpoints",
                            "FAILED", f"{type(exc).__name__}: {exc}"[:400]))
    return checks


# --- the whole check ---------------------------------------------------------------------------

def machine(device: str) -> dict:
    import torch
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        nccl = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return info


def run_checks(device: str, work: Path, budget: Budget, sizes: tuple[Size, ...]) -> list[Check]:
    """Every check, in the order that keeps the most important ones inside the budget."""
    from bench.gpu_train import run_chain

    cuda = device == "cuda"
    checks: list[Check] = []
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"
    for name in ("encodec", "mel"):
        try:
            checks.append(codec_throughput(name, device, 8 if cuda else 2,
                                           16.0 if cuda else 1.0,
                                           (16 if name == "encodec" else 64) if cuda else 2))
        except Exception as exc:
            checks.append(Check("codec", f"encode throughput, {name}", "FAILED",
                                f"{type(exc).__name__}: {exc}"[:400]))
    data: dict[str, Path] = {}
    stage3_runs: dict[str, Path] = {}
    first = sizes[0]
    # the first (small) size whole, then torchrun and generate/audit on it, then the rest
    for size in sizes:
        if budget.spent():
            checks.append(not_run("data", f"{size.name}: chunk, pairs, encode", budget))
            checks += [not_run("train", f"{size.name} {s} {p}", budget)
                       for p in PRECISIONS for s in ("stage1", "stage2", "stage3")]
            continue
        try:
            data[size.name], check = prepare_size(size, work, device)
            checks.append(check)
        except Exception as exc:
            checks.append(Check("data", f"{size.name}: chunk, pairs, encode", "FAILED",
                                f"{type(exc).__name__}: {exc}"[:400]))
            continue
        for precision in PRECISIONS:
            if precision == "bf16" and not cuda:   # autocast is off on the CPU
                checks += [Check("train", f"{size.name} {s} bf16", "not run",
                                 "on the CPU bf16 autocast is off: the fp32 run above")
                           for s in ("stage1", "stage2", "stage3")]
                continue
            if budget.spent():
                checks += [not_run("train", f"{size.name} {s} {precision}", budget)
                           for s in ("stage1", "stage2", "stage3")]
                continue
            results, run_dir = run_chain(size, precision, data[size.name], work / "runs",
                                         mlflow_uri, device, time_left=budget.left)
            checks += train_checks(results)
            if results[-1].status == "ok":
                stage3_runs.setdefault(size.name, run_dir)
        if size is first:
            checks += after_first_size(size, data[size.name], work, mlflow_uri, device,
                                       budget, stage3_runs.get(size.name))
    return checks


def after_first_size(size: Size, data_dir: Path, work: Path, mlflow_uri: str, device: str,
                     budget: Budget, stage3_run: Path | None) -> list[Check]:
    """torchrun, generate/audit and the deterministic switch, on the first size's data."""
    from bench.gpu_train import run_chain

    checks: list[Check] = []
    if budget.spent():
        return [not_run(s, w, budget) for s, w in (("ddp", "all-reduce and stage1 under torchrun"),
                                                   ("generate", "jobs.generate"),
                                                   ("audit", "jobs.audit"))]
    try:
        checks += ddp_checks(size, data_dir, work, mlflow_uri, device, budget)[0]
    except Exception as exc:
        checks.append(Check("ddp", "all-reduce and stage1 under torchrun", "FAILED",
                            f"{type(exc).__name__}: {exc}"[:400]))
    if stage3_run is None:
        checks += [Check(s, f"jobs.{s}", "not run", "no stage-3 run finished")
                   for s in ("generate", "audit")]
    elif budget.spent():
        checks += [not_run(s, f"jobs.{s}", budget) for s in ("generate", "audit")]
    else:
        checks += generate_and_audit(stage3_run)
    what = f"{size.name} stage2 fp32 with stageN.deterministic=true"
    if device == "cpu":   # deterministic CPU training is what tests/test_resume_exact.py runs
        return checks + [Check("deterministic", what, "not run",
                               "a CUDA question; on the CPU the resume tests cover it")]
    if budget.spent():
        return checks + [not_run("deterministic", what, budget)]
    # stage 2's VAE pools adaptively; a CUDA backward of that has no deterministic kernel
    # in some torch versions, and `stageN.deterministic` is what bit-exact resumes need
    results, _ = run_chain(size, "fp32", data_dir, work / "runs", mlflow_uri, device,
                           resume=False, stages=("stage1", "stage2"), deterministic=True,
                           name=f"{size.name}-deterministic", time_left=budget.left)
    r = results[-1]
    checks.append(Check("deterministic", what, r.status, train_text(r), asdict(r)))
    return checks


def render(checks: list[Check], header: dict, seconds: float) -> str:
    """The table as text."""
    width = max(len(c.what) for c in checks) if checks else 10
    lines = [f"gpu-check on {header.get('device')}"
             + (f" ({', '.join(header['gpus'])})" if header.get("gpus") else "")
             + f", torch {header.get('torch')}, CUDA {header.get('cuda')}, {seconds:.0f} s", ""]
    lines.append(f"{'section':<13} {'check':<{width}}  {'status':<8} result")
    for c in checks:
        lines.append(f"{c.section:<13} {c.what:<{width}}  {c.status:<8} {c.result}")
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "FAILED", "refused", "not run")}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when present, else say so and exit 0; cpu: tiny sizes")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="no stage run or check starts after this many seconds (default "
                             f"{CUDA_BUDGET_S:.0f} on CUDA, so the last one started ends within "
                             f"5 minutes; {CPU_BUDGET_S:.0f} in CPU mode)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "gpu_check")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result (default <work>/gpu_check.json)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # before torch is imported: the trainer and
        # codecs pick CUDA whenever they see it
    began = time.perf_counter()
    import torch
    device = args.device
    if device == "auto":
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
                  "nothing was run. Run it on a GPU node (srun --gpus=1 make gpu-check), or "
                  "`python -m bench.gpu_check --device cpu` for the CPU mode.")
            return 0
        device = "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s or (CUDA_BUDGET_S if device == "cuda" else CPU_BUDGET_S))
    # cuBLAS reads its workspace setting when it starts; a deterministic stage needs it set
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    header = machine(device)
    checks = run_checks(device, work, budget, GPU_SIZES if device == "cuda" else CPU_SIZES)
    seconds = time.perf_counter() - began
    text = render(checks, header, seconds)
    out = args.out or work / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": header, "seconds": seconds,
                               "budget_s": budget.seconds,
                               "checks": [asdict(c) for c in checks]}, indent=1, default=str))
    print(text)
    print(f"\n[gpu-check] wrote {out}", file=sys.stderr)
    return 1 if any(c.status == "FAILED" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
