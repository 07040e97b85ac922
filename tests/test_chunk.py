"""Step 1, chunk: counts, rates, bad files, atomic writes, re-runs and shards, on real files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.chunk import ChunkSpec, list_sources, pool_results, run_shard, shard_files
from pipeline.chunk_manifest import collect_manifest, summarize
from data_prep import chunk
from pipeline.config import write_resolved
from tests.fixtures.config import make_cfg

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(tmp_path: Path, mlflow_uri: str, *overrides: str):
    """Demo config with 2 s chunks, both workers, and the session's MLflow store."""
    return make_cfg(tmp_path, f"mlflow.tracking_uri={mlflow_uri}", "data.chunk_seconds=2.0",
                    "data.workers=2", *overrides)


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.root) / cfg.run.name


def tone(seconds: float, sr: int = 24000, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * 220 * np.arange(int(seconds * sr)) / sr)


@pytest.fixture
def music(tmp_path, demo_corpus) -> Path:
    """The demo corpus plus the files a real folder has: broken, empty, text, too short."""
    folder = tmp_path / "music"
    shutil.copytree(demo_corpus, folder)
    good = sorted(demo_corpus.rglob("*.mp3"))[2].read_bytes()
    rng = np.random.default_rng(1)
    (folder / "broken.mp3").write_bytes(good[:300] + rng.bytes(len(good) - 300))
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "notes.MP3").write_text("shopping list\n" * 30)
    sf.write(folder / "blip.mp3", tone(0.3, 44100), 44100, format="MP3")
    (folder / "cover.jpg").write_bytes(b"\xff\xd8 not considered")
    return folder


def by_name(records: list[dict]) -> dict[str, dict]:
    return {Path(r["source"]).name: r for r in records}


@pytest.mark.parametrize("sr", [24000, 12000])
@pytest.mark.parametrize("channels", [1, 2])
def test_chunk_counts_and_rates(tmp_path, demo_corpus, shared_mlflow_uri, sr, channels):
    cfg = cfg_for(tmp_path, shared_mlflow_uri, f"data.sample_rate={sr}", f"data.channels={channels}")
    summary = run_shard(cfg, run_dir_of(cfg), source=demo_corpus)
    assert summary["ok"] == 4 and summary["chunks"] == 4 * 3      # 6 s songs, 2 s chunks
    chunk = run_dir_of(cfg) / "chunk"
    seen = set()
    for rec in collect_manifest(run_dir_of(cfg)):
        arr = np.load(chunk / rec["array"], mmap_mode="r")
        assert arr.shape == (3, channels, 2 * sr) and arr.dtype == np.float32
        assert rec["duration_s"] == pytest.approx(6.0, abs=0.01)
        assert np.abs(arr).max() > 0.1
        seen.add((rec["sample_rate"], rec["channels"]))
    assert seen == {(44100, 1), (44100, 2), (48000, 1), (48000, 2)}
    assert (chunk / "config.resolved.yaml").is_file()


def test_bad_files_are_reported_and_the_rest_is_written(tmp_path, music, shared_mlflow_uri):
    cfg = cfg_for(tmp_path, shared_mlflow_uri)
    summary = run_shard(cfg, run_dir_of(cfg), source=music)
    recs = by_name(collect_manifest(run_dir_of(cfg)))
    assert "cover.jpg" not in recs and len(recs) == 8
    assert recs["broken.mp3"]["status"] == "failed"
    assert recs["broken.mp3"]["reason"].startswith("decode error")
    status = {name: (r["status"], r["reason"]) for name, r in recs.items()}
    assert status["empty.mp3"] == ("skipped", "empty file (0 bytes)")
    assert status["notes.MP3"][0] == "skipped" and status["notes.MP3"][1].startswith("not audio")
    assert status["blip.mp3"][0] == "skipped" and status["blip.mp3"][1].startswith("too short")
    assert summary["ok"] == 4 and summary["skipped"] == 3 and summary["failed"] == 1
    assert summary["reasons"] == {"failed: decode error": 1, "skipped: empty file": 1,
                                  "skipped: not audio": 1, "skipped: too short": 1}
    songs = sorted((run_dir_of(cfg) / "chunk" / "songs").iterdir())
    assert len(songs) == 4 and all(np.load(p).shape == (3, 1, 48000) for p in songs)
    assert summarize(run_dir_of(cfg))["failed"] == 1


def test_a_dangling_symlink_gets_a_manifest_line_with_its_reason(tmp_path, music,
                                                                 shared_mlflow_uri):
    (music / "gone.mp3").symlink_to(tmp_path / "deleted" / "song.mp3")
    cfg = cfg_for(tmp_path, shared_mlflow_uri)
    summary = run_shard(cfg, run_dir_of(cfg), source=music)
    recs = by_name(collect_manifest(run_dir_of(cfg)))
    assert recs["gone.mp3"]["status"] == "skipped"
    assert recs["gone.mp3"]["reason"] == f"dangling symlink to {tmp_path / 'deleted' / 'song.mp3'}"
    assert summary["ok"] == 4 and summary["skipped"] == 4     # the rest goes on as before


def test_tail_silence_cap_and_int16(tmp_path, shared_mlflow_uri):
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "five.wav", tone(5.0), 24000)                                  # 2.5 chunks
    sf.write(src / "half quiet.flac", np.concatenate([tone(4.0), np.zeros(4 * 24000)]), 24000)
    sf.write(src / "silence.wav", np.zeros(6 * 24000), 24000)

    def chunks(*overrides: str) -> dict[str, dict]:
        cfg = cfg_for(tmp_path / "_".join(overrides).replace("=", "-"), shared_mlflow_uri,
                      *overrides)
        run_shard(cfg, run_dir_of(cfg), source=src)
        return {k: (v, run_dir_of(cfg) / "chunk" / v["array"])
                for k, v in by_name(collect_manifest(run_dir_of(cfg))).items()}

    drop = chunks("data.tail=drop")
    assert drop["five.wav"][0]["chunks"] == 2 and drop["half quiet.flac"][0]["chunks"] == 2
    assert drop["silence.wav"][0]["status"] == "skipped"
    assert drop["silence.wav"][0]["reason"].startswith("silent")
    pad = chunks("data.tail=pad", "data.silence_db=null", "data.dtype=int16")
    five = np.load(pad["five.wav"][1])
    assert five.shape == (3, 1, 48000) and five.dtype == np.int16
    assert np.all(five[2, :, 24000:] == 0) and np.abs(five[2, :, :24000]).max() > 10000
    assert pad["half quiet.flac"][0]["chunks"] == 4 and pad["silence.wav"][0]["chunks"] == 3
    capped = chunks("data.max_chunks_per_song=1")
    assert np.load(capped["five.wav"][1]).shape[0] == 1


def test_rerun_skips_unchanged_files_and_redoes_changed_ones(tmp_path, music, shared_mlflow_uri):
    cfg = cfg_for(tmp_path, shared_mlflow_uri)
    run_dir = run_dir_of(cfg)
    first = run_shard(cfg, run_dir, source=music)
    assert first["reused"] == 0
    songs = run_dir / "chunk" / "songs"
    stamps = {p.name: p.stat().st_mtime_ns for p in songs.iterdir()}
    again = run_shard(cfg, run_dir, source=music)
    assert again["reused"] == first["ok"] + first["skipped"]            # failed ones are retried
    assert {p.name: p.stat().st_mtime_ns for p in songs.iterdir()} == stamps
    assert collect_manifest(run_dir) == sorted(collect_manifest(run_dir), key=lambda r: r["source"])

    changed = sorted(music.rglob("0*.mp3"))[0]
    sf.write(changed, tone(4.0, 44100), 44100, format="MP3")           # new content, same name
    third = run_shard(cfg, run_dir, source=music)
    assert third["reused"] == again["reused"] - 1
    rec = by_name(collect_manifest(run_dir))[changed.name]
    assert rec["chunks"] == 2 and (run_dir / "chunk" / rec["array"]).is_file()

    other = cfg_for(tmp_path, shared_mlflow_uri, "data.sample_rate=12000")
    assert run_shard(other, run_dir, source=music)["reused"] == 0      # settings changed


def test_shards_partition_the_files(tmp_path, music, shared_mlflow_uri):
    files = list_sources(music)
    parts = [shard_files(files, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(files)
    assert sum(len(p) for p in parts) == len(set(files)) == 8
    with pytest.raises(ValueError, match="shard 3"):
        shard_files(files, 3, 3)

    cfg = cfg_for(tmp_path, shared_mlflow_uri)
    run_dir = run_dir_of(cfg)
    summaries = [run_shard(cfg, run_dir, i, 3, source=music) for i in range(3)]
    chunk = run_dir / "chunk"
    per_shard = [[json.loads(line)["source"] for line in
                  (chunk / f"manifest-{i}-of-3.jsonl").read_text().splitlines()] for i in range(3)]
    assert all(set(a).isdisjoint(b) for i, a in enumerate(per_shard) for b in per_shard[i + 1:])
    assert sorted(sum(per_shard, [])) == sorted(str(p.resolve()) for p in files)
    total = summarize(run_dir)
    assert total["files"] == 8 and total["ok"] == sum(s["ok"] for s in summaries) == 4
    assert total["chunks"] == 12 and len(total["shard_summaries"]) == 3
    ids = [r["song_id"] for r in collect_manifest(run_dir) if r["status"] == "ok"]
    assert len(set(ids)) == 4

    time.sleep(0.01)  # resharding: the newest sharding wins, and finished files are reused
    whole = run_shard(cfg, run_dir, 0, 1, source=music)
    assert whole["reused"] == sum(s["ok"] + s["skipped"] for s in summaries)
    assert summarize(run_dir)["shard_summaries"] == ["summary-0-of-1.json"]
    assert len(collect_manifest(run_dir)) == 8


def test_unicode_and_space_names(tmp_path, shared_mlflow_uri):
    src = tmp_path / "Mÿ Müsic" / "日本 の 歌"
    src.mkdir(parents=True)
    sf.write(src / "Ça va – « olé ».WAV", tone(4.0), 24000)
    sf.write(src / "два слова.Flac", tone(2.5), 24000)
    cfg = cfg_for(tmp_path, shared_mlflow_uri)
    summary = run_shard(cfg, run_dir_of(cfg), source=tmp_path / "Mÿ Müsic")
    assert summary["ok"] == 2 and summary["chunks"] == 3
    for rec in collect_manifest(run_dir_of(cfg)):
        assert Path(rec["source"]).is_file() and rec["song_id"].isascii()


@pytest.mark.integration
def test_killed_run_leaves_no_array_a_rerun_trusts(tmp_path, shared_mlflow_uri):
    """SIGKILL the CLI mid-write; the re-run (CLI again) finishes the song, records a broken
    file, and still exits 0."""
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "long.wav", np.tile(tone(1.0, 44100), 240), 44100)  # 4 min: time to kill it
    (src / "zz broken.mp3").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(5000))
    cfg = cfg_for(tmp_path, shared_mlflow_uri, "data.workers=1")
    run_dir = run_dir_of(cfg)
    write_resolved(cfg, run_dir)
    cmd = [sys.executable, "-m", "data_prep.chunk", "--run-dir", str(run_dir), "--shard", "0",
           "--num-shards", "1", "--source", str(src)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    songs = run_dir / "chunk" / "songs"
    deadline = time.time() + 60
    while not list(songs.glob(".*.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(songs.glob(".*.tmp-*")), "the run ended before it could be killed mid-write"
    assert not list(songs.glob("*.npy"))                   # no final array, only the temp file
    assert not (run_dir / "chunk" / "manifest-0-of-1.jsonl").exists()

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "chunk 0-of-1" in done.stderr and "h audio" in done.stderr      # the progress bar
    assert "files: 2  ok: 1  skipped: 0  failed: 1" in done.stdout
    summary = json.loads((run_dir / "chunk" / "summary-0-of-1.json").read_text())
    assert summary["ok"] == 1 and summary["reused"] == 0 and summary["chunks"] == 120
    assert not list(songs.glob(".*.tmp-*"))               # the leftover was cleaned up
    assert np.load(next(songs.glob("*.npy")), mmap_mode="r").shape == (120, 1, 48000)


@pytest.mark.integration
def test_job_array_shards_started_together(tmp_path):
    """Two CLI shards at once on a fresh run: one corpus, one MLflow store, all files chunked."""
    cfg = make_cfg(tmp_path, "data.demo_songs=3", "data.demo_seconds=2.0",
                   "data.chunk_seconds=1.0", "data.workers=1")
    run_dir = run_dir_of(cfg)
    write_resolved(cfg, run_dir)
    procs = [subprocess.Popen([sys.executable, "-m", "data_prep.chunk", "--run-dir", str(run_dir),
                               "--shard", str(i), "--num-shards", "2"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert len(list((run_dir / "corpus").rglob("*.mp3"))) == 3
    total = summarize(run_dir)
    assert total["ok"] == 3 and total["chunks"] == 6 and len(total["shard_summaries"]) == 2
    parents = {json.loads((run_dir / "chunk" / f"shard-{i}-of-2" / "mlflow_run.json").read_text())
               ["parent"] for i in range(2)}
    assert parents == {json.loads((run_dir / "mlflow_parent.json").read_text())["run_id"]}


def die_on_b(job: tuple) -> tuple[dict, bool]:
    """A job function whose process really dies (SIGKILL) on the file named b.mp3."""
    if Path(job[0]).name == "b.mp3":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return {"source": str(job[0]), "status": "ok"}, False


def test_a_worker_that_dies_is_recorded_and_the_rest_goes_on(tmp_path, shared_mlflow_uri):
    spec = ChunkSpec.from_cfg(cfg_for(tmp_path, shared_mlflow_uri))
    jobs = [(tmp_path / f"{name}.mp3", f"{name}.mp3", spec, tmp_path, None) for name in "abcdef"]
    results = [rec for rec, _ in pool_results(jobs, 2, die_on_b)]
    assert sorted(Path(r["source"]).name for r in results) == [f"{n}.mp3" for n in "abcdef"]
    dead = [r for r in results if r["status"] != "ok"]
    assert len(dead) == 1 and Path(dead[0]["source"]).name == "b.mp3"
    assert dead[0]["status"] == "failed" and "process died" in dead[0]["reason"]


@pytest.mark.integration
def test_cli_without_a_resolved_config_fails_clearly(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "data_prep.chunk", "--run-dir",
                              str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "config.resolved.yaml" in missing.stderr


def test_positions_record_where_each_kept_chunk_sat_in_the_song(tmp_path, shared_mlflow_uri):
    """A silent chunk dropped in the middle leaves a hole that the manifest records."""
    src = tmp_path / "src"
    src.mkdir()
    quiet = np.zeros(2 * 24000)
    sf.write(src / "holes.wav", np.concatenate([tone(2.0), quiet, tone(4.0), quiet, tone(2.0)]),
             24000)                                          # chunks 1 and 4 are silent
    sf.write(src / "silence.wav", np.zeros(4 * 24000), 24000)

    def records(*overrides: str) -> dict[str, dict]:
        cfg = cfg_for(tmp_path / "_".join(overrides).replace("=", "-"), shared_mlflow_uri,
                      *overrides)
        run_shard(cfg, run_dir_of(cfg), source=src)
        return by_name(collect_manifest(run_dir_of(cfg)))

    dropped = records()
    assert dropped["holes.wav"]["chunks"] == 4 and dropped["holes.wav"]["positions"] == [0, 2, 3, 5]
    assert dropped["silence.wav"]["status"] == "skipped"
    assert dropped["silence.wav"]["positions"] == []
    kept = records("data.silence_db=null")
    assert kept["holes.wav"]["positions"] == list(range(6))
    capped = records("data.max_chunks_per_song=2")
    assert capped["holes.wav"]["positions"] == [0, 2]


def test_a_record_without_positions_is_chunked_again(tmp_path, shared_mlflow_uri):
    """Manifests written before positions existed are not reused: the re-run adds them."""
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "a.wav", tone(4.0), 24000)
    cfg = cfg_for(tmp_path, shared_mlflow_uri)
    run_dir = run_dir_of(cfg)
    run_shard(cfg, run_dir, source=src)
    manifest = run_dir / "chunk" / "manifest-0-of-1.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k != "positions"}
           for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in old))
    again = run_shard(cfg, run_dir, source=src)
    assert again["reused"] == 0
    assert collect_manifest(run_dir)[0]["positions"] == [0, 1]


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB file system (tmpfs), so a full disk is a real ENOSPC; needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_shard_and_a_rerun_redoes_the_files(small_disk, tmp_path,
                                                                   demo_corpus, shared_mlflow_uri):
    music_ok = tmp_path / "only_music"
    music_ok.mkdir()
    for song in sorted(demo_corpus.rglob("*.mp3"))[:5]:
        shutil.copy(song, music_ok / song.name)
    cfg = make_cfg(small_disk, f"mlflow.tracking_uri={shared_mlflow_uri}",
                   "data.chunk_seconds=2.0", "data.workers=2")
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024))       # leaves room for a song or two
    with pytest.raises(chunk.EnvironmentFault, match=r"errno 28.*the machine, not the file"):
        run_shard(cfg, run_dir_of(cfg), source=music_ok)
    out = run_dir_of(cfg) / "chunk"
    assert not (out / "manifest-0-of-1.jsonl").exists()   # nothing claims to be complete
    filler.unlink()                                        # space freed: the same command
    summary = run_shard(cfg, run_dir_of(cfg), source=music_ok)
    files = len(list(music_ok.iterdir()))
    assert summary["ok"] == files and summary["failed"] == 0, summary["problems"]


def test_a_shard_with_an_implausible_share_of_failures_fails(tmp_path, shared_mlflow_uri):
    folder = tmp_path / "mostly_broken"
    folder.mkdir()
    sf.write(folder / "good.wav", tone(5.0), 24000)
    for i in range(3):
        (folder / f"bad{i}.mp3").write_bytes(b"ID3" + bytes(range(256)) * 40)
    cfg = cfg_for(tmp_path, shared_mlflow_uri)
    with pytest.raises(chunk.TooManyFailures, match=r"3 of 4 files failed.*max_failed_share"):
        run_shard(cfg, run_dir_of(cfg), source=folder)
    assert len(collect_manifest(run_dir_of(cfg))) == 4      # the records are kept
    relaxed = cfg_for(tmp_path, shared_mlflow_uri, "data.max_failed_share=1.0")
    assert run_shard(relaxed, run_dir_of(relaxed), source=folder)["failed"] == 3


def test_unreadable_files_and_folders_as_a_non_root_user(request, demo_corpus, tiny_cfg):
    """As an ordinary user (tests run as root here, so a forked child drops to `nobody`
    before it lists and chunks): a file and a folder it may not read get manifest lines
    saying so, and the rest is chunked."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    import pwd
    nobody = pwd.getpwnam("nobody")
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="as_nobody_"))   # pytest's tmp is root's alone
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    music = base / "music"
    shutil.copytree(demo_corpus, music)
    songs = sorted(music.rglob("*.mp3"))[:4]
    for extra in sorted(music.rglob("*.mp3"))[4:]:
        extra.unlink()
    (music / "private").mkdir()
    shutil.move(str(songs[1]), music / "private" / songs[1].name)
    out = base / "songs"
    out.mkdir()
    for path in [base, *base.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    songs[0].chmod(0o000)                          # a file it may not read
    (music / "private").chmod(0o000)               # a folder it may not enter
    base.chmod(0o755)
    spec = chunk.ChunkSpec.from_cfg(tiny_cfg)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: an ordinary user from here
        try:
            os.close(read)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            records = [chunk.process_file((p, p.name, spec, out, None))[0]
                       for p in chunk.list_sources(music)]
            records += chunk.folder_records(music, spec)
            os.write(write, json.dumps(records).encode())
        except BaseException as exc:                 # say why, in the parent's failure
            os.write(write, json.dumps({"child failed": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        records = json.loads(fh.read())
    os.waitpid(pid, 0)
    assert isinstance(records, list), records
    by_source = {Path(r["source"]).name: r for r in records}
    assert by_source[songs[0].name]["status"] == "failed"
    assert by_source[songs[0].name]["reason"].startswith("unreadable: [Errno 13] Permission denied")
    assert by_source["private"]["status"] == "skipped"
    assert by_source["private"]["reason"] == "unreadable folder: Permission denied"
    assert [r["status"] for n, r in sorted(by_source.items())
            if n not in (songs[0].name, "private")] == ["ok", "ok"]
