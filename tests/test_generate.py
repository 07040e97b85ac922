"""Generation on a tiny real run: files, lengths, sample rate, seeded repeatability, refusals."""
from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import soundfile as sf
import torch

from jobs import fakes, generate, samples
from jobs.load_generator import load_generator
from pipeline import config, run_folder
from pipeline.tracking import step_run, tracking_uri
from tests.fixtures.config import make_cfg
from tests.fixtures.tiny_gan_run import TINY, build_run, codec_description, save_stage3

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg, run_dir = build_run(tmp_path_factory.mktemp("gen"))
    save_stage3(cfg, run_dir, [1, 2])
    return cfg, run_dir


def test_files_lengths_sample_rate(tiny_run):
    cfg, run_dir = tiny_run
    result = generate.run(cfg, run_dir)
    manifest = run_folder.read_encode_manifest(run_dir)
    out = run_dir / "generate"
    assert result["checkpoint"].endswith("stage3/last.pt") and result["n"] == cfg.generate.n == 3
    for i in range(3):
        info = sf.info(str(out / f"sample_{i}.wav"))
        assert info.samplerate == manifest["sample_rate"] == 12000
        assert info.channels == 1 and info.subtype == "PCM_16"
        assert info.frames == manifest["chunk_samples"] == 12000   # 75 frames x hop 160
        assert (out / f"sample_{i}.png").read_bytes()[:8] == PNG_MAGIC
        audio, _ = sf.read(str(out / f"sample_{i}.wav"))
        assert np.abs(audio).max() > 0.01   # not silence
    assert not (out / "sample_3.wav").exists()
    assert json.loads((out / "generate.json").read_text())["seed"] == cfg.generate.seed


def test_same_seed_same_audio_other_seed_or_temperature_differs(tiny_run, tmp_path):
    cfg, run_dir = tiny_run

    def audio(name, **kw):
        generate.run(cfg, run_dir, n=2, out_dir=tmp_path / name, **kw)
        return sf.read(str(tmp_path / name / "sample_1.wav"))[0]

    a, b = audio("a", seed=5), audio("b", seed=5)
    assert np.array_equal(a, b)
    assert not np.allclose(a, audio("c", seed=6))
    assert not np.allclose(a, audio("d", seed=5, temperature=0.3))


def test_noise_is_scaled_by_temperature_and_real_latent_std(tiny_run):
    cfg, run_dir = tiny_run
    stds = fakes.reference_stds(run_dir, 64, seed=0)
    assert stds.min() > 0
    cold = fakes.make_noise(stds, 128, 75, 0.5, seed=0)
    hot = fakes.make_noise(stds, 128, 75, 1.0, seed=0)
    assert np.allclose(cold.numpy() * 2, hot.numpy())
    measured = hot.std(dim=(1, 2))
    assert np.allclose(measured.numpy(), stds.numpy(), rtol=0.1)


def test_continuation_from_start_chunks(tiny_run, tmp_path):
    cfg, run_dir = tiny_run
    result = generate.run(cfg, run_dir, n=2, start_chunk=True, out_dir=tmp_path / "cont")
    assert all(s["title"].startswith("continuation of ") for s in result["samples"])
    assert sf.info(str(tmp_path / "cont" / "sample_1.wav")).frames == 12000


@pytest.mark.parametrize("change, reason", [
    ({"codec": "encodec"}, "codec: checkpoint 'encodec' vs run 'mel'"),
    ({"frames": 150}, "frames: checkpoint 150 vs run 75"),
    ({"sample_rate": 24000}, "sample_rate: checkpoint 24000 vs run 12000"),
])
def test_refuses_checkpoint_of_other_codec_or_shape(tiny_run, tmp_path, change, reason):
    cfg, run_dir = tiny_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("stage3", "generate"))
    save_stage3(cfg, other, [1], codec={**codec_description(run_dir), **change})
    with pytest.raises(generate.MismatchError, match="refusing .*last.pt") as err:
        generate.run(cfg, other, out_dir=tmp_path / "out")
    assert reason in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refuses_weights_that_do_not_fit_and_cli_says_why(tiny_run, tmp_path, capsys):
    cfg, run_dir = tiny_run
    wide = make_cfg(tmp_path, *TINY, "model.transformer.d_model=32")
    wide_dir = tmp_path / "wide"
    shutil.copytree(run_dir, wide_dir, ignore=shutil.ignore_patterns("stage3", "generate"))
    state = torch.load(save_stage3(wide, wide_dir, [1])[1], weights_only=True)
    state["config"] = config.to_dict(cfg)   # claims the tiny architecture (d_model 16)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(generate.MismatchError, match="weights do not fit"):
        generate.run(cfg, run_dir, checkpoint=bad, out_dir=tmp_path / "o")
    code = generate.main(["--run", str(run_dir), "--checkpoint", str(tmp_path / "none.pt"),
                          "--out", str(tmp_path / "o")])
    assert code == 1 and "checkpoint not found" in capsys.readouterr().err


def test_log_samples_puts_audio_and_spectrograms_in_mlflow(tiny_run):
    cfg, run_dir = tiny_run
    generator, _ = load_generator(run_dir / "stage3" / "epoch_2.pt",
                                  run_folder.read_encode_manifest(run_dir))
    generator.train()
    with step_run(cfg, run_dir, "stage3") as tracker:
        samples.log_samples(cfg, run_dir, generator, 2, tracker)
    assert generator.training   # left as it was
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run_id = json.loads((run_dir / "stage3" / "mlflow_run.json").read_text())["run_id"]
    names = {a.path for a in client.list_artifacts(run_id, "samples/epoch_2")}
    assert names == {f"samples/epoch_2/sample_{i}.{ext}" for i in range(3)
                     for ext in ("wav", "png")}
