"""Step 1, chunk: a folder of music files -> one [chunks, channels, samples] array per song.

Shard i of n takes every n-th file of the sorted relative paths, so a SLURM job array
splits the work and no two shards write the same file. Each file is decoded in blocks and
its chunks are streamed straight into the array file (the .npy header is rewritten with the
final count at the end), so memory stays flat with song length. Every source file gets a
manifest line (ok, skipped or failed with the reason); one bad file never stops the run.
Chunks quieter than data.silence_db are not stored, so the line's `positions` gives each
stored chunk's index in time (a dropped chunk leaves a hole there; pairs must not span it).
A re-run reuses the records of files whose sha256 is unchanged, made under the step's
signature (pipeline/dag.py), whose array exists.

MLflow: every shard logs to its own child run `chunk/shard-<i>-of-<n>` (shards of a job
array run at once, so they cannot share one run); `summarize` gives the totals.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from data_prep.corpus import ensure_corpus
from data_prep.decode import AudioError, decode_recovering, probe
from pipeline import dag, run_folder as rf
from pipeline.run_folder import AUDIO_EXTS
from pipeline.atomic import atomic_path, atomic_write_json, atomic_write_text
from pipeline.config import ConfigError, load_resolved, write_resolved
from pipeline.chunk_manifest import chunk_dir, count_records, format_summary, previous_records
from pipeline.schema import Config
from pipeline.file_lock import file_lock
from pipeline.tracking import ensure_parent_run, step_run

@dataclass(frozen=True)
class ChunkSpec:
    """What the workers need from the config (picklable, small)."""
    sample_rate: int
    channels: int
    chunk_samples: int
    tail: str
    min_seconds: float
    silence_db: Optional[float]
    max_chunks: int
    dtype: str
    block_seconds: float
    signature: str            # the step's (pipeline/dag.py): records made under another are redone

    @classmethod
    def from_cfg(cls, cfg: Config) -> "ChunkSpec":
        d = cfg.data
        return cls(d.sample_rate, d.channels, int(round(d.chunk_seconds * d.sample_rate)),
                   d.tail, d.min_seconds, d.silence_db, d.max_chunks_per_song, d.dtype,
                   d.block_seconds, dag.signature_of(cfg, rf.CHUNK))


# --- which files --------------------------------------------------------------------

def list_sources(source: Path) -> list[Path]:
    """Audio files under `source` (any depth, case-insensitive extension), sorted by relative path."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"music folder does not exist: {source}")
    # a dangling symlink is not a file, but it looks like input: it is listed, and gets a
    # manifest line with its reason instead of vanishing without a word
    files = [p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTS
             and (p.is_file() or (p.is_symlink() and not p.exists()))]
    return sorted(files, key=lambda p: p.relative_to(source).as_posix())


def unreadable_folders(source: Path) -> list[tuple[Path, str]]:
    """Folders under `source` that cannot be listed (permissions), with the reason: the
    file search passes them by in silence, so the manifest names them instead."""
    found: list[tuple[Path, str]] = []

    def note(exc: OSError) -> None:
        found.append((Path(exc.filename), f"unreadable folder: {exc.strerror}"))
    for _ in os.walk(source, onerror=note):
        pass
    return sorted(found)


def folder_records(source: Path, spec: "ChunkSpec") -> list[dict]:
    """One skipped manifest line per unreadable folder (no file inside it can be chunked)."""
    return [{"source": str(path), "song_id": "", "sha256": "", "duration_s": 0.0,
             "sample_rate": 0, "channels": 0, "chunks": 0, "positions": [], "array": "",
             "status": "skipped", "reason": reason, "signature": spec.signature}
            for path, reason in unreadable_folders(source)]


def shard_files(files: list[Path], shard: int, num_shards: int) -> list[Path]:
    """Shard `shard` of `num_shards`: every n-th file of the sorted list, disjoint by construction."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in 0..{num_shards - 1} (num_shards={num_shards})")
    return files[shard::num_shards]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def song_id(sha256: str, relpath: str) -> str:
    """Stable, filesystem-safe id from the content hash and the path inside the source folder."""
    key = hashlib.sha256(f"{sha256}:{relpath}".encode()).hexdigest()[:16]
    ascii_stem = unicodedata.normalize("NFKD", Path(relpath).stem).encode("ascii", "ignore")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_stem.decode()).strip("_")[:40]
    return f"{key}-{stem}" if stem else key


# --- cutting and writing --------------------------------------------------------------

def cut_chunks(blocks: Iterable[np.ndarray], samples: int, tail: str,
               counter: dict) -> Iterator[np.ndarray]:
    """Fixed-length [channels, samples] chunks from a stream of blocks; the tail is dropped or
    zero-padded. The yielded buffer is reused: use it before asking for the next one."""
    buf: Optional[np.ndarray] = None
    fill = 0
    counter["samples"] = 0
    for block in blocks:
        if buf is None:
            buf = np.zeros((block.shape[0], samples), np.float32)
        counter["samples"] += block.shape[1]
        pos = 0
        while pos < block.shape[1]:
            take = min(samples - fill, block.shape[1] - pos)
            buf[:, fill:fill + take] = block[:, pos:pos + take]
            fill, pos = fill + take, pos + take
            if fill == samples:
                yield buf
                fill = 0
    if buf is not None and fill and tail == "pad":
        buf[:, fill:] = 0.0
        yield buf


def rms_db(chunk: np.ndarray) -> float:
    """RMS level of a chunk in dBFS (a dot product: fast on float32)."""
    flat = chunk.reshape(-1)
    return float(10 * np.log10(max(float(np.dot(flat, flat)) / flat.size, 1e-20)))


def to_dtype(chunk: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return np.round(np.clip(chunk, -1.0, 1.0) * 32767).astype("<i2")
    return chunk.astype("<f4", copy=False)


def _npy_header(fh, count: int, channels: int, samples: int, dtype: str) -> int:
    """Write a .npy v1 header at the current position; returns its length. numpy pads the
    first axis so the header length does not change with `count`."""
    start = fh.tell()
    np.lib.format.write_array_header_1_0(fh, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype).newbyteorder("<")),
        "fortran_order": False, "shape": (count, channels, samples)})
    return fh.tell() - start


class NoChunks(Exception):
    """Nothing to write for this file; the message is the skip reason."""


def write_song(blocks: Iterable[np.ndarray], spec: ChunkSpec,
               out: Path) -> tuple[int, int, list[int]]:
    """Stream kept chunks into `out` atomically; returns (chunks written, samples decoded,
    each written chunk's position in the song: its index among all cut chunks)."""
    counter: dict = {}
    kept = silent = 0
    positions: list[int] = []
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        header_len = _npy_header(fh, 0, spec.channels, spec.chunk_samples, spec.dtype)
        for position, chunk in enumerate(cut_chunks(blocks, spec.chunk_samples, spec.tail,
                                                    counter)):
            if spec.silence_db is not None and rms_db(chunk) < spec.silence_db:
                silent += 1
                continue
            fh.write(to_dtype(chunk, spec.dtype).tobytes())
            positions.append(position)
            kept += 1
            if spec.max_chunks and kept >= spec.max_chunks:
                break
        if not kept:
            seconds = counter.get("samples", 0) / spec.sample_rate
            if silent:
                raise NoChunks(f"silent: all {silent} chunks below {spec.silence_db} dBFS")
            raise NoChunks(f"too short: {seconds:.2f} s decoded, shorter than one "
                           f"{spec.chunk_samples / spec.sample_rate:g} s chunk (tail={spec.tail})")
        fh.seek(0)
        if _npy_header(fh, kept, spec.channels, spec.chunk_samples, spec.dtype) != header_len:
            raise RuntimeError("npy header length changed")  # numpy's padding guarantees it does not
        fh.flush()
    return kept, counter["samples"], positions


# --- one file -------------------------------------------------------------------------

def reusable(prev: Optional[dict], sha: str, spec: ChunkSpec, songs_dir: Path) -> bool:
    """An earlier record still holds: same bytes, made under the same signature, and its
    array (if any) exists.
    An ok record without `positions` (written before they were recorded) is redone."""
    if not prev or prev.get("sha256") != sha or prev.get("signature") != spec.signature:
        return False
    if prev.get("status") == "ok":
        return "positions" in prev and (songs_dir.parent / prev["array"]).is_file()
    return prev.get("status") == "skipped"  # failures are retried


# Errors of the machine, not of the file: a full disk or quota, an I/O error, a read-only
# or lost mount. They fail the shard (and a rerun redoes the file) instead of being
# recorded as a bad file while the step passes with less data.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS,
                                errno.ESTALE, errno.ENOTCONN, errno.ENODEV})


class EnvironmentFault(RuntimeError):
    """An OSError of the machine (ENVIRONMENT_ERRNOS) met while chunking a file."""


def environment_fault(exc: BaseException, path: Path) -> Optional[EnvironmentFault]:
    """An EnvironmentFault naming `path` if `exc` (or its cause) is a machine error."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            return EnvironmentFault(f"{path}: {exc.strerror or exc} (errno {exc.errno}); "
                                    "this is the machine, not the file: free space or fix "
                                    "the mount, then rerun")
        exc = exc.__cause__ or exc.__context__
    return None


def process_file(job: tuple) -> tuple[dict, bool]:
    """Chunk one source file; returns (manifest record, reused). Never raises for bad audio."""
    path, relpath, spec, songs_dir, prev = job
    rec = {"source": str(path), "song_id": "", "sha256": "", "duration_s": 0.0,
           "sample_rate": 0, "channels": 0, "chunks": 0, "positions": [], "array": "",
           "status": "failed", "reason": "", "signature": spec.signature}
    if path.is_symlink() and not path.exists():
        rec.update(status="skipped", reason=f"dangling symlink to {os.readlink(path)}")
        return rec, False
    try:
        rec["sha256"] = sha = file_sha256(path)
    except OSError as exc:
        fault = environment_fault(exc, path)
        if fault is not None:
            raise fault from exc
        rec["reason"] = f"unreadable: {exc}"
        return rec, False
    if reusable(prev, sha, spec, songs_dir):
        return prev, True
    rec["song_id"] = sid = song_id(sha, relpath)
    out = rf.song_array(songs_dir, sid)
    for stale in songs_dir.glob(f".{sid}.npy.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a killed run; only this shard owns this id
    try:
        info = probe(path)
        rec.update(duration_s=round(info.duration_s, 3), sample_rate=info.sample_rate,
                   channels=info.channels)
        if info.duration_s < spec.min_seconds:
            raise NoChunks(f"too short: {info.duration_s:.2f} s < min_seconds {spec.min_seconds:g}")
        (rec["chunks"], decoded, rec["positions"]), recovered = decode_recovering(
            info, lambda blocks: write_song(blocks, spec, out), spec.sample_rate,
            spec.channels, spec.block_seconds)
        if recovered is not None:  # status stays ok: the song is usable
            rec.update(recovered=recovered.record(), reason=recovered.note())
        if not spec.max_chunks or rec["chunks"] < spec.max_chunks:
            rec["duration_s"] = round(decoded / spec.sample_rate, 3)
        rec.update(array=f"{rf.SONGS}/{out.name}", status="ok")
    except NoChunks as exc:
        rec.update(status="skipped", reason=str(exc))
    except Exception as exc:  # one broken file must not stop the shard; it is recorded
        fault = environment_fault(exc, path)
        if fault is not None:
            out.unlink(missing_ok=True)
            raise fault from exc
        if isinstance(exc, AudioError):
            rec.update(status=exc.status, reason=str(exc))
        else:
            rec.update(status="failed", reason=f"error: {type(exc).__name__}: {exc}")
    if rec["status"] != "ok":
        out.unlink(missing_ok=True)  # an array from older settings must not look current
    return rec, False


# --- manifests and summaries -------------------------------------------------------------

# --- the step ----------------------------------------------------------------------------

def _crashed(job: tuple) -> tuple[dict, bool]:
    """The record of a file whose decode killed its worker process (e.g. a decoder segfault)."""
    path, _, spec, _, _ = job
    return ({"source": str(path), "song_id": "", "sha256": "", "duration_s": 0.0,
             "sample_rate": 0, "channels": 0, "chunks": 0, "positions": [], "array": "",
             "status": "failed", "reason": "decode error: the decoding process died on this file",
             "signature": spec.signature}, False)


def pool_results(jobs: list[tuple], workers: int,
                 func: Callable[[tuple], tuple[dict, bool]] = process_file) -> Iterator:
    """func(job) for every job in worker processes, in completion order. If a worker dies,
    the unfinished jobs are run one per process until the culprit is found and recorded as
    failed; then the full pool resumes. A plain Pool would hang instead."""
    # fork: workers start in milliseconds and never re-import the caller's __main__; they
    # only decode and write files, never touch the parent's MLflow or progress-bar state
    ctx = multiprocessing.get_context("fork")
    pending, isolate = list(jobs), False
    while pending:
        batch, pending = (pending[:1], pending[1:]) if isolate else (pending, [])
        finished: set = set()
        with ProcessPoolExecutor(1 if isolate else min(workers, len(batch)), mp_context=ctx,
                                 initializer=_one_blas_thread) as ex:
            futures = {ex.submit(func, job): job for job in batch}
            try:
                for fut in as_completed(futures):
                    result = fut.result()
                    finished.add(fut)
                    yield result
            except BrokenProcessPool:
                for fut in futures:
                    if fut not in finished and fut.done() and fut.exception() is None:
                        finished.add(fut)
                        yield fut.result()
                if isolate:  # this job alone killed its process: it is the culprit
                    finished.update(futures)
                    yield _crashed(batch[0])
                isolate = not isolate
        pending = [job for fut, job in futures.items() if fut not in finished] + pending


def _one_blas_thread() -> None:
    """Worker processes already share out the cores: give each one BLAS thread, or their
    BLAS thread pools fight over the same cores (measured: 2 workers 1.5x slower)."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")


def _run_jobs(jobs: list[tuple], workers: int, journal: Path, desc: str) -> tuple[list, int]:
    """Process files (in worker processes when workers > 1), journaling each record."""
    records, reused, hours = [], 0, 0.0
    if workers > 1 and len(jobs) > 1:
        results: Iterable = pool_results(jobs, workers)
    else:
        results = map(process_file, jobs)  # one file or one worker: no fork, smallest memory
    with tqdm(total=len(jobs), unit="file", desc=desc, file=sys.stderr, dynamic_ncols=True) as bar, \
            open(journal, "a", encoding="utf-8") as fh:
        for rec, was_reused in results:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            records.append(rec)
            reused += was_reused
            hours += rec["duration_s"] / 3600 if rec["status"] == "ok" else 0.0
            bar.set_postfix_str(f"{hours:.3f} h audio", refresh=False)
            bar.update(1)
    return records, reused


def run_shard(cfg: Config, run_dir: Path, shard: int = 0, num_shards: int = 1,
              source: Path | None = None) -> dict:
    """Chunk shard `shard` of `num_shards` of the source folder into run_dir/chunk."""
    run_dir = Path(run_dir)
    source = Path(source) if source else ensure_corpus(cfg, run_dir)
    files = shard_files(list_sources(source), shard, num_shards)
    out_dir = chunk_dir(run_dir)
    songs_dir = out_dir / rf.SONGS
    songs_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out_dir)
    spec = ChunkSpec.from_cfg(cfg)
    previous = previous_records(run_dir)
    where = [p.resolve() if p.exists() else p.absolute() for p in files]  # dangling: itself
    jobs = [(w, p.relative_to(source).as_posix(), spec, songs_dir, previous.get(str(w)))
            for p, w in zip(files, where)]
    tag = rf.shard_tag(shard, num_shards)
    manifest, journal = rf.chunk_manifest(out_dir, tag), rf.chunk_journal(out_dir, tag)
    with file_lock(run_dir / ".mlflow.lock"):  # shards starting together must not both
        ensure_parent_run(cfg, run_dir)       # create the sqlite store or the parent run
    with step_run(cfg, run_dir, f"chunk/shard-{tag}") as tracker:
        tracker.log_params({"data": {k: v for k, v in vars(cfg.data).items()
                                     if f"data.{k}" not in dag.step(rf.CHUNK).leaves_out},
                            "shard": shard, "num_shards": num_shards, "source": str(source),
                            "files": len(files), "workers": cfg.data.workers})
        start = time.perf_counter()
        records, reused = _run_jobs(jobs, cfg.data.workers, journal, f"chunk {tag}")
        if shard == 0:   # one shard names the folders no shard could read
            records += folder_records(source, spec)
        elapsed = time.perf_counter() - start
        records.sort(key=lambda r: r["source"])
        atomic_write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                            for r in records))
        journal.unlink(missing_ok=True)
        summary = {**count_records(records), "shard": shard, "num_shards": num_shards,
                   "source": str(source), "signature": spec.signature, "reused": reused,
                   "seconds": round(elapsed, 3)}
        summary_path = rf.chunk_summary(out_dir, tag)
        atomic_write_json(summary_path, summary)
        tracker.log_metrics({k: summary[k] for k in ("files", "ok", "skipped", "failed",
                                                     "chunks", "audio_hours", "reused", "seconds")})
        tracker.log_artifact(summary_path)
        check_failed_share(summary, cfg.data.max_failed_share, manifest)
    return summary


class TooManyFailures(RuntimeError):
    """More of a shard's files failed than data.max_failed_share allows."""


def check_failed_share(summary: dict, max_share: float, manifest: Path) -> None:
    """Fail the shard when the failed share of its files is implausibly high for a music
    folder (a sick machine, a wrong folder): the records are kept, a rerun retries them."""
    files = summary["ok"] + summary["skipped"] + summary["failed"]
    if files and summary["failed"] / files > max_share:
        raise TooManyFailures(
            f"{summary['failed']} of {files} files failed ({summary['reasons']}), more than "
            f"data.max_failed_share = {max_share:g}; see {manifest}. Rerunning retries them")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chunk one shard of a music folder.")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--shard", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
                        help="shard index (default: $SLURM_ARRAY_TASK_ID or 0)")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="number of shards (default: data.num_shards of the config)")
    parser.add_argument("--source", type=Path, default=None,
                        help="music folder (default: data.source, or the demo corpus)")
    args = parser.parse_args(argv)
    try:
        cfg = load_resolved(args.run_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    num_shards = args.num_shards or cfg.data.num_shards
    summary = run_shard(cfg, args.run_dir, args.shard, num_shards, args.source)
    print(f"chunk shard {args.shard}/{num_shards} -> {chunk_dir(args.run_dir)}")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
