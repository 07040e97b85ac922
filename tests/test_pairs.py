"""Pairs step: song-level split, gap/stride, shuffled targets, empty-split refusal, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.chunk_outputs import write_chunks
from tests.fixtures.config import make_cfg
from data_prep import pairs
from pipeline.config import ConfigError, write_resolved

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One MLflow store per module (a copy of the empty template: building one costs seconds)."""
    from tests.fixtures.mlflow_template import seed_store
    return f"mlflow.tracking_uri={seed_store(tmp_path_factory.mktemp('mlflow'))}"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _songs(n: int, chunks: int = 5) -> dict[str, int]:
    return {f"song{i:02d}": chunks for i in range(n)}


def _run(tmp_path: Path, uri: str, *overrides: str):
    cfg = make_cfg(tmp_path, uri, *overrides)
    return cfg, Path(cfg.run.root) / cfg.run.name


def test_split_is_by_song_and_pairs_are_consecutive(tmp_path, uri):
    tiny_cfg, run_dir = _run(tmp_path, uri)
    write_chunks(run_dir, _songs(10), 24000, 0.1, shards=2,
                 extra_lines=[{"source": "/data/bad.mp3", "song_id": "bad", "status": "failed",
                               "reason": "decode error", "chunks": 0}])
    summary = pairs.run(tiny_cfg, run_dir)
    train, val = _read(run_dir / "pairs/train.jsonl"), _read(run_dir / "pairs/val.jsonl")
    train_songs, val_songs = {p["song"] for p in train}, {p["song"] for p in val}
    assert train_songs and val_songs and not train_songs & val_songs
    assert len(train_songs) + len(val_songs) == 10 and "bad" not in train_songs | val_songs
    assert summary["songs"] == {"train": len(train_songs), "val": len(val_songs)}
    assert summary["pairs"] == {"train": len(train), "val": len(val)} == \
        {"train": 4 * len(train_songs), "val": 4 * len(val_songs)}
    assert all(p["target_song"] == p["song"] and p["target"] == p["input"] + 1 for p in train + val)
    on_disk = json.loads((run_dir / "pairs/summary.json").read_text())
    assert on_disk["pairs"] == summary["pairs"] and on_disk["seed"] == tiny_cfg.run.seed
    assert (run_dir / "pairs/config.resolved.yaml").exists()


def test_split_is_seeded(tmp_path):
    songs = [f"s{i}" for i in range(20)]
    a = pairs.split_songs(songs, 0.25, 7)
    assert a == pairs.split_songs(songs, 0.25, 7)
    assert a != pairs.split_songs(songs, 0.25, 8)
    assert len(a[1]) == 5 and not set(a[0]) & set(a[1])
    # few songs: each side still gets one
    train, val = pairs.split_songs(["a", "b"], 0.2, 1)
    assert len(train) == 1 and len(val) == 1


def test_gap_and_stride():
    assert pairs.song_pairs(6, 0, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert pairs.song_pairs(6, 1, 2) == [(0, 2), (2, 4)]
    assert pairs.song_pairs(2, 1, 1) == []


def test_shuffle_targets_come_from_another_song_of_the_same_split(tmp_path, uri):
    cfg, run_dir = _run(tmp_path, uri, "pairs.shuffle_targets=true", "pairs.val_fraction=0.3")
    write_chunks(run_dir, _songs(8, chunks=4), 24000, 0.1)
    summary = pairs.run(cfg, run_dir)
    assert summary["mode"] == "shuffle_targets"
    for split in ("train", "val"):
        recs = _read(run_dir / f"pairs/{split}.jsonl")
        songs = set(summary["song_ids"][split])
        assert recs and all(r["target_song"] != r["song"] for r in recs)
        assert all(r["target_song"] in songs and 0 <= r["target"] < 4 for r in recs)
        assert len({r["target_song"] for r in recs}) > 1  # really drawn, not one fixed song


def test_empty_split_is_refused_with_a_clear_message(tmp_path, uri):
    cfg, run_dir = _run(tmp_path, uri, "pairs.val_fraction=0.0")
    write_chunks(run_dir, _songs(3), 24000, 0.1)
    with pytest.raises(pairs.PairsError) as err:
        pairs.run(cfg, run_dir)
    msg = str(err.value)
    assert "val split is empty" in msg and "3 songs" in msg and "pairs.val_fraction" in msg
    assert not (run_dir / "pairs/train.jsonl").exists()


def test_one_song_cannot_fill_both_splits(tmp_path, uri):
    cfg, run_dir = _run(tmp_path, uri)
    write_chunks(run_dir, {"only": 6, "short": 1}, 24000, 0.1)
    with pytest.raises(pairs.PairsError, match=r"val split is empty \(0 songs, 0 pairs; 1 songs"):
        pairs.run(cfg, run_dir)


def test_no_chunk_manifest_is_a_clear_error(tmp_path, uri):
    tiny_cfg, run_dir = _run(tmp_path, uri)
    with pytest.raises(pairs.PairsError, match="run the chunk step first"):
        pairs.run(tiny_cfg, run_dir)


@pytest.mark.integration
def test_cli_reads_the_run_config(tmp_path, uri):
    tiny_cfg, run_dir = _run(tmp_path, uri)
    write_chunks(run_dir, _songs(5), 24000, 0.1)
    write_resolved(tiny_cfg, run_dir)
    proc = subprocess.run([sys.executable, "-m", "data_prep.pairs", "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["songs"]["train"] + out["songs"]["val"] == 5
    assert (run_dir / "pairs/val.jsonl").exists()


def test_no_pair_spans_a_silent_chunk_dropped_in_the_middle(tmp_path, uri):
    """Chunk real files whose second chunk is silent: the chunks on either side of the hole
    are not a start and its continuation, so no pair may join them."""
    import numpy as np
    import soundfile as sf

    from data_prep.chunk import run_shard

    src = tmp_path / "src"
    src.mkdir()
    sr, seconds = 24000, 1.0
    t = np.arange(int(seconds * sr)) / sr
    for n in range(4):
        note = 0.5 * np.sin(2 * np.pi * 220 * (n + 1) * t)
        sf.write(src / f"song{n}.wav", np.concatenate([note, 0 * note, note, note, note]), sr)
    cfg, run_dir = _run(tmp_path, uri, "data.chunk_seconds=1.0", "data.sample_rate=24000",
                        "data.silence_db=-60.0", "data.workers=1", "pairs.val_fraction=0.5")
    run_shard(cfg, run_dir, source=src)
    summary = pairs.run(cfg, run_dir)
    recs = _read(run_dir / "pairs/train.jsonl") + _read(run_dir / "pairs/val.jsonl")
    assert {(r["input"], r["target"]) for r in recs} == {(1, 2), (2, 3)}   # stored indices
    assert len(recs) == 2 * 4 and summary["songs_with_holes"] == 4


def test_pairs_follow_positions_in_time():
    positions = [0, 2, 3, 4]                     # position 1 was dropped as silent
    assert pairs.position_pairs(positions, gap=0, stride=1) == [(1, 2), (2, 3)]
    assert pairs.position_pairs(positions, gap=1, stride=1) == [(0, 1), (1, 3)]
    assert pairs.position_pairs(positions, gap=0, stride=2) == [(1, 2)]
    assert pairs.position_pairs(positions, 0, 1, target="same") == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert pairs.position_pairs(positions, 0, 2, target="same") == [(0, 0), (1, 1), (3, 3)]
    assert pairs.position_pairs(range(6), 1, 2) == pairs.song_pairs(6, 1, 2)


def test_bad_positions_in_a_manifest_are_a_clear_error(tmp_path, uri):
    cfg, run_dir = _run(tmp_path, uri)
    write_chunks(run_dir, _songs(3), 24000, 0.1)
    manifest = run_dir / "chunk/manifest-0-of-1.jsonl"
    lines = _read(manifest)
    lines[1]["positions"] = [0, 1, 1, 2, 3]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(pairs.PairsError, match=r"song01.*positions.*increasing"):
        pairs.run(cfg, run_dir)
    lines[1]["positions"] = [0, 1]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(pairs.PairsError, match=r"song01.*2 positions.*5 chunks"):
        pairs.run(cfg, run_dir)


def test_target_same_pairs_every_chunk_with_itself(tmp_path, uri):
    """Reconstruction (MusicVAE): the target is the input chunk."""
    cfg, run_dir = _run(tmp_path, uri, "pairs.target=same")
    write_chunks(run_dir, _songs(5, chunks=4), 24000, 0.1)
    summary = pairs.run(cfg, run_dir)
    recs = _read(run_dir / "pairs/train.jsonl") + _read(run_dir / "pairs/val.jsonl")
    assert recs and all(r["target_song"] == r["song"] and r["target"] == r["input"] for r in recs)
    assert sorted((r["song"], r["input"]) for r in recs) == \
        [(s, c) for s in sorted(_songs(5)) for c in range(4)]     # each chunk once
    assert summary["target"] == "same" and summary["mode"] == "reconstruction"


@pytest.mark.parametrize("overrides, message", [
    (("pairs.target=same", "pairs.shuffle_targets=true"), "pairs.shuffle_targets"),
    (("pairs.target=same", "pairs.gap=1"), "pairs.gap"),
    (("pairs.target=later",), r"pairs.target.*'later'.*next.*same"),
])
def test_target_settings_that_mean_nothing_are_refused(tmp_path, uri, overrides, message):
    # refused when the config is loaded, before anything is submitted or written
    with pytest.raises(ConfigError, match=message):
        _run(tmp_path, uri, *overrides)
    assert not (tmp_path / "runs").exists()


def test_target_is_part_of_the_pairs_signature(tmp_path):
    from pipeline import dag
    upstream = {"chunk": "0" * 64}
    nxt = dag.signature(make_cfg(tmp_path), "pairs", upstream)
    same = dag.signature(make_cfg(tmp_path, "pairs.target=same"), "pairs", upstream)
    assert nxt != same
