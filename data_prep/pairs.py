"""Step 2, pairs: an index of [start, continuation] chunk pairs, split into train/val by song.

A pair is (song, input chunk i, target song, target chunk i + 1 + gap); inputs advance by
`stride`. The split is drawn over songs with run.seed, never over pairs, so no song's audio
is on both sides. `shuffle_targets` replaces each target with a random chunk of another song
of the same split (a negative / creative-mode control). Only an index is written; no audio.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.config import load_resolved
from pipeline.schema import Config
from pipeline.tracking import step_run

log = logging.getLogger(__name__)


class PairsError(ValueError):
    """The chunk outputs cannot give the requested pairs."""


def ok_songs(run_dir: Path) -> dict[str, dict]:
    """song_id -> chunk manifest record, for every ok record with chunks (sorted by id)."""
    from data_prep.chunk import collect_manifest

    records = collect_manifest(Path(run_dir))
    if not records:
        raise PairsError(f"no chunk manifests (manifest-*-of-*.jsonl) in {Path(run_dir) / 'chunk'}: "
                         "run the chunk step first")
    songs = {r["song_id"]: r for r in records
             if r.get("status") == "ok" and int(r.get("chunks", 0)) > 0}
    return dict(sorted(songs.items()))


def song_pairs(chunks: int, gap: int, stride: int) -> list[tuple[int, int]]:
    """(input, target) chunk indices of one song with `chunks` chunks."""
    return [(i, i + 1 + gap) for i in range(0, chunks - 1 - gap, stride)]


def split_songs(songs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded song-level split; with two or more songs and val_fraction > 0 each side gets one."""
    order = list(np.random.default_rng(seed).permutation(len(songs)))
    n_val = int(round(val_fraction * len(songs)))
    if val_fraction > 0 and len(songs) >= 2:
        n_val = min(max(n_val, 1), len(songs) - 1)
    val = sorted(songs[i] for i in order[:n_val])
    train = sorted(songs[i] for i in order[n_val:])
    return train, val


def build_split(songs: list[str], chunks: dict[str, int], gap: int, stride: int,
                shuffle: bool, rng: np.random.Generator) -> list[dict]:
    """Pair records of one split; shuffled targets come from another song of the same split."""
    records = []
    for song in songs:
        others = [s for s in songs if s != song]
        for i, j in song_pairs(chunks[song], gap, stride):
            target_song, target = song, j
            if shuffle:
                target_song = others[int(rng.integers(len(others)))]
                target = int(rng.integers(chunks[target_song]))
            records.append({"song": song, "input": i, "target_song": target_song,
                            "target": target})
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
    entries = ok_songs(run_dir)
    chunks = {song: int(e["chunks"]) for song, e in entries.items()}
    usable = [s for s in chunks if song_pairs(chunks[s], pc.gap, pc.stride)]
    if not usable:
        raise PairsError(f"pairs: none of the {len(chunks)} ok songs has {pc.gap + 2} chunks, "
                         f"which one pair needs with pairs.gap={pc.gap}; lower pairs.gap or "
                         "data.chunk_seconds, or give longer songs")
    train_songs, val_songs = split_songs(usable, pc.val_fraction, cfg.run.seed)
    rng = np.random.default_rng([cfg.run.seed, 1])
    splits = {"train": (train_songs, build_split(train_songs, chunks, pc.gap, pc.stride,
                                                 pc.shuffle_targets, rng)),
              "val": (val_songs, build_split(val_songs, chunks, pc.gap, pc.stride,
                                             pc.shuffle_targets, rng))}
    total_pairs = sum(len(p) for _, p in splits.values())
    for name, (songs, pairs) in splits.items():
        _check_split(name, songs, pairs, len(usable), total_pairs, pc.shuffle_targets)

    out = run_dir / "pairs"
    summary = {"songs": {k: len(s) for k, (s, _) in splits.items()},
               "pairs": {k: len(p) for k, (_, p) in splits.items()},
               "song_ids": {k: s for k, (s, _) in splits.items()},
               "songs_train": len(train_songs), "songs_val": len(val_songs),
               "pairs_train": len(splits["train"][1]), "pairs_val": len(splits["val"][1]),
               "unpaired_songs": sorted(set(chunks) - set(usable)),
               "seed": cfg.run.seed, "gap": pc.gap, "stride": pc.stride,
               "val_fraction": pc.val_fraction,
               "mode": "shuffle_targets" if pc.shuffle_targets else "continuation"}
    with step_run(cfg, run_dir, "pairs") as tr:
        for name, (_, pairs) in splits.items():
            atomic_write_text(out / f"{name}.jsonl", _jsonl(pairs))
        atomic_write_json(out / "summary.json", summary)
        write_resolved(cfg, out)
        tr.log_params({"pairs": vars(pc), "seed": cfg.run.seed})
        tr.log_metrics({"songs_train": len(train_songs), "songs_val": len(val_songs),
                        "pairs_train": summary["pairs_train"],
                        "pairs_val": summary["pairs_val"],
                        "unpaired_songs": len(summary["unpaired_songs"])})
        tr.log_artifact(out / "summary.json")
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
