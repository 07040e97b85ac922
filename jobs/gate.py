"""The validation gate at the end of a stage: may the next stage start from this one?

Passes when every validation loss is finite (if required) and the best validation loss
(the one saved as best.pt, which the next stage loads) is at least `min_improvement`
(a fraction) below epoch 1's, or below `max_val_loss` when that is set. With
`beat_baselines` it must also be below every trivial baseline given (stage 1: repeat the
start chunk, the mean latent), so a pass means the model learned something.
"""
from __future__ import annotations

import math

from pipeline.schema import GateConfig


def evaluate_gate(gate: GateConfig, val_losses: list[float],
                  baselines: dict[str, float] | None = None) -> dict:
    """Decide the gate from the per-epoch validation losses (epoch 1 first) and, when
    `gate.beat_baselines`, the trivial baselines' losses on the same pairs."""
    numbers = {"epochs": len(val_losses), "first": val_losses[0] if val_losses else None,
               "last": val_losses[-1] if val_losses else None,
               "min_improvement": gate.min_improvement, "max_val_loss": gate.max_val_loss}
    if not val_losses:
        return {"passed": False, "reason": "no validation loss was recorded", **numbers}
    if gate.require_finite and not all(math.isfinite(v) for v in val_losses):
        bad = [i + 1 for i, v in enumerate(val_losses) if not math.isfinite(v)]
        return {"passed": False, "reason": f"non-finite validation loss at epochs {bad}",
                **numbers}
    finite = [v for v in val_losses if math.isfinite(v)]
    best = min(finite) if finite else math.inf
    first = val_losses[0]
    improvement = (first - best) / abs(first) if math.isfinite(first) and first != 0 else 0.0
    numbers.update(best=best, improvement=improvement)
    if gate.beat_baselines and baselines:
        numbers["baselines"] = dict(baselines)
        beaten = {k: v for k, v in baselines.items() if best >= v}
        if beaten:
            lost = ", ".join(f"{k} {v:.5g}" for k, v in beaten.items())
            return {"passed": False, "reason": f"best val loss {best:.5g} is not below the "
                    f"trivial baseline(s) {lost}", **numbers}
    if gate.max_val_loss is not None and best <= gate.max_val_loss:
        return {"passed": True, "reason": f"best val loss {best:.5g} <= max_val_loss "
                f"{gate.max_val_loss:.5g}", **numbers}
    if improvement >= gate.min_improvement:
        return {"passed": True, "reason": f"best val loss {best:.5g} improved {improvement:.1%} "
                f"over epoch 1's {first:.5g} (needed {gate.min_improvement:.1%})", **numbers}
    reason = (f"best val loss {best:.5g} improved only {improvement:.1%} over epoch 1's "
              f"{first:.5g}; needed {gate.min_improvement:.1%}")
    if gate.max_val_loss is not None:
        reason += f" or a val loss <= {gate.max_val_loss:.5g}"
    return {"passed": False, "reason": reason, **numbers}
