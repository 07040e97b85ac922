"""Does stage 1 use the order of its input's frames? Two readings of the best weights on
the val pairs, written to order_probe.json and read by the gate (`min_order_gain`):

- order: the val loss with each input's frames permuted in time (a private generator seeded
  by run.seed and the pair's index, so every rank split draws the same permutations) over
  the val loss with the real order; order_gain = permuted / ordered - 1;
- within-song retrieval: for each val pair, the model's output (real order) is scored
  against every val chunk of the target's song (the inputs and targets of that song's val
  pairs); top-1 when the true continuation scores strictly lowest. Chance is 1 / #candidates.

Under the next_frame objective both outputs are free-running continuations (from the input
in order, and from the permuted input), as validation scores them.

Each rank probes its share of the val pairs (the validation sampler's) and the sums are
all-reduced, so every rank returns the same figures. The global RNG is never drawn from.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from jobs import checkpoint, distributed
from jobs.losses import generator_losses
from jobs.next_frame import eval_mode
from jobs.pair_data import GlobalBatchSampler, PairDataset
from jobs.train_context import Context
from pipeline import run_folder as rf

# Seeds of the permutations: run.seed * SEED_STRIDE + the pair's index in the val set.
SEED_STRIDE = 1_000_003


def candidate_chunks(pairs: list[dict]) -> dict[str, list[int]]:
    """song -> sorted stored-chunk indices of its val chunks: every pair's input (under its
    song) and target (under its target song)."""
    found: dict[str, set] = {}
    for pair in pairs:
        found.setdefault(pair["song"], set()).add(int(pair["input"]))
        found.setdefault(pair["target_song"], set()).add(int(pair["target"]))
    return {song: sorted(chunks) for song, chunks in found.items()}


def permute_frames(x: Tensor, seeds: list[int]) -> Tensor:
    """[B, C, T] with each sample's frames in a random order drawn from a private generator
    seeded by that sample's seed (the same order for all its channels)."""
    out = torch.empty_like(x)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        out[i] = x[i][:, torch.randperm(x.shape[-1], generator=g).to(x.device)]
    return out


def per_sample_loss(ctx: Context, output: Tensor, target: Tensor) -> Tensor:
    """[B]: the stage's total loss of each output against its target (as validation scores
    it; in continuation mode the loss reads only output and target)."""
    return torch.stack([generator_losses({"output": output[i:i + 1]}, target[i:i + 1],
                                         target[i:i + 1], ctx.scfg, ctx.codec["codec"],
                                         1.0)["total"] for i in range(len(output))])


def load_best(model: nn.Module, path: Path) -> int:
    """Put best.pt's generator weights into `model`; returns the epoch they are from."""
    state = checkpoint.load(path)
    model.load_state_dict(state["generator"])
    return int(state.get("epoch") or 0)


@torch.no_grad()
def probe_pairs(ctx: Context, model: nn.Module, val_set: PairDataset,
                indices: list[int]) -> list[float]:
    """This rank's sums over `indices`: [pairs, ordered loss, permuted loss, top-1 hits,
    1 / #candidates, rank of the true continuation, #candidates]."""
    device, seed = ctx.info.device, ctx.cfg.run.seed
    chunks = candidate_chunks(val_set.pairs)
    by_song: dict[str, list[int]] = {}
    for index in indices:
        by_song.setdefault(val_set.pairs[index]["target_song"], []).append(index)
    step = max(1, ctx.scfg.batch_size // ctx.info.world_size)
    mode = eval_mode(ctx.scfg)
    sums = [0.0] * 7
    for song, members in by_song.items():
        cands = torch.stack([torch.tensor(np.asarray(val_set.store.get(song, c)),
                                          dtype=torch.float32) for c in chunks[song]]).to(device)
        for start in range(0, len(members), step):
            batch = members[start:start + step]
            inp = torch.stack([val_set[i][0] for i in batch]).to(device)
            mixed = permute_frames(inp, [seed * SEED_STRIDE + i for i in batch])
            with ctx.autocast():
                out = model(inp, None, mode)["output"].float()
                out_mixed = model(mixed, None, mode)["output"].float()
            for k, index in enumerate(batch):
                true = chunks[song].index(int(val_set.pairs[index]["target"]))
                losses = per_sample_loss(ctx, out[k:k + 1].expand_as(cands), cands)
                others = torch.cat([losses[:true], losses[true + 1:]])
                rank = 1 + int((others <= losses[true]).sum())
                permuted = per_sample_loss(ctx, out_mixed[k:k + 1], cands[true:true + 1])
                for j, value in enumerate((1.0, float(losses[true]), float(permuted[0]),
                                           float(rank == 1), 1.0 / len(cands), float(rank),
                                           float(len(cands)))):
                    sums[j] += value
    return sums


def order_probe(ctx: Context, val_set: PairDataset, sampler: GlobalBatchSampler) -> dict:
    """order_probe.json's figures for the stage's best.pt (collective: every rank calls);
    the model's weights and mode are restored afterwards."""
    distributed.barrier(ctx.info)   # best.pt is written by rank 0
    model = ctx.g
    kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    try:
        # a continuation that never beat the best it continued from writes no best.pt of
        # its own: its last weights are probed then, and the record says so
        name = rf.BEST if rf.stage_file(ctx.run_dir, ctx.stage, rf.BEST).exists() else rf.LAST
        epoch = load_best(model, rf.stage_file(ctx.run_dir, ctx.stage, name))
        model.eval()
        indices = [i for batch in sampler for i in batch]
        sums = probe_pairs(ctx, model, val_set, indices)
    finally:
        model.load_state_dict(kept)
        model.train(was_training)
    n, ordered, permuted, hits, chance, ranks, cands = distributed.all_reduce_sum(sums, ctx.info)
    n = max(n, 1.0)
    ordered, permuted = ordered / n, permuted / n
    return {"checkpoint": name, "epoch": epoch, "pairs": int(n),
            "val_loss": ordered, "val_loss_permuted": permuted,
            "order_gain": permuted / ordered - 1.0 if ordered > 0 else float("nan"),
            "retrieval_accuracy": hits / n, "retrieval_chance": chance / n,
            "retrieval_correct": int(hits), "retrieval_mean_rank": ranks / n,
            "retrieval_mean_candidates": cands / n, "seed": ctx.cfg.run.seed}
