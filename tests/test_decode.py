"""Block decoding, resampling and channel handling on real files."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.chunk import ChunkSpec, process_file
from data_prep.corpus import encode_mp3, song
from data_prep.decode import DecodeError, NotAudioError, decode_recovering, iter_blocks, probe


def decode_all(path: Path, sr: int, channels: int, block_seconds: float = 1.0) -> np.ndarray:
    blocks = list(iter_blocks(path, sr, channels, block_seconds))
    assert all(b.dtype == np.float32 and b.shape[0] == channels for b in blocks)
    assert len(blocks) > 1                                    # really read in blocks
    return np.concatenate(blocks, axis=1)


@pytest.mark.parametrize("target", [24000, 12000])
@pytest.mark.parametrize("channels", [1, 2])
def test_corpus_files_decode_to_target_rate_and_channels(demo_corpus, target, channels):
    for path in sorted(demo_corpus.rglob("*.mp3")):
        info = probe(path)
        assert info.sample_rate in (44100, 48000) and info.backend == "soundfile"
        audio = decode_all(path, target, channels)
        assert audio.shape == (channels, int(info.duration_s * target))
        assert np.abs(audio).max() > 0.1


def test_resampler_keeps_the_pitch_and_blocks_stay_bounded(tmp_path):
    sr, f0 = 48000, 1000.0
    t = np.arange(5 * sr) / sr
    sf.write(tmp_path / "sine.wav", 0.5 * np.sin(2 * np.pi * f0 * t), sr)
    blocks = list(iter_blocks(tmp_path / "sine.wav", 12000, 1, 0.5))
    assert max(b.shape[1] for b in blocks) <= 0.5 * 12000 * 1.1
    audio = np.concatenate(blocks, axis=1)[0]
    assert len(audio) == 5 * 12000
    spec = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / 12000)[spec.argmax()] == pytest.approx(f0, abs=1)
    assert np.sqrt(np.mean(audio[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_downmix_averages_and_mono_is_duplicated(tmp_path):
    sr = 24000
    x = 0.5 * np.sin(2 * np.pi * 300 * np.arange(2 * sr) / sr)
    sf.write(tmp_path / "anti.wav", np.stack([x, -x], axis=1), sr)
    sf.write(tmp_path / "mono.flac", x, sr)
    assert np.abs(decode_all(tmp_path / "anti.wav", sr, 1)).max() < 1e-4  # 16-bit LSB
    dup = decode_all(tmp_path / "mono.flac", sr, 2)
    assert np.array_equal(dup[0], dup[1]) and np.abs(dup).max() > 0.4


def test_bad_files_raise_with_a_status(tmp_path, demo_corpus):
    (tmp_path / "empty.mp3").write_bytes(b"")
    (tmp_path / "text.mp3").write_text("these are my notes, not a song\n" * 20)
    good = sorted(demo_corpus.rglob("*.mp3"))[2].read_bytes()      # untagged: starts with a frame
    rng = np.random.default_rng(0)
    (tmp_path / "corrupt.mp3").write_bytes(good[:300] + rng.bytes(len(good) - 300))
    with pytest.raises(NotAudioError, match="empty") as empty:
        probe(tmp_path / "empty.mp3")
    with pytest.raises(NotAudioError, match="not audio") as text:
        probe(tmp_path / "text.mp3")
    assert empty.value.status == text.value.status == "skipped"
    with pytest.raises(DecodeError, match="decode error: libsndfile cannot open") as corrupt:
        probe(tmp_path / "corrupt.mp3")          # ffprobe finds no sample rate either
    assert corrupt.value.status == "failed"


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the m4a fallback needs ffmpeg")
def test_m4a_uses_the_ffmpeg_fallback(tmp_path, demo_corpus):
    src = sorted(demo_corpus.rglob("*.mp3"))[0]
    m4a = tmp_path / "song.M4A"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), "-c:a", "aac", "-f", "mp4",
                    str(m4a)], check=True)
    info = probe(m4a)
    assert info.backend == "ffmpeg" and info.channels == 2
    audio = decode_all(m4a, 24000, 1)
    assert abs(audio.shape[1] / 24000 - 6.0) < 0.1 and np.abs(audio).max() > 0.1


@pytest.mark.parametrize("ext,fmt", [("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG"), ("MP3", "MP3")])
def test_libsndfile_formats_decode_in_blocks(tmp_path, ext, fmt):
    sr = 32000
    path = tmp_path / f"tone.{ext}"
    sf.write(path, np.stack([np.sin(2 * np.pi * 330 * np.arange(3 * sr) / sr)] * 2, 1) * 0.4,
             sr, format=fmt)
    info = probe(path)
    assert (info.sample_rate, info.channels, info.backend) == (sr, 2, "soundfile")
    audio = decode_all(path, 24000, 1, block_seconds=0.5)
    assert audio.shape == (1, 3 * 24000) and 0.3 < np.abs(audio).max() < 0.5


SR = 44100


@pytest.fixture(scope="module")
def clean_mp3(tmp_path_factory) -> tuple[bytes, np.ndarray]:
    """A 12 s corpus song as mp3 bytes, and its clean decode (mono, 24 kHz)."""
    path = tmp_path_factory.mktemp("clean") / "clean.mp3"
    path.write_bytes(encode_mp3(song(7, 0, 12.0, SR), SR))
    return path.read_bytes(), np.concatenate(list(iter_blocks(path, 24000, 1, 1.0)), axis=1)[0]


def with_garbage(data: bytes, start: int, seed: int, size: int = 20_000) -> bytes:
    """`data` with `size` random bytes from byte `start` on."""
    out = bytearray(data)
    out[start:start + size] = np.random.default_rng(seed).bytes(size)
    return bytes(out)


@pytest.fixture(scope="module")
def damaged(clean_mp3, tmp_path_factory) -> tuple[Path, float, np.ndarray]:
    """The song with 20 kB of garbage from its middle byte on: path, where the damage starts
    (s, from the byte offset) and the clean decode."""
    data, clean = clean_mp3
    path = tmp_path_factory.mktemp("damaged") / "damaged.mp3"
    path.write_bytes(with_garbage(data, len(data) // 2, seed=0))
    return path, 12.0 * (len(data) // 2) / len(data), clean


def test_libsndfile_gives_up_on_damage_that_ffmpeg_gets_past(damaged):
    path, damage_s, clean = damaged
    with pytest.raises(DecodeError):
        list(iter_blocks(path, 24000, 1, 1.0))           # libsndfile alone: all lost
    audio, recovery = decode_recovering(probe(path), lambda blocks: np.concatenate(
        list(blocks), axis=1)[0], 24000, 1, 1.0)
    seconds = len(audio) / 24000
    assert 0.8 * 12.0 <= seconds < 12.0                  # most of it, and nothing twice
    assert recovery.decoder == "ffmpeg"
    assert recovery.lost_s == pytest.approx(12.0 - seconds, abs=0.01)
    assert recovery.at_s == pytest.approx(damage_s, abs=0.4)
    head = int((damage_s - 0.5) * 24000)                 # before the damage: the clean audio
    assert np.abs(audio[:head] - clean[:head]).max() < 1e-3
    assert recovery.note().startswith(f"recovered: {recovery.lost_s:.1f} s lost at ")


def test_the_manifest_line_of_a_damaged_song_says_what_was_lost_and_where(damaged, tmp_path):
    path, damage_s, _ = damaged
    spec = ChunkSpec(24000, 1, 2 * 24000, "drop", 1.0, None, 0, "float32", 30.0, "test")
    rec, _ = process_file((path, path.name, spec, tmp_path, None))
    assert rec["status"] == "ok" and rec["chunks"] == int(rec["duration_s"] // 2) >= 4
    lost = rec["recovered"]
    assert lost["decoder"] == "ffmpeg" and 0 < lost["lost_s"] < 2.4
    assert lost["lost_s"] == pytest.approx(12.0 - rec["duration_s"], abs=0.05)
    assert lost["at_s"] == pytest.approx(damage_s, abs=0.4)
    note = f"recovered: {lost['lost_s']:.1f} s lost at {lost['at_s']:.1f} s ("
    assert rec["reason"].startswith(note)
    assert np.load(tmp_path / rec["array"].split("/")[1]).shape == (rec["chunks"], 1, 48000)
    assert [p.name for p in tmp_path.iterdir()] == [rec["array"].split("/")[1]]  # no temp left


def test_a_file_of_garbage_fails_with_the_decoders_reason(tmp_path):
    path = tmp_path / "garbage.mp3"                      # an mp3 frame header, then noise
    path.write_bytes(b"\xff\xfb\x90\x64" + np.random.default_rng(4).bytes(200_000))
    spec = ChunkSpec(24000, 1, 2 * 24000, "drop", 1.0, None, 0, "float32", 30.0, "test")
    rec, _ = process_file((path, path.name, spec, tmp_path, None))
    assert rec["status"] == "failed" and "recovered" not in rec
    assert rec["reason"].startswith("decode error: at 0.0 s: ffmpeg found nothing decodable: ")
    assert "libsndfile" in rec["reason"] and not list(tmp_path.glob("*.npy*"))


def test_libsndfile_ending_early_without_an_error_is_caught(clean_mp3, tmp_path):
    data, _ = clean_mp3
    path = tmp_path / "quiet.mp3"
    path.write_bytes(with_garbage(data, len(data) // 4, seed=3))
    alone = np.concatenate(list(iter_blocks(path, 24000, 1, 1.0)), axis=1)
    assert alone.shape[1] < 4 * 24000                   # libsndfile: end of file at ~3 s
    seconds, recovery = decode_recovering(probe(path), lambda blocks: sum(
        b.shape[1] for b in blocks) / 24000, 24000, 1, 1.0)
    assert seconds >= 0.8 * 12.0 and recovery.at_s == pytest.approx(3.0, abs=0.4)


def test_a_cut_off_file_keeps_what_it_has_and_says_what_is_missing(clean_mp3, tmp_path):
    data, clean = clean_mp3
    path = tmp_path / "cut.mp3"
    path.write_bytes(data[:len(data) // 2])             # the header still says 12 s
    audio, recovery = decode_recovering(probe(path), lambda blocks: np.concatenate(
        list(blocks), axis=1)[0], 24000, 1, 1.0)
    assert len(audio) / 24000 == pytest.approx(6.0, abs=0.3)
    assert np.abs(audio[:5 * 24000] - clean[:5 * 24000]).max() < 1e-3
    assert recovery.lost_s == pytest.approx(6.0, abs=0.3)
    assert recovery.at_s == pytest.approx(6.0, abs=0.3)


def test_the_chunk_summary_counts_and_lists_recovered_songs(damaged, tmp_path):
    from pipeline.chunk_manifest import count_records, format_summary
    path, _, _ = damaged
    spec = ChunkSpec(24000, 1, 2 * 24000, "drop", 1.0, None, 0, "float32", 30.0, "test")
    rec, _ = process_file((path, path.name, spec, tmp_path, None))
    summary = count_records([rec])
    assert summary["ok"] == summary["recovered"] == 1 and summary["failed"] == 0
    lost = rec["recovered"]["lost_s"]
    assert summary["problems"] == [{"source": rec["source"], "status": "recovered",
                                    "reason": rec["reason"], "lost_s": lost}]
    assert summary["lost_s"] == lost > 0
    text = format_summary(summary)
    assert f"recovered: 1 ({lost:.1f} s lost)" in text
    assert f"recovered: {path}: {lost:.1f} s lost at " in text
