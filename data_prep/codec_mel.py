"""Mel codec: 128 log-mel bins at exactly 75 frames/s, inverted by Griffin-Lim.

It gives the same [B, 128, T] layout as EnCodec's latents, so the whole pipeline runs
where EnCodec weights are absent. The hop is sample_rate / 75 (320 at 24 kHz, 160 at
12 kHz); a chunk of S samples gives T = S // hop frames and T frames decode to T * hop
samples, so encode and decode lengths agree.
"""
from __future__ import annotations

import math

import torch
import torchaudio

from pipeline.schema import MelConfig

FRAME_RATE = 75   # EnCodec 24 kHz frame rate; the mel codec matches it
N_MELS = 128      # EnCodec latent width; the mel codec matches it


class MelCodec:
    """Log-mel analysis and Griffin-Lim synthesis at the data sample rate."""

    name = "mel"
    frame_rate = FRAME_RATE
    latent_dim = N_MELS

    def __init__(self, mel: MelConfig, sample_rate: int, device: torch.device,
                 griffin_lim_iters: int | None = None):
        if sample_rate % FRAME_RATE:
            raise ValueError(f"mel codec: data.sample_rate={sample_rate} is not a multiple of "
                             f"{FRAME_RATE}, so no integer hop gives {FRAME_RATE} frames/s")
        if mel.window_hops < 1 or mel.log_floor <= 0 or mel.griffin_lim_iters < 1:
            raise ValueError(f"encode.mel: window_hops and griffin_lim_iters must be >= 1 and "
                             f"log_floor > 0, got {mel}")
        self.sample_rate = sample_rate
        self.device = torch.device(device)
        self.hop = sample_rate // FRAME_RATE
        self.n_fft = self.hop * mel.window_hops
        self.log_floor = mel.log_floor
        self.gl_iters = griffin_lim_iters or mel.griffin_lim_iters
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=self.n_fft, hop_length=self.hop, n_mels=N_MELS,
            power=2.0, center=True, norm="slaney", mel_scale="slaney").to(self.device)
        self._inverse = torchaudio.transforms.InverseMelScale(
            n_stft=self.n_fft // 2 + 1, n_mels=N_MELS, sample_rate=sample_rate,
            norm="slaney", mel_scale="slaney").to(self.device)
        self._window = torch.hann_window(self.n_fft, device=self.device)

    def frames(self, samples: int) -> int:
        """Frames produced for a chunk of `samples` samples at the data rate."""
        return samples // self.hop

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, C, S] waveform -> [B, 128, S // hop] natural-log mel power (mono downmix)."""
        mono = wave.to(self.device, torch.float32).mean(dim=1)
        frames = self.frames(mono.shape[-1])
        mel = self._mel(mono)[..., :frames]   # centred STFT gives one extra frame
        return torch.log(mel.clamp_min(self.log_floor))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 128, T] log-mel -> [B, 1, T * hop] audio at the data rate (Griffin-Lim).

        Values below log(log_floor) are read as the floor: encode never produces them, and
        a generator's deeper "silence" would otherwise decode to a quieter noise floor than
        any real recording has."""
        floor = math.log(self.log_floor)
        mel = torch.exp(latents.to(self.device, torch.float32).clamp_min(floor))
        power = self._inverse(mel)
        # a centred STFT of T * hop samples has T + 1 frames: repeat the last one
        power = torch.cat([power, power[..., -1:]], dim=-1)
        length = latents.shape[-1] * self.hop
        wave = torchaudio.functional.griffinlim(
            power, self._window, self.n_fft, self.hop, self.n_fft, power=2.0,
            n_iter=self.gl_iters, momentum=0.99, length=length, rand_init=False)
        return wave.unsqueeze(1)

    def describe(self) -> dict:
        """What the encode manifest records about this codec."""
        return {"codec": self.name, "sample_rate": self.sample_rate,
                "frame_rate": self.frame_rate, "latent_dim": self.latent_dim,
                "kind": "latents", "pretrained": None, "weights_sha256": None,
                "bandwidth": None, "hop": self.hop, "n_fft": self.n_fft,
                "log_floor": self.log_floor, "griffin_lim_iters": self.gl_iters}
