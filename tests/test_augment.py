"""Each augmentation type changes the audio in the intended way, measured on test tones."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from data_prep import augment
from tests.fixtures.config import make_cfg

SR = 24000
N_FFT, HOP = 2048, 512


def tone(freq: float, seconds: float = 2.0, amp: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return np.repeat((amp * np.sin(2 * np.pi * freq * t))[None], channels, 0).astype(np.float32)


def peak_hz(wave: np.ndarray) -> float:
    """Frequency of the strongest FFT peak of channel 0 (Hann window, parabolic refinement)."""
    spec = np.abs(np.fft.rfft(wave[0] * np.hanning(wave.shape[-1])))
    k = int(np.argmax(spec))
    a, b, c = np.log(spec[k - 1:k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * SR / wave.shape[-1]


def db(ratio: float) -> float:
    return 20 * math.log10(ratio)


@pytest.fixture
def aug_cfg(tmp_path):
    return make_cfg(tmp_path, "encode.augment.variants=0").encode.augment


@pytest.mark.parametrize("semitones", [-2.0, -0.7, 1.5, 2.0])
def test_pitch_shift_moves_tone_by_the_ratio_and_keeps_length(semitones):
    wave = tone(440.0)
    out = augment.pitch_shift(wave, semitones, N_FFT, HOP)
    assert out.shape == wave.shape and out.dtype == np.float32
    ratio = peak_hz(out) / peak_hz(wave)
    assert ratio == pytest.approx(2 ** (semitones / 12), rel=0.01)
    assert abs(db(augment.rms(out) / augment.rms(wave))) < 0.5  # level kept


def test_pitch_shift_moves_both_tones_of_a_chord():
    wave = tone(330.0) + tone(1000.0, amp=0.1)
    out = augment.pitch_shift(wave, 2.0, N_FFT, HOP)
    spec = np.abs(np.fft.rfft(out[0] * np.hanning(out.shape[-1])))
    hz = np.fft.rfftfreq(out.shape[-1], 1 / SR)
    high = hz > 700
    assert hz[np.argmax(spec)] == pytest.approx(330 * 2 ** (2 / 12), rel=0.01)
    assert hz[high][np.argmax(spec[high])] == pytest.approx(1000 * 2 ** (2 / 12), rel=0.01)


@pytest.mark.parametrize("factor", [0.9, 1.1, 0.5, 1.7])
def test_time_stretch_changes_length_by_the_factor_and_keeps_pitch(factor):
    wave = tone(440.0, channels=2)
    out = augment.time_stretch(wave, factor, N_FFT, HOP)
    assert out.shape == (2, round(wave.shape[-1] * factor))
    assert peak_hz(out) == pytest.approx(440.0, rel=0.01)
    middle = out[:, N_FFT:-N_FFT]
    assert abs(db(augment.rms(middle) / augment.rms(wave))) < 0.5


def test_stretch_variant_keeps_the_chunk_length(aug_cfg):
    wave = tone(440.0)
    out = augment.apply("stretch", 1.1, wave, aug_cfg, np.random.default_rng(0), None)
    assert out.shape == wave.shape
    np.testing.assert_allclose(out, augment.time_stretch(wave, 1.1, N_FFT, HOP)[:, :wave.shape[-1]])


@pytest.mark.parametrize("snr", [10.0, 20.0, 35.0])
def test_noise_at_snr_measures_within_1_db(snr):
    wave = tone(440.0) + tone(97.0, amp=0.1)
    out = augment.add_noise(wave, snr, np.random.default_rng(1))
    noise = out - wave
    measured = 10 * math.log10(augment.rms(wave) ** 2 / augment.rms(noise) ** 2)
    assert abs(measured - snr) < 1.0
    assert abs(np.mean(noise)) < 0.1 * augment.rms(noise)  # white, zero-mean


def test_noise_on_silence_is_an_error():
    with pytest.raises(ValueError, match="silent"):
        augment.add_noise(np.zeros((1, 100), np.float32), 20.0, np.random.default_rng(0))


@pytest.mark.parametrize("gain_db", [-6.0, -1.5, 3.0, 6.0])
def test_gain_changes_rms_by_the_db(gain_db):
    wave = tone(440.0, amp=0.2)
    out = augment.gain(wave, gain_db)
    assert db(augment.rms(out) / augment.rms(wave)) == pytest.approx(gain_db, abs=1e-3)


@pytest.mark.parametrize("mix_db", [-20.0, -12.0])
def test_mix_adds_the_other_song_at_the_level(mix_db):
    wave, other = tone(440.0), tone(250.0, seconds=3.0, amp=0.5)
    out = augment.mix(wave, other, mix_db)
    added = out - wave
    assert out.shape == wave.shape
    assert db(augment.rms(added) / augment.rms(wave)) == pytest.approx(mix_db, abs=0.01)
    # what was added is the other song (scaled), not something else
    corr = np.corrcoef(added[0], other[0, :wave.shape[-1]])[0, 1]
    assert corr > 0.999


def test_mix_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        augment.mix(tone(440.0, channels=2), tone(300.0), -12.0)


def test_make_variants_shapes_params_and_ranges(aug_cfg):
    cfg = dataclasses.replace(aug_cfg, variants=12)
    wave, other = tone(440.0, channels=2), tone(300.0, channels=2, amp=0.2)
    variants, counts = augment.make_variants(wave, SR, cfg, np.random.default_rng(3), other)
    assert len(variants) + counts["silent"] + counts["clipped"] == 12
    ranges = {"gain": ("db", cfg.gain_db), "pitch": ("semitones", cfg.pitch_semitones),
              "stretch": ("factor", cfg.stretch), "noise": ("snr_db", cfg.noise_snr_db),
              "mix": ("db", cfg.mix_db)}
    for out, params in variants:
        assert out.shape == wave.shape and out.dtype == np.float32
        assert params["type"] in cfg.types
        key, (low, high) = ranges[params["type"]]
        assert low <= params[key] <= high
        assert not np.array_equal(out, wave)


def test_make_variants_draws_every_type(aug_cfg):
    cfg = dataclasses.replace(aug_cfg, variants=40)
    variants, _ = augment.make_variants(tone(440.0, seconds=0.5, amp=0.1), SR, cfg,
                                        np.random.default_rng(0), tone(300.0, seconds=0.5))
    assert {p["type"] for _, p in variants} == set(augment.TYPES)


def test_mix_not_drawn_without_a_second_song(aug_cfg):
    cfg = dataclasses.replace(aug_cfg, variants=20, types=["mix", "gain"])
    variants, _ = augment.make_variants(tone(440.0, seconds=0.5, amp=0.1), SR, cfg,
                                        np.random.default_rng(0), None)
    assert len(variants) == 20 and {p["type"] for _, p in variants} == {"gain"}


def test_silent_and_clipped_variants_are_dropped_and_counted(aug_cfg):
    rng = np.random.default_rng(0)
    loud = dataclasses.replace(aug_cfg, variants=5, types=["gain"], gain_db=[6.0, 6.0])
    variants, counts = augment.make_variants(tone(440.0, amp=0.9), SR, loud, rng, None)
    assert variants == [] and counts == {"silent": 0, "clipped": 5}

    quiet = dataclasses.replace(loud, gain_db=[-80.0, -80.0])
    variants, counts = augment.make_variants(tone(440.0, amp=0.5), SR, quiet, rng, None)
    assert variants == [] and counts == {"silent": 5, "clipped": 0}

    every = dataclasses.replace(aug_cfg, variants=4)
    silence = np.zeros((1, SR), np.float32)
    variants, counts = augment.make_variants(silence, SR, every, rng, tone(300.0, seconds=1.0))
    assert variants == [] and counts == {"silent": 4, "clipped": 0}

    # a mixed outcome: some gains clip, the rest are kept, and the tally adds up
    some = dataclasses.replace(loud, variants=30, gain_db=[-6.0, 6.0])
    variants, counts = augment.make_variants(tone(440.0, amp=0.7), SR, some, rng, None)
    assert counts["clipped"] > 0 and len(variants) > 0
    assert len(variants) + counts["clipped"] == 30
    assert all(p["db"] <= db(1.0 / 0.7) for _, p in variants)


def test_same_seed_same_variants(aug_cfg):
    cfg = dataclasses.replace(aug_cfg, variants=6)
    wave, other = tone(440.0, seconds=1.0), tone(300.0, seconds=1.0, amp=0.2)
    first = augment.make_variants(wave, SR, cfg, np.random.default_rng(7), other)
    again = augment.make_variants(wave, SR, cfg, np.random.default_rng(7), other)
    other_seed = augment.make_variants(wave, SR, cfg, np.random.default_rng(8), other)
    assert first[1] == again[1]
    assert [p for _, p in first[0]] == [p for _, p in again[0]]
    for (a, _), (b, _) in zip(first[0], again[0]):
        np.testing.assert_array_equal(a, b)
    assert [p for _, p in first[0]] != [p for _, p in other_seed[0]]


def test_variants_off_returns_nothing(aug_cfg):
    assert aug_cfg.variants == 0  # augmentation off
    assert augment.make_variants(tone(440.0), SR, aug_cfg, np.random.default_rng(0),
                                 None) == ([], {"silent": 0, "clipped": 0})


def test_bad_config_and_input_name_the_problem(aug_cfg):
    rng, wave = np.random.default_rng(0), tone(440.0)
    with pytest.raises(ValueError, match="encode.augment.types"):
        augment.make_variants(wave, SR, dataclasses.replace(aug_cfg, variants=1,
                                                            types=["reverb"]), rng, None)
    with pytest.raises(ValueError, match="encode.augment.gain_db"):
        augment.make_variants(wave, SR, dataclasses.replace(aug_cfg, variants=1,
                                                            gain_db=[3.0, -3.0]), rng, None)
    with pytest.raises(ValueError, match="channels, samples"):
        augment.make_variants(wave[0], SR, dataclasses.replace(aug_cfg, variants=1), rng, None)
    with pytest.raises(ValueError, match="too short"):
        augment.time_stretch(wave[:, :1000], 1.1, N_FFT, HOP)


def test_same_seed_same_params_on_every_chunk_of_equal_length(aug_cfg):
    """Draws do not depend on the audio, so a per-song seed gives every chunk of the song the
    same variant types and parameters (input and target of a pair stay consistent)."""
    cfg = dataclasses.replace(aug_cfg, variants=6, gain_db=[-3.0, 3.0])
    first = augment.make_variants(tone(440.0, seconds=1.0, amp=0.2), SR, cfg,
                                  np.random.default_rng(5), tone(200.0, seconds=1.0))
    second = augment.make_variants(tone(523.0, seconds=1.0, amp=0.25), SR, cfg,
                                   np.random.default_rng(5), tone(150.0, seconds=1.0))
    assert len(first[0]) == 6
    assert [p for _, p in first[0]] == [p for _, p in second[0]]
