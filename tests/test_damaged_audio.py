"""Damaged mp3s made the way a user's look (LAME through ffmpeg, then garbage, zeros or
flipped bytes) are recovered to nearly what ffmpeg alone decodes, and the song is kept.

`python -m tests.test_damaged_audio` prints the recovery of a wider matrix (several seeds)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from data_prep.chunk import ChunkSpec, process_file
from data_prep.corpus import song
from data_prep.decode import DecodeError, iter_blocks, probe
from pipeline.chunk_manifest import count_records, format_summary

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (LAME)")

SECONDS = 10.0
# chunk as `make prepare` does, at a smaller scale: 4 s chunks, silence rule on
SPEC = ChunkSpec(24000, 1, 4 * 24000, "drop", 1.0, -60.0, 0, "float32", 30.0, "test")


class Encoding(NamedTuple):
    kbps: int
    rate: int
    channels: int

    def name(self) -> str:
        return f"{self.kbps}k-{self.rate // 1000}k-{'stereo' if self.channels == 2 else 'mono'}"


class Damage(NamedTuple):
    kind: str        # "garbage" (random bytes), "zeros", or "flips" (single bytes inverted)
    where: float     # share of the file where it starts
    size: int        # bytes replaced (flips: how many bytes)

    def name(self) -> str:
        size = f"{self.size} bytes" if self.kind == "flips" else f"{self.size // 1000} kB"
        return f"{self.kind} {size} at {self.where:.0%}"


ENCODINGS = [Encoding(128, 44100, 1), Encoding(192, 48000, 2), Encoding(320, 44100, 2),
             Encoding(256, 48000, 1)]
DAMAGES = [Damage("garbage", 0.05, 1_000), Damage("garbage", 0.05, 40_000),
           Damage("garbage", 0.40, 10_000), Damage("garbage", 0.40, 40_000),
           Damage("garbage", 0.90, 4_000), Damage("zeros", 0.40, 8_000),
           Damage("flips", 0.30, 6)]


def encode(enc: Encoding, path: Path, quiet_s: float = 0.0) -> Path:
    """An mp3 of a synthetic song written by ffmpeg's LAME encoder, as a user's would be;
    its first quiet_s seconds 60 dB down (a quiet intro)."""
    audio = song(5, 0, SECONDS, enc.rate)
    audio = audio.mean(axis=0, keepdims=True) if enc.channels == 1 else audio
    audio[:, :int(quiet_s * enc.rate)] *= 0.001
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "f32le", "-ar", str(enc.rate),
                    "-ac", str(enc.channels), "-i", "-", "-c:a", "libmp3lame",
                    "-b:a", f"{enc.kbps}k", str(path)],
                   input=np.ascontiguousarray(audio.T, dtype="<f4").tobytes(), check=True)
    return path


def damage(data: bytes, dmg: Damage, seed: int) -> bytes:
    """`data` with dmg.size bytes from dmg.where on replaced (cut at the file's end)."""
    out = bytearray(data)
    start = int(dmg.where * len(data))
    rng = np.random.default_rng(seed)
    if dmg.kind == "flips":
        for pos in rng.choice(np.arange(start, len(data)), dmg.size, replace=False):
            out[pos] ^= 0xFF
        return bytes(out)
    size = min(dmg.size, len(data) - start)
    out[start:start + size] = rng.bytes(size) if dmg.kind == "garbage" else bytes(size)
    return bytes(out)


def ffmpeg_seconds(path: Path) -> float:
    """Seconds `ffmpeg -i path` decodes on its own (to mono 24 kHz, like the chunk step)."""
    raw = subprocess.run(["ffmpeg", "-v", "quiet", "-nostdin", "-i", str(path), "-f", "f32le",
                          "-ac", "1", "-ar", "24000", "-"], capture_output=True).stdout
    return len(raw) / 4 / 24000


def libsndfile_alone(path: Path) -> str:
    """What libsndfile decodes without the recovery: seconds, or "error at N s"."""
    seconds = 0.0
    try:
        for block in iter_blocks(path, 24000, 1, 1.0):
            seconds += block.shape[1] / 24000
    except DecodeError:
        return f"error at {seconds:.1f} s"
    return f"{seconds:.2f} s"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[Encoding, bytes]:
    """Each encoding's clean mp3 bytes, made once for the module."""
    folder = tmp_path_factory.mktemp("clean")
    return {enc: encode(enc, folder / f"{enc.name()}.mp3").read_bytes() for enc in ENCODINGS}


@pytest.mark.parametrize("dmg", DAMAGES, ids=Damage.name)
@pytest.mark.parametrize("enc", ENCODINGS, ids=Encoding.name)
def test_a_damaged_mp3_keeps_what_ffmpeg_alone_decodes(clean, tmp_path, enc, dmg):
    path = tmp_path / "damaged.mp3"
    path.write_bytes(damage(clean[enc], dmg, seed=ENCODINGS.index(enc)))
    rec, _ = process_file((path, path.name, SPEC, tmp_path, None))
    ffmpeg_s = ffmpeg_seconds(path)
    assert rec["status"] == "ok", rec["reason"]
    assert 0.9 * ffmpeg_s <= rec["duration_s"] <= ffmpeg_s + 0.05     # nothing doubled
    assert rec["chunks"] == len(rec["positions"]) >= 1
    if rec["duration_s"] < probe(path).duration_s - 0.5:              # lost audio is told
        assert rec["recovered"]["lost_s"] > 0 and rec["reason"].startswith("recovered: ")


# 10 kB of garbage at 40% of a 192 kbit/s file (seed 2): libsndfile stops there without an
# error, after less than one 4 s chunk (checked, so the case cannot quietly become another)
CLEAN_STOP = (Encoding(192, 48000, 2), Damage("garbage", 0.40, 10_000), 2)


def clean_stop_file(folder: Path, quiet_s: float = 0.0) -> Path:
    """The CLEAN_STOP damage on a fresh encoding (with a quiet intro of quiet_s seconds)."""
    enc, dmg, seed = CLEAN_STOP
    path = folder / "clean-stop.mp3"
    path.write_bytes(damage(encode(enc, folder / "clean.mp3", quiet_s).read_bytes(), dmg, seed))
    (folder / "clean.mp3").unlink()
    alone = libsndfile_alone(path)
    assert not alone.startswith("error") and float(alone.split()[0]) < 4.0, alone
    return path


def test_a_clean_stop_short_of_one_chunk_is_recovered_not_called_too_short(tmp_path):
    path = clean_stop_file(tmp_path)
    rec, _ = process_file((path, path.name, SPEC, tmp_path, None))
    assert rec["status"] == "ok", rec["reason"]
    assert rec["duration_s"] >= 0.9 * ffmpeg_seconds(path) and rec["chunks"] == 2
    assert rec["recovered"]["decoder"] == "ffmpeg"
    assert rec["recovered"]["at_s"] == pytest.approx(0.4 * SECONDS, abs=0.5)
    assert rec["recovered"]["lost_s"] == pytest.approx(SECONDS - rec["duration_s"], abs=0.05)
    assert "libsndfile ended 6.0 s before its header's length" in rec["reason"]


def test_a_clean_stop_in_a_quiet_intro_is_recovered_not_called_silent(tmp_path):
    path = clean_stop_file(tmp_path, quiet_s=4.5)         # libsndfile: only the quiet part
    spec = replace(SPEC, chunk_samples=24000, silence_db=-40.0)
    rec, _ = process_file((path, path.name, spec, tmp_path, None))
    assert rec["status"] == "ok", rec["reason"]
    assert rec["recovered"]["decoder"] == "ffmpeg"
    assert min(rec["positions"]) >= 4 and rec["chunks"] >= 4     # the loud part, after 4.5 s


def test_without_ffmpeg_a_clean_stop_keeps_libsndfiles_part_and_says_so(tmp_path,
                                                                        monkeypatch):
    path = clean_stop_file(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-ffmpeg-here"))
    rec, _ = process_file((path, path.name, replace(SPEC, chunk_samples=24000), tmp_path, None))
    assert rec["status"] == "ok" and rec["chunks"] == 3, rec["reason"]
    assert rec["recovered"] == {"lost_s": pytest.approx(6.0, abs=0.1),
                                "at_s": pytest.approx(4.0, abs=0.1), "decoder": "libsndfile"}
    assert "ffmpeg is not installed" in rec["reason"]


def test_the_summary_lists_recovered_songs_and_the_audio_lost_in_all(clean, tmp_path):
    enc = ENCODINGS[1]
    records = []
    for i, dmg in enumerate([DAMAGES[2], DAMAGES[3]]):
        path = tmp_path / f"song{i}.mp3"
        path.write_bytes(damage(clean[enc], dmg, seed=1))
        records.append(process_file((path, path.name, SPEC, tmp_path, None))[0])
    (tmp_path / "fine.mp3").write_bytes(clean[enc])
    records.append(process_file((tmp_path / "fine.mp3", "fine.mp3", SPEC, tmp_path, None))[0])
    summary = count_records(records)
    lost = [r["recovered"]["lost_s"] for r in records[:2]]
    assert summary["recovered"] == 2 and summary["ok"] == 3 and "recovered" not in records[2]
    assert summary["lost_s"] == pytest.approx(sum(lost), abs=0.01) and min(lost) > 0
    text = format_summary(summary)
    assert f"recovered: 2 ({summary['lost_s']:.1f} s lost)" in text
    for rec in records[:2]:
        assert f"recovered: {rec['source']}: {rec['recovered']['lost_s']:.1f} s lost" in text


def measure(seeds: range = range(4)) -> None:
    """Print each (encoding, damage, seed): libsndfile alone, the chunk step, ffmpeg alone."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clean_bytes = {enc: encode(enc, folder / f"{enc.name()}.mp3").read_bytes()
                       for enc in ENCODINGS}
        print("encoding          damage                seed  libsndfile alone    chunk step"
              "   ffmpeg    kept/ffmpeg  status")
        worst = 1.0
        for enc in ENCODINGS:
            for dmg in DAMAGES:
                for seed in seeds:
                    path = folder / "damaged.mp3"
                    path.write_bytes(damage(clean_bytes[enc], dmg, seed))
                    alone = libsndfile_alone(path)
                    rec, _ = process_file((path, path.name, SPEC, folder, None))
                    ffmpeg_s = ffmpeg_seconds(path)
                    kept = rec["duration_s"] if rec["status"] == "ok" else 0.0
                    worst = min(worst, kept / ffmpeg_s)
                    print(f"{enc.name():17} {dmg.name():21} {seed:4}  {alone:18} "
                          f"{kept:8.2f} s {ffmpeg_s:6.2f} s  {kept / ffmpeg_s:9.1%}    "
                          f"{rec['status']}", flush=True)
        print(f"worst kept/ffmpeg: {worst:.1%}")


if __name__ == "__main__":
    measure(range(int(sys.argv[1]) if len(sys.argv) > 1 else 4))
