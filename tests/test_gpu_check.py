"""`make gpu-check` (bench/gpu_check.py): its pieces, what it does without CUDA, and its CPU
mode end to end, which runs the same code as on a GPU at tiny sizes so that it cannot rot."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bench import gpu_check, gpu_ddp, gpu_train
from bench.gpu_data import CPU_SIZES, GPU_SIZES, write_songs

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine this would run the "
                                                      "whole GPU check")
def test_without_cuda_it_says_so_in_one_line_and_runs_nothing(tmp_path, capsys):
    assert gpu_check.main(["--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0] and "--device cpu" in out[0]
    assert not (tmp_path / "work").exists()


def test_songs_are_seeded_loud_enough_and_of_the_asked_length(tmp_path):
    a = write_songs(tmp_path / "a", 2, 3.0, 12000, seed=1)
    b = write_songs(tmp_path / "b", 2, 3.0, 12000, seed=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    wave, rate = sf.read(str(a[0]))
    assert rate == 12000 and len(wave) == 36000
    assert 20 * math.log10(np.sqrt(np.mean(wave ** 2))) > -30     # far above silence_db
    assert not np.array_equal(wave, sf.read(str(a[1]))[0])


@pytest.mark.parametrize("size", [*GPU_SIZES, *CPU_SIZES], ids=lambda s: s.name)
def test_every_size_and_precision_is_a_valid_config(size, tmp_path):
    from pipeline import config
    for precision in gpu_check.PRECISIONS:
        cfg = config.load(size.experiment, "local", [
            *size.overrides, *gpu_train.stage_overrides(size, precision, "sqlite:///x.db"),
            f"data.chunk_seconds={size.chunk_seconds}", f"data.sample_rate={size.sample_rate}"])
        for stage in gpu_train.STAGES:
            scfg = getattr(cfg, stage)
            assert (scfg.precision, scfg.batch_size, scfg.epochs) == \
                (precision, size.batch_size, size.epochs)
            assert scfg.checkpoint_every == 1 and scfg.keep_last == 0
            assert scfg.gate.on_fail == "warn"      # a missed gate never stops the chain
        frames = int(size.chunk_seconds * 75)
        assert cfg.model.transformer.max_frames >= frames


def test_summary_reads_the_trainers_metrics_and_catches_a_nan():
    epochs = [{"epoch": 1, "step": 4, "samples_per_s": 10.0, "data_wait_share": 0.5,
               "peak_mem_mb": 100.0, "train_total": 1.0, "val_loss": 1.0},
              {"epoch": 2, "step": 8, "samples_per_s": 20.0, "data_wait_share": 0.1,
               "peak_mem_mb": 90.0, "train_total": 0.5, "val_loss": 0.8},
              {"epoch": 3, "step": 12, "samples_per_s": 5.0, "data_wait_share": 0.4,
               "peak_mem_mb": 95.0, "train_total": 0.4, "val_loss": 0.7}]
    r = gpu_train.StageResult("demo", "stage1", "fp32", "ok")
    gpu_train.summarize(r, epochs)
    assert (r.epochs, r.steps, r.samples_per_s, r.peak_mem_mb) == (3, 12, 5.0, 100.0)
    # pooled over epochs 2-3, each weighted by its time per sample: (0.05*0.1 + 0.2*0.4) / 0.25
    assert r.data_wait_share == pytest.approx(0.34)
    assert r.losses_finite and r.last_losses == {"train_total": 0.4, "val_loss": 0.7}
    epochs[1]["train_total"] = float("nan")
    gpu_train.summarize(r, epochs)
    assert r.losses_finite is False


def test_weight_distance_covers_generator_and_discriminator():
    a = {"generator": {"w": torch.zeros(3), "n": torch.tensor(5)},
         "discriminator": {"v": torch.zeros(2)}}
    b = {"generator": {"w": torch.tensor([3.0, 0.0, 0.0]), "n": torch.tensor(9)},
         "discriminator": {"v": torch.tensor([0.0, 4.0])}}
    assert gpu_train.weight_distance(a, b) == pytest.approx(5.0)   # integer buffers left out
    assert gpu_train.weight_distance(a, a) == 0.0
    assert gpu_train.weight_distance({"generator": a["generator"], "discriminator": None},
                                     {"generator": b["generator"], "discriminator": None}) == 3.0


def test_bus_bandwidth_counts_a_ring_all_reduce():
    assert gpu_ddp.bus_bandwidth(10**9, 1.0, 4) == pytest.approx(1.5)   # 2 * 3/4 of 1 GB
    assert gpu_ddp.bus_bandwidth(10**9, 0.5, 1) == pytest.approx(2.0)
    assert gpu_ddp.bus_bandwidth(10**9, 0.0, 2) == 0.0


def test_table_counts_every_status():
    checks = [gpu_check.Check("codec", "mel", "ok", "9x"),
              gpu_check.Check("train", "demo stage1 fp16", "FAILED", "exit 4"),
              gpu_check.Check("ddp", "all-reduce", "not run", "time budget of 300 s spent")]
    text = gpu_check.render(checks, {"device": "cuda", "gpus": ["H100"], "torch": "2",
                                     "cuda": "13"}, 12.0)
    assert "gpu-check on cuda (H100)" in text and "demo stage1 fp16" in text
    assert text.strip().splitlines()[-1] == "1 ok, 1 FAILED, 1 not run"


def test_a_spent_budget_starts_nothing(tmp_path):
    checks = gpu_check.after_first_size(CPU_SIZES[0], tmp_path, tmp_path, "sqlite:///x.db",
                                        "cpu", gpu_check.Budget(0.0), None)
    assert [c.status for c in checks] == ["not run"] * 3
    assert not any(tmp_path.iterdir())


@pytest.mark.integration
@pytest.mark.timeout(1200)   # every check at tiny sizes: 9 min seen on a busy shared machine
def test_cpu_mode_runs_every_check_end_to_end(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu"
    by = {(c["section"], c["what"]): c for c in result["checks"]}
    assert "gpu-check on cpu" in proc.stdout and "10 ok, 1 refused, 6 not run" in proc.stdout
    codecs = [c for c in result["checks"] if c["section"] == "codec"]
    assert [c["status"] for c in codecs] == ["ok", "ok"]
    assert "RANDOM weights" in codecs[0]["what"]
    assert all(c["details"]["step_x_real_time"] > 0 for c in codecs)
    for stage in gpu_train.STAGES:
        run = by[("train", f"tiny {stage} fp32")]
        d = run["details"]
        assert run["status"] == "ok", run
        assert d["losses_finite"] and d["samples_per_s"] > 0 and d["peak_mem_mb"] > 0
        assert 0 <= d["data_wait_share"] < 1 and d["steps"] == 10     # 5 batches x 2 epochs
        assert d["resume"]["status"] == "ok" and d["resume"]["moved"] > 0
        assert d["resume"]["share"] <= 1e-6 and d["resume"]["epochs"] == [2, 2]
        assert by[("train", f"tiny {stage} bf16")]["status"] == "not run"
    fp16 = by[("train", "tiny stage1 fp16")]
    assert fp16["status"] == "refused" and "fp16 needs CUDA" in fp16["result"]
    reduce = by[("ddp", "all-reduce, torchrun --nproc_per_node 2")]["details"]
    assert reduce["status"] == "ok" and reduce["backend"] == "gloo" and reduce["world_size"] == 2
    ddp = by[("ddp", "tiny stage1 fp32 under torchrun (2 rank(s))")]["details"]
    assert ddp["status"] == "ok" and ddp["epochs"] == 2 and ddp["rank_param_max_diff"] == 0.0
    generated = by[("generate", "jobs.generate from stage 3's last.pt")]
    assert generated["status"] == "ok" and generated["details"]["samples"] == 2
    audited = by[("audit", "jobs.audit over stage 3's discriminator checkpoints")]
    assert audited["status"] == "ok" and audited["details"]["rows"] == 2
    assert by[("deterministic", "tiny stage2 fp32 with stageN.deterministic=true")]["status"] == \
        "not run"                                                   # a CUDA question
