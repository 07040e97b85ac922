"""The evaluation's headline figures as a short text table: the generator beside real music
and its trivial twins, each stage-3 target PASS or MISS, and a one-line verdict. Printed by
`make evaluate` and at the end of `make demo` / `make pipeline`."""
from __future__ import annotations

import math
from typing import Optional

from jobs.learning_targets import judge_stage1
from jobs.twins import TWINS

ROWS = (("two_sample_accuracy", "two-sample accuracy"), ("periodicity", "bar-scale periodicity"),
        ("rms_db_diff", "loudness vs real (dB)"), ("precision", "window precision"),
        ("recall", "window recall"))
COLUMNS = ("generated", *TWINS, "real")


def _cell(stat: Optional[dict]) -> str:
    if not stat:
        return "-"
    text = f"{stat['mean']:.3g}"
    return text + (f" ±{stat['std']:.2g}" if stat.get("picks", 1) > 1 else "")


def render(result: dict) -> str:
    """The table and verdict of an evaluate/metrics.json record (jobs.evaluate.run)."""
    table, judged = result.get("table") or {}, result.get("targets") or {}
    met = {name: {t["key"]: t["met"] for t in rows} for name, rows in judged.items()}
    width = max(len(label) for _, label in ROWS)
    head = f"{'figure':<{width}}  " + "  ".join(f"{c:>14}" for c in COLUMNS) + "  target"
    lines = [head, "-" * len(head)]
    rules = {t["key"]: t["rule"] for t in judged.get("generated", [])}
    for key, label in ROWS:
        cells = []
        for name in COLUMNS:
            cell = _cell(table.get(name, {}).get(key))
            if key in met.get(name, {}):
                cell += " ✓" if met[name][key] else " ✗"
            cells.append(f"{cell:>14}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells) + f"  {rules.get(key, '')}")
    picks = len(result.get("picks") or []) or 1
    lines.append(f"({result.get('n_generated')} clips per set, {result.get('n_real')} held-out "
                 f"real clips, mean ±std over {picks} pick(s); ✓/✗ = target met/missed)")
    lines.append(f"verdict: {result.get('verdict', 'n/a')}")
    return "\n".join(lines)


def stage1_lines(best_val: Optional[float], baselines: dict[str, float],
                 probe: dict) -> list[str]:
    """Stage 1 against its best trivial baseline and with its input order permuted."""
    if best_val is None or not baselines:
        return []
    name = min(baselines, key=baselines.get)
    gain = probe.get("order_gain")
    lines = [f"stage 1: best val loss {best_val:.4g}, best trivial baseline {name} "
             f"{baselines[name]:.4g}"]
    for row in judge_stage1(best_val, baselines, gain if isinstance(gain, float) else None):
        value = row["value"]
        shown = f"{value:+.1%}" if isinstance(value, float) and math.isfinite(value) else "n/a"
        lines.append(f"  {row['label']}: {shown} (target {row['rule']}) "
                     f"{'✓' if row['met'] else '✗'}")
    if probe.get("retrieval_accuracy") is not None:
        lines.append(f"  within-song retrieval: {probe['retrieval_accuracy']:.2f} top-1 "
                     f"(chance {probe.get('retrieval_chance', float('nan')):.2f})")
    return lines
