"""Stage 1's order probe (jobs/order_probe.py): its pieces, its figures for models whose
answer is known, a tiny real stage-1 run that writes order_probe.json and goes on past a
gate that only warns, and the same figures from two ranks as from one."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from data_prep.latent_store import LatentStore
from jobs import distributed, train
from jobs.order_probe import candidate_chunks, permute_frames, probe_pairs
from jobs.pair_data import PairDataset, read_pairs
from pipeline.atomic import atomic_save_npy
from tests.fixtures.train_run import make_run, read_json, run, run_stage, torchrun_cmd


def test_permute_frames_is_a_seeded_permutation_per_sample():
    x = torch.arange(2 * 3 * 50, dtype=torch.float32).view(2, 3, 50)
    a, b = permute_frames(x, [11, 12]), permute_frames(x, [11, 12])
    assert torch.equal(a, b)                                     # seeded: repeatable
    assert not torch.equal(a, x)
    for i in range(2):
        order = (a[i, 0] - x[i, 0, 0]).long()                     # which frame went where
        assert sorted(order.tolist()) == list(range(50))
        assert torch.equal(a[i], x[i][:, order])                 # one order for all channels
    assert not torch.equal(a[0, 0] - x[0, 0, 0], a[1, 0] - x[1, 0, 0])   # each its own seed
    assert torch.equal(permute_frames(x[1:], [12]), a[1:])      # independent of the batch
    state = torch.get_rng_state()
    permute_frames(x, [1, 2])
    assert torch.equal(state, torch.get_rng_state())            # the global RNG untouched


def test_candidates_are_every_val_chunk_of_a_song():
    pairs = [{"song": "a", "input": 0, "target_song": "a", "target": 1},
             {"song": "a", "input": 1, "target_song": "a", "target": 2},
             {"song": "b", "input": 4, "target_song": "b", "target": 6},
             {"song": "b", "input": 0, "target_song": "c", "target": 3}]   # shuffled target
    assert candidate_chunks(pairs) == {"a": [0, 1, 2], "b": [0, 4, 6], "c": [3]}


class Lookup(nn.Module):
    """An oracle: the true continuation (+ 0.1) of an input it has seen, zeros otherwise."""

    def __init__(self, table: dict[bytes, torch.Tensor]):
        super().__init__()
        self.table = table

    def forward(self, x, targets, mode):
        zero = torch.zeros_like(x[0])
        return {"output": torch.stack([self.table.get(s.numpy().tobytes(), zero) for s in x])}


class Constant(nn.Module):
    """The same output whatever the input."""

    def forward(self, x, targets, mode):
        return {"output": torch.full_like(x, 0.5)}


def test_probe_figures_for_models_whose_answer_is_known(tmp_path):
    run_dir = make_run(tmp_path, songs=5, chunks=6, val_songs=3)
    rng = np.random.default_rng(5)   # every chunk different: no twins among the candidates
    shard = run_dir / "encode" / "shards" / "latents-00000.npy"
    atomic_save_npy(shard, rng.standard_normal(np.load(shard).shape).astype(np.float16))
    cfg = train.load_config(run_dir)
    info = distributed.setup()
    ctx = train.build_context(cfg, run_dir, "stage1", info, {"codec": "mel"})
    val = PairDataset(LatentStore(run_dir / "encode"), read_pairs(run_dir / "pairs" / "val.jsonl"))
    indices = list(range(len(val)))                  # 3 songs x 5 pairs, 6 candidates each
    table = {val[i][0].numpy().tobytes(): val[i][1] + 0.1 for i in indices}
    n, ordered, permuted, hits, chance, ranks, cands = probe_pairs(ctx, Lookup(table), val, indices)
    assert (n, hits, ranks, cands) == (15, 15, 15, 15 * 6)       # always the true one, rank 1
    assert chance == pytest.approx(15 / 6)
    assert ordered / n == pytest.approx(0.1, rel=0.05)   # L1 of the 0.1 offset (+ a little spectral)
    assert permuted > 5 * ordered                    # a shuffled input is not recognised
    n, ordered, permuted, hits, *_ = probe_pairs(ctx, Constant(), val, indices)
    assert ordered == permuted                       # no use of order: order gain exactly 0
    assert hits < n


@pytest.mark.integration
def test_tiny_stage1_writes_order_probe_and_goes_on_past_a_warned_gate(tmp_path, store, capsys):
    import mlflow
    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={store}", "stage1.epochs=2",
                       "stage2.epochs=1", "stage1.gate.min_improvement=0.99",
                       "stage1.gate.min_order_gain=0.03", "stage1.gate.on_fail=warn")
    assert run_stage(run_dir, "stage1") == train.EXIT_OK
    err = capsys.readouterr().err
    probe = read_json(run_dir / "stage1" / "order_probe.json")
    assert probe["pairs"] == 8 and probe["epoch"] in (1, 2)      # 2 val songs x 4 pairs
    for key in ("val_loss", "val_loss_permuted", "order_gain", "retrieval_accuracy",
                "retrieval_mean_rank"):
        assert math.isfinite(probe[key]), key
    assert probe["retrieval_chance"] == pytest.approx(1 / 5)     # 5 chunks per val song
    assert 0 <= probe["retrieval_correct"] <= 8
    # the probe read best.pt: its ordered loss is the best epoch's val loss
    history = [json.loads(line)["val_loss"]
               for line in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert probe["val_loss"] == pytest.approx(min(history), rel=1e-4)
    assert probe["order_gain"] == pytest.approx(probe["val_loss_permuted"] / probe["val_loss"] - 1)
    gate = read_json(run_dir / "stage1" / "gate.json")
    assert gate["passed"] is False and gate["warned"] is True and gate["on_fail"] == "warn"
    assert {c["rule"] for c in gate["checks"]} >= {"progress", "order"}
    assert gate["order_gain"] == probe["order_gain"]
    assert f"GATE MISSED (warn): {gate['reason']}" in err
    exit_record = read_json(run_dir / "stage1" / "exit.json")
    assert exit_record["exit_code"] == 0 and "GATE MISSED (warn)" in exit_record["reason"]
    run_id = read_json(run_dir / "stage1" / "mlflow_run.json")["run_id"]
    logged = mlflow.MlflowClient(store).get_run(run_id).data.metrics
    assert logged["order/order_gain"] == pytest.approx(probe["order_gain"])
    assert logged["val/gate_passed"] == 0.0
    # the chain goes on: stage 2 starts from stage 1's best weights
    assert run_stage(run_dir, "stage2") == train.EXIT_OK
    assert read_json(run_dir / "stage2" / "transfer_report.json")["source"].endswith(
        "stage1/best.pt")


@pytest.mark.integration
def test_two_ranks_probe_like_one(tmp_path, store):
    one = make_run(tmp_path / "one", f"mlflow.tracking_uri={store}")
    two = make_run(tmp_path / "two", f"mlflow.tracking_uri={store}")
    assert run_stage(one, "stage1") == 0
    proc = run(torchrun_cmd(two, "stage1", 2, ("--standalone",)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = read_json(one / "stage1" / "order_probe.json")
    b = read_json(two / "stage1" / "order_probe.json")
    assert (a["pairs"], a["epoch"]) == (b["pairs"], b["epoch"])    # every pair, once
    for key in ("retrieval_chance", "retrieval_mean_candidates"):   # sums over ranks
        assert b[key] == pytest.approx(a[key], rel=1e-12), key
    for key in ("val_loss", "val_loss_permuted"):   # the replicas match to ~1e-4 (test_ddp)
        assert b[key] == pytest.approx(a[key], rel=1e-3), key
