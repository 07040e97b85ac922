"""Weight transfer between stages: copy every tensor whose name and shape match.

Stage 2 adds a VAE around the stage-1 network and stage 3 adds a discriminator, so most
names carry over; the report says what was loaded, what is new, and what was skipped
because its shape changed (for example a different d_model).
"""
from __future__ import annotations

import torch


def transfer_weights(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> dict:
    """Load the matching tensors of `source` into `model`; return the transfer report."""
    own = model.state_dict()
    merged = dict(own)
    loaded, new, skipped = [], [], []
    for name, tensor in own.items():
        if name not in source:
            new.append(name)
        elif tuple(source[name].shape) != tuple(tensor.shape):
            skipped.append({"name": name, "source_shape": list(source[name].shape),
                            "model_shape": list(tensor.shape)})
        else:
            merged[name] = source[name].to(dtype=tensor.dtype)
            loaded.append(name)
    model.load_state_dict(merged)
    unused = sorted(set(source) - set(own))
    return {"loaded": loaded, "new": new, "skipped_for_shape": skipped, "unused": unused,
            "counts": {"loaded": len(loaded), "new": len(new),
                       "skipped_for_shape": len(skipped), "unused": len(unused)}}
