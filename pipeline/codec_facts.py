"""The codec facts a checkpoint records, and the one rule for whether it fits a run's latents.

A checkpoint stores `describe(manifest)` of the encode manifest it trained on. Before its
weights are used on a run's latents (generate, evaluate, the audit, a stage continuing
another), `problems(manifest, recorded)` compares the facts that change what the latents
mean or their shape:

- codec, kind (continuous latents or RVQ codes), weights_sha256 (which encoder weights;
  also tells pretrained from not): another codec's latents are another language;
- sample_rate, frame_rate, latent_dim, frames: another shape or time scale;
- bandwidth, for kind "codes" only: it picks the codebooks summed into each latent.

Recorded but not compared: dtype (how shards are stored; models read float32),
pretrained (weights_sha256 decides), use_codes (kind says it). A key missing on either
side is not compared, so checkpoints from before a key was recorded still load.
"""
from __future__ import annotations

WEIGHTS_FILE = "encodec_24khz-d7cc33bc.th"   # the EnCodec 24 kHz weights encode.weights_dir must hold

RECORDED_KEYS = ("codec", "sample_rate", "frame_rate", "latent_dim", "frames", "dtype", "kind",
                 "pretrained", "weights_sha256", "bandwidth", "use_codes")
COMPARED_KEYS = ("codec", "sample_rate", "frame_rate", "latent_dim", "frames", "kind",
                 "weights_sha256", "bandwidth")


class MismatchError(ValueError):
    """A checkpoint that does not fit this run's encoded data."""


def describe(manifest: dict, codec_name: str = "") -> dict:
    """The codec facts of an encode manifest, as a checkpoint records them."""
    desc = {k: manifest[k] for k in RECORDED_KEYS if k in manifest}
    if codec_name:
        desc.setdefault("codec", codec_name)
    return desc


def problems(manifest: dict, recorded: dict) -> list[str]:
    """Why latents described by `manifest` do not fit a checkpoint that recorded `recorded`
    ("key: checkpoint X vs run Y" each); empty when they fit."""
    keys = [k for k in COMPARED_KEYS if k != "bandwidth" or manifest.get("kind") == "codes"]
    return [f"{key}: checkpoint {recorded[key]!r} vs run {manifest[key]!r}" for key in keys
            if key in recorded and key in manifest and recorded[key] != manifest[key]]


def check(manifest: dict, recorded: object, what: str) -> None:
    """Raise MismatchError naming `what` (a checkpoint) when it does not fit the manifest."""
    if not isinstance(recorded, dict):
        raise MismatchError(f"{what}: checkpoint records no codec description, so it cannot "
                            "be matched to this run's encoded data")
    found = problems(manifest, recorded)
    if found:
        raise MismatchError(f"refusing {what}: it was trained on other latents than this run's "
                            f"encode/manifest.json ({'; '.join(found)})")
