"""The learning targets: what a generator must reach, and its trivial twins miss, before
anyone may say it learned. One place, read by evaluate (the verdict it writes), the
demo's final report and `make learn`.

Stage 3 (figure table of jobs.figures, means over the picks):
- two-sample accuracy at least 0.10 below every twin's (a fresh classifier tells the
  generator from real music clearly less well than it tells its own input noise, white
  noise or shuffled real frames);
- bar-scale periodicity at least half of real music's;
- decoded loudness within 3 dB of real;
- window precision above every twin's, with recall at least 0.8 of the prior's.
A twin judged by these misses the relative ones by construction (it is one of the sets it
must beat); it can reach loudness only where it has real frames (the shuffled twin).
Stage 1: best val loss at least 5% below the best trivial baseline, and at least 3% worse
with the input's frames permuted (it uses the order of what it hears).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

Table = dict[str, dict[str, dict[str, float]]]
C2ST_GAP = 0.10
PERIODICITY_SHARE = 0.5
RMS_DB = 3.0
RECALL_SHARE = 0.8
STAGE1_MARGIN = 0.05
ORDER_GAIN = 0.03


def _mean(table: Table, name: str, key: str) -> Optional[float]:
    value = table.get(name, {}).get(key, {}).get("mean")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass(frozen=True)
class SetTarget:
    """A stage-3 target: a label, its rule in words, and a judge of one set in the table
    that returns (the figure shown, met)."""
    key: str
    label: str
    rule: str
    judge: Callable[[Table, str], tuple[Optional[float], bool]]


TWIN_SETS = ("prior", "white", "shuffled")


def _twins(table: Table, key: str) -> list[float]:
    return [v for v in (_mean(table, t, key) for t in TWIN_SETS) if v is not None]


def _c2st(table: Table, name: str) -> tuple[Optional[float], bool]:
    value, twins = _mean(table, name, "two_sample_accuracy"), _twins(table, "two_sample_accuracy")
    return value, value is not None and bool(twins) and value <= min(twins) - C2ST_GAP


def _periodicity(table: Table, name: str) -> tuple[Optional[float], bool]:
    value, real = _mean(table, name, "periodicity"), _mean(table, "real", "periodicity")
    return value, value is not None and real is not None and value >= PERIODICITY_SHARE * real


def _loudness(table: Table, name: str) -> tuple[Optional[float], bool]:
    value = _mean(table, name, "rms_db_diff")
    return value, value is not None and abs(value) <= RMS_DB


def _precision_recall(table: Table, name: str) -> tuple[Optional[float], bool]:
    p, r = _mean(table, name, "precision"), _mean(table, name, "recall")
    twins, pr = _twins(table, "precision"), _mean(table, "prior", "recall")
    if None in (p, r, pr) or not twins:
        return p, False
    return p, p > max(twins) and r >= RECALL_SHARE * pr


STAGE3: tuple[SetTarget, ...] = (
    SetTarget("two_sample_accuracy", "two-sample accuracy (0.5 = indistinguishable)",
              f"<= every twin's - {C2ST_GAP:g}", _c2st),
    SetTarget("periodicity", "bar-scale periodicity", f">= {PERIODICITY_SHARE:g} x real's",
              _periodicity),
    SetTarget("rms_db_diff", "loudness against real (dB)", f"within +-{RMS_DB:g}", _loudness),
    SetTarget("precision", "window precision (recall beside it)",
              f"> every twin's, recall >= {RECALL_SHARE:g} x prior's", _precision_recall),
)


def judge_stage3(table: Table, name: str = "generated") -> list[dict]:
    """[{key, label, rule, value, met}] of one set of the table against every target."""
    out = []
    for target in STAGE3:
        value, met = target.judge(table, name)
        out.append({"key": target.key, "label": target.label, "rule": target.rule,
                    "value": value, "met": bool(met)})
    return out


def verdict(table: Table) -> str:
    """One line: did the generator beat its twins on every stage-3 target?"""
    judged = judge_stage3(table)
    missed = [t["label"] for t in judged if not t["met"]]
    if not missed:
        return "the generator meets every stage-3 target its trivial twins miss"
    return (f"the generator misses {len(missed)} of {len(judged)} targets "
            f"({'; '.join(missed)}): not yet better than its trivial twins there")


def judge_stage1(best_val: Optional[float], baselines: dict[str, float],
                 order_gain: Optional[float]) -> list[dict]:
    """[{key, label, rule, value, met}]: the margin over the best baseline and the order gain."""
    margin = None
    if best_val is not None and baselines:
        best = min(baselines.values())
        margin = 1.0 - best_val / best if best > 0 else None
    return [{"key": "stage1_margin", "label": "stage-1 margin over the best trivial baseline",
             "rule": f">= {STAGE1_MARGIN:.0%}", "value": margin,
             "met": margin is not None and margin >= STAGE1_MARGIN},
            {"key": "stage1_order_gain", "label": "stage-1 loss increase with input order permuted",
             "rule": f">= {ORDER_GAIN:.0%}", "value": order_gain,
             "met": order_gain is not None and order_gain >= ORDER_GAIN}]
