"""Stage 1's causal next-frame objective (Aurl.ai's autoregressive stage 1).

The core runs causally over the sequence s = input chunk followed by the target's frames
shifted by one, and the hidden frame at position i predicts s[i + 1]:

- teacher forcing (training): s holds the true target frames; one pass predicts them all;
- free running (validation, the order probe, baselines' yardstick): the prediction of each
  target frame is appended to s and the next one is predicted from it, with a key/value
  cache, so the whole target chunk comes from the input alone.

Guide (`guide_lags` k >= 1): each sample's period P is the input's best autocorrelation lag
(jobs/trivial_predictors.py, lags min_lag .. half the input; from the input alone, so
causal). The guide frames of the frame to predict are the INPUT's frames 1, 2, .. k periods
before it at the same phase (for a target frame: the last k cycles of the input, as the
period baseline tiles them on, never the model's own frames, so errors are not copied on)
and the input's time mean; they are projected (`guide`) and added to position i's layer
input, and the prediction is the first of them + the network's output: the model starts from the input's period tiled on and
learns, per channel and per moment, how far to trust it. With `mix`, the skip is a learned
per-channel weighting of those guide frames (`mix`, [k + 1, C], starting at the frame one
period back alone; `mix_gain` times the stored weights, so Adam moves them that much faster
than the network's: a hundred steps at lr 1e-3 move a weight by at most ~0.1 otherwise)
instead of that frame. With k = 0 there is no guide and the prediction is
the previous frame plus the network's output.

Scheduled sampling (`sampled` > 0, training only): a first teacher-forced pass without
gradient predicts every target frame; each target frame is then replaced by that prediction
with probability `sampled` (the global RNG, so seeded and resumed with the run) and the
second pass, which the loss reads, sees that mixed history, as free running sees its own
predictions.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from jobs.transformer import LatentTransformer
from jobs.trivial_predictors import best_period
from pipeline.schema import NextFrameConfig, StageConfig

OBJECTIVES = ("chunk", "next_frame")
# Generator.forward modes of the next-frame objective.
TEACHER_FORCED = "teacher_forced"
FREE_RUNNING = "free_running"


def is_next_frame(scfg: StageConfig) -> bool:
    """Does the stage train the next-frame objective? Continuation mode only: a creative
    stage (the PowerMuse cascade, non-causal by design) ignores the objective."""
    return scfg.objective == "next_frame" and scfg.mode == "continuation"


def train_mode(scfg: StageConfig) -> str:
    """The Generator.forward mode a stage trains in."""
    return TEACHER_FORCED if is_next_frame(scfg) else scfg.mode


def eval_mode(scfg: StageConfig) -> str:
    """The mode a stage is validated in: the whole target from the input alone."""
    return FREE_RUNNING if is_next_frame(scfg) else scfg.mode


def lag_frames(seq: Tensor, positions: Tensor, periods: Tensor, k: int, length: int) -> Tensor:
    """[B, C, n]: for each position p, the input frame (seq[..., :length]) k periods before
    frame p + 1 at its phase: p + 1 - P, moved back by whole periods until it lies in the
    input, then (k - 1) periods further back (index clamped at 0)."""
    period = periods.unsqueeze(1)                                            # [B, 1]
    index = positions.unsqueeze(0) + 1 - period                              # [B, n]
    over = (index - length + 1).clamp(min=0)                                 # beyond the input
    index = index - (over + period - 1) // period * period - (k - 1) * period
    return seq.gather(2, index.clamp(min=0).unsqueeze(1).expand(-1, seq.shape[1], -1))


class NextFrame(nn.Module):
    """The guide projection and the two ways of running a causal core (see module doc)."""

    def __init__(self, cfg: NextFrameConfig, latent_dim: int, d_model: int):
        super().__init__()
        if cfg.guide_lags < 0 or cfg.min_lag < 1:
            raise ValueError(f"next_frame.guide_lags must be >= 0 and min_lag >= 1, got "
                             f"{cfg.guide_lags} and {cfg.min_lag}")
        self.lags, self.min_lag, self.sampled = cfg.guide_lags, cfg.min_lag, cfg.sampled
        self.mix_gain = cfg.mix_gain
        self.guide = (nn.Linear((self.lags + 1) * latent_dim, d_model) if self.lags else None)
        self.mix = None
        if self.lags and cfg.mix:
            start = torch.zeros(self.lags + 1, latent_dim, 1)
            start[0] = 1.0                                  # the frame one period back
            # stored divided by mix_gain: the optimizer's steps move it mix_gain times faster
            self.mix = nn.Parameter(start / self.mix_gain)

    def periods(self, inputs: Tensor) -> Tensor:
        """[B] int64: each input's best period in min_lag .. half its frames."""
        hi = max(1, inputs.shape[-1] // 2)
        lo = min(self.min_lag, hi)
        return best_period(inputs.detach(), lo, hi)

    def views(self, inputs: Tensor, positions: Tensor, periods: Tensor) -> list[Tensor]:
        """The guide frames [B, C, n] of positions: the input's 1..k periods back, its mean."""
        length = inputs.shape[-1]
        views = [lag_frames(inputs, positions, periods, k, length)
                 for k in range(1, self.lags + 1)]
        return views + [inputs.mean(dim=-1, keepdim=True).expand(-1, -1, len(positions))]

    def extra(self, views: list[Tensor]) -> Tensor | None:
        """Guide features [B, n, d_model] from the guide frames, or None without a guide."""
        if self.guide is None:
            return None
        return self.guide(torch.cat(views, dim=1).transpose(1, 2))

    def skip(self, seq: Tensor, positions: Tensor, views: list[Tensor]) -> Tensor:
        """[B, C, n]: what each position's prediction starts from: the frame one period back
        (or the learned mix of the guide frames; the previous frame without a guide)."""
        if self.guide is None:
            return seq.gather(2, positions.view(1, 1, -1).expand(seq.shape[0], seq.shape[1], -1))
        if self.mix is None:
            return views[0]
        return sum(w * v for w, v in zip(self.mix * self.mix_gain, views))

    def teacher_forced(self, core: LatentTransformer, inputs: Tensor, targets: Tensor) -> Tensor:
        """[B, C, T_out]: every target frame predicted from the input and the TRUE frames
        before it, in one causal pass (in training with `sampled`, some of them the
        model's own predictions: scheduled sampling)."""
        if self.training and self.sampled > 0:
            with torch.no_grad():
                guess = self.one_pass(core, inputs, targets)
            swap = torch.rand(targets.shape[0], 1, targets.shape[-1],
                              device=targets.device) < self.sampled
            targets = torch.where(swap, guess, targets)
        return self.one_pass(core, inputs, targets)

    def one_pass(self, core: LatentTransformer, inputs: Tensor, targets: Tensor) -> Tensor:
        """[B, C, T_out]: each target frame predicted from the input and `targets`' frames
        before it, in one causal pass."""
        seq = torch.cat([inputs, targets[..., :-1]], dim=-1)
        positions = torch.arange(seq.shape[-1], device=seq.device)
        periods = self.periods(inputs)
        views = self.views(inputs, positions, periods)
        h = core.encode(seq, causal=True, extra=self.extra(views))
        start = inputs.shape[-1] - 1   # the position that predicts the first target frame
        return (self.skip(seq, positions[start:], [v[..., start:] for v in views])
                + core.decode(h[:, start:]))

    def free_running(self, core: LatentTransformer, inputs: Tensor, frames: int) -> Tensor:
        """[B, C, frames]: the continuation generated frame by frame from the input alone
        (each prediction is fed back; causal key/value cache). No gradient: call it under
        torch.no_grad() and in eval mode."""
        batch, channels, length = inputs.shape
        seq = inputs.new_zeros(batch, channels, length + frames)   # filled as it goes
        seq[..., :length] = inputs
        cache = core.cache(batch, length + frames - 1, inputs)
        positions = torch.arange(length + frames - 1, device=inputs.device)
        views = self.views(inputs, positions, self.periods(inputs))   # from the input alone
        at = lambda p: [v[..., p:p + 1] for v in views]              # noqa: E731
        h = core.extend(core.embed(inputs, 0, self.extra([v[..., :length] for v in views])),
                        cache)[:, -1:]
        for t in range(frames):
            here = length - 1 + t                                    # the position that predicts it
            frame = self.skip(seq, positions[here:here + 1], at(here)) + core.decode(h)
            seq[..., length + t:length + t + 1] = frame
            if t + 1 < frames:
                h = core.extend(core.embed(frame, length + t, self.extra(at(here + 1))), cache)
        return seq[..., length:]
