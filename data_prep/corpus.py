"""Seeded demo corpus: procedural multi-instrument songs written as real mp3 files.

Each song has a key, a chord progression, bass, pads, a melody and drums, with its own
tempo and timbre. The files cycle through the variants a real music folder has: mono and
stereo, 44.1 and 48 kHz, with and without an ID3v2 tag, in a subfolder, with spaces and
non-ASCII letters in the name. Song i depends only on (seed, i), so the same seed gives
byte-identical files.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline import config
from pipeline.atomic import atomic_write_bytes, atomic_write_json
from pipeline.file_lock import file_lock
from pipeline.schema import Config

MARKER = ".corpus-complete.json"
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
PROGRESSIONS = [[0, 4, 5, 3], [0, 5, 3, 4], [0, 3, 4, 4], [5, 3, 0, 4], [0, 3, 0, 4]]
WORDS = ["Blue", "Night", "Café", "Größe", "Sommer", "River", "Nocturne", "Été",
         "Lumière", "Drift", "Ñandú", "Glass", "Morning", "Søren", "Tide", "Echo"]


def midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def pan_gains(pan: float) -> np.ndarray:
    """Constant-power left/right gains for pan in [-1, 1]."""
    angle = (pan + 1) * np.pi / 4
    return np.array([np.cos(angle), np.sin(angle)])


def tone(freq: float, dur: float, sr: int, harmonics: np.ndarray, decay: float,
         attack: float = 0.01) -> np.ndarray:
    """An additive-synthesis note: harmonic weights give the timbre, exp decay the envelope."""
    t = np.arange(int(dur * sr)) / sr
    wave = np.zeros_like(t)
    for k, amp in enumerate(harmonics, start=1):
        if freq * k < sr / 2:
            wave += amp * np.sin(2 * np.pi * freq * k * t)
    env = np.minimum(t / attack, 1.0) * np.exp(-t / decay)
    release = np.minimum((t[-1] - t) / 0.01, 1.0) if len(t) else env
    return wave * env * release


def add(track: np.ndarray, sound: np.ndarray, start_s: float, sr: int) -> None:
    i = int(start_s * sr)
    if i >= len(track):
        return
    n = min(len(sound), len(track) - i)
    track[i:i + n] += sound[:n]


def drums(n: int, sr: int, beat: float, rng: np.random.Generator) -> np.ndarray:
    """Kick, snare and hi-hat on a per-song pattern."""
    track = np.zeros(n)
    t = np.arange(int(0.35 * sr)) / sr
    kick = np.sin(2 * np.pi * (45 * t + 75 * 0.05 * (1 - np.exp(-t / 0.05)))) * np.exp(-t / 0.12)
    ts = t[: int(0.2 * sr)]
    snare = 0.6 * rng.standard_normal(len(ts)) + 0.4 * np.sin(2 * np.pi * 185 * ts)
    snare *= np.exp(-ts / 0.05)
    th = t[: int(0.06 * sr)]
    hat = np.diff(rng.standard_normal(len(th) + 1)) * np.exp(-th / 0.015) * 0.3
    kick_beats = [0, 2] if rng.random() < 0.6 else [0, 1.5, 2]
    hat_step = 0.5 if rng.random() < 0.7 else 0.25
    bars = int(np.ceil(n / sr / (4 * beat)))
    for bar in range(bars):
        base = bar * 4 * beat
        for b in kick_beats:
            add(track, kick, base + b * beat, sr)
        for b in (1, 3):
            add(track, snare, base + b * beat, sr)
        for b in np.arange(0, 4, hat_step):
            add(track, hat * rng.uniform(0.6, 1.0), base + b * beat, sr)
    return track


def song(seed: int, index: int, seconds: float, sr: int) -> np.ndarray:
    """Synthesize song `index` as [2, n] float (stereo; mono files sum it)."""
    rng = np.random.default_rng([seed, index])
    n = int(seconds * sr)
    beat = 60.0 / rng.uniform(80, 140)
    root = int(rng.integers(45, 57))
    scale = SCALES["major" if rng.random() < 0.5 else "minor"]
    prog = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    timbre = {name: rng.uniform(0.1, 1.0, 6) * np.arange(1, 7) ** -rng.uniform(0.8, 2.0)
              for name in ("bass", "pad", "lead")}

    def degree(d: int, octave: int = 0) -> int:
        return root + 12 * (octave + d // 7) + scale[d % 7]

    parts = {name: np.zeros(n) for name in ("bass", "pad", "lead")}
    bar_s = 4 * beat
    for bar in range(int(np.ceil(seconds / bar_s))):
        start, chord = bar * bar_s, prog[bar % len(prog)]
        for d in (chord, chord + 2, chord + 4):
            add(parts["pad"], tone(midi_hz(degree(d, 1)) * rng.uniform(0.998, 1.002), bar_s,
                                   sr, timbre["pad"], decay=bar_s, attack=0.15) * 0.18, start, sr)
        for b in (0, 2) if rng.random() < 0.5 else (0, 1, 2, 3):
            add(parts["bass"], tone(midi_hz(degree(chord, -1)), beat * 0.9, sr,
                                    timbre["bass"], decay=0.4) * 0.5, start + b * beat, sr)
        pos, step = 0.0, int(rng.integers(0, 7))
        while pos < 4:
            dur = beat * (0.5 if rng.random() < 0.6 else 1.0)
            if rng.random() > 0.15:
                step = int(np.clip(step + rng.integers(-2, 3), -2, 9))
                add(parts["lead"], tone(midi_hz(degree(chord + step, 2)), dur, sr,
                                        timbre["lead"], decay=0.25) * 0.3, start + pos * beat, sr)
            pos += dur / beat
    pans = {"bass": 0.0, "pad": rng.uniform(-0.5, 0.5), "lead": rng.uniform(-0.6, 0.6),
            "drums": rng.uniform(-0.2, 0.2)}
    parts["drums"] = drums(n, sr, beat, rng) * rng.uniform(0.3, 0.6)
    mix = sum(pan_gains(pans[k])[:, None] * v[None, :] for k, v in parts.items())
    fade = np.minimum(1.0, np.minimum(np.arange(n), n - 1 - np.arange(n)) / (0.05 * sr))
    mix = mix * fade
    return mix / (np.abs(mix).max() + 1e-9) * rng.uniform(0.5, 0.9)


def syncsafe(n: int) -> bytes:
    """ID3v2 sizes: 28 bits spread over 4 bytes of 7 bits."""
    return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])


def id3v2_tag(fields: dict[str, str]) -> bytes:
    """A minimal ID3v2.4 tag of UTF-8 text frames (TIT2, TPE1, ...)."""
    frames = b""
    for frame_id, text in fields.items():
        payload = b"\x03" + text.encode("utf-8")
        frames += frame_id.encode("ascii") + syncsafe(len(payload)) + b"\x00\x00" + payload
    body = frames + b"\x00" * 32  # padding, as taggers leave room to edit in place
    return b"ID3\x04\x00\x00" + syncsafe(len(body)) + body


def variant(index: int) -> dict:
    """Which file variant song `index` is: channels, rate, tag, folder."""
    return {"channels": 2 if index % 2 == 0 else 1,
            "sample_rate": 44100 if (index // 2) % 2 == 0 else 48000,
            "tagged": index % 3 != 2,
            "folder": "Side B" if index % 4 == 3 else ""}


def song_name(seed: int, index: int) -> str:
    rng = np.random.default_rng([seed, index, 1])
    words = rng.choice(WORDS, size=2, replace=False)
    return f"{index + 1:02d} {words[0]} {words[1]}.mp3"


def encode_mp3(audio: np.ndarray, sr: int) -> bytes:
    """MP3 bytes of [channels, n] audio via libsndfile's LAME encoder."""
    buf = io.BytesIO()
    sf.write(buf, audio.T.astype(np.float32), sr, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


def generate_corpus(out_dir: Path, songs: int, seconds: float, seed: int) -> list[Path]:
    """Write `songs` seeded mp3 songs of `seconds` each under out_dir; return their paths."""
    if songs < 1 or seconds <= 0:
        raise ValueError(f"generate_corpus needs songs >= 1 and seconds > 0, got {songs}, {seconds}")
    out_dir = Path(out_dir)
    paths = []
    for i in range(songs):
        v = variant(i)
        audio = song(seed, i, seconds, v["sample_rate"])
        if v["channels"] == 1:
            audio = audio.mean(axis=0, keepdims=True)
        data = encode_mp3(audio, v["sample_rate"])
        name = song_name(seed, i)
        if v["tagged"]:
            data = id3v2_tag({"TIT2": name[3:-4], "TPE1": "Demo Corpus", "TALB": f"Seed {seed}",
                              "TRCK": str(i + 1)}) + data
        path = out_dir / v["folder"] / name
        atomic_write_bytes(path, data)
        paths.append(path)
    return paths


def ensure_corpus(cfg: Config, run_dir: Path) -> Path:
    """The music folder to chunk: data.source if set, else the demo corpus (generated once)."""
    if cfg.data.source:
        source = Path(cfg.data.source).expanduser()
        if not source.is_dir():
            raise FileNotFoundError(f"data.source folder does not exist: {source}")
        return source
    corpus = Path(run_dir) / "corpus"
    want = {"songs": cfg.data.demo_songs, "seconds": cfg.data.demo_seconds, "seed": cfg.run.seed}
    with file_lock(Path(run_dir) / ".corpus.lock"):
        marker = corpus / MARKER
        if marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in want} == want:
            return corpus
        if corpus.exists():
            shutil.rmtree(corpus)  # made with other settings (or interrupted): start over
        paths = generate_corpus(corpus, cfg.data.demo_songs, cfg.data.demo_seconds, cfg.run.seed)
        atomic_write_json(marker, {**want, "files": [str(p.relative_to(corpus)) for p in paths]})
    return corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the seeded demo mp3 corpus.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--songs", type=int, help="default: data.demo_songs of configs/")
    parser.add_argument("--seconds", type=float, help="default: data.demo_seconds")
    parser.add_argument("--seed", type=int, help="default: run.seed")
    args = parser.parse_args(argv)
    cfg = config.load()
    paths = generate_corpus(args.out, args.songs or cfg.data.demo_songs,
                            args.seconds or cfg.data.demo_seconds,
                            cfg.run.seed if args.seed is None else args.seed)
    print(f"wrote {len(paths)} songs to {args.out}")


if __name__ == "__main__":
    main()
