"""Encode step: shard shapes/dtype for both codecs, manifest, resume, augmentation, store."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.chunk_outputs import write_chunks
from tests.fixtures.config import make_cfg
from data_prep import encode, pairs
from data_prep.codecs import load_codec
from data_prep.latent_store import LatentStore
from pipeline.config import write_resolved

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One MLflow store per module (a copy of the empty template: building one costs seconds)."""
    from tests.fixtures.mlflow_template import seed_store
    return f"mlflow.tracking_uri={seed_store(tmp_path_factory.mktemp('mlflow'))}"


MEL = ["encode.codec=mel", "encode.shard_size=4", "encode.batch_size=3", "pairs.val_fraction=0.4",
       "encode.augment.variants=0"]


def setup_run(tmp_path: Path, uri: str, songs: dict[str, int], *overrides: str,
              sr: int = 24000, seconds: float = 1.0, **chunk_kwargs):
    cfg = make_cfg(tmp_path, uri, f"data.sample_rate={sr}", *overrides)
    run_dir = Path(cfg.run.root) / cfg.run.name
    arrays = write_chunks(run_dir, songs, sr, seconds, **chunk_kwargs)
    pairs.run(cfg, run_dir)
    return cfg, run_dir, arrays


def test_mel_encode_shapes_manifest_and_store(tmp_path, uri):
    songs = {"a": 3, "b": 2, "c": 3, "d": 2}
    cfg, run_dir, arrays = setup_run(tmp_path, uri, songs, *MEL, seconds=2.0, channels=2)
    manifest = encode.run(cfg, run_dir)
    out = run_dir / "encode"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    for key in ("codec", "sample_rate", "frame_rate", "latent_dim", "frames", "dtype", "kind",
                "pretrained", "weights_sha256", "bandwidth", "shards", "index", "augmented"):
        assert key in on_disk, key
    assert (manifest["codec"], manifest["frames"], manifest["dtype"]) == ("mel", 150, "float16")
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]  # 10 chunks, shard_size 4
    total = 0
    for shard in manifest["shards"]:
        arr = np.load(out / shard["file"], mmap_mode="r")
        assert arr.shape == (shard["rows"], 128, 150) and arr.dtype == np.float16
        total += arr.shape[0]
    assert total == sum(songs.values())
    assert {s: len(rows) for s, rows in manifest["index"].items()} == songs
    assert manifest["augmented"] == {}
    assert (out / "config.resolved.yaml").exists() and (out / "mlflow_run.json").exists()

    # the store gives back exactly what the codec makes of that chunk
    store = pickle.loads(pickle.dumps(LatentStore(out)))
    assert (store.frames, store.latent_dim, store.chunks("c")) == (150, 128, 3)
    codec = load_codec(cfg.encode, 24000, "cpu")
    direct = codec.encode(torch.from_numpy(arrays["c"][2:3].copy()))[0].numpy()
    got = store.get("c", 2)
    assert got.shape == (128, 150) and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), direct, atol=0.02, rtol=0.01)
    assert not np.allclose(store.get("a", 0), store.get("b", 0))
    with pytest.raises(IndexError, match="has 2 chunks"):
        store.get("b", 2)
    with pytest.raises(KeyError, match="zzz"):
        store.get("zzz", 0)


def test_encodec_random_weights_at_12khz_int16_input(tmp_path, uri):
    cfg, run_dir, _ = setup_run(tmp_path, uri, {"a": 2, "b": 2}, "encode.codec=encodec",
                                "encode.pretrained=false", "encode.batch_size=2",
                                "pairs.val_fraction=0.5", sr=12000, dtype="int16")
    manifest = encode.run(cfg, run_dir)
    assert manifest["pretrained"] is False and manifest["kind"] == "latents"
    assert manifest["codec"] == "encodec" and manifest["sample_rate"] == 12000
    assert manifest["frames"] == 75 and len(manifest["weights_sha256"]) == 64
    arr = np.load(run_dir / "encode" / manifest["shards"][0]["file"], mmap_mode="r")
    assert arr.shape == (4, 128, 75) and arr.dtype == np.float16
    assert np.isfinite(arr.astype(np.float32)).all() and arr.astype(np.float32).std() > 0


def test_resume_does_no_work_and_ignores_temp_files(tmp_path, uri):
    cfg, run_dir, _ = setup_run(tmp_path, uri, {"a": 3, "b": 3, "c": 2}, *MEL)
    first = encode.run(cfg, run_dir)
    shards = run_dir / "encode/shards"
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npy")}
    assert sorted(stamps) == ["latents-00000.npy", "latents-00001.npy"]

    # a killed run: one shard missing, a half-written temp file left behind
    before = np.load(shards / "latents-00001.npy").copy()
    (shards / "latents-00001.npy").unlink()
    (shards / ".latents-00001.npy.tmp-x1").write_bytes(b"\x93NUMPY half")
    second = encode.run(cfg, run_dir)
    assert second["shards"] == first["shards"] and second["index"] == first["index"]
    assert (shards / "latents-00000.npy").stat().st_mtime_ns == stamps["latents-00000.npy"]
    np.testing.assert_array_equal(np.load(shards / "latents-00001.npy"), before)
    assert not list(shards.glob(".*tmp*"))

    # nothing missing: no shard is rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npy")}
    encode.run(cfg, run_dir)
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npy")} == stamps

    # a changed setting changes shard contents: old shards are dropped, not reused
    cfg2 = make_cfg(tmp_path, uri, *MEL, "encode.shard_size=8")
    third = encode.run(cfg2, run_dir)
    assert [s["rows"] for s in third["shards"]] == [8]
    assert sorted(p.name for p in shards.glob("*.npy")) == ["latents-00000.npy"]


def test_augmented_variants_for_train_songs_only(tmp_path, uri):
    cfg, run_dir, _ = setup_run(tmp_path, uri, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2}, *MEL,
                                "encode.augment.variants=2",
                                "encode.augment.types=[gain,noise,mix]")
    manifest = encode.run(cfg, run_dir)
    summary = json.loads((run_dir / "pairs/summary.json").read_text())
    train, val = summary["song_ids"]["train"], summary["song_ids"]["val"]
    assert sorted(manifest["augmented"]) == sorted(train)
    store = LatentStore(run_dir / "encode")
    for song in val:
        assert store.variants(song, 0) == [] and store.variants(song, 1) == []
    kept = 0
    for song in train:
        for chunk in range(2):
            variants = store.variants(song, chunk)
            assert 1 <= len(variants) <= 2
            for shard, row, params in variants:
                assert params["type"] in ("gain", "noise", "mix")
                z = store.get_variant(shard, row)
                assert z.shape == (128, 75) and z.dtype == np.float16
                assert not np.array_equal(z, store.get(song, chunk))
            kept += len(variants)
    dropped = sum(manifest["augment"]["dropped"].values())
    assert kept == manifest["augment"]["rows"] and kept + dropped == 2 * 2 * len(train)
    for info in manifest["aug_shards"]:
        assert np.load(run_dir / "encode" / info["file"], mmap_mode="r").shape[0] == info["rows"]
    # new augmentation settings redo the variants only, never the clean latents
    clean_shard = run_dir / "encode" / manifest["shards"][0]["file"]
    stamp = clean_shard.stat().st_mtime_ns
    fewer = make_cfg(tmp_path, uri, *MEL, "encode.augment.variants=1",
                     "encode.augment.types=[gain]")
    again = encode.run(fewer, run_dir)
    assert clean_shard.stat().st_mtime_ns == stamp and again["index"] == manifest["index"]
    assert again["augment"]["rows"] == len(train) * 2
    assert all(p["type"] == "gain" for per_song in again["augmented"].values()
               for per_chunk in per_song for _, _, p in per_chunk)
    # clean latents of the same chunks are untouched by augmentation
    clean = make_cfg(tmp_path / "clean", uri, *MEL)
    clean_dir = Path(clean.run.root) / clean.run.name
    write_chunks(clean_dir, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2}, 24000, 1.0)
    pairs.run(clean, clean_dir)
    encode.run(clean, clean_dir)
    plain = LatentStore(clean_dir / "encode")
    for song in val + train:
        np.testing.assert_array_equal(plain.get(song, 1), store.get(song, 1))


@pytest.mark.integration
def test_cli_and_mlflow_metrics(tmp_path, uri):
    cfg, run_dir, _ = setup_run(tmp_path, uri, {"a": 2, "b": 2}, *MEL, "pairs.val_fraction=0.5")
    write_resolved(cfg, run_dir)
    proc = subprocess.run([sys.executable, "-m", "data_prep.encode", "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == 4 and out["frames"] == 75 and out["codec"] == "mel"
    import mlflow
    from pipeline.tracking import tracking_uri
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run_id = json.loads((run_dir / "encode/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.metrics["data/chunks_encoded"] == 4
    assert run.data.metrics["data/x_real_time"] > 0
    assert run.data.tags["mlflow.runName"] == "encode"
    assert [a.path for a in client.list_artifacts(run_id)] == ["manifest.json"]


def test_missing_chunk_array_is_a_clear_error(tmp_path, uri):
    cfg, run_dir, _ = setup_run(tmp_path, uri, {"a": 2, "b": 2}, *MEL, "pairs.val_fraction=0.5")
    (run_dir / "chunk/songs/b.npy").unlink()
    with pytest.raises(encode.EncodeError, match=r"songs/b.npy of song b is missing"):
        encode.run(cfg, run_dir)


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_read_batches_match_the_arrays(tmp_path, dtype):
    """File reads into batch buffers give the same floats as the memmap, scaled for int16."""
    rng = np.random.default_rng(0)
    data = {s: (rng.standard_normal((3, 1, 50)) * 1000).astype(dtype) for s in ("a", "b")}
    arrays = {}
    for song, arr in data.items():
        np.save(tmp_path / f"{song}.npy", arr)
        arrays[song] = np.load(tmp_path / f"{song}.npy", mmap_mode="r")
    rows = [("a", 2), ("b", 0), ("b", 1), ("a", 0)]
    batches = list(encode.read_batches(arrays, rows, 3))
    assert [len(b) for b in batches] == [3, 1]
    scale = 1 / 32768 if dtype == "int16" else 1.0
    want = np.stack([data[s][c].astype(np.float32) * scale for s, c in rows])
    np.testing.assert_allclose(np.concatenate(batches), want, rtol=1e-6)


def test_prefetched_keeps_order_and_raises_the_producers_error():
    assert list(encode.prefetched(iter(range(20)), depth=2)) == list(range(20))

    def broken():
        yield 1
        raise OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        list(encode.prefetched(broken()))


def test_write_shard_refuses_a_wrong_row_count(tmp_path):
    path = tmp_path / "latents-00000.npy"
    with pytest.raises(encode.EncodeError, match="got 2 latents for 3 rows"):
        encode.write_shard(path, iter([torch.zeros(2, 4, 5)]), rows=3, dim=4, frames=5)
    assert not path.exists() and not list(tmp_path.iterdir())   # no half file left
    encode.write_shard(path, iter([torch.ones(2, 4, 5), torch.ones(1, 4, 5)]), 3, 4, 5)
    out = np.load(path)
    assert out.dtype == np.float16 and out.shape == (3, 4, 5) and out.sum() == 60


def test_memory_tuning_is_the_entry_points_not_the_librarys(tmp_path, uri, monkeypatch):
    """glibc's mallopt is process-wide: encode.run (what tests and launch call) leaves it
    alone; only the step's entry point, encode.main, asks glibc to keep freed memory."""
    from pipeline import malloc

    calls = []
    monkeypatch.setattr(malloc, "_applied", False)
    monkeypatch.setattr(malloc, "_mallopt", lambda: lambda *args: calls.append(args) or 1)
    cfg, run_dir, _ = setup_run(tmp_path, uri, {"a": 2, "b": 2, "c": 2}, *MEL)
    encode.run(cfg, run_dir)
    assert calls == [] and not malloc.applied()
    write_resolved(cfg, run_dir)
    encode.main(["--run-dir", str(run_dir)])
    assert (malloc.M_MMAP_MAX, 0) in calls and malloc.applied()
