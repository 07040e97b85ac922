"""Evaluation metrics on known inputs: real mel latents of synthesized songs vs white noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.codec_mel import MelCodec
from data_prep.corpus import song
from jobs import evaluate as ev
from jobs.figures import FIGURES
from jobs.learning_targets import STAGE3
from tests.fixtures.config import make_cfg

SR = 12000      # a legal data rate for the mel codec (hop 160); keeps the test quick
SECONDS = 4.0


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("ev"))
    return MelCodec(cfg.encode.mel, SR, torch.device("cpu"))


def songs(indices, seed=7) -> torch.Tensor:
    """[B, 1, S] mono demo-corpus songs (chords, bass, melody, drums)."""
    return torch.stack([torch.from_numpy(song(seed, i, SECONDS, SR).mean(0, keepdims=True))
                        for i in indices]).float()


def test_identical_sets_have_zero_distance(codec):
    lat = codec.encode(songs(range(3)))
    frames = ev.frames_of(lat)
    scale = np.trace(np.cov(frames, rowvar=False))
    assert ev.frechet_distance(frames, frames) < 1e-6 * scale


def test_noise_is_farther_from_music_than_held_out_music(codec):
    music, held_out = songs(range(0, 4)), songs(range(4, 8))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(music.shape, generator=gen) * music.pow(2).mean().sqrt()  # same level
    f_music = ev.frames_of(codec.encode(music))
    f_held = ev.frames_of(codec.encode(held_out))
    f_noise = ev.frames_of(codec.encode(noise))
    music_vs_held = ev.frechet_distance(f_music, f_held)
    noise_vs_held = ev.frechet_distance(f_noise, f_held)
    assert music_vs_held > 0
    assert noise_vs_held > 3 * music_vs_held, (noise_vs_held, music_vs_held)


def test_frechet_matches_closed_form_for_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 4))
    b = rng.standard_normal((20000, 4)) * 2 + 3   # cov 4I, mean +3
    # |mu|^2 = 4*9, traces 4 + 16, cross 2*tr(2I) = 16 -> 36 + 4 = 40
    assert ev.frechet_distance(a, b) == pytest.approx(40.0, rel=0.05)


def test_frechet_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="D"):
        ev.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_diversity_identical_is_zero_and_collapse_ratio_is_small(codec):
    lat = codec.encode(songs(range(4)))
    same = lat[:1].repeat(4, 1, 1)
    assert ev.diversity(same) == 0.0
    assert ev.diversity(lat) > 0
    collapsed = same + 1e-3 * torch.randn_like(same)
    assert ev.diversity_ratio(collapsed, lat) < 0.01
    assert ev.diversity_ratio(lat, lat) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        ev.diversity(lat[:1])


def test_spectral_flatness_and_rms():
    t = torch.arange(SR * 2) / SR
    sine = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    noise = torch.randn(SR * 2, generator=torch.Generator().manual_seed(1)) * 0.1
    assert ev.spectral_flatness(sine, 1024) < 0.01
    assert 0.4 < ev.spectral_flatness(noise, 1024) < 0.7   # white noise: exp(-gamma) ~ 0.56
    assert ev.spectral_flatness(songs([0]), 1024) < ev.spectral_flatness(noise, 1024)
    assert ev.rms(sine) == pytest.approx(0.5 / 2 ** 0.5, rel=1e-3)
    assert ev.rms_db(sine) == pytest.approx(20 * np.log10(0.5 / 2 ** 0.5), abs=0.01)
    with pytest.raises(ValueError, match="shorter"):
        ev.spectral_flatness(sine[:100], 1024)


@pytest.mark.slow  # the whole evaluate step on a tiny run
def test_evaluate_step_scores_the_generator_beside_its_twins_and_logs_it(tmp_path):
    import json

    import mlflow

    from pipeline.tracking import tracking_uri
    from tests.fixtures.tiny_gan_run import build_run, save_stage3

    # 2 s clips (lags of 0.5-1 s for the periodicity), 8 held-out clips (4 folds of 2 a side)
    cfg, run_dir = build_run(tmp_path, "data.chunk_seconds=2.0", "data.demo_seconds=8.0",
                             "model.transformer.max_frames=160",
                             "evaluate.n=8", "evaluate.picks=2")
    save_stage3(cfg, run_dir, [1, 2])
    result = ev.run(cfg, run_dir)
    saved = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    table, m = saved["table"], saved["metrics"]
    assert saved["n_generated"] == 8 and saved["n_real"] == 8 and saved["picks"] == [0, 1]
    assert saved["epoch"] == 2 and saved["codec"] == "mel"
    assert set(table) == {"generated", "prior", "white", "shuffled", "real"}
    for name in ("generated", "prior", "white", "shuffled"):
        assert set(table[name]) == set(FIGURES)
        assert all(np.isfinite(stat["mean"]) and stat["picks"] == 2
                   for stat in table[name].values()), name
        assert 0 <= table[name]["two_sample_accuracy"]["mean"] <= 1
        assert [t["key"] for t in saved["targets"][name]] == [t.key for t in STAGE3]
    # white noise is told from music at once; shuffling real frames removes the bar-scale
    # repetition that the real clips have
    assert table["white"]["two_sample_accuracy"]["mean"] >= 0.75
    assert table["shuffled"]["periodicity"]["mean"] < table["real"]["periodicity"]["mean"]
    # every stage-3 target is missed by every trivial twin; the one exception is built in:
    # the shuffled twin's frames are real, so its decoded loudness is real music's
    for twin in ("prior", "white", "shuffled"):
        for target in saved["targets"][twin]:
            if (twin, target["key"]) != ("shuffled", "rms_db_diff"):
                assert not target["met"], (twin, target)
    # flat metrics: the generator's by name, the twins' with a suffix, spreads as _std
    assert m["two_sample_accuracy"] == table["generated"]["two_sample_accuracy"]["mean"]
    assert m["periodicity_shuffled"] == table["shuffled"]["periodicity"]["mean"]
    assert "rms_db_diff_std" in m and "precision_prior" in m
    assert result["verdict"].startswith("the generator") and result["metrics"] == m
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run_id = json.loads((run_dir / "evaluate" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.metrics["eval/two_sample_accuracy"] == pytest.approx(m["two_sample_accuracy"])
    assert run.data.tags["evaluate.verdict"] == result["verdict"]
    assert [a.path for a in client.list_artifacts(run_id, "evaluate")] == [
        "evaluate/metrics.json", "evaluate/verdict.txt"]


# --- k-NN manifold figures: precision, recall, density, coverage ---------------------------

def test_manifold_metrics_follow_their_definitions_on_a_hand_computed_case():
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [20.0]])
    m = ev.manifold_metrics(real, fake, k=1)
    # real k=1 radii 1, 1, 1, 8; fake radii 19.5, 19.5
    assert m["precision"] == pytest.approx(0.5)      # 0.5 lies in a real ball, 20 in none
    assert m["density"] == pytest.approx(1.0)        # 0.5 lies in 2 balls, 20 in 0: 2 / (1 * 2)
    assert m["coverage"] == pytest.approx(0.5)       # reals 0 and 1 have a fake in their ball
    assert m["recall"] == pytest.approx(1.0)         # every real lies in a fake ball
    # neighbours of the same group (frames of one chunk) do not set a ball's radius
    pairs = np.array([[0.0], [0.1], [5.0], [5.1]])
    groups = np.array([0, 0, 1, 1])
    assert ev.knn_radii(pairs, 1).tolist() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert ev.knn_radii(pairs, 1, groups).tolist() == pytest.approx([5.0, 4.9, 4.9, 5.0])
    with pytest.raises(ValueError, match="k = 3"):
        ev.knn_radii(pairs, 3, groups)


def test_recall_and_coverage_catch_collapse_and_real_music_scores_like_real_music(codec):
    real = codec.encode(songs(range(0, 8)))
    train = codec.encode(songs(range(8, 16)))         # the real-vs-real reference
    other = codec.encode(songs(range(16, 24)))        # "generated" = drawn from the real data
    collapsed = real.mean(dim=(0, 2), keepdim=True).expand_as(real).clone()  # one mean frame
    ref = ev.chunk_manifold_metrics(train, real)
    good = ev.chunk_manifold_metrics(other, real)
    bad = ev.chunk_manifold_metrics(collapsed, real)
    assert ref["recall"] > 0.4 and ref["coverage"] > 0.4
    for key in ("precision", "recall", "coverage"):
        assert good[key] == pytest.approx(ref[key], abs=0.15), (key, good, ref)
    assert bad["recall"] < 0.02
    assert bad["coverage"] < 0.3 * ref["coverage"]
    # the mean frame sits inside the real manifold: precision cannot see collapse
    assert bad["precision"] > 0.9
    # Frechet on frames is fooled more easily: one mean frame is not far from real
    assert ev.frechet_distance(ev.frames_of(collapsed), ev.frames_of(real)) < \
        10 * ev.frechet_distance(ev.frames_of(train), ev.frames_of(real))


def test_set_figures_of_the_held_out_clips_themselves(codec):
    from jobs.figures import Reals, set_figures

    real = codec.encode(songs(range(0, 8)))
    train = codec.encode(songs(range(8, 16)))
    audio = songs(range(0, 8))
    reals = Reals(real, audio, train, codec.frame_rate, 1024)
    same = set_figures(real.clone(), audio, reals, seed=0)
    # every window of the set is a window of the reals: inside the manifold, covering it
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["rms_db_diff"] == pytest.approx(0.0, abs=1e-9)
    assert same["frechet_ratio"] == pytest.approx(0.0, abs=1e-6)
    quieter = set_figures(real.clone(), audio * 0.5, reals, seed=0)
    assert quieter["rms_db_diff"] == pytest.approx(-6.02, abs=0.01)


# --- the spread of a set from running sums (validation over every rank) --------------------

def test_rms_pairwise_distance_from_sums_matches_the_pairs_and_merges_across_parts():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, 5, generator=gen) * 2 + 1
    flat = x.reshape(12, -1).double()
    i, j = torch.triu_indices(12, 12, offset=1)
    direct = ((flat[i] - flat[j]).pow(2).sum(1) / flat.shape[1]).mean().sqrt()
    count, total, total_sq = ev.spread_sums(x)
    assert ev.rms_pairwise_distance(count, total, total_sq) == pytest.approx(float(direct))
    a, b = ev.spread_sums(x[:5]), ev.spread_sums(x[5:])
    merged = (a[0] + b[0], a[1] + b[1], a[2] + b[2])
    assert ev.rms_pairwise_distance(*merged) == pytest.approx(float(direct))
    # close to diversity (mean of distances rather than their root mean square)
    spread = ev.rms_pairwise_distance(count, total, total_sq)
    assert spread == pytest.approx(ev.diversity(x), rel=0.1)
    same = ev.spread_sums(x[:1].repeat(6, 1, 1))
    assert ev.rms_pairwise_distance(*same) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        ev.rms_pairwise_distance(*ev.spread_sums(x[:1]))


def test_step_ratio_sees_order_that_frame_figures_cannot():
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(4, 8, 200, generator=g).cumsum(dim=-1) * 0.1
    shuffled = smooth[..., torch.randperm(200, generator=g)]   # same frames, order lost
    assert ev.frechet_distance(ev.frames_of(shuffled), ev.frames_of(smooth)) < 1e-6
    assert ev.frame_step(shuffled) > 5 * ev.frame_step(smooth)
    assert ev.frame_step(smooth[..., :1].expand_as(smooth)) == 0.0
