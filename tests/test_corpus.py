"""The seeded demo corpus: deterministic, real mp3 files, and the promised variants."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.corpus import ensure_corpus, generate_corpus
from tests.fixtures.config import make_cfg

ROOT = Path(__file__).resolve().parent.parent


def mp3s(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.mp3"))


def band_energy(x: np.ndarray, sr: int, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / sr)
    return float(spec[(freqs >= lo) & (freqs < hi)].sum() / spec.sum())


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = generate_corpus(tmp_path / "a", songs=3, seconds=2.0, seed=11)
    b = generate_corpus(tmp_path / "b", songs=3, seconds=2.0, seed=11)
    c = generate_corpus(tmp_path / "c", songs=3, seconds=2.0, seed=12)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert a[0].read_bytes() != c[0].read_bytes()


def test_corpus_has_the_promised_variants(demo_corpus):
    files = mp3s(demo_corpus)
    assert len(files) == 4
    infos = [sf.info(str(p)) for p in files]
    assert {i.channels for i in infos} == {1, 2}
    assert {i.samplerate for i in infos} == {44100, 48000}
    assert {i.format for i in infos} == {"MP3"}
    assert {p.read_bytes()[:3] == b"ID3" for p in files} == {True, False}
    assert any(p.parent != demo_corpus for p in files)            # a subfolder
    assert any(" " in p.name for p in files)
    assert any(not p.name.isascii() for p in files)
    for info in infos:
        assert info.duration == pytest.approx(6.0, abs=0.05)


def test_songs_are_music_like(demo_corpus):
    """Each song is loud enough, has bass and cymbal energy, and songs differ from each other."""
    mixes = []
    for path in mp3s(demo_corpus):
        audio, sr = sf.read(str(path), always_2d=True)
        mono = audio.mean(axis=1)
        assert 0.3 < np.abs(mono).max() <= 1.0
        assert band_energy(mono, sr, 30, 250) > 0.05                 # bass and kick
        assert band_energy(mono, sr, 4000, 16000) > 1e-4             # hats
        mixes.append(mono[: 2 * 44100])
    assert np.corrcoef(mixes[0], mixes[1])[0, 1] < 0.5


def test_id3_tag_is_well_formed(demo_corpus):
    tagged = [p for p in mp3s(demo_corpus) if p.read_bytes()[:3] == b"ID3"]
    data = tagged[0].read_bytes()
    size = sum(b << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
    assert data[3] == 4 and all(b < 0x80 for b in data[6:10])
    assert b"TIT2" in data[10:10 + size] and b"Demo Corpus" in data[10:10 + size]
    assert data[10 + size] == 0xFF                                   # an mp3 frame follows


def test_ensure_corpus_generates_once_and_respects_source(tmp_path):
    cfg = make_cfg(tmp_path, "data.demo_songs=2", "data.demo_seconds=1.5")
    run_dir = tmp_path / "run"
    corpus = ensure_corpus(cfg, run_dir)
    assert corpus == run_dir / "corpus" and len(mp3s(corpus)) == 2
    stamp = [p.stat().st_mtime_ns for p in mp3s(corpus)]
    assert ensure_corpus(cfg, run_dir) == corpus
    assert [p.stat().st_mtime_ns for p in mp3s(corpus)] == stamp   # not regenerated
    more = make_cfg(tmp_path, "data.demo_songs=3", "data.demo_seconds=1.0")
    assert len(mp3s(ensure_corpus(more, run_dir))) == 3               # new settings: remade
    assert sf.info(str(mp3s(corpus)[0])).duration == pytest.approx(1.0, abs=0.05)

    mine = tmp_path / "my music"
    mine.mkdir()
    assert ensure_corpus(make_cfg(tmp_path, f"data.source={mine}"), run_dir) == mine
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ensure_corpus(make_cfg(tmp_path, f"data.source={tmp_path / 'nowhere'}"), run_dir)


@pytest.mark.integration
def test_cli_writes_the_requested_songs(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "data_prep.corpus", "--out", str(out), "--songs", "2",
                    "--seconds", "1", "--seed", "5"], cwd=ROOT, check=True, capture_output=True)
    files = mp3s(out)
    assert len(files) == 2
    assert all(sf.info(str(p)).duration == pytest.approx(1.0, abs=0.05) for p in files)
