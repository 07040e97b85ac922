"""Exact resume: a stage stopped mid-epoch (SIGUSR2 -> exit 75, or SIGKILL) and resumed from
last.pt ends with the same weights, bit for bit, as an uninterrupted run (CPU, deterministic)."""
from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import time

import pytest
import torch

from jobs import distributed, train
from tests.fixtures.train_run import REPO, env, load_ckpt, make_run, train_cmd

# 16 train pairs, batch 2: 8 steps per epoch, 3 epochs; stage 3 adds D pre-training and noise;
# half the training samples come from augmented variants (seeded by epoch and index).
SETTINGS = ("stage1.batch_size=2", "stage1.epochs=3", "stage3.batch_size=2",
            "stage3.epochs=3", "stage3.curriculum.start_epoch=1", "stage1.augment_prob=0.5",
            "stage3.augment_prob=0.5")


class StopAfter(distributed.StopSignal):
    """A stop signal that 'arrives' at the n-th step boundary (deterministic mid-epoch stop)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    @property
    def set(self) -> bool:
        self.n -= 1
        if self.n < 0:
            self.received = "SIGUSR2"
        return bool(self.received)


def run_in_process(run_dir, stage, stop=None) -> int:
    cfg = train.load_config(run_dir)
    info = distributed.setup()
    return train.run_stage(cfg, run_dir, stage, info, stop or distributed.StopSignal())


def assert_same_weights(a: dict, b: dict) -> None:
    for key in ("generator", "discriminator"):
        if a[key] is None:
            assert b[key] is None
            continue
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


@pytest.fixture(scope="module")
def base(tmp_path_factory, store):
    """A run folder with stage 1 (3 epochs) and stage 2 (1 epoch) done: stage 3's starting point."""
    run_dir = make_run(tmp_path_factory.mktemp("base"), f"mlflow.tracking_uri={store}",
                       *SETTINGS, "stage2.epochs=1", variants=2)
    assert run_in_process(run_dir, "stage1") == 0
    assert run_in_process(run_dir, "stage2") == 0
    return run_dir


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """Final checkpoints and metrics of uninterrupted runs, computed once per stage."""
    cache = {}

    def get(stage):
        if stage not in cache:
            run_dir = copy_run(base, tmp_path_factory.mktemp("ref"), stage)
            assert run_in_process(run_dir, stage) == 0
            lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
            cache[stage] = (load_ckpt(run_dir / stage / "last.pt"), [json.loads(l) for l in lines])
        return cache[stage]
    return get


def copy_run(base, dest, stage):
    """A fresh copy of the base run without `stage`'s outputs (stage 1 restarts from scratch)."""
    run_dir = dest / "t"
    shutil.copytree(base, run_dir)
    shutil.rmtree(run_dir / stage, ignore_errors=True)
    return run_dir


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_stop_signal_mid_epoch_then_resume_is_exact(tmp_path, base, reference, stage):
    final_ref, ref_lines = reference(stage)
    cut = copy_run(base, tmp_path, stage)
    assert run_in_process(cut, stage, StopAfter(8 + 1 + 3)) == train.EXIT_PREEMPTED  # 8 batches + the epoch-end check
    mid = load_ckpt(cut / stage / "last.pt")
    assert (mid["epoch"], mid["batch_in_epoch"]) == (1, 3)        # epoch 2, 3 batches done
    assert json.loads((cut / stage / "exit.json").read_text())["exit_code"] == 75
    assert run_in_process(cut, stage) == 0
    final_cut = load_ckpt(cut / stage / "last.pt")
    assert final_cut["epoch"] == 3 and final_cut["step"] == final_ref["step"]
    assert_same_weights(final_ref, final_cut)
    assert final_cut["val_history"] == final_ref["val_history"]
    # the resumed epoch's train metrics include the batches done before the stop
    lines = [json.loads(l) for l in (cut / stage / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    key = "train_total" if stage == "stage1" else "train_d_loss"
    assert lines[1][key] == pytest.approx(ref_lines[1][key], rel=1e-9)


def wait_for(predicate, proc, timeout=180.0):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def epoch_done(path, n):
    def check():
        if not path.exists():
            return False
        try:
            return load_ckpt(path)["epoch"] >= n
        except ValueError:
            return False
    return check


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR2])
def test_real_signal_in_a_subprocess_then_resume_is_exact(tmp_path, base, reference, sig):
    final_ref, _ = reference("stage1")
    cut = copy_run(base, tmp_path, "stage1")
    last = cut / "stage1" / "last.pt"
    proc = subprocess.Popen(train_cmd(cut, "stage1"), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = wait_for(epoch_done(last, 1), proc)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert started, f"training ended before the signal: {err[-2000:]}"
    expected = -signal.SIGKILL if sig == signal.SIGKILL else train.EXIT_PREEMPTED
    assert proc.returncode == expected, err[-2000:]
    stopped = load_ckpt(last)
    assert stopped["epoch"] < 3, "the signal came too late to interrupt training"
    assert run_in_process(cut, "stage1") == 0
    assert_same_weights(final_ref, load_ckpt(last))


def test_signal_handler_sets_the_flag():
    stop = distributed.StopSignal().install()
    try:
        assert not stop.set
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.set and stop.received == "SIGUSR2"
    finally:
        stop.uninstall()
