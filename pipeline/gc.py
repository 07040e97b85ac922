"""`python -m pipeline.gc [--root runs] [--delete]`: the store versions no run links to.

Lists each unreferenced version with its size (and what it was made for); deletes them
only with --delete. A version some run links to, or that a queued or running job is
building, is never touched.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

from pipeline import config as config_mod
from pipeline import run_folder
from pipeline import store as store_mod
from pipeline.state import read_marker


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def unreferenced(root: Path, store: Path) -> list[Path]:
    """Versions in `store` that no run under `root` links to and no live job claims."""
    used = set(store_mod.refs(root))
    return [v for v in store_mod.all_versions(store) if v.resolve() not in used
            and not claimed_by_live_job(v)]


def claimed_by_live_job(version: Path) -> bool:
    """True when the job named in the version's claim is still queued or running."""
    claim = store_mod.read_claim(version)
    if not claim or claim.get("cluster") != "slurm" or not shutil.which("squeue"):
        return False
    import subprocess
    out = subprocess.run(["squeue", "-h", "-j", str(claim["job_id"]), "-o", "%T"],
                         capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def describe(version: Path) -> str:
    marks = [m for m in map(read_marker, sorted(version.glob(run_folder.MARKER_GLOB))) if m]
    if not marks:
        marks = [m for m in (store_mod.read_claim(version),) if m]
    state = marks[0].get("state", "?") if marks else "no marker"
    return f"{version.parent.name}/{version.name}  {state}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="run root (default: run.root of configs/)")
    parser.add_argument("--store", default=None, help="store folder (default: run.store)")
    parser.add_argument("--delete", action="store_true", help="delete what is listed")
    args = parser.parse_args(argv)
    cfg = config_mod.load(None, "local")
    if args.root:
        cfg.run.root = args.root
    if args.store:
        cfg.run.store = args.store
    root, store = Path(cfg.run.root), store_mod.store_root(cfg)
    found = unreferenced(root, store)
    sizes = {v: store_mod.size_bytes(v) for v in found}
    for version in found:
        print(f"{human(sizes[version]):>10}  {describe(version)}")
    total = human(sum(sizes.values()))
    if not found:
        print(f"every version in {store} is used by a run under {root}")
        return 0
    if not args.delete:
        print(f"{len(found)} version(s), {total}, used by no run under {root}; "
              "delete them with: make gc DELETE=1 (python -m pipeline.gc --delete)")
        return 0
    for version in found:
        shutil.rmtree(version)
    print(f"deleted {len(found)} version(s), {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
