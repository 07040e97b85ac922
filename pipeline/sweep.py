"""`python -m pipeline.sweep --grid configs/grids/<name>.yaml`: one run per point of a grid.

A grid file names a base experiment and target, overrides shared by every point, and the
settings to vary: `product` (every combination) and `zip` (lists of one length, varied
together). Each point is a run named from its overrides (`<grid>-lr=0.001-beta=0.1`),
tagged with the sweep in its config and in MLflow. Every point's config is checked before
anything is queued. On SLURM all points are queued at once; their shared upstream steps
(same signature) are built once, through the store. Locally they run one after another,
and the later points skip what the first one built. The sweep's record is
`<run.root>/sweeps/<name>.json`; `python -m pipeline.status --sweep <name>` shows it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline import config as config_mod
from pipeline import dag, run_folder
from pipeline.atomic import atomic_write_json
from pipeline.config import ConfigError
from pipeline.backends import resolve_cluster

GRID_DIR = Path(__file__).resolve().parent.parent / "configs" / "grids"
GRID_KEYS = {"name", "experiment", "target", "overrides", "product", "zip"}


@dataclass
class Grid:
    name: str
    experiment: str
    target: str
    overrides: list[str] = field(default_factory=list)
    product: dict[str, list] = field(default_factory=dict)
    zip: dict[str, list] = field(default_factory=dict)


@dataclass
class Point:
    label: str                 # "stage3.lr=0.001 stage3.epochs=4"
    run: str                   # run name
    overrides: list[str]


def grid_path(grid: str) -> Path:
    path = Path(grid)
    return path if path.suffix in (".yaml", ".yml") else GRID_DIR / f"{grid}.yaml"


def load_grid(grid: str) -> Grid:
    """Read and check a grid file; errors name the file and the key."""
    path = grid_path(grid)
    data = config_mod.read_yaml(path)
    unknown = set(data) - GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; a grid has {sorted(GRID_KEYS)}")
    for key in ("product", "zip"):
        for name, values in (data.get(key) or {}).items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: {key}.{name} must be a non-empty list")
    lengths = {len(v) for v in (data.get("zip") or {}).values()}
    if len(lengths) > 1:
        raise ConfigError(f"{path}: the zip lists must have one length, got {sorted(lengths)}")
    if data.get("target", "all") not in dag.TARGETS:
        raise ConfigError(f"{path}: target must be one of {', '.join(dag.TARGETS)}")
    return Grid(name=str(data.get("name") or path.stem), experiment=str(data.get("experiment", "demo")),
                target=str(data.get("target", "all")), overrides=list(data.get("overrides") or []),
                product=dict(data.get("product") or {}), zip=dict(data.get("zip") or {}))


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def _slug(settings: dict[str, Any]) -> str:
    """Short, folder-safe name of a point: the last part of each key, unless two clash."""
    last = [key.split(".")[-1] for key in settings]
    parts = []
    for key, short in zip(settings, last):
        name = short if last.count(short) == 1 else key
        parts.append(f"{name}={_text(settings[key])}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def points(grid: Grid) -> list[Point]:
    """Every point of the grid: the product of `product` with the rows of `zip`."""
    axes = [[{key: value} for value in values] for key, values in grid.product.items()]
    if grid.zip:
        rows = zip(*grid.zip.values())
        axes.append([dict(zip(grid.zip, row)) for row in rows])
    out = []
    for combo in itertools.product(*axes) if axes else [()]:
        settings: dict[str, Any] = {}
        for part in combo:
            settings.update(part)
        overrides = [f"{key}={_text(value)}" for key, value in settings.items()]
        label = " ".join(overrides) or "base"
        out.append(Point(label, f"{grid.name}-{_slug(settings) or 'base'}", overrides))
    return out


def point_args(grid: Grid, point: Point, cluster: str, extra: list[str]) -> list[str]:
    """pipeline.run's command line for one point."""
    return [grid.target, "--experiment", grid.experiment, "--cluster", cluster,
            "--run", point.run, *grid.overrides, *extra, *point.overrides,
            f"run.sweep={grid.name}", f"run.sweep_point={point.label}"]


def check(grid: Grid, found: list[Point], cluster: str, extra: list[str]) -> str:
    """Load every point's config (a bad key stops the sweep before anything is queued);
    the run root."""
    root = ""
    for point in found:
        try:
            cfg = config_mod.load(grid.experiment, cluster, [
                *grid.overrides, *extra, *point.overrides, f"run.name={point.run}"])
        except ConfigError as exc:
            raise ConfigError(f"sweep point '{point.label}': {exc}") from None
        root = cfg.run.root
    return root


def record_path(root: str | Path, name: str) -> Path:
    return run_folder.sweep_record(root, name)


def run_sweep(grid: Grid, cluster: str, extra: list[str]) -> int:
    """Submit (or run) every point; 0 when every point's submission succeeded."""
    from pipeline import run as run_mod
    found = points(grid)
    root = Path(check(grid, found, cluster, extra)).resolve()
    record = {"name": grid.name, "experiment": grid.experiment, "target": grid.target,
              "cluster": cluster, "overrides": grid.overrides + extra,
              "points": [{"point": p.label, "run": p.run, "overrides": p.overrides} for p in found]}
    atomic_write_json(record_path(root, grid.name), record)
    worst = 0
    for i, point in enumerate(found, 1):
        print(f"[sweep] point {i}/{len(found)}: {point.label} -> run {point.run}",
              file=sys.stderr, flush=True)
        code = run_mod.main(point_args(grid, point, cluster, extra))
        record["points"][i - 1]["exit_code"] = code
        atomic_write_json(record_path(root, grid.name), record)
        worst = max(worst, code)
    print(f"[sweep] {grid.name}: {len(found)} point(s); look at them with: "
          f"python -m pipeline.status --sweep {grid.name}", file=sys.stderr)
    return worst


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="configs/grids/<name>.yaml or a path")
    parser.add_argument("--cluster", choices=["local", "slurm"], default=None)
    parser.add_argument("--list", action="store_true", help="print the points and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value for every point")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        cluster = resolve_cluster(args.cluster)
        if args.list:
            for point in points(grid):
                print(f"{point.run}\t{point.label}")
            return 0
        return run_sweep(grid, cluster, list(args.overrides))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
