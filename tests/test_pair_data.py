"""Augmented pairs: input and continuation get the same augmentation, or neither does."""
from __future__ import annotations

import json

import numpy as np
import torch

from data_prep.latent_store import LatentStore
from jobs.pair_data import PairDataset, read_pairs
from tests.train_fixtures import make_run


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
