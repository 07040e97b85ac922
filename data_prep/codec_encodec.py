"""EnCodec 24 kHz codec: continuous 128 x 75 Hz encoder latents (or RVQ-quantized ones).

Weights come only from a local folder (`encode.weights_dir`, file WEIGHTS_FILE); a missing
or wrong file is an error that names the path and `make fetch-weights`, never a download.
`pretrained: false` builds the real architecture with random weights seeded by run.seed
(so a resumed encode uses the same weights), and says so in the log and the manifest.

Codes (`use_codes: true`): the RVQ codes at `bandwidth` are stored as their quantized
embedding (sum of the chosen codebook vectors, [128, T] float16), not as integer indices,
so the trainer and the decoder see the same [128, T] layout either way (the integer
indices themselves are not stored: re-quantizing a sum of codebook vectors need not give
them back). The manifest records kind "codes" and the bandwidth.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torchaudio

from pipeline.schema import EncodeConfig
from pipeline.codec_facts import WEIGHTS_FILE

log = logging.getLogger(__name__)

MODEL_RATE = 24000
FRAME_RATE = 75
LATENT_DIM = 128
HOP = MODEL_RATE // FRAME_RATE  # 320 samples per frame at 24 kHz


class WeightsError(RuntimeError):
    """The EnCodec weights file is missing or not the expected one."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def params_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (identifies random weights)."""
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def load_weights(weights_dir: str | Path, name: str = WEIGHTS_FILE) -> tuple[dict, str]:
    """Read a local state dict named `<model>-<sha256 prefix>.th` after checking that prefix;
    return it and the file's full sha256."""
    path = Path(weights_dir) / name
    hint = (f"place {name} there on a machine with internet access "
            "(see `make fetch-weights`), or set encode.weights_dir, or use "
            "encode.pretrained=false for random weights (tests only)")
    if not path.is_file():
        raise WeightsError(f"EnCodec weights not found: {path.resolve()}; {hint}")
    digest = file_sha256(path)
    expected = name.rsplit("-", 1)[1].split(".")[0]
    if not digest.startswith(expected):
        raise WeightsError(f"EnCodec weights file {path.resolve()} has sha256 {digest[:16]}..., "
                           f"expected a hash starting with {expected}; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise WeightsError(f"EnCodec weights file {path.resolve()} could not be read: {exc}; "
                           f"{hint}") from exc
    return state, digest


def _random_codebooks(model: torch.nn.Module) -> None:
    """Untrained RVQ codebooks are all zeros (k-means init waits for training data); give
    them random vectors so the codes path does real nearest-neighbour work with random weights."""
    for module in model.quantizer.modules():
        if hasattr(module, "embed") and hasattr(module, "inited"):
            torch.nn.init.kaiming_uniform_(module.embed)
            module.embed_avg.copy_(module.embed)
            module.inited.fill_(1.0)


class EncodecCodec:
    """The encodec package's 24 kHz model as a [B, C, S] <-> [B, 128, T] codec."""

    name = "encodec"
    frame_rate = FRAME_RATE
    latent_dim = LATENT_DIM

    def __init__(self, enc: EncodeConfig, sample_rate: int, device: torch.device, seed: int):
        from encodec import EncodecModel  # imports torchaudio; keep it off the import path

        if (sample_rate * HOP) % MODEL_RATE:
            raise ValueError(f"encodec codec: data.sample_rate={sample_rate} gives no whole "
                             f"number of samples per {FRAME_RATE} Hz frame")
        self.sample_rate = sample_rate
        self.device = torch.device(device)
        self.use_codes = enc.use_codes
        self.bandwidth = enc.bandwidth
        self.pretrained = enc.pretrained
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = EncodecModel.encodec_model_24khz(pretrained=False)
            if not enc.pretrained:
                _random_codebooks(model)
        if enc.pretrained:
            state, self.weights_sha256 = load_weights(enc.weights_dir)
            model.load_state_dict(state)
            log.info("EnCodec 24 kHz: pretrained weights %s (sha256 %s)",
                     Path(enc.weights_dir) / WEIGHTS_FILE, self.weights_sha256[:12])
        else:
            self.weights_sha256 = params_sha256(model)
            log.warning("EnCodec 24 kHz with RANDOM weights (encode.pretrained=false, seed %d): "
                        "latents are for tests only", seed)
        model.set_target_bandwidth(enc.bandwidth)
        self.model = model.to(self.device).eval()

    def frames(self, samples: int) -> int:
        """Frames produced for a chunk of `samples` samples at the data rate."""
        return samples * FRAME_RATE // self.sample_rate

    def _to_model_rate(self, wave: torch.Tensor) -> torch.Tensor:
        mono = wave.to(self.device, torch.float32).mean(dim=1, keepdim=True)
        if self.sample_rate != MODEL_RATE:
            mono = torchaudio.functional.resample(mono, self.sample_rate, MODEL_RATE)
        return mono

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, C, S] at the data rate -> [B, 128, T] float32 (mono downmix, 24 kHz model)."""
        frames = self.frames(wave.shape[-1])
        mono = self._to_model_rate(wave)
        on_gpu = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            emb = self.model.encoder(mono)
        emb = emb.float()[..., :frames]
        if self.use_codes:  # the quantizer's nearest-neighbour search stays in fp32
            codes = self.model.quantizer.encode(emb, FRAME_RATE, self.bandwidth)
            emb = self.model.quantizer.decode(codes)
        return emb

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 128, T] -> [B, 1, T * hop] audio at the data rate."""
        frames = latents.shape[-1]
        wave = self.model.decoder(latents.to(self.device, torch.float32))
        if self.sample_rate != MODEL_RATE:
            wave = torchaudio.functional.resample(wave, MODEL_RATE, self.sample_rate)
        samples = frames * self.sample_rate // FRAME_RATE
        if wave.shape[-1] < samples:
            wave = torch.nn.functional.pad(wave, (0, samples - wave.shape[-1]))
        return wave[..., :samples]

    def describe(self) -> dict:
        """What the encode manifest records about this codec."""
        return {"codec": self.name, "sample_rate": self.sample_rate,
                "model_sample_rate": MODEL_RATE, "frame_rate": self.frame_rate,
                "latent_dim": self.latent_dim, "bandwidth": self.bandwidth,
                "kind": "codes" if self.use_codes else "latents",
                "codes_stored_as": "quantized embedding" if self.use_codes else None,
                "pretrained": self.pretrained, "weights_sha256": self.weights_sha256,
                "weights_file": WEIGHTS_FILE if self.pretrained else None}
