"""The validation gate at the end of a stage: may the next stage start from this one?

A function of the stage's per-epoch metrics (the lines of metrics.jsonl) and, for stage 1,
the trivial baselines. Each rule that the stage's `gate` section switches on must pass:

- finite: every validation loss is finite (`require_finite`);
- progress: the best val loss is `min_improvement` below epoch 1's, or at most
  `max_val_loss` (off at 0 / null: a fast learner makes little progress after epoch 1);
- margin (stage 1, `beat_baselines`): 1 - best / min(baselines) >= `min_margin`, against
  the BEST trivial baseline (repeat the start chunk, the mean latent, the start chunk's
  time-averaged spectrum, the input's best period tiled on, its last bar repeated);
- order (stage 1, `min_order_gain`): the best weights fed each val input with its frames
  permuted in time score at least `min_order_gain` worse than with the real order
  (order_probe.json's order_gain = permuted / ordered - 1): the model uses temporal order;
- posterior collapse (`kl_floor_tolerance`): every VAE level's raw validation KL
  (val_kl_level_<i>) at or below stage.kl.free_bits + tolerance;
- D collapse (`min_d_loss`): the train D loss below the floor (far below ln 2);
- mode collapse (`min_diversity_ratio`): val_diversity_ratio (generated from pure noise
  over real) below the floor; judged only while the curriculum feeds noise (alpha > 0).

A collapse rule fails when its condition holds in each of the last `last_epochs` epochs
after D pre-training; with fewer such epochs it is not judged (and gate.json says so).

`on_fail` says what a failed gate does: "stop" (the trainer exits 3 and the chain stops)
or "warn" (gate.json has passed false and warned true; the stage ends OK).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from pipeline.schema import GateConfig

LN2 = math.log(2.0)


def read_history(path: Path) -> list[dict]:
    """The per-epoch metric dicts of metrics.jsonl ([] when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
    return rows


def _check(rule: str, passed: bool, reason: str) -> dict:
    return {"rule": rule, "passed": passed, "reason": reason}


def _progress(gate: GateConfig, best: float, first: float, improvement: float) -> Optional[dict]:
    """min_improvement over epoch 1, or max_val_loss; None when both are off."""
    by_progress = gate.min_improvement > 0
    if not by_progress and gate.max_val_loss is None:
        return None
    if gate.max_val_loss is not None and best <= gate.max_val_loss:
        return _check("progress", True, f"best val loss {best:.5g} <= max_val_loss "
                      f"{gate.max_val_loss:.5g}")
    if by_progress and improvement >= gate.min_improvement:
        return _check("progress", True, f"best val loss {best:.5g} improved {improvement:.1%} "
                      f"over epoch 1's {first:.5g} (needed {gate.min_improvement:.1%})")
    if by_progress:
        reason = (f"best val loss {best:.5g} improved only {improvement:.1%} over epoch 1's "
                  f"{first:.5g}; needed {gate.min_improvement:.1%}")
        if gate.max_val_loss is not None:
            reason += f" or a val loss <= {gate.max_val_loss:.5g}"
    else:
        reason = f"best val loss {best:.5g} is above max_val_loss {gate.max_val_loss:.5g}"
    return _check("progress", False, reason)


def _margin(gate: GateConfig, best: float, baselines: Optional[dict[str, float]],
            numbers: dict) -> Optional[dict]:
    """Stage 1: the margin of the best val loss over the best (lowest) trivial baseline."""
    if not gate.beat_baselines:
        return None
    if not baselines:
        return _check("margin", True, "no trivial baselines to compare with (creative mode); "
                      "margin not judged")
    name, value = min(baselines.items(), key=lambda kv: kv[1])
    if value > 0:
        margin = 1.0 - best / value
    else:
        margin = 0.0 if best <= value else -math.inf
    numbers.update(baselines=dict(baselines), best_baseline=name, margin=margin,
                   min_margin=gate.min_margin)
    text = (f"best val loss {best:.5g} is {margin:.1%} below the best trivial baseline "
            f"{name} {value:.5g}")
    passed = margin >= gate.min_margin and best < value
    needed = f"needed {gate.min_margin:.1%}" if gate.min_margin > 0 else "needed below it"
    if passed:
        return _check("margin", True, f"{text} ({needed})")
    return _check("margin", False, f"{text}; {needed}" if margin >= 0 else
                  f"best val loss {best:.5g} is not below the best trivial baseline "
                  f"{name} {value:.5g} ({-margin:.1%} above it)")


def _order(gate: GateConfig, probe: Optional[dict], numbers: dict) -> Optional[dict]:
    """Stage 1: the val loss with each input's frames permuted over the val loss with the
    real order, minus 1, at least `min_order_gain` (order_probe.json)."""
    if gate.min_order_gain is None:
        return None
    if not probe:
        return _check("order", True, "no order probe (creative mode); order not judged")
    gain = float(probe.get("order_gain", math.nan))
    numbers.update(order_gain=gain, min_order_gain=gate.min_order_gain)
    change = (f"{abs(gain):.1%} {'worse' if gain >= 0 else 'better'}" if math.isfinite(gain)
              else "not comparable")
    text = (f"with its input frames permuted in time the val loss is {change} "
            f"({probe.get('val_loss_permuted', math.nan):.5g} vs "
            f"{probe.get('val_loss', math.nan):.5g} in order)")
    if gain >= gate.min_order_gain:   # NaN fails
        return _check("order", True, f"{text} (needed {gate.min_order_gain:.1%} worse)")
    return _check("order", False, f"{text}; needed at least {gate.min_order_gain:.1%} worse: "
                  "the model makes little use of the input's temporal order")


def _window(gate: GateConfig, history: list[dict], d_pretrain_epochs: int) -> list[dict]:
    """The last `last_epochs` epochs after D pre-training (all of them if fewer)."""
    judged = [h for i, h in enumerate(history) if h.get("epoch", i + 1) > d_pretrain_epochs]
    return judged[-gate.last_epochs:] if gate.last_epochs > 0 else []


def _short(rule: str, what: str, window: list[dict], gate: GateConfig) -> dict:
    return _check(rule, True, f"{what} not judged: {len(window)} epoch(s) to judge, "
                  f"gate.last_epochs is {gate.last_epochs}")


def _posterior(gate: GateConfig, window: list[dict], free_bits: Optional[float]) -> Optional[dict]:
    """Stage 2: every VAE level's raw val KL at its free-bits floor in every window epoch."""
    tol = gate.kl_floor_tolerance
    if tol is None:
        return None
    if free_bits is None:
        return _check("posterior_collapse", False, "gate.kl_floor_tolerance is set but the "
                      "stage has no kl section (kl.free_bits): is the VAE enabled?")
    if len(window) < max(1, gate.last_epochs):
        return _short("posterior_collapse", "posterior collapse", window, gate)
    levels = sorted((k for k in window[-1] if k.startswith("val_kl_level_")),
                    key=lambda k: int(k.rsplit("_", 1)[1]))
    if not levels or any(k not in h for h in window for k in levels):
        return _check("posterior_collapse", False, "gate.kl_floor_tolerance is set but the "
                      "metrics have no val_kl_level_<i> in the last epochs (no VAE?)")
    floor = free_bits + tol
    last = ", ".join(f"{window[-1][k]:.3g}" for k in levels)
    if all(h[k] <= floor for h in window for k in levels):
        return _check("posterior_collapse", False, f"posterior collapse: every VAE level's "
                      f"val KL is at or below the free-bits floor {free_bits:.3g} (+{tol:.3g}) "
                      f"in each of the last {len(window)} epochs (last epoch: {last} nats): "
                      "the latents carry nothing")
    return _check("posterior_collapse", True, f"no posterior collapse: val KL per level {last} "
                  f"nats (free-bits floor {free_bits:.3g})")


def _d_collapse(gate: GateConfig, window: list[dict]) -> Optional[dict]:
    """Stage 3: the train D loss far below ln 2 in every window epoch."""
    if gate.min_d_loss is None:
        return None
    if len(window) < max(1, gate.last_epochs):
        return _short("d_collapse", "D collapse", window, gate)
    if any("train_d_loss" not in h for h in window):
        return _check("d_collapse", False, "gate.min_d_loss is set but the metrics have no "
                      "train_d_loss in the last epochs (no discriminator?)")
    losses = [h["train_d_loss"] for h in window]
    shown = ", ".join(f"{v:.3g}" for v in losses)
    if all(v < gate.min_d_loss for v in losses):
        return _check("d_collapse", False, f"discriminator collapse: train D loss {shown} is "
                      f"below {gate.min_d_loss:.3g} (far below ln 2 = {LN2:.3f}) in each of the "
                      f"last {len(window)} epochs: D wins and G gets little useful gradient")
    return _check("d_collapse", True, f"no D collapse: train D loss {shown} in the last "
                  f"{len(window)} epochs (floor {gate.min_d_loss:.3g})")


def _mode_collapse(gate: GateConfig, window: list[dict]) -> Optional[dict]:
    """Stage 3: the noise generator's val diversity ratio below the floor in every window epoch."""
    floor = gate.min_diversity_ratio
    if floor is None:
        return None
    if len(window) < max(1, gate.last_epochs):
        return _short("mode_collapse", "mode collapse", window, gate)
    if any(h.get("alpha", 0.0) <= 0 for h in window):
        return _check("mode_collapse", True, "mode collapse not judged: curriculum alpha is 0 "
                      "in the last epochs (the generator is not trained from noise)")
    if any("val_diversity_ratio" not in h for h in window):
        return _check("mode_collapse", False, "gate.min_diversity_ratio is set but the metrics "
                      "have no val_diversity_ratio in the last epochs")
    ratios = [h["val_diversity_ratio"] for h in window]
    shown = ", ".join(f"{v:.3g}" for v in ratios)
    if all(not v >= floor for v in ratios):   # NaN counts as collapsed
        return _check("mode_collapse", False, f"mode collapse: val_diversity_ratio (generated "
                      f"from noise over real) {shown} is below {floor:.3g} in each of the last "
                      f"{len(window)} epochs")
    return _check("mode_collapse", True, f"no mode collapse: val_diversity_ratio {shown} "
                  f"(floor {floor:.3g})")


def evaluate_gate(gate: GateConfig, history: list[dict],
                  baselines: Optional[dict[str, float]] = None,
                  free_bits: Optional[float] = None, d_pretrain_epochs: int = 0,
                  order_probe: Optional[dict] = None) -> dict:
    """gate.json (passed, warned, on_fail, reason, checks, numbers) from the per-epoch
    metrics (epoch 1 first), the trivial baselines and order probe (stage 1), the stage's
    kl.free_bits and gan.d_pretrain_epochs."""
    result = _judge(gate, history, baselines, free_bits, d_pretrain_epochs, order_probe)
    result["on_fail"] = gate.on_fail
    result["warned"] = not result["passed"] and gate.on_fail == "warn"
    return result


def _judge(gate: GateConfig, history: list[dict], baselines: Optional[dict[str, float]],
           free_bits: Optional[float], d_pretrain_epochs: int,
           order_probe: Optional[dict]) -> dict:
    """Every rule switched on: passed, reason, checks and the numbers they read."""
    val = [float(h.get("val_loss", math.nan)) for h in history]
    numbers = {"epochs": len(val), "first": val[0] if val else None,
               "last": val[-1] if val else None, "min_improvement": gate.min_improvement,
               "max_val_loss": gate.max_val_loss}
    if not val:
        return {"passed": False, "reason": "no validation loss was recorded", "checks": [],
                **numbers}
    if gate.require_finite and not all(math.isfinite(v) for v in val):
        bad = [i + 1 for i, v in enumerate(val) if not math.isfinite(v)]
        reason = f"non-finite validation loss at epochs {bad}"
        return {"passed": False, "reason": reason,
                "checks": [_check("finite", False, reason)], **numbers}
    finite = [v for v in val if math.isfinite(v)]
    best = min(finite) if finite else math.inf
    first = val[0]
    improvement = (first - best) / abs(first) if math.isfinite(first) and first != 0 else 0.0
    numbers.update(best=best, improvement=improvement)
    window = _window(gate, history, d_pretrain_epochs)
    checks = [c for c in (_progress(gate, best, first, improvement),
                          _margin(gate, best, baselines, numbers),
                          _order(gate, order_probe, numbers),
                          _posterior(gate, window, free_bits),
                          _d_collapse(gate, window),
                          _mode_collapse(gate, window)) if c is not None]
    failed = [c["reason"] for c in checks if not c["passed"]]
    if failed:
        reason = "; ".join(failed)
    elif checks:
        reason = "; ".join(c["reason"] for c in checks)
    else:
        reason = f"best val loss {best:.5g}, every validation loss finite (no other rule on)"
    return {"passed": not failed, "reason": reason, "checks": checks, **numbers}
