"""Step 2, pairs: an index of [start, continuation] chunk pairs, split into train/val by song.

Chunks are placed in time by the chunk manifest's `positions` (silent chunks are not
stored, so stored index and position differ after a hole). With pairs.target "next" a pair
is (song, input chunk, target song, the chunk at position input + 1 + gap), so no pair spans
a hole; with "same" the target is the input chunk itself (reconstruction, as MusicVAE).
Inputs are the chunks whose position is a multiple of `stride`. Pairs name STORED chunk
indices (what encode and training look up). The split is drawn over songs with run.seed,
never over pairs, so no song's audio is on both sides. `shuffle_targets` replaces each
target with a random chunk of another song of the same split (a negative / creative-mode
control). Only an index is written; no audio.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline import run_folder as rf
from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.config import load_resolved
from pipeline.schema import Config, PairsConfig
from pipeline.tracking import step_run

log = logging.getLogger(__name__)
TARGETS = ("next", "same")


class PairsError(ValueError):
    """The chunk outputs cannot give the requested pairs."""


def ok_songs(run_dir: Path) -> dict[str, dict]:
    """song_id -> chunk manifest record, for every ok record with chunks (sorted by id)."""
    from pipeline.chunk_manifest import collect_manifest

    records = collect_manifest(Path(run_dir))
    if not records:
        raise PairsError(f"no chunk manifests ({rf.CHUNK_MANIFEST_GLOB}) in {rf.step_dir(run_dir, rf.CHUNK)}: "
                         "run the chunk step first")
    songs = {r["song_id"]: r for r in records
             if r.get("status") == "ok" and int(r.get("chunks", 0)) > 0}
    return dict(sorted(songs.items()))


def song_positions(entry: dict, chunk_folder: Path) -> Optional[list[int]]:
    """Each stored chunk's position in time from a manifest record; None for a record
    written before positions were recorded (it is read as contiguous: 0, 1, 2, ...)."""
    if "positions" not in entry:
        return None
    where = (f"chunk manifest line of song {entry.get('song_id')!r} "
             f"({entry.get('source')}) in {chunk_folder}")
    positions, chunks = entry["positions"], int(entry["chunks"])
    if not isinstance(positions, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in positions):
        raise PairsError(f"{where}: positions must be a list of chunk indices >= 0, "
                         f"got {positions!r}; re-run the chunk step")
    if len(positions) != chunks:
        raise PairsError(f"{where}: {len(positions)} positions for {chunks} chunks; "
                         "re-run the chunk step")
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise PairsError(f"{where}: positions must be strictly increasing, got {positions}; "
                         "re-run the chunk step")
    return positions


def position_pairs(positions: Sequence[int], gap: int, stride: int,
                   target: str = "next") -> list[tuple[int, int]]:
    """(input, target) stored-chunk indices of one song whose stored chunks sit at `positions`
    in time: inputs at positions that are multiples of `stride`; "next" targets the chunk at
    position + 1 + gap (none if it was not stored), "same" the input itself."""
    stored = {p: i for i, p in enumerate(positions)}
    out = []
    for i, p in enumerate(positions):
        if p % stride:
            continue
        j = i if target == "same" else stored.get(p + 1 + gap)
        if j is not None:
            out.append((i, j))
    return out


def song_pairs(chunks: int, gap: int, stride: int, target: str = "next") -> list[tuple[int, int]]:
    """(input, target) chunk indices of one song with `chunks` contiguous chunks."""
    return position_pairs(range(chunks), gap, stride, target)


def check_settings(pc: PairsConfig) -> None:
    """Refuse pairs settings that mean nothing together, naming the keys."""
    if pc.target not in TARGETS:
        raise PairsError(f"pairs.target = {pc.target!r} is not one of {', '.join(TARGETS)} "
                         "(next = continuation, same = reconstruction of the input chunk)")
    if pc.target == "same" and pc.shuffle_targets:
        raise PairsError("pairs.target = 'same' (the target is the input chunk) cannot be "
                         "combined with pairs.shuffle_targets = true (a target from another "
                         "song); set one of them")
    if pc.target == "same" and pc.gap:
        raise PairsError(f"pairs.gap = {pc.gap} has no meaning with pairs.target = 'same' "
                         "(the target is the input chunk); set pairs.gap = 0")


def split_songs(songs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded song-level split; with two or more songs and val_fraction > 0 each side gets one."""
    order = list(np.random.default_rng(seed).permutation(len(songs)))
    n_val = int(round(val_fraction * len(songs)))
    if val_fraction > 0 and len(songs) >= 2:
        n_val = min(max(n_val, 1), len(songs) - 1)
    val = sorted(songs[i] for i in order[:n_val])
    train = sorted(songs[i] for i in order[n_val:])
    return train, val


def build_split(songs: list[str], positions: dict[str, Sequence[int]], gap: int, stride: int,
                shuffle: bool, rng: np.random.Generator, target: str = "next") -> list[dict]:
    """Pair records of one split; shuffled targets come from another song of the same split."""
    records = []
    for song in songs:
        others = [s for s in songs if s != song]
        for i, j in position_pairs(positions[song], gap, stride, target):
            target_song, target_chunk = song, j
            if shuffle:
                target_song = others[int(rng.integers(len(others)))]
                target_chunk = int(rng.integers(len(positions[target_song])))
            records.append({"song": song, "input": i, "target_song": target_song,
                            "target": target_chunk})
    return records


def _check_split(name: str, songs: list[str], pairs: list[dict], total_songs: int,
                 total_pairs: int, shuffle: bool) -> None:
    if not pairs:
        raise PairsError(
            f"pairs: the {name} split is empty ({len(songs)} songs, 0 pairs; {total_songs} "
            f"songs with pairs and {total_pairs} pairs in all). Change pairs.val_fraction, "
            "or give more songs (data.source) or more chunks per song (data.chunk_seconds, "
            "pairs.gap)")
    if shuffle and len(songs) < 2:
        raise PairsError(f"pairs: shuffle_targets needs at least 2 songs in the {name} split, "
                         f"it has {len(songs)}; change pairs.val_fraction or "
                         "pairs.shuffle_targets, or give more songs")


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def run(cfg: Config, run_dir: Path) -> dict:
    """Build and write pairs/train.jsonl, val.jsonl and summary.json; return the summary."""
    from pipeline.config import write_resolved

    run_dir = Path(run_dir)
    pc = cfg.pairs
    check_settings(pc)
    entries = ok_songs(run_dir)
    positions: dict[str, Sequence[int]] = {}
    legacy = []
    for song, entry in entries.items():
        found = song_positions(entry, rf.step_dir(run_dir, rf.CHUNK))
        if found is None:
            legacy.append(song)
        positions[song] = found if found is not None else range(int(entry["chunks"]))
    if legacy:
        log.warning("pairs: %d chunk manifest lines have no positions (written by an older "
                    "chunk step) and are read as contiguous; a silent chunk dropped inside "
                    "them would go unnoticed: re-run the chunk step", len(legacy))
    holes = [s for s, p in positions.items() if p[-1] - p[0] + 1 != len(p)]
    usable = [s for s in positions if position_pairs(positions[s], pc.gap, pc.stride, pc.target)]
    if not usable:
        need = ("a stored chunk at a position that is a multiple of pairs.stride"
                if pc.target == "same" else
                f"two stored chunks {pc.gap + 1} positions apart (pairs.gap={pc.gap})")
        raise PairsError(f"pairs: none of the {len(positions)} ok songs has {need}, which one "
                         "pair needs; lower pairs.gap, pairs.stride or data.chunk_seconds, or "
                         "give longer songs")
    train_songs, val_songs = split_songs(usable, pc.val_fraction, cfg.run.seed)
    rng = np.random.default_rng([cfg.run.seed, 1])
    splits = {name: (songs, build_split(songs, positions, pc.gap, pc.stride,
                                        pc.shuffle_targets, rng, pc.target))
              for name, songs in (("train", train_songs), ("val", val_songs))}
    total_pairs = sum(len(p) for _, p in splits.values())
    for name, (songs, pairs) in splits.items():
        _check_split(name, songs, pairs, len(usable), total_pairs, pc.shuffle_targets)

    out = rf.step_dir(run_dir, rf.PAIRS)
    summary = {"songs": {k: len(s) for k, (s, _) in splits.items()},
               "pairs": {k: len(p) for k, (_, p) in splits.items()},
               "song_ids": {k: s for k, (s, _) in splits.items()},
               "songs_train": len(train_songs), "songs_val": len(val_songs),
               "pairs_train": len(splits["train"][1]), "pairs_val": len(splits["val"][1]),
               "unpaired_songs": sorted(set(positions) - set(usable)),
               "songs_with_holes": len(holes), "songs_without_positions": len(legacy),
               "seed": cfg.run.seed, "target": pc.target, "gap": pc.gap, "stride": pc.stride,
               "val_fraction": pc.val_fraction,
               "mode": ("reconstruction" if pc.target == "same" else
                        "shuffle_targets" if pc.shuffle_targets else "continuation")}
    with step_run(cfg, run_dir, "pairs") as tr:
        for name, (_, pairs) in splits.items():
            atomic_write_text(rf.pairs_file(run_dir, name), _jsonl(pairs))
        atomic_write_json(rf.pairs_summary(run_dir), summary)
        write_resolved(cfg, out)
        tr.log_params({"pairs": vars(pc), "seed": cfg.run.seed})
        tr.log_metrics({"songs_train": len(train_songs), "songs_val": len(val_songs),
                        "pairs_train": summary["pairs_train"],
                        "pairs_val": summary["pairs_val"],
                        "unpaired_songs": len(summary["unpaired_songs"]),
                        "songs_with_holes": len(holes)})
        tr.log_artifact(rf.pairs_summary(run_dir))
    log.info("pairs: %d train pairs (%d songs), %d val pairs (%d songs) -> %s",
             summary["pairs"]["train"], len(train_songs), summary["pairs"]["val"],
             len(val_songs), out)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(load_resolved(args.run_dir), args.run_dir)
    print(json.dumps({k: summary[k] for k in ("songs", "pairs", "mode")}))


if __name__ == "__main__":
    main()
