"""Block decoding, resampling and channel handling on real files."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.decode import DecodeError, NotAudioError, iter_blocks, probe


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
    with pytest.raises(DecodeError, match="decode error") as corrupt:
        probe(tmp_path / "corrupt.mp3")
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
