"""The baselines, written the way the original scripts did it, and the decode-only limit.

- `librosa_chunk_folder`: a sequential loop, `librosa.load(path, sr=..., mono=False)` of
  the whole file, then slicing into fixed chunks saved one .npy each.
- `decode_only`: what decoding alone costs on one core (soundfile read + soxr resample,
  no chunking, no writing): the ceiling a chunker can approach.
- `EncodecInGetitem`: a training dataset that runs the EnCodec encoder on both chunks of
  a pair in `__getitem__`, every epoch, as PowerMuse did.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def to_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """[c, n] -> [channels, n]: average to mono or duplicate mono to stereo."""
    audio = np.atleast_2d(audio)
    if audio.shape[0] == channels:
        return audio
    if channels == 1:
        return audio.mean(axis=0, keepdims=True)
    return np.repeat(audio[:1], channels, axis=0)


def librosa_chunk_folder(files: list[Path], out_dir: Path, sample_rate: int, channels: int,
                         chunk_seconds: float) -> dict:
    """Load each file whole with librosa, slice it into chunks, save each chunk as .npy."""
    import librosa

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(round(chunk_seconds * sample_rate))
    audio_s, chunks = 0.0, 0
    for i, path in enumerate(files):
        y, _ = librosa.load(str(path), sr=sample_rate, mono=False)
        y = to_channels(y, channels)
        audio_s += y.shape[1] / sample_rate
        for k in range(y.shape[1] // size):
            np.save(out_dir / f"{i:05d}_{k:04d}.npy", y[:, k * size:(k + 1) * size])
            chunks += 1
    return {"audio_s": audio_s, "chunks": chunks}


def decode_only(files: list[Path], sample_rate: int, channels: int) -> dict:
    """Decode and resample every file on one core, keeping nothing: the decode limit."""
    import soundfile as sf
    import soxr

    audio_s = 0.0
    for path in files:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        data = to_channels(data.T, channels).T
        if rate != sample_rate:
            data = soxr.resample(np.ascontiguousarray(data), rate, sample_rate, quality="HQ")
        audio_s += len(data) / sample_rate
    return {"audio_s": audio_s}


class EncodecInGetitem:
    """(input, target) latents of each pair, encoded from the chunk audio on every access.

    A map-style dataset for torch's DataLoader (it needs only __len__ and __getitem__);
    torch is imported lazily so that the audio baselines above do not load it."""

    def __init__(self, pairs: list[dict], arrays: dict[str, np.ndarray], codec):
        self.pairs = pairs
        self.arrays = arrays
        self.codec = codec

    def __len__(self) -> int:
        return len(self.pairs)

    def _encode(self, song: str, chunk: int):
        import torch
        audio = np.asarray(self.arrays[song][chunk], dtype=np.float32)
        # clone: the codec encodes in inference mode, and training needs a normal tensor
        return self.codec.encode(torch.from_numpy(audio)[None])[0].float().clone()

    def __getitem__(self, index: int) -> tuple:
        pair = self.pairs[index]
        return (self._encode(pair["song"], int(pair["input"])),
                self._encode(pair["target_song"], int(pair["target"])))
