"""Choose the codec named in `encode.codec` and the device it runs on.

Every codec turns [B, C, S] audio at the data sample rate into [B, 128, T] frames at
75 frames/s (`encode`), back into [B, 1, T * sample_rate / 75] audio (`decode`), and `describe()`s
itself for the encode manifest.
"""
from __future__ import annotations

from typing import Optional, Protocol, Union

import torch

from pipeline.schema import EncodeConfig


class Codec(Protocol):
    name: str
    sample_rate: int
    frame_rate: int
    latent_dim: int
    device: torch.device

    def frames(self, samples: int) -> int: ...
    def encode(self, wave: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
    def describe(self) -> dict: ...


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """'auto' -> cuda when present, else cpu; 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("encode.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def load_codec(enc: EncodeConfig, sample_rate: int, device: Union[str, torch.device] = "auto",
               seed: int = 0, griffin_lim_iters: Optional[int] = None) -> Codec:
    """Build the configured codec; `seed` fixes EnCodec's random weights when not pretrained,
    `griffin_lim_iters` overrides encode.mel.griffin_lim_iters (e.g. generate's value)."""
    dev = resolve_device(device)
    if enc.codec == "mel":
        from data_prep.codec_mel import MelCodec
        return MelCodec(enc.mel, sample_rate, dev, griffin_lim_iters)
    if enc.codec == "encodec":
        from data_prep.codec_encodec import EncodecCodec
        return EncodecCodec(enc, sample_rate, dev, seed)
    raise ValueError(f"encode.codec = {enc.codec!r} is not one of 'encodec', 'mel'")
