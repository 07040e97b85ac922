"""The generator of all three stages: transformer core, optional VAE bottleneck, and the
PowerMuse creative cascade.

Parameter names are the same in every stage, so a stage loads the previous stage's weights
by name and shape: `core.*` (jobs/transformer.py), `vae.*` (jobs/vae.py, stage 2 on),
`agent.*` and `fuse.<k>.*` (creative mode only). The "gan" part adds nothing here.

The creative modules are built when any stage of the config runs in creative mode, never
per stage, so names do not change between stages of one run. In a config that mixes modes,
a continuation stage leaves them idle: `Generator.idle_parameters(mode)` tells the trainer
to wrap it in DDP with find_unused_parameters=True.

Stage 1's next-frame objective (jobs/next_frame.py) adds `next_frame.*` (its guide
projection and mix) to a transformer-only generator when a stage of the config has
objective next_frame; forward's modes "teacher_forced" and "free_running" run the core
causally. Stage 2 and 3 generators leave them out, and take the core by name and shape.

Creative cascade (PowerMuse): the cascade shares the one core; cascade stage k first fuses
its channel-concatenated view with `fuse.<k>` (a per-frame linear map back to 128 channels),
then runs core (+ VAE). Stage 0 sees concat(m_in * input, m_tgt * target), stage k > 0
concat(m_in * input, previous output, m_tgt * target). Sharing the core means every
parameter of a continuation-trained core is used, and trained, by the cascade too.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from jobs.creative_agent import CreativeAgent
from jobs.next_frame import FREE_RUNNING, OBJECTIVES, TEACHER_FORCED, NextFrame, is_next_frame
from jobs.transformer import LatentTransformer
from jobs.vae import HierarchicalVae
from pipeline.schema import Config

MODES = ("continuation", "creative")
PARTS = ("transformer", "vae", "gan")
SKIPS = ("mean", "learned", "none")
# RMS restoration clamp of the PowerMuse cascade (from the spec, a constant of the method).
RMS_SCALE_MIN = 0.7
RMS_SCALE_MAX = 1.5
# Guards a division by the RMS of an all-zero output; far below any real latent RMS.
RMS_EPS = 1e-8


def rms(x: Tensor) -> Tensor:
    """Root mean square per sample over (channels, time): [B, C, T] -> [B, 1, 1]."""
    return x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


def restore_rms(output: Tensor, reference: Tensor) -> Tensor:
    """Scale each sample of `output` toward `reference`'s RMS, the factor clamped to [0.7, 1.5]."""
    scale = (rms(reference) / (rms(output) + RMS_EPS)).clamp(RMS_SCALE_MIN, RMS_SCALE_MAX)
    return output * scale


class Generator(nn.Module):
    """Latents [B, 128, T] (+ target chunk in creative mode) -> latents [B, 128, T]."""

    def __init__(self, cfg: Config, parts: list[str], creative: bool):
        super().__init__()
        unknown = set(parts) - set(PARTS)
        if unknown or "transformer" not in parts:
            raise ValueError(f"enabled_parts must include 'transformer' and only {PARTS}, "
                             f"got {parts}")
        tr = cfg.model.transformer
        if tr.cascade_stages < 1:
            raise ValueError(f"model.transformer.cascade_stages must be >= 1, got "
                             f"{tr.cascade_stages}")
        self.parts = list(parts)
        self.cascade_stages = tr.cascade_stages
        self.core = LatentTransformer(tr)
        self.vae = (HierarchicalVae(cfg.model.vae, tr.d_model, tr.latent_dim)
                    if "vae" in parts else None)
        self.agent = CreativeAgent(tr) if creative else None
        self.next_frame = next_frame_module(cfg, self.parts)
        # a chunk-objective continuation stage with these parts would leave it idle
        self.next_frame_idle = self.next_frame is not None and any(
            list(s.enabled_parts) == self.parts and s.mode == "continuation"
            and not is_next_frame(s) for s in (cfg.stage1, cfg.stage2, cfg.stage3))
        self.fuse = nn.ModuleList(
            nn.Linear((2 if k == 0 else 3) * tr.latent_dim, tr.latent_dim)
            for k in range(tr.cascade_stages)) if creative else None
        # Per-channel statistics of the training latents, set by the trainer from the data
        # and saved with the weights: the shape of the curriculum's "data" noise, for
        # training and generation alike (jobs.curriculum.mix_noise). Zero / one until set.
        self.register_buffer("latent_mean", torch.zeros(tr.latent_dim))
        self.register_buffer("latent_song_sqrt", torch.eye(tr.latent_dim))
        self.register_buffer("latent_frame_sqrt", torch.eye(tr.latent_dim))
        self.skip = cfg.model.generator.skip
        if self.skip not in SKIPS:
            raise ValueError(f"model.generator.skip must be one of {SKIPS}, got {self.skip!r}")
        # learned skip: per-channel gate on the input's deviation from the data's mean
        self.skip_gate = (nn.Parameter(torch.ones(tr.latent_dim, 1))
                          if self.skip == "learned" else None)

    def set_latent_stats(self, mean: Tensor, song_sqrt: Tensor, frame_sqrt: Tensor) -> None:
        """Store the training latents' mean [C] and the square roots [C, C] of their
        covariance across chunks and within a chunk (jobs.latent_stats.latent_stats)."""
        self.latent_mean.copy_(mean)
        self.latent_song_sqrt.copy_(song_sqrt)
        self.latent_frame_sqrt.copy_(frame_sqrt)

    def noise_stats(self, kind: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """(mean, song sqrt, frame sqrt) for the curriculum's "data" noise, or None for the
        seed's per-sample noise ("sample_std"); see jobs.curriculum.mix_noise."""
        if kind != "data":
            return None
        return self.latent_mean, self.latent_song_sqrt, self.latent_frame_sqrt

    def idle_parameters(self, mode: str) -> bool:
        """True when some parameters get no gradient in `mode` (DDP needs to know)."""
        return mode == "continuation" and (self.agent is not None or self.next_frame_idle)

    def network(self, x: Tensor, sample: bool = False) -> dict[str, Tensor]:
        """One pass through core (+ VAE bottleneck): {"output"} (+ {"kl"}).

        The output is the core's prediction PLUS the per-channel time mean of `x`: the
        network predicts the deviation from the chunk's average level (spectrum), so it
        starts from "keep the input's average level" instead of spending its first epochs
        learning offsets (log-mel latents sit around -5). That skip (model.generator.skip
        mean) has no parameters; `level` has the others, which hold the data's level
        without passing the noise's song spectrum straight through. The conv VAE decoder
        refines the output before the skip is added.
        Under the pure-GAN curriculum the skip carries the noise's level: the seed's
        zero-mean noise shrinks it to 0, the "data" noise keeps the data's level and each
        sample's song-level spectrum. `sample` draws the VAE latents even in eval mode.
        """
        h = self.core.encode(x)
        out: dict[str, Tensor] = {}
        if self.vae is not None:
            bottleneck = self.vae(h, sample)
            h, out["kl"] = bottleneck["hidden"], bottleneck["kl"]
        decoded = self.core.decode(h)
        if self.vae is not None:
            decoded = self.vae.refine(decoded)
        out["output"] = decoded + self.level(x)
        return out

    def level(self, x: Tensor) -> Tensor:
        """What the skip adds to the network's output, [B or 1, C, 1] (model.generator.skip):
        mean: the input's time mean; none: the training data's mean (nothing of the input);
        learned: the data's mean + a learned per-channel gate (from 1) times the input's
        time mean's deviation from it."""
        if self.skip == "mean":
            return x.mean(dim=-1, keepdim=True)
        data = self.latent_mean.view(1, -1, 1).to(x.dtype)
        if self.skip == "none":
            return data
        return data + self.skip_gate * (x.mean(dim=-1, keepdim=True) - data)

    def forward(self, inputs: Tensor, targets: Tensor | None, mode: str,
                anti_cheat_noise: float = 0.0, sample: bool = False) -> dict[str, Tensor]:
        """Run one mode; returns "output" [B, 128, T], creative "mask_in"/"mask_tgt", VAE "kl".

        continuation: output predicts the target chunk from `inputs` alone (targets unused).
        creative: the cascade; `anti_cheat_noise` (StageConfig.anti_cheat_noise, std relative
        to each sample's target std) is added to the target view of cascade stages k > 0
        while training, so later stages cannot simply copy the target. `sample` draws the
        VAE latents in eval mode too (generation from noise, as stage 3 trained).
        """
        if mode in (TEACHER_FORCED, FREE_RUNNING):
            return {"output": self.next_frames(inputs, targets, mode)}
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "continuation":
            return self.network(inputs, sample)
        if self.agent is None:
            raise ValueError("creative mode needs the creative modules, which are built only "
                             "when a stage of the config has mode: creative")
        if targets is None or targets.shape != inputs.shape:
            raise ValueError("creative mode needs targets of the inputs' shape "
                             f"{tuple(inputs.shape)}, got "
                             f"{None if targets is None else tuple(targets.shape)}")
        m_in, m_tgt = self.agent(inputs, targets)
        seen_in, seen_tgt = m_in * inputs, m_tgt * targets
        previous: Tensor | None = None
        kls = []
        for k, fuse in enumerate(self.fuse):
            if previous is None:
                view = torch.cat([seen_in, seen_tgt], dim=1)
            else:
                tgt_view = seen_tgt
                if self.training and anti_cheat_noise > 0:
                    std = targets.std(dim=(1, 2), keepdim=True)
                    tgt_view = seen_tgt + anti_cheat_noise * std * torch.randn_like(seen_tgt)
                view = torch.cat([seen_in, previous, tgt_view], dim=1)
            fused = fuse(view.transpose(1, 2)).transpose(1, 2)
            step = self.network(fused, sample)
            previous = restore_rms(step["output"], inputs)
            if "kl" in step:
                kls.append(step["kl"])
        out = {"output": previous, "mask_in": m_in, "mask_tgt": m_tgt}
        if kls:
            out["kl"] = torch.stack(kls).mean(dim=0)
        return out

    def next_frames(self, inputs: Tensor, targets: Tensor | None, mode: str) -> Tensor:
        """The next-frame objective's prediction of the target chunk [B, 128, T_out]:
        teacher_forced (needs the targets) or free_running (the targets' length, else the
        input's; call model.eval() first)."""
        if self.next_frame is None:
            raise ValueError(f"mode {mode!r} needs a stage with objective next_frame")
        if mode == TEACHER_FORCED:
            if targets is None:
                raise ValueError("teacher forcing needs the targets")
            return self.next_frame.teacher_forced(self.core, inputs, targets)
        frames = inputs.shape[-1] if targets is None else targets.shape[-1]
        return self.next_frame.free_running(self.core, inputs, frames)

    @torch.no_grad()
    def generate(self, noise: Tensor) -> Tensor:
        """Noise [B, 128, T] -> latents [B, 128, T]: continuation mode after the pure-GAN
        curriculum. Call model.eval() first (no dropout). The VAE latents are drawn, not
        taken at their means: stage 3 trained the generator on drawn latents, and from
        noise the means alone carry next to no movement in time (one spectrum per sample).
        A creative generator makes music from (input, target) pairs instead: forward(...,
        "creative"); jobs.fakes.make_fakes picks the path a checkpoint was trained on."""
        return self.network(noise, sample=True)["output"]


def next_frame_module(cfg: Config, parts: list[str]) -> NextFrame | None:
    """The next-frame pieces for a generator of `parts` [transformer] when a continuation
    stage of the config has objective next_frame (the first such stage's settings), else
    None; that stage must train the transformer alone (a creative stage ignores the
    objective). Stages with other parts leave next_frame.* out (transfer: "unused")."""
    stages = [getattr(cfg, s) for s in ("stage1", "stage2", "stage3")]
    for scfg in stages:
        if scfg.objective not in OBJECTIVES:
            raise ValueError(f"stage objective must be one of {OBJECTIVES}, got "
                             f"{scfg.objective!r}")
    chosen = [s for s in stages if is_next_frame(s)]
    if not chosen:
        return None
    if any(s.next_frame is None or s.enabled_parts != ["transformer"] for s in chosen):
        raise ValueError("objective next_frame (continuation mode) needs a next_frame "
                         "section and enabled_parts [transformer]")
    if list(parts) != ["transformer"]:   # a later stage's generator (VAE, GAN) has no use for it
        return None
    tr = cfg.model.transformer
    return NextFrame(chosen[0].next_frame, tr.latent_dim, tr.d_model)


def build_generator(cfg: Config, parts: list[str]) -> Generator:
    """The generator for a stage's enabled_parts; creative modules if any stage is creative."""
    creative = any(getattr(cfg, s).mode == "creative" for s in ("stage1", "stage2", "stage3"))
    return Generator(cfg, list(parts), creative)
