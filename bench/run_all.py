"""Run every benchmark, print the table and write docs/benchmarks.md (`make bench`).

    python -m bench.run_all                      # full sizes (bench/sizes.yaml: full)
    python -m bench.run_all --sizes quick --out /tmp/b.md --work /tmp/bench   # smoke run

A benchmark that crashes does not stop the others: its rows say "not measured" with the
error, and the exit code is 1. Inputs and run folders live under --work (default
bench/out/<sizes>), which is gitignored; generated inputs are reused between runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

import yaml

from bench.child import REPO, run_child
from bench.report import Row, machine_info, render
from pipeline.atomic import atomic_write_text

# module -> (row keys, what the rows measure); the order of the table
BENCHMARKS = {
    "chunk_throughput": (("1a", "1b"), "chunking throughput"),
    "chunk_memory": (("2a", "2b"), "chunking memory"),
    "encode_throughput": (("3a", "3b"), "encoding throughput"),
    "train_datapath": (("4a", "4b"), "training data path"),
    "orchestration": (("5a", "5b", "5c"), "orchestration"),
    "train_overhead": (("7a", "7b"), "trainer overhead"),
}
SIZES_FILE = Path(__file__).resolve().parent / "sizes.yaml"


def load_sizes(name: str) -> dict:
    profiles = yaml.safe_load(SIZES_FILE.read_text())
    if name not in profiles:
        raise SystemExit(f"error: no sizes profile '{name}' in {SIZES_FILE} "
                         f"(have: {', '.join(profiles)})")
    return profiles[name]


def run_benchmark(name: str, sizes: dict, work: Path) -> tuple[list[Row], bool]:
    """The benchmark's rows, or 'not measured' rows carrying the error; and whether it ran."""
    keys, title = BENCHMARKS[name]
    began = time.perf_counter()
    print(f"[bench] {title} ...", file=sys.stderr, flush=True)
    try:
        rows = importlib.import_module(f"bench.{name}").run(sizes, work)
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        traceback.print_exc(file=sys.stderr)
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return [Row(k, f"{title} (failed)", "not measured", "", None, "", None,
                    f"the benchmark failed: {reason[:300]}") for k in keys], False
    print(f"[bench] {title}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return rows, True


def scaling_section(rows: list[Row], work: Path) -> str:
    from bench.scaling import section
    measured: dict = {}
    for row in rows:
        measured.update(row.raw)
    shown = {"wait": f"{measured['wait']:.2%}" if "wait" in measured else "n/a",
             "load_us": f"{measured['load_us']:.0f} µs" if "load_us" in measured else "n/a",
             "encodec_x": f"{measured['encodec_step_x']:.1f}x real time"
             if "encodec_step_x" in measured else "n/a",
             "decode_x": f"{measured['decode_x']:.0f}x real time" if "decode_x" in measured else "n/a"}
    try:
        flops = run_child("bench.scaling:count_flops", {}, work / "logs" / "scaling.log").result
    except Exception as exc:
        return f"## 6. Expected per-GPU throughput on 4-GPU nodes\n\nNot computed: {exc}\n"
    return section(flops, shown)


def summary_section(rows: list[Row]) -> str:
    met = [r for r in rows if r.met]
    missed = [r for r in rows if r.met is False]
    absent = [r for r in rows if r.met is None]
    lines = ["## Summary", "",
             f"{len(met)} of {len(rows)} targets met, {len(missed)} missed, "
             f"{len(absent)} not measured."]
    lines += [f"- missed **{r.key}** ({r.what}): {r.result} against target {r.target} "
              f"(ratio {r.ratio:.3g})." for r in missed]
    lines += [f"- not measured **{r.key}**: {r.note}" for r in absent]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="full", help="profile in bench/sizes.yaml (full, quick)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--work", type=Path, default=None, help="default: bench/out/<sizes>")
    p.add_argument("--only", default="", help="comma-separated benchmarks: " + ",".join(BENCHMARKS))
    args = p.parse_args(argv)
    sizes = load_sizes(args.sizes)
    work = (args.work or REPO / "bench" / "out" / args.sizes).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"error: unknown benchmark(s) {unknown}; have {list(BENCHMARKS)}")
    machine = machine_info()
    began = time.perf_counter()
    rows: list[Row] = []
    all_ran = True
    for name in names:
        got, ran = run_benchmark(name, sizes, work)
        rows += got
        all_ran &= ran
    sections = [summary_section(rows), scaling_section(rows, work)]
    command = "make bench" if args.sizes == "full" and not args.only else \
        "python -m bench.run_all " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(rows, machine, command, time.perf_counter() - began, sections,
                  " ".join(f"{x:.2f}" for x in os.getloadavg()))
    atomic_write_text(args.out, text)
    print(text)
    print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0 if all_ran else 1


if __name__ == "__main__":
    sys.exit(main())
