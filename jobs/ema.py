"""Exponential moving average of a model's weights (generation reads it when present)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Ema:
    """Shadow copy of a model's state: shadow = decay * shadow + (1 - decay) * weights after
    each optimizer step. Integer buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float, state: Optional[dict] = None):
        self.decay = decay
        current = getattr(model, "module", model).state_dict()
        self.shadow = {k: v.detach().clone() for k, v in current.items()}
        if state is not None:
            for key, value in state.items():
                self.shadow[key].copy_(value)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward the model's current weights."""
        for key, value in getattr(model, "module", model).state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value.detach(), 1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights on the CPU, loadable into the model with load_state_dict."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}
