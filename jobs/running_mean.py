"""Sums of per-step (or per-sample) numbers over an epoch, averaged over every rank."""
from __future__ import annotations

from typing import Optional

from jobs import distributed


class Running:
    """Weighted sums and counts per key; `state()` goes into a mid-epoch checkpoint."""

    def __init__(self, state: Optional[dict] = None):
        state = state or {}
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.counts: dict[str, float] = dict(state.get("counts", {}))

    def add(self, values: dict[str, float], weight: float = 1.0) -> None:
        """Add one step's (or one batch's) values with a weight."""
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
            self.counts[key] = self.counts.get(key, 0.0) + weight

    def state(self) -> dict:
        """Plain-container copy of the sums, for a checkpoint."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def means(self, info: distributed.DistInfo) -> dict[str, float]:
        """The weighted mean of every key over all ranks (collective: all ranks call)."""
        total_s: dict[str, float] = {}
        total_c: dict[str, float] = {}
        for part in distributed.gather(self.state(), info):
            for key, value in part["sums"].items():
                total_s[key] = total_s.get(key, 0.0) + value
                total_c[key] = total_c.get(key, 0.0) + part["counts"][key]
        return {k: total_s[k] / total_c[k] for k in sorted(total_s) if total_c[k] > 0}
