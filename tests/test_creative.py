"""The PowerMuse creative cascade end to end: its objective cannot be won by copying, and
generation, evaluation, the audit and the per-epoch samples really run the cascade."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from jobs import audit, checkpoint as ckpt_io, evaluate, fakes, generate, samples
from jobs.generator import build_generator
from jobs.load_generator import load_generator
from jobs.losses import generator_losses
from pipeline import config, run_folder
from tests.fixtures.tiny_gan_run import build_run, save_stage3

TINY_MODEL = ["model.transformer.d_model=32", "model.transformer.layers=1",
              "model.transformer.heads=2", "model.transformer.ff_mult=2",
              "model.transformer.dropout=0.0", "model.transformer.max_frames=160",
              "model.transformer.cascade_stages=2", "stage1.mode=creative"]


def shuffled_pairs(b: int = 4, t: int = 48, seed: int = 0):
    """Inputs and targets from different "songs": own per-channel levels and time patterns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 128, 1, generator=g) + torch.randn(b, 128, t, generator=g).cumsum(-1) * 0.3
    y = torch.randn(b, 128, 1, generator=g) + torch.randn(b, 128, t, generator=g).cumsum(-1) * 0.3
    return x, y


def test_trained_cascade_beats_every_copy_on_the_creative_objective():
    """A tiny creative generator trained for 60 steps on one batch scores better than the
    input, the target, the masked views the cascade is given, or the old blend reference,
    each scored with the trained model's own masks (so the mask terms are the same)."""
    cfg = config.load("demo", "local", TINY_MODEL)
    st = cfg.stage1
    x, y = shuffled_pairs()
    torch.manual_seed(0)
    model = build_generator(cfg, ["transformer"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        terms = generator_losses(model(x, y, "creative"), x, y, st, "mel", 1.0)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x, y, "creative")
    m_in, m_tgt = out["mask_in"], out["mask_tgt"]

    def score(output):
        return generator_losses({"output": output, "mask_in": m_in, "mask_tgt": m_tgt},
                                x, y, st, "mel", 1.0)["total"].item()
    trained = score(out["output"])
    copies = {"input": x, "target": y, "masked views": m_in * x + m_tgt * y,
              "old blend": (m_in * x + m_tgt * y) / (m_in + m_tgt)}
    for name, copy in copies.items():
        assert score(copy) > trained + 0.2, (name, score(copy), trained)


# --- inference on a tiny creative run -------------------------------------------------

@pytest.fixture(scope="module")
def creative_run(tmp_path_factory):
    cfg, run_dir = build_run(tmp_path_factory.mktemp("creative"), "stage3.mode=creative")
    save_stage3(cfg, run_dir, [1, 2])   # curriculum starts at epoch 3: alpha 0 at epoch 2
    return cfg, run_dir


def perturbed(path, out, scale: float = 0.02):
    """A copy of checkpoint `path` whose agent.* and fuse.* weights got seeded noise."""
    state = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(1)
    touched = 0
    for name, tensor in state["generator"].items():
        if name.startswith(("agent.", "fuse.")) and tensor.is_floating_point():
            state["generator"][name] = tensor + scale * torch.randn(tensor.shape, generator=g)
            touched += 1
    assert touched
    ckpt_io.save(out, state)
    return out


def wavs(folder, n):
    return [sf.read(str(folder / f"sample_{i}.wav"))[0] for i in range(n)]


def test_generation_runs_the_cascade(creative_run, tmp_path):
    cfg, run_dir = creative_run
    last = run_dir / "stage3" / "last.pt"
    result = generate.run(cfg, run_dir, out_dir=tmp_path / "a")
    again = generate.run(cfg, run_dir, out_dir=tmp_path / "b")
    other = generate.run(cfg, run_dir, checkpoint=perturbed(last, tmp_path / "p.pt"),
                         out_dir=tmp_path / "c")
    n = cfg.generate.n
    a, b, c = wavs(tmp_path / "a", n), wavs(tmp_path / "b", n), wavs(tmp_path / "c", n)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))           # seeded
    assert not any(np.allclose(x, z) for x, z in zip(a, c))          # agent and fuse matter
    assert result["mode"] == "creative" and result["source"] == "pairs" and result["alpha"] == 0.0
    for i, sample in enumerate(result["samples"]):
        assert (tmp_path / "a" / f"masks_{i}.png").read_bytes()[:4] == b"\x89PNG"
        assert 0.0 <= sample["complementarity"] <= 1.0 and set(sample["pair"]) >= {"song", "target"}
    val_songs = {json.loads(line)["song"] for line in
                 (run_dir / "pairs" / "val.jsonl").read_text().splitlines()}
    assert {s["pair"]["song"] for s in result["samples"]} <= val_songs


def test_evaluation_and_audit_use_the_cascade(creative_run, tmp_path):
    cfg, run_dir = creative_run
    last = run_dir / "stage3" / "last.pt"
    bent = perturbed(last, tmp_path / "p.pt")
    metrics = evaluate.run(cfg, run_dir)
    bent_cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate,
                                                                      checkpoint=str(bent)))
    bent_metrics = evaluate.run(bent_cfg, run_dir)
    assert (metrics["metrics"]["diversity_ratio"]
            != bent_metrics["metrics"]["diversity_ratio"])
    assert metrics["mode"] == "creative"
    manifest = run_folder.read_encode_manifest(run_dir)
    g, _ = load_generator(last, manifest)
    g_bent, _ = load_generator(bent, manifest)
    fakes, reals, info = audit.fixed_batches(cfg, run_dir, g, 2, 4)
    fakes_bent, reals_bent, _ = audit.fixed_batches(cfg, run_dir, g_bent, 2, 4)
    assert info["mode"] == "creative" and torch.equal(reals, reals_bent)
    assert not torch.allclose(fakes, fakes_bent)


class FileTracker:
    """Stands in for MLflow: keeps the bytes of every logged artifact by file name."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def log_artifact(self, path, artifact_path=None):
        self.files[f"{artifact_path}/{path.split('/')[-1]}"] = open(path, "rb").read()


def test_per_epoch_samples_use_the_cascade(creative_run, tmp_path):
    cfg, run_dir = creative_run
    last = run_dir / "stage3" / "last.pt"
    manifest = run_folder.read_encode_manifest(run_dir)
    logged = []
    for path in (last, perturbed(last, tmp_path / "p.pt")):
        g, _ = load_generator(path, manifest)
        g.train()
        tracker = FileTracker()
        samples.log_samples(cfg, run_dir, g, 2, tracker)     # stage3 is the default
        assert g.training
        logged.append(tracker.files)
    assert logged[0]["samples/epoch_2/sample_0.wav"] != logged[1]["samples/epoch_2/sample_0.wav"]
    names = {f"samples/epoch_2/{kind}_{i}.{ext}" for i in range(cfg.generate.n)
             for kind, ext in (("sample", "wav"), ("sample", "png"), ("masks", "png"))}
    assert set(logged[0]) == set(logged[1]) == names


def test_cli_runs_the_cascade_on_chosen_pairs(creative_run, tmp_path, capsys):
    cfg, run_dir = creative_run
    assert generate.main(["--run", str(run_dir), "--list-pairs"]) == 0
    listing = capsys.readouterr().out.strip().splitlines()
    first = json.loads((run_dir / "pairs" / "val.jsonl").read_text().splitlines()[0])
    assert listing[0] == f"0\t{fakes.pair_name(first)}"
    out = tmp_path / "pair"
    code = generate.main(["--run", str(run_dir), "--pair", "1", "--pair", "0",
                          "--input-song", first["song"], "--input-chunk", "1",
                          "--target-song", first["target_song"], "--alpha", "0.5",
                          "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "generate.json").read_text())
    assert result["n"] == 3 and result["alpha"] == 0.5
    assert result["samples"][1]["pair"] == first
    assert result["samples"][2]["pair"] == {"song": first["song"], "input": 1,
                                            "target_song": first["target_song"], "target": 0}
    assert all((out / f"{kind}_{i}.png").exists() for i in range(3) for kind in ("sample", "masks"))
    # --alpha sets how much of the curriculum's noise the cascade sees of the pair
    clean = generate.run(cfg, run_dir, pairs=[first], alpha=0.0, out_dir=tmp_path / "clean")
    assert clean["alpha"] == 0.0
    assert not np.allclose(wavs(tmp_path / "clean", 1)[0], sf.read(str(out / "sample_1.wav"))[0])


@pytest.mark.parametrize("args, message", [
    (["--pair", "999"], "pair index 999 is out of range"),
    (["--input-song", "nope", "--target-song", "nope"], "'nope' is not in"),
    (["--input-song", "x"], "--input-song and --target-song go together"),
    (["--start-chunk"], "trained in creative mode"),
])
def test_cli_errors_name_the_problem(creative_run, tmp_path, capsys, args, message):
    _, run_dir = creative_run
    assert generate.main(["--run", str(run_dir), *args, "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err


def test_pairs_refused_for_a_continuation_checkpoint(creative_run, tmp_path):
    cfg, run_dir = creative_run
    state = torch.load(run_dir / "stage3" / "last.pt", weights_only=True)
    state["stage"] = "stage1"            # stage 1 of this config trains in continuation mode
    path = tmp_path / "cont.pt"
    ckpt_io.save(path, state)
    first = json.loads((run_dir / "pairs" / "val.jsonl").read_text().splitlines()[0])
    with pytest.raises(ValueError, match="continuation mode"):
        generate.run(cfg, run_dir, checkpoint=path, pairs=[first], out_dir=tmp_path / "o")
    result = generate.run(cfg, run_dir, checkpoint=path, start_chunk=True, n=2,
                          out_dir=tmp_path / "s")
    assert result["mode"] == "continuation" and result["source"] == "pairs"
    assert all(s["title"].startswith("continuation of ") for s in result["samples"])
