"""The chunk step's manifest: its records (one line per source file, over every shard)
and their summary. The chunk step writes them; pairs, `make prepare` and `make status`
read them through here."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import run_folder as rf


def chunk_dir(run_dir: Path) -> Path:
    return rf.step_dir(run_dir, rf.CHUNK)


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a manifest or journal; a half-written last line (killed run) is ignored."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def previous_records(run_dir: Path) -> dict[str, dict]:
    """Every earlier record by source path, from finished manifests and killed runs' journals."""
    folder = chunk_dir(run_dir)
    found: dict[str, dict] = {}
    paths = [p for pattern in rf.CHUNK_RECORD_GLOBS for p in folder.glob(pattern)]
    for path in sorted(paths, key=lambda p: p.stat().st_mtime):
        for rec in _read_jsonl(path):
            found[rec.get("source", "")] = rec
    return found


def latest_manifests(run_dir: Path) -> list[Path]:
    """Manifests of the latest sharding (the n of the newest manifest); others are stale."""
    manifests = [p for p in chunk_dir(run_dir).glob(rf.CHUNK_MANIFEST_GLOB)
                 if rf.CHUNK_MANIFEST_RE.search(p.name)]
    if not manifests:
        return []
    n = rf.CHUNK_MANIFEST_RE.search(max(manifests, key=lambda p: p.stat().st_mtime).name).group(2)
    return sorted(p for p in manifests if rf.CHUNK_MANIFEST_RE.search(p.name).group(2) == n)


def collect_manifest(run_dir: Path) -> list[dict]:
    """All records of the latest chunk run over all its shards, sorted by source."""
    records: dict[str, dict] = {}
    for path in latest_manifests(run_dir):
        for rec in _read_jsonl(path):
            records[rec["source"]] = rec
    return [records[k] for k in sorted(records)]


def reason_kind(reason: str) -> str:
    """The fixed part of a reason ("too short", "not audio", ...) for counting."""
    return reason.split(":", 1)[0].split("(", 1)[0].strip() or "unknown"


def count_records(records: list[dict]) -> dict:
    """Files ok/skipped/failed, reasons, hours of audio and chunks of a list of records."""
    out = {"files": len(records), "ok": 0, "skipped": 0, "failed": 0, "recovered": 0,
           "lost_s": 0.0, "lost_unmeasured": 0, "chunks": 0, "audio_hours": 0.0,
           "reasons": {}, "problems": []}
    for rec in records:
        out[rec["status"]] += 1
        if rec["status"] == "ok":
            out["chunks"] += rec["chunks"]
            out["audio_hours"] += rec["duration_s"] / 3600
            if rec.get("recovered"):   # usable, but part of it was lost: the user should know
                lost = rec["recovered"].get("lost_s")
                out["recovered"] += 1
                out["lost_s"] += lost or 0.0
                out["lost_unmeasured"] += lost is None
                out["problems"].append({"source": rec["source"], "status": "recovered",
                                        "reason": rec["reason"], "lost_s": lost})
        else:
            kind = f"{rec['status']}: {reason_kind(rec['reason'])}"
            out["reasons"][kind] = out["reasons"].get(kind, 0) + 1
            out["problems"].append({k: rec[k] for k in ("source", "status", "reason")})
    out["audio_hours"] = round(out["audio_hours"], 6)
    out["lost_s"] = round(out["lost_s"], 2)
    return out


def summarize(run_dir: Path) -> dict:
    """Totals over all shards of the latest chunk run (see collect_manifest)."""
    shards = [rf.summary_for_manifest(p) for p in latest_manifests(run_dir)]
    return {**count_records(collect_manifest(run_dir)), "shard_summaries": shards}


def format_summary(summary: dict) -> str:
    """A few human lines: counts, hours, chunks, audio lost in recovered songs, and each
    problem file with its reason (a recovered one: the seconds lost and where)."""
    lost = f"{summary.get('lost_s', 0.0):.1f} s lost"
    if summary.get("lost_unmeasured"):
        lost += f", {summary['lost_unmeasured']} not measured"
    lines = [f"files: {summary['files']}  ok: {summary['ok']}  skipped: {summary['skipped']}  "
             f"failed: {summary['failed']}  recovered: {summary.get('recovered', 0)} ({lost})  "
             f"audio: {summary['audio_hours']:.3f} h  "
             f"chunks: {summary['chunks']}"]
    lines += [f"  {p['status']}: {p['source']}: {p['reason'].removeprefix('recovered: ')}"
              for p in summary["problems"]]
    return "\n".join(lines)
