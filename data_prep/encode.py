"""Step 3, encode: every chunk of every ok song once into float16 latent shards + a manifest.

The row order (songs sorted by id, chunks in order) and so each shard's contents are fixed
up front; a shard file exists only once it is whole (memmap into a temp file, then rename),
so a re-run after a kill encodes only the missing shards. plan.json keys the shards by the
step's signature (augmented shards) and by its clean part's (pipeline/dag.py PARTS), so a
new version of the step that differs only in augmentation or pairs takes the clean shards
of an earlier one (hard links) instead of encoding them again.
With encode.augment.variants = K > 0, each chunk of each TRAIN song (from pairs/train.jsonl)
also gets up to K augmented variants (data_prep.augment.make_variants) in separate
`aug-*.npy` shards; validation songs never do.
Variants keep the chunk length (checked again here) so every row has T frames.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from data_prep.codecs import Codec, load_codec
from data_prep.pairs import ok_songs
from pipeline import dag, run_folder as rf
from pipeline.atomic import atomic_path, atomic_write_json, is_temp_file
from pipeline.config import load_resolved
from pipeline.malloc import reuse_freed_memory
from pipeline.schema import Config
from pipeline.tracking import step_run

log = logging.getLogger(__name__)
T = TypeVar("T")

LATENT_DTYPE = np.float16
FLOAT16_MAX = float(np.finfo(np.float16).max)
CLEAN_PATTERN = rf.CLEAN_SHARD
AUG_PATTERN = rf.AUG_SHARD


class EncodeError(RuntimeError):
    """The chunk outputs cannot be encoded as configured."""


# --- inputs ------------------------------------------------------------------------------
def open_songs(run_dir: Path) -> tuple[dict[str, np.ndarray], int]:
    """Memory-map each ok song's chunk array; return them and the common chunk length."""
    arrays: dict[str, np.ndarray] = {}
    for song, entry in ok_songs(run_dir).items():
        path = rf.step_dir(run_dir, rf.CHUNK) / entry["array"]
        if not path.exists():
            raise EncodeError(f"chunk array {path} of song {song} is missing")
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 3 or arr.dtype not in (np.float32, np.int16):
            raise EncodeError(f"{path}: expected [chunks, channels, samples] float32 or int16, "
                              f"got shape {arr.shape} {arr.dtype}")
        arrays[song] = arr
    if not arrays:
        raise EncodeError(f"no ok songs in {rf.step_dir(run_dir, rf.CHUNK)}: nothing to encode")
    lengths = {a.shape[2] for a in arrays.values()}
    if len(lengths) != 1:
        raise EncodeError(f"chunk arrays in {rf.songs_dir(run_dir)} have different "
                          f"lengths {sorted(lengths)}; re-run the chunk step")
    return arrays, lengths.pop()


def as_float(chunk: np.ndarray) -> np.ndarray:
    """A stored chunk [C, S] (float32 or int16) as a writable float32 copy in [-1, 1]."""
    if chunk.dtype == np.int16:
        return chunk.astype(np.float32) / 32768.0
    return np.array(chunk, dtype=np.float32)


def train_songs(run_dir: Path) -> list[str]:
    """Songs of the train split (inputs and targets of pairs/train.jsonl)."""
    path = rf.pairs_file(run_dir, "train")
    if not path.exists():
        raise EncodeError(f"{path} not found: encode.augment.variants > 0 needs the pairs step "
                          "first (augmented variants are written for train songs only)")
    pairs = rf.read_pairs(path)
    return sorted({song for rec in pairs for song in (rec["song"], rec["target_song"])})


# --- plan --------------------------------------------------------------------------------
def plan_keys(cfg: Config, run_dir: Path) -> dict[str, str]:
    """What each part of the shards is made from: the clean part's signature and the
    step's (pipeline/dag.py), each with the chunk version read (a forced chunk rerun makes
    another version under the same signature)."""
    chunk = rf.step_dir(run_dir, rf.CHUNK).resolve().name
    return {"clean": f"{dag.signature_of(cfg, rf.ENCODE, 'clean')}@{chunk}",
            "aug": f"{dag.signature_of(cfg, rf.ENCODE)}@{chunk}"}


def prepare_shard_dir(shards: Path, plan_file: Path, keys: dict[str, str]) -> None:
    """Drop temp leftovers of killed writes, and the shards of a part whose key changed
    (only a step called again on the same folder with other settings: the store gives
    each signature its own folder)."""
    shards.mkdir(parents=True, exist_ok=True)
    for path in shards.iterdir():
        if is_temp_file(path):
            log.info("encode: removing leftover temp file %s", path.name)
            path.unlink()
    old = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    for part, prefix in rf.SHARD_PREFIXES.items():
        if old.get(part) != keys[part]:
            stale = [p for p in shards.iterdir() if p.name.startswith(prefix)]
            if stale:
                log.info("encode: %s inputs or settings changed; removing %d old shard files",
                         part, len(stale))
            for path in stale:
                path.unlink()
    if old != keys:
        if old:
            (plan_file.parent / rf.ENCODE_MANIFEST).unlink(missing_ok=True)  # stale until rebuilt
        atomic_write_json(plan_file, keys)


def take_clean_shards(out: Path, key: str) -> int:
    """Hard-link (or copy) the clean shards that other versions of the step made under the
    same clean key into this one; return how many were taken."""
    here = out.resolve()
    taken = 0
    for other in sorted(p for p in here.parent.iterdir() if p.is_dir() and p != here):
        if (rf.read_json(other / rf.ENCODE_PLAN) or {}).get("clean") != key:
            continue
        for src in sorted((other / rf.SHARDS).glob(rf.SHARD_PREFIXES["clean"] + "*.npy")):
            dst = here / rf.SHARDS / src.name
            if dst.exists() or is_temp_file(src):
                continue
            with atomic_path(dst) as tmp:
                tmp.unlink()
                try:
                    os.link(src, tmp)
                except OSError:       # another file system, or no hard links there
                    shutil.copyfile(src, tmp)
            taken += 1
        if taken:
            log.info("encode: took %d clean shards from version %s (same clean key)",
                     taken, other.name)
    return taken


# --- encoding ----------------------------------------------------------------------------
def read_batches(arrays: dict[str, np.ndarray], rows: list[tuple[str, int]],
                 batch_size: int) -> Iterator[np.ndarray]:
    """[B, C, S] float32 batches of the (song, chunk) rows. Each chunk is read from its
    .npy with a plain file read straight into the batch buffer: one copy, and no page
    fault per 4 kB page as touching a memmap would cost."""
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        first = arrays[part[0][0]]
        batch = np.empty((len(part), *first.shape[1:]), dtype=np.float32)
        for j, (song, chunk) in enumerate(part):
            read_chunk(arrays[song], chunk, batch[j])
        yield batch


def read_chunk(array: np.ndarray, chunk: int, out: np.ndarray) -> None:
    """Chunk `chunk` of a [chunks, C, S] float32 or int16 array (np.load memmap) into the
    float32 buffer `out`, scaled to [-1, 1]."""
    if array.shape[1:] != out.shape:
        raise EncodeError(f"chunk {chunk} has shape {array.shape[1:]}, expected {out.shape}")
    raw = out if array.dtype == np.float32 else np.empty(out.shape, dtype=array.dtype)
    filename = getattr(array, "filename", None)
    if filename is None or not array.dtype.isnative:
        raw[...] = array[chunk]
    else:
        with open(filename, "rb") as fh:
            fh.seek(array.offset + chunk * raw.nbytes)
            if fh.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise EncodeError(f"{filename}: chunk {chunk} is cut short")
    if raw is not out:
        out[...] = as_float(raw)


def stack_batches(waves: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Group [C, S] waves into [B, C, S] float32 batches (the last one may be smaller)."""
    group: list[np.ndarray] = []
    for wave in waves:
        group.append(wave)
        if len(group) == batch_size:
            yield np.stack(group).astype(np.float32, copy=False)
            group = []
    if group:
        yield np.stack(group).astype(np.float32, copy=False)


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Produce `items` in a background thread up to `depth` ahead, so that reading the next
    batch (numpy copies release the GIL) overlaps encoding this one. An error in the
    producer is raised here; leaving early stops the producer."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as exc:   # handed to the consumer
            box.put((done, exc))

    thread = threading.Thread(target=produce, name="encode-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def encode_batches(codec: Codec, batches: Iterator[np.ndarray],
                   device: torch.device) -> Iterator[torch.Tensor]:
    """Encode [B, C, S] float32 batches; yield float16 [B, 128, T] latents (on the CPU) in
    order, each checked to fit float16 (finite, |z| <= 65504) before the cast."""
    for batch in batches:
        x = torch.from_numpy(batch)
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        z = codec.encode(x).float()
        low, high = (v.item() for v in torch.aminmax(z))
        if not (-FLOAT16_MAX <= low and high <= FLOAT16_MAX):   # NaN fails both
            raise EncodeError(f"codec {codec.name} gave non-finite latents (or values beyond "
                              f"float16's range: min {low:.3g}, max {high:.3g})")
        yield z.to(torch.float16).cpu()   # torch casts with vector instructions, numpy not


def write_shard(path: Path, batches: Iterator[torch.Tensor], rows: int, dim: int,
                frames: int) -> None:
    """Stream [B, dim, frames] batches as float16 rows of a .npy into a temp file, then
    rename. Plain writes (a memmap would fault on each new 4 kB page), made by a second
    thread while this one produces the next batch."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh, \
            ThreadPoolExecutor(1, thread_name_prefix="encode-writer") as writer:
        np.lib.format.write_array_header_1_0(fh, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(LATENT_DTYPE)),
            "fortran_order": False, "shape": (rows, dim, frames)})
        n, pending = 0, None
        for z in batches:
            if n + len(z) > rows or tuple(z.shape[1:]) != (dim, frames):
                raise EncodeError(f"{path.name}: got a batch of shape {tuple(z.shape)} after "
                                  f"{n} of {rows} rows of [{dim}, {frames}]")
            data = memoryview(z.to(torch.float16).contiguous().numpy()).cast("B")
            if pending is not None:
                pending.result()   # one write in flight; raises the writer's error
            pending = writer.submit(fh.write, data)
            n += len(z)
        if pending is not None:
            pending.result()
        if n != rows:
            raise EncodeError(f"{path.name}: got {n} latents for {rows} rows")


def _plain(obj):
    """JSON-safe copy of augmentation params (numpy scalars -> Python numbers)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def augmented_waves(rows: list[tuple[str, int]], arrays: dict[str, np.ndarray],
                    all_songs: list[str], train: list[str], samples: int, cfg: Config,
                    meta: list, dropped: dict, on_source=lambda: None) -> Iterator[np.ndarray]:
    """Yield the kept variants of each (song, chunk) row, recording [song, chunk, params]
    per variant in `meta` and dropped counts in `dropped`. Variant settings are drawn from
    an rng seeded by (seed, song) only, so variant k has the same settings in every chunk
    of a song and a pair (input, continuation) is augmented alike; the mixed-in second song
    is picked per (seed, song, chunk). Either way the result does not depend on the shard."""
    from data_prep.augment import fit_length, make_variants

    for song, chunk in rows:
        song_index = all_songs.index(song)
        rng = np.random.default_rng([cfg.run.seed, 2, song_index])
        pick_rng = np.random.default_rng([cfg.run.seed, 3, song_index, chunk])
        others = [s for s in train if s != song]
        other = None
        if others:
            pick = others[int(pick_rng.integers(len(others)))]
            other = as_float(arrays[pick][int(pick_rng.integers(arrays[pick].shape[0]))])
        kept, counts = make_variants(as_float(arrays[song][chunk]), cfg.data.sample_rate,
                                     cfg.encode.augment, rng, other)
        for key, value in (counts or {}).items():
            dropped[key] = dropped.get(key, 0) + int(value)
        for wave, params in kept:
            meta.append([song, chunk, _plain(params)])
            yield fit_length(np.asarray(wave, dtype=np.float32), samples)
        on_source()


def encode_clean(codec: Codec, arrays: dict[str, np.ndarray], groups: list, todo: list[int],
                 shards: Path, batch_size: int, frames: int, bar: tqdm) -> None:
    """Write the missing clean shards `todo` (each a list of (song, chunk) rows)."""
    for k in todo:
        batches = prefetched(read_batches(arrays, groups[k], batch_size))
        latents = encode_batches(codec, _ticking(batches, bar), codec.device)
        write_shard(shards / CLEAN_PATTERN.format(k), latents, len(groups[k]),
                    codec.latent_dim, frames)


def encode_augmented(codec: Codec, arrays: dict[str, np.ndarray], groups: list,
                     todo: list[int], shards: Path, train: list[str], samples: int,
                     cfg: Config, frames: int, bar: tqdm) -> None:
    """Write the missing augmented shards `todo`; each .json (written last) marks one done."""
    all_songs = sorted(arrays)
    for k in todo:
        meta: list = []
        dropped: dict = {}
        waves = augmented_waves(groups[k], arrays, all_songs, train, samples, cfg, meta,
                                dropped, lambda: bar.update(1))
        latents = list(encode_batches(codec, stack_batches(waves, cfg.encode.batch_size),
                                      codec.device))
        path = shards / AUG_PATTERN.format(k)
        write_shard(path, iter(latents), sum(len(z) for z in latents), codec.latent_dim,
                    frames)
        atomic_write_json(rf.shard_listing(path),
                          {"rows": meta, "dropped": dropped, "sources": len(groups[k])})


def run(cfg: Config, run_dir: Path) -> dict:
    """Encode all chunks (and train-song variants) into run_dir/encode; return the manifest."""
    from pipeline.config import write_resolved

    run_dir = Path(run_dir)
    out, shards = rf.step_dir(run_dir, rf.ENCODE), rf.encode_shards(run_dir)
    enc = cfg.encode
    arrays, samples = open_songs(run_dir)
    aug_ids = [s for s in train_songs(run_dir) if s in arrays] if enc.augment.variants > 0 else []
    codec = load_codec(enc, cfg.data.sample_rate, enc.device, seed=cfg.run.seed)
    frames = codec.frames(samples)
    keys = plan_keys(cfg, run_dir)
    prepare_shard_dir(shards, rf.encode_plan(run_dir), keys)
    taken = take_clean_shards(out, keys["clean"])
    write_resolved(cfg, out)

    rows = [(s, c) for s in sorted(arrays) for c in range(arrays[s].shape[0])]
    clean = [rows[i:i + enc.shard_size] for i in range(0, len(rows), enc.shard_size)]
    aug_rows = [(s, c) for s in aug_ids for c in range(arrays[s].shape[0])]
    per_aug = max(1, enc.shard_size // max(1, enc.augment.variants))
    aug = [aug_rows[i:i + per_aug] for i in range(0, len(aug_rows), per_aug)]
    todo_clean = [k for k in range(len(clean)) if not (shards / CLEAN_PATTERN.format(k)).exists()]
    todo_aug = [k for k in range(len(aug))
                if not rf.shard_listing(shards / AUG_PATTERN.format(k)).exists()]
    n_clean = sum(len(clean[k]) for k in todo_clean)
    n_aug = sum(len(aug[k]) for k in todo_aug)
    log.info("encode: %d chunks of %d songs in %d shards, %d chunks to encode, %d train chunks "
             "to augment x%d; codec %s on %s", len(rows), len(arrays), len(clean), n_clean,
             n_aug, enc.augment.variants, codec.name, codec.device)

    with step_run(cfg, run_dir, "encode") as tr:
        tr.log_params({"encode": {k: v for k, v in vars(enc).items() if k != "augment"},
                       "augment": vars(enc.augment), "codec": codec.describe(),
                       "data.sample_rate": cfg.data.sample_rate})
        bar = tqdm(total=n_clean + n_aug, unit="chunk", desc="encode", file=sys.stderr,
                   disable=n_clean + n_aug == 0)
        with torch.inference_mode():
            start = time.perf_counter()
            encode_clean(codec, arrays, clean, todo_clean, shards, enc.batch_size, frames, bar)
            clean_s = time.perf_counter() - start
            encode_augmented(codec, arrays, aug, todo_aug, shards, aug_ids, samples, cfg,
                             frames, bar)
            aug_s = time.perf_counter() - start - clean_s
        bar.close()
        manifest = build_manifest(codec, shards, clean, aug, frames, samples, cfg, keys)
        atomic_write_json(rf.encode_manifest(run_dir), manifest)
        speed = n_clean * samples / cfg.data.sample_rate / clean_s if n_clean else 0.0
        tr.log_metrics({"chunks": len(rows), "chunks_encoded": n_clean,
                        "clean_shards_taken": taken,
                        "encode_seconds": clean_s, "x_real_time": speed,
                        "chunks_per_second": n_clean / clean_s if n_clean else 0.0,
                        "augmented_sources": n_aug, "augment_seconds": aug_s,
                        "augmented_rows": manifest["augment"]["rows"]})
        tr.log_artifact(rf.encode_manifest(run_dir))
    log.info("encode: %d chunks in %.1f s (%.1fx real time), %d augmented sources in %.1f s "
             "-> %s", n_clean, clean_s, speed, n_aug, aug_s, out)
    return manifest


def _ticking(batches: Iterator[np.ndarray], bar: tqdm) -> Iterator[np.ndarray]:
    for batch in batches:
        yield batch
        bar.update(len(batch))


def build_manifest(codec: Codec, shards: Path, clean: list, aug: list, frames: int,
                   samples: int, cfg: Config, keys: dict[str, str]) -> dict:
    """The encode manifest (docs/formats.md) from the plan and the finished shards."""
    index: dict[str, list] = {}
    for k, group in enumerate(clean):
        for row, (song, chunk) in enumerate(group):
            index.setdefault(song, []).append([k, row])
    augmented: dict[str, list] = {}
    aug_shards, dropped, kept = [], {}, 0
    for k in range(len(aug)):
        info = json.loads(rf.shard_listing(shards / AUG_PATTERN.format(k)).read_text())
        aug_shards.append({"file": f"{rf.SHARDS}/{AUG_PATTERN.format(k)}",
                           "rows": len(info["rows"])})
        for row, (song, chunk, params) in enumerate(info["rows"]):
            per_chunk = augmented.setdefault(song, [[] for _ in index[song]])
            per_chunk[chunk].append([k, row, params])
        for key, value in info["dropped"].items():
            dropped[key] = dropped.get(key, 0) + value
        kept += len(info["rows"])
    return {**codec.describe(), "frames": frames, "chunk_samples": samples,
            "dtype": np.dtype(LATENT_DTYPE).name, "songs": len(index),
            "rows": sum(len(g) for g in clean),
            "shards": [{"file": f"{rf.SHARDS}/{CLEAN_PATTERN.format(k)}", "rows": len(g)}
                       for k, g in enumerate(clean)],
            "index": index, "aug_shards": aug_shards, "augmented": augmented,
            "augment": {"variants": cfg.encode.augment.variants, "rows": kept,
                        "dropped": dropped, "songs": len(augmented)},
            "seed": cfg.run.seed, "plan": keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reuse_freed_memory()   # the encoder allocates its big intermediates anew every batch
    manifest = run(load_resolved(args.run_dir), args.run_dir)
    print(json.dumps({k: manifest[k] for k in ("codec", "kind", "pretrained", "songs", "rows",
                                               "frames")}
                     | {"augmented_rows": manifest["augment"]["rows"]}))


if __name__ == "__main__":
    main()
