"""Discriminator-over-epochs audit on a tiny real run (mel latents, real G and D checkpoints)."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import mlflow
import pytest
import torch

from jobs import audit
from jobs import checkpoint as ckpt_io
from pipeline.tracking import tracking_uri
from tests.fixtures.config import make_cfg
from tests.fixtures.tiny_gan_run import TINY, build_run, save_stage3

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("audit"))


@pytest.fixture
def fresh(tiny_run):
    """The tiny run with no stage3 or audit outputs left by an earlier test."""
    cfg, run_dir = tiny_run
    for name in ("stage3", "audit"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    return cfg, run_dir


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_audit_table_plot_reading_and_mlflow(fresh):
    cfg, run_dir = fresh
    save_stage3(cfg, run_dir, [1, 2, 3])
    result = audit.run(cfg, run_dir)
    out = run_dir / "audit"
    rows = read_csv(out / "audit.csv")
    assert [int(r["d_epoch"]) for r in rows] == [1, 2, 3]
    assert result["gen_epoch"] == 3 and result["batch"] == cfg.audit.batch_size
    # every validation pair (fewer than audit.clips) in each of audit.picks picks
    assert result["clips"] == result["val_pairs"] and result["picks"] == cfg.audit.picks == 3
    for row in rows:
        assert 0 <= float(row["fake_prob"]) <= 1 and 0 <= float(row["real_prob"]) <= 1
        assert 0 <= float(row["accuracy"]) <= 1 and float(row["fake_bce_std"]) >= 0
        assert float(row["fake_bce_vs_real"]) > 0 and float(row["real_bce_vs_real"]) > 0
        for twin in ("prior", "white", "shuffled"):
            assert 0 <= float(row[f"twin_auc_{twin}"]) <= 1
        assert float(row["twin_auc"]) == min(float(row[f"twin_auc_{t}"])
                                             for t in ("prior", "white", "shuffled"))
    assert (out / "audit.png").read_bytes()[:8] == PNG_MAGIC
    reading = (out / "reading.txt").read_text()
    assert "verdict: " + result["verdict"] in reading and "ln 2" in reading

    client = mlflow.MlflowClient(tracking_uri(cfg))
    run_id = json.loads((out / "gen_epoch_3" / "mlflow_run.json").read_text())["run_id"]
    names = {a.path for a in client.list_artifacts(run_id, "audit")}
    assert names == {"audit/audit.csv", "audit/audit.png", "audit/reading.txt"}
    history = client.get_metric_history(run_id, "audit/fake_bce_vs_real")
    assert sorted(m.step for m in history) == [1, 2, 3]
    by_step = {m.step: m.value for m in history}
    assert by_step[2] == pytest.approx(float(rows[1]["fake_bce_vs_real"]), abs=1e-5)
    assert client.get_run(run_id).data.tags["audit.verdict"] == result["verdict"]


def test_fixed_batches_are_seeded_and_follow_the_generator_epoch(fresh):
    cfg, run_dir = fresh
    save_stage3(cfg, run_dir, [1, 2, 3])
    from jobs.load_generator import load_generator
    from pipeline.run_folder import read_encode_manifest as read_manifest
    manifest = read_manifest(run_dir)
    g2, _ = load_generator(run_dir / "stage3" / "epoch_2.pt", manifest)
    g3, _ = load_generator(run_dir / "stage3" / "epoch_3.pt", manifest)
    fakes, reals, info = audit.fixed_batches(cfg, run_dir, g2, 2, 4)
    fakes_again, reals_again, _ = audit.fixed_batches(cfg, run_dir, g2, 2, 4)
    fakes_3, reals_3, info_3 = audit.fixed_batches(cfg, run_dir, g3, 3, 4)
    assert fakes.shape == reals.shape == (4, 128, 75)
    assert torch.equal(fakes, fakes_again) and torch.equal(reals, reals_again)
    assert torch.equal(reals, reals_3) and not torch.equal(fakes, fakes_3)
    # demo curriculum: start epoch 3, rate 0.25 -> no noise at epoch 2, a quarter at epoch 3
    assert (info["alpha"], info_3["alpha"]) == (0.0, 0.25)


def trained_on_ranks(cfg, run_dir, epochs, world_size, *overrides):
    """Stage-3 checkpoints as a `world_size`-rank training run with `overrides` stores them."""
    trained = make_cfg(run_dir.parent.parent, *TINY, *overrides)
    for path in save_stage3(trained, run_dir, epochs).values():
        state = ckpt_io.load(path)
        state["world_size"] = world_size
        ckpt_io.save(path, state)


def test_audit_scores_with_the_per_rank_training_batch(fresh):
    cfg, run_dir = fresh
    as_trained = dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, batch_size=None))
    trained_on_ranks(cfg, run_dir, [1, 2], 2, "stage3.batch_size=6")
    result = audit.run(as_trained, run_dir)
    assert result["batch"] == 3 != cfg.audit.batch_size            # 6 over 2 ranks
    reading = (run_dir / "audit" / "reading.txt").read_text()
    assert "in batches of 3" in reading
    assert "per-rank training batch (stage3.batch_size 6 / world_size 2)" in reading
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run_id = json.loads((run_dir / "audit" / "gen_epoch_2" / "mlflow_run.json")
                        .read_text())["run_id"]
    params = client.get_run(run_id).data.params
    assert params["batch"] == "3" and params["batch_source"] == "trained"
    # an explicit audit.batch_size wins, and the reading says it differs from training
    result = audit.run(cfg, run_dir)
    assert result["batch"] == cfg.audit.batch_size == 4
    assert "audit.batch_size = 4 (trained per rank: 3)" in result["reading"]


def test_as_trained_batch_needs_the_world_size(fresh):
    cfg, run_dir = fresh
    as_trained = dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, batch_size=None))
    save_stage3(cfg, run_dir, [1, 2])                               # no "world_size" stored
    with pytest.raises(audit.AuditError, match="epoch_2.pt.*world_size.*audit.batch_size"):
        audit.run(as_trained, run_dir)


def test_missing_and_mismatched_checkpoints_are_named_and_skipped(fresh, tmp_path):
    cfg, run_dir = fresh
    save_stage3(cfg, run_dir, [1, 2, 3, 4, 5, 6])
    (run_dir / "stage3" / "epoch_2.pt").unlink()
    save_stage3(cfg, run_dir, [4], with_discriminator=False)
    (run_dir / "stage3" / "epoch_3.pt").write_bytes(b"truncated")
    wide = make_cfg(tmp_path, *TINY, "model.discriminator.channels=12")
    save_stage3(wide, run_dir, [5])
    result = audit.run(cfg, run_dir, gen_epoch=6)
    assert [r["d_epoch"] for r in result["rows"]] == [1, 6]
    skipped = "\n".join(result["skipped"])
    assert "epoch_2.pt: missing" in skipped
    assert "epoch_3.pt: checkpoint" in skipped and "epoch_3.pt is damaged" in skipped
    assert "epoch_4.pt: holds no discriminator" in skipped
    assert "epoch_5.pt: weights do not fit" in skipped
    reading = (run_dir / "audit" / "reading.txt").read_text()
    assert "epoch_2.pt: missing" in reading and "epoch_4.pt" in reading
    assert len(read_csv(run_dir / "audit" / "audit.csv")) == 2


def test_fewer_than_two_discriminators_fails_with_message(fresh, capsys):
    cfg, run_dir = fresh
    save_stage3(cfg, run_dir, [1, 2])
    save_stage3(cfg, run_dir, [1], with_discriminator=False)
    with pytest.raises(audit.AuditError, match="1 usable discriminator checkpoint.*at least two"):
        audit.run(cfg, run_dir)
    assert "epoch_1.pt: holds no discriminator" in (run_dir / "audit" / "reading.txt").read_text()
    assert audit.main(["--run", str(run_dir)]) == 1
    assert "at least two" in capsys.readouterr().err


def test_missing_generator_checkpoint_is_named(fresh):
    cfg, run_dir = fresh
    save_stage3(cfg, run_dir, [1, 2])
    with pytest.raises(audit.AuditError, match="epoch_7.pt not found"):
        audit.run(cfg, run_dir, gen_epoch=7)


def test_wanted_epochs_adds_expected_multiples(tmp_path):
    found = {e: tmp_path / f"epoch_{e}.pt" for e in (5, 15, 17)}
    assert audit.wanted_epochs(found, 5, 0, 0) == [5, 10, 15, 17]
    assert audit.wanted_epochs(found, 5, 10, 15) == [10, 15]
    assert audit.wanted_epochs({}, 5, 0, 0) == []


def row(epoch, fake_bce, d_loss=0.6, accuracy=0.8, real_prob=0.7, fake_prob=0.4,
        twin_auc=0.9, twin_bce=1.0):
    return {"d_epoch": epoch, "fake_bce_vs_real": fake_bce, "d_loss": d_loss,
            "accuracy": accuracy, "real_prob": real_prob, "fake_prob": fake_prob,
            "twin_auc": twin_auc, "twin_bce": twin_bce}


@pytest.mark.parametrize("rows, verdict, phrase", [
    ([row(1, 0.2), row(2, 0.5), row(3, 1.1)], "healthy", "healthy arms race"),
    ([row(1, 0.2), row(2, 0.3), row(3, 0.5)], "trouble", "all counted discriminators are fooled"),
    ([row(1, 1.2), row(2, 1.3), row(3, 2.5)], "trouble", "all counted discriminators are strict"),
    ([row(1, 0.2, d_loss=0.05), row(2, 2.0, d_loss=0.1)], "trouble", "D collapse"),
    # the newest D scores fakes as it scores reals: every D is fooled, and it says so
    ([row(1, 0.2), row(2, 0.9, accuracy=0.55, real_prob=0.5, fake_prob=0.45)], "unclear",
     "cannot tell reals from fakes"),
    ([row(1, 0.2), row(2, 0.9, accuracy=0.55, real_prob=0.7, fake_prob=0.45)], "healthy",
     "healthy arms race"),
    ([row(1, 1.0), row(2, 0.3), row(3, 0.4)], "unclear", "mixed"),
    # both BCEs above ln 2: by MusiGAN's rule neither D is fooled, whatever D(real) says;
    # the reals-relative reading (epoch 1 fooled) is reported beside the verdict
    ([row(1, 0.86, real_prob=0.47, fake_prob=0.43), row(2, 3.2, real_prob=0.64, fake_prob=0.05)],
     "trouble", "read against the reals (D(fake) within 0.1 of D(real)): fooled at D epochs [1]"),
    # discriminators that cannot tell real clips from the trivial twins are not counted
    ([row(1, 0.2, twin_auc=0.55), row(2, 0.5, twin_auc=0.6), row(3, 1.1, twin_bce=0.5)],
     "trouble", "no discriminator can tell real clips from the generator's trivial twins"),
    ([row(1, 0.2, twin_auc=0.55), row(2, 0.3), row(3, 1.1)], "healthy",
     "1 of 3 discriminators are not counted"),
])
def test_reading_in_the_seed_terms(rows, verdict, phrase):
    got, findings = audit.read_rows(rows, collapse_d_loss=0.2, chance_margin=0.1,
                                    min_twin_auc=0.75)
    assert got == verdict
    assert any(phrase in f for f in findings), findings


class PriorPassThrough(torch.nn.Module):
    """A trivial generator: whatever it is fed (its own input noise at alpha 1) it returns."""

    def __init__(self, generator: torch.nn.Module):
        super().__init__()
        self.inner = generator

    def noise_stats(self, kind):
        return self.inner.noise_stats(kind)

    def forward(self, inp, tgt, mode, sample=False):
        return {"output": inp}


def train_twin_rejecting_discriminator(cfg, run_dir, seed):
    """A tiny D trained to call real validation clips real and their trivial twins fake."""
    from jobs.discriminator import build_discriminator
    from jobs.gan_losses import bce_vs_real
    from jobs.load_generator import load_generator
    from pipeline.run_folder import read_encode_manifest

    generator, _ = load_generator(run_dir / "stage3" / "epoch_1.pt", read_encode_manifest(run_dir))
    _, reals, info = audit.fixed_batches(cfg, run_dir, generator, 1, 64, seed)
    twins = audit.twin_batches(cfg, run_dir, generator, reals, info["pairs"], seed)
    torch.manual_seed(seed)
    disc = build_discriminator(cfg)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):   # batches of 4, as the audit scores them
        pick = torch.randperm(len(reals), generator=gen)[:4]
        loss = bce_vs_real(disc(reals[pick])[0]).mean() + sum(
            bce_vs_real([-l for l in disc(t[pick])[0]]).mean() for t in twins.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return disc


@pytest.mark.slow  # trains discriminators for 200 steps, then audits
def test_a_generator_that_outputs_its_own_prior_never_reads_healthy(fresh):
    cfg, run_dir = fresh
    # alpha 1 from epoch 1: the audit's fakes are made from pure noise
    at_noise = make_cfg(run_dir.parent.parent, *TINY, "stage3.curriculum.rate=1.0",
                        "stage3.curriculum.start_epoch=1")
    save_stage3(at_noise, run_dir, [1, 2, 3])
    from jobs.load_generator import load_generator
    from pipeline.run_folder import read_encode_manifest
    real_g, _ = load_generator(run_dir / "stage3" / "epoch_3.pt", read_encode_manifest(run_dir))
    prior = PriorPassThrough(real_g)
    # untrained discriminators cannot reject the twins: none counts, the verdict is trouble
    result = audit.run(cfg, run_dir, generator=prior)
    assert result["verdict"] == "trouble"
    assert not any(r["counted"] for r in result["rows"])
    # discriminators that do reject the twins catch the prior too: every one strict
    for epoch in (1, 2, 3):
        path = run_dir / "stage3" / f"epoch_{epoch}.pt"
        state = ckpt_io.load(path)
        state["discriminator"] = ckpt_io.model_state(
            train_twin_rejecting_discriminator(at_noise, run_dir, epoch))
        ckpt_io.save(path, state)
    result = audit.run(cfg, run_dir, generator=prior)
    assert all(r["counted"] for r in result["rows"]), result["reading"]
    assert result["verdict"] == "trouble"
    assert "all counted discriminators are strict" in result["reading"]
