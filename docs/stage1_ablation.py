"""The stage-1 ablation's direct runs (docs/design-notes.md, "Stage 1 as a causal
next-frame model"): stage 1 on the demo's stored pairs with the pipeline's model, loss,
optimizer and schedule, free-running val every 4 epochs, one thread, no MLflow.

    .venv/bin/python docs/stage1_ablation.py <store encode dir> <store pairs dir> [key=value ...]

Prints the val loss every 4 epochs and a RESULT line: the best val loss and its epoch, the
last epoch's val loss from the input in order and permuted (order gain), the margin over
the period baseline computed here on the same pairs, and the CPU seconds.
"""
from __future__ import annotations

import sys
import time

import torch

from data_prep.latent_store import LatentStore
from jobs.generator import build_generator
from jobs.losses import generator_losses
from jobs.next_frame import eval_mode, train_mode
from jobs.order_probe import permute_frames
from jobs.pair_data import PairDataset, read_pairs
from jobs.trivial_predictors import period_continuation, period_range
from pipeline import config

EVERY = 4          # epochs between validations
FRAME_RATE = 75.0  # both codecs


def stack(dataset: PairDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (input, target) pairs of a dataset as two [N, C, T] tensors."""
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def main(encode_dir: str, pairs_dir: str, overrides: list[str]) -> None:
    """Train and report (see the module docstring)."""
    torch.set_num_threads(1)
    cfg = config.load("demo", "local", overrides)
    s1 = cfg.stage1
    store = LatentStore(encode_dir)
    xt, yt = stack(PairDataset(store, read_pairs(f"{pairs_dir}/train.jsonl")))
    xv, yv = stack(PairDataset(store, read_pairs(f"{pairs_dir}/val.jsonl")))
    torch.manual_seed(cfg.run.seed)
    g = build_generator(cfg, ["transformer"])
    opt = torch.optim.AdamW(g.parameters(), lr=s1.lr, weight_decay=s1.weight_decay)
    warm = s1.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warm) if warm > 0 else 1.0)

    def loss(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return generator_losses({"output": out}, tgt, tgt, s1, "mel", 1.0)["total"]

    def val(x: torch.Tensor) -> float:
        g.eval()
        with torch.no_grad():
            out = torch.cat([g(x[i:i + 16], yv[i:i + 16], eval_mode(s1))["output"]
                             for i in range(0, len(x), 16)])
            per = [float(loss(out[i:i + 1], yv[i:i + 1])) for i in range(len(out))]
        g.train()
        return sum(per) / len(per)

    lo, hi = period_range(xv.shape[-1], FRAME_RATE, s1.baselines.min_period_s)
    period = sum(float(loss(period_continuation(xv[i:i + 1], lo, hi, yv.shape[-1]),
                            yv[i:i + 1])) for i in range(len(xv))) / len(xv)
    start, best, order = time.process_time(), (float("inf"), 0), torch.Generator().manual_seed(0)
    for epoch in range(1, s1.epochs + 1):
        perm = torch.randperm(len(xt), generator=order)
        for b in range(len(xt) // s1.batch_size):
            idx = perm[b * s1.batch_size:(b + 1) * s1.batch_size]
            value = loss(g(xt[idx], yt[idx], train_mode(s1))["output"], yt[idx])
            opt.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(g.parameters(), s1.grad_clip)
            opt.step()
            sched.step()
        if epoch % EVERY == 0 or epoch == s1.epochs:
            v = val(xv)
            best = min(best, (v, epoch))
            print(f"epoch {epoch}: train {float(value):.4f} val {v:.4f}", flush=True)
    mixed = val(permute_frames(xv, list(range(len(xv)))))
    last = val(xv)
    print(f"RESULT {' '.join(overrides)}: best {best[0]:.4f} (epoch {best[1]}), last {last:.4f}, "
          f"permuted {mixed:.4f}, order gain {mixed / last - 1:+.1%}, period {period:.4f}, "
          f"margin {1 - best[0] / period:+.1%}, cpu {time.process_time() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
