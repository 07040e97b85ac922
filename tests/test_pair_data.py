"""Augmented pairs: input and continuation get the same augmentation, or neither does."""
from __future__ import annotations

import json

import numpy as np
import torch

from data_prep.latent_store import LatentStore
from jobs.pair_data import PairDataset, read_pairs
from tests.fixtures.train_run import make_run


def _which(store, song, chunk, x):
    """Params of the stored variant equal to x, 'clean', or None."""
    if torch.equal(x, torch.from_numpy(store.get(song, chunk).astype(np.float32))):
        return "clean"
    for shard, row, params in store.variants(song, chunk):
        if torch.equal(x, torch.from_numpy(store.get_variant(shard, row).astype(np.float32))):
            return json.dumps(params, sort_keys=True)
    return None


def test_pair_sides_share_variant_settings_and_fall_back_to_clean(tmp_path):
    run_dir = make_run(tmp_path, variants=2)
    manifest_path = run_dir / "encode" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    song = next(iter(manifest["augmented"]))
    manifest["augmented"][song][1] = manifest["augmented"][song][1][1:]  # chunk 1 lost variant 0
    manifest_path.write_text(json.dumps(manifest))
    store = LatentStore(run_dir / "encode")
    pairs = read_pairs(run_dir / "pairs" / "train.jsonl") * 20
    ds = PairDataset(store, pairs, augment_prob=1.0, seed=1)
    ds.set_epoch(1)
    seen = set()
    for i, p in enumerate(pairs):
        x, y = ds[i]
        a = _which(store, p["song"], p["input"], x)
        b = _which(store, p["target_song"], p["target"], y)
        assert a is not None and a == b, (p, a, b)
        seen.add(a)
    assert "clean" in seen and len(seen) >= 3   # both variants and the clean fallback occur


def test_each_stage_draws_augmented_samples_at_its_own_rate(tmp_path):
    """The demo's 20/30/50% per stage, as the trainer opens its data, over many draws."""
    from jobs import distributed, train
    from tests.fixtures.config import make_cfg

    run_dir = make_run(tmp_path, variants=1)
    demo = make_cfg(tmp_path)
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    store = LatentStore(run_dir / "encode")
    for stage, expected in (("stage1", 0.2), ("stage2", 0.3), ("stage3", 0.5)):
        scfg = getattr(demo, stage)
        assert scfg.augment_prob == expected
        _, train_set, val_set, _, _ = train.open_data(demo, run_dir, scfg, info)
        train_set.pairs = train_set.pairs * 100                     # 1600 draws per epoch
        draws = []
        for epoch in (1, 2):
            train_set.set_epoch(epoch)
            for i, p in enumerate(train_set.pairs):
                x, _ = train_set[i]
                clean = torch.from_numpy(store.get(p["song"], p["input"]).astype(np.float32))
                draws.append(not torch.equal(x, clean))
        assert abs(np.mean(draws) - expected) < 0.04, (stage, np.mean(draws))
        assert val_set.augment_prob == 0.0


def test_reconstruction_pairs_train_with_input_equal_to_target(tmp_path):
    """pairs.target=same through the real pairs step, read as the trainer reads it: every
    sample's target is its input, augmented or not."""
    from torch.utils.data import DataLoader

    from data_prep import pairs
    from jobs import distributed, train
    from pipeline.config import load_resolved
    from tests.fixtures.chunk_outputs import write_chunks
    from tests.fixtures.train_run import mlflow_store

    run_dir = make_run(tmp_path, f"mlflow.tracking_uri={mlflow_store(tmp_path)}",
                       "pairs.target=same", "stage2.augment_prob=1.0", variants=1)
    cfg = load_resolved(run_dir)
    store = LatentStore(run_dir / "encode")
    write_chunks(run_dir, {s: store.chunks(s) for s in store.songs}, 24000, 0.05)
    pairs.run(cfg, run_dir)
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    _, train_set, val_set, train_sampler, val_sampler = train.open_data(cfg, run_dir, cfg.stage2,
                                                                        info)
    assert len(train_set) + len(val_set) == 6 * 5
    augmented = 0
    for dataset, sampler in ((train_set, train_sampler), (val_set, val_sampler)):
        for x, y in DataLoader(dataset, batch_sampler=sampler):
            assert x.shape == y.shape and torch.equal(x, y)
    for i, p in enumerate(train_set.pairs):
        x, y = train_set[i]
        assert torch.equal(x, y)
        augmented += not torch.equal(x, torch.from_numpy(store.get(p["song"], p["input"])
                                                         .astype(np.float32)))
    assert augmented > 0                       # the augmented path was taken, and matched
